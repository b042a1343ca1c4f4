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

import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from lmforge.chat import record_to_messages, render_prompt, stop_ids
from lmforge.errors import LmforgeError
from lmforge.generation import SamplingParams, generate


@dataclass
class Prompt:
    """One prompt record: its messages (ending with a user turn), the user-turn text, where it came from."""
    messages: list[dict]
    text: str
    is_chat: bool
    line: int


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed JSON) for each non-blank line; errors name file:line."""
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"{path}: file not found")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise LmforgeError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise LmforgeError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None


def write_jsonl_atomic(path: str | Path, records: list[dict]) -> None:
    """Write JSONL to a temporary sibling, then os.replace it into place: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_prompts(path: str | Path) -> list[Prompt]:
    """Parse every prompt record of a JSONL file: instruction records (keys any case) or chat records ending
    with a user turn. A reference answer, if present (an instruction 'output', or a chat record's final
    assistant turn), is dropped, so SFT-format files (e.g. held-out splits) serve as prompts too."""
    prompts = []
    for lineno, rec in iter_jsonl(path):
        try:
            msgs = record_to_messages(rec, require_response=False) if _is_prompt_only(rec) else \
                record_to_messages(rec, require_response=True)
            if msgs[-1]["role"] == "assistant":
                msgs = msgs[:-1]
            if not msgs or msgs[-1]["role"] != "user":
                raise ValueError("a prompt record must end with a user turn (optionally followed by one answer)")
        except ValueError as e:
            raise LmforgeError(f"{path}:{lineno}: {e}") from None
        is_chat = any(str(k).lower() == "messages" for k in rec)
        prompts.append(Prompt(msgs, msgs[-1]["content"], is_chat, lineno))
    if not prompts:
        raise LmforgeError(f"{path}: no prompt records")
    return prompts


def _is_prompt_only(rec) -> bool:
    """True unless the record carries an answer (instruction 'output' or a final assistant turn)."""
    if not isinstance(rec, dict):
        return True
    low = {str(k).lower(): v for k, v in rec.items()}
    if "messages" in low:
        msgs = low["messages"]
        return not (isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict) and msgs[-1].get("role") == "assistant")
    return not low.get("output")


def encode_prompts(tok, prompts: list[Prompt], max_len: int, path) -> list[list[int]]:
    """Template-rendered prompt ids; a prompt that leaves no room for one response token is an error."""
    out = []
    for p in prompts:
        ids = render_prompt(tok, p.messages)
        if len(ids) >= max_len:
            raise LmforgeError(f"{path}:{p.line}: prompt is {len(ids)} tokens, the model's context is {max_len}")
        out.append(ids)
    return out


def generate_batched(model, tok, prompt_ids: list[list[int]], params: SamplingParams, batch_size: int,
                     seed: int, on_batch=None):
    """Generate one response per row of `prompt_ids`, batching rows of similar length together.

    Returns (tokens, finished) in input order; a finished row's tokens end with its stop token. Rows are
    sorted by length (stable), so the result is deterministic given the seed, the batch size and the inputs.
    """
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    stops = stop_ids(tok)
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    tokens: list[list[int]] = [[] for _ in prompt_ids]
    finished = [False] * len(prompt_ids)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        out = generate(model, [prompt_ids[i] for i in rows], params, stops, tok.special.pad, gen)
        for i, toks, fin in zip(rows, out.tokens, out.finished):
            tokens[i], finished[i] = toks, fin
        if on_batch is not None:
            on_batch(len(rows))
    return tokens, finished


def response_text(tok, tokens: list[int]) -> str:
    """Text of a generated response: its tokens without the closing stop token."""
    if tokens and tokens[-1] in stop_ids(tok):
        tokens = tokens[:-1]
    return tok.decode(tokens)


def sample_candidates(model_dir: str | Path, prompts_file: str | Path, out_file: str | Path, k: int = 4,
                      temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, max_new_tokens: int = 64,
                      batch_size: int = 64, seed: int = 0, device: str = "auto", progress: bool = True) -> dict:
    """Write K sampled candidates per prompt of `prompts_file` to `out_file` (JSONL, atomically).

    Returns a summary: prompts, candidates, finished fraction (stop token reached), mean length, seconds.
    """
    from tqdm import tqdm

    from lmforge.checkpoint import load_model
    from lmforge.training import pick_device

    if k < 1:
        raise LmforgeError(f"--k must be at least 1, got {k}")
    if batch_size < 1 or max_new_tokens < 1:
        raise LmforgeError("--batch-size and --max-new-tokens must be positive")
    if temperature < 0:
        raise LmforgeError(f"--temperature must be >= 0, got {temperature}")
    t0 = time.perf_counter()
    prompts = read_prompts(prompts_file)
    model, tok, _ = load_model(model_dir, head="lm", device=pick_device(device))
    model.eval()
    ids = encode_prompts(tok, prompts, model.config.max_position_embeddings, prompts_file)
    rows = [p for p in ids for _ in range(k)]  # prompt i owns rows i*k .. i*k+k-1
    params = SamplingParams(max_new_tokens, temperature, top_k, top_p)
    with tqdm(total=len(rows), desc="sample", disable=not progress, leave=False) as bar:
        tokens, finished = generate_batched(model, tok, rows, params, batch_size, seed, bar.update)
    records = []
    for i, p in enumerate(prompts):
        rec = {"input": p.text, "candidates": [response_text(tok, t) for t in tokens[i * k:(i + 1) * k]]}
        if p.is_chat:
            rec["messages"] = p.messages
        records.append(rec)
    write_jsonl_atomic(out_file, records)
    return {"prompts": len(prompts), "candidates": len(rows),
            "finished_frac": sum(finished) / len(rows),
            "mean_length": sum(len(t) - f for t, f in zip(tokens, finished)) / len(rows),
            "seconds": time.perf_counter() - t0}


def cli(argv: list[str]) -> None:
    """`lmforge sample --model DIR --prompts FILE --k K --out FILE`."""
    import argparse

    p = argparse.ArgumentParser(prog="lmforge sample", description="Write K candidate responses per prompt (JSONL).")
    p.add_argument("--model", required=True, help="policy checkpoint directory (e.g. the SFT model)")
    p.add_argument("--prompts", required=True, help="JSONL prompts: instruction records without output, or chat records")
    p.add_argument("--out", required=True, help="output JSONL: {input, candidates} per prompt")
    p.add_argument("--k", type=int, default=4, help="candidates per prompt (InstructGPT: 4 to 9)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64, help="rows (prompt x candidate) per generation batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    a = p.parse_args(argv)
    s = sample_candidates(a.model, a.prompts, a.out, a.k, a.temperature, a.top_p, a.top_k, a.max_new_tokens,
                          a.batch_size, a.seed, a.device)
    print(f"wrote {s['candidates']} candidates for {s['prompts']} prompts to {a.out} "
          f"({s['finished_frac']:.0%} finished, mean {s['mean_length']:.1f} tokens, {s['seconds']:.1f}s)")
