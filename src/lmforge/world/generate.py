"""Writing the world: sample questions per split, answer them (some with flaws), write the files atomically."""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.world import tasks
from lmforge.world.corpus import build_corpus, estimate_tokens
from lmforge.world.tasks.base import Question

WORLD_FORMAT_VERSION = 1


@dataclass
class WorldSizes:
    """How much of each file a preset writes."""

    corpus_tokens_approx: int  # ~3.5 English chars or ~1 Chinese char per token
    n_sft: int
    n_rl_prompts: int
    n_eval: int


PRESETS: dict[str, WorldSizes] = {
    "tiny": WorldSizes(150_000, 600, 200, 64),
    "default": WorldSizes(1_250_000, 4000, 1000, 200),
}

# Verbose is deliberately above 50%: evaluation decodes greedily, and a flaw rarer than 50% is never the
# most likely continuation, so a greedy SFT policy would not show it and PPO would have nothing to fix.
DEFAULT_FLAW_RATES = {"impolite": 0.3, "verbose": 0.6, "wrong": 0.12}


def sample_questions(split: str, n: int, rng: random.Random) -> list[Question]:
    """n questions of one split, family by task weight, unique prompts while the split's pool allows."""
    families = list(tasks.TASKS)
    weights = [t.weight for t in families]
    seen: set[str] = set()
    out = []
    while len(out) < n:
        task, pick, repeat = rng.choices(families, weights)[0], None, None
        for _ in range(200):
            key = task.random_key(rng)
            if task.split_of(key) != split:
                continue
            question = Question(task, rng.choice(task.templates_for(key)), key)
            if question.prompt not in seen:
                pick = question
                break
            repeat = question
        pick = pick or repeat  # the split's pool is exhausted: repeat a prompt rather than loop forever
        if pick is not None:
            seen.add(pick.prompt)
            out.append(pick)
    return out


def _check_config(preset: str, flaw_rates: dict | None) -> dict[str, float]:
    """The flaw rates to use; LmforgeError naming the config key for an unknown preset or a bad rate."""
    if preset not in PRESETS:
        raise LmforgeError(f"config key 'world.preset': unknown world preset {preset!r} "
                           f"(expected one of {', '.join(PRESETS)})")
    rates = dict(DEFAULT_FLAW_RATES)
    for name, rate in (flaw_rates or {}).items():
        key = f"config key 'world.flaw_rates.{name}'"
        if name not in rates:
            raise LmforgeError(f"{key}: unknown flaw {name!r} (expected one of {', '.join(rates)})")
        try:
            value = float(rate)
        except (TypeError, ValueError):
            value = float("nan")
        if not 0.0 <= value <= 1.0:  # also rejects NaN
            raise LmforgeError(f"{key}: flaw rate {rate!r} is not a probability (expected a number in [0, 1])")
        rates[name] = value
    return rates


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    os.replace(tmp, path)


def _jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def _prompt_records(questions: list[Question]) -> list[dict]:
    return [{"Instruction": q.instruction, "Input": q.input} for q in questions]


def _family_counts(questions: list[Question]) -> dict[str, int]:
    return {t.name: sum(q.task is t for q in questions) for t in tasks.TASKS}


def generate_world(out_dir, preset: str = "default", seed: int = 0, flaw_rates: dict | None = None) -> dict:
    """Write corpus.txt, sft.jsonl, rl_prompts.jsonl, eval_prompts.jsonl and manifest.json into out_dir.

    Deterministic: the same seed and preset give byte-identical files. flaw_rates overrides entries of
    DEFAULT_FLAW_RATES (impolite, verbose, wrong: independent probabilities per SFT demonstration).
    Returns the manifest (file names, sizes, counts).
    """
    rates = _check_config(preset, flaw_rates)
    sizes = PRESETS[preset]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # Independent random streams per file, so changing one size does not reshuffle the others.
    corpus_docs = build_corpus(random.Random(f"corpus-{seed}"), sizes.corpus_tokens_approx)
    corpus = "\n\n".join(corpus_docs) + "\n"

    rng = random.Random(f"sft-{seed}")
    sft_questions = sample_questions("sft", sizes.n_sft, rng)
    sft, flawed = [], dict.fromkeys(["impolite", "verbose", "wrong", "any"], 0)
    for q in sft_questions:
        flags = {name: rng.random() < rates[name] for name in ("impolite", "verbose", "wrong")}
        sft.append({"Instruction": q.instruction, "Input": q.input, "Output": q.answer(**flags, rng=rng)})
        for name, on in flags.items():
            flawed[name] += on
        flawed["any"] += any(flags.values())
    rl_questions = sample_questions("rl", sizes.n_rl_prompts, random.Random(f"rl-{seed}"))
    eval_questions = sample_questions("eval", sizes.n_eval, random.Random(f"eval-{seed}"))

    files = {"corpus": "corpus.txt", "sft": "sft.jsonl", "rl_prompts": "rl_prompts.jsonl",
             "eval_prompts": "eval_prompts.jsonl"}
    _write_atomic(out / files["corpus"], corpus)
    _write_atomic(out / files["sft"], _jsonl(sft))
    _write_atomic(out / files["rl_prompts"], _jsonl(_prompt_records(rl_questions)))
    _write_atomic(out / files["eval_prompts"], _jsonl(_prompt_records(eval_questions)))

    manifest = {
        "format_version": WORLD_FORMAT_VERSION, "preset": preset, "seed": seed, "flaw_rates": rates,
        "sizes": asdict(sizes), "files": files,
        "counts": {
            "corpus_docs": len(corpus_docs), "corpus_chars": len(corpus),
            "corpus_tokens_est": int(estimate_tokens(corpus)),
            "sft": len(sft), "rl_prompts": len(rl_questions), "eval_prompts": len(eval_questions),
            "sft_flawed": flawed,
            "families": {"sft": _family_counts(sft_questions), "rl_prompts": _family_counts(rl_questions),
                         "eval_prompts": _family_counts(eval_questions)},
        },
    }
    _write_atomic(out / "manifest.json", json.dumps(manifest, ensure_ascii=False, indent=2) + "\n")
    return manifest
