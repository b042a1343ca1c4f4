"""Reward-model throughput for a fixed tiny config: comparisons (pairs) per second in training, and responses per
second when scoring. The training step is the one `lmforge rm` runs (K responses per prompt in one forward pass,
InstructGPT's C(K,2)-pairs-per-element loss, AdamW), on synthetic data of fixed lengths.

    python benchmarks/rm_throughput.py [--device cpu|cuda] [--steps 20]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch

from lmforge.cli import keep_freed_memory
from lmforge.generation import left_pad
from lmforge.model import ModelConfig, Transformer
from lmforge.preferences import Example
from lmforge.scoring import raw_scores, render_example, score_sequences
from lmforge.stages.rm import labels_of, reward_loss
from lmforge.tokenizer import train_tokenizer
from lmforge.training import OptimConfig, autocast, build_optimizer, pick_device

CONFIG = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
              max_position_embeddings=128)
K, PROMPTS_PER_BATCH, PROMPT_WORDS, RESPONSE_WORDS = 4, 8, 12, 40
WORDS = "the a quick brown fox jumps over lazy dog apple is red green sky blue river runs fast slow".split()


def synthetic_examples(tok, n: int, seed: int = 0) -> list[Example]:
    """n prompts with K ranked responses each, rendered through the chat template."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = [{"role": "user", "content": " ".join(rng.choices(WORDS, k=PROMPT_WORDS))}]
        responses = [" ".join(rng.choices(WORDS, k=RESPONSE_WORDS)) for _ in range(K)]
        ex = Example(prompt, responses, ranks=list(range(1, K + 1)))
        ex.ids = [render_example(tok, prompt, r) for r in responses]
        out.append(ex)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--glibc-malloc", action="store_true",
                   help="leave glibc's malloc as it is (lmforge keeps freed memory for reuse: cli.keep_freed_memory)")
    args = p.parse_args()
    if not args.glibc_malloc:
        keep_freed_memory()  # what the lmforge command does to its process
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    with tempfile.TemporaryDirectory() as d:
        corpus = Path(d) / "c.txt"
        corpus.write_text("\n\n".join(" ".join(random.Random(i).choices(WORDS, k=50)) for i in range(200)))
        tok = train_tokenizer([corpus], 512, Path(d) / "tok")
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, **CONFIG), head="scalar").to(device)
    opt = build_optimizer(model, OptimConfig(lr=1e-4))
    examples = synthetic_examples(tok, PROMPTS_PER_BATCH * (args.steps + 2))
    n_pairs = PROMPTS_PER_BATCH * K * (K - 1) // 2
    mean_len = sum(len(s) for ex in examples for s in ex.ids) / (len(examples) * K)

    def step(i: int) -> None:
        batch = examples[i * PROMPTS_PER_BATCH:(i + 1) * PROMPTS_PER_BATCH]
        ids, mask = left_pad([s for ex in batch for s in ex.ids], tok.special.pad, device)
        labels = {k: v.to(device) if torch.is_tensor(v) else v for k, v in labels_of(batch).items()}
        with autocast(device):
            loss = reward_loss(raw_scores(model, ids, mask), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    model.train()
    for i in range(2):  # warm-up (allocator, kernels)
        step(i)
    sync()
    t0 = time.perf_counter()
    for i in range(2, args.steps + 2):
        step(i)
    sync()
    train_s = time.perf_counter() - t0
    seqs = [s for ex in examples for s in ex.ids]
    score_sequences(model, seqs[:64], tok.special.pad, batch_size=64)
    sync()
    t0 = time.perf_counter()
    score_sequences(model, seqs, tok.special.pad, batch_size=64)
    sync()
    score_s = time.perf_counter() - t0
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; model {model.num_params() / 1e6:.2f}M params, {CONFIG['num_hidden_layers']} layers, "
          f"width {CONFIG['hidden_size']}; K={K}, {PROMPTS_PER_BATCH} prompts/batch, mean length {mean_len:.0f} tokens")
    print(f"training: {args.steps * n_pairs / train_s:,.0f} comparisons/s "
          f"({args.steps * PROMPTS_PER_BATCH * K / train_s:,.0f} responses/s, {train_s / args.steps * 1e3:.1f} ms/step)")
    print(f"scoring:  {len(seqs) / score_s:,.0f} responses/s (batch 64, no grad)")


if __name__ == "__main__":
    main()
