"""The oracle: the judge that plays the human labeller, scoring any response to a world prompt 0..100.

It reads the prompt back into its task and key, re-derives the right answer from the fact tables, and adds
the task's correctness (0..60) to the shared style parts: politeness (0..20) and concision (0..20).
"""

from __future__ import annotations

import random

from lmforge.world import style, tasks


def prompt_family(prompt: str) -> str:
    """The task family of a world prompt: arithmetic, facts, translate, uppercase or reverse."""
    return tasks.parse_prompt(prompt).task.name


def ideal_response(prompt: str) -> str:
    """The answer the oracle scores 100: correct, polite-neutral and concise."""
    return tasks.parse_prompt(prompt).ideal()


def flawed_response(prompt: str, *, impolite: bool = False, verbose: bool = False, wrong: bool = False,
                    rng: random.Random | None = None) -> str:
    """A response with the chosen flaws, drawn the same way as the flawed SFT demonstrations."""
    question = tasks.parse_prompt(prompt)
    return question.answer(impolite=impolite, verbose=verbose, wrong=wrong, rng=rng or random.Random(prompt))


def oracle_breakdown(prompt: str, response: str) -> dict:
    """The oracle's score split into correctness (0..60), politeness (0..20) and concision (0..20)."""
    question = tasks.parse_prompt(prompt)  # first, so a foreign prompt fails even with an empty response
    if not response or not response.strip():
        return {"correctness": 0.0, "politeness": 0.0, "concision": 0.0, "score": 0.0}
    parts = {"correctness": question.task.correctness(question.key, question.lang, response),
             "politeness": style.politeness(response),
             "concision": round(style.concision(response, question.ideal()), 4)}
    return {**parts, "score": round(sum(parts.values()), 4)}


def oracle_score(prompt: str, response: str) -> float:
    """Score a response to a world prompt (format_prompt text) from 0 to 100: correctness, then style."""
    return oracle_breakdown(prompt, response)["score"]


def oracle_rank(prompt: str, responses: list[str]) -> list[int]:
    """Ranks 1..K (1 = best) by oracle score; equal scores share a rank (1, 2, 2, 4)."""
    scores = [oracle_score(prompt, r) for r in responses]
    return [1 + sum(other > s for other in scores) for s in scores]
