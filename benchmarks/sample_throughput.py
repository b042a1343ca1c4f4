"""Batched sampling throughput: sampled tokens/s of `generation.generate_batched` (the sample stage, evaluation's
KL samples; PPO and GRPO rollouts run the same `generate`) at several batch sizes, and the cost of one draw.

    python benchmarks/sample_throughput.py                                   # random 4 layers x 192, vocab 4096
    python benchmarks/sample_throughput.py runs/lmforge/sft --prompts runs/lmforge/world/rl_prompts.jsonl

Each row is a prompt repeated --k times (as `lmforge sample` does), temperature 1, stopping at the end of the turn
(a random model never stops: every row then runs to --max-new-tokens). Figures are medians over --repeats rounds,
the batch sizes interleaved within each round (the machine's speed drifts). The last lines time one draw of the
next token for --draw-rows rows: torch.multinomial (an exponential per vocabulary entry on the CPU) against the
inverse CDF at one uniform per row that `generate` uses.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from lmforge.cli import keep_freed_memory
from lmforge.generation import SamplingParams, generate_batched, inverse_cdf
from lmforge.training import pick_device


def load(checkpoint: str | None, prompts_file: str | None, n_prompts: int, device):
    """(model, tokenizer, prompt token ids): a checkpoint and its prompts, or a random default-sized model."""
    if checkpoint:
        from lmforge.checkpoint import load_causal_lm
        from lmforge.prompts import encode_prompts, read_prompts

        model, tok, _ = load_causal_lm(checkpoint, "sample_throughput", device=device)
        if prompts_file:
            prompts = read_prompts(prompts_file)[:n_prompts]
            ids = encode_prompts(tok, prompts, prompts_file, {"model": model.config.max_position_embeddings})
        else:
            ids = [tok.encode(f"Question {i}: what is {i} plus {i}?") for i in range(n_prompts)]
        return model.eval(), tok, ids
    from lmforge.model import ModelConfig, Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=4096, hidden_size=192, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=256)
    rng = random.Random(0)
    ids = [[rng.randrange(8, 4096) for _ in range(rng.randint(8, 24))] for _ in range(n_prompts)]
    return Transformer(cfg).to(device).eval(), _NoStops(), ids


class _NoStops:
    """Stands in for a tokenizer with a random model: an end-of-turn id outside the vocabulary, never sampled."""

    class special:
        pad = 0
        end = 1 << 20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", nargs="?", default=None, help="policy checkpoint (default: a random model)")
    p.add_argument("--prompts", default=None, help="JSONL prompts (with a checkpoint)")
    p.add_argument("--n-prompts", type=int, default=128)
    p.add_argument("--k", type=int, default=4, help="rows per prompt")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--draw-rows", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--glibc-malloc", action="store_true", help="leave glibc's malloc settings alone")
    args = p.parse_args()
    if not args.glibc_malloc:
        keep_freed_memory()
    device = pick_device(args.device)
    model, tok, ids = load(args.checkpoint, args.prompts, args.n_prompts, device)
    rows = [r for r in ids for _ in range(args.k)]
    params = SamplingParams(args.max_new_tokens, 1.0)
    print(f"device {device} ({torch.get_num_threads()} threads); {len(rows)} rows ({len(ids)} prompts x {args.k}), "
          f"up to {args.max_new_tokens} new tokens, temperature 1")
    with torch.inference_mode():
        generate_batched(model, tok, rows[:args.batch_sizes[0]], params, args.batch_sizes[0], 0)  # warm-up
        times: dict[int, list[float]] = {b: [] for b in args.batch_sizes}
        tokens: dict[int, int] = {}
        for _ in range(args.repeats):
            for b in args.batch_sizes:
                t0 = time.perf_counter()
                out, _ = generate_batched(model, tok, rows, params, b, seed=0)
                times[b].append(time.perf_counter() - t0)
                tokens[b] = sum(len(t) for t in out)
    for b in args.batch_sizes:
        med = statistics.median(times[b])
        print(f"batch {b:4d}: {med:6.2f} s, {tokens[b]:,} tokens, {tokens[b] / med:8,.0f} tokens/s")

    vocab = model.config.vocab_size
    logits = torch.randn(args.draw_rows, vocab, generator=torch.Generator().manual_seed(0)).to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    u = torch.rand(args.draw_rows, dtype=torch.float64, device=device)

    def multinomial():
        return torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)

    def inverse():
        return inverse_cdf((logits - logits.amax(-1, keepdim=True)).exp_(), u)

    for name, fn in (("torch.multinomial", multinomial), ("inverse CDF", inverse)):
        fn()
        ts = []
        for _ in range(50):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        print(f"one draw, {args.draw_rows} rows x {vocab}: {name:18s} {statistics.median(ts) * 1e6:8.0f} us")


if __name__ == "__main__":
    main()
