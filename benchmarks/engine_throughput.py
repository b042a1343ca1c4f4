"""Continuous-batching throughput: generated tokens/s of `lmforge.engine.Engine` at 1, 8 and 32 concurrent requests.

    python benchmarks/engine_throughput.py                          # random 4 layers x 192, vocab 4096, context 512
    python benchmarks/engine_throughput.py runs/lmforge-tiny/sft    # a checkpoint directory
    python benchmarks/engine_throughput.py --device cuda --concurrency 1 8 32 128

Each round submits N requests at once (random prompts, sampling at temperature 1, no stop tokens, so every
request generates exactly --max-new-tokens) to the engine's background thread, as a server would, and times
them until the last one finishes: prefill included. Figures are medians over --repeats rounds after one
warm-up round; the last line is the 32-vs-1 (largest vs smallest) ratio.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from lmforge.cli import keep_freed_memory
from lmforge.engine import Engine
from lmforge.generation import SamplingParams
from lmforge.model import ModelConfig, Transformer
from lmforge.training import pick_device


def build(checkpoint: str | None, device: torch.device, size: tuple[int, int] = (4, 192)):
    """(model, tokenizer or None): the checkpoint, or the random default-sized model."""
    if checkpoint:
        from lmforge.checkpoint import load_model

        model, tok, _ = load_model(checkpoint, head="lm", device=device)
        return model, tok
    torch.manual_seed(0)
    layers, width = size
    cfg = ModelConfig(vocab_size=4096, hidden_size=width, num_hidden_layers=layers, num_attention_heads=width // 48,
                      num_key_value_heads=width // 48, max_position_embeddings=512)
    return Transformer(cfg).to(device), None


def run_round(engine: Engine, n: int, prompt_len: int, max_new: int, vocab: int, seed: int) -> float:
    """Seconds for n concurrent requests to finish."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab) for _ in range(prompt_len)] for _ in range(n)]
    params = SamplingParams(max_new_tokens=max_new, temperature=1.0)
    t0 = time.perf_counter()
    reqs = [engine.submit(p, params, stop_ids=[], seed=seed + i) for i, p in enumerate(prompts)]
    for r in reqs:
        r.wait()
    elapsed = time.perf_counter() - t0
    assert all(len(r.tokens) == max_new for r in reqs)
    return elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", nargs="?", default=None, help="checkpoint directory (default: a random model)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--layers", type=int, default=4, help="random model: layers")
    p.add_argument("--width", type=int, default=192, help="random model: width (heads of 48)")
    p.add_argument("--glibc-malloc", action="store_true",
                   help="leave glibc's malloc as it is (lmforge keeps freed memory for reuse: cli.keep_freed_memory)")
    args = p.parse_args()
    if not args.glibc_malloc:
        keep_freed_memory()  # what the lmforge command does to its process
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    model, tok = build(args.checkpoint, device, (args.layers, args.width))
    cfg = model.config
    if args.prompt_len + args.max_new_tokens > cfg.max_position_embeddings:
        p.error(f"--prompt-len + --max-new-tokens exceeds the model's context ({cfg.max_position_embeddings})")
    print(f"model: {cfg.num_hidden_layers} layers x {cfg.hidden_size}, vocab {cfg.vocab_size}, context "
          f"{cfg.max_position_embeddings}; prompts of {args.prompt_len} tokens, {args.max_new_tokens} new tokens each; "
          f"device {device}, {torch.get_num_threads()} torch threads")
    rates = {}
    with Engine(model, tok, max_batch=max(args.concurrency), max_queue=max(args.concurrency)) as engine:
        for n in args.concurrency:
            run_round(engine, n, args.prompt_len, args.max_new_tokens, cfg.vocab_size, seed=0)  # warm-up
            times = [run_round(engine, n, args.prompt_len, args.max_new_tokens, cfg.vocab_size, seed=r + 1)
                     for r in range(args.repeats)]
            rates[n] = n * args.max_new_tokens / statistics.median(times)
            print(f"  {n:4d} concurrent: {rates[n]:>10,.0f} generated tokens/s   "
                  f"(median of {args.repeats}: {statistics.median(times):.2f} s per round)")
    lo, hi = min(rates), max(rates)
    print(f"  {hi} vs {lo}: {rates[hi] / rates[lo]:.1f}x tokens/s")


if __name__ == "__main__":
    main()
