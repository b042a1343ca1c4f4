"""Verifiable rewards of the built-in world, for RL from programmatic rewards (RLVR: DeepSeekMath's GRPO,
Tulu 3, DeepSeek-R1) instead of a learned reward model. Each function has the `lmforge.rollout.RewardFn`
signature, so a config names it directly:

    lmforge grpo --config configs/grpo_tiny.yaml reward_fn=lmforge.world.rewards:correctness

They score with the oracle (lmforge.world.oracle), so they accept only the world's own prompts.
"""

from __future__ import annotations

from lmforge.errors import LmforgeError
from lmforge.world.oracle import oracle_breakdown


def _parts(prompts: list[str], responses: list[str]) -> list[dict]:
    if len(prompts) != len(responses):
        raise LmforgeError(f"world reward: {len(prompts)} prompts but {len(responses)} responses")
    try:
        return [oracle_breakdown(p, r) for p, r in zip(prompts, responses)]
    except ValueError as e:  # a prompt no task family of the world wrote
        raise LmforgeError(f"{e}; lmforge.world.rewards scores only the built-in world's prompts "
                           "(`lmforge world` writes them)") from None


def correctness(prompts: list[str], responses: list[str], ids: list[list[int]] | None = None) -> list[float]:
    """Oracle correctness / 60, in [0, 1]: 1 for the exact right answer, partial credit for the right content in
    another form, 0 when wrong. Style (politeness, concision) is ignored: the verifiable part alone."""
    return [b["correctness"] / 60.0 for b in _parts(prompts, responses)]


def oracle(prompts: list[str], responses: list[str], ids: list[list[int]] | None = None) -> list[float]:
    """The whole oracle score / 100, in [0, 1]: correctness (0.6) plus politeness and concision (0.2 each)."""
    return [b["score"] / 100.0 for b in _parts(prompts, responses)]
