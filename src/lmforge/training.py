"""The one small training loop every supervised stage (pretrain, SFT, reward model) runs on, and the pieces PPO
reuses: optimizer groups, learning-rate schedule, precision, seeding, distributed set-up, metrics logging.

Data position is a pure function of the step (batches are drawn from a generator seeded by (seed, step)), so
`--resume` from a checkpoint reproduces the uninterrupted run exactly on CPU.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
import torch.distributed as dist

from lmforge import cpu_threads
from lmforge.distributed import (DistInfo, full_state, load_optimizer_state, local_grad_accum, mean_over_processes,
                                 shard_model, unsharded_copy)
from lmforge.errors import ConfigError, LmforgeError
from lmforge.losses import IGNORE
from lmforge.muon import MuonAdamW


@dataclass
class OptimConfig:
    """AdamW (or Muon for the blocks' matrices) with linear warmup then cosine (or constant) decay."""
    optimizer: Literal["adamw", "muon"] = "adamw"  # muon: Muon for the blocks' weight matrices, AdamW for the rest
    muon_momentum: float = 0.95   # Muon's Nesterov momentum (Jordan 2024)
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 50
    max_steps: int = 1000
    schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip: float = 1.0
    grad_accum: int = 1
    max_skipped_steps: int = 10   # stop after this many steps in a row skipped for a non-finite loss or gradient
    fsdp: bool = False            # under torchrun: shard parameters, gradients and optimizer state (FSDP2), not DDP

    def validate(self) -> None:
        for key in ("max_steps", "grad_accum", "lr", "max_skipped_steps"):
            if getattr(self, key) <= 0:
                raise ConfigError(key, "must be positive")
        if not 0 <= self.muon_momentum < 1:
            raise ConfigError("muon_momentum", "must be in [0, 1)")
        if self.optimizer == "muon" and self.fsdp:
            raise ConfigError("optimizer", "muon orthogonalizes whole matrices; with fsdp each process holds a shard "
                              "(use DDP, or adamw)")


class NonFiniteGuard:
    """Skips optimizer steps whose loss or gradient norm is not finite (the weights stay as they were, as AMP's
    GradScaler does), counts them, and stops the run with a clear message after `limit` in a row: one bad batch
    is survivable, a diverged run is not, and the last checkpoint on disk is still the last good one."""

    def __init__(self, limit: int, what: str = "steps"):
        self.limit, self.what = limit, what
        self.skipped = self.in_a_row = 0

    def check(self, finite: bool, step: int) -> bool:
        """Record one step; True if it may update the weights. Raises LmforgeError at `limit` bad ones in a row."""
        if finite:
            self.in_a_row = 0
            return True
        self.skipped += 1
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            raise LmforgeError(f"{self.in_a_row} {self.what} in a row (up to step {step}) had a non-finite loss or "
                               "gradient norm; stopped with the last checkpoint intact. Lower the learning rate "
                               "(optim.lr) or check the data")
        return False


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not on norms, biases or the scalar head's bias). With
    optimizer=muon, the blocks' weight matrices (not embeddings, heads or LoRA factors) take Muon steps instead."""
    decay, no_decay, hidden = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if cfg.optimizer == "muon" and p.dim() == 2 and ".layers." in name and "lora_" not in name:
            hidden.append(p)
        else:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "muon":
        groups.append({"params": hidden, "weight_decay": cfg.weight_decay, "muon": True})
        return MuonAdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, momentum=cfg.muon_momentum)
    # The fused kernel: one pass per tensor instead of ~8 ops (on a 2-core CPU 4-5x faster than the for-loop
    # default, ~15% of a small model's step before; on CUDA what nanoGPT and nanochat use).
    kwargs = {"fused": True} if next(model.parameters()).device.type in ("cuda", "cpu") else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **kwargs)


def lr_at(step: int, cfg: OptimConfig) -> float:
    """Learning rate at `step` (0-based): linear warmup, then cosine decay to lr * min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    min_lr = cfg.lr * cfg.min_lr_ratio
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * progress))


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LmforgeError(f"device '{name}' requested but CUDA is not available")
    return torch.device(name)


class StopRequest:
    """SIGINT (Ctrl-C) or SIGTERM during training (train_loop, the PPO and GRPO loops): let the current step finish,
    save a resumable checkpoint, then stop; a second signal stops at once. Only the main thread can install
    handlers; elsewhere this does nothing."""

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:  # asked twice: stop now
            self._restore()
            raise KeyboardInterrupt
        self.signal = signum

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __exit__(self, *exc) -> None:
        self._restore()

    def requested(self, dist_info: DistInfo | None = None, device: torch.device | None = None) -> bool:
        """Whether to stop after this step; under torchrun every rank agrees (one all-reduce per step)."""
        if dist_info is None or dist_info.world_size == 1:
            return self.signal is not None
        flag = torch.tensor([float(self.signal is not None)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def announce(self, where: str, out_dir: str | Path) -> None:
        """Say where the run stopped ("step 120", "iteration 7") and how to continue it, once its checkpoint is
        saved; the caller then raises KeyboardInterrupt, which the CLI turns into exit status 130."""
        name = signal.Signals(self.signal).name if self.signal else "signal"
        print(f"stopped at {where} ({name}): a checkpoint was saved in {out_dir}; continue with --resume", flush=True)


def clip_and_step(model: torch.nn.Module, opt: torch.optim.Optimizer, sched: OptimConfig, step: int) -> tuple[float, float]:
    """One optimizer step at the scheduled learning rate of `step`, after clipping the gradient norm to
    sched.grad_clip (0 = no clipping); gradients are zeroed after. A non-finite gradient norm skips the update
    (the caller sees it in the returned norm). Returns (gradient norm before clipping, lr)."""
    lr = lr_at(step, sched)
    for g in opt.param_groups:
        g["lr"] = lr
    clip = sched.grad_clip if sched.grad_clip > 0 else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
    if math.isfinite(grad_norm):
        opt.step()
    opt.zero_grad(set_to_none=True)
    return grad_norm, lr


def synced_time(device: torch.device) -> float:
    """perf_counter after the device has finished its queued work, so timings split by stage are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def autocast(device: torch.device):
    """bf16 autocast on CUDA; fp32 on CPU (bf16 matmul on CPUs is hundreds of times slower)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """RNG states as tensors/lists only, so the training state loads with weights_only=True."""
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_pos": random.getstate()[2]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_generator(seed: int, step: int, micro: int = 0, rank: int = 0) -> torch.Generator:
    """A generator for the data of one micro-batch: the data position is a function of the step alone."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + step * 1009 + micro * 101 + rank * 100003) % (2**63))
    return g


def measure_cpu_matmul_peak(n: int = 1024, seconds: float = 0.5) -> float:
    """fp32 FLOP/s of an n x n matmul on this CPU, measured now (the CPU MFU denominator)."""
    g = torch.Generator().manual_seed(0)  # a private generator: measuring must not move the training RNG
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    a @ b
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


GPU_BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "A10": 125e12, "L4": 121e12, "4090": 165e12}


_CPU_PEAK: dict[int, float] = {}  # threads -> measured fp32 matmul FLOP/s, once per process


def device_peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak for known GPUs; on CPU the fp32 matmul peak, measured once per process and thread count
    (each stage of `lmforge run` would otherwise spend half a second re-measuring it)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in GPU_BF16_PEAK.items() if k in name), None)
    threads = torch.get_num_threads()
    if threads not in _CPU_PEAK:
        _CPU_PEAK[threads] = measure_cpu_matmul_peak()
    return _CPU_PEAK[threads]


_CPU_PEAK_REMEASURED: set[int] = set()


def raise_cpu_peak() -> float:
    """A step ran faster than the CPU peak, so the peak was measured on a busy machine: measure again (once per
    process and thread count) and keep the larger."""
    threads = torch.get_num_threads()
    if threads not in _CPU_PEAK_REMEASURED:
        _CPU_PEAK_REMEASURED.add(threads)
        _CPU_PEAK[threads] = max(_CPU_PEAK.get(threads, 0.0), measure_cpu_matmul_peak())
    return _CPU_PEAK[threads]


class MetricsLogger:
    """Append metrics to OUT/metrics.jsonl; mirror to TensorBoard or Weights & Biases when asked and installed."""

    def __init__(self, out_dir: str | Path, backend: str = "none", run_name: str = "lmforge", enabled: bool = True):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.tb = self.wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if backend == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(Path(out_dir) / "tb"))
            except ImportError:
                print("tensorboard is not installed; logging to metrics.jsonl only")
        elif backend == "wandb":
            try:
                import wandb
                self.wandb = wandb.init(project="lmforge", name=run_name)
            except ImportError:
                print("wandb is not installed; logging to metrics.jsonl only")

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        rec = {"step": step, **{k: (float(v) if isinstance(v, (int, float, np.floating)) else v) for k, v in metrics.items()}}
        with open(self.path, "a", encoding="utf-8") as f:  # reopened per line: survives checkpoint swaps
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        for k, v in metrics.items():
            if isinstance(v, (int, float)):
                if self.tb is not None:
                    self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)


def logged(out_dir: str | Path, step: int, metrics: dict) -> bool:
    """Whether OUT/metrics.jsonl already holds these metrics at `step` (a resumed run that had nothing left to
    train must not log its final evaluation twice)."""
    return any(r.get("step") == step and metrics.keys() <= r.keys() for r in read_metrics(out_dir)[-3:])


def read_metrics(out_dir: str | Path) -> list[dict]:
    path = Path(out_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@dataclass
class LoopHooks:
    """What a stage plugs into `train_loop`.

    micro_batch(step, micro, dist) -> batch     deterministic in (step, micro): resume is exact
    loss(model, batch) -> (loss, metrics, n_tokens)
    evaluate(model, step) -> metrics            optional, every eval_every steps and at the end
    save(model, training_state, final)          writes the checkpoint (atomically)
    split(batch, n) -> [(part, weight), ...]    optional: at most n parts whose losses (and metrics), weighted,
                                                sum to the batch's; lets a busy CPU run them side by side
                                                (cpu_threads.lanes, split_rows)
    """
    micro_batch: Callable
    loss: Callable
    save: Callable
    evaluate: Callable | None = None
    split: Callable | None = None


def split_rows(batch, n: int, labels: torch.Tensor | None = None) -> list[tuple[object, float]]:
    """LoopHooks.split for a batch of row-aligned tensors (a tuple, or a dict whose other values every part keeps;
    a tensor counts as row-aligned when its first dimension is the row count: labels' or else the first tensor's):
    at most n parts of consecutive rows. With `labels`, for a loss that is the mean over the labels that count (not
    IGNORE), each part is weighted by its share of them, and a part with none joins its neighbour (its own mean
    would be 0/0); without, for a loss summed over rows, each part weighs 1."""
    values = list(batch.values()) if isinstance(batch, dict) else list(batch)
    rows = len(labels) if labels is not None else len(next(v for v in values if isinstance(v, torch.Tensor) and v.dim()))
    counts = (labels != IGNORE).reshape(rows, -1).sum(1).tolist() if labels is not None else [1] * rows
    total = sum(counts)
    if total == 0 or rows < 2 or n < 2:
        return [(batch, 1.0)]
    bounds = []  # (start, end) of each part, none without a counted label
    for idx in torch.arange(rows).tensor_split(n):
        if len(idx) == 0:
            continue
        a, b = int(idx[0]), int(idx[-1]) + 1
        if bounds and (sum(counts[a:b]) == 0 or sum(counts[slice(*bounds[-1])]) == 0):
            bounds[-1] = (bounds[-1][0], b)  # joins the part before (or takes in an empty first part)
        else:
            bounds.append((a, b))

    def take(t, a, b):
        return t[a:b] if isinstance(t, torch.Tensor) and t.dim() >= 1 and len(t) == rows else t

    parts = []
    for a, b in bounds:
        part = {k: take(v, a, b) for k, v in batch.items()} if isinstance(batch, dict) else tuple(take(t, a, b) for t in batch)
        parts.append((part, sum(counts[a:b]) / total if labels is not None else 1.0))
    return parts


def train_loop(model: torch.nn.Module, optim_cfg: OptimConfig, hooks: LoopHooks, out_dir: str | Path,
               device: torch.device, resume_state: dict | None = None, eval_every: int = 0, save_every: int = 0,
               log_every: int = 10, flops_per_token: float | None = None, logger: MetricsLogger | None = None,
               dist_info: DistInfo | None = None, progress: bool = True, desc: str = "train",
               stop_step: int = 0) -> list[dict]:
    """Run optimizer steps `start..max_steps` with accumulation, clipping, schedule, logging, eval and saves.

    stop_step > 0 ends the run early after that step, with a checkpoint (for time-limited or preemptible
    jobs); the schedule still spans max_steps, so `--resume` continues exactly where it stopped.
    Returns the per-step log records (loss, lr, tokens/s, MFU and any stage metrics).
    """
    from tqdm import tqdm

    dist_info = dist_info or DistInfo()
    logger = logger or MetricsLogger(out_dir, enabled=dist_info.is_main)
    raw_model = model
    sharded = dist_info.world_size > 1 and optim_cfg.fsdp
    if sharded:  # FSDP2: the model itself is sharded in place
        shard_model(raw_model)
    elif dist_info.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dist_info.local_rank] if device.type == "cuda" else None)
    optimizer = build_optimizer(raw_model, optim_cfg)
    accum = local_grad_accum(optim_cfg.grad_accum, dist_info.world_size)
    start = 0
    if resume_state is not None:
        load_optimizer_state(raw_model, optimizer, resume_state["optimizer"], sharded)
        start = int(resume_state["step"])
        set_rng_state(resume_state["rng"])
    peak = device_peak_flops(device) if flops_per_token else None
    history: list[dict] = []
    model.train()
    end = min(stop_step, optim_cfg.max_steps) if stop_step > 0 else optim_cfg.max_steps
    bar = tqdm(range(start, end), initial=start, total=optim_cfg.max_steps, desc=desc,
               disable=not (progress and dist_info.is_main), dynamic_ncols=True, leave=False)
    t_last = time.perf_counter()
    guard = NonFiniteGuard(optim_cfg.max_skipped_steps)
    # StopRequest: Ctrl-C / SIGTERM finish the step, save, stop; adaptive: room for other programs' busy cores
    # A busy CPU may run each batch's parts side by side in single-threaded lanes (cpu_threads.lanes): one
    # process (no DDP), not compiled (the parts' new shapes would recompile it), and not with gradient
    # checkpointing (its recompute restores the global RNG state, which two lanes would overwrite: wrong dropout).
    can_split = (hooks.split is not None and dist_info.world_size == 1 and not hasattr(raw_model, "_orig_mod")
                 and not getattr(raw_model, "gradient_checkpointing", False))

    def forward_backward(batch, weight: float = 1.0) -> tuple[float, dict, int]:
        """One micro-batch (or a weighted part of one): backward of its share of the step's loss."""
        with autocast(device):
            loss, metrics, ntok = hooks.loss(model, batch)
        if weight != 1.0:
            loss = loss * weight
        # A non-finite loss still goes through backward: its NaN gradients reach every rank's all-reduce,
        # so all ranks see a non-finite norm below and skip the same step (no rank waits for another).
        # DDP averages gradients over processes, so each divides by its own share: the mean over grad_accum.
        (loss / accum).backward()
        return loss.item() / accum, {k: float(v) * weight / accum for k, v in metrics.items()}, ntok

    with StopRequest() as stop, cpu_threads.adaptive():
        for step in bar:
            threads = cpu_threads.adapt(device)
            lanes = cpu_threads.lanes(device) if can_split else 1
            lr = lr_at(step, optim_cfg)
            for g in optimizer.param_groups:
                g["lr"] = lr
            total_loss, n_tokens, metrics_sum, parts_run = 0.0, 0, {}, 1
            for j in range(accum):
                # Micro-batch `micro` of the step's grad_accum, whichever process runs it: the data of a step
                # does not depend on the number of processes (resume on another count continues the same run).
                micro = j * dist_info.world_size + dist_info.rank
                batch = hooks.micro_batch(step, micro, dist_info)
                sync = j == accum - 1 or dist_info.world_size == 1
                if sharded:  # reduce-scatter the gradients once, after the last micro-batch
                    model.set_requires_gradient_sync(sync)
                ctx = contextlib.nullcontext() if sync or sharded else model.no_sync()
                if lanes > 1:
                    parts = hooks.split(batch, lanes)
                    parts_run = max(parts_run, len(parts))
                    results = cpu_threads.run_lanes(lambda part: forward_backward(*part), parts)
                else:
                    with ctx:
                        results = [forward_backward(batch)]
                for loss_value, metrics, ntok in results:
                    total_loss += loss_value
                    n_tokens += ntok
                    for k, v in metrics.items():
                        metrics_sum[k] = metrics_sum.get(k, 0.0) + v
            if dist_info.world_size > 1:  # log the step's numbers, not this process's share of them
                total_loss, n_tokens, metrics_sum = mean_over_processes(total_loss, n_tokens, metrics_sum, device)
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), optim_cfg.grad_clip if optim_cfg.grad_clip > 0 else float("inf"))
            if hasattr(grad_norm, "full_tensor"):  # FSDP2: a sharded (DTensor) norm
                grad_norm = grad_norm.full_tensor()
            if guard.check(math.isfinite(total_loss) and bool(torch.isfinite(grad_norm)), step + 1):
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            now = time.perf_counter()
            dt, t_last = now - t_last, now
            tok_s = n_tokens / dt
            rec = {"loss": total_loss, "lr": lr, "grad_norm": float(grad_norm), "tokens_per_s": tok_s, **metrics_sum}
            if guard.skipped:
                rec["skipped_steps"] = guard.skipped
            if threads:
                rec["cpu_threads"] = threads  # fewer while another program kept a core busy
            if parts_run > 1:
                rec["cpu_lanes"] = parts_run  # the batch ran in single-threaded parts while another program was busy
            if peak and flops_per_token:  # per device: this process's tokens against one device's peak
                achieved = flops_per_token * n_tokens / dist_info.world_size / dt
                if achieved > peak and device.type == "cpu" and not threads and parts_run == 1:
                    peak = max(peak, raise_cpu_peak())
                rec["mfu"] = achieved / peak
            done = step + 1
            if hooks.evaluate is not None and eval_every and (done % eval_every == 0 or done == optim_cfg.max_steps):
                rec.update(hooks.evaluate(raw_model, done))
                model.train()
            history.append({"step": done, **rec})
            if done % log_every == 0 or done == optim_cfg.max_steps or "val_loss" in rec:
                logger.log(done, rec)
            bar.set_postfix(loss=f"{total_loss:.3f}", lr=f"{lr:.1e}", tok_s=f"{tok_s:,.0f}",
                            **({"mfu": f"{rec['mfu']:.0%}"} if "mfu" in rec else {}))
            final = done == optim_cfg.max_steps
            interrupted = not final and stop.requested(dist_info, device)
            if (save_every and done % save_every == 0) or final or done == end or interrupted:
                if sharded:  # gathered by every process onto rank 0, saved as a plain checkpoint
                    weights, optim_state = full_state(raw_model, optimizer)
                    if dist_info.is_main:
                        hooks.save(unsharded_copy(raw_model, weights),
                                   {"optimizer": optim_state, "step": done, "rng": rng_state()}, final)
                elif dist_info.is_main:
                    hooks.save(raw_model, {"optimizer": optimizer.state_dict(), "step": done, "rng": rng_state()}, final)
            if interrupted:
                bar.close()
                if dist_info.is_main:
                    stop.announce(f"step {done}", out_dir)
                raise KeyboardInterrupt
            t_last = time.perf_counter()  # time the next step alone, not this step's eval and save
    bar.close()
    return history
