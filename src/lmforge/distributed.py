"""Several processes on PyTorch's own engine (torchrun): who this process is, and the few collectives the
training loops need beyond DDP. Every training stage runs unchanged under `torchrun --nproc_per_node N`:

- train_loop stages (pretrain, SFT, reward model, DPO): a step is always batch_size x grad_accum sequences; each
  process runs grad_accum / N of its micro-batches, chosen by their index in the step, so the data of a step does
  not depend on N. DDP averages gradients (or FSDP2 shards parameters, gradients and optimizer state:
  `optim.fsdp=true`); checkpoints are gathered into the usual single directory by rank 0.
- PPO and GRPO (lmforge.rollout.RLTrainer): each process samples a contiguous share of every batch, the batch's
  rewards and statistics are computed on the gathered rows (`gather_rows`), losses are normalised by the whole
  minibatch and gradients summed (`sum_gradients`).
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lmforge.errors import LmforgeError


@dataclass
class DistInfo:
    """Which process this is: one process is rank 0 of 1. Rank 0 logs and writes checkpoints."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); otherwise single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        atexit.register(_leave_process_group)
    info = DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
    return info


def _leave_process_group() -> None:
    """Destroy the process group at exit, while the interpreter is still whole: left to interpreter finalization,
    Gloo's worker threads can still hold tensors and abort the process ("terminate called without an active
    exception", pytorch/pytorch#190489; seen once in tests/test_distributed.py's FSDP2 run)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def local_grad_accum(grad_accum: int, world_size: int) -> int:
    """Micro-batches per process and step. A step is always batch_size x grad_accum (the configured global
    batch): N processes each run grad_accum / N of its micro-batches."""
    if grad_accum % world_size:
        raise LmforgeError(f"config key 'optim.grad_accum' ({grad_accum}) must be a multiple of the number of "
                           f"processes ({world_size}): a step is batch_size x grad_accum, shared by the processes")
    return grad_accum // world_size


def mean_over_processes(loss: float, n_tokens: int, metrics: dict, device) -> tuple[float, int, dict]:
    """The step's loss and metrics averaged over processes (each process's numbers are means over equal shares)
    and its token count summed: one all-reduce."""
    keys = sorted(metrics)
    t = torch.tensor([loss, float(n_tokens), *(metrics[k] for k in keys)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    world = dist.get_world_size()
    vals = t.tolist()
    return vals[0] / world, int(vals[1]), {k: v / world for k, v in zip(keys, vals[2:])}


def gather_rows(tensors: list[torch.Tensor], dist_info: DistInfo) -> list[torch.Tensor]:
    """Every process's rows of each tensor, in rank order (one process: the tensors themselves). Tensors of
    shape (rows, width) are zero-padded to the widest first. With each process holding a contiguous slice of a
    batch, this is the batch one process would hold."""
    if dist_info.world_size == 1:
        return tensors
    out = []
    for x in tensors:
        if x.dim() == 2:
            width = torch.tensor([x.shape[1]], device=x.device)
            dist.all_reduce(width, op=dist.ReduceOp.MAX)
            x = torch.nn.functional.pad(x, (0, int(width) - x.shape[1]))
        parts = [torch.empty_like(x) for _ in range(dist_info.world_size)]
        dist.all_gather(parts, x.contiguous())
        out.append(torch.cat(parts))
    return out


def sum_gradients(model: torch.nn.Module) -> None:
    """All-reduce (sum) the gradients of `model` over processes in one flat buffer. PPO normalises its losses
    by the token count of the whole (all-process) minibatch, so the sum is the minibatch's gradient."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def shard_model(model: torch.nn.Module) -> None:
    """FSDP2 (torch.distributed.fsdp.fully_shard): each block, then the whole model, sharded over the processes,
    in place. Only full fine-tuning: with LoRA the frozen base is what would need sharding, and it is replicated."""
    from torch.distributed.fsdp import fully_shard

    if hasattr(model, "_orig_mod"):
        raise LmforgeError("config keys 'compile' and 'optim.fsdp': shard first, compile after is not wired up; "
                           "use one of them")
    if not all(p.requires_grad for p in model.parameters()):
        raise LmforgeError("config key 'optim.fsdp': FSDP2 shards full fine-tuning only (not LoRA)")
    for block in model.model.layers:
        fully_shard(block)
    fully_shard(model)


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """The whole model's and optimizer's state from a sharded model, on rank 0 (CPU); empty on the others. A
    collective: every process calls it. The optimizer state is keyed by parameter name."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def unsharded_copy(model: torch.nn.Module, weights: dict) -> torch.nn.Module:
    """A plain Transformer (CPU) with the gathered `weights` of a sharded one: what save_checkpoint writes."""
    from lmforge.model import Transformer

    plain = Transformer(model.config, head=model.head)
    plain.load_state_dict(weights)
    return plain


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict,
                         sharded: bool) -> None:
    """Restore a saved optimizer state into `optimizer`, whether it was saved plain (keyed by position) or gathered
    from a sharded run (keyed by name), into a plain or a sharded model: a run resumes with or without FSDP2."""
    by_name = bool(state["state"]) and isinstance(next(iter(state["state"])), str)
    if not sharded and not by_name:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if not by_name:  # positions follow the parameter groups' order, the same in a plain and a sharded model
        name_of = {id(p): n for n, p in model.named_parameters()}
        names = [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]
        state = {"state": {names[k]: v for k, v in state["state"].items()},
                 "param_groups": [{**g, "params": [names[k] for k in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
