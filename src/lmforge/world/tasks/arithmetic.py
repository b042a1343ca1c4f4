"""Arithmetic: add or subtract two numbers up to MAX_OPERAND ('What is 23 + 45?' -> '23 + 45 = 68.')."""

from __future__ import annotations

import random
import re

from lmforge.world.facts import zh_number
from lmforge.world.tasks.base import Task, Template

MAX_OPERAND = 50


def _result(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b


class Arithmetic(Task):
    """Key (a, op, b) with op '+' or '-'; the world has no negative numbers, so a >= b for '-'."""

    name = "arithmetic"
    weight = 0.3
    templates = (
        Template("en", "What is {a} {sym} {b}?"),
        Template("en", "Compute {a} {sym} {b}."),
        Template("en", "How much is {a} {word} {b}?"),
        Template("en", "Solve", "{a} {sym} {b}"),
        Template("zh", "计算 {a} {sym} {b}"),
        Template("zh", "{a} {zhop} {b} 等于多少?"),
    )
    fields = {"a": r"\d{1,3}", "b": r"\d{1,3}", "sym": r"[+-]", "word": "plus|minus", "zhop": "加|减"}
    corpus_weight = 0.3

    def random_key(self, rng: random.Random) -> tuple:
        """A sum or a difference of two numbers in 1..MAX_OPERAND, larger number first for differences."""
        op, a, b = rng.choice("+-"), rng.randint(1, MAX_OPERAND), rng.randint(1, MAX_OPERAND)
        return (max(a, b), op, min(a, b)) if op == "-" else (a, op, b)

    def placeholders(self, key: tuple) -> dict:
        """The operator as a symbol, an English word and a Chinese word; each template uses one."""
        a, op, b = key
        return dict(a=a, b=b, sym=op, word="plus" if op == "+" else "minus", zhop="加" if op == "+" else "减")

    def key_from_fields(self, template: Template, fields: dict[str, str]) -> tuple | None:
        """(a, op, b), or None for a difference that would be negative."""
        op = {"plus": "+", "minus": "-", "加": "+", "减": "-"}.get(fields.get("word") or fields.get("zhop"),
                                                                fields.get("sym"))
        a, b = int(fields["a"]), int(fields["b"])
        return (a, op, b) if op == "+" or a >= b else None

    def ideal(self, key: tuple, lang: str) -> str:
        """The whole equation: '23 + 45 = 68.' ('。' in Chinese)."""
        return f"{key[0]} {key[1]} {key[2]} = {_result(*key)}" + ("." if lang == "en" else "。")

    def wrong(self, key: tuple, lang: str, rng: random.Random) -> str:
        """The equation with a near-miss result (off by 1, 2 or 10, never negative)."""
        c = _result(*key)
        c2 = c + rng.choice([d for d in (-10, -2, -1, 1, 2, 10) if c + d >= 0])
        return f"{key[0]} {key[1]} {key[2]} = {c2}" + ("." if lang == "en" else "。")

    def correctness(self, key: tuple, lang: str, response: str) -> float:
        """60 for the equation, 40 for the bare result; 0 if the last number is wrong or others appear."""
        a, op, b = key
        c = _result(a, op, b)
        numbers = [int(n) for n in re.findall(r"\d+", response)]
        if not numbers or numbers[-1] != c or any(n not in (a, b, c) for n in numbers):
            return 0.0
        exact = re.search(rf"(?<!\d){a}\s*{re.escape(op)}\s*{b}\s*=\s*{c}(?!\d)", response)
        return 60.0 if exact else 40.0

    def document(self, rng: random.Random) -> str:
        """A few sums and differences stated in words, symbols or Chinese numerals."""
        lang = rng.choice(["en", "en", "zh"])
        out = []
        for _ in range(rng.randint(4, 9)):
            a, op, b = self.random_key(rng)
            c = _result(a, op, b)
            if lang == "en":
                forms = (["{a} plus {b} is {c}.", "{a} + {b} = {c}.", "Adding {a} and {b} gives {c}.",
                          "{a} and {b} make {c}."] if op == "+" else
                         ["{a} minus {b} is {c}.", "{a} - {b} = {c}.", "Take {b} away from {a} and you get {c}."])
                out.append(rng.choice(forms).format(a=a, b=b, c=c))
            else:
                w = "加" if op == "+" else "减"
                forms = ["{A}" + w + "{B}等于{C}。", "{a}" + w + "{b}等于{c}。", "{a} " + op + " {b} = {c}。"]
                out.append(rng.choice(forms).format(a=a, b=b, c=c, A=zh_number(a), B=zh_number(b), C=zh_number(c)))
        return ("\n" if rng.random() < 0.3 else " " if lang == "en" else "").join(out)
