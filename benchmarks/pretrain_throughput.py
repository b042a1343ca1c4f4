"""Pretraining throughput: tokens/s and MFU of full training steps (forward, backward, clip, AdamW).

FLOPs per token = 6N + 12*L*H*Q*T (PaLM appendix B; `Transformer.flops_per_token`). MFU is measured against
the fp32 matmul peak of this CPU, measured in the same run (one 2048 x 2048 matmul right after each timed step,
so that on a shared machine both see the same load; median of all), or a GPU's dense bf16 peak (table in
lmforge.training). On a busy machine the best step / best matmul ratio is the steadier figure.

    python benchmarks/pretrain_throughput.py                       # CPU, 6 layers x 384 wide, seq 256
    python benchmarks/pretrain_throughput.py --device cuda --compile --batch-size 64
    python benchmarks/pretrain_throughput.py --profile             # torch.profiler table of the hot ops
    python benchmarks/pretrain_throughput.py --compete 1           # then again beside a CPU-bound process
    python benchmarks/pretrain_throughput.py --compete 1 --adapt   # ... adapting as train_loop does (lanes)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from lmforge import cpu_threads
from lmforge.cli import keep_freed_memory
from lmforge.model import ModelConfig, Transformer
from lmforge.training import (
    OptimConfig,
    autocast,
    build_optimizer,
    device_peak_flops,
    pick_device,
    split_rows,
)


def matmul_flops(device: torch.device, n: int = 2048, repeats: int = 7) -> list[float]:
    """FLOP/s of single n x n matmuls (fp32 on CPU, bf16 on CUDA), one sample per repeat."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    out = []
    for i in range(repeats + 1):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        if i:  # the first is warm-up
            out.append(2 * n**3 / (time.perf_counter() - t0))
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (e.g. max-autotune-no-cudagraphs)")
    p.add_argument("--batch-size", type=int, default=0, help="default: 8 on CPU, 64 on GPU")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--tie", action="store_true", help="tie input and output embeddings (GPT-2 style)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's choice)")
    p.add_argument("--optimizer", choices=["adamw", "muon"], default="adamw",
                   help="muon: the default run's pretraining optimizer (its Newton-Schulz steps count as overhead)")
    p.add_argument("--unfused", action="store_true", help="full (B, T, V) logits, then F.cross_entropy")
    p.add_argument("--adapt", nargs="?", const="lanes", choices=["lanes", "threads"], default=None,
                   help="before each step, as the training loops do: lanes (train_loop: cpu_threads.lanes, the batch "
                        "in single-threaded parts while others are busy) or threads (cpu_threads.adapt: fewer threads)")
    p.add_argument("--lanes", type=int, default=0,
                   help="run every step's batch in this many single-threaded lanes (cpu_threads.run_lanes), busy or not")
    p.add_argument("--busy-threads", type=int, default=0,
                   help="with --compete: the thread count for the busy steps (0: the same as the quiet ones)")
    p.add_argument("--compete", type=int, default=0,
                   help="after the quiet steps, time as many again beside this many busy-looping processes")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of one step")
    p.add_argument("--glibc-malloc", action="store_true",
                   help="leave glibc's malloc as it is (lmforge keeps freed memory for reuse: cli.keep_freed_memory)")
    args = p.parse_args()
    if not args.glibc_malloc:
        keep_freed_memory()  # what the lmforge command does to its process

    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    batch = args.batch_size or (64 if device.type == "cuda" else 8)
    cfg = ModelConfig(vocab_size=args.vocab, hidden_size=args.width, num_hidden_layers=args.layers,
                      num_attention_heads=args.heads, num_key_value_heads=args.heads, max_position_embeddings=args.seq,
                      tie_word_embeddings=args.tie)
    torch.manual_seed(0)
    model = Transformer(cfg).to(device)
    fpt = model.flops_per_token(args.seq)
    optimizer = build_optimizer(model, OptimConfig(optimizer=args.optimizer, lr=1e-4))
    step_model = torch.compile(model, mode=args.compile_mode) if args.compile else model
    x = torch.randint(0, args.vocab, (batch, args.seq + 1), device=device)
    inputs, targets = x[:, :-1], x[:, 1:]

    def loss_fn(inputs, targets):
        with autocast(device):
            if not args.unfused:  # as `lmforge pretrain` does: the fused LM-head cross-entropy
                return step_model(inputs, labels=targets)
            logits = step_model(inputs)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    def forward_backward(part):
        (x, y), weight = part
        (loss_fn(x, y) * weight).backward()

    def step():
        lanes = 1
        if args.lanes:
            lanes = args.lanes
        elif args.adapt:
            cpu_threads.adapt(device)
            if args.adapt == "lanes":  # as train_loop does: a busy CPU runs the batch's parts side by side
                lanes = cpu_threads.lanes(device)
        if lanes > 1:
            cpu_threads.run_lanes(forward_backward, split_rows((inputs, targets), lanes, labels=targets))
        else:
            loss_fn(inputs, targets).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return lanes

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    _sync(device)
    warm_s = time.perf_counter() - t0
    times, peaks = [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
        if device.type == "cpu":  # one matmul right after each step: both see the same load on a shared machine
            peaks += matmul_flops(device, repeats=1)
    tokens = batch * args.seq
    achieved = [tokens * fpt / t for t in times]
    if device.type == "cpu":
        peak = statistics.median(peaks)
        peak_name = f"fp32 2048^3 matmul measured after each step, median of {len(peaks)}"
    else:
        peak = device_peak_flops(device)
        peak_name = f"{torch.cuda.get_device_name(device)} dense bf16 (datasheet)"
        measured = statistics.median(matmul_flops(device, n=8192, repeats=5))
    dt = statistics.median(times)
    tok_s = tokens / dt

    print(f"device {device} ({torch.get_num_threads()} threads)" if device.type == "cpu" else f"device {torch.cuda.get_device_name(device)}")
    print(f"model: {args.layers} layers x {args.width} wide, {args.heads} heads, seq {args.seq}, vocab {args.vocab}, "
          f"{model.num_params() / 1e6:.2f}M params; batch {batch}; compile {args.compile}; {args.optimizer}; "
          f"loss {'logits + F.cross_entropy' if args.unfused else 'fused LM-head cross-entropy'}")
    print(f"FLOPs per token (6N + 12LHQT): {fpt / 1e6:.1f}M; warm-up {args.warmup} steps in {warm_s:.1f}s")
    print(f"step time median {dt * 1e3:.1f} ms (min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f}) over {args.steps} steps")
    print(f"throughput: {tok_s:,.0f} tokens/s = {tokens * fpt / dt / 1e9:,.1f} GFLOP/s (median step)")
    if peak:
        print(f"peak: {peak / 1e9:,.1f} GFLOP/s ({peak_name})")
        print(f"MFU: {tokens * fpt / dt / peak:.1%}  (ratio median achieved / peak = {tokens * fpt / dt / peak:.3f})")
    if device.type == "cpu":
        paired = statistics.median(a / p for a, p in zip(achieved, peaks))
        print(f"ratio per step (step / the matmul right after it), median: {paired:.3f}; "
              f"best step / best matmul: {max(achieved) / max(peaks):.3f} "
              f"({max(achieved) / 1e9:.1f} / {max(peaks) / 1e9:.1f} GFLOP/s)")
    if device.type == "cuda":
        print(f"measured bf16 8192^3 matmul: {measured / 1e12:.0f} TFLOP/s; achieved / measured = {tokens * fpt / dt / measured:.3f}")

    if args.compete:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        rivals = [ctx.Process(target=_busy_loop, daemon=True) for _ in range(args.compete)]
        for r in rivals:
            r.start()
        time.sleep(1.0)  # let the rivals start spinning
        if args.busy_threads:
            torch.set_num_threads(args.busy_threads)
            step()  # a warm-up with the new thread pool
        busy = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            lanes = step()
            _sync(device)
            busy.append(time.perf_counter() - t0)
        for r in rivals:
            r.terminate()
        if args.adapt:
            print(f"busy step times (ms): {' '.join(str(round(t * 1000)) for t in busy)}; threads at the end "
                  f"{torch.get_num_threads()}, lanes {lanes}")
        print(f"beside {args.compete} busy process(es): step time median {statistics.median(busy) * 1e3:.1f} ms "
              f"= {tokens / statistics.median(busy):,.0f} tokens/s; busy / quiet throughput "
              f"{dt / statistics.median(busy):.2f} (threads {torch.get_num_threads()}, OMP_WAIT_POLICY "
              f"{os.environ.get('OMP_WAIT_POLICY', 'unset')})")

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            step()
            _sync(device)
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=25))


def _busy_loop() -> None:
    """A CPU-bound rival (what a user's other work does to a laptop)."""
    while True:
        pass


if __name__ == "__main__":
    main()
