"""Direct Preference Optimization: `lmforge dpo --config FILE [key=value ...]`.

DPO (Rafailov et al. 2023, arXiv 2305.18290) trains the policy on preference pairs directly, with no reward model
and no sampling. The policy pi and a frozen reference pi_ref (both start as the SFT model) define an implicit
reward r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)); with the log-ratio margin
m = (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x)) the loss of a pair is

    sigmoid   -(1 - ls) * log sigmoid(beta * m) - ls * log sigmoid(-beta * m)   DPO; ls > 0: conservative DPO (cDPO)
    ipo       (m - 1 / (2 * beta))^2                                            IPO (Azar et al. 2023)
    hinge     max(0, 1 - beta * m)                                              SLiC-HF (Zhao et al. 2023)
    + rpo_alpha * NLL of the chosen response, a per-token mean                  RPO (Pang et al. 2024, arXiv 2404.19733)

(rl_utils.dpo_loss). Data: the reward model's files (lmforge.preferences): ranked records give their C(K,2) pairs
minus ties, pairwise records their pair, scored records pairs by score among the records with the same prompt.
The held-out split is by prompt. By default a micro-batch holds whole prompts (`batch_size` counts prompts) and every
distinct response is forwarded once for all of its pairs: InstructGPT's K-way batching of the reward model applied to
DPO, K - 1 times less compute per epoch for K-way rankings than pairs shuffled one by one (as in the DPO paper and TRL;
`group_by_prompt=false`, `batch_size` then counts pairs). The loss is the mean over the micro-batch's pairs.

Log-probs are sums over the response tokens (the end-of-turn token included) of an fp32 log-softmax. The response
tokens of a rendering (`render_completion`) are those after `render_prompt`, which must be a prefix of it. The
distinct sequences of a micro-batch's pairs go through ONE forward pass (right-padded rows), and the LM head runs only
at the positions that predict response tokens: the vocabulary projection dominates a small model's cost.

The reference log-probs are computed once, before training (one no-grad pass over every train and val pair). They
are kept in memory and in training_state.pt, so --resume neither loads nor runs the reference again (and refuses
data whose pairs differ). Dropout is off, so at step 0 the policy is the reference: margin 0, sigmoid loss log 2,
accuracy 1/2 (a tie counts half). Batches are a pure function of (step, micro), each epoch a seeded permutation,
so --resume continues exactly. With lora.rank > 0 only adapters train, the reference is the frozen base (the SFT
model itself) and the checkpoint holds the merged weights: it loads with load_model(path, head="lm") like any
policy.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from lmforge.chat import render_prompt
from lmforge.checkpoint import estimate_bytes, load_model, read_config, resolve_checkpoint, save_checkpoint
from lmforge.cli import Command, Flag
from lmforge.config import to_dict
from lmforge.errors import ConfigError, LmforgeError
from lmforge.lora import (LoraConfig, apply_lora, check_resume_rank, load_trainable_state_dict, merged_copy,
                          trainable_state_dict)
from lmforge.model import Transformer
from lmforge.packing import pack_batch
from lmforge.preferences import PreferencePair, data_kind, load_data, preference_pairs, split_by_prompt
from lmforge.rl_utils import dpo_loss, logprobs_from_logits
from lmforge.rundir import RunDir
from lmforge.scoring import disable_dropout
from lmforge.stage import Stage, StageContext
from lmforge.tokenizer import Tokenizer, check_same_tokenizer
from lmforge.distributed import init_distributed
from lmforge.training import (
    LoopHooks,
    MetricsLogger,
    OptimConfig,
    autocast,
    pick_device,
    seed_everything,
    step_generator,
    train_loop,
)


@dataclass
class DPOConfig:
    """`lmforge dpo`: train a policy on preference pairs. optim.max_steps is derived from epochs and the data."""
    init: str = ""                    # SFT checkpoint: the policy starts here, and it is the frozen reference
    data: str = ""                    # ranked, pairwise or scored records (the reward model's data)
    val_data: str = ""                # held-out records; default: val_fraction of the prompts of `data`
    val_fraction: float = 0.1
    out: str = "runs/dpo"
    beta: float = 0.1                 # implicit reward scale: larger keeps the policy closer to the reference
    loss: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"   # DPO, IPO (Azar et al.) or SLiC hinge
    label_smoothing: float = 0.0      # cDPO: assumed rate of flipped labels, in [0, 0.5); sigmoid loss only
    rpo_alpha: float = 0.0            # > 0 adds alpha * NLL of the chosen response (RPO; 1.0 in Pang et al.)
    epochs: float = 1.0
    batch_size: int = 8               # prompts (with all their pairs) per micro-batch; pairs if group_by_prompt=false
    group_by_prompt: bool = True      # a prompt's pairs share a micro-batch, each distinct response forwarded once
    eval_batch_size: int = 32         # sequences per chunk of the reference and held-out passes
    eval_every: int = 0               # 0: evaluate on the held-out pairs only at the end
    save_every: int = 0
    log_every: int = 10
    stop_step: int = 0                # stop (with a checkpoint) after this step; --resume continues
    skip_invalid: bool = False        # skip and count invalid records instead of stopping at the first one
    seed: int = 0
    device: str = "auto"
    overwrite: bool = False           # start over in an `out` that already holds a run
    gradient_checkpointing: bool = False  # recompute block activations in backward: less memory, more compute
    # DPO fine-tunes gently (the paper: 1e-6; 5e-6..1e-5 for small models); the tiny run sets ~3e-4 in its config
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-6, weight_decay=0.0, warmup_steps=10))
    # lora.rank > 0: train adapters only; the reference is the frozen base; the checkpoint holds merged weights
    lora: LoraConfig = field(default_factory=LoraConfig)

    def validate(self) -> None:
        for key in ("init", "data", "out"):
            if not getattr(self, key):
                raise ConfigError(key, "is required")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError("val_fraction", "must be in [0, 1)")
        for key in ("beta", "epochs", "batch_size", "eval_batch_size", "log_every"):
            if getattr(self, key) <= 0:
                raise ConfigError(key, "must be positive")
        for key in ("rpo_alpha", "eval_every", "save_every", "stop_step"):
            if getattr(self, key) < 0:
                raise ConfigError(key, "must be >= 0")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError("label_smoothing", "must be in [0, 0.5)")
        if self.label_smoothing and self.loss != "sigmoid":
            raise ConfigError("label_smoothing", f"applies to loss=sigmoid only (loss is {self.loss})")
        self.lora.validate_as("lora")
        if self.lora.rank and self.lora.dropout:
            raise ConfigError("lora.dropout", "must be 0: DPO trains with dropout off, so that the policy starts "
                                              "exactly at the reference")


# ----------------------------------------------------------------------------------------------- pairs, log-probs


@dataclass(frozen=True)
class EncodedPair:
    """A pair's two renderings, where their response tokens start (the prompt rendering's length) and the index
    of its prompt (pairs of one prompt share it)."""
    start: int
    chosen: list[int]
    rejected: list[int]
    group: int = 0


def response_start(prompt_ids: list[int], ids: list[int], origin: str) -> int:
    """Index of the first response token of `ids`: `prompt_ids` must be a prefix of it, followed by at least one
    response token; otherwise the template renders the prompt differently alone, and DPO refuses the data."""
    if ids[:len(prompt_ids)] != prompt_ids or len(ids) <= len(prompt_ids):
        raise LmforgeError(f"{origin}: the chat template's prompt rendering (render_prompt) is not a prefix of the "
                           "prompt + response rendering, so DPO cannot tell which tokens are the response's")
    return len(prompt_ids)


def encode_pairs(tok: Tokenizer, pairs: list[PreferencePair]) -> list[EncodedPair]:
    """Each pair's renderings with their response start (the prompt rendered once per distinct prompt)."""
    out, heads = [], {}
    for p in pairs:
        key = json.dumps(p.prompt, ensure_ascii=False, sort_keys=True)
        if key not in heads:
            heads[key] = render_prompt(tok, p.prompt)
        start = response_start(heads[key], p.chosen_ids, p.origin)
        response_start(heads[key], p.rejected_ids, p.rejected_origin or p.origin)
        out.append(EncodedPair(start, p.chosen_ids, p.rejected_ids, list(heads).index(key)))
    return out


def collate(seqs: list[tuple[list[int], int]], pad_id: int, device=None) -> dict:
    """Right-padded ids and mask of (ids, response start) sequences, with the (row, column) of every response
    token. The mask comes from lengths, never from `ids != pad`."""
    T = max(len(s) for s, _ in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    rows, cols = [], []
    for i, (s, start) in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
        rows += [i] * (len(s) - start)
        cols += range(start, len(s))
    return {"ids": ids.to(device), "mask": mask.to(device), "rows": torch.tensor(rows, device=device),
            "cols": torch.tensor(cols, device=device), "n_rows": len(seqs)}


def token_logprobs(model: Transformer, batch: dict) -> torch.Tensor:
    """fp32 log-prob of every response token (flat, in the order of batch["rows"]): one forward pass for the whole
    batch, on its sequences packed end to end (packing.pack_batch: the padded batch's values without its padding),
    the LM head only at the positions that predict a response token (position t - 1 predicts token t)."""
    rows, cols = batch["rows"], batch["cols"]
    packed = pack_batch(batch["ids"], batch["mask"], getattr(model, "module", model).config.max_position_embeddings)
    logits = model(packed.input_ids, **packed.inputs, head_at=packed.locate(rows, cols - 1))
    return logprobs_from_logits(logits, batch["ids"][rows, cols])


def response_logprobs(model: Transformer, batch: dict) -> torch.Tensor:
    """Summed log-probs (rows,) of each row's response tokens."""
    lp = token_logprobs(model, batch)
    return torch.zeros(batch["n_rows"], dtype=lp.dtype, device=lp.device).index_add(0, batch["rows"], lp)


def pair_batch(pairs: list[EncodedPair], idx: list[int], pad_id: int, device=None) -> dict:
    """The pairs `idx` as one batch of their distinct sequences (a response shared by several pairs is one row),
    with the row of each pair's chosen and rejected response ("chosen", "rejected")."""
    rows: dict[tuple, int] = {}
    seqs, chosen, rejected = [], [], []
    for i in idx:
        p = pairs[i]
        for ids, which in ((p.chosen, chosen), (p.rejected, rejected)):
            key = (p.start, tuple(ids))
            if key not in rows:
                rows[key] = len(seqs)
                seqs.append((ids, p.start))
            which.append(rows[key])
    batch = collate(seqs, pad_id, device)
    batch["chosen"] = torch.tensor(chosen, device=device)
    batch["rejected"] = torch.tensor(rejected, device=device)
    return batch


@torch.no_grad()
def pair_logprobs(model: Transformer, pairs: list[EncodedPair], pad_id: int, batch_size: int = 32) -> torch.Tensor:
    """(N, 2) summed response log-probs [chosen, rejected] of every pair (CPU, fp32), in eval mode, in chunks of
    pairs of similar length. The reference pass and every held-out evaluation run through here with the same
    chunks, so an unchanged policy reproduces the reference exactly."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    index: dict[tuple, int] = {}  # each distinct (start, sequence) once
    for p in pairs:
        for ids in (p.chosen, p.rejected):
            index.setdefault((p.start, tuple(ids)), len(index))
    seqs = list(index)
    sums = torch.zeros(len(seqs))
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][1]))
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        with autocast(device):
            batch = collate([(list(seqs[i][1]), seqs[i][0]) for i in idx], pad_id, device)
            sums[idx] = response_logprobs(model, batch).float().cpu()
    model.train(was_training)
    rows = [[index[(p.start, tuple(p.chosen))], index[(p.start, tuple(p.rejected))]] for p in pairs]
    return sums[torch.tensor(rows, dtype=torch.long).view(-1, 2)]


def pair_stats(policy: torch.Tensor, ref: torch.Tensor, beta: float) -> dict:
    """Metrics of (N, 2) [chosen, rejected] policy and reference log-probs: implicit-reward accuracy (chosen above
    rejected; a tie counts half, so chance and the start are 1/2), mean reward margin, mean rewards, and the mean
    drift logp - logp_ref of chosen and rejected (both falling is DPO's known failure mode: Pal et al. 2024,
    arXiv 2402.13228)."""
    drift = (policy - ref).double()
    m = drift[:, 0] - drift[:, 1]
    return {"accuracy": ((m > 0).double() + 0.5 * (m == 0).double()).mean().item(),
            "margin": beta * m.mean().item(), "reward_chosen": beta * drift[:, 0].mean().item(),
            "reward_rejected": beta * drift[:, 1].mean().item(), "chosen_drift": drift[:, 0].mean().item(),
            "rejected_drift": drift[:, 1].mean().item()}


def evaluate(model: Transformer, pairs: list[EncodedPair], ref: torch.Tensor, cfg: DPOConfig, pad_id: int) -> dict:
    """Preference loss (without the RPO term) and `pair_stats` of `pairs` under `model`."""
    logps = pair_logprobs(model, pairs, pad_id, cfg.eval_batch_size)
    losses, _, _ = dpo_loss(logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], cfg.beta, cfg.loss, cfg.label_smoothing)
    return {"loss": losses.mean().item(), **pair_stats(logps, ref, cfg.beta)}


def batch_units(pairs: list[EncodedPair], group_by_prompt: bool) -> list[list[int]]:
    """What a micro-batch is made of: each prompt's pairs (in order of first appearance), or single pairs."""
    if not group_by_prompt:
        return [[i] for i in range(len(pairs))]
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(pairs):
        groups.setdefault(p.group, []).append(i)
    return list(groups.values())


class DPOBatches:
    """Micro-batches of `batch_size` units (prompts with all their pairs, or single pairs: `batch_units`) with their
    reference log-probs: a pure function of (step, micro), each epoch a seeded permutation of the units, so
    --resume continues exactly."""

    def __init__(self, pairs: list[EncodedPair], ref: torch.Tensor, batch_size: int, grad_accum: int, pad_id: int,
                 seed: int, device, group_by_prompt: bool = True):
        self.pairs, self.ref, self.batch_size, self.grad_accum = pairs, ref, batch_size, grad_accum
        self.pad_id, self.seed, self.device = pad_id, seed, device
        self.units = batch_units(pairs, group_by_prompt)

    @functools.lru_cache(maxsize=2)
    def permutation(self, epoch: int) -> list[int]:
        return torch.randperm(len(self.units), generator=step_generator(self.seed, epoch)).tolist()

    def __call__(self, step: int, micro: int, d=None) -> dict:
        n = len(self.units)
        start = (step * self.grad_accum + micro) * self.batch_size
        idx = [i for u in range(start, start + self.batch_size) for i in self.units[self.permutation(u // n)[u % n]]]
        batch = pair_batch(self.pairs, idx, self.pad_id, self.device)
        batch["ref"] = self.ref[idx].to(self.device)
        return batch


def dpo_batch_loss(model: Transformer, batch: dict, cfg: DPOConfig) -> tuple[torch.Tensor, dict, int]:
    """LoopHooks.loss: the mean preference loss of the batch's pairs (+ rpo_alpha * the chosen tokens' mean NLL)."""
    lp = token_logprobs(model, batch)
    rows, ref = batch["rows"], batch["ref"]
    sums = torch.zeros(batch["n_rows"], dtype=lp.dtype, device=lp.device).index_add(0, rows, lp)
    chosen, rejected = sums[batch["chosen"]], sums[batch["rejected"]]
    losses, _, _ = dpo_loss(chosen, rejected, ref[:, 0], ref[:, 1], cfg.beta, cfg.loss, cfg.label_smoothing)
    loss = losses.mean()
    metrics = pair_stats(torch.stack([chosen, rejected], 1).detach(), ref, cfg.beta)
    if cfg.rpo_alpha:  # a chosen response's tokens weigh as many times as it is chosen: the per-pair objective
        times_chosen = torch.bincount(batch["chosen"], minlength=batch["n_rows"]).to(lp.dtype)
        w = times_chosen[rows]
        nll = -(lp * w).sum() / w.sum()
        loss = loss + cfg.rpo_alpha * nll
        metrics["nll_chosen"] = nll.item()
    return loss, metrics, int(batch["mask"].sum())


# ----------------------------------------------------------------------------------------------- the recipe


@dataclass
class DPOData:
    """Everything run_dpo reads, checked before anything is written."""
    tok: Tokenizer
    train: list[EncodedPair]
    val: list[EncodedPair]
    skipped: int


def load_dpo_data(cfg: DPOConfig) -> DPOData:
    """Read the init checkpoint's tokenizer and the data files into pairs; errors name the key or file:line."""
    init_cfg = read_config(cfg.init)
    meta = init_cfg.get("lmforge", {})
    if meta.get("head", "lm") == "scalar":
        raise LmforgeError(f"config key 'init': {cfg.init} is a scalar-head (reward/value) model; DPO starts from "
                           "an SFT policy")
    if not init_cfg.get("is_causal", True):
        raise LmforgeError(f"config key 'init': {cfg.init} is a bidirectional encoder; DPO needs a causal model")
    tok = Tokenizer.load(resolve_checkpoint(cfg.init))
    check_same_tokenizer(meta.get("tokenizer_fingerprint"), tok.fingerprint(),
                         f"the model in config key 'init' ({cfg.init})", "its tokenizer.json")
    load = functools.partial(load_data, tok=tok, encoder=False, max_len=int(init_cfg["max_position_embeddings"]),
                             skip_invalid=cfg.skip_invalid)
    train, skipped = load(cfg.data)
    kind = data_kind(train)  # one kind of record per file, as for the reward model
    if cfg.val_data:
        val, n = load(cfg.val_data)
        data_kind(val)
        skipped += n
    else:
        train, val = split_by_prompt(train, cfg.val_fraction, cfg.seed)
    train_pairs, val_pairs = preference_pairs(train), preference_pairs(val)
    if not train_pairs:
        why = (" (scored records pair up only among records with the same prompt and different scores)"
               if kind == "scored" else "")
        held = f" after holding out val_fraction={cfg.val_fraction}" if not cfg.val_data else ""
        raise LmforgeError(f"{cfg.data}: no preference pairs to train on{held}{why}")
    return DPOData(tok, encode_pairs(tok, train_pairs), encode_pairs(tok, val_pairs), skipped)


def pairs_fingerprint(pairs: list[EncodedPair]) -> str:
    """A hash of the pairs' token ids: resume refuses cached reference log-probs of other pairs."""
    h = hashlib.sha256()
    for p in pairs:
        h.update(json.dumps([p.start, p.chosen, p.rejected]).encode())
    return h.hexdigest()[:16]


def _check_resume(out: Path, cfg: DPOConfig, state: dict, fingerprints: dict) -> None:
    """Refuse to resume another run: another init (the reference), LoRA rank or set of pairs."""
    meta = read_config(out).get("lmforge", {})
    check_resume_rank(out, meta, "lora", cfg.lora.rank)
    if meta.get("init") != cfg.init:
        raise LmforgeError(f"{out}: cannot resume: config key 'init' differs (checkpoint {meta.get('init')}); the "
                           "reference (and with LoRA the frozen base) comes from it")
    if state.get("pairs") != fingerprints:
        raise LmforgeError(f"{out}: cannot resume: the preference pairs differ from the run's (data, val_data, "
                           "val_fraction or seed changed); its cached reference log-probs belong to the old pairs")


def run_dpo(cfg: DPOConfig, resume: bool = False, progress: bool = True) -> dict:
    """Train a policy with DPO; returns held-out metrics (heldout_accuracy, heldout_margin, heldout_loss,
    chosen_drift, rejected_drift: None without held-out pairs), pair counts, steps, seconds and out."""
    t0 = time.perf_counter()
    cfg.validate()
    data = load_dpo_data(cfg)  # everything that can fail on the user's input, before anything is written
    train, val, tok, pad = data.train, data.val, data.tok, data.tok.special.pad
    fingerprints = {"train": pairs_fingerprint(train), "val": pairs_fingerprint(val)}
    out = Path(cfg.out)
    dist_info = init_distributed()  # under torchrun: DDP, each process a share of every step's micro-batches
    rundir = RunDir(out, "dpo", resume, cfg.overwrite, inputs={"init": cfg.init}, is_main=dist_info.is_main)
    state = rundir.check()
    if state is not None:
        _check_resume(out, cfg, state, fingerprints)

    device = pick_device(cfg.device)
    if device.type == "cuda" and dist_info.world_size > 1:
        device = torch.device("cuda", dist_info.local_rank)
    seed_everything(cfg.seed)
    n_units = len(batch_units(train, cfg.group_by_prompt))
    steps = math.ceil(cfg.epochs * n_units / (cfg.batch_size * cfg.optim.grad_accum))
    optim = dataclasses.replace(cfg.optim, max_steps=steps)
    # Full fine-tuning resumes from the saved weights; with LoRA the base comes from init again, the adapters
    # from the training state. Either way the reference log-probs come from the training state.
    weights = out if state is not None and not cfg.lora.rank else cfg.init
    model, _, _ = load_model(weights, head="lm", device=device)
    disable_dropout(model)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    t_ref = time.perf_counter()
    if state is not None:
        ref = {k: v.float() for k, v in state["reference"].items()}
    else:  # the init model itself, before any adapter: one no-grad pass over every pair
        ref = {"train": pair_logprobs(model, train, pad, cfg.eval_batch_size),
               "val": pair_logprobs(model, val, pad, cfg.eval_batch_size)}
    t_ref = time.perf_counter() - t_ref
    if cfg.lora.rank:
        apply_lora(model, cfg.lora)
        if state is not None:
            load_trainable_state_dict(model, state["trainable"])
    meta = {"stage": "dpo", "init": cfg.init, "data": cfg.data, "beta": cfg.beta, "loss": cfg.loss,
            "lora_rank": cfg.lora.rank, "train_pairs": len(train), "config": to_dict(cfg)}

    def eval_hook(m, step):
        return {f"val_{k}": v for k, v in evaluate(m, val, ref["val"], cfg, pad).items()} if val else {}

    def save(m, training_state, final):
        training_state = {**training_state, "reference": ref, "pairs": fingerprints}
        if cfg.lora.rank:  # a plain merged model; the training state keeps what resume trains on
            training_state["trainable"] = trainable_state_dict(m)
            m = merged_copy(m)
        save_checkpoint(out, m, tok, {**meta, "step": training_state["step"]}, training_state)

    mean_len = sum(len(p.chosen) + len(p.rejected) for p in train) / (2 * len(train))
    batches = DPOBatches(train, ref["train"], cfg.batch_size, optim.grad_accum, pad, cfg.seed, device,
                         cfg.group_by_prompt)
    hooks = LoopHooks(batches,
                      lambda m, batch: dpo_batch_loss(m, batch, cfg), save, eval_hook)
    with rundir.active(int(state["step"]) if state else 0, checkpoint_bytes=estimate_bytes(model)):
        logger = MetricsLogger(out, enabled=dist_info.is_main)
        history = train_loop(model, optim, hooks, out, device, resume_state=state, eval_every=cfg.eval_every,
                             save_every=cfg.save_every, log_every=cfg.log_every, logger=logger, progress=progress,
                             dist_info=dist_info,
                             flops_per_token=model.flops_per_token(int(mean_len)), desc="dpo", stop_step=cfg.stop_step)
    done = history[-1]["step"] if history else int(state["step"]) if state else 0
    summary = {"train_pairs": len(train), "val_pairs": len(val), "skipped": data.skipped, "steps": steps}
    if done < steps:  # stopped early: the checkpoint resumes
        summary.update(stopped_at=done, seconds=time.perf_counter() - t0, out=str(out))
        rundir.finish(summary, to_dict(cfg))
        return summary
    final = {}
    if val:
        last = history[-1] if history else {}
        final = {k[4:]: v for k, v in last.items() if k.startswith("val_")}
        if not final:  # no evaluation at the last step (eval_every = 0, or nothing left to do on resume)
            final = evaluate(model, val, ref["val"], cfg, pad)
            logger.log(done, {f"val_{k}": v for k, v in final.items()})
    summary.update(heldout_accuracy=final.get("accuracy"), heldout_margin=final.get("margin"),
                   heldout_loss=final.get("loss"), chosen_drift=final.get("chosen_drift"),
                   rejected_drift=final.get("rejected_drift"), reference_seconds=t_ref,
                   seconds=time.perf_counter() - t0, out=str(out))
    rundir.finish(summary, to_dict(cfg))
    return summary


# ----------------------------------------------------------------------------------------------- CLI


def _print_summary(cfg: DPOConfig, resume: bool) -> None:
    s = run_dpo(cfg, resume=resume)
    if "stopped_at" in s:
        print(f"dpo: stopped after step {s['stopped_at']} of {s['steps']} ({s['seconds']:.1f}s); continue with "
              f"--resume -> {s['out']}")
        return
    if s["heldout_accuracy"] is None:
        shown = "no held-out pairs"
    else:
        shown = (f"heldout_accuracy {s['heldout_accuracy']:.4f}, heldout_margin {s['heldout_margin']:.4f}; log-prob "
                 f"drift chosen {s['chosen_drift']:+.3f}, rejected {s['rejected_drift']:+.3f}")
    print(f"dpo: {shown}; {s['train_pairs']} train / {s['val_pairs']} val pairs, {s['steps']} steps, "
          f"{s['seconds']:.1f}s -> {s['out']}")


COMMAND = Command(
    "lmforge dpo", "Direct Preference Optimization (Rafailov et al. 2023) of an SFT policy on ranked, pairwise or "
    "scored records, with IPO / hinge losses, cDPO label smoothing, RPO and LoRA.", DPOConfig, _print_summary,
    resume=True,
    flags=(Flag("--init", "init", "SFT checkpoint: policy and reference"),
           Flag("--data", "data", "ranked, pairwise or scored records"), Flag("--out", "out", "output directory"),
           Flag("--skip-invalid", "skip_invalid", "skip and count invalid records instead of stopping")),
    examples=("lmforge dpo --config configs/dpo_tiny.yaml",
              "lmforge dpo --config configs/dpo_tiny.yaml beta=0.5 loss=ipo",
              "lmforge dpo --config configs/dpo_tiny.yaml label_smoothing=0.1 rpo_alpha=1.0",
              "lmforge dpo --init runs/sft --data ranked.jsonl --out runs/dpo lora.rank=8 optim.lr=1e-5",
              "lmforge dpo --config configs/dpo_tiny.yaml --resume"))


def _wire(ctx: StageContext) -> dict:
    return {"init": ctx.artifact("sft_model"), "data": ctx.artifact("preferences"), "out": ctx.dir("dpo"),
            "device": ctx.device, "overwrite": True}


STAGE = Stage("dpo", DPOConfig, lambda ctx, cfg: run_dpo(cfg), inputs=("sft_model", "preferences"),
              outputs={"dpo_model": ""}, wire=_wire, policy="dpo", branch=True, command="dpo")
