"""The one reader of record files (JSON Lines or one JSON array), the one atomic JSONL writer, and the durable
appender for outputs that grow one record at a time (human labels, self-instruct).

Every stage reads its records through `read_records`, so every bad file is reported the same way: one line
naming `file:line` (the line where the record starts, also inside a JSON array).
"""

from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path
from typing import Iterator

from lmforge.errors import LmforgeError, where

_WS = re.compile(r"\s*")


def _decode(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")  # tolerate a byte-order mark
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise LmforgeError(f"{where(path, line)}: not valid UTF-8 ({e.reason})") from None


def _array_items(text: str, path: Path) -> Iterator[tuple[int, object]]:
    """(line, value) of each element of a JSON array, the line being where the element starts."""
    dec = json.JSONDecoder()
    i = _WS.match(text, text.index("[") + 1).end()
    line, counted = 1, 0  # the line number at offset `counted`, advanced incrementally (linear in the file size)

    def line_at(pos: int) -> int:
        nonlocal line, counted
        line, counted = line + text.count("\n", counted, pos), pos
        return line

    if text.startswith("]", i):
        return
    while True:
        try:
            value, end = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise LmforgeError(f"{where(path, e.lineno)}: invalid JSON ({e.msg})") from None
        yield line_at(i), value
        i = _WS.match(text, end).end()
        if text.startswith(",", i):
            i = _WS.match(text, i + 1).end()
        elif text.startswith("]", i):
            if text[i + 1:].strip():
                raise LmforgeError(f"{where(path, line_at(i))}: unexpected text after the JSON array")
            return
        else:
            raise LmforgeError(f"{where(path, line_at(i))}: invalid JSON (expected ',' or ']')")


def read_records(path: str | Path, tolerant: bool = False) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) for each record of a JSON Lines file or of a file holding one JSON array.

    Blank lines are skipped. Invalid JSON raises LmforgeError "file:line: invalid JSON (...)"; with `tolerant`,
    an invalid JSONL line is yielded as its json.JSONDecodeError instead, so a caller can skip and count it
    (a broken JSON array cannot be resynchronised: its syntax errors are always fatal).
    """
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"{path}: file not found")
    text = _decode(path)
    if text.lstrip().startswith("["):
        yield from _array_items(text, path)
        return
    for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 may sit inside a string
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            if not tolerant:
                raise LmforgeError(f"{where(path, lineno)}: invalid JSON ({e.msg})") from None
            yield lineno, e


def write_jsonl_atomic(path: str | Path, records: list[dict]) -> None:
    """Write JSONL to a temporary sibling, then os.replace it into place: readers never see half a file."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # a full disk, a directory in the way: one line, and the previous file (if any) intact
        raise LmforgeError(f"{path}: could not write ({e.strerror or e}); nothing was written") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def append_jsonl_durably(path: str | Path, record: dict) -> None:
    """Append one JSON line and fsync it: once this returns, a crash cannot lose the record."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def drop_torn_tail(path: str | Path) -> bool:
    """Remove a last line cut short by a crash in the middle of an append (no newline at the end of the file),
    so an appended file always ends in whole records. Returns True if it removed one."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return False
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return False
        f.seek(0)
        data = f.read()
        f.truncate(data.rfind(b"\n") + 1)
        f.flush()
        os.fsync(f.fileno())
    return True


def prepare_append(path: str | Path, what: str = "output") -> bool:
    """Get an appended output ready: create it (and its folder) if need be, checking that it can be written (one
    LmforgeError naming the file if not), and drop a torn last line. Returns True if it dropped one."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as e:
        raise LmforgeError(f"{path}: cannot write the {what} ({e.strerror})") from None
    return drop_torn_tail(path)
