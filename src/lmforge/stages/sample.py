"""`lmforge sample`: the policy writes K candidate responses per prompt, the raw material of ranking data.

InstructGPT (Ouyang et al. 2022, section 3.5) has labelers rank K = 4..9 model outputs per prompt; this
module produces those outputs. All prompts x K rows go through batched KV-cache generation
(`generation.generate`), sorted by prompt length so rows of one batch need little padding.

Input: JSONL prompt records, either the seed's instruction records without an output (keys any case) or
chat records ending with a user turn (a reference answer, if present, is ignored). Output, one line per
prompt, in input order:

    {"input": "<user-turn text>", "candidates": ["...", "...", ...]}        (+ "messages" for chat prompts)
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from lmforge.cli import Command, Flag
from lmforge.errors import ConfigError
from lmforge.generation import SamplingParams, generate_batched, response_text
from lmforge.prompts import encode_prompts, read_prompts
from lmforge.records import write_jsonl_atomic
from lmforge.rundir import check_output_file
from lmforge.stage import Stage, StageContext


@dataclass
class SampleConfig:
    """`lmforge sample` settings."""
    model: str = ""                 # policy checkpoint directory (e.g. the SFT model)
    prompts: str = ""               # JSONL prompts: instruction records without output, or chat records
    out: str = ""                   # output JSONL: {input, candidates} per prompt
    n_prompts: int = 0              # 0: every prompt; N: the first N (e.g. a subset of the RL prompts to rank)
    k: int = 4                      # candidates per prompt (InstructGPT: 4 to 9)
    temperature: float = 1.0        # 0: greedy (all K identical)
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 64
    batch_size: int = 64            # rows (prompt x candidate) per generation batch
    seed: int = 0
    device: str = "auto"

    def validate(self) -> None:
        for key in ("model", "prompts", "out"):
            if not getattr(self, key):
                raise ConfigError(key, "is required")
        for key in ("k", "max_new_tokens", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(key, f"must be at least 1, got {getattr(self, key)}")
        if self.temperature < 0:
            raise ConfigError("temperature", f"must be >= 0, got {self.temperature}")
        if self.n_prompts < 0:
            raise ConfigError("n_prompts", "must be >= 0")


def sample_candidates(cfg: SampleConfig, progress: bool = True) -> dict:
    """Write cfg.k sampled candidates per prompt of cfg.prompts to cfg.out (JSONL, atomically).

    Returns a summary: prompts, candidates, finished fraction (stop token reached), mean length, seconds.
    """
    from tqdm import tqdm

    from lmforge.checkpoint import load_causal_lm
    from lmforge.training import pick_device

    t0 = time.perf_counter()
    check_output_file(cfg.out)
    prompts = read_prompts(cfg.prompts)
    if cfg.n_prompts:
        prompts = prompts[:cfg.n_prompts]
    model, tok, _ = load_causal_lm(cfg.model, "lmforge sample", device=pick_device(cfg.device))
    model.eval()
    ids = encode_prompts(tok, prompts, cfg.prompts, {"model": model.config.max_position_embeddings})
    k = cfg.k
    rows = [p for p in ids for _ in range(k)]  # prompt i owns rows i*k .. i*k+k-1
    params = SamplingParams(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p)
    with tqdm(total=len(rows), desc="sample", disable=not progress, leave=False) as bar:
        tokens, finished = generate_batched(model, tok, rows, params, cfg.batch_size, cfg.seed, bar.update)
    records = []
    for i, p in enumerate(prompts):
        rec = {"input": p.text, "candidates": [response_text(tok, t) for t in tokens[i * k:(i + 1) * k]]}
        if p.is_chat:
            rec["messages"] = p.messages
        records.append(rec)
    write_jsonl_atomic(cfg.out, records)
    return {"prompts": len(prompts), "candidates": len(rows),
            "finished_frac": sum(finished) / len(rows),
            "mean_length": sum(len(t) - f for t, f in zip(tokens, finished)) / len(rows),
            "seconds": time.perf_counter() - t0}


def _print_summary(cfg: SampleConfig) -> None:
    s = sample_candidates(cfg)
    print(f"wrote {s['candidates']} candidates for {s['prompts']} prompts to {cfg.out} "
          f"({s['finished_frac']:.0%} finished, mean {s['mean_length']:.1f} tokens, {s['seconds']:.1f}s)")


COMMAND = Command(
    "lmforge sample", "Write K candidate responses per prompt (JSONL), the input of `lmforge label`.", SampleConfig,
    _print_summary,
    flags=(Flag("--model", "model", "policy checkpoint directory"), Flag("--prompts", "prompts", "JSONL prompts"),
           Flag("--out", "out", "output JSONL"), Flag("--k", "k", "candidates per prompt"),
           Flag("--temperature", "temperature"), Flag("--max-new-tokens", "max_new_tokens"), Flag("--seed", "seed")),
    examples=("lmforge sample --model runs/lmforge-tiny/sft --prompts runs/lmforge-tiny/world/rl_prompts.jsonl "
              "--k 4 --out candidates.jsonl",
              "lmforge sample --model runs/lmforge-tiny/sft --prompts prompts.jsonl --out c.jsonl k=8 top_p=0.9"))


def _wire(ctx: StageContext) -> dict:
    return {"model": ctx.artifact("sft_model"), "prompts": ctx.artifact("rl_prompts"),
            "out": ctx.artifact("candidates"), "seed": ctx.seed, "device": ctx.device}


STAGE = Stage("sample", SampleConfig, lambda ctx, cfg: sample_candidates(cfg), inputs=("sft_model", "rl_prompts"),
              outputs={"candidates": "candidates.jsonl"}, wire=_wire)
