"""Checkpoint directories: config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
generation_config.json, optionally training_state.pt, and manifest.json (size and sha256 of each).

The layout is Hugging Face's, so a policy directory loads with transformers' AutoModelForCausalLM and
AutoTokenizer as it is, and a Hugging Face folder of the Llama family or Qwen2 loads here as it is
(`hf:PATH` says so explicitly; `gguf:FILE` converts a GGUF file once, see lmforge.hf).

Writes are atomic: everything goes into a temporary sibling directory that is renamed into place, so a crash
mid-save never damages the latest good checkpoint. Loading is safe: the files are checked against the manifest
first (a truncated or modified file is one clear error), weights come through safetensors and the training state
through `torch.load(..., weights_only=True)`: loading never runs code from a checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lmforge.chat import stop_ids
from lmforge.errors import LmforgeError
from lmforge.model import ModelConfig, Transformer, rope_inv_freq, rotary_table
from lmforge.tokenizer import Tokenizer

CONFIG_FILE, WEIGHTS_FILE, STATE_FILE = "config.json", "model.safetensors", "training_state.pt"
GENERATION_CONFIG_FILE = "generation_config.json"
# Tests set LMFORGE_TEST_SAVE_DELAY (seconds) to hold every save in its most fragile moment (the previous
# checkpoint renamed aside, the new one not yet in place), so a SIGKILL lands inside it.
_SAVE_DELAY = float(os.environ.get("LMFORGE_TEST_SAVE_DELAY", "0") or 0)
MANIFEST_FILE = "manifest.json"  # size and sha256 of every file the checkpoint wrote
OWNED_FILES = {CONFIG_FILE, WEIGHTS_FILE, STATE_FILE, GENERATION_CONFIG_FILE, "tokenizer.json",
               "tokenizer_config.json", "chat_template.jinja", MANIFEST_FILE}
SUPPORTED = "Llama family (Llama, SmolLM, TinyLlama, Mistral without sliding window) or Qwen2"


def hf_architecture(cfg: ModelConfig, head: str) -> tuple[str, str]:
    """(model_type, class name) under which transformers loads a model of this config and head."""
    family = "qwen2" if cfg.qkv_bias and not cfg.o_proj_bias else "llama"
    prefix = {"llama": "Llama", "qwen2": "Qwen2"}[family]
    return family, prefix + ("ForSequenceClassification" if head == "scalar" else "ForCausalLM")


def _hf_fields(model: Transformer, tok: Tokenizer) -> dict:
    """The fields transformers' LlamaConfig / Qwen2Config read, so the directory loads in transformers as is."""
    c = model.config
    model_type, arch = hf_architecture(c, model.head)
    if not c.is_causal:  # no transformers class runs a bidirectional Llama: make AutoModel refuse, not misload
        model_type, arch = "lmforge_encoder", "LmforgeEncoder"
    fields = {
        "architectures": [arch],
        "model_type": model_type,
        "hidden_act": "silu",
        "attention_bias": c.o_proj_bias,
        "bos_token_id": tok.special.bos,
        "eos_token_id": stop_ids(tok),
        "pad_token_id": tok.special.pad,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }
    if model_type == "qwen2":
        fields.update(use_sliding_window=False, sliding_window=None)
    if model.head == "scalar":
        fields.update(num_labels=1, id2label={"0": "score"}, label2id={"score": 0})
    return fields


def atomic_directory_write(target: Path, write_fn) -> None:
    """Call write_fn(tmp_dir) then swap tmp_dir into `target` (keeping the previous one until the swap)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    old = target.parent / f".{target.name}.old"
    try:
        tmp.mkdir()
        try:
            write_fn(tmp)
            write_manifest(tmp)
        except OSError as e:
            raise LmforgeError(f"{target}: could not write the checkpoint ({e.strerror or e}); the previous "
                               "checkpoint, if any, is intact") from None
        except Exception as e:  # safetensors reports I/O errors as its own exception type
            if "No space left" not in str(e) and "StorageFull" not in str(e):
                raise
            raise LmforgeError(f"{target}: could not write the checkpoint (no space left on device); the previous "
                               "checkpoint, if any, is intact") from None
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
        if _SAVE_DELAY:  # fault injection for the crash tests: widen the window where only `.old` exists
            time.sleep(_SAVE_DELAY)
        tmp.rename(target)
        if old.exists():
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _sha256(f: Path) -> str:
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: Path) -> None:
    """manifest.json: the size and sha256 of every file now in `directory` (a checkpoint being written)."""
    files = {f.name: {"bytes": f.stat().st_size, "sha256": _sha256(f)}
             for f in sorted(directory.iterdir()) if f.is_file() and f.name != MANIFEST_FILE}
    (directory / MANIFEST_FILE).write_text(json.dumps({"format": 1, "files": files}, indent=1), encoding="utf-8")


def verify_manifest(path: Path, names: list[str] | None = None) -> None:
    """Check the files of a checkpoint against its manifest.json (all of them, or `names`), before anything reads
    them: a truncated or modified file is one clear error instead of a crash or silently wrong weights. A folder
    without a manifest (a Hugging Face download, an older lmforge checkpoint) is not checked."""
    mf = path / MANIFEST_FILE
    if not mf.is_file():
        return
    try:
        files = json.loads(mf.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise LmforgeError(f"{mf}: not a valid checkpoint manifest") from None
    for name in names if names is not None else list(files):
        if name not in files:
            continue
        f, want = path / name, files[name]
        if not f.is_file():
            raise LmforgeError(f"{f}: missing (listed in {MANIFEST_FILE}); the checkpoint is incomplete")
        size = f.stat().st_size
        if size != want["bytes"]:
            raise LmforgeError(f"{f}: {size} bytes, but the checkpoint wrote {want['bytes']}: the file is truncated "
                               "or was replaced; restore it or retrain")
        if _sha256(f) != want["sha256"]:
            raise LmforgeError(f"{f}: sha256 differs from {MANIFEST_FILE}: the file was modified or corrupted after "
                               "it was saved; restore it or retrain")


def estimate_bytes(model: torch.nn.Module, training_state: bool = True) -> int:
    """Bytes of one checkpoint of `model`: fp32 weights, plus AdamW's two moments in the training state."""
    n = sum(p.numel() for p in model.parameters())
    return 4 * n * (3 if training_state else 1)


def recover_interrupted_save(target: str | Path) -> None:
    """Undo what a crash inside `atomic_directory_write` left: if the checkpoint directory is gone and only its
    `.old` twin remains (killed between the two renames), put it back; remove half-written `.tmp-*` siblings,
    which are never taken for a checkpoint."""
    target = Path(target)
    old = target.parent / f".{target.name}.old"
    if not target.exists() and old.is_dir():
        old.rename(target)
    if target.parent.is_dir():
        for tmp in target.parent.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint directory at `path`, or its `.old` twin if a crash interrupted a swap.

    `hf:DIR` names a Hugging Face folder (read as it is); `gguf:FILE` a GGUF file, converted once into a
    cache directory (lmforge.hf.gguf_checkpoint)."""
    spec = str(path)
    if spec.startswith("gguf:"):
        from lmforge.hf import gguf_checkpoint

        return gguf_checkpoint(spec[5:])
    if spec.startswith("hf:"):
        from lmforge.hf import model_source_path

        return model_source_path(spec)
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
    if model.head == "scalar" and meta and "reward_mean" in meta:
        # transformers' logits are the raw score; this is the normalisation every lmforge consumer applies.
        config["reward_normalization"] = {"mean": meta["reward_mean"], "std": meta.get("reward_std", 1.0),
                                          "normalized_score": "(logits - mean) / std"}
    generation = {"bos_token_id": tok.special.bos, "eos_token_id": stop_ids(tok),
                  "pad_token_id": tok.special.pad}

    def write(tmp: Path):
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
        (tmp / GENERATION_CONFIG_FILE).write_text(json.dumps(generation, indent=2), encoding="utf-8")
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


def model_config_from_dict(cfg: dict, source: str = "config.json") -> ModelConfig:
    """The ModelConfig of an lmforge config.json, or of a Hugging Face one (Llama family, Mistral, Qwen2)."""
    if "lmforge" not in cfg:
        return model_config_from_hf(cfg, source)
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    mc = ModelConfig(**{k: v for k, v in cfg.items() if k in fields})
    mc.validate()
    return mc


def model_config_from_hf(cfg: dict, source: str = "config.json") -> ModelConfig:
    """Map a transformers config.json onto ModelConfig, refusing what the model here does not compute."""
    model_type = cfg.get("model_type")
    if model_type not in ("llama", "mistral", "qwen2"):
        raise LmforgeError(f"{source}: unsupported architecture {model_type!r} "
                           f"({', '.join(cfg.get('architectures') or [])}); supported: {SUPPORTED}")
    for key in ("num_experts", "num_local_experts", "moe_intermediate_size"):
        if cfg.get(key):
            raise LmforgeError(f"{source}: mixture-of-experts models are not supported ({key}={cfg[key]})")
    if model_type == "mistral" and cfg.get("sliding_window", 4096) is not None:  # transformers' default: 4096
        raise LmforgeError(f"{source}: sliding-window attention is not supported (sliding_window="
                           f"{cfg.get('sliding_window', '4096 by default')}); a Mistral with sliding_window null loads")
    if model_type == "qwen2" and cfg.get("use_sliding_window"):
        raise LmforgeError(f"{source}: sliding-window attention is not supported (use_sliding_window=true)")
    if cfg.get("hidden_act", "silu") != "silu":
        raise LmforgeError(f"{source}: activation {cfg['hidden_act']!r} is not supported (SwiGLU with silu only)")
    if cfg.get("pretraining_tp", 1) not in (1, None):
        raise LmforgeError(f"{source}: pretraining_tp={cfg['pretraining_tp']} is not supported")
    # rope: transformers < 5 writes rope_theta + rope_scaling, >= 5 one rope_parameters dict
    rope = dict(cfg.get("rope_parameters") or {})
    theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
    scaling = rope if rope.get("rope_type", "default") != "default" else cfg.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    heads = int(cfg["num_attention_heads"])
    try:
        mc = ModelConfig(
            vocab_size=int(cfg["vocab_size"]), hidden_size=int(cfg["hidden_size"]),
            num_hidden_layers=int(cfg["num_hidden_layers"]), num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            intermediate_size=int(cfg["intermediate_size"]),
            max_position_embeddings=int(cfg.get("max_position_embeddings",  # transformers' defaults
                                                {"llama": 2048, "mistral": 131072, "qwen2": 32768}[model_type])),
            rope_theta=theta, rope_scaling=scaling, rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),  # transformers' default
            head_dim=int(cfg.get("head_dim") or 0),
            qkv_bias=model_type == "qwen2" or bool(cfg.get("attention_bias")),
            o_proj_bias=model_type != "qwen2" and bool(cfg.get("attention_bias")),
            mlp_bias=bool(cfg.get("mlp_bias")))
    except KeyError as e:
        raise LmforgeError(f"{source}: missing key {e}") from None
    try:
        mc.validate()
    except LmforgeError as e:
        raise LmforgeError(f"{source}: {e}") from None
    return mc


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory in fp32: model.safetensors, sharded safetensors
    (model.safetensors.index.json), or pytorch_model.bin (read with weights_only=True)."""
    index = path / "model.safetensors.index.json"
    try:
        if (path / WEIGHTS_FILE).is_file():
            state = load_file(str(path / WEIGHTS_FILE))
        elif index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state = {k: v for shard in shards for k, v in load_file(str(path / shard)).items()}
        elif (path / "pytorch_model.bin").is_file():
            state = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
        else:
            raise LmforgeError(f"{path}: no weights ({WEIGHTS_FILE}, sharded safetensors or pytorch_model.bin)")
    except LmforgeError:
        raise
    except Exception as e:
        raise LmforgeError(f"{path}: cannot read weights ({e})") from None
    # Old Llama checkpoints carry rotary tables; fp16/bf16 weights train here in fp32.
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items() if "rotary_emb" not in k}


def load_model(path: str | Path, head: str | None = None,
               device: str | torch.device = "cpu") -> tuple[Transformer, Tokenizer, dict]:
    """Load (model, tokenizer, lmforge metadata). `head` may differ from the saved one: missing head
    weights stay freshly initialised (e.g. a reward model built on an SFT checkpoint)."""
    path = resolve_checkpoint(path)
    verify_manifest(path, [n for n in OWNED_FILES if n != STATE_FILE])
    cfg = read_config(path)
    meta = dict(cfg.get("lmforge", {}))
    saved_head = meta.get("head")
    if saved_head is None:  # a Hugging Face folder: the class says which head it has
        saved_head = "scalar" if any("SequenceClassification" in a for a in cfg.get("architectures") or []) else "lm"
        if saved_head == "scalar" and int(cfg.get("num_labels", len(cfg.get("id2label") or {0: 0}))) != 1:
            raise LmforgeError(f"{path / CONFIG_FILE}: a sequence classifier with num_labels != 1 is not a reward model")
    mc = model_config_from_dict(cfg, str(path / CONFIG_FILE))
    state = read_weights(path)
    if "score.bias" in state:  # lmforge < 2026-12 had a score bias: fold it into the normalisation it fed
        meta["reward_mean"] = float(meta.get("reward_mean", 0.0)) - float(state.pop("score.bias").reshape(-1)[0])
    with torch.device("meta"):  # no throwaway random init of a large model: weights come from the file
        model = Transformer(mc, head=head or saved_head)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for name, t in state.items():  # a shape mismatch is named in one line, before torch's long message
        if name in shapes and tuple(t.shape) != shapes[name]:
            raise LmforgeError(f"{path}: weight {name} has shape {tuple(t.shape)}, but config.json implies "
                               f"{shapes[name]}")
    model.to_empty(device="cpu")
    model.inv_freq.copy_(rope_inv_freq(mc))
    model.rope.copy_(rotary_table(model.inv_freq, mc.max_position_embeddings))
    # A head the checkpoint lacks (a reward model built on an SFT checkpoint) starts freshly initialised.
    if hasattr(model, "lm_head") and not mc.tie_word_embeddings and "lm_head.weight" not in state:
        torch.nn.init.normal_(model.lm_head.weight, 0.0, mc.init_std)
    if hasattr(model, "score") and "score.weight" not in state:
        model.init_scalar_head()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # A head the checkpoint never had stays freshly initialised; a head the caller does not want is dropped.
    new_heads = {"lm": ("score.",), "scalar": ("lm_head.",), "both": ()}[saved_head]
    missing = [k for k in missing if not k.startswith(new_heads)
               and not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
    unexpected = [k for k in unexpected if not k.startswith(("score.", "lm_head."))]
    if missing or unexpected:
        raise LmforgeError(f"{path}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if mc.tie_word_embeddings and hasattr(model, "lm_head"):
        model.lm_head.weight = model.model.embed_tokens.weight  # to_empty() untied them
    tok = Tokenizer.load(path)
    return model.to(device), tok, meta


def load_causal_lm(path: str | Path, what: str, device: str | torch.device = "cpu"
                   ) -> tuple[Transformer, Tokenizer, dict]:
    """Load a checkpoint that must generate text (a policy): refuse, in one line naming it and `what` needs it,
    a reward or value model (scalar head: its LM head would be random) and a bidirectional encoder, before any
    weights are read."""
    resolved = resolve_checkpoint(path)
    cfg = read_config(resolved)
    head = cfg.get("lmforge", {}).get("head")
    if head == "scalar" or (head is None and any("SequenceClassification" in a
                                                 for a in cfg.get("architectures") or [])):
        raise LmforgeError(f"{path} is a reward/value model (scalar head), not a language model; {what} needs a "
                           "policy checkpoint (pretrain, sft, ppo, dpo or grpo output)")
    if not model_config_from_dict(cfg, str(resolved / CONFIG_FILE)).is_causal:
        raise LmforgeError(f"{path} is a bidirectional encoder (masked LM); {what} needs a causal language model")
    return load_model(path, head="lm", device=device)


def load_training_state(path: str | Path) -> dict | None:
    """The training state saved with a checkpoint (optimizer, scheduler, step, RNG), or None."""
    f = resolve_checkpoint(path) / STATE_FILE
    if not f.is_file():
        return None
    verify_manifest(f.parent, [STATE_FILE])
    return torch.load(f, map_location="cpu", weights_only=True)
