"""The data stage: the corpus tokenized into token shards for pretraining (`lmforge data prepare`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from lmforge.cli import Command, Flag
from lmforge.data import DOCUMENT_MODES, prepare_data
from lmforge.errors import ConfigError
from lmforge.stage import Stage, StageContext


@dataclass
class DataConfig:
    """`lmforge data prepare` settings."""
    input: list[str] = field(default_factory=list)   # .txt (split per `documents`), .jsonl {"text"} per line, .gz
    documents: str = "blank_line"   # .txt documents: blank_line (separated by blank lines) or line (each non-blank line)
    tokenizer: str = ""             # tokenizer directory (`lmforge tokenizer train`)
    out: str = ""                   # output directory: shards + manifest.json
    val_fraction: float = 0.005     # share of documents held out for validation
    shard_tokens: int = 100_000_000  # tokens per shard file

    def validate(self) -> None:
        for key in ("input", "tokenizer", "out"):
            if not getattr(self, key):
                raise ConfigError(key, "is required")
        if self.documents not in DOCUMENT_MODES:
            raise ConfigError("documents", f"must be blank_line or line, got {self.documents!r}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError("val_fraction", f"must be in [0, 1), got {self.val_fraction}")
        if self.shard_tokens <= 0:
            raise ConfigError("shard_tokens", "must be positive")


def run_data(cfg: DataConfig, verbose: bool = False) -> dict:
    """Tokenize cfg.input into shards under cfg.out; returns the manifest."""
    return prepare_data(cfg.input, cfg.tokenizer, cfg.out, cfg.val_fraction, shard_tokens=cfg.shard_tokens,
                        verbose=verbose, documents=cfg.documents)


def _print_summary(cfg: DataConfig) -> None:
    m = run_data(cfg, verbose=True)
    tr, va = m["splits"]["train"], m["splits"]["val"]
    print(f"prepared {cfg.out}: train {tr['tokens']:,} tokens ({tr['documents']:,} docs, {len(tr['shards'])} shards), "
          f"val {va['tokens']:,} tokens ({va['documents']:,} docs), dtype {m['dtype']}")
    print(f"{m['seconds']:.1f}s, {m['tokens_per_s']:,.0f} tokens/s, {m['mb_per_s']:.2f} MB/s")


COMMAND = Command(
    "lmforge data prepare", "Tokenize .txt/.jsonl(.gz) files into token shards for pretraining.", DataConfig,
    _print_summary,
    flags=(Flag("--input", "input", "corpus files"), Flag("--tokenizer", "tokenizer", "tokenizer directory"),
           Flag("--out", "out", "output directory"), Flag("--val-fraction", "val_fraction"),
           Flag("--documents", "documents", "blank_line or line: how a .txt file splits into documents")),
    examples=(("lmforge data prepare --input runs/lmforge-tiny/world/corpus.txt --tokenizer runs/lmforge-tiny/tokenizer "
               "--out runs/data"),
              "lmforge data prepare --input sentences.txt --tokenizer runs/tok --out runs/data --documents line"))


def _wire(ctx: StageContext) -> dict:
    corpus = ctx.artifact("corpus")
    return {"input": corpus if isinstance(corpus, list) else [corpus], "tokenizer": ctx.artifact("tokenizer"),
            "out": ctx.dir("data")}


STAGE = Stage("data", DataConfig, lambda ctx, cfg: run_data(cfg), inputs=("corpus", "tokenizer"),
              outputs={"token_data": ""}, wire=_wire)
