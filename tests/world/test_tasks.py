"""Task families: each reads back its own prompts, knows its answers, and a new family plugs in with one class."""

import random
import re

import pytest

from lmforge.world import (Question, Task, Template, flawed_response, generate_world, ideal_response, oracle_score,
                           prompt_family, tasks)
from lmforge.world.tasks import TASKS, parse_prompt

FAMILIES = [t.name for t in TASKS]


def test_registry():
    assert FAMILIES == ["arithmetic", "facts", "translate", "uppercase", "reverse"]  # order fixes the seeded data
    assert sum(t.weight for t in TASKS) == pytest.approx(1.0)
    assert all(t.templates and all(isinstance(tp, Template) for tp in t.templates) for t in TASKS)


@pytest.mark.parametrize("task", TASKS, ids=FAMILIES)
def test_questions_round_trip(task):
    """Every template of every drawn key parses back to the same question, whose ideal answer scores 100."""
    rng = random.Random(0)
    for _ in range(100):
        key = task.random_key(rng)
        assert task.split_of(key) in ("sft", "rl", "eval")
        for template in task.templates_for(key):
            q = Question(task, template, key)
            assert parse_prompt(q.prompt) == q, q.prompt
            assert prompt_family(q.prompt) == task.name
            assert ideal_response(q.prompt) == q.ideal()
            assert oracle_score(q.prompt, q.ideal()) == 100.0


@pytest.mark.parametrize("task", TASKS, ids=FAMILIES)
def test_ideal_gets_full_correctness_and_wrong_less(task):
    rng = random.Random(1)
    for _ in range(200):
        key = task.random_key(rng)
        for lang in sorted({t.lang for t in task.templates_for(key)}):
            assert task.correctness(key, lang, task.ideal(key, lang)) == 60.0
            wrong = task.wrong(key, lang, rng)
            assert task.correctness(key, lang, wrong) < 60.0, (key, wrong)


@pytest.mark.parametrize("task", [t for t in TASKS if t.corpus_weight > 0], ids=lambda t: t.name)
def test_task_documents_are_not_prompts(task):
    rng = random.Random(2)
    for _ in range(20):
        doc = task.document(rng)
        assert doc and "?" not in doc
        with pytest.raises(ValueError):
            parse_prompt(doc)


def test_wrong_answers_of_degenerate_keys():
    reverse = next(t for t in TASKS if t.name == "reverse")
    assert reverse.wrong(("cat", "cat", "cat"), "en", random.Random(0)) == "cat cat"  # every order reads the same
    arithmetic = next(t for t in TASKS if t.name == "arithmetic")
    for _ in range(20):  # 1 - 1 = 0: a near miss is never negative
        assert not re.search(r"= -", arithmetic.wrong((1, "-", 1), "en", random.Random(_)))


class Double(Task):
    """A toy family, as a user would add one: 'Double 21.' -> '42'."""

    name = "double"
    weight = 0.2
    templates = (Template("en", "Double {n}."), Template("zh", "{n} 的两倍是多少?"))
    fields = {"n": r"\d{1,3}"}
    corpus_weight = 0.05

    def random_key(self, rng):
        return (rng.randint(1, 99),)

    def placeholders(self, key):
        return {"n": key[0]}

    def key_from_fields(self, template, fields):
        return (int(fields["n"]),)

    def ideal(self, key, lang):
        return str(2 * key[0])

    def wrong(self, key, lang, rng):
        return str(2 * key[0] + rng.choice([-1, 1]))

    def correctness(self, key, lang, response):
        numbers = re.findall(r"\d+", response)
        return 60.0 if numbers and numbers[-1] == str(2 * key[0]) else 0.0

    def document(self, rng):
        n = self.random_key(rng)[0]
        return f"Twice {n} is {2 * n}."


def test_new_family_is_one_class_and_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(tasks, "TASKS", [*TASKS, Double()])
    assert prompt_family("Double 21.") == "double" and prompt_family("21 的两倍是多少?") == "double"
    assert ideal_response("Double 21.") == "42"
    assert oracle_score("Double 21.", "42") == 100.0
    assert oracle_score("Double 21.", flawed_response("Double 21.", wrong=True)) < 100.0
    assert oracle_score("Double 21.", flawed_response("Double 21.", impolite=True)) == 80.0
    assert prompt_family("What is 23 + 45?") == "arithmetic"  # the built-in families are untouched

    manifest = generate_world(tmp_path, "tiny", seed=0)
    assert manifest["counts"]["families"]["sft"]["double"] > 0
    assert "Twice " in (tmp_path / "corpus.txt").read_text(encoding="utf-8")
    prompts = [line for line in (tmp_path / "eval_prompts.jsonl").read_text(encoding="utf-8").splitlines()
               if "Double" in line]
    assert prompts


def test_unknown_family_after_removal(monkeypatch):
    monkeypatch.setattr(tasks, "TASKS", [t for t in TASKS if t.name != "reverse"])
    with pytest.raises(ValueError, match="no known task family"):
        prompt_family("Reverse the word order\ncat dog bird")
