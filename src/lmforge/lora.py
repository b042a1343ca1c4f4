"""LoRA: low-rank adapters on the linear layers of a frozen model (Hu et al. 2021, arXiv 2106.09685).

A target layer y = W x becomes y = W x + (alpha / r) * B A dropout(x), with A (r x in) random and B (out x r)
zero at the start, so the adapted model starts exactly at the base model. Only A and B train. For saving, the
update is merged into the base weight, W' = W + (alpha / r) * B A, so the output is a plain checkpoint that
every later stage (and `lmforge generate`) loads without knowing LoRA was used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.errors import ConfigError, LmforgeError
from lmforge.model import Transformer

# The linear layers of a Llama block, by their Hugging Face names. "all-linear" means all of them (as in PEFT,
# the LM head is not adapted).
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraConfig:
    """rank 0 = off (full fine-tuning). targets: layer names (q_proj, v_proj, ...) or 'all-linear'."""
    rank: int = 0                   # adapter rank r; 0 = LoRA off (full fine-tuning)
    alpha: float = 16.0             # the update is scaled by alpha / r
    dropout: float = 0.0            # dropout on the adapter's input
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])   # layer names or all-linear
    layers: int = 0                 # adapt only the last N blocks (0 = all): backward stops below them (cheaper)

    def validate(self) -> None:
        if self.rank < 0:
            raise ConfigError("rank", "must be >= 0 (0 = LoRA off)")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("dropout", "must be in [0, 1)")
        if self.rank and self.alpha <= 0:
            raise ConfigError("alpha", "must be positive")
        for t in self.targets:
            if t not in LINEAR_NAMES + ("all-linear",):
                raise ConfigError("targets", f"names an unknown layer {t!r} "
                                   f"(expected {', '.join(LINEAR_NAMES)} or all-linear)")
        if self.rank and not self.targets:
            raise ConfigError("targets", "must name at least one layer")
        if self.layers < 0:
            raise ConfigError("layers", "must be >= 0 (0 = every block)")

    def validate_as(self, key: str) -> None:
        """validate(), naming keys under `key` ('lora.rank'): for a parent config validated outside the loader."""
        try:
            self.validate()
        except ConfigError as e:
            raise e.under(f"{key}.") from None

    def target_names(self) -> tuple[str, ...]:
        return LINEAR_NAMES if "all-linear" in self.targets else tuple(self.targets)


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update (alpha / r) * B A."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        base.weight.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        # A as nn.Linear's default init (what PEFT uses); B = 0 so training starts at the base model.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        update = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)
        return self.base(x) + update * self.scaling

    def merged_weight(self) -> torch.Tensor:
        """W + (alpha / r) * B A, computed in fp32."""
        delta = self.lora_B.detach().float() @ self.lora_A.detach().float()
        return (self.base.weight.detach().float() + self.scaling * delta).to(self.base.weight.dtype)


def apply_lora(model: Transformer, cfg: LoraConfig, keep_trainable: tuple[str, ...] = ()) -> list[str]:
    """Freeze every parameter of `model` and wrap the target linear layers with LoRA adapters, in place.

    Parameters whose names start with a prefix in `keep_trainable` stay trainable: a freshly initialised head
    (`score.` of a reward or value model) has nothing to adapt, it must learn. Returns the wrapped layers' names.
    """
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(keep_trainable))  # startswith(()) is False: all frozen
    targets, wrapped = cfg.target_names(), []
    n_layers = model.config.num_hidden_layers
    first = n_layers - min(cfg.layers, n_layers) if cfg.layers else 0
    blocks = tuple(f"model.layers.{i}." for i in range(first, n_layers))
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, nn.Linear) and (name + ".").startswith(blocks):
                setattr(module, child_name, LoRALinear(child, cfg.rank, cfg.alpha, cfg.dropout))
                wrapped.append(f"{name}.{child_name}")
    if not wrapped:
        raise LmforgeError(f"config key 'lora.targets': no layer of the model matches {cfg.targets}")
    return wrapped


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable tensor (adapters and any head kept trainable), on CPU: what a LoRA resume needs besides
    the frozen base weights, which come from the run's init checkpoint."""
    return {k: p.detach().cpu().clone() for k, p in model.named_parameters() if p.requires_grad}


def load_trainable_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load tensors saved by `trainable_state_dict` into a model set up the same way (same adapters and heads)."""
    own = {k: p for k, p in model.named_parameters() if p.requires_grad}
    if own.keys() != state.keys():
        missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
        raise LmforgeError(f"saved trainable weights do not match the model: its LoRA set-up (targets, rank, layers) "
                           f"does not match the saved one (missing {missing[:3]}, unexpected {unexpected[:3]})")
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The plain model's state dict with every adapter merged: `...q_proj.weight` = W + (alpha / r) * B A."""
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            state[f"{name}.weight"] = module.merged_weight()
    for k, v in model.state_dict().items():
        if k.rsplit(".", 1)[-1] in ("lora_A", "lora_B"):
            continue
        k = k.replace(".base.", ".")
        state.setdefault(k, v.detach())
    return state


def merge_lora(model: Transformer) -> Transformer:
    """Replace every LoRALinear of `model` by a plain nn.Linear holding the merged weight, in place."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                base = child.base
                with torch.no_grad():
                    base.weight.copy_(child.merged_weight())
                setattr(module, child_name, base)
    return model


def merged_copy(model: Transformer, device: str | torch.device = "cpu") -> Transformer:
    """A plain Transformer (no adapters) with the merged weights, on `device`; `model` is left untouched."""
    with torch.random.fork_rng(devices=[]):  # the throwaway init must not move the training RNG
        plain = Transformer(model.config, head=model.head)
        if getattr(getattr(model, "score", None), "bias", None) is not None:  # a critic's folded normalisation
            plain.score = torch.nn.Linear(plain.score.in_features, 1, bias=True)
    state = {k: v.to(device) for k, v in merged_state_dict(model).items()}
    plain.load_state_dict(state)
    return plain.to(device)


def has_lora(model: nn.Module) -> bool:
    """Whether `model` carries LoRA adapters."""
    return any(isinstance(m, LoRALinear) for m in model.modules())


def plain_model(model: Transformer) -> Transformer:
    """`model` itself, or a merged copy on the CPU if it carries adapters: what a checkpoint holds."""
    return merged_copy(model) if has_lora(model) else model


def check_resume_rank(out, meta: dict, key: str, rank: int) -> None:
    """Refuse to resume a run whose checkpoint meta records another `<key>_rank`: its adapters would not fit."""
    saved = meta.get(f"{key}_rank", 0)
    if saved != rank:
        raise LmforgeError(f"{out}: cannot resume: config key '{key}.rank' differs (checkpoint {saved})")
