"""RL with GRPO, Group Relative Policy Optimization (Shao et al. 2024, "DeepSeekMath", arXiv 2402.03300): PPO
without a critic. Each prompt gets G sampled responses; a response's advantage is its reward against its
group's, A = (r - mean) / (std + eps), on every one of its tokens; the loss is the clipped surrogate plus
beta times a k3 estimate of KL(pi || pi_ref), in the loss rather than in the reward:

    L = -1/|T| sum_t [ min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A) - beta * k3_t ],   rho = pi / pi_old

Options from its successors: `scale_rewards: false` drops the std division (Dr. GRPO, Liu et al. 2025, arXiv
2503.20783); `loss_norm: token` averages over every token of the minibatch, `sequence` over each response first
as in GRPO (DAPO, Yu et al. 2025, arXiv 2503.14476, shows the per-sequence mean under-weights long responses);
`clip_range_high` is DAPO's clip-higher. Rewards come from a reward model (RewardScorer.score_rollouts: decoder
or encoder), a Python function (`reward_fn: module:function`, e.g. the verifiable lmforge.world.rewards), or a
weighted sum of both. The math lives in rl_utils.py, the rollout layout in rollout.py.

    lmforge grpo --config configs/grpo_tiny.yaml sft_model=runs/sft reward_fn=lmforge.world.rewards:correctness
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import torch

from lmforge import cpu_threads
from lmforge.checkpoint import estimate_bytes, load_model, read_config, resolve_checkpoint, save_checkpoint
from lmforge.cli import Command, Flag
from lmforge.config import to_dict
from lmforge.errors import ConfigError, LmforgeError
from lmforge.generation import SamplingParams
from lmforge.lora import (LoraConfig, apply_lora, check_resume_rank, load_trainable_state_dict, plain_model,
                          trainable_state_dict)
from lmforge.model import Transformer
from lmforge.rl_utils import clipped_surrogate, group_advantages, kl_estimate
from lmforge.rollout import (Experience, Prompt, RewardFn, RLTrainer, Samples, check_process_split, load_prompts,
                             load_reward_fn, minibatch_epochs, policy_logprobs, prompt_indices, scores_from_fn)
from lmforge.rundir import RunDir
from lmforge.scoring import RewardScorer, check_reward_model, disable_dropout
from lmforge.stage import Stage, StageContext
from lmforge.tokenizer import Tokenizer
from lmforge.distributed import DistInfo, gather_rows, init_distributed, mean_over_processes, sum_gradients
from lmforge.training import (
    MetricsLogger,
    NonFiniteGuard,
    OptimConfig,
    StopRequest,
    autocast,
    build_optimizer,
    clip_and_step,
    pick_device,
    rng_state,
    seed_everything,
    set_rng_state,
    synced_time,
)


def _grpo_optim() -> OptimConfig:
    # Adam eps 1e-5 as for PPO (N+ details); max_steps is derived (see GRPOConfig).
    return OptimConfig(lr=1e-5, eps=1e-5, weight_decay=0.0, warmup_steps=0, schedule="constant", max_steps=1)


@dataclass
class GRPOConfig:
    """GRPO recipe. Sizes: prompts_per_iteration prompts x group_size responses = one batch -> minibatches (one
    optimizer step each) -> micro-batches (gradient accumulation); each must divide the previous one. In optim,
    max_steps is derived (iterations * ppo_epochs * batch / minibatch_size)."""
    sft_model: str = ""                  # policy and frozen reference initialisation
    reward_model: str = ""               # reward model checkpoint (decoder or encoder); "" = reward_fn alone
    reward_fn: str = ""                  # module:function with rollout.RewardFn's signature ("" = none)
    reward_model_weight: float = 1.0     # reward = reward_model_weight * RM score + reward_fn_weight * reward_fn
    reward_fn_weight: float = 1.0
    prompts: str = ""                    # JSONL: instruction records without output, or chats ending in a user turn
    out: str = "runs/grpo"
    # rollouts: pure sampling, stopped at the end-of-turn token only
    iterations: int = 100
    prompts_per_iteration: int = 8      # distinct prompts per batch; batch = prompts_per_iteration * group_size
    group_size: int = 8                  # G responses per prompt (DeepSeekMath 64)
    max_new_tokens: int = 64
    temperature: float = 1.0
    no_eos_penalty: float = 1.0          # subtracted from the reward of a response that never stopped
    # "old" log-probs: the sampler's, or recomputed teacher-forced; auto: the sampler's on CPU (fp32), recomputed
    # on GPU (bf16 autocast) (rollout.use_sampler_logprobs)
    old_logprobs: Literal["auto", "sampler", "recompute"] = "auto"
    # advantages
    scale_rewards: bool = True           # divide by the group's std (GRPO); false: Dr. GRPO
    adv_eps: float = 1e-4                # A = (r - mean) / (std + adv_eps)
    # loss
    kl_coef: float = 0.04                # beta of the k3 KL to the reference, in the loss (DeepSeekMath 0.04; 0 = none)
    clip_range: float = 0.2
    clip_range_high: float | None = None # upper clip of the ratio (DAPO 0.28); null: clip_range
    loss_norm: Literal["token", "sequence"] = "token"   # token: over the minibatch's tokens (DAPO); sequence: GRPO
    log_ratio_clip: float = 20.0         # clamp of log(pi/pi_old) and log(pi/pi_ref) so exp() never overflows
    # update
    ppo_epochs: int = 1                  # passes over each batch (mu in DeepSeekMath)
    minibatch_size: int = 16             # responses per optimizer step
    micro_batch_size: int = 8            # gradient accumulation inside a minibatch
    gradient_checkpointing: bool = False # recompute block activations in backward: less memory
    optim: OptimConfig = field(default_factory=_grpo_optim)
    # rank > 0: the policy trains adapters only (the reference stays the SFT model); the checkpoint is merged
    lora: LoraConfig = field(default_factory=LoraConfig)
    # run
    seed: int = 0
    device: str = "auto"
    save_every: int = 0                  # iterations between checkpoints (0: only at the end)
    log_samples: int = 2                 # responses per iteration written to samples.jsonl (the first group's)
    overwrite: bool = False              # start over in an `out` that already holds a run

    @property
    def batch_size(self) -> int:
        return self.prompts_per_iteration * self.group_size

    def check_processes(self, world: int) -> None:
        """Under torchrun: refuse sizes that do not split over `world` processes (rollout.check_process_split)."""
        check_process_split(world, ("prompts_per_iteration", self.prompts_per_iteration), self.minibatch_size, self.micro_batch_size)

    def validate(self) -> None:
        def need(ok: bool, key: str, what: str):
            if not ok:
                raise ConfigError(key, what)
        for key in ("iterations", "prompts_per_iteration", "minibatch_size", "micro_batch_size", "max_new_tokens",
                    "ppo_epochs"):
            need(getattr(self, key) > 0, key, "must be positive")
        need(self.group_size >= 2, "group_size", "must be >= 2 (advantages compare the responses to one prompt)")
        need(self.batch_size % self.minibatch_size == 0, "minibatch_size",
             f"({self.minibatch_size}) must divide the batch, prompts_per_iteration * group_size ({self.batch_size})")
        need(self.minibatch_size % self.micro_batch_size == 0, "micro_batch_size",
             f"({self.micro_batch_size}) must divide minibatch_size ({self.minibatch_size})")
        need(self.temperature > 0, "temperature", "must be positive (GRPO samples; greedy decoding has no policy)")
        need(self.adv_eps > 0, "adv_eps", "must be positive")
        need(self.kl_coef >= 0, "kl_coef", "must be >= 0")
        need(self.clip_range > 0, "clip_range", "must be positive")
        need(self.clip_range_high is None or self.clip_range_high > 0, "clip_range_high", "must be positive")
        need(self.log_ratio_clip > 0, "log_ratio_clip", "must be positive")
        need(not self.reward_fn or re.fullmatch(r"[\w.]+:[\w.]+", self.reward_fn) is not None, "reward_fn",
             f"must be 'module:function' (e.g. lmforge.world.rewards:correctness), got {self.reward_fn!r}")
        need(bool(self.sft_model), "sft_model", "is required (the SFT checkpoint directory)")
        need(bool(self.prompts), "prompts", "is required (a JSONL file of prompts)")
        self.lora.validate_as("lora")
        need(not (self.lora.rank and self.lora.dropout), "lora.dropout", "must be 0: GRPO trains with dropout off")


# ---------------------------------------------------------------------------------------------- the trainer

# source(prompts, samples) -> (B,) rewards of one source; the trainer sums the sources with their weights
RewardSource = Callable[[list[Prompt], Samples], torch.Tensor]


class GRPOTrainer(RLTrainer):
    """Holds the policy, the frozen reference and the weighted reward sources; `iteration` = rollout + score +
    update. No critic, no value head: the group is the baseline."""

    def __init__(self, cfg: GRPOConfig, policy: Transformer, ref: Transformer, tok: Tokenizer,
                 rewards: dict[str, tuple[float, RewardSource]], device: torch.device | str = "cpu",
                 dist_info: DistInfo | None = None):
        self.cfg, self.tok, self.rewards = cfg, tok, rewards
        self.device = torch.device(device)
        self.dist = dist_info or DistInfo()  # under torchrun: this process's share of every batch (see RLTrainer)
        for model in (policy, ref):  # the same function at rollout and update time (N details)
            disable_dropout(model)
        policy.gradient_checkpointing = cfg.gradient_checkpointing
        self.policy, self.ref = policy, ref.eval().requires_grad_(False)
        self.opt = build_optimizer(policy, cfg.optim)
        steps = cfg.iterations * cfg.ppo_epochs * (cfg.batch_size // cfg.minibatch_size)
        self.sched = dataclasses.replace(cfg.optim, max_steps=max(1, steps))
        self.update_step = 0
        self.guard = NonFiniteGuard(cfg.optim.max_skipped_steps, "GRPO minibatch updates")
        self.sampling = SamplingParams(cfg.max_new_tokens, cfg.temperature)
        self.rows_per_prompt = cfg.group_size

    # -- rollout and scoring ------------------------------------------------------------------------------

    def score(self, prompts: list[Prompt], samples: Samples) -> tuple[torch.Tensor, dict[str, float]]:
        """The weighted sum of the reward sources (B,), and each source's mean for the log."""
        total, means = torch.zeros(len(prompts), device=self.device), {}
        for name, (weight, source) in self.rewards.items():
            r = source(prompts, samples).to(self.device, torch.float32)
            means[f"reward_{name}"] = float(r.mean())
            total = total + weight * r
        if not torch.isfinite(total).all():
            raise LmforgeError(f"non-finite reward from {', '.join(self.rewards)}: check the reward model / reward_fn")
        return total, means

    @torch.no_grad()
    def make_experience(self, prompts: list[Prompt], generator: torch.Generator | None = None,
                        uniforms: torch.Tensor | None = None):
        """Sample group_size responses per prompt, score them and compute the group-relative advantages:
        (Experience, Samples, stats). Row i answers prompts[i // group_size]."""
        cfg, dev, G = self.cfg, self.device, self.cfg.group_size
        batch = [p for p in prompts for _ in range(G)]  # each prompt's group on consecutive rows
        samples, (t0, t1, t2, t3) = self.sample_with_logprobs(self.policy, self.ref, batch, generator, uniforms)
        exp = samples.experience
        raw, parts = self.score(batch, samples)
        t4 = synced_time(dev)

        ended = torch.tensor(samples.ended, device=dev)
        scores = raw - cfg.no_eos_penalty * (~ended).float()  # judged on the response's own last token
        m = exp.mask
        exp.scores = scores
        exp.advantages = group_advantages(scores, G, cfg.scale_rewards, cfg.adv_eps)[:, None] * m  # whole groups
        kl = self._kl(exp.logprobs, exp.ref_logprobs, m)
        # The logged statistics are over the whole batch (every process's rows, in rank order).
        scores, ended, m, kl = gather_rows([scores, ended.float(), m, kl], self.dist)
        if self.dist.world_size > 1:
            parts = mean_over_processes(0.0, 0, parts, dev)[2]  # each a mean over equal shares
        groups = scores.view(-1, G)
        stats = {
            "reward": float(scores.mean()), "reward_std": float(scores.std()),
            "group_std": float(groups.std(1).mean()),
            "zero_std_frac": float((groups == groups[:, :1]).all(1).float().mean()),  # groups with no signal
            **parts, "kl": float(kl.sum(1).mean()), "response_len": float(m.sum(1).mean()),
            "eos_frac": float(ended.float().mean()),
            "time_generate": t1 - t0, "time_policy": t2 - t1, "time_ref": t3 - t2, "time_reward": t4 - t3,
            "rollout_tokens_per_s": float(m.sum()) / max(t1 - t0, 1e-9),
        }
        return exp, samples, stats

    def _kl(self, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-token k3 estimate of KL(pi || pi_ref), 0 on padding; the log-ratio is masked and clamped first, so
        neither the value nor its gradient can overflow."""
        c = self.cfg.log_ratio_clip
        log_ratio = ((logp - ref_logp) * mask).clamp(-c, c)
        return kl_estimate(log_ratio, torch.zeros_like(log_ratio), "k3")

    # -- update ---------------------------------------------------------------------------------------------

    def minibatch_backward(self, exp: Experience, rows: torch.Tensor) -> dict | None:
        """Accumulate the gradients of one minibatch (rows of `exp`) over its micro-batches.

        Every token carries a weight fixed by the minibatch: 1 / (its token count) with loss_norm token (DAPO),
        1 / (response length * responses) with sequence (GRPO), so the result does not depend on the split.
        Returns weighted stats, or None on a non-finite loss.
        """
        cfg = self.cfg
        n_tok = self.minibatch_count(exp.mask[rows].sum()).clamp(min=1)  # every process's rows
        n_seq = len(rows) * self.dist.world_size

        def loss_and_stats(i: int, mb: Experience):
            m = mb.mask
            with autocast(self.device):
                logp, entropy = policy_logprobs(self.policy, mb, cfg.temperature, with_entropy=True)
            pg, ratio, clipped = clipped_surrogate(logp, mb.logprobs, mb.advantages, cfg.clip_range,
                                                   cfg.log_ratio_clip, cfg.clip_range_high)
            kl = self._kl(logp, mb.ref_logprobs, m)
            w = m / n_tok if cfg.loss_norm == "token" else m / (m.sum(1, keepdim=True).clamp(min=1) * n_seq)
            pg_loss, kl_loss = (pg * w).sum(), (kl * w).sum()
            loss = pg_loss + cfg.kl_coef * kl_loss if cfg.kl_coef else pg_loss
            with torch.no_grad():
                r64 = ratio.double()
                return loss, {"pg_loss": pg_loss, "kl_loss": kl_loss, "entropy": (entropy * w).sum(),
                              "approx_kl": ((r64 - 1 - r64.log()) * w).sum(),  # k3 estimate of KL(pi_old || pi)
                              "clipfrac": (clipped * w).sum(), "ratio_mean": (r64 * w).sum(),
                              "ratio_sq": (r64 ** 2 * w).sum()}

        keys = ("pg_loss", "kl_loss", "entropy", "approx_kl", "clipfrac", "ratio_mean", "ratio_sq")
        sums, finite = self.backward_each(exp, rows.split(cfg.micro_batch_size), keys, loss_and_stats)
        sums, finite = self.minibatch_sums(sums, finite)
        if not finite:
            return None
        out = {k: float(v) for k, v in sums.items()}
        out["ratio_var"] = out.pop("ratio_sq") - out["ratio_mean"] ** 2
        return out

    def optimizer_step(self) -> dict:
        """Clip and step on the schedule; returns the gradient norm and learning rate."""
        if self.dist.world_size > 1:
            sum_gradients(self.policy)  # losses are weighted by the whole minibatch: the sum is its gradient
        grad_norm, lr = clip_and_step(self.policy, self.opt, self.sched, self.update_step)
        self.update_step += 1
        return {"grad_norm": grad_norm, "lr": lr}

    def update(self, exp: Experience, generator: torch.Generator) -> dict:
        """ppo_epochs passes over freshly shuffled minibatches, one optimizer step per minibatch. Advantages are
        fixed per response, so minibatches need not respect group boundaries."""
        self.policy.train()

        def step(rows: torch.Tensor) -> dict | None:
            stats = self.minibatch_backward(exp, rows)
            if stats is None:  # a non-finite loss: drop this minibatch rather than corrupt the weights
                self.opt.zero_grad(set_to_none=True)
                self.guard.check(False, self.update_step)
                return None
            out = self.optimizer_step()  # a non-finite gradient norm skipped the update
            return {**stats, **out} if self.guard.check(math.isfinite(out["grad_norm"]), self.update_step) else None

        return minibatch_epochs(exp.input_ids.shape[0], self.cfg.ppo_epochs,
                                self.cfg.minibatch_size // self.dist.world_size, generator, self.device, step)

    # -- resume -------------------------------------------------------------------------------------------

    def state_dict(self, iteration: int) -> dict:
        """What resume needs beyond the policy checkpoint; with LoRA (merged checkpoints) the adapters."""
        state = {"iteration": iteration, "update_step": self.update_step, "optimizer": self.opt.state_dict(),
                 "rng": rng_state()}
        if self.cfg.lora.rank:
            state["policy_trainable"] = trainable_state_dict(self.policy)
        return state

    def load_state_dict(self, state: dict, policy_weights: dict) -> int:
        """Restore from `state` and the checkpoint's policy weights; returns the iteration to continue from."""
        if self.cfg.lora.rank:
            load_trainable_state_dict(self.policy, state["policy_trainable"])
        else:
            self.policy.load_state_dict(policy_weights)
        self.opt.load_state_dict(state["optimizer"])
        self.update_step = int(state["update_step"])
        set_rng_state(state["rng"])
        return int(state["iteration"])


# ---------------------------------------------------------------------------------------------- the recipe

def _check_inputs(cfg: GRPOConfig, reward_fn: RewardFn | None):
    """Validate checkpoints, tokenizers, the reward function and prompts before anything is loaded or written.
    Returns (tokenizer, prompts, reward function or None)."""
    sft = read_config(cfg.sft_model)
    sft_meta = sft.get("lmforge", {})
    if sft_meta.get("head", "lm") == "scalar":
        raise LmforgeError(f"{cfg.sft_model}: a scalar-head (reward/value) model cannot be the policy")
    tok = Tokenizer.load(resolve_checkpoint(cfg.sft_model))
    contexts = {"policy": int(sft["max_position_embeddings"])}
    if cfg.reward_model:
        check_reward_model(cfg.reward_model, sft_meta.get("tokenizer_fingerprint") or tok.fingerprint(),
                           f"config key 'sft_model' ({cfg.sft_model})", contexts)
    if reward_fn is None and cfg.reward_fn:
        reward_fn = load_reward_fn(cfg.reward_fn)
    if not cfg.reward_model and reward_fn is None:
        raise LmforgeError("config key 'reward_model' or 'reward_fn' is required (a reward model checkpoint, or a "
                           "reward function module:function)")
    prompts = load_prompts(cfg.prompts, tok, cfg.max_new_tokens, contexts)
    if reward_fn is not None:  # a reward that cannot judge these prompts (the world's, on your own) fails now
        try:
            reward_fn([p.text for p in prompts], [""] * len(prompts), [[] for _ in prompts])
        except LmforgeError as e:
            raise LmforgeError(f"config key 'reward_fn' ({cfg.reward_fn or 'reward_fn'}) cannot score the prompts of "
                               f"{cfg.prompts}: {e}") from None
        except Exception:  # noqa: BLE001 - a function that rejects empty responses is checked at the first iteration
            pass
    return tok, prompts, reward_fn


def build_trainer(cfg: GRPOConfig, tok: Tokenizer, device: torch.device | str = "cpu",
                  reward_fn: RewardFn | None = None, dist_info: DistInfo | None = None) -> GRPOTrainer:
    """Policy and reference from the SFT checkpoint (adapters on the policy only), and the reward sources: the
    reward model when cfg.reward_model is set, `reward_fn` (else cfg.reward_fn) when there is one."""
    device = torch.device(device)
    policy, _, _ = load_model(cfg.sft_model, head="lm", device=device)
    ref = copy.deepcopy(policy)  # before any adapter: the reference is the SFT model itself
    if cfg.lora.rank:
        apply_lora(policy, cfg.lora)
    sources: dict[str, tuple[float, RewardSource]] = {}
    if cfg.reward_model:
        rm = RewardScorer.load(cfg.reward_model, device=device)  # eval, dropout off, normalisation from meta

        def rm_source(prompts, samples):  # decoder: the ids the policy wrote; encoder: its own layout
            return rm.score_rollouts(prompts, samples.responses, tok, cfg.micro_batch_size)
        sources["rm"] = (cfg.reward_model_weight, rm_source)
    fn = reward_fn or (load_reward_fn(cfg.reward_fn) if cfg.reward_fn else None)
    if fn is not None:
        sources["fn"] = (cfg.reward_fn_weight,
                         lambda prompts, samples: scores_from_fn(fn, tok, prompts, samples, device))
    if not sources:
        raise LmforgeError("config key 'reward_model' or 'reward_fn' is required")
    return GRPOTrainer(cfg, policy, ref, tok, sources, device, dist_info)


def run_grpo(cfg: GRPOConfig, resume: bool = False, progress: bool = True, reward_fn: RewardFn | None = None) -> dict:
    """Train a policy with GRPO; returns a summary (first/last mean reward, last KL, EOS and zero-std fractions,
    seconds, out). reward_fn, a callable, replaces cfg.reward_fn (tests, notebooks)."""
    from tqdm import tqdm

    t_start = time.perf_counter()
    cfg.validate()
    dist_info = init_distributed()  # under torchrun each process samples and trains on whole groups of a share
    world = dist_info.world_size
    cfg.check_processes(world)
    tok, prompts, reward_fn = _check_inputs(cfg, reward_fn)
    out = Path(cfg.out)
    rundir = RunDir(out, "grpo", resume, cfg.overwrite, inputs={"sft_model": cfg.sft_model,
                                                               "reward_model": cfg.reward_model},
                    is_main=dist_info.is_main)
    state = rundir.check()
    if state is not None:
        check_resume_rank(out, read_config(out).get("lmforge", {}), "lora", cfg.lora.rank)

    seed_everything(cfg.seed)  # the same on every process: adapters start identical
    device = pick_device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", dist_info.local_rank)
    trainer = build_trainer(cfg, tok, device, reward_fn, dist_info)
    start = 0
    if state is not None:
        policy, _, _ = load_model(out, head="lm", device=device)
        start = trainer.load_state_dict(state, policy.state_dict())
        del policy
    meta = {"stage": "grpo", "sft_model": str(cfg.sft_model), "reward_model": str(cfg.reward_model),
            "reward_fn": cfg.reward_fn or (getattr(reward_fn, "__qualname__", "callable") if reward_fn else ""),
            "temperature": cfg.temperature, "group_size": cfg.group_size, "lora_rank": cfg.lora.rank,
            "config": to_dict(cfg)}

    def save(iteration: int) -> None:  # a plain model: any adapters merged
        save_checkpoint(out, plain_model(trainer.policy), tok, {**meta, "iteration": iteration},
                        trainer.state_dict(iteration))

    history = []
    with (rundir.active(start, checkpoint_bytes=estimate_bytes(trainer.policy)),
          StopRequest() as stop,  # Ctrl-C / SIGTERM: finish the iteration, save, stop (see StopRequest)
          cpu_threads.adaptive()):  # RLTrainer.iteration may lower the thread count while other programs are busy
        main = dist_info.is_main  # one process logs and saves
        logger = MetricsLogger(out, enabled=main)
        bar = tqdm(range(start, cfg.iterations), initial=start, total=cfg.iterations, desc="grpo",
                   disable=not (progress and main), dynamic_ncols=True, leave=False)
        for it in bar:
            batch = [prompts[i] for i in prompt_indices(len(prompts), it, cfg.prompts_per_iteration, cfg.seed)]
            stats, samples, exp = trainer.iteration(batch, cfg.seed, it)
            history.append(stats)
            logger.log(it + 1, stats)
            with open(out / "samples.jsonl", "a", encoding="utf-8") if main else contextlib.nullcontext() as f:
                for i in range(min(cfg.log_samples, len(samples.responses)) if main else 0):  # this process's rows
                    f.write(json.dumps({"iteration": it + 1, "prompt": batch[i // cfg.group_size].text,
                                        "response": tok.decode(samples.responses[i]), "ended": samples.ended[i],
                                        "reward": float(exp.scores[i]), "advantage": float(exp.advantages[i, 0])},
                                       ensure_ascii=False) + "\n")
            bar.set_postfix(reward=f"{stats['reward']:.3f}", kl=f"{stats['kl']:.3f}",
                            zero_std=f"{stats['zero_std_frac']:.2f}")
            final = it + 1 == cfg.iterations
            interrupted = not final and stop.requested(dist_info, device)
            if main and ((cfg.save_every and (it + 1) % cfg.save_every == 0) or final or interrupted):
                save(it + 1)
            if interrupted:
                bar.close()
                if main:
                    stop.announce(f"iteration {it + 1}", out)
                raise KeyboardInterrupt
        bar.close()
    summary = {"out": str(out), "iterations": cfg.iterations, "seconds": time.perf_counter() - t_start}
    if history:
        summary.update(reward_first=history[0]["reward"], reward_last=history[-1]["reward"],
                       kl_last=history[-1]["kl"], eos_frac_last=history[-1]["eos_frac"],
                       zero_std_frac_last=history[-1]["zero_std_frac"])
    rundir.finish(summary, to_dict(cfg))
    return summary


def _print_summary(cfg: GRPOConfig, resume: bool) -> None:
    s = run_grpo(cfg, resume=resume)
    if "reward_last" in s:
        print(f"grpo: {s['iterations']} iterations in {s['seconds']:.1f}s; reward {s['reward_first']:.3f} -> "
              f"{s['reward_last']:.3f}, KL {s['kl_last']:.3f}, groups without signal {s['zero_std_frac_last']:.0%} "
              f"-> {s['out']}")
    else:
        print(f"grpo: nothing to do, {s['out']} already has {s['iterations']} iterations")


COMMAND = Command(
    "lmforge grpo", "RL with GRPO: group-relative advantages, no critic (DeepSeekMath); rewards from a reward "
    "model and/or a Python function.", GRPOConfig, _print_summary, resume=True,
    flags=(Flag("--sft-model", "sft_model", "SFT checkpoint: policy and reference"),
           Flag("--reward-model", "reward_model", "reward model checkpoint"),
           Flag("--prompts", "prompts", "RL prompts (JSONL)"), Flag("--out", "out", "output directory")),
    examples=("lmforge grpo --config configs/grpo_tiny.yaml",
              "lmforge grpo --config configs/grpo_tiny.yaml reward_model= reward_fn=lmforge.world.rewards:correctness",
              "lmforge grpo --config configs/grpo_tiny.yaml reward_fn=lmforge.world.rewards:correctness "
              "reward_fn_weight=2.0 scale_rewards=false kl_coef=0.0 clip_range_high=0.28",
              "lmforge grpo --config configs/grpo_tiny.yaml --resume"))


def _wire(ctx: StageContext) -> dict:
    return {"sft_model": ctx.artifact("sft_model"), "reward_model": ctx.artifact("reward_model"),
            "prompts": ctx.artifact("rl_prompts"), "out": ctx.dir("grpo"), "device": ctx.device, "overwrite": True}


STAGE = Stage("grpo", GRPOConfig, lambda ctx, cfg: run_grpo(cfg), inputs=("sft_model", "reward_model", "rl_prompts"),
              outputs={"grpo_model": ""}, wire=_wire, policy="grpo", branch=True, command="grpo")
