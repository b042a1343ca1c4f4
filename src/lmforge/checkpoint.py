"""Checkpoint directories: config.json, model.safetensors, tokenizer.json, and optionally training_state.pt.

Writes are atomic: everything goes into a temporary sibling directory that is renamed into place, so a crash
mid-save never damages the latest good checkpoint. Loading is safe: safetensors for weights and
`torch.load(..., weights_only=True)` for the training state.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lmforge.errors import LmforgeError
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer import Tokenizer

CONFIG_FILE, WEIGHTS_FILE, STATE_FILE = "config.json", "model.safetensors", "training_state.pt"
OWNED_FILES = {CONFIG_FILE, WEIGHTS_FILE, STATE_FILE, "tokenizer.json"}


def _hf_fields(model: Transformer, tok: Tokenizer) -> dict:
    """The fields transformers' LlamaConfig reads, so a later exporter needs no renaming."""
    return {
        "architectures": ["LlamaForCausalLM"] if model.head != "scalar" else ["LlamaForSequenceClassification"],
        "model_type": "llama",
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": tok.special.bos,
        "eos_token_id": [tok.special.end, tok.special.eos],
        "pad_token_id": tok.special.pad,
        "torch_dtype": "float32",
    }


def atomic_directory_write(target: Path, write_fn) -> None:
    """Call write_fn(tmp_dir) then swap tmp_dir into `target` (keeping the previous one until the swap)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    old = target.parent / f".{target.name}.old"
    try:
        tmp.mkdir()
        write_fn(tmp)
        if target.is_dir():  # keep the run's other files (metrics.jsonl, samples, plots) across the swap
            for f in target.iterdir():
                if f.is_file() and f.name not in OWNED_FILES and not (tmp / f.name).exists():
                    shutil.copy2(f, tmp / f.name)
        for f in tmp.iterdir():  # make sure bytes are on disk before the rename publishes them
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if old.exists():
            shutil.rmtree(old)
        if target.exists():
            target.rename(old)
        tmp.rename(target)
        if old.exists():
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint directory at `path`, or its `.old` twin if a crash interrupted a swap."""
    path = Path(path)
    if (path / CONFIG_FILE).is_file():
        return path
    old = path.parent / f".{path.name}.old"
    if (old / CONFIG_FILE).is_file():
        return old
    raise LmforgeError(f"{path}: not a checkpoint directory (no {CONFIG_FILE})")


def save_checkpoint(path: str | Path, model: Transformer, tok: Tokenizer, meta: dict | None = None,
                    training_state: dict | None = None) -> None:
    """Save model weights, config (architecture + lmforge metadata), tokenizer and optional training state."""
    model = getattr(model, "module", model)  # unwrap DDP
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings and "lm_head.weight" in state:
        del state["lm_head.weight"]  # safetensors refuses shared tensors; HF re-ties on load
    config = {**dataclasses.asdict(model.config), **_hf_fields(model, tok),
              "lmforge": {"head": model.head, "tokenizer_fingerprint": tok.fingerprint(), **(meta or {})}}

    def write(tmp: Path):
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
        tok.save(tmp)
        if training_state is not None:
            torch.save(training_state, tmp / STATE_FILE)

    atomic_directory_write(Path(path), write)


def read_config(path: str | Path) -> dict:
    """config.json of a checkpoint directory."""
    path = resolve_checkpoint(path)
    try:
        return json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LmforgeError(f"{path / CONFIG_FILE}: invalid JSON ({e})") from None


def model_config_from_dict(cfg: dict) -> ModelConfig:
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    mc = ModelConfig(**{k: v for k, v in cfg.items() if k in fields})
    mc.validate()
    return mc


def load_model(path: str | Path, head: str | None = None, device: str | torch.device = "cpu",
               strict: bool = True) -> tuple[Transformer, Tokenizer, dict]:
    """Load (model, tokenizer, lmforge metadata). `head` may differ from the saved one: missing head
    weights stay freshly initialised (e.g. a reward model built on an SFT checkpoint)."""
    path = resolve_checkpoint(path)
    cfg = read_config(path)
    saved_head = cfg.get("lmforge", {}).get("head", "lm")
    model = Transformer(model_config_from_dict(cfg), head=head or saved_head)
    try:
        state = load_file(str(path / WEIGHTS_FILE))
    except Exception as e:
        raise LmforgeError(f"{path / WEIGHTS_FILE}: cannot read weights ({e})") from None
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # A head the checkpoint never had stays freshly initialised; a head the caller does not want is dropped.
    new_heads = {"lm": ("score.",), "scalar": ("lm_head.",), "both": ()}[saved_head]
    missing = [k for k in missing if not k.startswith(new_heads)
               and not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
    unexpected = [k for k in unexpected if not k.startswith(("score.", "lm_head."))]
    if strict and (missing or unexpected):
        raise LmforgeError(f"{path}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    tok = Tokenizer.load(path)
    return model.to(device), tok, cfg.get("lmforge", {})


def load_training_state(path: str | Path) -> dict | None:
    """The training state saved with a checkpoint (optimizer, scheduler, step, RNG), or None."""
    f = resolve_checkpoint(path) / STATE_FILE
    if not f.is_file():
        return None
    return torch.load(f, map_location="cpu", weights_only=True)
