"""Batched sampling with a key/value cache, for `lmforge generate`, RL rollouts, sampling and serving.

Prompts of different lengths are left-padded into one batch; position ids are cumsum(mask) - 1 so each row
sees the same positions as it would alone. Log-probs of the sampled tokens always come from logits/temperature
(the same distribution PPO recomputes), whatever top-k/top-p filtering chose the token.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lmforge import chat
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


NUCLEUS_CANDIDATES = 64  # filter_logits looks for the top-p nucleus among this many top tokens first


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k / nucleus (top-p) to -inf.

    The nucleus keeps each token whose more likely tokens hold at most top_p of the mass: the smallest prefix of
    the tokens sorted by probability whose mass reaches top_p (one more token on an exact tie). It is looked for
    among the NUCLEUS_CANDIDATES most likely tokens (a partial top-k, not a sort of the vocabulary: at 32 rows x
    4096 a full sort made a serving step ~2x longer); only if some row's nucleus is wider are the rows sorted
    in full."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        k = min(NUCLEUS_CANDIDATES, logits.shape[-1])
        sorted_logits, order = torch.topk(logits, k, dim=-1)  # descending
        peak = sorted_logits[..., :1]  # relative to the row's maximum: exact for large logits too
        probs = (sorted_logits - peak - torch.logsumexp(logits - peak, -1, keepdim=True)).exp()
        cum = probs.cumsum(-1)
        if k < logits.shape[-1] and not bool((cum[..., -1] >= top_p).all()):  # a nucleus wider than k tokens
            sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
            probs = sorted_logits.softmax(-1)
            cum = probs.cumsum(-1)
        drop = cum - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], params: SamplingParams, stop_ids: list[int],
             pad_id: int, generator: torch.Generator | None = None, on_tokens=None,
             uniforms: torch.Tensor | None = None) -> Generation:
    """Sample continuations of `prompts` (token id lists) with a KV cache.

    on_tokens(step, tokens (B,), active (B,) bool) is called after each step (for streaming). uniforms
    (B, max_new_tokens) in [0, 1) replace the generator: row i's token t inverts the CDF of its distribution at
    uniforms[i, t], so a row's draw does not depend on the other rows of the batch (a batch split over
    processes samples what one process would).
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
    if uniforms is not None:
        uniforms = uniforms.to(device=device, dtype=torch.float64)
    rows = torch.arange(B, device=device)  # the batch rows still being decoded (finished rows leave)
    was_training = model.training
    model.eval()
    logits = model(ids, attention_mask=mask, cache=cache, head_at=(rows, torch.full_like(rows, P - 1))).float()
    for t in range(max_new):
        if params.temperature > 0:
            scaled = logits / params.temperature
            logp_all = F.log_softmax(scaled, dim=-1)
            probs = F.softmax(filter_logits(scaled, params.top_k, params.top_p), dim=-1)
            if uniforms is None:
                nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            else:
                cdf = probs.double().cumsum(-1)
                u = uniforms[rows, t]
                nxt = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]  # skips p = 0 tokens
        else:
            logp_all = F.log_softmax(logits, dim=-1)
            nxt = logits.argmax(-1)
        nxt = torch.where(active, nxt, torch.full_like(nxt, pad_id))
        tokens[rows, t] = nxt
        logps[rows, t] = logp_all.gather(-1, nxt[:, None]).squeeze(-1) * active
        lengths[rows] += active.long()
        if on_tokens is not None:
            step_tokens = torch.full((B,), pad_id, dtype=torch.long, device=device).index_copy_(0, rows, nxt)
            on_tokens(t, step_tokens, torch.zeros(B, dtype=torch.bool, device=device).index_copy_(0, rows, active))
        active = active & ~torch.isin(nxt, stop)
        n_active = int(active.sum())
        if n_active == 0 or t == max_new - 1:
            break
        if n_active <= 3 * len(rows) // 4:  # drop finished rows: later steps decode only the live ones
            keep = active.nonzero()[:, 0]
            rows, active, nxt, mask = rows[keep], active[keep], nxt[keep], mask[keep]
            cache.select(keep)
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


def generate_batched(model, tok, prompt_ids: list[list[int]], params: SamplingParams, batch_size: int,
                     seed: int, on_batch=None):
    """Generate one response per row of `prompt_ids`, batching rows of similar length together.

    Returns (tokens, finished) in input order; a finished row's tokens end with its end-of-turn token (the
    one stop of RL rollouts, `chat.turn_stop_ids`). Rows are sorted by length (stable), so the result is
    deterministic given the seed, the batch size and the inputs.
    """
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    stops = chat.turn_stop_ids(tok)
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
    """Text of a generated response: its tokens without the closing end-of-turn token."""
    if tokens and tokens[-1] in chat.turn_stop_ids(tok):
        tokens = tokens[:-1]
    return tok.decode(tokens)


class Utf8Streamer:
    """Turn a stream of token ids into text chunks that never split a multi-byte UTF-8 character."""

    def __init__(self, tok):
        self.tok = tok
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self.decoder.decode(self.tok.token_bytes(token_id))

    def flush(self) -> str:
        return self.decoder.decode(b"", final=True)


@dataclass
class GenerateConfig:
    """`lmforge generate` settings."""
    model: str = ""                 # checkpoint directory
    prompt: list[str] = field(default_factory=list)  # prompt texts (one batch); a single prompt is streamed
    raw: bool = False               # continue the raw text instead of answering it as a chat user turn
    max_new_tokens: int = 64
    temperature: float = 0.8        # 0: greedy
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    device: str = "auto"

    def validate(self) -> None:
        from lmforge.errors import ConfigError

        if not self.model:
            raise ConfigError("model", "is required")
        if not self.prompt:
            raise ConfigError("prompt", "needs at least one prompt text")


def generate_text(cfg: GenerateConfig) -> None:
    """Sample a response to each prompt and print it (token by token for a single prompt, UTF-8 safe)."""
    import sys

    from lmforge.checkpoint import load_causal_lm
    from lmforge.training import pick_device

    device = pick_device(cfg.device)
    model, tok, _ = load_causal_lm(cfg.model, "lmforge generate", device=device)
    if cfg.raw:
        prompts = [tok.document_ids(t)[:-1] for t in cfg.prompt]  # [BOS] text, no EOS
    else:
        prompts = [chat.render_prompt(tok, [{"role": "user", "content": t}]) for t in cfg.prompt]
    params = SamplingParams(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    stops = chat.stop_ids(tok)
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
    for prompt, tokens in zip(cfg.prompt, out.tokens):
        print(f"### {prompt}\n{tok.decode(tokens)}\n")


def _command():
    from lmforge.cli import Command, Flag

    return Command(
        "lmforge generate", "Sample from a checkpoint (KV cache, streaming).", GenerateConfig, generate_text,
        flags=(Flag("--model", "model", "checkpoint directory"), Flag("--prompt", "prompt", "prompt text (repeatable)"),
               Flag("--raw", "raw", "continue the raw text instead of a chat user turn"),
               Flag("--max-new-tokens", "max_new_tokens"), Flag("--temperature", "temperature"),
               Flag("--seed", "seed")),
        examples=('lmforge generate --model runs/lmforge-tiny/ppo --prompt "What is 2 + 3?"',
                  'lmforge generate --model runs/lmforge-tiny/pretrain --raw --prompt "The apple is" top_k=50'))


COMMAND = _command()
