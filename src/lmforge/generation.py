"""Batched sampling with a key/value cache, for `lmforge generate`, RL rollouts, sampling and serving.

Prompts of different lengths are left-padded into one batch; position ids are cumsum(mask) - 1 so each row
sees the same positions as it would alone. Log-probs of the sampled tokens always come from logits/temperature
(the same distribution PPO recomputes), whatever top-k/top-p filtering chose the token.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmforge.model import KVCache, Transformer


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0      # 0 -> greedy
    top_k: int = 0                # 0 -> off
    top_p: float = 1.0            # 1 -> off


@dataclass
class Generation:
    """Per row: response token ids (including the stop token if reached), their log-probs, and whether a
    stop token ended the response."""
    tokens: list[list[int]]
    logprobs: list[list[float]]
    finished: list[bool]


def left_pad(seqs: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask) with every row right-aligned."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, T - len(s):] = torch.tensor(s)
            mask[i, T - len(s):] = 1
    return ids.to(device), mask.to(device)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k / nucleus (top-p) to -inf."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], params: SamplingParams, stop_ids: list[int],
             pad_id: int, generator: torch.Generator | None = None, on_tokens=None) -> Generation:
    """Sample continuations of `prompts` (token id lists) with a KV cache.

    on_tokens(step, tokens (B,), active (B,) bool) is called after each step (for streaming).
    """
    device = next(model.parameters()).device
    cfg = model.config
    ids, mask = left_pad(prompts, pad_id, device)
    B, P = ids.shape
    max_new = min(params.max_new_tokens, cfg.max_position_embeddings - P)
    dtype = next(model.parameters()).dtype
    cache = KVCache(cfg, B, P + max(max_new, 0), device, dtype)
    stop = torch.tensor(stop_ids, device=device)
    active = torch.ones(B, dtype=torch.bool, device=device)
    tokens = torch.full((B, max(max_new, 0)), pad_id, dtype=torch.long, device=device)
    logps = torch.zeros((B, max(max_new, 0)), device=device)
    lengths = torch.zeros(B, dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    logits = model(ids, attention_mask=mask, cache=cache)[:, -1].float()
    for t in range(max_new):
        if params.temperature > 0:
            scaled = logits / params.temperature
            logp_all = F.log_softmax(scaled, dim=-1)
            probs = F.softmax(filter_logits(scaled, params.top_k, params.top_p), dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        else:
            logp_all = F.log_softmax(logits, dim=-1)
            nxt = logits.argmax(-1)
        nxt = torch.where(active, nxt, torch.full_like(nxt, pad_id))
        tokens[:, t] = nxt
        logps[:, t] = logp_all.gather(-1, nxt[:, None]).squeeze(-1) * active
        lengths += active.long()
        if on_tokens is not None:
            on_tokens(t, nxt, active)
        active = active & ~torch.isin(nxt, stop)
        if not active.any() or t == max_new - 1:
            break
        mask = torch.cat([mask, active.long()[:, None]], dim=1)
        logits = model(nxt[:, None], attention_mask=mask, cache=cache)[:, -1].float()
    model.train(was_training)
    out_tokens, out_logps, finished = [], [], []
    stop_set = set(stop_ids)
    for i in range(B):
        n = int(lengths[i])
        row = tokens[i, :n].tolist()
        out_tokens.append(row)
        out_logps.append(logps[i, :n].tolist())
        finished.append(bool(row) and row[-1] in stop_set)
    return Generation(out_tokens, out_logps, finished)


class Utf8Streamer:
    """Turn a stream of token ids into text chunks that never split a multi-byte UTF-8 character."""

    def __init__(self, tok):
        self.tok = tok
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self.decoder.decode(self.tok.token_bytes(token_id))

    def flush(self) -> str:
        return self.decoder.decode(b"", final=True)


def cli(argv: list[str]) -> None:
    """`lmforge generate --model DIR --prompt TEXT ...`: stream sampled text to stdout."""
    import argparse
    import sys

    from lmforge.chat import render_prompt, stop_ids
    from lmforge.checkpoint import load_model
    from lmforge.training import pick_device

    p = argparse.ArgumentParser(prog="lmforge generate", description="Sample from a checkpoint (KV cache, streaming).")
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    p.add_argument("--raw", action="store_true", help="continue the raw text instead of a chat user turn")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    model, tok, _ = load_model(args.model, head="lm", device=device)
    if args.raw:
        prompts = [[tok.special.bos] + tok.encode(t) for t in args.prompt]
    else:
        prompts = [render_prompt(tok, [{"role": "user", "content": t}]) for t in args.prompt]
    params = SamplingParams(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    stops = stop_ids(tok)
    if len(prompts) == 1:  # stream a single prompt token by token
        streamer = Utf8Streamer(tok)

        def on_tokens(step, tokens, active):
            if active[0] and int(tokens[0]) not in stops:
                sys.stdout.write(streamer.push(int(tokens[0])))
                sys.stdout.flush()

        generate(model, prompts, params, stops, tok.special.pad, gen, on_tokens)
        sys.stdout.write(streamer.flush() + "\n")
        return
    out = generate(model, prompts, params, stops, tok.special.pad, gen)
    for prompt, tokens in zip(args.prompt, out.tokens):
        print(f"### {prompt}\n{tok.decode(tokens)}\n")
