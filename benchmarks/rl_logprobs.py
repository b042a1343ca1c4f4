"""PPO's and GRPO's per-token log-probs: the LM head, then a tempered log-softmax over materialised logits
(`rl_utils.logprobs_from_logits`), against the fused, chunked `losses.linear_logprobs`, its backward from the kept
logits ("kept") or recomputing them ("recompute"). Forward (with the logged entropy) and backward of a weighted
sum, as the policy loss does; interleaved in one process, medians. With --memory, each path's peak RSS above its
inputs, each in a fresh process with glibc's own malloc settings.

    python benchmarks/rl_logprobs.py                              # the default run's policy: width 192, vocab 4096
    python benchmarks/rl_logprobs.py --width 576 --vocab 49152    # SmolLM2-135M's head
    python benchmarks/rl_logprobs.py --width 576 --vocab 49152 --memory
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from lmforge.losses import linear_logprobs
from lmforge.rl_utils import logprobs_from_logits

PATHS = ("plain", "kept", "recompute")


def run(path: str, hidden, weight, targets, weights, temperature: float) -> None:
    if path == "plain":
        logp, entropy = logprobs_from_logits(hidden @ weight.t(), targets, temperature, with_entropy=True)
        entropy = entropy.detach()
    else:
        logp, entropy = linear_logprobs(hidden, weight, targets, temperature, with_entropy=True,
                                        keep_logits=path == "kept")
    (logp * weights).sum().backward()


def inputs(args):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.tokens, args.width, generator=g).requires_grad_()
    weight = (torch.randn(args.vocab, args.width, generator=g) * 0.05).requires_grad_()
    targets = torch.randint(0, args.vocab, (args.tokens,), generator=g)
    weights = torch.rand(args.tokens, generator=g)
    return hidden, weight, targets, weights


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=1024, help="response tokens in a micro-batch")
    p.add_argument("--width", type=int, default=192)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--memory", action="store_true", help="peak RSS of each path, each in a fresh process")
    p.add_argument("--one", choices=PATHS, help=argparse.SUPPRESS)  # a --memory child
    args = p.parse_args()
    if args.one:
        hidden, weight, targets, weights = inputs(args)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        run(args.one, hidden, weight, targets, weights, args.temperature)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
        return
    shape = f"{args.tokens} tokens x width {args.width} x vocab {args.vocab}, temperature {args.temperature}"
    if args.memory:
        env = dict(os.environ, MALLOC_TRIM_THRESHOLD_="131072")  # glibc's default: freed memory goes back
        for path in PATHS:
            cmd = [sys.executable, __file__, "--one", path, "--tokens", str(args.tokens), "--width",
                   str(args.width), "--vocab", str(args.vocab), "--temperature", str(args.temperature)]
            mb = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout.strip()
            print(f"{path:9s} peak RSS above the inputs: {mb} MB  ({shape})")
        return
    hidden, weight, targets, weights = inputs(args)
    times: dict[str, list[float]] = {path: [] for path in PATHS}
    for i in range(args.rounds + 2):
        for path in times:
            hidden.grad = weight.grad = None
            t0 = time.perf_counter()
            run(path, hidden, weight, targets, weights, args.temperature)
            if i >= 2:  # warm-up rounds left out
                times[path].append(time.perf_counter() - t0)
    print(f"{shape}, {torch.get_num_threads()} threads, {args.rounds} interleaved rounds")
    for path, ts in times.items():
        print(f"{path:9s} forward + backward: median {1000 * statistics.median(ts):7.1f} ms "
              f"(min {1000 * min(ts):.1f}, max {1000 * max(ts):.1f})")
    for path in PATHS[1:]:
        ratios = [b / a for a, b in zip(times["plain"], times[path])]
        print(f"{path} / plain, median of the rounds' ratios: {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
