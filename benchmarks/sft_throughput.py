"""SFT throughput with dynamic padding vs packing, on a fixed synthetic instruction set of mixed lengths.

Counts real tokens only (padding excluded): packing fills rows with several records (positions restart and
attention stops at record boundaries), so fewer FLOPs are spent on padding. Full training steps: forward,
response-only loss, backward, clipping, AdamW.

    python benchmarks/sft_throughput.py                         # CPU, 4 layers x 256 wide, rows of 256 tokens
    python benchmarks/sft_throughput.py --size gpt2 --device cuda

Response lengths are log-uniform (a few words to a few hundred tokens, like Alpaca-style data); the first steps
are a warm-up and are not counted; numbers are medians over the timed steps.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lmforge.chat import record_to_messages
from lmforge.cli import keep_freed_memory
from lmforge.model import ModelConfig, Transformer
from lmforge.stages.sft import SFTBatches, encode_records, sft_loss
from lmforge.tokenizer import train_tokenizer
from lmforge.training import OptimConfig, autocast, build_optimizer, pick_device

SIZES = {  # model, max_seq_len, records (padding) or rows (packing) per micro-batch
    "tiny": (dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=128), 128, 16),
    "small": (dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                   max_position_embeddings=256), 256, 8),
    "gpt2": (dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                  max_position_embeddings=1024), 1024, 16),
}


def synthetic_records(n: int, max_words: int, seed: int = 0) -> list[dict]:
    """Instruction records with log-uniform prompt and response lengths over a fixed pseudo-word vocabulary."""
    rng = random.Random(seed)
    syllables = [a + b for a in "bcdfghklmnprstvz" for b in "aeiou"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(3000)]

    def text(lo: int, hi: int) -> str:
        k = int(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        return " ".join(rng.choice(words) for _ in range(k))

    return [{"instruction": text(3, 40), "input": text(1, 30) if rng.random() < 0.4 else "",
             "output": text(2, max_words)} for _ in range(n)]


def measure(model, batches: SFTBatches, optimizer, device, steps: int, warmup: int) -> dict:
    times, real, rows_tokens, records = [], 0, 0, 0
    for step in range(warmup + steps):
        batch = batches.micro_batch(step)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with autocast(device):
            loss, _, n_real = sft_loss(model, {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - t0)
            real += n_real
            rows_tokens += batch["input_ids"].numel()
            records += int(batch["segment_ids"].amax(1).sum()) if "segment_ids" in batch else batch["input_ids"].shape[0]
    per_step = statistics.median(times)
    return {"real_tokens_per_s": real / steps / per_step, "records_per_s": records / steps / per_step,
            "step_ms": per_step * 1e3, "real_fraction": real / rows_tokens}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=SIZES, default="small")
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--records", type=int, default=2000)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--glibc-malloc", action="store_true",
                   help="leave glibc's malloc as it is (lmforge keeps freed memory for reuse: cli.keep_freed_memory)")
    args = p.parse_args()
    if not args.glibc_malloc:
        keep_freed_memory()  # what the lmforge command does to its process
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    model_kw, seq_len, batch_size = SIZES[args.size]
    records = synthetic_records(args.records, max_words=seq_len // 2)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        corpus.write_text("".join(json.dumps({"text": r["instruction"] + " " + r["output"]}) + "\n" for r in records))
        tok = train_tokenizer([corpus], 2048)
    examples, kept = encode_records(tok, [record_to_messages(r) for r in records], seq_len)
    lengths = [len(x) for x, _ in examples]
    print(f"{args.size}: {len(examples)} records ({len(records) - len(kept)} dropped as too long), "
          f"length mean {statistics.mean(lengths):.0f} median {statistics.median(lengths):.0f} max {max(lengths)}; "
          f"rows of {seq_len} tokens, batch {batch_size}; device {device}")
    results = {}
    for mode in ("padding", "packing"):
        torch.manual_seed(0)
        model = Transformer(ModelConfig(vocab_size=tok.vocab_size, **model_kw)).to(device)
        optimizer = build_optimizer(model, OptimConfig(lr=1e-4))
        batches = SFTBatches(examples, batch_size, tok.special.pad, seed=0, pack=mode == "packing", capacity=seq_len,
                             pad_multiple=64 if device.type == "cuda" else 1)  # as run_sft does
        results[mode] = r = measure(model, batches, optimizer, device, args.steps, args.warmup)
        print(f"  {mode:8s} {r['real_tokens_per_s']:>10,.0f} real tok/s  {r['records_per_s']:>8,.1f} records/s  "
              f"{r['step_ms']:>8.1f} ms/step  {r['real_fraction']:6.1%} of row tokens real")
    print(f"  packing / padding: {results['packing']['real_tokens_per_s'] / results['padding']['real_tokens_per_s']:.2f}x "
          f"real tokens/s")


if __name__ == "__main__":
    main()
