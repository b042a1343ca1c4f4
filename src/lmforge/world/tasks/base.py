"""What every task family shares: prompt templates, the Task base class, and a Question (task + template + key).

A task family (arithmetic, facts, ...) is one Task subclass. Its prompt templates are both generators
(str.format) and parsers (compiled to a regex from the task's field patterns), so the oracle can read any
prompt the world writes back into the key it asks about and re-derive the right answer from the fact tables.
"""

from __future__ import annotations

import hashlib
import random
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

from lmforge.world.style import add_flaws

SPLIT_PERCENT = {"sft": 70, "rl": 20, "eval": 10}  # of each family's question keys


def format_prompt(instruction: str, input: str = "") -> str:
    """The user-turn text of an instruction record: the instruction, then a newline and the input if any."""
    return f"{instruction}\n{input}" if input else instruction


def alternation(names) -> str:
    """A regex matching any of names, longest first (so 'pineapple' is not read as a truncated 'pine')."""
    return "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))


@dataclass(frozen=True)
class Template:
    """One way to ask a task's question; {field} placeholders are filled by Task.placeholders(key)."""

    lang: str  # language of the instruction; the answer and any flaw phrases follow it
    instruction: str
    input: str = ""

    def pattern(self, fields: dict[str, str]) -> re.Pattern:
        """The regex that reads a prompt written from this template back into its {field} values."""
        parts = re.split(r"\{(\w+)\}", format_prompt(self.instruction, self.input))
        return re.compile("".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>{fields[p]})"
                                  for i, p in enumerate(parts)))


class Task(ABC):
    """One task family. Subclasses set the class attributes and implement the methods that raise here.

    A key is a tuple naming what one question asks, e.g. (23, '+', 45) or ('banana', 'color'); every template
    of a task can ask every key (unless templates_for narrows it), and the key alone decides the right answer.
    """

    name: str = ""  # the family name in manifests and reports
    weight: float = 0.0  # share of sampled prompts (SFT, RL and eval) of this family
    templates: ClassVar[tuple[Template, ...]] = ()  # order matters: the sampler draws from it with the seeded rng
    fields: ClassVar[dict[str, str]] = {}  # placeholder -> the regex its values match when a prompt is parsed
    corpus_weight: float = 0.0  # share of pretraining documents drawn from document(); 0 = none

    # -- writing questions

    @abstractmethod
    def random_key(self, rng: random.Random) -> tuple:
        """Draw the key of a random question."""

    def templates_for(self, key: tuple) -> list[Template]:
        """The templates that can ask key (all of them unless a task's templates are key-specific)."""
        return list(self.templates)

    @abstractmethod
    def placeholders(self, key: tuple) -> dict:
        """The values of the template fields for key."""

    def split_of(self, key: tuple) -> str:
        """sft / rl / eval by a seed-independent hash of what is asked: every template of a key lands together."""
        h = int.from_bytes(hashlib.sha256(f"{self.name}|{key!r}".encode()).digest()[:8], "big") % 100
        if h < SPLIT_PERCENT["sft"]:
            return "sft"
        return "rl" if h < SPLIT_PERCENT["sft"] + SPLIT_PERCENT["rl"] else "eval"

    # -- reading prompts back

    @cached_property
    def patterns(self) -> list[tuple[Template, re.Pattern]]:
        """Each template with its compiled parser, in template order."""
        return [(t, t.pattern(self.fields)) for t in self.templates]

    @abstractmethod
    def key_from_fields(self, template: Template, fields: dict[str, str]) -> tuple | None:
        """The key a parsed prompt asks, or None when the matched text asks nothing this world knows."""

    def parse(self, text: str) -> Question | None:
        """The question a stripped prompt asks if one of this task's templates wrote it, else None."""
        for template, rx in self.patterns:
            m = rx.fullmatch(text)
            key = None if m is None else self.key_from_fields(template, m.groupdict())
            if key is not None:
                return Question(self, template, key)
        return None

    # -- answers and their score

    @abstractmethod
    def ideal(self, key: tuple, lang: str) -> str:
        """The answer the oracle scores 100: correct, polite-neutral and concise."""

    @abstractmethod
    def wrong(self, key: tuple, lang: str, rng: random.Random) -> str:
        """A plausible wrong answer in the ideal format, for flawed demonstrations."""

    @abstractmethod
    def correctness(self, key: tuple, lang: str, response: str) -> float:
        """0..60: the exact right answer 60, the right content in another form partial credit, hedging 0."""

    def document(self, rng: random.Random) -> str:
        """A pretraining document practising this task's skill, never in instruction format. Only tasks with
        corpus_weight > 0 are asked for one, and those override this."""
        raise TypeError(f"task {self.name!r} writes no pretraining documents (its corpus_weight is 0)")

    def __repr__(self) -> str:
        return f"<task {self.name}>"


@dataclass(frozen=True)
class Question:
    """One question of a task: the template that asks it and the key of what is asked."""

    task: Task
    template: Template
    key: tuple

    @property
    def lang(self) -> str:
        """The prompt's language, which the answer follows."""
        return self.template.lang

    @property
    def instruction(self) -> str:
        """The Instruction field of the record asking this question."""
        return self.template.instruction.format(**self.task.placeholders(self.key))

    @property
    def input(self) -> str:
        """The Input field of the record asking this question ('' for one-line prompts)."""
        return self.template.input.format(**self.task.placeholders(self.key))

    @property
    def prompt(self) -> str:
        """The user-turn text, as format_prompt writes it."""
        return format_prompt(self.instruction, self.input)

    def ideal(self) -> str:
        """The ideal answer to this question."""
        return self.task.ideal(self.key, self.lang)

    def answer(self, *, impolite: bool, verbose: bool, wrong: bool, rng: random.Random) -> str:
        """A demonstration with the chosen flaws; rng draws the wrong answer first, then the flaw phrases."""
        text = self.task.wrong(self.key, self.lang, rng) if wrong else self.ideal()
        return add_flaws(text, self.lang, impolite, verbose, rng)
