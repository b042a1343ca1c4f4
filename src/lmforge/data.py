"""Token data for pretraining: `lmforge data prepare` turns raw text into flat token shards, `TokenShards` reads them.

A prepared directory holds `manifest.json`, a copy of the tokenizer, and per split (train, val) flat binary
shards of token ids (uint16 when the vocabulary fits, else uint32) that np.memmap opens without loading.
Each document is stored as [BOS] ids [EOS], so a model sees where documents start and end. The corpus is
streamed in chunks of documents, so it may be larger than RAM. The train/val split is per document and a pure
function of the document's index (a hash), so re-running prepare gives byte-identical output.

lmforge's own tokenizers encode through tiktoken (`Tokenizer.fast_encoder`: the same ids, several times faster),
and a large corpus is encoded by one worker process per core while this process reads the files and writes the
shards, in order; the output is the same bytes either way.

A text file's documents are separated by blank lines (`documents="blank_line"`), or are its lines
(`documents="line"`, for one sentence or record per line). `lmforge pretrain` needs both splits, so prepare
refuses a corpus too small to give them (one document) rather than write a directory pretrain would refuse.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import multiprocessing.connection
import os
import shutil
import sys
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

from lmforge.errors import LmforgeError
from lmforge.rundir import check_output_dir
from lmforge.tokenizer import FastEncoder, Tokenizer, encode_documents, iter_documents, tokenizing_worker

MANIFEST = "manifest.json"
FORMAT = "lmforge-tokens-v1"
SPLITS = ("train", "val")
DOCUMENT_MODES = ("blank_line", "line")  # how a text file splits into documents (config key 'documents')
# A text file that comes out as one blank-line document this many lines long most likely holds one document
# per line: prepare says so (a few long paragraphs without blank lines stay below it).
LONG_DOCUMENT_LINES = 100
# Smaller inputs are tokenized in this process: starting workers (~0.4 s) would cost more than they save.
PARALLEL_MIN_BYTES = 8_000_000
MAX_WORKERS = 8  # beyond this, this process (reading the files, writing the shards) becomes the bottleneck


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (vocab_size <= 65535), else uint32: half the disk and page cache."""
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def is_val_document(index: int, val_fraction: float) -> bool:
    """Deterministic per-document split: a splitmix64 hash of the document index, compared with the fraction."""
    z = (index + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    z ^= z >> 31
    return z / 2.0**64 < val_fraction


class _ShardWriter:
    """Appends token arrays to `{split}_{k:06d}.bin`, starting a new shard once one holds >= shard_tokens.

    Shards only ever end between appends, so they end on document boundaries.
    """

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.shards: list[dict] = []  # [{"file", "tokens"}]
        self.fh = None
        self.documents = self.tokens = self.bytes = 0
        self.last_doc: tuple[np.ndarray, int] | None = None  # (tokens, utf-8 bytes) of the last document

    def append(self, tokens: np.ndarray, lengths: np.ndarray, n_bytes: np.ndarray) -> None:
        """Append documents: their tokens back to back, and each one's token count and UTF-8 byte count."""
        if not len(lengths):
            return
        if self.fh is None:
            name = f"{self.split}_{len(self.shards):06d}.bin"
            self.fh = open(self.directory / name, "wb")
            self.shards.append({"file": name, "tokens": 0})
        data = tokens.astype(self.dtype, copy=False)
        self.fh.write(data.tobytes())
        self.shards[-1]["tokens"] += len(data)
        self.documents += len(lengths)
        self.tokens += len(data)
        self.bytes += int(n_bytes.sum())
        self.last_doc = (data[len(data) - int(lengths[-1]):].copy(), int(n_bytes[-1]))
        if self.shards[-1]["tokens"] >= self.shard_tokens:
            self.close()

    def pop_last(self) -> tuple[np.ndarray, int]:
        """Remove the last document appended (used to give an otherwise empty val split one document)."""
        self.close()
        doc, n_bytes = self.last_doc
        shard = self.shards[-1]
        path = self.directory / shard["file"]
        shard["tokens"] -= len(doc)
        if shard["tokens"] == 0:
            path.unlink()
            self.shards.pop()
        else:
            with open(path, "r+b") as f:
                f.truncate(shard["tokens"] * self.dtype.itemsize)
        self.documents -= 1
        self.tokens -= len(doc)
        self.bytes -= n_bytes
        self.last_doc = None
        return doc, n_bytes

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None

    def summary(self) -> dict:
        return {"documents": self.documents, "tokens": self.tokens, "bytes": self.bytes, "shards": self.shards}


def _check_out_dir(out: Path) -> None:
    check_output_dir(out)
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise LmforgeError(f"config key 'out': {out} exists and is not a prepared data directory; choose another")


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Publish the finished temp directory as `out`, replacing a previous prepared directory."""
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    if old.exists():
        shutil.rmtree(old)


def _file_sha(paths: list[Path]) -> str:
    sha = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                sha.update(block)
    return sha.hexdigest()


def _is_text(path: Path) -> bool:
    """Whether `iter_documents` reads `path` as text (not JSON lines, whose records are one document each)."""
    return not path.name.removesuffix(".gz").endswith((".jsonl", ".json"))


def _iter_corpus(inputs: list[str | Path], documents: str, one_paragraph: dict[Path, int],
                 read: list[int] | None = None) -> Iterator[str]:
    """The documents of `inputs` (see `iter_documents`, which counts the bytes read into `read`); with
    documents="line" each non-blank line of a text file is a document. Records in `one_paragraph` each text file
    that came out as one blank-line document, with its number of lines (for the messages that suggest
    documents=line)."""
    for p in inputs:
        path = Path(p)
        by_line = documents == "line" and _is_text(path)
        n, first = 0, ""
        for text in iter_documents([path], read):
            first = text if n == 0 else first
            if by_line:  # a blank-line document is its non-blank lines joined by "\n": splitting gives them back
                pieces = text.split("\n")
                n += len(pieces)
                yield from pieces
            else:
                n += 1
                yield text
        if n == 1 and _is_text(path) and not by_line:
            one_paragraph[path] = first.count("\n") + 1


def _one_document_error(path: Path, lines: int) -> LmforgeError:
    """One document cannot be split into train and val (val_fraction holds out whole documents)."""
    if lines > 1:
        return LmforgeError(f"{path}: the whole file is 1 document of {lines:,} lines (documents are separated by "
                            "blank lines, and it has none), so it cannot be split into train and validation data, "
                            "which `lmforge pretrain` needs; for one document per line set documents=line")
    return LmforgeError(f"{path}: only 1 document, so it cannot be split into train and validation data, which "
                        "`lmforge pretrain` needs (val_fraction holds out whole documents); give at least 2")


def _chunks(docs: Iterator[str], size: int) -> Iterator[list[str]]:
    """Consecutive lists of `size` documents (the last one shorter): the unit that is encoded and written."""
    while chunk := list(itertools.islice(docs, size)):
        yield chunk


# A chunk encoded by `encode_documents`: its documents' [BOS] ids [EOS] back to back, token counts, UTF-8 byte counts.
Encoded = tuple[np.ndarray, np.ndarray, np.ndarray]


def _write_chunk(writers: dict[str, _ShardWriter], encoded: Encoded, first_index: int, val_fraction: float) -> None:
    """Send each document of a chunk to the train or val shards, by its index in the whole corpus."""
    tokens, lengths, n_bytes = encoded
    is_val = np.fromiter((is_val_document(first_index + i, val_fraction) for i in range(len(lengths))), bool,
                         len(lengths))
    val_tokens = np.repeat(is_val, lengths)
    writers["train"].append(tokens[~val_tokens], lengths[~is_val], n_bytes[~is_val])
    writers["val"].append(tokens[val_tokens], lengths[is_val], n_bytes[is_val])


def _fast_or_none(tok: Tokenizer, fast: FastEncoder | None, texts: list[str],
                  max_chars: int = 1_000_000) -> FastEncoder | None:
    """`fast` if it gives tokenizers' ids on the first documents (up to ~1 MB of text), else None, with a note.

    FastEncoder is proven to agree (see its docstring); this is cheap insurance against the unforeseen."""
    if fast is None:
        return None
    sample, n = [], 0
    for text in texts:
        if n >= max_chars:
            break
        sample.append(text)
        n += len(text)
    if fast.encode_batch(sample) == tok.encode_batch(sample):
        return fast
    print("note: tiktoken's token ids differ from tokenizers' on the first documents, so this corpus is tokenized "
          "by tokenizers (slower)", file=sys.stderr)
    return None


def _worker_count(processes: int | None, inputs: list[str | Path]) -> int:
    """`processes`, else one per core (at most MAX_WORKERS) for inputs of PARALLEL_MIN_BYTES or more; 0 means
    tokenizing in this process (small inputs, or one core)."""
    if processes is not None:
        return processes
    cores = min(os.cpu_count() or 1, MAX_WORKERS)
    size = sum(Path(p).stat().st_size for p in inputs)
    return cores if cores > 1 and size >= PARALLEL_MIN_BYTES else 0


class _Workers:
    """Spawned tokenizing processes (lmforge.tokenizer.tokenizing_worker), each with a pipe of its own. Chunk i
    goes to worker i % n and the results are read back in that order, so the output is the same bytes for any
    number of workers; each worker holds at most IN_FLIGHT chunks, so memory stays bounded however large the
    corpus. No helper threads here, so stopping is killing the processes (ProcessPoolExecutor's manager thread
    hung interpreter exit after a Ctrl-C about 1 run in 8: it waited forever on a result that a killed worker
    had half sent)."""

    IN_FLIGHT = 2  # per worker: the next chunk waits in the worker while it encodes one

    def __init__(self, n: int, fast: FastEncoder, bos: int | None, eos: int, dtype: np.dtype):
        # spawn, not fork: forking a process that has imported torch (threads, OpenMP) can deadlock
        ctx = multiprocessing.get_context("spawn")
        self.conns, self.procs = [], []
        try:
            for _ in range(n):
                conn, child_end = ctx.Pipe()
                proc = ctx.Process(target=tokenizing_worker, args=(child_end, fast, bos, eos, dtype), daemon=True)
                self.conns.append(conn)
                self.procs.append(proc)  # before start: a Ctrl-C just after it must still find the process to stop
                proc.start()
                child_end.close()  # the worker's end is the worker's alone: its death reads as EOF here
        except BaseException:
            self.stop(clean=False)
            raise

    def encode(self, chunks: Iterator[list[str]]) -> Iterator[Encoded]:
        """The chunks encoded by the workers, in order; the next chunks are read while the workers encode."""
        busy: deque[int] = deque()  # the worker of each chunk out, oldest first
        for i, texts in enumerate(chunks):
            w = i % len(self.procs)
            result = self._receive(busy.popleft()) if len(busy) == self.IN_FLIGHT * len(self.procs) else None
            self._send(w, texts)  # before the caller writes the result: no worker waits for that
            busy.append(w)
            if result is not None:
                yield result
        while busy:
            yield self._receive(busy.popleft())

    def _died(self) -> LmforgeError:
        return LmforgeError("a tokenizing worker process died (killed, or out of memory; or, called from a script, "
                            "prepare_data must run under `if __name__ == \"__main__\":`, which worker processes "
                            "skip); nothing was written")

    def _send(self, w: int, texts: list[str]) -> None:
        try:
            self.conns[w].send(texts)
        except OSError:  # BrokenPipeError, ConnectionResetError: the worker is gone
            raise self._died() from None

    def _receive(self, w: int) -> Encoded:
        conn, proc = self.conns[w], self.procs[w]
        if conn not in multiprocessing.connection.wait([conn, proc.sentinel]):
            raise self._died()
        try:
            result = conn.recv()
        except (EOFError, OSError):  # died mid-message
            raise self._died() from None
        if isinstance(result, BaseException):
            where = getattr(result, "worker_traceback", "")
            raise result from RuntimeError(f"in a tokenizing worker process:\n{where}")
        return result

    def stop(self, clean: bool) -> None:
        """After a clean run, tell the (idle) workers to exit; after an error or Ctrl-C, kill them. Both wait."""
        for conn, proc in zip(self.conns, self.procs):
            if clean and proc.exitcode is None:
                try:
                    conn.send(None)
                except OSError:
                    pass
        for proc in self.procs:
            if proc.pid is None:  # never started (a Ctrl-C while starting the workers)
                continue
            if clean:
                proc.join(timeout=10)
            if proc.exitcode is None:
                proc.kill()
            proc.join(timeout=10)
        for conn in self.conns:
            conn.close()


def prepare_data(inputs: list[str | Path], tokenizer_dir: str | Path, out_dir: str | Path,
                 val_fraction: float = 0.005, chunk_docs: int = 1024, shard_tokens: int = 100_000_000,
                 verbose: bool = False, documents: str = "blank_line", processes: int | None = None) -> dict:
    """Tokenize `inputs` (.txt / .jsonl / .gz, see `iter_documents`) into token shards under `out_dir`.

    `documents`: "blank_line" (a text file's documents are separated by blank lines) or "line" (each non-blank
    line is a document). `processes`: tokenizing worker processes (0: this process; default: one per core for
    inputs of PARALLEL_MIN_BYTES or more); the output is the same bytes for any number. Only tokenizers with a
    `fast_encoder` use them; others encode here with the Rust threads of `tokenizers`. `verbose` shows a progress
    bar over the bytes read. Returns the manifest. Written atomically: on any error (or Ctrl-C) no output
    directory is left behind. Warnings (a directory pretrain cannot use, a file that looks like one document per
    line) go to stderr.
    """
    if not inputs:
        raise LmforgeError("config key 'input': no corpus files given")
    if not 0.0 <= val_fraction < 1.0:
        raise LmforgeError(f"config key 'val_fraction' must be in [0, 1), got {val_fraction}")
    if chunk_docs <= 0 or shard_tokens <= 0:
        raise LmforgeError("config key 'shard_tokens' must be positive (and chunk_docs)")
    if documents not in DOCUMENT_MODES:
        raise LmforgeError(f"config key 'documents' must be blank_line or line, got {documents!r}")
    if processes is not None and processes < 0:
        raise LmforgeError(f"processes must be >= 0, got {processes}")
    for p in inputs:  # fail fast on a missing file, before tokenizing the others
        if not Path(p).is_file():
            raise LmforgeError(f"{p}: input file not found")
    tok = Tokenizer.load(tokenizer_dir)
    out = Path(out_dir)
    _check_out_dir(out)
    dtype = token_dtype(tok.vocab_size)
    bos, eos = tok.special.bos, tok.special.eos  # Qwen2-style tokenizers have no BOS

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    t0 = time.perf_counter()
    writers = {s: _ShardWriter(tmp, s, dtype, shard_tokens) for s in SPLITS}
    read = [0]  # bytes read so far (decompressed), for the progress bar; its total is unknown for .gz inputs
    gz = any(str(p).endswith(".gz") for p in inputs)
    bar = tqdm(total=None if gz else sum(Path(p).stat().st_size for p in inputs), unit="B", unit_scale=True,
               desc="tokenizing", disable=not verbose, delay=1.0, mininterval=0.5)
    pool = None
    try:
        one_paragraph: dict[Path, int] = {}
        chunks = _chunks(_iter_corpus(inputs, documents, one_paragraph, read), chunk_docs)
        first = next(chunks, [])
        fast = _fast_or_none(tok, tok.fast_encoder(), first)
        encoder = fast or tok  # tokenizers' own encode_batch runs Rust threads
        head = encode_documents(encoder.encode_batch, first, bos, eos, dtype)
        workers = _worker_count(processes, inputs) if fast is not None else 0
        if workers:
            pool = _Workers(workers, fast, bos, eos, dtype)
            rest = pool.encode(chunks)
        else:
            rest = (encode_documents(encoder.encode_batch, texts, bos, eos, dtype) for texts in chunks)
        n_docs = 0
        for chunk in itertools.chain([head], rest):
            _write_chunk(writers, chunk, n_docs, val_fraction)
            n_docs += len(chunk[1])
            bar.update(read[0] - bar.n)
        if val_fraction > 0 and n_docs < 2:  # one file of one document (an empty file is an error)
            path = Path(inputs[0])
            raise _one_document_error(path, one_paragraph.get(path, 1))
        # A tiny corpus may hash no document into val; give val the last document so evaluation has data.
        if val_fraction > 0 and writers["val"].documents == 0 and writers["train"].documents >= 2:
            doc, n_bytes = writers["train"].pop_last()
            writers["val"].append(doc, np.array([len(doc)]), np.array([n_bytes]))
        if val_fraction > 0 and writers["train"].documents == 0:
            raise LmforgeError(f"config key 'val_fraction': all {n_docs} documents were held out for validation "
                               f"(val_fraction={val_fraction}), leaving none to train on; lower it or add documents")
        for w in writers.values():
            w.close()
        splits = {s: w.summary() for s, w in writers.items()}
        shard_paths = [tmp / sh["file"] for s in SPLITS for sh in splits[s]["shards"]]
        manifest = {
            "format": FORMAT,
            "dtype": dtype.name,
            "vocab_size": tok.vocab_size,
            "bos_id": tok.special.bos,
            "eos_id": tok.special.eos,
            "tokenizer_fingerprint": tok.fingerprint(),
            "val_fraction": val_fraction,
            "documents": documents,
            "inputs": [str(p) for p in inputs],
            "splits": splits,
            "fingerprint": _file_sha(shard_paths)[:16],
        }
        tok.save(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        _swap_into_place(tmp, out)
    finally:
        if pool is not None:  # on an error or Ctrl-C too
            pool.stop(clean=sys.exc_info()[0] is None)
        bar.close()
        for w in writers.values():
            w.close()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    warnings = [f"{path}: the whole file is 1 document of {lines:,} lines (documents are separated by blank lines, "
                "and it has none); for one document per line set documents=line"
                for path, lines in one_paragraph.items() if lines >= LONG_DOCUMENT_LINES]
    if val_fraction == 0:
        warnings.append(f"val_fraction=0: {out} has no validation split, so `lmforge pretrain` refuses it; "
                        "prepare it with val_fraction > 0 to pretrain on it")
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    seconds = time.perf_counter() - t0
    n_tokens = sum(splits[s]["tokens"] for s in SPLITS)
    n_bytes = sum(splits[s]["bytes"] for s in SPLITS)
    manifest["seconds"] = seconds
    manifest["tokens_per_s"] = n_tokens / max(seconds, 1e-9)
    manifest["mb_per_s"] = n_bytes / 1e6 / max(seconds, 1e-9)
    return manifest


def read_manifest(data_dir: str | Path) -> dict:
    """The manifest of a prepared directory; errors name the file."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise LmforgeError(f"{path}: not found (prepare the data with `lmforge data prepare`)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LmforgeError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise LmforgeError(f"{path}: not an {FORMAT} manifest")
    return manifest


class TokenShards:
    """Read-only view of one split of a prepared directory (memory-mapped; nothing is loaded up front)."""

    def __init__(self, data_dir: str | Path, split: str):
        if split not in SPLITS:
            raise LmforgeError(f"unknown split '{split}' (expected one of {list(SPLITS)})")
        self.dir = Path(data_dir)
        self.manifest = read_manifest(self.dir)
        self.split = split
        self.dtype = np.dtype(self.manifest["dtype"])
        info = self.manifest["splits"][split]
        self.documents, self.bytes = info["documents"], info["bytes"]
        self.shards: list[np.ndarray] = []
        for sh in info["shards"]:
            path = self.dir / sh["file"]
            expected = sh["tokens"] * self.dtype.itemsize
            if not path.is_file() or path.stat().st_size != expected:
                raise LmforgeError(f"{path}: missing or truncated shard (expected {expected} bytes)")
            self.shards.append(np.memmap(path, dtype=self.dtype, mode="r"))
        self.num_tokens = sum(len(s) for s in self.shards)
        self._starts: dict[int, np.ndarray] = {}

    def max_window(self) -> int:
        """Largest seq_len for which `sample_batch` can draw a window (longest shard minus one)."""
        return max((len(s) for s in self.shards), default=0) - 1

    def sample_batch(self, generator: torch.Generator, batch_size: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows of seq_len + 1 tokens -> (x, y) int64 of shape (batch_size, seq_len), y = x shifted by one.

        Every window start in every shard is equally likely; the draw depends only on `generator`.
        """
        if seq_len not in self._starts:  # cumulative count of valid window starts per shard
            counts = np.array([max(0, len(s) - seq_len) for s in self.shards], dtype=np.int64)
            self._starts[seq_len] = np.cumsum(counts)
        cum = self._starts[seq_len]
        total = int(cum[-1]) if len(cum) else 0
        if total == 0:
            raise LmforgeError(f"{self.dir}: the {self.split} split has no shard of more than {seq_len} tokens "
                               f"(lower seq_len or prepare more data)")
        picks = torch.randint(total, (batch_size,), generator=generator).numpy()
        shard_idx = np.searchsorted(cum, picks, side="right")
        buf = np.empty((batch_size, seq_len + 1), dtype=np.int64)
        for row, (k, g) in enumerate(zip(shard_idx, picks)):
            start = g - (cum[k - 1] if k > 0 else 0)
            buf[row] = self.shards[k][start:start + seq_len + 1]
        t = torch.from_numpy(buf)
        return t[:, :-1], t[:, 1:]

    def iter_batches(self, batch_size: int, seq_len: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The split in order, for evaluation: every token after the first of each shard is a target exactly once.

        Full windows come in batches of up to batch_size rows; a shard's shorter tail comes as its own batch.
        """
        for shard in self.shards:
            n_windows = (len(shard) - 1) // seq_len
            for b0 in range(0, n_windows, batch_size):
                rows = min(batch_size, n_windows - b0)
                chunk = np.asarray(shard[b0 * seq_len: (b0 + rows) * seq_len + 1], dtype=np.int64)
                x = torch.from_numpy(chunk[:-1].reshape(rows, seq_len))
                y = torch.from_numpy(chunk[1:].reshape(rows, seq_len))
                yield x, y
            tail = len(shard) - 1 - n_windows * seq_len
            if tail > 0:
                chunk = torch.from_numpy(np.asarray(shard[n_windows * seq_len:], dtype=np.int64))
                yield chunk[None, :-1], chunk[None, 1:]
