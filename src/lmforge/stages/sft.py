"""Supervised instruction fine-tuning (SFT): `lmforge sft --config FILE [key=value ...]`.

Data: JSON Lines or one JSON array of records, each either an instruction record (keys instruction / input /
output in any case: the seed's `{"Instruction", "Input", "Output"}` and Alpaca's lowercase form) or a chat
record `{"messages": [...]}`. Every record goes through the one chat template (lmforge.chat).

Loss: token cross-entropy on assistant tokens only, including the <|end|> closing each assistant turn (else the
model never learns to stop), on every assistant turn of a multi-turn record; all other labels are -100. As in
InstructGPT (Ouyang et al. 2022, section 3.5) the prompt is context, not a target.

Truncation (max_seq_len): turns after the last assistant turn carry no loss and are dropped. An overlong record
keeps BOS and its whole last response, and loses prompt tokens from the left (oldest turns first). A record
whose last response does not fit beside BOS is dropped and counted (n_dropped): cutting the response would
teach an answer without its end, or without its question.

Batching: right padding to the longest row of each micro-batch (dynamic padding), or packing (pack=true): several
records share a row, positions restart at 0 per record and attention never crosses records (segment ids), so
each record's loss equals its loss alone. The loss is the mean over all response tokens of the whole optimizer
step (all micro-batches and ranks), not a mean of per-micro-batch means, so gradient accumulation gives the same
update as one large batch.

Order: one permutation per epoch seeded by (seed, epoch); the micro-batch at (step, micro, rank) is a pure
function of those numbers, so `--resume` continues exactly where the run stopped.
"""

from __future__ import annotations

import bisect
import json
import math
import statistics
import time
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from lmforge.chat import record_to_messages, render, render_prompt, stop_ids
from lmforge.checkpoint import estimate_bytes, load_model, read_config, save_checkpoint
from lmforge.cli import Command, Flag
from lmforge.config import to_dict
from lmforge.errors import ConfigError, LmforgeError, where
from lmforge.losses import IGNORE, token_nll
from lmforge.records import read_records
from lmforge.rundir import RunDir
from lmforge.stage import Stage, StageContext
from lmforge.generation import SamplingParams, generate
from lmforge.lora import (
    LoraConfig,
    apply_lora,
    check_resume_rank,
    load_trainable_state_dict,
    merged_copy,
    trainable_state_dict,
)
from lmforge.tokenizer import Tokenizer, check_same_tokenizer
from lmforge.distributed import init_distributed
from lmforge.training import (LoopHooks, MetricsLogger, OptimConfig, logged, pick_device, seed_everything, split_rows,
                              train_loop)


@dataclass
class SFTConfig:
    """`lmforge sft` settings. batch_size = rows per micro-batch: records (padding) or packed rows (pack=true)."""
    init: str = ""                  # checkpoint to fine-tune (pretrained); its tokenizer is used
    data: str = ""                  # training records (.jsonl or .json array)
    val_data: str = ""              # held-out records; empty -> split val_fraction off the training data
    val_fraction: float = 0.05
    out: str = "runs/sft"
    max_seq_len: int = 0            # 0 -> the model's context (max_position_embeddings)
    batch_size: int = 8
    epochs: int = 0                 # > 0: sets optim.max_steps to this many passes over the training data
    pack: bool = False
    skip_invalid: bool = False      # skip (and count) invalid records instead of stopping at the first one
    n_samples: int = 4              # fixed held-out prompts answered (greedy) at each evaluation
    sample_max_new_tokens: int = 64
    eval_every: int = 50            # 0: evaluate only at the end
    save_every: int = 0
    log_every: int = 10
    stop_step: int = 0              # stop (with a checkpoint) after this step; --resume continues
    seed: int = 1234
    device: str = "auto"
    logger: Literal["none", "tensorboard", "wandb"] = "none"
    overwrite: bool = False         # start over in an `out` that already holds a run
    gradient_checkpointing: bool = False  # recompute block activations in backward: less memory, more compute
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4, weight_decay=0.0, warmup_steps=20,
                                                                   max_steps=500))
    lora: LoraConfig = field(default_factory=LoraConfig)

    def validate(self) -> None:
        for key in ("init", "data", "out"):
            if not getattr(self, key):
                raise ConfigError(key, "is required")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError("val_fraction", "must be in [0, 1)")
        for key in ("batch_size", "sample_max_new_tokens", "log_every"):
            if getattr(self, key) <= 0:
                raise ConfigError(key, "must be positive")
        for key in ("max_seq_len", "epochs", "n_samples", "eval_every", "save_every", "stop_step"):
            if getattr(self, key) < 0:
                raise ConfigError(key, "must be >= 0")
        if self.max_seq_len == 1:
            raise ConfigError("max_seq_len", "must be at least 2")


# ----------------------------------------------------------------------------------------------- records


def read_sft_records(path: str | Path, skip_invalid: bool = False) -> tuple[list[list[dict]], int]:
    """Messages of every record of a .jsonl file or a .json array, and the number of invalid records skipped.

    An invalid record (bad JSON, no output / assistant turn, unknown role, non-string field) raises
    LmforgeError "path:line: reason", or with skip_invalid is skipped and counted.
    """
    records, skipped = [], 0
    for lineno, rec in read_records(path, tolerant=skip_invalid):
        try:
            if isinstance(rec, json.JSONDecodeError):
                raise ValueError(f"invalid JSON ({rec.msg})")
            records.append(record_to_messages(rec, require_response=True))
        except ValueError as e:
            if not skip_invalid:
                raise LmforgeError(f"{where(path, lineno)}: {e}") from None
            skipped += 1
    if not records:
        raise LmforgeError(f"{path}: no valid records" + (f" ({skipped} invalid skipped)" if skipped else ""))
    return records, skipped


def _last_assistant(messages: list[dict]) -> int:
    return max(i for i, m in enumerate(messages) if m["role"] == "assistant")


def encode_example(tok: Tokenizer, messages: list[dict], max_len: int) -> tuple[list[int], list[int]] | None:
    """(input ids, labels) of one conversation, labels = ids on assistant tokens + <|end|>, IGNORE elsewhere.

    Truncated as the module docstring says; None when the last response cannot fit (the record is dropped).
    """
    last = _last_assistant(messages)
    ids, mask = render(tok, messages[:last + 1])
    end = max(i for i, m in enumerate(mask) if m) + 1  # what a template writes after the last end-of-turn
    ids, mask = ids[:end], mask[:end]                   # token (ChatML's newline) is never learned: drop it
    if len(ids) > max_len:
        # The last response is the trailing run of loss tokens (content + end-of-turn), after the assistant
        # header (one role token for lmforge, `<|im_start|>assistant\n` for ChatML, four tokens for Llama 3).
        response = len(mask) - next(i for i in range(len(mask) - 1, -1, -1) if mask[i] == 0) - 1
        header = len(render_prompt(tok, messages[:last])) - len(render(tok, messages[:last])[0])
        bos = 1 if tok.special.bos is not None and ids[0] == tok.special.bos else 0
        if bos + header + response > max_len:
            return None
        keep = max_len - bos
        ids, mask = ids[:bos] + ids[-keep:], mask[:bos] + mask[-keep:]
    return ids, [t if m else IGNORE for t, m in zip(ids, mask)]


def encode_records(tok: Tokenizer, records: list[list[dict]], max_len: int) -> tuple[list[tuple], list[int]]:
    """Encoded examples, and the indices (into records) of those kept; the rest were dropped."""
    examples, kept = [], []
    for i, messages in enumerate(records):
        ex = encode_example(tok, messages, max_len)
        if ex is not None:
            examples.append(ex)
            kept.append(i)
    return examples, kept


# ---------------------------------------------------------------------------------------------- batching


def pad_batch(examples: list[tuple[list[int], list[int]]], pad_id: int, length: int = 0) -> dict:
    """Right-padded batch: input_ids, attention_mask, labels (IGNORE on padding), `length` or the longest wide."""
    T = max(length, max(len(ids) for ids, _ in examples))
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    for i, (x, y) in enumerate(examples):
        ids[i, :len(x)], labels[i, :len(y)], mask[i, :len(x)] = torch.tensor(x), torch.tensor(y), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pack_rows(lengths: list[int], order: list[int], capacity: int, window: int = 8) -> list[list[int]]:
    """Group record indices (taken in `order`) into rows of at most `capacity` tokens.

    First fit among the last `window` open rows: nearly as dense as sorting by length, while the rows keep the
    shuffled order of the epoch.
    """
    rows, space, open_rows = [], [], []
    for i in order:
        n = lengths[i]
        r = next((r for r in open_rows if space[r] >= n), None)
        if r is None:
            r = len(rows)
            rows.append([])
            space.append(capacity)
            open_rows.append(r)
            if len(open_rows) > window:
                open_rows.pop(0)
        rows[r].append(i)
        space[r] -= n
    return rows


def packed_batch(examples: list[tuple[list[int], list[int]]], rows: list[list[int]], pad_id: int,
                 length: int = 0) -> dict:
    """Packed batch: each row holds the records rows[r]; position_ids restart per record and segment_ids
    (1, 2, ... per record, 0 on padding) stop attention from crossing records."""
    T = max(length, max(sum(len(examples[i][0]) for i in row) for row in rows))
    B = len(rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    mask, pos, seg = (torch.zeros((B, T), dtype=torch.long) for _ in range(3))
    for r, row in enumerate(rows):
        t = 0
        for s, i in enumerate(row, 1):
            x, y = examples[i]
            n = len(x)
            ids[r, t:t + n], labels[r, t:t + n] = torch.tensor(x), torch.tensor(y)
            mask[r, t:t + n], pos[r, t:t + n], seg[r, t:t + n] = 1, torch.arange(n), s
            t += n
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "position_ids": pos, "segment_ids": seg}


class SFTBatches:
    """Deterministic micro-batches over an epoch-shuffled dataset.

    A "unit" is one batch row: a record (padding) or a packed row of records. Epoch e lists its units in the
    order of a permutation seeded by (seed, e); micro-batch (step, micro) takes the units at stream positions
    (step * grad_accum + micro) * batch_size + [0, batch_size) (micro counts the step's grad_accum micro-batches
    over all processes, so the data does not depend on how many there are).
    capacity = max_seq_len (the packed row length). pad_multiple > 1 rounds the batch width up (at most to
    capacity): on GPUs every new tensor shape costs ~0.1 s of one-off set-up, a few buckets avoid that.
    """

    def __init__(self, examples: list[tuple], batch_size: int, pad_id: int, seed: int, grad_accum: int = 1,
                 pack: bool = False, capacity: int = 0, pad_multiple: int = 1):
        self.examples, self.batch_size, self.pad_id, self.seed = examples, batch_size, pad_id, seed
        self.grad_accum, self.pack, self.capacity = grad_accum, pack, capacity
        self.pad_multiple = pad_multiple
        self.lengths = [len(ids) for ids, _ in examples]
        self.n_loss = [sum(t != IGNORE for t in labels) for _, labels in examples]
        self._epoch_starts = [0]  # stream position of the first unit of each epoch seen so far
        self._units = lru_cache(maxsize=4)(self._epoch_units)
        self._scale_cache: tuple[int, float] | None = None

    def _epoch_units(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.examples), generator=g).tolist()
        return pack_rows(self.lengths, order, self.capacity) if self.pack else [[i] for i in order]

    def units_per_epoch(self, epoch: int = 0) -> int:
        return len(self._units(epoch))

    def unit(self, pos: int) -> list[int]:
        """Record indices of the unit at stream position `pos`."""
        while self._epoch_starts[-1] <= pos:  # extend the epoch table far enough
            e = len(self._epoch_starts) - 1
            self._epoch_starts.append(self._epoch_starts[-1] + self.units_per_epoch(e))
        e = bisect.bisect_right(self._epoch_starts, pos) - 1
        return self._units(e)[pos - self._epoch_starts[e]]

    def _unit_positions(self, step: int, micro: int) -> range:
        start = (step * self.grad_accum + micro) * self.batch_size
        return range(start, start + self.batch_size)

    def step_loss_tokens(self, step: int) -> int:
        """Response tokens in the whole optimizer step (every micro-batch of every process)."""
        return sum(self.n_loss[i] for m in range(self.grad_accum) for p in self._unit_positions(step, m)
                   for i in self.unit(p))

    def micro_batch(self, step: int, micro: int = 0) -> dict:
        """The batch dict, with `scale` = grad_accum / (response tokens of the step): summed token losses times
        scale, averaged over the step's micro-batches as the loop and DDP do, is the step's mean."""
        units = [self.unit(p) for p in self._unit_positions(step, micro)]
        width = max(sum(self.lengths[i] for i in u) for u in units)
        width = -(-width // self.pad_multiple) * self.pad_multiple
        width = min(width, self.capacity) if self.capacity else width
        if self.pack:
            batch = packed_batch(self.examples, units, self.pad_id, width)
        else:
            batch = pad_batch([self.examples[u[0]] for u in units], self.pad_id, width)
        if self._scale_cache is None or self._scale_cache[0] != step:
            self._scale_cache = (step, self.grad_accum / self.step_loss_tokens(step))
        batch["scale"] = self._scale_cache[1]
        return batch


# -------------------------------------------------------------------------------------------------- loss


def batch_nll(model, batch: dict) -> torch.Tensor:
    """(B, T) negative log-likelihood of each labelled token of a (padded or packed) batch, 0 elsewhere."""
    dev = next(model.parameters()).device
    logits = model(batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev),
                   position_ids=batch["position_ids"].to(dev) if "position_ids" in batch else None,
                   segment_ids=batch["segment_ids"].to(dev) if "segment_ids" in batch else None)
    return token_nll(logits, batch["labels"].to(dev))


def batch_nll_sum(model, batch: dict) -> torch.Tensor:
    """The summed NLL of a batch's labelled tokens, through the fused LM-head cross-entropy: the head runs on
    the response positions only and no logits are stored (batch_nll's value, summed)."""
    dev = next(model.parameters()).device
    labels = batch["labels"].to(dev)
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE)  # the hidden state at t predicts token t + 1
    return model(batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev),
                 position_ids=batch["position_ids"].to(dev) if "position_ids" in batch else None,
                 segment_ids=batch["segment_ids"].to(dev) if "segment_ids" in batch else None,
                 labels=targets, reduction="sum")


def sft_loss(model, batch: dict) -> tuple[torch.Tensor, dict, int]:
    """LoopHooks.loss: summed response-token NLL times the batch's scale; counts real (non-pad) tokens."""
    n_resp = int((batch["labels"] != IGNORE).sum())
    return batch_nll_sum(model, batch) * batch["scale"], {"response_tokens": n_resp}, int(batch["attention_mask"].sum())


@torch.no_grad()
def evaluate_loss(model, examples: list[tuple], batch_size: int, pad_id: int) -> tuple[float, int]:
    """Mean NLL over all response tokens of `examples` (eval mode), and the token count.

    The order does not change a sum, so the examples run sorted by length, each batch as many as fit in
    batch_size rows of the longest example: little padding, and never more tokens than a training batch."""
    budget = batch_size * max((len(ids) for ids, _ in examples), default=0)
    ordered = sorted(examples, key=lambda e: len(e[0]))
    total, count, i = 0.0, 0, 0
    while i < len(ordered):
        j = i + 1
        while j < len(ordered) and (j + 1 - i) * len(ordered[j][0]) <= budget:
            j += 1
        batch = pad_batch(ordered[i:j], pad_id)
        total += float(batch_nll_sum(model, batch))
        count += int((batch["labels"] != IGNORE).sum())
        i = j
    return total / max(count, 1), count


def sample_prompts(tok: Tokenizer, records: list[list[dict]], n: int, max_len: int) -> list[tuple[list[int], str]]:
    """(prompt ids, reference response) for the first n records: the conversation up to its last response."""
    out = []
    for messages in records[:n]:
        last = _last_assistant(messages)
        ids = render_prompt(tok, messages[:last])
        if len(ids) > max_len - 1:  # same policy as training: keep BOS, lose the oldest prompt tokens
            bos = 1 if tok.special.bos is not None and ids[0] == tok.special.bos else 0
            ids = ids[:bos] + ids[len(ids) - (max_len - 1 - bos):]
        out.append((ids, messages[last]["content"]))
    return out


@torch.no_grad()
def answer(model, tok: Tokenizer, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
    """Greedy responses (decoded text, stop token excluded) to prompt ids."""
    gen = generate(model, prompts, SamplingParams(max_new_tokens, temperature=0.0), stop_ids(tok), tok.special.pad)
    stops = set(stop_ids(tok))
    return [tok.decode([t for t in row if t not in stops]) for row in gen.tokens]


# ------------------------------------------------------------------------------------------------ recipe


def _load_data(cfg: SFTConfig, tok: Tokenizer, max_len: int) -> dict:
    """Read, validate and encode train/val records before anything is written."""
    records, skipped = read_sft_records(cfg.data, cfg.skip_invalid)
    if cfg.val_data:
        val_records, val_skipped = read_sft_records(cfg.val_data, cfg.skip_invalid)
        skipped += val_skipped
    elif cfg.val_fraction > 0:
        g = torch.Generator().manual_seed(cfg.seed)
        order = torch.randperm(len(records), generator=g).tolist()
        n_val = max(1, round(len(records) * cfg.val_fraction))
        if n_val >= len(records):
            raise LmforgeError(f"config key 'val_fraction': {cfg.data} has only {len(records)} records, "
                               "too few to split off a validation set")
        val_records = [records[i] for i in sorted(order[:n_val])]
        records = [records[i] for i in sorted(order[n_val:])]
    else:
        val_records = []
    train, _ = encode_records(tok, records, max_len)
    val, val_kept = encode_records(tok, val_records, max_len)
    dropped = len(records) + len(val_records) - len(train) - len(val)
    if not train:
        raise LmforgeError(f"{cfg.data}: all {len(records)} training records were dropped: no response fits in "
                           f"max_seq_len={max_len}")
    shown = [val_records[i] for i in val_kept] or records
    return {"train": train, "val": val, "n_dropped": dropped, "n_skipped": skipped,
            "samples": sample_prompts(tok, shown, cfg.n_samples, max_len)}


def _check_init(cfg: SFTConfig) -> tuple:
    """Load the init checkpoint (with its tokenizer), refusing models SFT cannot continue."""
    model, tok, meta = load_model(cfg.init, head="lm")
    if meta.get("head", "lm") == "scalar":
        raise LmforgeError(f"config key 'init': {cfg.init} is a scalar-head (reward/value) model, not a language model")
    if not model.config.is_causal:
        raise LmforgeError(f"config key 'init': {cfg.init} is a bidirectional encoder; SFT needs a causal model")
    check_same_tokenizer(meta.get("tokenizer_fingerprint"), tok.fingerprint(),
                         f"the model in config key 'init' ({cfg.init})", "its tokenizer.json")
    return model, tok


def _check_resume(out: Path, cfg: SFTConfig, tok: Tokenizer) -> None:
    """Refuse to resume a different run: another init, tokenizer or LoRA rank."""
    meta = read_config(out).get("lmforge", {})
    if meta.get("init") != cfg.init:
        raise LmforgeError(f"{out}: cannot resume: not an SFT run from init {cfg.init}")
    check_same_tokenizer(meta.get("tokenizer_fingerprint"), tok.fingerprint(), f"the checkpoint in {out}",
                         f"config key 'init' ({cfg.init})")
    check_resume_rank(out, meta, "lora", cfg.lora.rank)


def _evaluate(m, tok: Tokenizer, data: dict, cfg: SFTConfig, out: Path, dist_info, step: int) -> dict:
    """Validation loss and the fixed samples' greedy answers (appended to samples.jsonl) at `step`."""
    m.eval()
    res = {}
    if data["val"]:
        loss, _ = evaluate_loss(m, data["val"], cfg.batch_size, tok.special.pad)
        res = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}
    if data["samples"]:
        answers = answer(m, tok, [p for p, _ in data["samples"]], cfg.sample_max_new_tokens)
        res["sample_exact"] = sum(a == ref for a, (_, ref) in zip(answers, data["samples"])) / len(answers)
        if dist_info.is_main:
            with open(out / "samples.jsonl", "a", encoding="utf-8") as f:
                for (p, ref), a in zip(data["samples"], answers):
                    rec = {"step": step, "prompt": tok.decode(p, skip_special=False), "response": a, "reference": ref}
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return res


def _train(cfg: SFTConfig, model, tok: Tokenizer, data: dict, batches, optim, state, out: Path, device, dist_info,
           max_len: int, progress: bool):
    """The training loop with its hooks: (history, metrics before training, logger)."""
    logger = MetricsLogger(out, cfg.logger, run_name=out.name, enabled=dist_info.is_main)

    def evaluate(m, step: int) -> dict:
        return _evaluate(m, tok, data, cfg, out, dist_info, step)

    meta = {"stage": "sft", "init": cfg.init, "data": cfg.data, "max_seq_len": max_len, "pack": cfg.pack,
            "lora_rank": cfg.lora.rank, "n_train": len(data["train"]), "config": to_dict(cfg)}

    def save(m, training_state: dict, final: bool) -> None:
        if cfg.lora.rank:  # the checkpoint is a plain model with the adapters merged in
            training_state = {**training_state, "lora": trainable_state_dict(m)}
            m = merged_copy(m)
        save_checkpoint(out, m, tok, meta={**meta, "step": training_state["step"]}, training_state=training_state)

    before = {}
    if state is None:
        before = evaluate(model, 0)
        logger.log(0, before)
    hooks = LoopHooks(micro_batch=lambda step, micro, d: batches.micro_batch(step, micro), loss=sft_loss,
                      save=save, evaluate=evaluate, split=split_rows)  # sft_loss: a sum over rows
    history = train_loop(model, optim, hooks, out, device, resume_state=state, eval_every=cfg.eval_every,
                         save_every=cfg.save_every, log_every=cfg.log_every, logger=logger, dist_info=dist_info,
                         flops_per_token=model.flops_per_token(max_len), progress=progress, desc="sft",
                         stop_step=cfg.stop_step)
    return history, before, logger


def run_sft(cfg: SFTConfig, resume: bool = False, progress: bool = True) -> dict:
    """Fine-tune cfg.init on cfg.data; write a checkpoint (meta stage "sft") with metrics.jsonl and samples.jsonl.

    Returns val_loss / val_ppl (after; val_loss_before too), sample_exact, n_train, n_val, n_dropped, n_skipped,
    trainable_params, steps, tokens_per_s (real, non-pad tokens), seconds.
    """
    t0 = time.perf_counter()
    model, tok = _check_init(cfg)
    context = model.config.max_position_embeddings
    max_len = cfg.max_seq_len or context
    if max_len > context:
        raise LmforgeError(f"config key 'max_seq_len': {max_len} exceeds the model's context {context} "
                           "(max_position_embeddings)")
    data = _load_data(cfg, tok, max_len)
    out = Path(cfg.out)
    dist_info = init_distributed()
    rundir = RunDir(out, "sft", resume, cfg.overwrite, inputs={"init": cfg.init}, is_main=dist_info.is_main)
    state = rundir.check()
    if state is not None:
        _check_resume(out, cfg, tok)

    # All inputs are valid: from here on the output directory may be written.
    device = pick_device(cfg.device)
    if device.type == "cuda" and dist_info.world_size > 1:
        device = torch.device("cuda", dist_info.local_rank)
    seed_everything(cfg.seed + dist_info.rank * 100003)  # per-rank seed, as in the N+ implementation details
    if state is not None and not cfg.lora.rank:  # full fine-tuning resumes from the saved weights
        model = load_model(out, head="lm")[0]
    batches = SFTBatches(data["train"], cfg.batch_size, tok.special.pad, cfg.seed, cfg.optim.grad_accum,
                         pack=cfg.pack, capacity=max_len, pad_multiple=64 if device.type == "cuda" else 1)
    optim = cfg.optim
    if cfg.epochs:
        per_step = cfg.batch_size * optim.grad_accum
        optim = replace(optim, max_steps=math.ceil(cfg.epochs * batches.units_per_epoch(0) / per_step))
    model.gradient_checkpointing = cfg.gradient_checkpointing
    if cfg.lora.rank:  # base weights frozen; on resume the adapters come from the training state
        apply_lora(model, cfg.lora)
        if state is not None:
            load_trainable_state_dict(model, state["lora"])
    model.to(device)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    with rundir.active(int(state["step"]) if state else 0, checkpoint_bytes=estimate_bytes(model)):
        history, before, logger = _train(cfg, model, tok, data, batches, optim, state, out, device, dist_info,
                                         max_len, progress)

    final = history[-1] if history and ("val_loss" in history[-1] or "sample_exact" in history[-1]) else None
    if final is None:  # no eval at the last step (eval_every = 0, stopped early, or nothing left to do)
        final = _evaluate(model, tok, data, cfg, out, dist_info, history[-1]["step"] if history else int(state["step"]))
        step = history[-1]["step"] if history else int(state["step"])
        if final and not logged(out, step, final):
            logger.log(step, final)
    speeds = [h["tokens_per_s"] for h in history[1:]] or [h["tokens_per_s"] for h in history]
    summary = {"val_loss": final.get("val_loss"), "val_ppl": final.get("val_ppl"),
            "val_loss_before": before.get("val_loss"), "sample_exact": final.get("sample_exact"),
            "n_train": len(data["train"]), "n_val": len(data["val"]), "n_dropped": data["n_dropped"],
            "n_skipped": data["n_skipped"], "trainable_params": n_trainable,
            "steps": history[-1]["step"] if history else int(state["step"]),
            "tokens_per_s": statistics.median(speeds) if speeds else None,  # median: steps after an eval run slow
            "seconds": time.perf_counter() - t0, "out": str(out)}
    rundir.finish(summary, to_dict(cfg))
    return summary


def _print_summary(cfg: SFTConfig, resume: bool) -> None:
    s = run_sft(cfg, resume=resume)
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    print(f"sft: {s['n_train']} train / {s['n_val']} val records ({s['n_dropped']} dropped as too long, "
          f"{s['n_skipped']} invalid skipped); {s['steps']} steps; val loss {fmt(s['val_loss_before'])} -> "
          f"{fmt(s['val_loss'])} (ppl {fmt(s['val_ppl'])}); {s['tokens_per_s'] or 0:,.0f} tok/s; "
          f"{s['seconds']:.1f}s -> {s['out']}")


COMMAND = Command(
    "lmforge sft", "Supervised instruction fine-tuning: loss on assistant tokens only.", SFTConfig, _print_summary,
    resume=True,
    flags=(Flag("--init", "init", "checkpoint to fine-tune"), Flag("--data", "data", "instruction or chat records"),
           Flag("--out", "out", "output directory"),
           Flag("--skip-invalid", "skip_invalid", "skip and count invalid records instead of failing")),
    examples=("lmforge sft --config configs/sft_tiny.yaml",
              "lmforge sft --config configs/sft_tiny.yaml optim.lr=3e-4 optim.max_steps=200 pack=true",
              "lmforge sft --config configs/sft_tiny.yaml lora.rank=8 out=runs/sft_lora",
              "lmforge sft --config configs/sft_tiny.yaml --resume"))


def _wire(ctx: StageContext) -> dict:
    return {"init": ctx.artifact("base_model"), "data": ctx.artifact("sft_data"), "out": ctx.dir("sft"),
            "device": ctx.device, "overwrite": True}


STAGE = Stage("sft", SFTConfig, lambda ctx, cfg: run_sft(cfg), inputs=("base_model", "sft_data"),
              outputs={"sft_model": ""}, wire=_wire, policy="sft", command="sft")
