"""Time one optimizer step on a model's parameters: fused AdamW against Muon (`optim.optimizer=muon`, with 5, 4
and 3 Newton-Schulz iterations), interleaved in one process, medians.

    python benchmarks/optimizer_step.py                  # the default run's pretraining model (4 x 192)
    python benchmarks/optimizer_step.py --width 384 --layers 6
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lmforge.model import ModelConfig, Transformer
from lmforge.training import OptimConfig, build_optimizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=192)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    model = Transformer(ModelConfig(vocab_size=4096, hidden_size=args.width, num_hidden_layers=args.layers,
                                    num_attention_heads=args.heads, num_key_value_heads=args.heads))
    for param in model.parameters():
        param.grad = torch.randn_like(param)
    opts = {"adamw (fused)": build_optimizer(model, OptimConfig())}
    for ns in (5, 4, 3):
        opts[f"muon, {ns} Newton-Schulz steps"] = opt = build_optimizer(model, OptimConfig(optimizer="muon"))
        for g in opt.param_groups:
            g["ns_steps"] = ns
    times = {name: [] for name in opts}
    for i in range(args.steps + 3):
        for name, opt in opts.items():
            t0 = time.perf_counter()
            opt.step()
            if i >= 3:
                times[name].append(time.perf_counter() - t0)
    print(f"{args.layers} x {args.width} ({model.num_params() / 1e6:.2f}M params), {torch.get_num_threads()} threads")
    for name, t in times.items():
        print(f"  {name:<32} {statistics.median(t) * 1e3:7.1f} ms per step")


if __name__ == "__main__":
    main()
