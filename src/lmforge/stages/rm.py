"""Reward model: a Transformer with a scalar head, trained on ranked, scored or pairwise human feedback.

Scores are read at the last real token for a decoder backbone and at the first token (or the mean) for an
encoder (lmforge.scoring). After training, a normalisation (mean, std) is stored in the checkpoint's metadata
and applied by every consumer (`RewardScorer`).

Data (the seed's formats, JSONL or one JSON array):
    ranked    {"input": ..., "choices": [{"text": ..., "rank": 1}, ...]}   K >= 2, rank 1 = best, ties allowed
    pairwise  {"prompt" or "input": ..., "chosen": ..., "rejected": ...}
    scored    {"input": ..., "output": ..., "score": 4.5}
Training follows InstructGPT (Ouyang et al. 2022, sec. 3.5): the C(K,2) comparisons of one prompt form one
batch element (one forward pass per response), the RM starts from the SFT model, one epoch, and a bias is set
afterwards so that reference demonstrations score mean 0. With lora.rank > 0 only adapters and the score head
train; the checkpoint is a plain model with the adapters merged.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from lmforge.checkpoint import (
    estimate_bytes,
    load_model,
    read_config,
    resolve_checkpoint,
    save_checkpoint,
)
from lmforge.cli import Command, Flag
from lmforge.config import to_dict
from lmforge.errors import ConfigError, LmforgeError
from lmforge.records import write_jsonl_atomic
from lmforge.rundir import RunDir, check_output_file
from lmforge.stage import Stage, StageContext
from lmforge.generation import left_pad
from lmforge.lora import (LoraConfig, apply_lora, check_resume_rank, load_trainable_state_dict, merged_copy,
                          trainable_state_dict)
from lmforge.model import Transformer
from lmforge.preferences import (
    Example,
    best_responses,
    comparison_pairs,
    data_kind,
    kendall_tau,
    load_data,
    split_by_prompt,
)
from lmforge.scoring import RewardScorer, disable_dropout, normalize, raw_scores, score_sequences
from lmforge.tokenizer import Tokenizer, check_same_tokenizer
from lmforge.distributed import init_distributed
from lmforge.training import (
    LoopHooks,
    MetricsLogger,
    OptimConfig,
    logged,
    pick_device,
    seed_everything,
    step_generator,
    train_loop,
)

# ----------------------------------------------------------------------------------------------- losses, metrics


def labels_of(examples: list[Example]) -> dict:
    """Labels of examples whose responses lie one after another in a flat batch: (better, worse) index pairs with
    the example each belongs to, and regression targets."""
    pairs, group, targets, k = [], [], [], 0
    for g, ex in enumerate(examples):
        if ex.ranks is not None:
            for b, w in comparison_pairs(ex.ranks):
                pairs.append((k + b, k + w))
                group.append(g)
        if ex.score is not None:
            targets.append(ex.score)
        k += len(ex.responses)
    return {"pairs": torch.tensor(pairs, dtype=torch.long).view(-1, 2), "pair_group": torch.tensor(group, dtype=torch.long),
            "targets": torch.tensor(targets, dtype=torch.float32), "n_groups": len(examples)}


def reward_loss(rewards: torch.Tensor, labels: dict, loss: str = "logsigmoid", margin: float = 0.0,
                center_coef: float = 0.0, target_mean: float = 0.0, target_std: float = 1.0) -> torch.Tensor:
    """Loss of one batch of rewards (N,).

    Ranking: each prompt's comparisons are ONE element, weighted 1/C(K,2), and the batch averages prompts:
    InstructGPT's `-1/C(K,2) E[log sigmoid(r(x,y_w) - r(x,y_l))]`; treating pairs as independent samples
    overfits (each response would be seen K-1 times per epoch). Regression ("mse"): MSE against the targets
    standardised with (target_mean, target_std). Optional centering `coef * mean(r^2)` keeps rewards near 0.
    Per comparison, with d = r_better - r_worse: -log sigmoid(d - margin), or hinge max(0, margin - d).
    """
    if loss == "mse":
        out = F.mse_loss(rewards, (labels["targets"] - target_mean) / target_std)
    else:
        pairs, group = labels["pairs"], labels["pair_group"]
        d = rewards[pairs[:, 0]] - rewards[pairs[:, 1]]
        per_pair = F.relu(margin - d) if loss == "hinge" else -F.logsigmoid(d - margin)
        n_pairs = torch.bincount(group, minlength=labels["n_groups"]).to(per_pair.dtype)
        out = (per_pair / n_pairs[group]).sum() / labels["n_groups"]
    if center_coef:
        out = out + center_coef * rewards.pow(2).mean()
    return out


def evaluate(model: Transformer, examples: list[Example], meta: dict, pad_id: int, batch_size: int = 32) -> tuple[torch.Tensor, dict]:
    """Normalised rewards of every response (flat, in order) and the metrics the labels allow.

    Preference data: pairwise accuracy (ties count as wrong), mean margin r_better - r_worse, Kendall tau-b of
    rewards against ranks averaged over prompts. Scored data: MSE and Pearson r of the prediction mapped back
    to score units. Always: mean and std of the rewards.
    """
    raw = score_sequences(model, [ids for ex in examples for ids in ex.ids], pad_id, meta.get("pooling", "last"), batch_size)
    rewards = normalize(raw, meta)
    metrics = {"reward_mean": rewards.mean().item(), "reward_std": rewards.std(unbiased=False).item()}
    kinds = {ex.kind for ex in examples}
    if kinds == {"preference"}:
        labels = labels_of(examples)
        diff = rewards[labels["pairs"][:, 0]] - rewards[labels["pairs"][:, 1]]
        taus, k = [], 0
        for ex in examples:
            tau = kendall_tau(rewards[k:k + len(ex.ids)].tolist(), [-r for r in ex.ranks])
            taus += [] if math.isnan(tau) else [tau]
            k += len(ex.ids)
        metrics.update(accuracy=(diff > 0).float().mean().item(), mean_margin=diff.mean().item(),
                       kendall_tau=sum(taus) / max(1, len(taus)))
    elif kinds == {"scored"}:
        pred = raw * meta.get("target_std", 1.0) + meta.get("target_mean", 0.0)
        target = torch.tensor([ex.score for ex in examples])
        pc, tc = pred - pred.mean(), target - target.mean()
        denom = math.sqrt(pc.pow(2).sum().item() * tc.pow(2).sum().item())
        metrics.update(mse=(pred - target).pow(2).mean().item(), pearson=(pc * tc).sum().item() / denom if denom else float("nan"))
    return rewards, metrics


# ----------------------------------------------------------------------------------------------- training


@dataclass
class RMConfig:
    """`lmforge rm`: train a reward model. optim.max_steps is derived from epochs and the data size."""
    init: str = ""                    # SFT checkpoint (decoder) or MLM-pretrained checkpoint (encoder)
    data: str = ""                    # ranked, pairwise or scored records (JSONL or a JSON array)
    val_data: str = ""                # held-out records; default: val_fraction of the prompts of `data`
    val_fraction: float = 0.1
    reference_data: str = ""          # responses to centre at 0 (e.g. the SFT data); default: the best of `data`
    reference_limit: int = 0          # centre on a fixed-seed sample of at most this many references (0 = all)
    out: str = "runs/rm"
    loss: Literal["auto", "logsigmoid", "hinge", "mse"] = "auto"   # auto: logsigmoid (ranked), mse (scored)
    margin: float = 0.0               # r_better - r_worse must exceed it (logsigmoid shift, hinge margin)
    center_coef: float = 0.0          # coef * mean(r^2); 0.01 is a common choice
    standardize_targets: bool = True  # regression: fit (score - mean) / std of the training scores
    pooling: Literal["auto", "last", "first", "mean"] = "auto"     # auto: last (decoder), first (encoder)
    normalize: Literal["mean", "mean_std", "none"] = "mean"        # after training, on the reference responses
    epochs: float = 1.0               # one epoch by default: reward models overfit fast (InstructGPT)
    batch_size: int = 8               # prompts per micro-batch (each with all of its K responses)
    eval_batch_size: int = 32
    eval_every: int = 0
    save_every: int = 0
    log_every: int = 10
    stop_step: int = 0                # stop (with a checkpoint) after this step; --resume continues
    skip_invalid: bool = False        # skip and count invalid records instead of stopping at the first one
    seed: int = 0
    device: str = "auto"
    overwrite: bool = False           # start over in an `out` that already holds a run
    gradient_checkpointing: bool = False  # recompute block activations in backward: less memory, more compute
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-5, weight_decay=0.0, warmup_steps=10))
    # lora.rank > 0: train adapters and the (new) score head only; the checkpoint holds the merged weights
    lora: LoraConfig = field(default_factory=LoraConfig)

    def validate(self) -> None:
        for key in ("init", "data"):
            if not getattr(self, key):
                raise ConfigError(key, "is required")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError("val_fraction", "must be in [0, 1)")
        for key in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, key) <= 0:
                raise ConfigError(key, "must be positive")
        for key in ("margin", "center_coef", "reference_limit"):
            if getattr(self, key) < 0:
                raise ConfigError(key, "must be >= 0")
        if self.loss == "hinge" and self.margin <= 0:
            raise ConfigError("margin", "must be > 0 with loss=hinge")
        if self.stop_step < 0:
            raise ConfigError("stop_step", "must be >= 0")
        self.lora.validate_as("lora")
        if self.lora.rank and self.lora.dropout:  # as for the backbone's dropout (disable_dropout)
            raise ConfigError("lora.dropout", "must be 0: a reward model trains with dropout off, so that it "
                                              "scores the same in training and in use")


@dataclass
class RMData:
    """Everything run_rm reads, checked before anything is written."""
    tok: Tokenizer
    encoder: bool                     # an MLM-pretrained (bidirectional) backbone
    pooling: str
    kind: str                         # "preference" or "scored"
    loss: str
    train: list[Example]
    val: list[Example]
    references: list[list[int]]       # token ids of the responses that normalisation centres at 0
    skipped: int


def load_rm_data(cfg: RMConfig) -> RMData:
    """Read the init checkpoint's tokenizer and every data file; errors name the key or file:line."""
    init_cfg = read_config(cfg.init)
    tok = Tokenizer.load(resolve_checkpoint(cfg.init))
    check_same_tokenizer(init_cfg.get("lmforge", {}).get("tokenizer_fingerprint"), tok.fingerprint(),
                         f"the model in config key 'init' ({cfg.init})", "its tokenizer.json")
    encoder = not init_cfg.get("is_causal", True)
    pooling = cfg.pooling if cfg.pooling != "auto" else ("first" if encoder else "last")
    if not encoder and pooling != "last":
        raise LmforgeError(f"config key 'pooling': a decoder reward model reads the last token, got {pooling!r}")
    load = functools.partial(load_data, tok=tok, encoder=encoder, max_len=init_cfg["max_position_embeddings"],
                             skip_invalid=cfg.skip_invalid)
    train, skipped = load(cfg.data)
    kind = data_kind(train)
    if cfg.val_data:
        val, n = load(cfg.val_data)
        skipped += n
        if data_kind(val) != kind:
            raise LmforgeError(f"{cfg.val_data}: {data_kind(val)} records, but the training data is {kind}")
    else:
        train, val = split_by_prompt(train, cfg.val_fraction, cfg.seed)
    if not train:
        n = len({json.dumps(ex.prompt, sort_keys=True) for ex in val})
        raise LmforgeError(f"{cfg.data}: no training records left after holding out val_fraction={cfg.val_fraction}: "
                           f"the data has {n} distinct prompt(s) and held-out prompts keep all their records; add "
                           "prompts, set val_fraction=0 (no held-out accuracy), or give held-out records in val_data")
    if cfg.reference_data:
        refs, n = load(cfg.reference_data, require_labels=False)
        skipped, references = skipped + n, best_responses(refs)
    else:
        references = best_responses(train)
    if cfg.reference_limit and len(references) > cfg.reference_limit:  # a fixed-seed sample, in file order
        keep = sorted(random.Random(cfg.seed).sample(range(len(references)), cfg.reference_limit))
        references = [references[i] for i in keep]
    if cfg.normalize == "mean_std" and len(references) < 2:
        raise LmforgeError("config key 'normalize': mean_std needs at least 2 reference responses")
    loss = cfg.loss if cfg.loss != "auto" else ("mse" if kind == "scored" else "logsigmoid")
    if (loss == "mse") != (kind == "scored"):
        raise LmforgeError(f"config key 'loss': {loss} does not fit {kind} data ({cfg.data})")
    return RMData(tok, encoder, pooling, kind, loss, train, val, references, skipped)


def _check_resume(out: Path, cfg: RMConfig) -> None:
    """Refuse to resume with another LoRA rank, or (with LoRA: the frozen base comes from it) another init."""
    meta = read_config(out).get("lmforge", {})
    check_resume_rank(out, meta, "lora", cfg.lora.rank)
    if cfg.lora.rank and meta.get("init") != cfg.init:
        raise LmforgeError(f"{out}: cannot resume: config key 'init' differs (checkpoint {meta.get('init')}); "
                           "with LoRA the frozen base weights come from it")


class RMBatches:
    """Micro-batches of whole prompts (all K responses of each, left-padded): a pure function of
    (step, micro) (micro counts the step's grad_accum micro-batches over all processes), each epoch a seeded permutation, so --resume continues exactly."""

    def __init__(self, train: list[Example], batch_size: int, grad_accum: int, pad: int, seed: int, device):
        self.train, self.batch_size, self.grad_accum = train, batch_size, grad_accum
        self.pad, self.seed, self.device = pad, seed, device

    @functools.lru_cache(maxsize=2)
    def permutation(self, epoch: int) -> list[int]:
        return torch.randperm(len(self.train), generator=step_generator(self.seed, epoch)).tolist()

    def __call__(self, step: int, micro: int, d) -> tuple:
        n = len(self.train)
        start = (step * self.grad_accum + micro) * self.batch_size
        exs = [self.train[self.permutation(p // n)[p % n]] for p in range(start, start + self.batch_size)]
        ids, mask = left_pad([s for ex in exs for s in ex.ids], self.pad, self.device)
        labels = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in labels_of(exs).items()}
        return ids, mask, labels


def run_rm(cfg: RMConfig, resume: bool = False) -> dict:
    """Train a reward model; returns held-out metrics (heldout_accuracy, mean_margin, kendall_tau or mse,
    pearson), the normalisation (reward_mean, reward_std), val_reward_mean/std and seconds."""
    t0 = time.perf_counter()
    cfg.validate()
    data = load_rm_data(cfg)  # everything that can fail on the user's input, before anything is written
    out = Path(cfg.out)
    dist_info = init_distributed()
    rundir = RunDir(out, "rm", resume, cfg.overwrite, inputs={"init": cfg.init}, is_main=dist_info.is_main)
    state = rundir.check()
    if state is not None:
        _check_resume(out, cfg)

    device = pick_device(cfg.device)
    seed_everything(cfg.seed)
    train, val, pad = data.train, data.val, data.tok.special.pad
    steps = math.ceil(cfg.epochs * len(train) / (cfg.batch_size * cfg.optim.grad_accum))
    optim = dataclasses.replace(cfg.optim, max_steps=steps)
    # Full fine-tuning resumes from the saved weights. With LoRA the checkpoint is merged, so the frozen base
    # comes from init again and the adapters and score head from the training state.
    weights = out if state is not None and not cfg.lora.rank else cfg.init
    model, _, _ = load_model(weights, head="scalar", device=device)
    disable_dropout(model)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    if cfg.lora.rank:
        apply_lora(model, cfg.lora, keep_trainable=("score.",))
        if state is not None:
            load_trainable_state_dict(model, state["trainable"])
    meta = {"stage": "rm", "backbone": "encoder" if data.encoder else "decoder", "pooling": data.pooling,
            "loss": data.loss, "init": cfg.init, "lora_rank": cfg.lora.rank}
    if data.kind == "scored":
        scores = torch.tensor([ex.score for ex in train])
        std = scores.std(unbiased=False).item() if cfg.standardize_targets else 1.0
        meta.update(target_mean=scores.mean().item() if cfg.standardize_targets else 0.0, target_std=std if std > 0 else 1.0)
    batch_loss = functools.partial(reward_loss, loss=data.loss, margin=cfg.margin,
                                   target_mean=meta.get("target_mean", 0.0), target_std=meta.get("target_std", 1.0))

    def loss_fn(m, batch):
        ids, mask, labels = batch
        r = raw_scores(m, ids, mask, data.pooling)
        value = batch_loss(r, labels, center_coef=cfg.center_coef)
        metrics = {"reward_abs": r.abs().mean().item()}
        if data.kind == "preference":
            diff = (r[labels["pairs"][:, 0]] - r[labels["pairs"][:, 1]]).detach()
            metrics.update(accuracy=(diff > 0).float().mean().item(), margin=diff.mean().item())
        return value, metrics, int(mask.sum())

    def eval_hook(m, step):
        if step == optim.max_steps or not val:
            return {}  # the final evaluation runs after normalisation
        r, metrics = evaluate(m, val, meta, pad, cfg.eval_batch_size)
        return {"val_loss": batch_loss(r, labels_of(val)).item(), **{f"val_{k}": v for k, v in metrics.items()}}

    final_state = {}

    def save(m, state, final):
        if cfg.lora.rank:  # a plain merged model; the training state keeps what resume trains on
            state = {**state, "trainable": trainable_state_dict(m)}
        if final:  # written below with the normalisation; its state lets --resume finish a run killed before run.json
            final_state.update(state)
            return
        save_checkpoint(out, merged_copy(m) if cfg.lora.rank else m, data.tok, {**meta, "step": state["step"]}, state)

    mean_len = sum(len(s) for ex in train for s in ex.ids) / sum(len(ex.ids) for ex in train)
    hooks = LoopHooks(RMBatches(train, cfg.batch_size, optim.grad_accum, pad, cfg.seed, device), loss_fn, save, eval_hook)
    with rundir.active(int(state["step"]) if state else 0, checkpoint_bytes=estimate_bytes(model)):
        logger = MetricsLogger(out, enabled=dist_info.is_main)
        history = train_loop(model, optim, hooks, out, device, resume_state=state, eval_every=cfg.eval_every,
                             save_every=cfg.save_every, log_every=cfg.log_every, logger=logger, dist_info=dist_info,
                             flops_per_token=model.flops_per_token(int(mean_len)), desc="rm", stop_step=cfg.stop_step)
        if not dist_info.is_main:
            return {}
        done = history[-1]["step"] if history else int(state["step"]) if state else 0
        if done < steps:  # stopped early: keep the resumable checkpoint; normalisation waits for the end
            summary = {"stopped_at": done, "steps": steps, "seconds": time.perf_counter() - t0}
            rundir.finish(summary, to_dict(cfg))
            return summary
        if cfg.lora.rank:  # from here on the plain merged model, exactly what every consumer will load
            model = merged_copy(model, device)
        # InstructGPT: "a bias so that the labeler demonstrations achieve a mean score of 0" before RL.
        ref_raw = score_sequences(model, data.references, pad, data.pooling, cfg.eval_batch_size)
        if cfg.normalize != "none":
            meta["reward_mean"] = ref_raw.mean().item()
            meta["reward_std"] = max(ref_raw.std(unbiased=False).item(), 1e-6) if cfg.normalize == "mean_std" else 1.0
        save_checkpoint(out, model, data.tok, {**meta, "step": steps, "reference_count": len(data.references)},
                        final_state or state)
    m = evaluate(model, val, meta, pad, cfg.eval_batch_size)[1] if val else {}
    if data.kind == "preference":
        summary = {"heldout_accuracy": m.get("accuracy"), "mean_margin": m.get("mean_margin"), "kendall_tau": m.get("kendall_tau")}
    else:
        summary = {"mse": m.get("mse"), "pearson": m.get("pearson")}
    summary.update(reward_mean=meta.get("reward_mean", 0.0), reward_std=meta.get("reward_std", 1.0),
                   val_reward_mean=m.get("reward_mean"), val_reward_std=m.get("reward_std"), train_examples=len(train),
                   val_examples=len(val), skipped=data.skipped, steps=steps, seconds=time.perf_counter() - t0)
    if not logged(out, steps, {k: v for k, v in summary.items() if k != "seconds"}):
        logger.log(steps, summary)
    rundir.finish(summary, to_dict(cfg))
    return summary


# ----------------------------------------------------------------------------------------------- CLI


def _with_rewards(rec: dict, rewards: list[float]) -> dict:
    """The source record with its rewards: per choice, chosen_reward / rejected_reward, or `reward`."""
    if "choices" in rec:
        return {**rec, "choices": [{**c, "reward": r} for c, r in zip(rec["choices"], rewards)]}
    if "chosen" in rec or "rejected" in rec:
        return {**rec, "chosen_reward": rewards[0], "rejected_reward": rewards[1]}
    return {**rec, "reward": rewards[0]}


@dataclass
class RMScoreConfig:
    """`lmforge rm score`: add normalised rewards to every record of a file."""
    model: str = ""                   # reward model checkpoint directory
    input: str = ""                   # ranked, pairwise, scored, {input, output} or SFT records
    out: str = ""                     # output JSONL (empty: stdout)
    batch_size: int = 32
    device: str = "auto"
    skip_invalid: bool = False        # skip and count invalid records instead of stopping

    def validate(self) -> None:
        for key in ("model", "input"):
            if not getattr(self, key):
                raise ConfigError(key, "is required")
        if self.batch_size <= 0:
            raise ConfigError("batch_size", "must be positive")


def score_records(cfg: RMScoreConfig) -> None:
    """Write every record of cfg.input with its rewards (JSONL, atomically, or to stdout); metrics on stderr."""
    if cfg.out:
        check_output_file(cfg.out)
    rm = RewardScorer.load(cfg.model, pick_device(cfg.device))
    examples, skipped = load_data(cfg.input, rm.tokenizer, rm.encoder, rm.model.config.max_position_embeddings,
                                  require_labels=False, skip_invalid=cfg.skip_invalid)
    rewards, metrics = evaluate(rm.model, examples, rm.meta, rm.tokenizer.special.pad, cfg.batch_size)
    records, k = [], 0
    for ex in examples:
        records.append(_with_rewards(ex.record, rewards[k:k + len(ex.ids)].tolist()))
        k += len(ex.ids)
    if cfg.out:
        write_jsonl_atomic(cfg.out, records)
    else:
        sys.stdout.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
    print(f"scored {len(examples)} records ({len(rewards)} responses{f', {skipped} skipped' if skipped else ''}): {shown}",
          file=sys.stderr)


def _print_summary(cfg: RMConfig, resume: bool) -> None:
    s = run_rm(cfg, resume=resume)
    if not s:
        return
    if "stopped_at" in s:
        print(f"reward model: stopped after step {s['stopped_at']} of {s['steps']} ({s['seconds']:.1f}s); "
              f"continue with --resume -> {cfg.out}")
        return
    shown = ", ".join(f"{k} {s[k]:.4f}" for k in ("heldout_accuracy", "mean_margin", "kendall_tau", "mse", "pearson")
                      if s.get(k) is not None)
    print(f"reward model: {shown or 'no held-out data'}; reward_mean {s['reward_mean']:.4f}, reward_std "
          f"{s['reward_std']:.4f}; {s['train_examples']} prompts, {s['steps']} steps, {s['seconds']:.1f}s -> {cfg.out}")


COMMAND = Command(
    "lmforge rm train", "Train a reward model on ranked, pairwise or scored records (`lmforge rm score` scores "
    "records with a trained one; `lmforge rm --config ...` means `rm train`).", RMConfig, _print_summary, resume=True,
    flags=(Flag("--init", "init", "SFT (decoder) or MLM-pretrained (encoder) checkpoint"),
           Flag("--data", "data", "ranked, pairwise or scored records"), Flag("--out", "out", "output directory"),
           Flag("--skip-invalid", "skip_invalid", "skip and count invalid records instead of stopping")),
    examples=("lmforge rm --config configs/rm_tiny.yaml",
              "lmforge rm train --config configs/rm_tiny.yaml loss=hinge margin=1.0 optim.lr=1e-4",
              "lmforge rm --config configs/rm_tiny.yaml normalize=mean_std out=runs/rm_std"))

SCORE_COMMAND = Command(
    "lmforge rm score", "Score records with a trained reward model (ranked, pairwise, scored, {input, output} or "
    "SFT records) and write them as JSONL with rewards.", RMScoreConfig, score_records,
    flags=(Flag("--model", "model", "reward model checkpoint directory"),
           Flag("--input", "input", "records to score (JSONL or a JSON array)"),
           Flag("--out", "out", "output JSONL (default: stdout)"),
           Flag("--skip-invalid", "skip_invalid", "skip and count invalid records")),
    examples=("lmforge rm score --model runs/lmforge-tiny/rm --input runs/lmforge-tiny/label/ranked.jsonl --out scored.jsonl",))


def _wire(ctx: StageContext) -> dict:
    return {"init": ctx.artifact("sft_model"), "data": ctx.artifact("preferences"),
            "reference_data": ctx.artifact("sft_data"), "out": ctx.dir("rm"), "device": ctx.device, "overwrite": True}


STAGE = Stage("rm", RMConfig, lambda ctx, cfg: run_rm(cfg), inputs=("sft_model", "preferences", "sft_data"),
              outputs={"reward_model": ""}, wire=_wire, command="rm train")
