"""Interleaved A/B of whole pretraining steps: RMSNorm and rotary as autograd sees their formulas (A) against the
autograd Functions with hand-written backwards that `lmforge.model` uses (B). Two models with the same weights
take one step each in turn in one process, so a shared machine's drift hits both; the ratio is the median of
the per-pair ratios.

    python benchmarks/norm_rotary_ab.py                                   # the default run's model, 12 pairs
    python benchmarks/norm_rotary_ab.py --layers 4 --width 128 --seq 64 --batch-size 12 --steps 40
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import lmforge.model as M
from lmforge.cli import keep_freed_memory
from lmforge.training import OptimConfig, build_optimizer


def rms_norm_by_autograd(self, x):
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
    return self.weight * xf.to(x.dtype)


def rotary_by_autograd(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=192)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=12, help="timed pairs (after 3 warm-up pairs)")
    args = p.parse_args()
    keep_freed_memory()
    hand = (M.RMSNorm.forward, M.apply_rotary)
    cfg = M.ModelConfig(vocab_size=4096, hidden_size=args.width, num_hidden_layers=args.layers,
                        num_attention_heads=args.heads, num_key_value_heads=args.heads,
                        max_position_embeddings=args.seq)
    torch.manual_seed(0)
    models = [M.Transformer(cfg), M.Transformer(cfg)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [build_optimizer(m, OptimConfig(lr=1e-4)) for m in models]
    x = torch.randint(0, 4096, (args.batch_size, args.seq + 1))

    def step(i: int) -> tuple[float, float]:
        M.RMSNorm.forward, M.apply_rotary = (rms_norm_by_autograd, rotary_by_autograd) if i == 0 else hand
        t0 = time.perf_counter()
        loss = models[i](x[:, :-1], labels=x[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(models[i].parameters(), 1.0)
        opts[i].step()
        opts[i].zero_grad(set_to_none=True)
        return time.perf_counter() - t0, loss.item()

    times, losses = ([], []), ([], [])
    for n in range(args.steps + 3):
        for i in (0, 1):
            t, loss = step(i)
            losses[i].append(loss)
            if n >= 3:
                times[i].append(t)
    M.RMSNorm.forward, M.apply_rotary = hand
    a, b = (statistics.median(t) * 1e3 for t in times)
    ratio = statistics.median(x / y for x, y in zip(*times))
    print(f"{args.layers} x {args.width}, seq {args.seq}, batch {args.batch_size}, {torch.get_num_threads()} threads: "
          f"autograd's formulas {a:.1f} ms, hand-written backwards {b:.1f} ms per step; ratio {ratio:.3f} "
          f"(median of {args.steps} pairs); max loss difference {max(abs(x - y) for x, y in zip(*losses)):.1e}")


if __name__ == "__main__":
    main()
