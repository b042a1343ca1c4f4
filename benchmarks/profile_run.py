"""Where the time of a whole `lmforge run` goes: a py-spy profile split by stage and by kind of work.

    pip install py-spy
    py-spy record -r 25 -f raw -o run.raw -- lmforge run --out /tmp/run
    python benchmarks/profile_run.py run.raw

py-spy samples the Python stack of the main thread (PyTorch's OpenMP workers run native code only, so they are
not sampled: the main thread's samples are the wall time). Each sample is charged to the stage whose module
(`lmforge/stages/<stage>.py`) is outermost in its stack, and to the first kind of work below that its stack
contains: imports, checkpoint I/O, generation (KV-cache sampling), the optimizer step (clipping included),
backward, evaluation, no-grad scoring passes (PPO/GRPO experience, DPO's reference log-probs, reward-model
scores), the training forward pass; the rest is Python around them (data, batching, labelling, logging). The
forward share is split further by the model function nearest the leaf (projections: every nn.Linear, the MLP's
included). Helper threads (tqdm's monitor) are left out.
"""

from __future__ import annotations

import argparse
import collections
import re

# (kind, frames that mark it), in priority order: the first kind whose marker a stack contains wins
KINDS = [
    ("import", ("_find_and_load",)),
    ("checkpoint I/O", ("save_checkpoint", "load_model", "load_causal_lm", "load_checkpoint", "safetensors")),
    ("generation", ("generate (lmforge/generation.py", "generate_batched (lmforge/generation.py")),
    ("optimizer step", ("profile_hook_step", "Optimizer.step", "lmforge/muon.py", "_fused_adam", "clip_grad_norm_",
                        "clip_and_step", "zero_grad")),
    ("backward", ("Tensor.backward", "_engine_run_backward")),
    ("evaluation", ("eval_hook", "evaluate (lmforge/", "evaluate_loss", "_evaluate (lmforge/")),
    ("CPU peak measurement", ("measure_cpu_matmul_peak",)),
    ("scoring (no-grad forward)", ("make_experience", "pair_logprobs", "score_sequences", "score_rollouts")),
    ("forward", ("Transformer.forward", "Transformer.hidden_states", "_LinearCrossEntropy")),
]
FORWARD_PARTS = [  # the leaf-most match names the part of a forward pass
    ("attention", ("attention (lmforge/model.py", "scaled_dot_product")),
    ("LM head + loss", ("_LinearCrossEntropy", "linear_cross_entropy", "log_softmax", "logprobs_from_logits")),
    ("RMSNorm", ("RMSNorm", "_RMSNormFunction")),
    ("rotary", ("apply_rotary", "_RotaryFunction", "rotary_cos_sin")),
    ("SwiGLU activation", ("MLP.forward",)),
    ("projections", ("Linear.forward",)),
    ("mask, embedding", ("build_attention_mask", "Embedding.forward", "pack_batch", "positions_from_mask")),
]
STAGE = re.compile(r"\(lmforge/stages/(\w+)\.py:")
PIPELINE = ["world", "tokenizer", "data", "pretrain", "sft", "sample", "label", "rm", "ppo", "dpo", "grpo",
            "evaluate", "report"]


def classify(frames: list[str]) -> tuple[str, str, str]:
    """(stage, kind, forward part) of one stack, root first."""
    stage = next((m.group(1) for f in frames if (m := STAGE.search(f))), "(outside any stage)")
    stack = ";".join(frames)
    kind = next((k for k, marks in KINDS if any(m in stack for m in marks)), "Python around it")
    part = ""
    if kind == "forward":
        for f in reversed(frames):  # leaf first
            part = next((p for p, marks in FORWARD_PARTS if any(m in f for m in marks)), "")
            if part:
                break
        part = part or "other"
    return stage, kind, part


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("raw", help="py-spy record -f raw output")
    p.add_argument("--rate", type=float, default=25.0, help="the -r of py-spy record (samples per second)")
    args = p.parse_args()
    by_stage: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    forward: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    with open(args.raw, encoding="utf-8") as f:
        for line in f:
            stack, _, n = line.rstrip("\n").rpartition(" ")
            if not stack or stack.startswith("Thread._bootstrap"):  # tqdm's monitor and other helper threads
                continue
            stage, kind, part = classify(stack.split(";"))
            by_stage[stage][kind] += int(n)
            if part:
                forward[stage][part] += int(n)
    kinds = [k for k, _ in KINDS] + ["Python around it"]
    order = [s for s in PIPELINE if s in by_stage] + sorted(s for s in by_stage if s not in PIPELINE)
    total = sum(sum(c.values()) for c in by_stage.values())
    print(f"{total / args.rate:.0f} s sampled at {args.rate:g} Hz; seconds per stage and the share of each kind of work")
    print("| stage | s | " + " | ".join(kinds) + " |")
    print("|---|---:|" + "---:|" * len(kinds))
    for stage in order:
        c = by_stage[stage]
        n = sum(c.values())
        cells = [f"{c[k] / n:.0%}" if c[k] else "" for k in kinds]
        print(f"| {stage} | {n / args.rate:.1f} | " + " | ".join(cells) + " |")
    print("\nforward passes of training and scoring, by part (share of the stage's forward time):")
    for stage in order:
        if forward[stage]:
            n = sum(forward[stage].values())
            parts = ", ".join(f"{p} {v / n:.0%}" for p, v in forward[stage].most_common())
            print(f"  {stage}: {parts}")


if __name__ == "__main__":
    main()
