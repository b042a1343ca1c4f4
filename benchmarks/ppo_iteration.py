"""Time one PPO iteration, split into rollout (KV-cache sampling), scoring (policy, reference, critic, reward
model forward passes) and update, for a fixed configuration; report rollout tokens/s and peak memory.

    python benchmarks/ppo_iteration.py                       # tiny, CPU (seconds)
    python benchmarks/ppo_iteration.py --size cpu16 --iterations 20   # 2 x 128, 4 epochs, T 0.7 (issue 16)
    python benchmarks/ppo_iteration.py --size cpu16 --iterations 20 --matmul-floor   # + its matmuls alone
    python benchmarks/ppo_iteration.py --size gpt2 --device cuda

Models are randomly initialised: a near-uniform policy over the whole vocabulary rarely samples a stop token,
so responses are about max_new_tokens long (the mean is printed). The first iteration is a warm-up and is not
counted; the numbers are medians over the timed iterations.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from lmforge.checkpoint import save_checkpoint
from lmforge.cli import keep_freed_memory
from lmforge.config import load_config
from lmforge.model import ModelConfig, Transformer
from lmforge.rollout import load_prompts, prompt_indices
from lmforge.stages.ppo import PPOConfig, build_trainer
from lmforge.tokenizer import train_tokenizer
from lmforge.training import device_peak_flops, measure_cpu_matmul_peak, pick_device, synced_time

SIZES = {  # model, rollouts per iteration, minibatch, micro-batch, new tokens
    # issue 16's CPU configuration: 2 x 128, 16 rollouts x 32 tokens, 4 epochs over one minibatch, T 0.7
    "cpu16": (dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                   max_position_embeddings=128), 16, 16, 16, 32),
    "tiny": (dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=128), 16, 8, 8, 32),
    "small": (dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                   max_position_embeddings=256), 32, 16, 16, 64),
    "gpt2": (dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                  max_position_embeddings=512), 64, 32, 16, 128),
}
def corpus_lines(n: int = 4000) -> list[str]:
    """Deterministic pseudo-text of ~6000 distinct words, so the tokenizer reaches its full vocabulary (a random
    policy then rarely samples a stop token) and every machine benchmarks the same prompts."""
    import random

    rng = random.Random(0)
    syllables = [a + b for a in "bcdfghklmnprstvz" for b in "aeiou"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(6000)]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(4, 16))) + "." for _ in range(n)]


MATMULS = ("aten.mm.default", "aten.addmm.default", "aten.bmm.default", "aten.baddbmm.default",
           "aten.linear.default")  # linear: as seen under inference_mode, where it is not decomposed


def matmul_flops(op: str, shapes: list[tuple[int, ...]]) -> int:
    """FLOPs of one recorded matmul from its tensor arguments' shapes."""
    if op.startswith("aten.linear"):
        x, w = shapes[0], shapes[1]
        return 2 * math.prod(x[:-1]) * x[-1] * w[0]
    a, b = (shapes[1], shapes[2]) if op.startswith(("aten.addmm", "aten.baddbmm")) else (shapes[0], shapes[1])
    return 2 * math.prod(a) * b[-1]


def matmul_floor(run_once, device: torch.device, repeats: int = 5) -> dict:
    """Record every matmul of run_once() (one PPO iteration, actor and critic one after the other so that one
    thread sees every op), then replay just those matmuls, at the same shapes, strides and in the same grad mode,
    on random data: the time the iteration's matmuls take alone on this machine (median of `repeats` replays).
    Also the matmul peak right after (on a CPU the best 2048^3 fp32 matmul of half a second; a GPU's dense bf16
    peak), so the two compare within one run."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from lmforge import cpu_threads

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if str(func) in MATMULS:
                spec = [("tensor", a.shape, a.stride(), a.dtype) if isinstance(a, torch.Tensor) else a for a in args]
                self.calls.append((func, spec, dict(kwargs or {}), torch.is_inference_mode_enabled()))
            return func(*args, **(kwargs or {}))

    side_by_side = cpu_threads.side_by_side
    cpu_threads.side_by_side = lambda device: False  # lanes' threads would not see this thread's mode
    try:
        with Record() as rec:
            run_once()
    finally:
        cpu_threads.side_by_side = side_by_side

    def like(a):  # random data in the recorded layout (a broadcast bias keeps its zero stride)
        if not (isinstance(a, tuple) and a and a[0] == "tensor"):
            return a
        _, shape, stride, dtype = a
        storage = max(1, 1 + sum((n - 1) * st for n, st in zip(shape, stride)))
        return torch.randn(storage, device=device).to(dtype).as_strided(shape, stride)

    calls = [(func, [like(a) for a in spec], kwargs, inference) for func, spec, kwargs, inference in rec.calls]
    gflop = sum(matmul_flops(str(f), [a.shape for a in args if isinstance(a, torch.Tensor)])
                for f, args, _, _ in calls) / 1e9

    def replay():
        for func, args, kwargs, inference in calls:
            with torch.inference_mode(inference):
                func(*args, **kwargs)

    replay()
    times = []
    for _ in range(repeats):
        t0 = synced_time(device)
        replay()
        times.append(synced_time(device) - t0)
    peak = measure_cpu_matmul_peak(2048) if device.type == "cpu" else device_peak_flops(device) or float("nan")
    return {"seconds": statistics.median(times), "count": len(calls), "gflop": gflop, "peak": peak}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--device", default="auto")
    p.add_argument("--iterations", type=int, default=4, help="timed iterations (after one warm-up)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    p.add_argument("--matmul-floor", action="store_true",
                   help="also time the iteration's own matmuls alone: every mm / addmm / bmm / linear of one "
                        "iteration replayed at its shapes on random data (a lower bound no eager code goes under)")
    p.add_argument("--glibc-malloc", action="store_true",
                   help="leave glibc's malloc as it is (lmforge keeps freed memory for reuse: cli.keep_freed_memory)")
    args = p.parse_args()
    if not args.glibc_malloc:
        keep_freed_memory()  # what the lmforge command does to its process
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    model_kw, batch, minibatch, micro, new_tokens = SIZES[args.size]
    work = Path(tempfile.mkdtemp(prefix="ppo_bench_"))
    lines = corpus_lines()
    (work / "corpus.txt").write_text("\n\n".join(lines), encoding="utf-8")
    tok = train_tokenizer([work / "corpus.txt"], 1024 if args.size in ("tiny", "cpu16") else 4096, work / "tok")
    mc = ModelConfig(vocab_size=tok.vocab_size, **model_kw)
    torch.manual_seed(0)
    save_checkpoint(work / "sft", Transformer(mc), tok, {"stage": "sft"})
    save_checkpoint(work / "rm", Transformer(mc, head="scalar"), tok, {"stage": "rm", "pooling": "last"})
    with open(work / "prompts.jsonl", "w", encoding="utf-8") as f:
        for line in lines[:batch * 4]:
            f.write(json.dumps({"instruction": line}) + "\n")
    cfg = load_config(PPOConfig, base=dict(
        sft_model=str(work / "sft"), reward_model=str(work / "rm"), prompts=str(work / "prompts.jsonl"),
        out=str(work / "out"), iterations=args.iterations + 1, batch_size=batch, minibatch_size=minibatch,
        micro_batch_size=micro, max_new_tokens=new_tokens, device=str(device),
        **(dict(ppo_epochs=4, temperature=0.7) if args.size == "cpu16" else {})))
    prompts = load_prompts(cfg.prompts, tok, cfg.max_new_tokens, {"policy": mc.max_position_embeddings})
    trainer = build_trainer(cfg, tok, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rows = []
    for it in range(args.iterations + 1):
        batch_prompts = [prompts[i] for i in prompt_indices(len(prompts), it, batch, cfg.seed)]
        t0 = time.perf_counter()
        stats, _, _ = trainer.iteration(batch_prompts, cfg.seed, it)
        stats["time_total"] = time.perf_counter() - t0
        if it > 0:
            rows.append(stats)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]
           if k.startswith("time") or k.endswith("per_s") or k == "response_len"}
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        peak_name = "peak GPU memory allocated"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        peak_name = "peak RSS"
    n_params = trainer.actor.num_params()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"PPO iteration, size={args.size} ({n_params / 1e6:.2f}M params per model), {batch} rollouts x "
          f"{new_tokens} new tokens, minibatch {minibatch}, micro-batch {micro}, on {name}")
    scoring = med["time_policy"] + med["time_ref"] + med["time_critic"] + med["time_reward"]
    for label, key in (("rollout (generate)", "time_generate"), ("score: policy log-probs", "time_policy"),
                       ("score: reference", "time_ref"), ("score: critic", "time_critic"),
                       ("score: reward model", "time_reward"), ("update", "time_update"),
                       ("total", "time_total")):
        print(f"  {label:<26} {med[key] * 1000:9.1f} ms  ({med[key] / med['time_total']:5.1%})")
    print(f"  {'scoring (all four)':<26} {scoring * 1000:9.1f} ms")
    print(f"  rollout tokens/s           {med['rollout_tokens_per_s']:9.0f}   (mean response "
          f"{statistics.mean(r['response_len'] for r in rows):.1f} tokens)")
    print(f"  {peak_name:<26} {peak:9.0f} MiB")
    if args.matmul_floor:
        it = args.iterations + 1
        batch_prompts = [prompts[i] for i in prompt_indices(len(prompts), it, batch, cfg.seed)]
        floor = matmul_floor(lambda: trainer.iteration(batch_prompts, cfg.seed, it), device)
        med["matmul_floor"] = floor["seconds"]
        print(f"  matmul floor               {floor['seconds'] * 1000:9.1f} ms  ({floor['count']} matmuls, "
              f"{floor['gflop']:.1f} GFLOP, {floor['gflop'] / floor['seconds']:.0f} GFLOP/s at their shapes; "
              f"peak {floor['peak'] / 1e9:.0f} GFLOP/s; iteration / floor {med['time_total'] / floor['seconds']:.2f})")
    print(json.dumps({"size": args.size, "device": name, **{k: round(v, 5) for k, v in med.items()},
                      "peak_mib": round(peak)}), file=sys.stderr)


if __name__ == "__main__":
    main()
