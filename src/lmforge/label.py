"""`lmforge label`: rank sampled candidates with a judge, writing the seed's ranked format.

    in:  {"input": "...", "candidates": ["...", ...]}                      (lmforge sample's output)
    out: {"input": "...", "choices": [{"text": "...", "rank": 1}, ...]}     rank 1 = best, ties share a rank

Judges: `oracle` (the built-in world's programmatic scorer: exact and free, for the built-in dataset),
`openai` (AI feedback from any OpenAI-compatible chat-completions endpoint, in the spirit of RLAIF,
Bai et al. 2022 "Constitutional AI" and Lee et al. 2023), and `human` (a later release).
Candidates keep their input order; duplicate texts are kept and tie (a judge ranks each distinct text once).
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.sample import iter_jsonl, write_jsonl_atomic

JUDGES = ("oracle", "openai", "human")

JUDGE_SYSTEM = ("You are a strict, impartial judge of assistant responses. You compare candidate responses to "
                "the same user request and rank them from best to worst by correctness, helpfulness and "
                "concision.")


def ranks_from_scores(scores: list[float]) -> list[int]:
    """Competition ranks, higher score = better: [3, 9, 3, 1] -> [2, 1, 2, 4] (ties share the best rank)."""
    return [1 + sum(s > x for s in scores) for x in scores]


def read_candidates(path: str | Path) -> list[dict]:
    """Parse and check every record ({"input": str, "candidates": [str, ...] with at least 2}); errors name file:line."""
    records = []
    for lineno, rec in iter_jsonl(path):
        if not isinstance(rec, dict) or not isinstance(rec.get("input"), str):
            raise LmforgeError(f"{path}:{lineno}: expected an object with a string field 'input'")
        cands = rec.get("candidates")
        if not isinstance(cands, list) or not all(isinstance(c, str) for c in cands):
            raise LmforgeError(f"{path}:{lineno}: 'candidates' must be a list of strings")
        if len(cands) < 2:
            raise LmforgeError(f"{path}:{lineno}: need at least 2 candidates to rank, got {len(cands)}")
        records.append({**rec, "_line": lineno})
    if not records:
        raise LmforgeError(f"{path}: no records")
    return records


# ---- the OpenAI-compatible judge -------------------------------------------------------------------------

def judge_prompt(prompt: str, candidates: list[str], messages: list[dict] | None = None) -> str:
    """The user message sent to an LLM judge: the request (with earlier turns if any), numbered candidates,
    and an exact answer format (a JSON list of candidate numbers, best first)."""
    parts = []
    if messages and len(messages) > 1:
        parts.append("Conversation so far:")
        parts += [f"[{m['role']}] {m['content']}" for m in messages]
    else:
        parts.append(f"User request:\n{prompt}")
    parts.append("")
    for i, c in enumerate(candidates, 1):
        parts.append(f"Candidate {i}:\n{c}\n")
    n = len(candidates)
    parts.append(f"Rank all {n} candidates from best to worst. Reply with only a JSON list of the candidate "
                 f"numbers 1..{n}, best first, each exactly once, e.g. {json.dumps(list(range(n, 0, -1)))}.")
    return "\n".join(parts)


def parse_ranking(reply: str, n: int) -> list[int] | None:
    """The best-first candidate numbers (1-based) in a judge's reply, or None unless it is a permutation of 1..n.

    Takes the last bracketed list in the reply (reasoning models think before answering) and ignores
    <think>...</think> sections.
    """
    reply = re.sub(r"<think>.*?</think>", "", reply or "", flags=re.S)
    for match in reversed(re.findall(r"\[[^\[\]]*\]", reply)):
        try:
            order = json.loads(match)
        except json.JSONDecodeError:
            continue
        if not isinstance(order, list):
            continue
        order = [int(x) if isinstance(x, str) and x.strip().isdigit() else x for x in order]
        if not all(type(x) is int for x in order):
            continue
        return order if sorted(order) == list(range(1, n + 1)) else None
    return None


class OpenAIJudge:
    """Ranks candidates by asking an OpenAI-compatible `/chat/completions` endpoint (greedy, temperature 0)."""

    def __init__(self, url: str, model: str, api_key: str | None = None, timeout: float = 120.0):
        url = url.rstrip("/")
        self.url = url if url.endswith("/chat/completions") else url + "/chat/completions"
        self.model, self.api_key, self.timeout = model, api_key, timeout

    def _complete(self, messages: list[dict]) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "temperature": 0}).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:
            data = json.loads(resp.read().decode("utf-8"))
        return data["choices"][0]["message"]["content"]

    def rank(self, prompt: str, candidates: list[str], messages: list[dict] | None = None) -> list[int]:
        """Ranks (1 = best) of distinct `candidates`. One retry on a malformed reply (telling the judge what was
        wrong) or a failed request; then an LmforgeError naming the prompt."""
        chat = [{"role": "system", "content": JUDGE_SYSTEM},
                {"role": "user", "content": judge_prompt(prompt, candidates, messages)}]
        problem = ""
        for _ in range(2):
            try:
                reply = self._complete(chat)
            except urllib.error.HTTPError as e:
                detail = " ".join(e.read().decode("utf-8", "replace").split())[:120]
                problem = f"HTTP {e.code} from {self.url}" + (f": {detail}" if detail else "")
                continue
            except (urllib.error.URLError, OSError) as e:
                problem = f"cannot reach {self.url} ({getattr(e, 'reason', e)})"
                continue
            except (ValueError, KeyError, IndexError, TypeError):
                problem = f"{self.url} did not return an OpenAI chat-completions response"
                continue
            order = parse_ranking(reply, len(candidates))
            if order is not None:
                ranks = [0] * len(candidates)
                for r, c in enumerate(order, 1):
                    ranks[c - 1] = r
                return ranks
            problem = f"the reply is not a ranking of 1..{len(candidates)}: {reply[:80]!r}"
            chat += [{"role": "assistant", "content": reply or ""},
                     {"role": "user", "content": f"That is not a valid answer. Reply with only a JSON list of the "
                                                 f"numbers 1..{len(candidates)}, best first, each exactly once."}]
        short = prompt if len(prompt) <= 60 else prompt[:57] + "..."
        raise LmforgeError(f"judge failed twice on prompt {short!r}: {problem}")


def _rank_distinct(judge: OpenAIJudge, rec: dict) -> list[int]:
    """Rank each distinct text once; duplicates share their text's rank. Ranks are re-expressed as competition
    ranks over all candidates so they match the oracle's convention."""
    distinct = list(dict.fromkeys(rec["candidates"]))
    if len(distinct) == 1:
        return [1] * len(rec["candidates"])
    ranks = dict(zip(distinct, judge.rank(rec["input"], distinct, rec.get("messages"))))
    return ranks_from_scores([-ranks[c] for c in rec["candidates"]])


def _oracle_ranks(path, rec: dict) -> list[int]:
    from lmforge.world import oracle_rank

    try:
        return [int(r) for r in oracle_rank(rec["input"], rec["candidates"])]
    except ValueError as e:  # not one of the built-in world's prompts
        raise LmforgeError(f"{path}:{rec['_line']}: {e}; the oracle judges only the built-in world's prompts "
                           "(use --judge openai for other data)") from None


def label_candidates(input_file: str | Path, out_file: str | Path, judge: str = "oracle", url: str | None = None,
                     model: str | None = None, api_key_env: str = "OPENAI_API_KEY", workers: int = 4) -> dict:
    """Rank every record's candidates with `judge` and write the seed's ranked format to `out_file` (atomically).

    Returns a summary: prompts, choices, prompts with ties, seconds.
    """
    if judge not in JUDGES:
        raise LmforgeError(f"unknown judge {judge!r} (expected one of {', '.join(JUDGES)})")
    if judge == "human":
        raise LmforgeError("--judge human: the web ranking page comes in a later release")
    if judge == "openai" and not (url and model):
        raise LmforgeError("--judge openai needs --url (e.g. http://127.0.0.1:8000/v1) and --model")
    t0 = time.perf_counter()
    records = read_candidates(input_file)
    # An empty response has nothing to rank and the seed's ranked format has no empty choices: drop it, and
    # drop a prompt left with fewer than two candidates (counted in the summary).
    n_empty = sum(not t.strip() for r in records for t in r["candidates"])
    for r in records:
        r["candidates"] = [t for t in r["candidates"] if t.strip()]
    n_before = len(records)
    records = [r for r in records if len(r["candidates"]) >= 2]
    if not records:
        raise LmforgeError(f"{input_file}: no prompt has two non-empty candidates to rank")
    if judge == "oracle":
        all_ranks = [_oracle_ranks(input_file, r) for r in records]
    else:
        oa = OpenAIJudge(url, model, os.environ.get(api_key_env) or None)

        def one(rec):
            try:
                return _rank_distinct(oa, rec)
            except LmforgeError as e:
                raise LmforgeError(f"{input_file}:{rec['_line']}: {e}") from None

        with ThreadPoolExecutor(max(1, workers)) as pool:
            all_ranks = list(pool.map(one, records))
    out = []
    for rec, ranks in zip(records, all_ranks):
        row = {"input": rec["input"], "choices": [{"text": t, "rank": int(r)} for t, r in zip(rec["candidates"], ranks)]}
        if "messages" in rec:
            row["messages"] = rec["messages"]
        out.append(row)
    write_jsonl_atomic(out_file, out)
    return {"prompts": len(out), "choices": sum(len(r["choices"]) for r in out),
            "prompts_with_ties": sum(len(set(r)) < len(r) for r in all_ranks),
            "empty_candidates_dropped": n_empty, "prompts_dropped": n_before - len(records),
            "seconds": time.perf_counter() - t0}


def cli(argv: list[str]) -> None:
    """`lmforge label --judge oracle|openai|human --input FILE --out FILE`."""
    import argparse

    p = argparse.ArgumentParser(prog="lmforge label", description="Rank candidates into the seed's ranked format.")
    p.add_argument("--judge", choices=JUDGES, default="oracle",
                   help="oracle: the built-in world's scorer; openai: an OpenAI-compatible endpoint; human: later")
    p.add_argument("--input", required=True, help="JSONL from `lmforge sample` ({input, candidates})")
    p.add_argument("--out", required=True, help="output JSONL ({input, choices: [{text, rank}]})")
    p.add_argument("--url", help="openai judge: base URL, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--model", help="openai judge: model name")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    p.add_argument("--workers", type=int, default=4, help="openai judge: concurrent requests")
    a = p.parse_args(argv)
    s = label_candidates(a.input, a.out, a.judge, a.url, a.model, a.api_key_env, a.workers)
    print(f"ranked {s['choices']} candidates for {s['prompts']} prompts into {a.out} "
          f"({s['prompts_with_ties']} with ties, {s['seconds']:.1f}s)")
