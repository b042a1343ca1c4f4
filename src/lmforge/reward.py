"""Reward model: a Transformer with a scalar head, trained on ranked, scored or pairwise human feedback.

Scores are read at the last real token (the closing <|end|> of the response) for a decoder backbone, whatever
the padding side; an encoder backbone reads the first token or the mean over real tokens. After training, a
normalisation (mean, std) is stored in the checkpoint's metadata and applied by every consumer.

Data (the seed's formats, JSONL or one JSON array):
    ranked    {"input": ..., "choices": [{"text": ..., "rank": 1}, ...]}   K >= 2, rank 1 = best, ties allowed
    pairwise  {"prompt" or "input": ..., "chosen": ..., "rejected": ...}
    scored    {"input": ..., "output": ..., "score": 4.5}
Training follows InstructGPT (Ouyang et al. 2022, sec. 3.5): the C(K,2) comparisons of one prompt form one
batch element (one forward pass per response), the RM starts from the SFT model, one epoch, and a bias is set
afterwards so that reference demonstrations score mean 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from lmforge.checkpoint import (
    load_model,
    load_training_state,
    read_config,
    resolve_checkpoint,
    save_checkpoint,
)
from lmforge.errors import LmforgeError
from lmforge.generation import left_pad
from lmforge.model import Transformer, last_token_index
from lmforge.rm_data import (  # noqa: F401
    Example,
    best_responses,
    comparison_pairs,
    data_kind,
    load_data,
    parse_record,
    read_records,
    render_example,
    split_by_prompt,
)
from lmforge.tokenizer import Tokenizer
from lmforge.training import (
    LoopHooks,
    MetricsLogger,
    OptimConfig,
    autocast,
    init_distributed,
    pick_device,
    seed_everything,
    step_generator,
    train_loop,
)

# ----------------------------------------------------------------------------------------------- scoring


def pool_scores(values: torch.Tensor, attention_mask: torch.Tensor, pooling: str = "last") -> torch.Tensor:
    """(B, T) per-position head outputs -> (B,) scores: at the last real token, the first token, or the mean."""
    if pooling == "last":
        idx = last_token_index(attention_mask)
        return values[torch.arange(values.shape[0], device=values.device), idx]
    if pooling == "first":
        first = attention_mask.long().argmax(dim=1)  # first real token (left padding aware)
        return values[torch.arange(values.shape[0], device=values.device), first]
    if pooling == "mean":
        m = attention_mask.to(values.dtype)
        return (values * m).sum(1) / m.sum(1).clamp(min=1)
    raise ValueError(f"unknown pooling {pooling!r}")


def raw_scores(model: Transformer, input_ids: torch.Tensor, attention_mask: torch.Tensor, pooling: str = "last") -> torch.Tensor:
    """Un-normalised reward of each row (B,)."""
    values = model(input_ids, attention_mask=attention_mask)
    return pool_scores(values.float(), attention_mask, pooling)


def normalize(raw: torch.Tensor, meta: dict) -> torch.Tensor:
    """Apply the checkpoint's reward normalisation: (raw - reward_mean) / reward_std (identity if absent)."""
    return (raw - float(meta.get("reward_mean", 0.0))) / float(meta.get("reward_std", 1.0))


@torch.no_grad()
def score_sequences(model: Transformer, seqs: list[list[int]], pad_id: int, pooling: str = "last",
                    batch_size: int = 32) -> torch.Tensor:
    """Raw rewards (N,) of token sequences, in input order; batched by length so there is little padding."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = torch.empty(len(seqs))
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        ids, mask = left_pad([seqs[i] for i in idx], pad_id, device)
        with autocast(device):
            out[idx] = raw_scores(model, ids, mask, pooling).float().cpu()
    model.train(was_training)
    return out


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off: it makes rewards noisy, and an RM must score identically in training and in use (N+ details)."""
    model.config.dropout = 0.0
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


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


def kendall_tau(x: list[float], y: list[float]) -> float:
    """Kendall's tau-b between two score lists (ties allowed), by brute force over pairs; nan if one is constant."""
    s = nx = ny = 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            dx, dy = (x[i] > x[j]) - (x[i] < x[j]), (y[i] > y[j]) - (y[i] < y[j])
            s, nx, ny = s + dx * dy, nx + (dx != 0), ny + (dy != 0)
    return s / math.sqrt(nx * ny) if nx and ny else float("nan")


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


# ----------------------------------------------------------------------------------------------- consumer API


class RewardScorer:
    """A trained reward model ready to score, with the layout, pooling and normalisation it was trained with.

    >>> rm = RewardScorer.load("runs/rm")
    >>> rm.score(["What is 2+2?"], ["4."])          # normalised rewards, one per (prompt, response)
    """

    def __init__(self, model: Transformer, tokenizer, meta: dict):
        self.model, self.tokenizer, self.meta = model.eval(), tokenizer, meta
        self.encoder = meta.get("backbone") == "encoder"
        self.pooling = meta.get("pooling", "last")

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "RewardScorer":
        """Load a checkpoint written by `lmforge rm`."""
        model, tok, meta = load_model(path, head="scalar", device=device)
        if meta.get("stage") != "rm":
            raise LmforgeError(f"{path}: not a reward model checkpoint (stage {meta.get('stage')!r}); train one with `lmforge rm`")
        disable_dropout(model)
        return cls(model, tok, meta)

    def encode(self, prompt: str, response: str) -> list[int]:
        """Token ids of (prompt as the user turn, response) exactly as in training."""
        return render_example(self.tokenizer, [{"role": "user", "content": prompt}], response, self.encoder)

    def score(self, prompts: list[str], responses: list[str], batch_size: int = 32) -> list[float]:
        """Normalised rewards of (prompt, response) pairs."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        seqs, limit = [self.encode(p, r) for p, r in zip(prompts, responses)], self.model.config.max_position_embeddings
        for i, s in enumerate(seqs):
            if len(s) > limit:
                raise LmforgeError(f"response {i}: {len(s)} tokens exceed the reward model's context of {limit}")
        raw = score_sequences(self.model, seqs, self.tokenizer.special.pad, self.pooling, batch_size)
        return normalize(raw, self.meta).tolist()

    @torch.no_grad()
    def score_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Normalised rewards (B,) of chat-template token ids (left or right padded), read at each row's last
        real token. For PPO: the rows should end with the response's <|end|>. Decoder reward models only."""
        if self.encoder:
            raise LmforgeError("score_ids needs a decoder reward model (this one is an encoder: use score())")
        with autocast(input_ids.device):
            raw = raw_scores(self.model, input_ids, attention_mask, "last")
        return normalize(raw.float(), self.meta)


# ----------------------------------------------------------------------------------------------- training


@dataclass
class RMConfig:
    """`lmforge rm`: train a reward model. optim.max_steps is derived from epochs and the data size."""
    init: str = ""                    # SFT checkpoint (decoder) or MLM-pretrained checkpoint (encoder)
    data: str = ""                    # ranked, pairwise or scored records (JSONL or a JSON array)
    val_data: str = ""                # held-out records; default: val_fraction of the prompts of `data`
    val_fraction: float = 0.1
    reference_data: str = ""          # responses to centre at 0 (e.g. the SFT data); default: the best of `data`
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
    skip_invalid: bool = False
    seed: int = 0
    device: str = "auto"
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-5, weight_decay=0.0, warmup_steps=10))

    def validate(self) -> None:
        for key in ("init", "data"):
            if not getattr(self, key):
                raise LmforgeError(f"config key '{key}' is required")
        if not 0 <= self.val_fraction < 1:
            raise LmforgeError("config key 'val_fraction' must be in [0, 1)")
        if self.epochs <= 0 or self.batch_size <= 0 or self.eval_batch_size <= 0:
            raise LmforgeError("config keys 'epochs', 'batch_size' and 'eval_batch_size' must be positive")
        if self.margin < 0 or self.center_coef < 0:
            raise LmforgeError("config keys 'margin' and 'center_coef' must be >= 0")
        if self.loss == "hinge" and self.margin <= 0:
            raise LmforgeError("config key 'margin' must be > 0 with loss=hinge")
        self.optim.validate()


def run_rm(cfg: RMConfig, resume: bool = False) -> dict:
    """Train a reward model; returns held-out metrics (heldout_accuracy, mean_margin, kendall_tau or mse,
    pearson), the normalisation (reward_mean, reward_std), val_reward_mean/std and seconds."""
    t0 = time.perf_counter()
    cfg.validate()
    # Everything that can fail on the user's input happens before the output directory exists.
    init_cfg = read_config(cfg.init)
    tok = Tokenizer.load(resolve_checkpoint(cfg.init))
    if tok.fingerprint() != init_cfg.get("lmforge", {}).get("tokenizer_fingerprint", tok.fingerprint()):
        raise LmforgeError(f"{cfg.init}: tokenizer.json does not match the fingerprint in config.json")
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
        raise LmforgeError(f"{cfg.data}: no training records left after holding out val_fraction={cfg.val_fraction}")
    if cfg.reference_data:
        refs, n = load(cfg.reference_data, require_labels=False)
        skipped, references = skipped + n, best_responses(refs)
    else:
        references = best_responses(train)
    if cfg.normalize == "mean_std" and len(references) < 2:
        raise LmforgeError("config key 'normalize': mean_std needs at least 2 reference responses")
    loss = cfg.loss if cfg.loss != "auto" else ("mse" if kind == "scored" else "logsigmoid")
    if (loss == "mse") != (kind == "scored"):
        raise LmforgeError(f"config key 'loss': {loss} does not fit {kind} data ({cfg.data})")
    out = Path(cfg.out)
    state = load_training_state(out) if resume else None
    if resume and state is None:
        raise LmforgeError(f"{out}: no training state to resume from")

    dist_info = init_distributed()
    device = pick_device(cfg.device)
    seed_everything(cfg.seed)
    steps = math.ceil(cfg.epochs * len(train) / (cfg.batch_size * cfg.optim.grad_accum * dist_info.world_size))
    optim = dataclasses.replace(cfg.optim, max_steps=steps)
    model, _, _ = load_model(out if resume else cfg.init, head="scalar", device=device)
    disable_dropout(model)
    meta = {"stage": "rm", "backbone": "encoder" if encoder else "decoder", "pooling": pooling, "loss": loss, "init": cfg.init}
    if kind == "scored":
        scores = torch.tensor([ex.score for ex in train])
        std = scores.std(unbiased=False).item() if cfg.standardize_targets else 1.0
        meta.update(target_mean=scores.mean().item() if cfg.standardize_targets else 0.0, target_std=std if std > 0 else 1.0)
    batch_loss = functools.partial(reward_loss, loss=loss, margin=cfg.margin, target_mean=meta.get("target_mean", 0.0),
                                   target_std=meta.get("target_std", 1.0))
    if dist_info.is_main and not resume:
        (out / "metrics.jsonl").unlink(missing_ok=True)  # a fresh run starts a fresh log
    logger = MetricsLogger(out, enabled=dist_info.is_main)
    pad = tok.special.pad

    @functools.lru_cache(maxsize=2)
    def permutation(epoch: int) -> list[int]:
        return torch.randperm(len(train), generator=step_generator(cfg.seed, epoch)).tolist()

    def micro_batch(step, micro, d):
        # The data position is a function of (step, micro, rank) alone: each epoch is a seeded permutation.
        start = ((step * optim.grad_accum + micro) * d.world_size + d.rank) * cfg.batch_size
        exs = [train[permutation(p // len(train))[p % len(train)]] for p in range(start, start + cfg.batch_size)]
        ids, mask = left_pad([s for ex in exs for s in ex.ids], pad, device)
        labels = {k: v.to(device) if torch.is_tensor(v) else v for k, v in labels_of(exs).items()}
        return ids, mask, labels

    def loss_fn(m, batch):
        ids, mask, labels = batch
        r = raw_scores(m, ids, mask, pooling)
        value = batch_loss(r, labels, center_coef=cfg.center_coef)
        metrics = {"reward_abs": r.abs().mean().item()}
        if kind == "preference":
            diff = (r[labels["pairs"][:, 0]] - r[labels["pairs"][:, 1]]).detach()
            metrics.update(accuracy=(diff > 0).float().mean().item(), margin=diff.mean().item())
        return value, metrics, int(mask.sum())

    def eval_hook(m, step):
        if step == optim.max_steps or not val:
            return {}  # the final evaluation runs after normalisation
        r, metrics = evaluate(m, val, meta, pad, cfg.eval_batch_size)
        return {"val_loss": batch_loss(r, labels_of(val)).item(), **{f"val_{k}": v for k, v in metrics.items()}}

    def save(m, state, final):
        if not final:  # the final checkpoint is written below, once the normalisation is known
            save_checkpoint(out, m, tok, meta, state)

    mean_len = sum(len(s) for ex in train for s in ex.ids) / sum(len(ex.ids) for ex in train)
    train_loop(model, optim, LoopHooks(micro_batch, loss_fn, save, eval_hook), out, device,
               resume_state=state, eval_every=cfg.eval_every, save_every=cfg.save_every, log_every=cfg.log_every,
               flops_per_token=model.flops_per_token(int(mean_len)), logger=logger, dist_info=dist_info, desc="rm")
    if not dist_info.is_main:
        return {}
    # InstructGPT: "a bias so that the labeler demonstrations achieve a mean score of 0" before RL.
    ref_raw = score_sequences(model, references, pad, pooling, cfg.eval_batch_size)
    if cfg.normalize != "none":
        meta["reward_mean"] = ref_raw.mean().item()
        meta["reward_std"] = max(ref_raw.std(unbiased=False).item(), 1e-6) if cfg.normalize == "mean_std" else 1.0
    save_checkpoint(out, model, tok, {**meta, "reference_count": len(references)})
    m = evaluate(model, val, meta, pad, cfg.eval_batch_size)[1] if val else {}
    if kind == "preference":
        summary = {"heldout_accuracy": m.get("accuracy"), "mean_margin": m.get("mean_margin"), "kendall_tau": m.get("kendall_tau")}
    else:
        summary = {"mse": m.get("mse"), "pearson": m.get("pearson")}
    summary.update(reward_mean=meta.get("reward_mean", 0.0), reward_std=meta.get("reward_std", 1.0),
                   val_reward_mean=m.get("reward_mean"), val_reward_std=m.get("reward_std"), train_examples=len(train),
                   val_examples=len(val), skipped=skipped, steps=steps, seconds=time.perf_counter() - t0)
    logger.log(steps, summary)
    return summary


# ----------------------------------------------------------------------------------------------- CLI


def _with_rewards(rec: dict, rewards: list[float]) -> dict:
    """The source record with its rewards: per choice, chosen_reward / rejected_reward, or `reward`."""
    if "choices" in rec:
        return {**rec, "choices": [{**c, "reward": r} for c, r in zip(rec["choices"], rewards)]}
    if "chosen" in rec or "rejected" in rec:
        return {**rec, "chosen_reward": rewards[0], "rejected_reward": rewards[1]}
    return {**rec, "reward": rewards[0]}


def score_cli(argv: list[str]) -> None:
    """`lmforge rm score --model DIR --input FILE [--out FILE]`: add normalised rewards to every record."""
    p = argparse.ArgumentParser(prog="lmforge rm score", description="Score records with a trained reward model "
                                "(ranked, pairwise, scored, {input, output} or SFT records) and write them as JSONL with rewards.")
    p.add_argument("--model", required=True, help="reward model checkpoint directory")
    p.add_argument("--input", required=True, help="records to score (JSONL or a JSON array)")
    p.add_argument("--out", help="output JSONL (default: stdout)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.add_argument("--skip-invalid", action="store_true", help="skip and count invalid records instead of stopping")
    args = p.parse_args(argv)
    rm = RewardScorer.load(args.model, pick_device(args.device))
    examples, skipped = load_data(args.input, rm.tokenizer, rm.encoder, rm.model.config.max_position_embeddings,
                                  require_labels=False, skip_invalid=args.skip_invalid)
    rewards, metrics = evaluate(rm.model, examples, rm.meta, rm.tokenizer.special.pad, args.batch_size)
    lines, k = [], 0
    for ex in examples:
        lines.append(json.dumps(_with_rewards(ex.record, rewards[k:k + len(ex.ids)].tolist()), ensure_ascii=False) + "\n")
        k += len(ex.ids)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(f"{args.out}.tmp")
        tmp.write_text("".join(lines), encoding="utf-8")
        os.replace(tmp, args.out)  # never a half-written output file
    else:
        sys.stdout.writelines(lines)
    shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
    print(f"scored {len(examples)} records ({len(rewards)} responses{f', {skipped} skipped' if skipped else ''}): {shown}",
          file=sys.stderr)


def cli(argv: list[str]) -> None:
    """`lmforge rm --config FILE [key=value ...]` trains; `lmforge rm score ...` scores records."""
    from lmforge.config import load_config, recipe_parser

    if argv and argv[0] == "score":
        return score_cli(argv[1:])
    p = recipe_parser("lmforge rm", "Train a reward model on ranked, pairwise or scored records "
                      "(`lmforge rm score --help` to score records with a trained one).")
    p.add_argument("--skip-invalid", action="store_true", help="skip and count invalid records instead of stopping")
    args = p.parse_args(argv)
    cfg = load_config(RMConfig, args.config, args.overrides + (["skip_invalid=true"] if args.skip_invalid else []))
    s = run_rm(cfg, resume=args.resume)
    if not s:
        return
    shown = ", ".join(f"{k} {s[k]:.4f}" for k in ("heldout_accuracy", "mean_margin", "kendall_tau", "mse", "pearson")
                      if s.get(k) is not None)
    print(f"reward model: {shown or 'no held-out data'}; reward_mean {s['reward_mean']:.4f}, reward_std "
          f"{s['reward_std']:.4f}; {s['train_examples']} prompts, {s['steps']} steps, {s['seconds']:.1f}s -> {cfg.out}")
