"""The oracle judge: the built-in world's programmatic scorer, standing in for InstructGPT's human labellers.

It re-derives the right answer from the prompt text, so it is exact, free and deterministic -- but only for
prompts of the built-in world (`lmforge world`). Score = correctness 0..60 + politeness 0..20 + concision 0..20.
"""

from __future__ import annotations

from lmforge.errors import LmforgeError
from lmforge.judges import Judge, register_judge
from lmforge.world import oracle_breakdown, oracle_rank, oracle_score, prompt_family

PARTS = ("correctness", "politeness", "concision")


def _outside_world(e: ValueError) -> LmforgeError:
    # Callers (label, evaluation) prefix file:line; the hint says what to do about it.
    return LmforgeError(f"{e}; the oracle judges only the built-in world's prompts "
                        "(use another judge for other data, e.g. --judge openai)")


@register_judge("oracle")
class OracleJudge(Judge):
    """Ranks, scores and explains responses to built-in world prompts with `lmforge.world`'s oracle."""

    def check(self, prompt: str) -> None:
        """Only the built-in world's prompts: the oracle re-derives the answer from the prompt's template."""
        try:
            prompt_family(prompt)
        except ValueError as e:
            raise _outside_world(e) from None

    def rank(self, prompt: str, responses: list[str], messages: list[dict] | None = None) -> list[int]:
        """Competition ranks by oracle score, exactly `lmforge.world.oracle_rank` (the world's prompts are single
        turns, so `messages` adds nothing)."""
        try:
            return [int(r) for r in oracle_rank(prompt, responses)]
        except ValueError as e:
            raise _outside_world(e) from None

    def score(self, prompt: str, response: str) -> float:
        """The oracle score, 0..100 (100 = the ideal answer)."""
        try:
            return float(oracle_score(prompt, response))
        except ValueError as e:
            raise _outside_world(e) from None

    def parts(self, prompt: str, response: str) -> dict[str, float]:
        """correctness (0..60), politeness (0..20) and concision (0..20); they sum to `score`."""
        try:
            b = oracle_breakdown(prompt, response)
        except ValueError as e:
            raise _outside_world(e) from None
        return {k: float(b[k]) for k in PARTS}

    def category(self, prompt: str) -> str:
        """The prompt's task family (arithmetic, facts, translate, uppercase, reverse)."""
        try:
            return prompt_family(prompt)
        except ValueError as e:
            raise _outside_world(e) from None
