"""`lmforge label`: rank sampled candidates with a judge, writing the seed's ranked format.

    in:  {"input": "...", "candidates": ["...", ...]}                      (lmforge sample's output)
    out: {"input": "...", "choices": [{"text": "...", "rank": 1}, ...]}     rank 1 = best, ties share a rank

Any judge of the registry (lmforge.judges) ranks: `oracle` (the built-in world's programmatic scorer: exact and
free, for the built-in dataset), `openai` (AI feedback from any OpenAI-compatible chat-completions endpoint, in
the spirit of RLAIF, Bai et al. 2022 and Lee et al. 2023), or one of your own. Candidates keep their input
order; duplicate texts are kept and tie.

`--judge human` instead serves a ranking page for people (lmforge.judges.human): each ranking is appended to
the output as it is submitted (plus labeller and time), a restart resumes, and the command ends once every
prompt has its `labelers` rankings. `lmforge label agreement FILE` reports how often labellers agree on the
prompts ranked more than once: pairwise agreement and Kendall's tau-b.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from lmforge.cli import Command, Flag
from lmforge.errors import ConfigError, LmforgeError, where
from lmforge.judges import JudgeConfig, make_judge
from lmforge.records import read_records, write_jsonl_atomic
from lmforge.rundir import check_output_file
from lmforge.stage import Stage, StageContext


@dataclass
class LabelConfig:
    """`lmforge label` settings."""
    input: str = ""                 # JSONL from `lmforge sample` ({input, candidates})
    out: str = ""                   # output JSONL ({input, choices: [{text, rank}]})
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    host: str = "127.0.0.1"         # judge human: address of the ranking page
    port: int = 8008                # judge human: its port
    labelers: int = 1               # judge human: rankings wanted per prompt, each by a different person
    lease_seconds: float = 600.0    # judge human: a prompt shown to one labeller returns to the pool after this

    def validate(self) -> None:
        for key in ("input", "out"):
            if not getattr(self, key):
                raise ConfigError(key, "is required")
        if self.labelers < 1:
            raise ConfigError("labelers", f"must be at least 1, got {self.labelers}")
        if not 0 <= self.port < 65536:
            raise ConfigError("port", "must be in [0, 65535]")
        if self.lease_seconds <= 0:
            raise ConfigError("lease_seconds", "must be positive")


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
    check_output_file(cfg.out)
    if cfg.judge.name == "human":
        return label_by_people(cfg)
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


def label_by_people(cfg: LabelConfig) -> dict:
    """Serve the ranking page until every prompt has cfg.labelers rankings (or Ctrl-C); a restart resumes."""
    from lmforge.judges.human import Item, LabelSession, item_ids, serve_label_page

    t0 = time.perf_counter()
    records = read_candidates(cfg.input)
    ids = item_ids([(r["input"], r["candidates"]) for r in records])
    items = [Item(i, r["input"], r["candidates"], r.get("messages")) for i, r in zip(ids, records)]
    session = LabelSession(items, cfg.out, labelers=cfg.labelers, lease_seconds=cfg.lease_seconds)
    serve_label_page(session, cfg.host, cfg.port)
    p = session.progress()
    return {"prompts": len(items), "rankings": p["done"], "wanted": p["total"], "skipped": p["skipped"],
            "per_labeler": p["per_labeler"], "seconds": time.perf_counter() - t0}


def _print_summary(cfg: LabelConfig) -> None:
    s = label_candidates(cfg)
    if cfg.judge.name == "human":
        return  # the page's server has printed its progress
    print(f"ranked {s['choices']} candidates for {s['prompts']} prompts into {cfg.out} "
          f"({s['prompts_with_ties']} with ties, {s['seconds']:.1f}s)")


COMMAND = Command(
    "lmforge label", "Rank candidates with a judge into the seed's ranked format.", LabelConfig, _print_summary,
    flags=(Flag("--judge", "judge.name", "oracle (the built-in world), openai (an OpenAI-compatible endpoint), "
                                         "human (a ranking page for people), or a registered judge"),
           Flag("--input", "input", "JSONL from `lmforge sample`"), Flag("--out", "out", "output JSONL"),
           Flag("--url", "judge.url", "openai judge: base URL, e.g. http://127.0.0.1:8000/v1"),
           Flag("--model", "judge.model", "openai judge: model name"),
           Flag("--workers", "judge.workers", "concurrent judge requests"),
           Flag("--port", "port", "human judge: port of the ranking page"),
           Flag("--labelers", "labelers", "human judge: rankings wanted per prompt (different people)")),
    examples=("lmforge label --judge oracle --input candidates.jsonl --out ranked.jsonl",
              "lmforge label --judge human --input candidates.jsonl --out ranked.jsonl --port 8008 --labelers 2",
              "lmforge label --judge openai --url http://127.0.0.1:8000/v1 --model my-model "
              "--input candidates.jsonl --out ranked.jsonl judge.workers=8"))


@dataclass
class AgreementConfig:
    """`lmforge label agreement` settings."""
    input: str = ""                 # ranked JSONL written by `lmforge label --judge human` (records with 'labeler')

    def validate(self) -> None:
        if not self.input:
            raise ConfigError("input", "is required")


def label_agreement(cfg: AgreementConfig) -> dict:
    """Pairwise agreement and Kendall's tau-b between labellers, over the prompts ranked more than once."""
    from lmforge.judges.human import agreement
    from lmforge.preferences import parse_record

    records = []
    for lineno, rec in read_records(cfg.input):
        try:
            parse_record(rec)
        except ValueError as e:
            raise LmforgeError(f"{where(cfg.input, lineno)}: {e}") from None
        if "choices" not in rec or not isinstance(rec.get("labeler"), str):
            raise LmforgeError(f"{where(cfg.input, lineno)}: expected a ranked record with a 'labeler' "
                               "(the output of `lmforge label --judge human`)")
        records.append(rec)
    return agreement(records)


def _print_agreement(cfg: AgreementConfig) -> None:
    a = label_agreement(cfg)
    if not a["labeler_pairs"]:
        print(f"{cfg.input}: no prompt was ranked by two labellers (rank with --labelers 2 for an overlap)")
        return
    tau = "n/a" if a["kendall_tau_b"] is None else f"{a['kendall_tau_b']:.3f}"
    print(f"{a['prompts']} prompts ranked by 2+ labellers ({a['labeler_pairs']} labeller pairs): "
          f"pairwise agreement {100 * a['pairwise_agreement']:.1f}%, Kendall's tau-b {tau}")


AGREEMENT = Command(
    "lmforge label agreement", "Inter-labeller agreement (pairwise agreement, Kendall's tau-b) of human rankings.",
    AgreementConfig, _print_agreement, positional=Flag("FILE", "input", "ranked JSONL from --judge human"),
    examples=("lmforge label agreement ranked.jsonl",))


def _wire(ctx: StageContext) -> dict:
    return {"input": ctx.artifact("candidates"), "out": ctx.artifact("preferences")}


STAGE = Stage("label", LabelConfig, lambda ctx, cfg: label_candidates(cfg), inputs=("candidates",),
              outputs={"preferences": "ranked.jsonl"}, wire=_wire)
