"""Packed vs padded RL batches: PPO scoring and update time on a real run's models, interleaved in one process.

    lmforge run --out runs/r                       # any finished run (its SFT, reward model and PPO policies)
    python benchmarks/rl_packing.py --run runs/r [--policy ppo] [--widths 128,256] [--rounds 5]

Rollouts come from `--policy` (sft: long responses; ppo: the trained policy's short ones) on the run's PPO prompts
and settings. Each round times, for the same batch, the padded layout (what rollout.response_hidden computed
before: the model over the left-padded prompts + right-padded responses) and the packed layout at each row width:
the scoring forward passes (policy, reference, critic) and one update (ppo_epochs over the minibatches). Prints
medians and the padded / packed ratio, and the fraction of padded tokens that were real.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import lmforge.packing as packing
import lmforge.rollout as rollout
from lmforge.checkpoint import load_model
from lmforge.cli import keep_freed_memory
from lmforge.config import load_config
from lmforge.rollout import load_prompts, prompt_indices
from lmforge.stages.ppo import PPOConfig, build_trainer
from lmforge.tokenizer import Tokenizer

packed_response_hidden = rollout.response_hidden


def padded_response_hidden(model, exp):
    """The padded computation the packed layout replaces (then, as there, only the real responses' rows)."""
    h = model.hidden_states(exp.input_ids, attention_mask=exp.attention_mask)[:, exp.prompt_len - 1:-1]
    return h[exp.mask.bool()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="an `lmforge run` output folder")
    p.add_argument("--policy", default="ppo", help="the run's policy that writes the rollouts (sft, ppo, ...)")
    p.add_argument("--widths", default="128,256", help="packed row widths to time")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    run = Path(args.run)
    saved = json.loads((run / "ppo" / "run.json").read_text())["config"]
    cfg = load_config(PPOConfig, base={**saved, "out": "/nonexistent", "device": "cpu"})
    tok = Tokenizer.load(cfg.sft_model)
    trainer = build_trainer(cfg, tok, "cpu")
    policy, _, _ = load_model(run / args.policy, head="lm")
    trainer.actor.load_state_dict(policy.state_dict())
    max_pos = trainer.actor.config.max_position_embeddings
    prompts = load_prompts(cfg.prompts, tok, cfg.max_new_tokens, {"policy": max_pos})
    batch = [prompts[i] for i in prompt_indices(len(prompts), 0, cfg.batch_size, cfg.seed)]
    exp, _, _ = trainer.make_experience(batch, torch.Generator().manual_seed(0))
    real = int(exp.attention_mask.sum())
    print(f"{args.policy} rollouts: {cfg.batch_size} rows, prompt columns {exp.prompt_len}, response columns "
          f"{exp.mask.shape[1]} (mean response {exp.mask.sum(1).mean():.1f}), real tokens {real} of "
          f"{exp.attention_mask.numel()} ({real / exp.attention_mask.numel():.0%})")
    state = {k: v.clone() for k, v in trainer.actor.state_dict().items()}, \
        {k: v.clone() for k, v in trainer.critic.state_dict().items()}

    def timed(layout: str) -> tuple[float, float]:
        if layout == "padded":
            rollout.response_hidden = padded_response_hidden
        else:
            rollout.response_hidden = packed_response_hidden
            packing.MIN_WIDTH = int(layout)
        trainer.actor.load_state_dict(state[0])
        trainer.critic.load_state_dict(state[1])
        mb = cfg.micro_batch_size
        t0 = time.perf_counter()
        with torch.no_grad():
            rollout.in_chunks(lambda e: rollout.policy_logprobs(trainer.actor, e, cfg.temperature), exp, mb)
            rollout.in_chunks(lambda e: rollout.policy_logprobs(trainer.ref, e, cfg.temperature), exp, mb)
            rollout.in_chunks(lambda e: rollout.critic_values(trainer.critic, e), exp, mb)
        t1 = time.perf_counter()
        trainer.update(exp, torch.Generator().manual_seed(1))
        return t1 - t0, time.perf_counter() - t1

    layouts = ["padded", *args.widths.split(",")]
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in layouts}
    for layout in layouts:
        timed(layout)  # warm-up
    for _ in range(args.rounds):
        for layout in layouts:
            times[layout].append(timed(layout))
    base = statistics.median(a + b for a, b in times["padded"])
    print(f"{'layout':<12} {'scoring ms':>11} {'update ms':>10} {'total ms':>9} {'padded/this':>12}")
    for layout in layouts:
        s = statistics.median(a for a, _ in times[layout]) * 1000
        u = statistics.median(b for _, b in times[layout]) * 1000
        tot = statistics.median(a + b for a, b in times[layout])
        name = layout if layout == "padded" else f"packed {layout}"
        print(f"{name:<12} {s:11.0f} {u:10.0f} {tot * 1000:9.0f} {base / tot:12.2f}")


if __name__ == "__main__":
    main()
