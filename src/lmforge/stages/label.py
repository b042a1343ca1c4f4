"""`lmforge label`: rank sampled candidates with a judge, writing the seed's ranked format.

    in:  {"input": "...", "candidates": ["...", ...]}                      (lmforge sample's output)
    out: {"input": "...", "choices": [{"text": "...", "rank": 1}, ...]}     rank 1 = best, ties share a rank

Any judge of the registry (lmforge.judges) ranks: `oracle` (the built-in world's programmatic scorer: exact and
free, for the built-in dataset), `openai` (AI feedback from any OpenAI-compatible chat-completions endpoint, in
the spirit of RLAIF, Bai et al. 2022 and Lee et al. 2023), or one of your own. Candidates keep their input
order; duplicate texts are kept and tie.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from lmforge.cli import Command, Flag
from lmforge.errors import ConfigError, LmforgeError, where
from lmforge.judges import JudgeConfig, make_judge
from lmforge.records import read_records, write_jsonl_atomic
from lmforge.stage import Stage, StageContext


@dataclass
class LabelConfig:
    """`lmforge label` settings."""
    input: str = ""                 # JSONL from `lmforge sample` ({input, candidates})
    out: str = ""                   # output JSONL ({input, choices: [{text, rank}]})
    judge: JudgeConfig = field(default_factory=JudgeConfig)

    def validate(self) -> None:
        for key in ("input", "out"):
            if not getattr(self, key):
                raise ConfigError(key, "is required")


def read_candidates(path) -> list[dict]:
    """Every record ({"input": str, "candidates": [str, ...] with at least 2}); errors name file:line."""
    records = []
    for lineno, rec in read_records(path):
        if not isinstance(rec, dict) or not isinstance(rec.get("input"), str):
            raise LmforgeError(f"{where(path, lineno)}: expected an object with a string field 'input'")
        cands = rec.get("candidates")
        if not isinstance(cands, list) or not all(isinstance(c, str) for c in cands):
            raise LmforgeError(f"{where(path, lineno)}: 'candidates' must be a list of strings")
        if len(cands) < 2:
            raise LmforgeError(f"{where(path, lineno)}: need at least 2 candidates to rank, got {len(cands)}")
        records.append({**rec, "_line": lineno})
    if not records:
        raise LmforgeError(f"{path}: no records")
    return records


def label_candidates(cfg: LabelConfig) -> dict:
    """Rank every record's candidates with the judge and write the seed's ranked format to cfg.out (atomically).

    Returns a summary: prompts, choices, prompts with ties, dropped empty candidates and prompts, seconds.
    """
    judge = make_judge(cfg.judge)
    t0 = time.perf_counter()
    records = read_candidates(cfg.input)
    # An empty response has nothing to rank and the seed's ranked format has no empty choices: drop it, and
    # drop a prompt left with fewer than two candidates (counted in the summary).
    n_empty = sum(not t.strip() for r in records for t in r["candidates"])
    for r in records:
        r["candidates"] = [t for t in r["candidates"] if t.strip()]
    n_before = len(records)
    records = [r for r in records if len(r["candidates"]) >= 2]
    if not records:
        raise LmforgeError(f"{cfg.input}: no prompt has two non-empty candidates to rank")

    def rank(rec: dict) -> list[int]:
        try:
            return [int(r) for r in judge.rank(rec["input"], rec["candidates"], rec.get("messages"))]
        except LmforgeError as e:
            raise LmforgeError(f"{where(cfg.input, rec['_line'])}: {e}") from None

    with ThreadPoolExecutor(cfg.judge.workers) as pool:  # a remote judge answers requests in parallel
        all_ranks = list(pool.map(rank, records))
    out = []
    for rec, ranks in zip(records, all_ranks):
        row = {"input": rec["input"], "choices": [{"text": t, "rank": r} for t, r in zip(rec["candidates"], ranks)]}
        if "messages" in rec:
            row["messages"] = rec["messages"]
        out.append(row)
    write_jsonl_atomic(cfg.out, out)
    return {"prompts": len(out), "choices": sum(len(r["choices"]) for r in out),
            "prompts_with_ties": sum(len(set(r)) < len(r) for r in all_ranks),
            "empty_candidates_dropped": n_empty, "prompts_dropped": n_before - len(records),
            "seconds": time.perf_counter() - t0}


def _print_summary(cfg: LabelConfig) -> None:
    s = label_candidates(cfg)
    print(f"ranked {s['choices']} candidates for {s['prompts']} prompts into {cfg.out} "
          f"({s['prompts_with_ties']} with ties, {s['seconds']:.1f}s)")


COMMAND = Command(
    "lmforge label", "Rank candidates with a judge into the seed's ranked format.", LabelConfig, _print_summary,
    flags=(Flag("--judge", "judge.name", "oracle (the built-in world), openai (an OpenAI-compatible endpoint), "
                                         "or a registered judge"),
           Flag("--input", "input", "JSONL from `lmforge sample`"), Flag("--out", "out", "output JSONL"),
           Flag("--url", "judge.url", "openai judge: base URL, e.g. http://127.0.0.1:8000/v1"),
           Flag("--model", "judge.model", "openai judge: model name"),
           Flag("--workers", "judge.workers", "concurrent judge requests")),
    examples=("lmforge label --judge oracle --input candidates.jsonl --out ranked.jsonl",
              "lmforge label --judge openai --url http://127.0.0.1:8000/v1 --model my-model "
              "--input candidates.jsonl --out ranked.jsonl judge.workers=8"))


def _wire(ctx: StageContext) -> dict:
    return {"input": ctx.artifact("candidates"), "out": ctx.artifact("preferences")}


STAGE = Stage("label", LabelConfig, lambda ctx, cfg: label_candidates(cfg), inputs=("candidates",),
              outputs={"preferences": "ranked.jsonl"}, wire=_wire)
