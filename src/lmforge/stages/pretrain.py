"""Pretraining on prepared token shards: next-token prediction (GPT, objective "clm") or masked-token prediction
(BERT, objective "mlm") with the same Llama-style blocks run causal or bidirectional.

    lmforge pretrain --config configs/pretrain_tiny.yaml [key=value ...] [--resume]

Batches are random windows drawn from a generator seeded by (seed, step, micro-batch, rank), so the data a
step sees never depends on what ran before it and `--resume` reproduces an uninterrupted run exactly.
Validation reports loss, perplexity and (clm) bits per byte, which, unlike loss, compares across tokenizers.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from lmforge.checkpoint import estimate_bytes, load_model, read_config, save_checkpoint
from lmforge.cli import Command, Flag
from lmforge.config import to_dict
from lmforge.data import TokenShards, read_manifest
from lmforge.errors import ConfigError, LmforgeError
from lmforge.losses import IGNORE
from lmforge.model import ModelConfig, Transformer
from lmforge.rundir import RunDir
from lmforge.stage import Stage, StageContext
from lmforge.tokenizer import Tokenizer, check_same_tokenizer
from lmforge.distributed import init_distributed
from lmforge.training import (
    LoopHooks,
    MetricsLogger,
    OptimConfig,
    autocast,
    logged,
    pick_device,
    seed_everything,
    split_rows,
    step_generator,
    train_loop,
)


@dataclass
class PretrainConfig:
    """`lmforge pretrain` settings. batch_size is per device and micro-batch (tokens per optimizer step =
    batch_size * seq_len * optim.grad_accum * world size). model.vocab_size is taken from the tokenizer."""
    data: str = ""                      # a directory written by `lmforge data prepare`
    out: str = "runs/pretrain"
    tokenizer: str = ""                 # default: the tokenizer copy inside `data`
    objective: Literal["clm", "mlm"] = "clm"
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch_size: int = 16
    seq_len: int = 256
    mlm_probability: float = 0.15       # BERT: 15% of positions; of those 80% [MASK], 10% random, 10% kept
    eval_every: int = 100               # 0: evaluate only once, at the end
    eval_batches: int = 20
    sample_every: int = 0               # clm: generate from sample_prompts at evals that are multiples of this
    sample_prompts: list[str] = field(default_factory=lambda: ["The "])
    sample_tokens: int = 48
    save_every: int = 0
    log_every: int = 10
    stop_step: int = 0                  # stop (with a checkpoint) after this step; --resume continues
    device: str = "auto"
    compile: bool = False               # torch.compile the model
    gradient_checkpointing: bool = False  # recompute block activations in backward: less memory, more compute
    seed: int = 1337
    logger: Literal["none", "tensorboard", "wandb"] = "none"
    overwrite: bool = False             # start over in an `out` that already holds a run

    def validate(self) -> None:
        if not self.data:
            raise ConfigError("data", "is required (a directory from `lmforge data prepare`)")
        for key in ("batch_size", "seq_len", "eval_batches", "sample_tokens", "log_every"):
            if getattr(self, key) <= 0:
                raise ConfigError(key, "must be positive")
        for key in ("eval_every", "sample_every", "save_every", "stop_step"):
            if getattr(self, key) < 0:
                raise ConfigError(key, "must be >= 0")
        if self.seq_len > self.model.max_position_embeddings:
            raise ConfigError("seq_len", f"({self.seq_len}) exceeds model.max_position_embeddings "
                                         f"({self.model.max_position_embeddings})")
        if not 0.0 < self.mlm_probability < 1.0:
            raise ConfigError("mlm_probability", "must be in (0, 1)")
        if self.sample_every:
            if self.objective != "clm":
                raise ConfigError("sample_every", "needs objective clm (samples are generated left to right); "
                                                  "set sample_every=0 with objective=mlm")
            if not self.eval_every or self.sample_every % self.eval_every:
                raise ConfigError("sample_every", "must be a multiple of eval_every (samples are drawn at evals)")
        # The objective decides the attention pattern: GPT is causal, BERT sees both sides.
        self.model.is_causal = self.objective == "clm"


# ----------------------------------------------------------------------------------------------------------
# Objectives


def mlm_mask(ids: torch.Tensor, special: torch.Tensor, mask_id: int, probability: float = 0.15,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking (Devlin et al. 2019, sec. 3.1) -> (inputs, labels).

    Each non-special position is chosen with `probability`; a chosen position becomes [MASK] 80% of the time,
    a random non-special token 10%, and stays unchanged 10% (so the model cannot assume the input at a
    [MASK]-free position is correct). labels = the original id at chosen positions, IGNORE elsewhere.
    special: (vocab,) bool, True for special tokens (never chosen, never drawn as random replacements).
    """
    candidates = ~special[ids]
    chosen = (torch.rand(ids.shape, generator=generator) < probability) & candidates
    if not chosen.any() and candidates.any():  # an all-ignored batch would give a NaN loss
        chosen.view(-1)[candidates.view(-1).nonzero()[0]] = True
    action = torch.rand(ids.shape, generator=generator)
    normal = (~special).nonzero().squeeze(1)
    random_ids = normal[torch.randint(len(normal), ids.shape, generator=generator)]
    inputs = torch.where(chosen & (action < 0.8), torch.full_like(ids, mask_id), ids)
    inputs = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, inputs)
    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE))
    return inputs, labels


def special_table(tok: Tokenizer) -> torch.Tensor:
    """(vocab,) bool: True at the tokenizer's special tokens."""
    table = torch.zeros(tok.vocab_size, dtype=torch.bool)
    table[sorted(tok.special_ids | {i for i in dataclasses.asdict(tok.special).values() if i is not None})] = True
    return table


def token_byte_lengths(tok: Tokenizer) -> torch.Tensor:
    """UTF-8 bytes each token stands for (0 for special tokens), for bits per byte."""
    return torch.tensor([len(tok.token_bytes(i)) for i in range(tok.vocab_size)], dtype=torch.long)


@torch.no_grad()
def evaluate(model, val: TokenShards, cfg: PretrainConfig, special: torch.Tensor, mask_id: int,
             token_bytes: torch.Tensor, device: torch.device) -> dict:
    """Loss over the first eval_batches batches of the val split, in order (the same tokens every time).

    clm: val_loss (nats/token over all targets), val_ppl = exp(val_loss), val_bpb = nats summed over
    non-special targets / (ln 2 * their UTF-8 bytes) -- the nanochat definition, independent of the vocabulary.
    mlm: loss and accuracy on masked positions, masks drawn from a generator seeded with `seed`.
    """
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(cfg.seed)
    token_bytes = token_bytes.to(device)
    nll_sum, n_targets, nll_bytes, n_bytes, n_correct = 0.0, 0, 0.0, 0, 0
    for i, (x, y) in enumerate(val.iter_batches(cfg.batch_size, cfg.seq_len)):
        if i == cfg.eval_batches:
            break
        if cfg.objective == "mlm":
            x, y = mlm_mask(x, special, mask_id, cfg.mlm_probability, gen)
        x, y = x.to(device), y.to(device)
        with autocast(device):
            logits = model(x).float()
        nll = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE, reduction="none")
        valid = y.flatten() != IGNORE
        nll_sum += nll.sum().item()
        n_targets += int(valid.sum())
        n_correct += int((logits.argmax(-1).flatten() == y.flatten())[valid].sum())
        if cfg.objective == "clm":
            b = token_bytes[y.flatten()]
            nll_bytes += nll[b > 0].sum().item()
            n_bytes += int(b.sum())
    model.train(was_training)
    if n_targets == 0:
        return {}
    loss = nll_sum / n_targets
    out = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_accuracy": n_correct / n_targets}
    if cfg.objective == "clm" and n_bytes:
        out["val_bpb"] = nll_bytes / (math.log(2) * n_bytes)
    return out


def _samples(model, tok: Tokenizer, cfg: PretrainConfig, device: torch.device) -> list[str]:
    from lmforge.generation import SamplingParams, generate

    model = getattr(model, "_orig_mod", model)  # generate with the eager module (KV-cache shapes vary)
    prompts = [tok.document_ids(p)[:-1] for p in cfg.sample_prompts]  # [BOS] text, no EOS
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    out = generate(model, prompts, SamplingParams(cfg.sample_tokens, temperature=0.8, top_k=50),
                   [tok.special.eos], tok.special.pad, gen)
    return [p + tok.decode(t) for p, t in zip(cfg.sample_prompts, out.tokens)]


# ----------------------------------------------------------------------------------------------------------
# Checks before anything is written


def _check_resume(out: Path, cfg: PretrainConfig, tok: Tokenizer) -> None:
    """Refuse to resume a checkpoint whose model shape, objective or tokenizer differs from `cfg`."""
    saved = read_config(out)
    meta = saved.get("lmforge", {})
    if meta.get("objective") != cfg.objective:
        raise LmforgeError(f"{out}: cannot resume: config key 'objective' differs "
                           f"(checkpoint {meta.get('objective')!r}, config {cfg.objective!r})")
    check_same_tokenizer(meta.get("tokenizer_fingerprint"), tok.fingerprint(), f"the checkpoint in {out}",
                         "the tokenizer of config key 'data'")
    mine = dataclasses.asdict(cfg.model)
    for key in ("dropout", "init_std"):  # not part of the shape; allowed to change
        mine.pop(key)
    for key, value in mine.items():
        if saved.get(key) != value:
            raise LmforgeError(f"{out}: cannot resume: config key 'model.{key}' differs "
                               f"(checkpoint {saved.get(key)!r}, config {value!r})")


# ----------------------------------------------------------------------------------------------------------
# Entry points


def _load_inputs(cfg: PretrainConfig, rundir: RunDir) -> tuple[dict, Tokenizer, TokenShards, TokenShards, dict | None]:
    """Check everything (data, tokenizer, lengths, output directory, resume compatibility) before any write."""
    if not Path(cfg.data).is_dir():
        raise LmforgeError(f"config key 'data': {cfg.data} is not a directory (prepare it with `lmforge data prepare`)")
    manifest = read_manifest(cfg.data)
    tok = Tokenizer.load(cfg.tokenizer or cfg.data)
    check_same_tokenizer(tok.fingerprint(), manifest["tokenizer_fingerprint"],
                         f"config key 'tokenizer' ({cfg.tokenizer or cfg.data})", f"config key 'data' ({cfg.data})")
    if cfg.objective == "mlm" and tok.special.mask is None:
        raise LmforgeError(f"config key 'objective': mlm needs a mask token, which the tokenizer of {cfg.data} "
                           "lacks (train one with `lmforge tokenizer train`)")
    train, val = TokenShards(cfg.data, "train"), TokenShards(cfg.data, "val")
    if train.max_window() < cfg.seq_len:
        raise LmforgeError(f"config key 'seq_len': {cfg.data} has no train shard longer than {cfg.seq_len} tokens "
                           f"(it holds {train.num_tokens:,}); lower seq_len or prepare more data")
    if val.num_tokens < 2:
        raise LmforgeError(f"config key 'data': {cfg.data} has no validation tokens "
                           f"(prepare it with --val-fraction > 0 and at least two documents)")
    cfg.model.vocab_size = tok.vocab_size
    state = rundir.check()
    if state is not None:
        _check_resume(Path(cfg.out), cfg, tok)
    return manifest, tok, train, val, state


def run_pretrain(cfg: PretrainConfig, resume: bool = False, progress: bool = True) -> dict:
    """Pretrain per `cfg` into cfg.out; returns final val_loss, val_ppl, val_bpb (clm), tokens_per_s, seconds."""
    t0 = time.perf_counter()
    dist_info = init_distributed()
    rundir = RunDir(cfg.out, "pretrain", resume, cfg.overwrite, is_main=dist_info.is_main)
    manifest, tok, train, val, resume_state = _load_inputs(cfg, rundir)
    out = Path(cfg.out)
    device = pick_device(cfg.device)
    if device.type == "cuda" and dist_info.world_size > 1:
        device = torch.device("cuda", dist_info.local_rank)
    seed_everything(cfg.seed)
    model = Transformer(cfg.model)
    if resume_state is not None:
        model.load_state_dict(load_model(out, head="lm")[0].state_dict())
    model.gradient_checkpointing = cfg.gradient_checkpointing
    model.to(device)
    n_params = model.num_params()
    flops_per_token = model.flops_per_token(cfg.seq_len)
    if cfg.compile:
        model = torch.compile(model)

    special = special_table(tok)
    mask_id = tok.special.mask
    token_bytes = token_byte_lengths(tok)
    meta = {"stage": "pretrain", "objective": cfg.objective, "data_fingerprint": manifest["fingerprint"],
            "tokenizer_fingerprint": tok.fingerprint(), "params": n_params, "config": to_dict(cfg)}

    def micro_batch(step, micro, dist):
        gen = step_generator(cfg.seed, step, micro)
        x, y = train.sample_batch(gen, cfg.batch_size, cfg.seq_len)
        if cfg.objective == "mlm":  # the same generator goes on to draw the mask: a function of the step too
            x, y = mlm_mask(x, special, mask_id, cfg.mlm_probability, gen)
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    def loss_fn(m, batch):
        x, y = batch
        return m(x, labels=y), {}, x.numel()   # the fused LM-head cross-entropy (no (B, T, V) logits kept)

    def evaluate_hook(m, step):
        metrics = evaluate(m, val, cfg, special, mask_id, token_bytes, device)
        # A sharded (FSDP2) model generates on every process: each forward gathers parameters from all of them.
        if cfg.sample_every and step % cfg.sample_every == 0 and (dist_info.is_main or cfg.optim.fsdp):
            samples = _samples(m, tok, cfg, device)
            if dist_info.is_main:
                from tqdm import tqdm
                metrics["samples"] = samples
                for s in samples:
                    tqdm.write(f"[step {step}] {s!r}")
        return metrics

    def save(m, training_state, final):
        save_checkpoint(out, m, tok, {**meta, "step": training_state["step"]}, training_state)

    hooks = LoopHooks(micro_batch=micro_batch, loss=loss_fn, save=save, evaluate=evaluate_hook,
                      split=lambda batch, n: split_rows(batch, n, labels=batch[1]))  # loss: mean over labels
    with rundir.active(int(resume_state["step"]) if resume_state else 0, checkpoint_bytes=estimate_bytes(model)):
        logger = MetricsLogger(out, cfg.logger, run_name=out.name, enabled=dist_info.is_main)
        history = train_loop(model, cfg.optim, hooks, out, device, resume_state, eval_every=cfg.eval_every,
                             save_every=cfg.save_every, log_every=cfg.log_every, flops_per_token=flops_per_token,
                             logger=logger, dist_info=dist_info, progress=progress, desc=f"pretrain {cfg.objective}",
                             stop_step=cfg.stop_step)
    final = history[-1] if history and "val_loss" in history[-1] else None
    if final is None:  # no eval at the last step (eval_every = 0, stopped early, or nothing left to do)
        final = evaluate(model, val, cfg, special, mask_id, token_bytes, device)
        step = history[-1]["step"] if history else int(resume_state["step"])
        if dist_info.is_main and not logged(out, step, final):
            logger.log(step, final)
    speeds = [h["tokens_per_s"] for h in history[1:]] or [h["tokens_per_s"] for h in history]
    summary = {
        "objective": cfg.objective,
        "steps": history[-1]["step"] if history else int(resume_state["step"]),
        "params": n_params,
        "train_loss": history[-1]["loss"] if history else None,
        "val_loss": final.get("val_loss"),
        "val_ppl": final.get("val_ppl"),
        "val_bpb": final.get("val_bpb"),
        "val_accuracy": final.get("val_accuracy"),
        "tokens_per_s": statistics.median(speeds) if speeds else None,
        "seconds": time.perf_counter() - t0,
        "out": str(out),
    }
    rundir.finish(summary, to_dict(cfg))
    return summary


def _print_summary(cfg: PretrainConfig, resume: bool) -> None:
    s = run_pretrain(cfg, resume=resume)
    bpb = f", bpb {s['val_bpb']:.3f}" if s["val_bpb"] is not None else ""
    print(f"pretrain {s['objective']}: {s['steps']} steps, {s['params'] / 1e6:.2f}M params, "
          f"val loss {s['val_loss']:.4f}, ppl {s['val_ppl']:.2f}{bpb}, "
          f"{s['tokens_per_s'] or 0:,.0f} tokens/s, {s['seconds']:.1f}s -> {s['out']}")


COMMAND = Command(
    "lmforge pretrain", "Pretrain a Transformer on prepared token shards (objective clm: GPT next-token; "
    "mlm: BERT masked tokens).", PretrainConfig, _print_summary, resume=True,
    flags=(Flag("--data", "data", "token shards from `lmforge data prepare`"), Flag("--out", "out", "output directory"),
           Flag("--objective", "objective", "clm (GPT) or mlm (BERT)")),
    examples=("lmforge pretrain --config configs/pretrain_tiny.yaml",
              "lmforge pretrain --config configs/pretrain_tiny.yaml objective=mlm sample_every=0 out=runs/pretrain_mlm",
              "lmforge pretrain --config configs/pretrain_tiny.yaml model.hidden_size=128 optim.lr=1e-3 stop_step=100",
              "lmforge pretrain --config configs/pretrain_tiny.yaml --resume"))


def _wire(ctx: StageContext) -> dict:
    return {"data": ctx.artifact("token_data"), "out": ctx.dir("pretrain"), "device": ctx.device, "overwrite": True}


STAGE = Stage("pretrain", PretrainConfig, lambda ctx, cfg: run_pretrain(cfg), inputs=("token_data",),
              outputs={"base_model": ""}, wire=_wire, policy="base", command="pretrain")
