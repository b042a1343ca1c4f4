"""The tokenizer stage: byte-level BPE trained on the corpus (`lmforge tokenizer train`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.cli import Command, Flag
from lmforge.errors import ConfigError
from lmforge.rundir import check_output_dir
from lmforge.stage import Stage, StageContext
from lmforge.tokenizer import TOKENIZER_FILE, train_tokenizer


@dataclass
class TokenizerConfig:
    """`lmforge tokenizer train` settings."""
    input: list[str] = field(default_factory=list)   # .txt (blank-line separated documents), .jsonl {"text"}, .gz
    out: str = ""                   # output directory (tokenizer.json)
    vocab_size: int = 4096          # including the byte alphabet and the chat special tokens
    min_frequency: int = 2          # merges of rarer pairs are not learned

    def validate(self) -> None:
        if not self.input:
            raise ConfigError("input", "must list at least one corpus file")
        if not self.out:
            raise ConfigError("out", "is required")


def run_tokenizer(cfg: TokenizerConfig) -> dict:
    """Train the tokenizer into cfg.out; returns its vocabulary size and the seconds it took."""
    check_output_dir(cfg.out)
    t0 = time.perf_counter()
    tok = train_tokenizer(cfg.input, cfg.vocab_size, cfg.out, cfg.min_frequency)
    return {"vocab_size": tok.vocab_size, "seconds": time.perf_counter() - t0}


def _print_summary(cfg: TokenizerConfig) -> None:
    s = run_tokenizer(cfg)
    print(f"trained tokenizer: {s['vocab_size']} tokens in {s['seconds']:.1f}s -> {Path(cfg.out) / TOKENIZER_FILE}")


COMMAND = Command(
    "lmforge tokenizer train", "Train a byte-level BPE tokenizer with chat special tokens on .txt/.jsonl(.gz) files.",
    TokenizerConfig, _print_summary,
    flags=(Flag("--input", "input", "corpus files"), Flag("--vocab-size", "vocab_size"), Flag("--out", "out")),
    examples=("lmforge tokenizer train --input runs/lmforge-tiny/world/corpus.txt --vocab-size 1024 --out runs/tok",))


def _wire(ctx: StageContext) -> dict:
    corpus = ctx.artifact("corpus")
    return {"input": corpus if isinstance(corpus, list) else [corpus], "out": ctx.dir("tokenizer")}


STAGE = Stage("tokenizer", TokenizerConfig, lambda ctx, cfg: {"vocab_size": run_tokenizer(cfg)["vocab_size"]},
              inputs=("corpus",), outputs={"tokenizer": ""}, wire=_wire)
