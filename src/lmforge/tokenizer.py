"""Byte-level BPE tokenizer (Hugging Face `tokenizers`) with lmforge's special tokens, and corpus readers.

Byte-level BPE starts from the 256 byte values, so any UTF-8 text (English, Chinese, emoji, runs of
whitespace) round-trips losslessly: decode(encode(text)) == text.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from lmforge.errors import LmforgeError

# One fixed set of special tokens. PAD is its own token and never EOS (a model must learn to emit EOS,
# and masks must never be derived from `ids != pad`). <|end|> closes a chat turn.
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
SEP, MASK = "<|sep|>", "<|mask|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, SYSTEM, USER, ASSISTANT, END, SEP, MASK]
BYTE_ALPHABET_SIZE = 256
MIN_VOCAB_SIZE = BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS)
TOKENIZER_FILE = "tokenizer.json"


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) pairs, decoding each line strictly so a UTF-8 error names its line."""
    with (gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")) as f:
        for lineno, raw in enumerate(f, 1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise LmforgeError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start})") from None


def iter_documents(paths: list[str | Path]) -> Iterator[str]:
    """Stream documents from .txt (documents separated by blank lines), .jsonl (field `text`)
    and their .gz forms. Never loads a whole file; errors name the file and line."""
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise LmforgeError(f"{path}: input file not found")
        name = path.name[:-3] if path.name.endswith(".gz") else path.name
        is_jsonl = name.endswith(".jsonl") or name.endswith(".json")
        n_docs, block = 0, []
        try:
            for lineno, line in _lines(path):
                if is_jsonl:
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise LmforgeError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
                    if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                        raise LmforgeError(f"{path}:{lineno}: expected an object with a string field 'text'")
                    if rec["text"]:
                        n_docs += 1
                        yield rec["text"]
                elif line.strip():
                    block.append(line)
                elif block:  # a blank line ends a .txt document
                    n_docs += 1
                    yield "".join(block).rstrip("\n")
                    block = []
            if block:
                n_docs += 1
                yield "".join(block).rstrip("\n")
        except (OSError, EOFError) as e:
            raise LmforgeError(f"{path}: cannot read ({e})") from None
        if n_docs == 0:
            raise LmforgeError(f"{path}: input is empty")


@dataclass
class SpecialIds:
    pad: int
    bos: int
    eos: int
    system: int
    user: int
    assistant: int
    end: int
    sep: int
    mask: int


class Tokenizer:
    """Thin wrapper over `tokenizers.Tokenizer` that knows lmforge's special-token ids."""

    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer
        ids = {}
        for tok, field in zip(SPECIAL_TOKENS, ["pad", "bos", "eos", "system", "user", "assistant", "end", "sep", "mask"]):
            tid = hf_tokenizer.token_to_id(tok)
            if tid is None:
                raise LmforgeError(f"tokenizer lacks the special token {tok}")
            ids[field] = tid
        self.special = SpecialIds(**ids)
        self.vocab_size = hf_tokenizer.get_vocab_size()

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """Load DIR/tokenizer.json (or the file itself)."""
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise LmforgeError(f"{file}: tokenizer not found")
        try:
            return cls(HFTokenizer.from_file(str(file)))
        except Exception as e:  # the library raises plain Exceptions on malformed files
            raise LmforgeError(f"{file}: cannot load tokenizer ({e})") from None

    def save(self, directory: str | Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.hf.save(str(Path(directory) / TOKENIZER_FILE))

    def encode(self, text: str) -> list[int]:
        """Token ids of plain text; special-token strings inside user text are NOT turned into specials."""
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Parallel batch encoding (Rust threads inside `tokenizers`)."""
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes a token stands for (for streaming decode without splitting UTF-8 characters)."""
        tok = self.hf.id_to_token(token_id)
        if tok in SPECIAL_TOKENS:
            return b""
        table = _byte_decoder()
        return bytes(table[c] for c in tok)

    def fingerprint(self) -> str:
        """Hash of the tokenizer definition: stages refuse to mix models of different tokenizers."""
        return hashlib.sha256(self.hf.to_str().encode()).hexdigest()[:16]


_BYTE_DECODER: dict[str, int] | None = None


def check_same_tokenizer(fingerprint_a: str | None, fingerprint_b: str | None, a: str, b: str) -> None:
    """The one tokenizer-compatibility check: `a` and `b` (what the user set, e.g. "config key 'data' (runs/x)")
    must share a tokenizer, or their token ids mean different things. A missing fingerprint is not checked."""
    if fingerprint_a and fingerprint_b and fingerprint_a != fingerprint_b:
        raise LmforgeError(f"tokenizer mismatch: {a} and {b} use different tokenizers "
                           f"(fingerprints {fingerprint_a[:12]} != {fingerprint_b[:12]})")


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte<->unicode table (what the ByteLevel pre-tokenizer uses), inverted."""
    global _BYTE_DECODER
    if _BYTE_DECODER is None:
        bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
        cs = bs[:]
        n = 0
        for b in range(256):
            if b not in bs:
                bs.append(b)
                cs.append(256 + n)
                n += 1
        _BYTE_DECODER = {chr(c): b for b, c in zip(bs, cs)}
    return _BYTE_DECODER


def train_tokenizer(inputs: list[str | Path], vocab_size: int, out_dir: str | Path | None = None,
                    min_frequency: int = 2) -> Tokenizer:
    """Train byte-level BPE on the documents of `inputs`; save DIR/tokenizer.json when out_dir is given."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < MIN_VOCAB_SIZE:
        raise LmforgeError(f"config key 'vocab_size': {vocab_size} is smaller than the byte alphabet plus special tokens "
                           f"({BYTE_ALPHABET_SIZE} + {len(SPECIAL_TOKENS)} = {MIN_VOCAB_SIZE})")
    # Validate every input (exists, UTF-8, non-empty) before training so errors name the file.
    for p in inputs:
        for _ in iter_documents([p]):
            pass
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    hf.train_from_iterator(iter_documents(inputs), trainer=trainer)
    tok = Tokenizer(hf)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / (TOKENIZER_FILE + ".tmp")
        hf.save(str(tmp))
        tmp.replace(out / TOKENIZER_FILE)
    return tok
