"""The built-in world: a generated dataset, and the oracle judge that plays the human labeller.

Everything comes from fixed fact tables (world/facts.py) plus a seed, with the standard library only, so the
whole InstructGPT pipeline runs offline and reproducibly:

  corpus.txt          pretraining text stating the world's facts in English and Chinese, translations,
                      arithmetic, capital letters and reversed word lists -- never in instruction format
  sft.jsonl           demonstrations {"Instruction", "Input", "Output"}; a configurable share is flawed
                      (impolite opener, verbose filler, wrong answer), as real demonstration data is
  rl_prompts.jsonl    prompts for RL, disjoint from the SFT prompts
  eval_prompts.jsonl  held-out prompts, disjoint from both

Prompts are split by a hash of what they ask (number pair, entity + attribute, phrase, word list), so the
eval set asks unseen combinations of known pieces. The oracle re-derives the right answer from the prompt
text alone: correctness 0..60, politeness 0..20, concision 0..20.

Layout: each task family (arithmetic, facts, translate, uppercase, reverse) is one Task class in
world/tasks/, listed in world.tasks.TASKS, which owns its templates, question sampling, ideal and wrong
answers, correctness score and its own corpus documents. world/style.py holds the flaws and the shared
politeness and concision scores, world/oracle.py composes them, world/corpus.py assembles the pretraining
text and world/generate.py writes the files.
"""

from lmforge.world.corpus import estimate_tokens
from lmforge.world.facts import zh_number
from lmforge.world.generate import DEFAULT_FLAW_RATES, PRESETS, WORLD_FORMAT_VERSION, WorldSizes, generate_world
from lmforge.world.oracle import (flawed_response, ideal_response, oracle_breakdown, oracle_rank, oracle_score,
                                  prompt_family)
from lmforge.world.tasks import Question, Task, Template, format_prompt

__all__ = [
    "DEFAULT_FLAW_RATES", "PRESETS", "WORLD_FORMAT_VERSION", "Question", "Task", "Template", "WorldSizes",
    "estimate_tokens", "flawed_response", "format_prompt", "generate_world", "ideal_response", "oracle_breakdown",
    "oracle_rank", "oracle_score", "prompt_family", "zh_number",
]
