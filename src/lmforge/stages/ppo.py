"""RLHF with PPO, step 3 of InstructGPT (Ouyang et al. 2022): maximise

    E[ r(x, y) - beta * log(pi(y|x) / pi_ref(y|x)) ]  +  gamma * E_pretrain[ log pi(x) ]      (PPO-ptx)

Four models: the actor (policy) and a frozen reference, both from the SFT checkpoint; a critic (scalar value
head) initialised from the reward model; the frozen reward model. Each iteration samples one response per
prompt, scores it (`make_experience`), then runs `ppo_epochs` passes of clipped-PPO minibatch updates
(`update`). Choices follow InstructGPT, Ziegler et al. 2019 ("Fine-Tuning Language Models from Human
Preferences"), "The N Implementation Details of RLHF with PPO" (Huang et al. 2023, "N details") and its
TL;DR follow-up (Huang et al. 2024, arXiv 2403.17031, "N+"). The math lives in rl_utils.py, the rollout and
scoring layout in rollout.py. One process (one device), so advantage whitening is over the whole batch.

    lmforge ppo --config configs/ppo_tiny.yaml sft_model=runs/sft reward_model=runs/rm prompts=prompts.jsonl
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import torch

from lmforge import cpu_threads
from lmforge.checkpoint import (CONFIG_FILE, estimate_bytes, load_model, read_config, recover_interrupted_save,
                                resolve_checkpoint, save_checkpoint)
from lmforge.cli import Command, Flag
from lmforge.config import to_dict
from lmforge.errors import ConfigError, LmforgeError
from lmforge.rundir import RunDir
from lmforge.stage import Stage, StageContext
from lmforge.generation import SamplingParams
from lmforge.lora import (LoraConfig, apply_lora, check_resume_rank, load_trainable_state_dict, merged_copy,
                          merged_state_dict, plain_model, trainable_state_dict)
from lmforge.model import Transformer
from lmforge.scoring import RewardScorer, check_reward_model, disable_dropout, fold_normalization, is_encoder
from lmforge.rl_utils import (KLController, clipped_surrogate, clipped_value_loss, explained_variance, gae,
                              kl_estimate, masked_mean, masked_whiten, token_rewards)
from lmforge.rollout import (Experience, Prompt, RewardFn, RLTrainer, Samples, check_process_split, critic_values,
                             in_chunks, load_prompts, minibatch_epochs, policy_logprobs, prompt_indices,
                             scores_from_fn)
from lmforge.ptx import PtxConfig, PtxSource
from lmforge.tokenizer import Tokenizer
from lmforge.distributed import DistInfo, gather_rows, init_distributed, sum_gradients
from lmforge.training import (MetricsLogger, NonFiniteGuard, OptimConfig, StopRequest, autocast, build_optimizer,
                              clip_and_step, pick_device, rng_state, seed_everything, set_rng_state, synced_time)


def _ppo_optim() -> OptimConfig:
    # Adam eps 1e-5 as in the N+ reproduction; max_steps and grad_accum are derived (see PPOConfig).
    return OptimConfig(lr=1e-5, eps=1e-5, weight_decay=0.0, warmup_steps=0, schedule="constant", max_steps=1)


@dataclass
class PPOConfig:
    """PPO recipe. Sizes: batch_size rollouts per iteration -> minibatches (one optimizer step each) ->
    micro-batches (gradient accumulation); each must divide the previous one. In actor_optim / critic_optim,
    max_steps and grad_accum are derived (iterations * ppo_epochs * batch/minibatch steps; minibatch/micro)."""
    sft_model: str = ""                  # policy and reference initialisation
    reward_model: str = ""               # frozen scorer (may be empty when run_ppo gets a reward_fn)
    critic_init: Literal["reward", "sft"] = "reward"   # InstructGPT initialises the value model from the RM
    prompts: str = ""                    # JSONL: instruction records without output, or chats ending in a user turn
    out: str = "runs/ppo"
    # rollouts: pure sampling (no top-k/top-p unless set here; they are logged in the checkpoint metadata)
    iterations: int = 100
    batch_size: int = 64
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    no_eos_penalty: float = 1.0          # subtracted from the score of a response that never stopped
    no_eos_score: float | None = None    # or: replace that score by this fixed value (N+ uses -1)
    # "old" log-probs: the sampler's, or recomputed teacher-forced; auto: the sampler's on CPU (fp32), recomputed
    # on GPU (bf16 autocast) (rollout.use_sampler_logprobs)
    old_logprobs: Literal["auto", "sampler", "recompute"] = "auto"
    # reward
    kl_coef: float = 0.02                # beta (InstructGPT 0.02)
    kl_estimator: Literal["k1", "k3"] = "k1"
    kl_target: float | None = None       # set -> adaptive beta (Ziegler et al.), KL per sequence in nats
    kl_horizon: int = 10000
    score_clip: float | None = None
    whiten_rewards: bool = False
    # advantages
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    # update
    ppo_epochs: int = 1
    minibatch_size: int = 16
    micro_batch_size: int = 8
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    vf_coef: float = 0.1
    entropy_coef: float = 0.0
    log_ratio_clip: float = 20.0         # clamp of log(pi/pi_old) so exp() never overflows
    ema_decay: float = 0.0               # > 0: the saved policy is an EMA of the weights (InstructGPT 0.992)
    gradient_checkpointing: bool = False # actor and critic recompute block activations in backward: less memory
    actor_optim: OptimConfig = field(default_factory=_ppo_optim)
    critic_optim: OptimConfig = field(default_factory=_ppo_optim)
    # rank > 0: the actor trains adapters only (the reference stays the SFT model); the critic trains adapters
    # and its value head. Checkpoints hold the merged weights.
    actor_lora: LoraConfig = field(default_factory=LoraConfig)
    critic_lora: LoraConfig = field(default_factory=LoraConfig)
    ptx: PtxConfig = field(default_factory=PtxConfig)
    # run
    seed: int = 0
    device: str = "auto"
    save_every: int = 0                  # iterations between checkpoints (0: only at the end)
    log_samples: int = 2                 # responses per iteration written to samples.jsonl
    overwrite: bool = False              # start over in an `out` that already holds a run

    def check_processes(self, world: int) -> None:
        """Under torchrun: refuse sizes that do not split over `world` processes (rollout.check_process_split)."""
        check_process_split(world, ("batch_size", self.batch_size), self.minibatch_size, self.micro_batch_size)

    def validate(self) -> None:
        def need(ok: bool, key: str, what: str):
            if not ok:
                raise ConfigError(key, what)
        for key in ("iterations", "batch_size", "minibatch_size", "micro_batch_size", "max_new_tokens",
                    "ppo_epochs", "kl_horizon"):
            need(getattr(self, key) > 0, key, "must be positive")
        need(self.batch_size % self.minibatch_size == 0, "minibatch_size",
             f"({self.minibatch_size}) must divide batch_size ({self.batch_size})")
        need(self.minibatch_size % self.micro_batch_size == 0, "micro_batch_size",
             f"({self.micro_batch_size}) must divide minibatch_size ({self.minibatch_size})")
        need(self.temperature > 0, "temperature", "must be positive (PPO samples; greedy decoding has no policy)")
        need(0 < self.gamma <= 1, "gamma", "must be in (0, 1]")
        need(0 <= self.lam <= 1, "lam", "must be in [0, 1]")
        need(self.clip_range > 0 and self.clip_range_value > 0, "clip_range", "and clip_range_value must be positive")
        need(self.kl_coef >= 0, "kl_coef", "must be >= 0")
        need(self.kl_target is None or self.kl_target > 0, "kl_target", "must be positive")
        need(self.score_clip is None or self.score_clip > 0, "score_clip", "must be positive")
        need(0 <= self.ema_decay < 1, "ema_decay", "must be in [0, 1)")
        need(self.ptx.coef >= 0, "ptx.coef", "must be >= 0")
        need(self.ptx.coef == 0 or bool(self.ptx.data), "ptx.data", "must list pretraining files when ptx.coef > 0")
        need(self.ptx.batch_size > 0 and self.ptx.seq_len > 1, "ptx.batch_size", "and ptx.seq_len must be positive")
        need(bool(self.sft_model), "sft_model", "is required (the SFT checkpoint directory)")
        need(bool(self.prompts), "prompts", "is required (a JSONL file of prompts)")
        for key in ("actor_lora", "critic_lora"):
            lora = getattr(self, key)
            lora.validate_as(key)
            # PPO turns every dropout off (the same function at rollout and update time): say so, not ignore it
            need(not (lora.rank and lora.dropout), f"{key}.dropout", "must be 0: PPO trains with dropout off")


# ---------------------------------------------------------------------------------------------- the trainer

# score(prompts, samples) -> (B,) normalised sequence scores
Scorer = Callable[[list[Prompt], Samples], torch.Tensor]


class PPOTrainer(RLTrainer):
    """Holds the four models, both optimizers and the KL controller; `iteration` = rollout + score + update."""

    def __init__(self, cfg: PPOConfig, actor: Transformer, ref: Transformer, critic: Transformer, tok: Tokenizer,
                 score: Scorer, ptx: PtxSource | None = None, device: torch.device | str = "cpu",
                 dist_info: DistInfo | None = None):
        self.cfg, self.tok, self.score, self.ptx = cfg, tok, score, ptx
        self.device = torch.device(device)
        self.dist = dist_info or DistInfo()  # under torchrun: this process's share of every batch (see RLTrainer)
        for model in (actor, ref, critic):  # the same function at rollout and update time (N details)
            disable_dropout(model)
        actor.gradient_checkpointing = critic.gradient_checkpointing = cfg.gradient_checkpointing
        self.actor, self.critic, self.ref = actor, critic, ref.eval().requires_grad_(False)
        self.actor_opt = build_optimizer(actor, cfg.actor_optim)
        self.critic_opt = build_optimizer(critic, cfg.critic_optim)
        steps_per_iter = cfg.ppo_epochs * (cfg.batch_size // cfg.minibatch_size)
        total = max(1, cfg.iterations * steps_per_iter)
        self.actor_sched = dataclasses.replace(cfg.actor_optim, max_steps=total)
        self.critic_sched = dataclasses.replace(cfg.critic_optim, max_steps=total)
        self.kl_ctl = KLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
        self.ema = None
        if cfg.ema_decay > 0:  # of the plain (merged) policy weights: what the checkpoint holds
            self.ema = merged_copy(actor, self.device) if cfg.actor_lora.rank else copy.deepcopy(actor)
            self.ema.requires_grad_(False)
        self.update_step = 0
        self.guard = NonFiniteGuard(cfg.actor_optim.max_skipped_steps, "PPO minibatch updates")
        self.sampling = SamplingParams(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p)

    # -- rollout and scoring ------------------------------------------------------------------------------

    @torch.no_grad()
    def make_experience(self, prompts: list[Prompt], generator: torch.Generator | None = None,
                        uniforms: torch.Tensor | None = None):
        """Sample, score and compute rewards / advantages for one batch of prompts: (Experience, Samples, stats).

        Under torchrun `prompts` is this process's share: the rewards, advantages and statistics are computed on
        the whole batch gathered from every process (the same numbers one process computes), then each process
        keeps its own rows."""
        cfg, dev, mb = self.cfg, self.device, self.cfg.micro_batch_size
        samples, (t0, t1, t2, t3) = self.sample_with_logprobs(self.actor, self.ref, prompts, generator, uniforms)
        exp = samples.experience
        with autocast(dev):
            exp.values = in_chunks(lambda e: critic_values(self.critic, e), exp, mb)
            t4 = synced_time(dev)
            raw = self.score(prompts, samples).to(dev, torch.float32)
        t5 = synced_time(dev)

        m, B, R = exp.mask, exp.mask.shape[0], exp.mask.shape[1]
        ended = torch.tensor(samples.ended, device=dev, dtype=torch.float32)
        # The whole batch (every process's rows, in rank order; one process: as is): whitening, the KL
        # controller and the logged statistics are over the batch, not over a process's share of it.
        raw, ended, m, logprobs, ref_logprobs, values = gather_rows(
            [raw, ended, m, exp.logprobs, exp.ref_logprobs, exp.values], self.dist)
        ended = ended.bool()
        scores = raw.clone()
        if cfg.score_clip is not None:
            scores = scores.clamp(-cfg.score_clip, cfg.score_clip)
        if cfg.no_eos_score is not None:  # judged on the response's own last token, never the prompt's
            scores = torch.where(ended, scores, torch.full_like(scores, cfg.no_eos_score))
        else:
            scores = scores - cfg.no_eos_penalty * (~ended).float()
        kl = kl_estimate(logprobs, ref_logprobs, cfg.kl_estimator) * m
        beta = self.kl_ctl.value
        rewards = token_rewards(scores, kl, m, beta)
        if cfg.whiten_rewards:
            rewards = masked_whiten(rewards, m, shift_mean=False)
        advantages, returns = gae(rewards, values, m, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:  # over all valid tokens of the batch
            advantages = masked_whiten(advantages, m)
        mine = slice(self.dist.rank * B, (self.dist.rank + 1) * B)  # this process's rows and columns
        exp.scores, exp.rewards = scores[mine], rewards[mine, :R]
        exp.advantages, exp.returns = advantages[mine, :R], returns[mine, :R]

        kl_seq = float(kl.sum(1).mean())
        n_tokens = float(m.sum())
        stats = {
            "score": float(raw.mean()), "score_std": float(raw.std()) if len(raw) > 1 else 0.0,
            "reward": float(rewards.sum(1).mean()), "kl": kl_seq, "non_score_reward": -beta * kl_seq, "beta": beta,
            "response_len": float(m.sum(1).mean()), "eos_frac": float(ended.float().mean()),
            "explained_var": explained_variance(values, returns, m),
            "value_mean": float(masked_mean(values, m)),
            "time_generate": t1 - t0, "time_policy": t2 - t1, "time_ref": t3 - t2, "time_critic": t4 - t3,
            "time_reward": t5 - t4, "rollout_tokens_per_s": n_tokens / max(t1 - t0, 1e-9),
        }
        self.kl_ctl.update(kl_seq, len(raw))
        return exp, samples, stats

    # -- update ---------------------------------------------------------------------------------------------

    def minibatch_backward(self, exp: Experience, rows: torch.Tensor,
                           ptx_batches: list[torch.Tensor] | None = None) -> dict | None:
        """Accumulate the gradients of one minibatch (rows of `exp`) over its micro-batches.

        Losses are token sums divided by the minibatch's token count, so the result is exactly the masked
        token mean over the minibatch, however it is split. With PPO-ptx, `ptx_coef * LM loss` of one
        pretraining batch per micro-batch joins the actor's backward (InstructGPT; DeepSpeed-Chat instead takes
        a separate optimizer step). The actor's and the critic's losses share no parameter, so each model runs
        its own backward: on a 2-core CPU the two run side by side, one thread each (cpu_threads.side_by_side).
        Returns token-weighted stats, or None on a non-finite loss.
        """
        cfg = self.cfg
        micro = rows.split(cfg.micro_batch_size)
        n_tok = self.minibatch_count(exp.mask[rows].sum()).clamp(min=1)  # every process's rows
        passes = [lambda: self.actor_backward(exp, micro, n_tok, ptx_batches),
                  lambda: self.critic_backward(exp, micro, n_tok)]
        if cpu_threads.side_by_side(self.device) and not cfg.gradient_checkpointing:
            results = cpu_threads.run_lanes(lambda run: run(), passes)
        else:
            results = [run() for run in passes]
        sums = {k: v for stats, _ in results for k, v in stats.items()}
        finite = all(ok for _, ok in results)
        sums, finite = self.minibatch_sums(sums, finite)  # a non-finite loss on any process skips the step on all
        if not finite:
            return None
        out = {k: float(v) for k, v in sums.items()}
        out["ratio_var"] = out.pop("ratio_sq") - out["ratio_mean"] ** 2
        return out

    def actor_backward(self, exp: Experience, micro: tuple[torch.Tensor, ...], n_tok: torch.Tensor,
                       ptx_batches: list[torch.Tensor] | None) -> tuple[dict[str, torch.Tensor], bool]:
        """The clipped policy loss (minus the entropy bonus, plus PPO-ptx) of each micro-batch, backward into
        the actor: (token-weighted statistic sums, whether every loss was finite)."""
        cfg, world = self.cfg, self.dist.world_size

        def loss_and_stats(i: int, mb: Experience):
            with autocast(self.device):
                logp, entropy = policy_logprobs(self.actor, mb, cfg.temperature, with_entropy=True,
                                                entropy_grad=bool(cfg.entropy_coef))
                ptx = self.ptx_loss(ptx_batches[i].to(self.device)) if ptx_batches else None
            pg, ratio, clipped = clipped_surrogate(logp, mb.logprobs, mb.advantages, cfg.clip_range,
                                                   cfg.log_ratio_clip)
            w = mb.mask / n_tok  # token weights of the whole minibatch
            pg_loss, ent = (pg * w).sum(), (entropy * w).sum()
            loss = pg_loss - cfg.entropy_coef * ent if cfg.entropy_coef else pg_loss
            with torch.no_grad():
                r64 = ratio.double()
                stats = {"pg_loss": pg_loss, "entropy": ent,
                         "approx_kl": ((r64 - 1 - r64.log()) * w).sum(),  # k3 estimate of KL(pi_old || pi)
                         "clipfrac": (clipped * w).sum(), "ratio_mean": (r64 * w).sum(),
                         "ratio_sq": (r64 ** 2 * w).sum()}
            if ptx is not None:  # the mean over the micro-batches of every process
                loss = loss + cfg.ptx.coef * ptx / (len(micro) * world)
                stats["ptx_loss"] = ptx / (len(micro) * world)
            return loss, stats

        keys = ("pg_loss", "entropy", "approx_kl", "clipfrac", "ratio_mean", "ratio_sq")
        return self.backward_each(exp, micro, keys + (("ptx_loss",) if ptx_batches else ()), loss_and_stats)

    def critic_backward(self, exp: Experience, micro: tuple[torch.Tensor, ...],
                        n_tok: torch.Tensor) -> tuple[dict[str, torch.Tensor], bool]:
        """vf_coef x the clipped value loss of each micro-batch, backward into the critic: (token-weighted
        statistic sums, whether every loss was finite)."""
        def loss_and_stats(i: int, mb: Experience):
            with autocast(self.device):
                values = critic_values(self.critic, mb)
            vf, vf_clipped = clipped_value_loss(values, mb.values, mb.returns, self.cfg.clip_range_value)
            w = mb.mask / n_tok
            vf_loss = (vf * w).sum()
            return self.cfg.vf_coef * vf_loss, {"vf_loss": vf_loss, "vf_clipfrac": (vf_clipped * w).sum()}

        return self.backward_each(exp, micro, ("vf_loss", "vf_clipfrac"), loss_and_stats)

    def ptx_loss(self, ids: torch.Tensor) -> torch.Tensor:
        """The pretraining objective on full (unpadded) windows: mean next-token cross-entropy."""
        return self.actor(ids[:, :-1], labels=ids[:, 1:])  # the fused LM-head cross-entropy

    def optimizer_step(self) -> dict:
        """Clip, step both optimizers on the schedule, update the EMA; returns grad norms and learning rates."""
        out = {}
        for name, model, opt, sched in (("actor", self.actor, self.actor_opt, self.actor_sched),
                                        ("critic", self.critic, self.critic_opt, self.critic_sched)):
            if self.dist.world_size > 1:
                sum_gradients(model)  # every process then takes the same step
            out[f"{name}_grad_norm"], out[f"{name}_lr"] = clip_and_step(model, opt, sched, self.update_step)
        self.update_step += 1
        if self.ema is not None:
            with torch.no_grad():
                lora = self.cfg.actor_lora.rank
                new = merged_state_dict(self.actor) if lora else dict(self.actor.named_parameters())
                for name, pe in self.ema.named_parameters():
                    pe.lerp_(new[name], 1.0 - self.cfg.ema_decay)
        return out

    def update(self, exp: Experience, generator: torch.Generator) -> dict:
        """ppo_epochs passes over freshly shuffled minibatches, one optimizer step per minibatch."""
        cfg = self.cfg
        n_micro = cfg.minibatch_size // self.dist.world_size // cfg.micro_batch_size  # per process
        self.actor.train()
        self.critic.train()

        def step(rows: torch.Tensor) -> dict | None:
            ptx = [self.ptx.batch(generator) for _ in range(n_micro)] if self.ptx is not None else None
            stats = self.minibatch_backward(exp, rows, ptx)
            if stats is None:  # a non-finite loss: drop this minibatch rather than corrupt the weights
                self.actor_opt.zero_grad(set_to_none=True)
                self.critic_opt.zero_grad(set_to_none=True)
                self.guard.check(False, self.update_step)
                return None
            out = self.optimizer_step()  # a model whose gradient norm is not finite is not updated
            finite = math.isfinite(out["actor_grad_norm"]) and math.isfinite(out["critic_grad_norm"])
            return {**stats, **out} if self.guard.check(finite, self.update_step) else None

        return minibatch_epochs(exp.input_ids.shape[0], cfg.ppo_epochs, cfg.minibatch_size // self.dist.world_size,
                                generator, self.device, step)

    # -- resume -------------------------------------------------------------------------------------------

    def state_dict(self, iteration: int) -> dict:
        """What resume needs beyond the policy checkpoint. With LoRA the checkpoints are merged, so the
        trainable tensors (adapters, value head) are kept here and the frozen bases come from the inits."""
        state = {"iteration": iteration, "update_step": self.update_step, "beta": self.kl_ctl.value,
                 "actor_optimizer": self.actor_opt.state_dict(), "critic_optimizer": self.critic_opt.state_dict(),
                 "rng": rng_state(), "ema": self.ema is not None}
        if self.cfg.critic_lora.rank:
            state["critic_trainable"] = trainable_state_dict(self.critic)
        else:
            state["critic"] = self.critic.state_dict()
        if self.cfg.actor_lora.rank:
            state["actor_trainable"] = trainable_state_dict(self.actor)
        elif self.ema is not None:  # the checkpoint's weights are the EMA; keep the raw policy here
            state["actor"] = self.actor.state_dict()
        return state

    def load_state_dict(self, state: dict, policy_weights: dict) -> int:
        """Restore from `state` and the checkpoint's policy weights; returns the iteration to continue from."""
        if self.ema is not None:
            if not state.get("ema", "actor" in state):
                raise LmforgeError("cannot resume with ema_decay > 0: the checkpoint was saved without EMA")
            self.ema.load_state_dict(policy_weights)
        if self.cfg.actor_lora.rank:
            load_trainable_state_dict(self.actor, state["actor_trainable"])
        else:
            self.actor.load_state_dict(state["actor"] if "actor" in state else policy_weights)
        if self.cfg.critic_lora.rank:
            load_trainable_state_dict(self.critic, state["critic_trainable"])
        else:
            self.critic.load_state_dict(state["critic"])
        self.actor_opt.load_state_dict(state["actor_optimizer"])
        self.critic_opt.load_state_dict(state["critic_optimizer"])
        self.kl_ctl.value = float(state["beta"])
        self.update_step = int(state["update_step"])
        set_rng_state(state["rng"])
        return int(state["iteration"])


# ---------------------------------------------------------------------------------------------- the recipe

def _check_inputs(cfg: PPOConfig, has_reward_fn: bool):
    """Validate checkpoints, tokenizers, prompts and PPO-ptx data before anything is loaded or written."""
    sft = read_config(cfg.sft_model)
    sft_meta = sft.get("lmforge", {})
    if sft_meta.get("head", "lm") == "scalar":
        raise LmforgeError(f"{cfg.sft_model}: a scalar-head (reward/value) model cannot be the policy")
    tok = Tokenizer.load(resolve_checkpoint(cfg.sft_model))
    fingerprint = sft_meta.get("tokenizer_fingerprint") or tok.fingerprint()
    contexts = {"policy": int(sft["max_position_embeddings"])}
    if cfg.reward_model:
        encoder = check_reward_model(cfg.reward_model, fingerprint, f"config key 'sft_model' ({cfg.sft_model})",
                                     contexts)
        if encoder and cfg.critic_init == "reward":  # another layout and tokenizer: it cannot be the critic
            print(f"note: {cfg.reward_model} is an encoder reward model; the critic starts from the SFT model "
                  "with a new value head (critic_init=sft)")
    elif not has_reward_fn:
        raise LmforgeError("config key 'reward_model' is required (the reward model checkpoint directory)")
    if cfg.critic_init == "reward" and not cfg.reward_model:
        raise LmforgeError("config key 'critic_init' is 'reward' but no reward_model is set (use critic_init=sft)")
    prompts = load_prompts(cfg.prompts, tok, cfg.max_new_tokens, contexts)
    ptx = None
    if cfg.ptx.coef > 0:
        if cfg.ptx.seq_len > contexts["policy"]:
            raise LmforgeError(f"config key 'ptx.seq_len' ({cfg.ptx.seq_len}) exceeds the policy's context "
                               f"of {contexts['policy']} positions")
        ptx = PtxSource.from_files(cfg.ptx.data, tok, cfg.ptx.batch_size, cfg.ptx.seq_len)
    return tok, prompts, ptx


def critic_from_reward_model(cfg: PPOConfig) -> bool:
    """The critic copies the reward model (InstructGPT) when critic_init is 'reward' and the RM is a decoder: an
    encoder reads other token ids in another layout, so the critic then starts from the SFT model."""
    if cfg.critic_init != "reward" or not cfg.reward_model:
        return False
    return not is_encoder(read_config(cfg.reward_model))


def build_trainer(cfg: PPOConfig, tok: Tokenizer, device: torch.device | str = "cpu",
                  reward_fn: RewardFn | None = None, ptx: PtxSource | None = None,
                  dist_info: DistInfo | None = None) -> PPOTrainer:
    """The four models of `cfg`: actor and reference from the SFT checkpoint, the critic from the reward model
    (or SFT, with a fresh value head), and the reward model, unless `reward_fn` replaces it."""
    device = torch.device(device)
    actor, _, _ = load_model(cfg.sft_model, head="lm", device=device)
    ref = copy.deepcopy(actor)  # before any adapter: the reference is the SFT model itself
    critic_src = cfg.reward_model if critic_from_reward_model(cfg) else cfg.sft_model
    critic, _, critic_meta = load_model(critic_src, head="scalar", device=device)
    if critic_src == cfg.reward_model:  # values in the units of the normalised rewards from the first step
        fold_normalization(critic, critic_meta)
    if cfg.actor_lora.rank:
        apply_lora(actor, cfg.actor_lora)
    if cfg.critic_lora.rank:  # the value head keeps training: from SFT it is new, from the RM it must move
        apply_lora(critic, cfg.critic_lora, keep_trainable=("score.",))
    if reward_fn is not None:
        def score(prompts, samples):
            return scores_from_fn(reward_fn, tok, prompts, samples, device)
    else:
        rm = RewardScorer.load(cfg.reward_model, device=device)  # eval, dropout off, normalisation from meta

        def score(prompts, samples):  # decoder: at each row's last real token, the response's closing <|end|>
            return rm.score_rollouts(prompts, samples.responses, tok, cfg.micro_batch_size)
    return PPOTrainer(cfg, actor, ref, critic, tok, score, ptx, device, dist_info)


def run_ppo(cfg: PPOConfig, resume: bool = False, progress: bool = True, reward_fn: RewardFn | None = None,
            ptx_source: PtxSource | None = None) -> dict:
    """Train a policy with PPO; returns a summary (first/last mean score, last KL, beta, seconds, out).

    reward_fn(prompt_texts, response_texts, response_ids) -> scores replaces the reward model (toy rewards,
    tests); ptx_source replaces the PPO-ptx batches read from cfg.ptx.data.
    """
    from tqdm import tqdm

    t_start = time.perf_counter()
    cfg.validate()
    dist_info = init_distributed()  # under torchrun each process samples and trains on a share of every batch
    world = dist_info.world_size
    cfg.check_processes(world)
    tok, prompts, ptx = _check_inputs(cfg, reward_fn is not None)
    ptx = ptx_source or ptx
    out = Path(cfg.out)
    rundir = RunDir(out, "ppo", resume, cfg.overwrite, inputs={"sft_model": cfg.sft_model,
                                                              "reward_model": cfg.reward_model},
                    is_main=dist_info.is_main)
    state = rundir.check()
    if state is not None:
        recover_interrupted_save(out / "critic")  # a kill inside the critic's save (see save_critic below)
        meta = read_config(out).get("lmforge", {})
        for key in ("actor_lora", "critic_lora"):
            check_resume_rank(out, meta, key, getattr(cfg, key).rank)

    if cfg.top_k or cfg.top_p < 1.0:
        print(f"note: sampling with top_k={cfg.top_k}, top_p={cfg.top_p}; PPO log-probs still come from the "
              "unfiltered softmax(logits / temperature)")
    seed_everything(cfg.seed)  # the same on every process: new heads and adapters start identical
    device = pick_device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", dist_info.local_rank)
    trainer = build_trainer(cfg, tok, device, reward_fn, ptx, dist_info)
    start = 0
    if state is not None:
        policy, _, _ = load_model(out, head="lm", device=device)
        start = trainer.load_state_dict(state, policy.state_dict())
        del policy
    meta = {"stage": "ppo", "sft_model": str(cfg.sft_model), "reward_model": str(cfg.reward_model or "reward_fn"),
            "temperature": cfg.temperature, "top_k": cfg.top_k, "top_p": cfg.top_p, "ema_decay": cfg.ema_decay,
            "actor_lora_rank": cfg.actor_lora.rank, "critic_lora_rank": cfg.critic_lora.rank, "config": to_dict(cfg)}

    def save_critic(iteration: int) -> None:
        save_checkpoint(out / "critic", plain_model(trainer.critic), tok,
                        {"stage": "ppo_critic", "iteration": iteration})

    def save(iteration: int) -> None:  # plain models: any adapters merged
        policy = trainer.ema if trainer.ema is not None else plain_model(trainer.actor)
        save_checkpoint(out, policy, tok, {**meta, "iteration": iteration, "kl_coef": trainer.kl_ctl.value},
                        trainer.state_dict(iteration))
        # After the policy: its directory swap keeps files, not sub-directories. Resume reads the critic
        # from training_state.pt, so a crash between the two saves loses nothing (resume rewrites it).
        save_critic(iteration)

    history = []
    with (rundir.active(start, checkpoint_bytes=estimate_bytes(trainer.actor) + estimate_bytes(trainer.critic)),
          StopRequest() as stop,  # Ctrl-C / SIGTERM: finish the iteration, save, stop (see StopRequest)
          cpu_threads.adaptive()):  # RLTrainer.iteration may lower the thread count while other programs are busy
        main = dist_info.is_main  # one process logs and saves
        if main and state is not None and not (out / "critic" / CONFIG_FILE).is_file():
            save_critic(start)  # killed between the two saves, maybe the last iteration's: no later save comes
        logger = MetricsLogger(out, enabled=main)
        bar = tqdm(range(start, cfg.iterations), initial=start, total=cfg.iterations, desc="ppo",
                   disable=not (progress and main), dynamic_ncols=True, leave=False)
        for it in bar:
            batch = [prompts[i] for i in prompt_indices(len(prompts), it, cfg.batch_size, cfg.seed)]
            stats, samples, exp = trainer.iteration(batch, cfg.seed, it)
            history.append(stats)
            logger.log(it + 1, stats)
            with open(out / "samples.jsonl", "a", encoding="utf-8") if main else contextlib.nullcontext() as f:
                for i in range(min(cfg.log_samples, len(samples.responses)) if main else 0):  # this process's rows
                    f.write(json.dumps({"iteration": it + 1, "prompt": batch[i].text,
                                        "response": tok.decode(samples.responses[i]), "ended": samples.ended[i],
                                        "score": float(exp.scores[i])}, ensure_ascii=False) + "\n")
            bar.set_postfix(score=f"{stats['score']:.3f}", kl=f"{stats['kl']:.3f}", beta=f"{stats['beta']:.3g}")
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
    summary = {"out": str(out), "iterations": cfg.iterations, "seconds": time.perf_counter() - t_start,
               "beta": trainer.kl_ctl.value}
    if history:
        summary.update(score_first=history[0]["score"], score_last=history[-1]["score"],
                       kl_last=history[-1]["kl"], eos_frac_last=history[-1]["eos_frac"])
    rundir.finish(summary, to_dict(cfg))
    return summary


def _print_summary(cfg: PPOConfig, resume: bool) -> None:
    s = run_ppo(cfg, resume=resume)
    if "score_last" in s:
        print(f"ppo: {s['iterations']} iterations in {s['seconds']:.1f}s; score {s['score_first']:.3f} -> "
              f"{s['score_last']:.3f}, KL {s['kl_last']:.3f}, beta {s['beta']:.4g} -> {s['out']}")
    else:
        print(f"ppo: nothing to do, {s['out']} already has {s['iterations']} iterations")


COMMAND = Command(
    "lmforge ppo", "RLHF with PPO against a reward model (InstructGPT step 3).", PPOConfig, _print_summary,
    resume=True,
    flags=(Flag("--sft-model", "sft_model", "SFT checkpoint: policy and reference"),
           Flag("--reward-model", "reward_model", "reward model checkpoint"),
           Flag("--prompts", "prompts", "RL prompts (JSONL)"), Flag("--out", "out", "output directory")),
    examples=("lmforge ppo --config configs/ppo_tiny.yaml",
              "lmforge ppo --config configs/ppo_tiny.yaml iterations=50 kl_coef=0.05 actor_optim.lr=2e-5",
              "lmforge ppo --config configs/ppo_tiny.yaml kl_target=6.0 ptx.coef=1.0 ptx.data=runs/lmforge-tiny/world/corpus.txt",
              "lmforge ppo --config configs/ppo_tiny.yaml --resume"))


def _wire(ctx: StageContext) -> dict:
    return {"sft_model": ctx.artifact("sft_model"), "reward_model": ctx.artifact("reward_model"),
            "prompts": ctx.artifact("rl_prompts"), "out": ctx.dir("ppo"), "device": ctx.device, "overwrite": True}


STAGE = Stage("ppo", PPOConfig, lambda ctx, cfg: run_ppo(cfg), inputs=("sft_model", "reward_model", "rl_prompts"),
              outputs={"ppo_model": ""}, wire=_wire, policy="ppo", branch=True, command="ppo")
