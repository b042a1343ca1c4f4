"""Token data: prepared shards equal direct tokenization, split rules, dtype choice, readers, input errors."""

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.cli import main
from lmforge.data import MANIFEST, TokenShards, is_val_document, prepare_data, read_manifest, token_dtype
from lmforge.errors import LmforgeError

DOCS = [f"Document {i}: the apple is red. 苹果是红色的 {'🍎' * (i % 3)} " + "word " * (i % 7) for i in range(40)]


def _write_jsonl(path, docs):
    path.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    return path


def _read_split(data_dir, split):
    m = read_manifest(data_dir)
    arrays = [np.memmap(data_dir / sh["file"], dtype=m["dtype"], mode="r") for sh in m["splits"][split]["shards"]]
    return arrays


def tok_dir(tok, tmp_path):
    d = tmp_path / "tok"
    tok.save(d)
    return d


def _expected(docs, val_fraction):
    out = {"train": [], "val": []}
    for i, d in enumerate(docs):
        out["val" if is_val_document(i, val_fraction) else "train"].append(d)
    return out


def test_prepared_shards_equal_direct_tokenization(tok, tmp_path):
    src = _write_jsonl(tmp_path / "docs.jsonl", DOCS)
    # small chunks and shards: documents cross chunk boundaries and the output has several shards
    m = prepare_data([src], tok_dir(tok, tmp_path), tmp_path / "data", val_fraction=0.3, chunk_docs=3, shard_tokens=80)
    expected = _expected(DOCS, 0.3)
    assert expected["val"] and expected["train"]
    for split in ("train", "val"):
        shards = _read_split(tmp_path / "data", split)
        stream = np.concatenate(shards)
        want = [t for d in expected[split] for t in [tok.special.bos] + tok.encode(d) + [tok.special.eos]]
        assert stream.tolist() == want
        info = m["splits"][split]
        assert info["tokens"] == len(want) == sum(sh["tokens"] for sh in info["shards"])
        assert info["documents"] == len(expected[split])
        assert info["bytes"] == sum(len(d.encode("utf-8")) for d in expected[split])
        for arr in shards:  # shards end on document boundaries
            assert arr[0] == tok.special.bos and arr[-1] == tok.special.eos
    assert len(m["splits"]["train"]["shards"]) > 1
    assert m["dtype"] == "uint16" and m["tokenizer_fingerprint"] == tok.fingerprint() and m["val_fraction"] == 0.3
    assert json.loads((tmp_path / "data" / MANIFEST).read_text())["fingerprint"] == m["fingerprint"]
    # the data directory carries its tokenizer
    from lmforge.tokenizer import Tokenizer
    assert Tokenizer.load(tmp_path / "data").fingerprint() == tok.fingerprint()


def test_prepare_is_deterministic_and_replaces_previous_output(tok, tmp_path):
    src = _write_jsonl(tmp_path / "docs.jsonl", DOCS)
    a = prepare_data([src], tok_dir(tok, tmp_path), tmp_path / "a", val_fraction=0.2)
    b = prepare_data([src], tok_dir(tok, tmp_path), tmp_path / "a", val_fraction=0.2)  # re-run over it
    assert a["fingerprint"] == b["fingerprint"]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["manifest.json", "tokenizer.json", "tokenizer_config.json",
                                                                  "train_000000.bin", "val_000000.bin"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp or old directories left


def test_split_fraction_and_tiny_corpus_fallback(tok, tmp_path):
    n = 200_000
    frac = sum(is_val_document(i, 0.1) for i in range(n)) / n
    assert abs(frac - 0.1) < 0.005
    assert not any(is_val_document(i, 0.0) for i in range(1000))
    # three documents, none of which hashes into val at 0.5%: the last one is moved to val
    assert not any(is_val_document(i, 0.005) for i in range(3))
    src = _write_jsonl(tmp_path / "three.jsonl", DOCS[:3])
    m = prepare_data([src], tok_dir(tok, tmp_path), tmp_path / "d", val_fraction=0.005)
    assert m["splits"]["val"]["documents"] == 1 and m["splits"]["train"]["documents"] == 2
    val = np.concatenate(_read_split(tmp_path / "d", "val")).tolist()
    train = np.concatenate(_read_split(tmp_path / "d", "train")).tolist()
    assert val == [tok.special.bos] + tok.encode(DOCS[2]) + [tok.special.eos]
    assert train == [t for d in DOCS[:2] for t in [tok.special.bos] + tok.encode(d) + [tok.special.eos]]
    assert m["splits"]["val"]["bytes"] == len(DOCS[2].encode())


def test_dtype_uint16_or_uint32(tok, tmp_path):
    assert token_dtype(400) == np.uint16 and token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32 and token_dtype(100_000) == np.uint32
    from tokenizers import Tokenizer as HF
    big = HF.from_str(tok.hf.to_str())
    big.add_tokens([f"<extra{i}>" for i in range(66000)])  # vocabulary > 65535 -> uint32 shards
    (tmp_path / "bigtok").mkdir()
    big.save(str(tmp_path / "bigtok" / "tokenizer.json"))
    docs = ["plain text <extra65999> and <extra7>", "more text"]
    src = _write_jsonl(tmp_path / "d.jsonl", docs)
    m = prepare_data([src], tmp_path / "bigtok", tmp_path / "d", val_fraction=0.0)
    assert m["dtype"] == "uint32"
    stream = np.concatenate(_read_split(tmp_path / "d", "train")).tolist()
    ids = [big.encode(d, add_special_tokens=False).ids for d in docs]
    assert max(ids[0]) > 65535
    assert stream == [t for d in ids for t in [tok.special.bos] + d + [tok.special.eos]]


@pytest.fixture
def shards(tok, tmp_path):
    src = _write_jsonl(tmp_path / "docs.jsonl", DOCS)
    prepare_data([src], tok_dir(tok, tmp_path), tmp_path / "data", val_fraction=0.3, chunk_docs=4, shard_tokens=150)
    return tmp_path / "data"


def test_sample_batch_windows_are_contiguous_deterministic_and_within_a_shard(shards):
    ts = TokenShards(shards, "train")
    arrays = [np.asarray(a).tolist() for a in ts.shards]
    assert len(arrays) > 1
    x, y = ts.sample_batch(torch.Generator().manual_seed(3), 64, 16)
    x2, y2 = ts.sample_batch(torch.Generator().manual_seed(3), 64, 16)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert x.shape == y.shape == (64, 16) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row in torch.cat([x, y[:, -1:]], dim=1).tolist():
        assert any(row == a[s:s + 17] for a in arrays for s in range(len(a) - 16))
    x3, _ = ts.sample_batch(torch.Generator().manual_seed(4), 64, 16)
    assert not torch.equal(x, x3)
    with pytest.raises(LmforgeError, match="no shard of more than"):
        ts.sample_batch(torch.Generator(), 1, 10_000)


def test_iter_batches_covers_each_target_once(shards):
    ts = TokenShards(shards, "val")
    xs, ys = [], []
    for x, y in ts.iter_batches(batch_size=3, seq_len=7):
        assert x.shape == y.shape and x.shape[0] <= 3
        xs += x.flatten().tolist()
        ys += y.flatten().tolist()
    want_x = [t for a in ts.shards for t in np.asarray(a)[:-1].tolist()]
    want_y = [t for a in ts.shards for t in np.asarray(a)[1:].tolist()]
    assert xs == want_x and ys == want_y
    assert ts.num_tokens == read_manifest(shards)["splits"]["val"]["tokens"]


def test_truncated_shard_is_an_error(shards):
    m = read_manifest(shards)
    path = shards / m["splits"]["train"]["shards"][0]["file"]
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(LmforgeError, match="train_000000.bin: missing or truncated"):
        TokenShards(shards, "train")


def _leftovers(tmp_path, name):
    return [p.name for p in tmp_path.iterdir() if name in p.name]


@pytest.mark.parametrize("content,match", [
    (b"", "input is empty"),
    (b"\n\n", "input is empty"),
    (b"good text\n\nbad \xff\xfe bytes\n", r"bad\.txt:3: not valid UTF-8"),
])
def test_bad_text_input_errors_leave_no_output(tok, tmp_path, content, match):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(content)
    with pytest.raises(LmforgeError, match=match) as e:
        prepare_data([bad], tok_dir(tok, tmp_path), tmp_path / "out")
    assert str(bad) in str(e.value)
    assert _leftovers(tmp_path, "out") == []


def test_bad_jsonl_line_names_file_and_line(tok, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": 3}\n', encoding="utf-8")
    with pytest.raises(LmforgeError, match=r"bad\.jsonl:2: expected an object with a string field 'text'"):
        prepare_data([bad], tok_dir(tok, tmp_path), tmp_path / "out")
    assert _leftovers(tmp_path, "out") == []


def test_missing_input_and_foreign_out_dir(tok, tmp_path):
    with pytest.raises(LmforgeError, match=r"nope\.txt: input file not found"):
        prepare_data([tmp_path / "nope.txt"], tok_dir(tok, tmp_path), tmp_path / "out")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    src = _write_jsonl(tmp_path / "d.jsonl", DOCS[:4])
    with pytest.raises(LmforgeError, match="not a prepared data directory"):
        prepare_data([src], tok_dir(tok, tmp_path), tmp_path / "foreign")
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "mine"


def test_cli_prepare_and_one_line_error(tok, tmp_path, capsys):
    src = _write_jsonl(tmp_path / "d.jsonl", DOCS)
    tdir = tok_dir(tok, tmp_path)
    assert main(["data", "prepare", "--input", str(src), "--tokenizer", str(tdir), "--out", str(tmp_path / "ok"),
                 "--val-fraction", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "tokens/s" in out and "MB/s" in out
    assert (tmp_path / "ok" / MANIFEST).is_file()
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xe9\n")
    assert main(["data", "prepare", "--input", str(bad), "--tokenizer", str(tdir), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{bad}:1: not valid UTF-8" in err
    assert _leftovers(tmp_path, "out") == []


# ----------------------------------------------------------------------------------------------------------
# How a text file splits into documents (config key 'documents'), and corpora pretrain could not use

SENTENCES = [f"Sentence {i}: the apple is red. 苹果是红色的。" + " word" * (i % 5) for i in range(120)]
TINY_PRETRAIN = ["device=cpu", "seq_len=16", "batch_size=2", "eval_batches=1", "optim.max_steps=1",
                 "optim.warmup_steps=0", "model.hidden_size=32", "model.num_hidden_layers=1",
                 "model.num_attention_heads=2", "model.num_key_value_heads=2", "model.max_position_embeddings=32"]


def _prepare(src, tdir, out, *extra):
    return main(["data", "prepare", "--input", *map(str, src), "--tokenizer", str(tdir), "--out", str(out), *extra])


def test_one_sentence_per_line_is_refused_naming_the_file_and_the_fix(tok, tmp_path, capsys):
    src = tmp_path / "corpus.txt"
    src.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")  # no blank line: one blank-line document
    assert _prepare([src], tok_dir(tok, tmp_path), tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert err == (f"lmforge data: error: {src}: the whole file is 1 document of 120 lines (documents are "
                   "separated by blank lines, and it has none), so it cannot be split into train and validation "
                   "data, which `lmforge pretrain` needs; for one document per line set documents=line\n")
    assert _leftovers(tmp_path, "out") == []  # refused before anything was written


def test_documents_line_gives_a_document_per_line_that_pretrain_accepts(tok, tmp_path, capsys):
    src = tmp_path / "corpus.txt"
    # blank and whitespace-only lines are not documents, a CRLF line keeps its "\r" as it would as a paragraph
    src.write_bytes(("\n".join(SENTENCES[:60]) + "\n\n   \n" + "\n".join(SENTENCES[60:]) + "\r\n").encode())
    want = SENTENCES[:-1] + [SENTENCES[-1] + "\r"]
    tdir = tok_dir(tok, tmp_path)
    assert _prepare([src], tdir, tmp_path / "data", "--documents", "line", "--val-fraction", "0.1") == 0
    out, err = capsys.readouterr()
    assert err == "" and "prepared" in out
    m = read_manifest(tmp_path / "data")
    expected = _expected(want, 0.1)
    assert m["documents"] == "line"
    assert m["splits"]["train"]["documents"] == len(expected["train"]) and len(expected["train"]) > 100
    assert m["splits"]["val"]["documents"] == len(expected["val"]) > 0
    for split in ("train", "val"):
        stream = np.concatenate(_read_split(tmp_path / "data", split)).tolist()
        assert stream == [t for d in expected[split] for t in [tok.special.bos] + tok.encode(d) + [tok.special.eos]]
    # the same lines as .jsonl records give the same shards
    para = _write_jsonl(tmp_path / "para.jsonl", want)
    assert prepare_data([para], tdir, tmp_path / "para", val_fraction=0.1)["fingerprint"] == m["fingerprint"]
    gz = tmp_path / "corpus.txt.gz"  # and so does the gzipped file
    gz.write_bytes(gzip.compress(src.read_bytes()))
    assert prepare_data([gz], tdir, tmp_path / "gz", 0.1, documents="line")["fingerprint"] == m["fingerprint"]
    assert main(["pretrain", f"data={tmp_path / 'data'}", f"out={tmp_path / 'run'}", *TINY_PRETRAIN]) == 0
    assert "pretrain clm: 1 steps" in capsys.readouterr().out


def test_blank_line_documents_unchanged_and_line_mode_leaves_jsonl_records_whole(tok, tmp_path, capsys):
    docs = [f"{d}\nsecond line of {i}\nthird" for i, d in enumerate(DOCS)]  # multi-line documents
    txt = tmp_path / "c.txt"
    txt.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    jsonl = _write_jsonl(tmp_path / "c.jsonl", docs)
    tdir = tok_dir(tok, tmp_path)
    a = prepare_data([txt], tdir, tmp_path / "a", val_fraction=0.2)
    b = prepare_data([jsonl], tdir, tmp_path / "b", val_fraction=0.2, documents="line")
    assert a["documents"] == "blank_line" and b["documents"] == "line"
    for m in (a, b):
        assert m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"] == len(docs)
    assert a["fingerprint"] == b["fingerprint"]
    assert capsys.readouterr().err == ""


def test_a_file_that_looks_like_one_document_per_line_gets_a_hint(tok, tmp_path, capsys):
    paragraphs = _write_jsonl(tmp_path / "p.jsonl", DOCS)
    lines = tmp_path / "lines.txt"
    lines.write_text("\n".join(SENTENCES), encoding="utf-8")
    m = prepare_data([paragraphs, lines], tok_dir(tok, tmp_path), tmp_path / "d", val_fraction=0.1)
    assert m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"] == len(DOCS) + 1
    assert capsys.readouterr().err == (f"warning: {lines}: the whole file is 1 document of 120 lines (documents are "
                                       "separated by blank lines, and it has none); for one document per line set "
                                       "documents=line\n")


@pytest.mark.parametrize("name,content,documents", [
    ("one.txt", "A single sentence.\n", "blank_line"),
    ("one.txt", "\nA single sentence.\n\n", "line"),
    ("one.jsonl", '{"text": "two lines\\nin one record"}\n', "line"),
])
def test_one_document_is_refused(tok, tmp_path, name, content, documents):
    src = tmp_path / name
    src.write_text(content, encoding="utf-8")
    with pytest.raises(LmforgeError) as e:
        prepare_data([src], tok_dir(tok, tmp_path), tmp_path / "out", documents=documents)
    assert str(e.value) == (f"{src}: only 1 document, so it cannot be split into train and validation data, which "
                            "`lmforge pretrain` needs (val_fraction holds out whole documents); give at least 2")
    assert _leftovers(tmp_path, "out") == []


def test_all_documents_held_out_is_refused(tok, tmp_path):
    assert all(is_val_document(i, 0.9) for i in range(4))
    src = _write_jsonl(tmp_path / "d.jsonl", DOCS[:4])
    with pytest.raises(LmforgeError, match=r"^config key 'val_fraction': all 4 documents were held out for "
                                           r"validation \(val_fraction=0\.9\), leaving none to train on"):
        prepare_data([src], tok_dir(tok, tmp_path), tmp_path / "out", val_fraction=0.9)
    assert _leftovers(tmp_path, "out") == []


def test_no_validation_split_is_told_at_prepare_time_and_pretrain_refuses_it(tok, tmp_path, capsys):
    src = _write_jsonl(tmp_path / "d.jsonl", DOCS)
    assert _prepare([src], tok_dir(tok, tmp_path), tmp_path / "data", "--val-fraction", "0") == 0
    assert capsys.readouterr().err == (f"warning: val_fraction=0: {tmp_path / 'data'} has no validation split, so "
                                       "`lmforge pretrain` refuses it; prepare it with val_fraction > 0 to pretrain "
                                       "on it\n")
    assert main(["pretrain", f"data={tmp_path / 'data'}", f"out={tmp_path / 'run'}", *TINY_PRETRAIN]) == 1
    assert "has no validation tokens" in capsys.readouterr().err


def test_bad_documents_value_is_one_error_naming_the_key(tok, tmp_path, capsys):
    src = _write_jsonl(tmp_path / "d.jsonl", DOCS)
    assert _prepare([src], tok_dir(tok, tmp_path), tmp_path / "out", "documents=lines") == 1
    assert capsys.readouterr().err == ("lmforge data: error: config key 'documents' must be blank_line or "
                                       "line, got 'lines'\n")
    with pytest.raises(LmforgeError, match=r"^config key 'documents' must be blank_line or line, got 'lines'$"):
        prepare_data([src], tok_dir(tok, tmp_path), tmp_path / "out", documents="lines")
    assert _leftovers(tmp_path, "out") == []


# ----------------------------------------------------------------------------------------------------------
# Worker processes (large corpora): the same bytes as one process, the same errors, nothing left behind

def _world_docs(seed, tokens):
    import random

    from lmforge.world.corpus import build_corpus

    docs = build_corpus(random.Random(f"corpus-{seed}"), tokens)
    # some multi-line documents (documents=line splits them), and special-token strings in the text
    return [d.replace(". ", ".\n", 1) if i % 3 == 0 else d + " <|eos|>" * (i % 5 == 0) for i, d in enumerate(docs)]


def _three_inputs(tmp_path):
    """A .txt, a .jsonl and a .txt.gz file of ~1,000 documents each."""
    a, b, c = _world_docs(1, 40_000), _world_docs(2, 40_000), _world_docs(3, 40_000)
    (tmp_path / "a.txt").write_text("\n\n".join(a) + "\n", encoding="utf-8")
    _write_jsonl(tmp_path / "b.jsonl", b)
    (tmp_path / "c.txt.gz").write_bytes(gzip.compress(("\n\n".join(c) + "\n").encode()))
    return [tmp_path / "a.txt", tmp_path / "b.jsonl", tmp_path / "c.txt.gz"], (a, b, c)


@pytest.mark.parametrize("documents", ["blank_line", "line"])
def test_worker_processes_write_the_same_bytes_as_one_process(tok, tmp_path, documents):
    inputs, (a, b, c) = _three_inputs(tmp_path)
    if documents == "line":  # .txt documents become their lines; .jsonl records stay whole
        a, c = [line for d in a for line in d.split("\n")], [line for d in c for line in d.split("\n")]
    docs = a + b + c
    tdir = tok_dir(tok, tmp_path)
    # small chunks and shards: many chunks in flight at once, documents crossing chunk and shard boundaries
    kw = dict(val_fraction=0.1, chunk_docs=64, shard_tokens=20_000, documents=documents)
    one = prepare_data(inputs, tdir, tmp_path / "one", processes=0, **kw)
    two = prepare_data(inputs, tdir, tmp_path / "two", processes=2, **kw)
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir())
    assert len(one["splits"]["train"]["shards"]) > 5 and one["splits"]["val"]["documents"] > 100
    for name in names:  # manifest.json included
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    # ... and both hold what tokenizers gives, document by document
    expected = _expected(docs, 0.1)
    for split in ("train", "val"):
        stream = np.concatenate(_read_split(tmp_path / "two", split)).tolist()
        ids = tok.encode_batch(expected[split])
        assert stream == [t for d in ids for t in [tok.special.bos] + d + [tok.special.eos]]
    assert two["splits"]["train"]["documents"] + two["splits"]["val"]["documents"] == len(docs)


def test_a_workers_exception_is_raised_here_and_the_workers_stop(tok):
    from lmforge.data import _Workers

    workers = _Workers(2, tok.fast_encoder(), tok.special.bos, tok.special.eos, np.dtype(np.uint16))
    try:
        chunks = [["a cat"], ["a dog"], [None], ["a bird"]]  # None: encode_batch raises TypeError in worker 0
        encoded = workers.encode(iter(chunks))
        assert next(encoded)[0].tolist() == [tok.special.bos, *tok.encode("a cat"), tok.special.eos]
        assert next(encoded)[0].tolist() == [tok.special.bos, *tok.encode("a dog"), tok.special.eos]
        with pytest.raises(TypeError) as e:
            next(encoded)
        assert "in a tokenizing worker process" in str(e.value.__cause__) and "encode_batch" in str(e.value.__cause__)
    finally:
        workers.stop(clean=False)
    assert all(p.exitcode is not None for p in workers.procs)


def test_a_bad_line_in_a_middle_file_is_the_same_error_with_workers(tok, tmp_path):
    inputs, _ = _three_inputs(tmp_path)
    bad = tmp_path / "bad.txt"
    lines = "".join(f"paragraph {i}, the apple is red\n\n" for i in range(600)).encode()
    bad.write_bytes(lines + b"caf\xe9 au lait\n\nmore\n")
    tdir = tok_dir(tok, tmp_path)
    errors = []
    for processes in (0, 2):
        with pytest.raises(LmforgeError) as e:
            prepare_data([inputs[0], bad, inputs[1]], tdir, tmp_path / "out", chunk_docs=16, processes=processes)
        errors.append(str(e.value))
        assert _leftovers(tmp_path, "out") == []
    assert errors[0] == errors[1] == f"{bad}:1201: not valid UTF-8 (invalid continuation byte at byte 3)"


def test_a_fast_encoder_that_disagrees_with_tokenizers_is_dropped_with_a_note(tok, capsys):
    from lmforge.data import _fast_or_none
    from lmforge.tokenizer import FastEncoder

    fast = tok.fast_encoder()
    assert _fast_or_none(tok, fast, DOCS) is fast and capsys.readouterr().err == ""
    ranks = dict(fast.ranks)
    a, b = sorted({tok.token_bytes(i) for i in tok.encode(DOCS[0])}, key=len)[-2:]
    ranks[a], ranks[b] = ranks[b], ranks[a]  # two tokens of the first document trade ids
    assert _fast_or_none(tok, FastEncoder(ranks, fast.specials), DOCS) is None
    assert capsys.readouterr().err == ("note: tiktoken's token ids differ from tokenizers' on the first documents, so "
                                       "this corpus is tokenized by tokenizers (slower)\n")


def _workers_of(pid):
    """(pid, CPU seconds) of each multiprocessing child of process `pid` (Linux /proc)."""
    found = []
    for d in Path("/proc").iterdir():
        try:
            stat, cmd = (d / "stat").read_text(), (d / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # state, ppid, ... utime (12th), stime (13th)
        if fields[1] == str(pid) and b"spawn_main" in cmd:
            found.append((int(d.name), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")))
    return found


def _alive(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(sys.platform != "linux", reason="reads process states in /proc")
def test_idle_workers_end_when_their_prepare_process_is_killed(tok, tmp_path):
    """SIGKILL (or the OOM killer) runs none of prepare's cleanup: its workers, waiting for the next chunk, must see
    the parent gone and end by themselves, not linger forever."""
    code = ("import sys, time; import numpy as np; from lmforge.tokenizer import Tokenizer; "
            "from lmforge.data import _Workers; tok = Tokenizer.load(sys.argv[1]); "
            "w = _Workers(2, tok.fast_encoder(), tok.special.bos, tok.special.eos, np.dtype(np.uint16)); "
            "print(*(p.pid for p in w.procs), flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tok_dir(tok, tmp_path))], stdout=subprocess.PIPE,
                            text=True)
    try:
        workers = [int(pid) for pid in proc.stdout.readline().split()]
        assert len(workers) == 2 and all(_alive(pid) for pid in workers)
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in workers)


@pytest.mark.slow  # a prepare process with two workers, ~7 s per case
@pytest.mark.skipif(sys.platform != "linux", reason="finds the worker processes in /proc")
@pytest.mark.parametrize("stop", ["kill-a-worker", "ctrl-c"])
def test_a_killed_worker_or_ctrl_c_ends_prepare_with_no_output_and_no_workers_left(tok, tmp_path, stop):
    one_mb = "\n\n".join(_world_docs(1, 300_000)) + "\n\n"
    src = tmp_path / "big.txt"
    src.write_text(one_mb * 60, encoding="utf-8")  # ~60 MB: several seconds of work for two workers
    code = ("import sys; from lmforge.data import prepare_data; "
            "prepare_data([sys.argv[1]], sys.argv[2], sys.argv[3], processes=2)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(src), str(tok_dir(tok, tmp_path)), str(tmp_path / "out")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            # as from a terminal: a background job (`cmd &`, nohup, some CI runners) starts with
                            # SIGINT ignored, and a Python started so never raises KeyboardInterrupt
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        # both tokenizing, with most of the corpus still ahead (a late signal could find the work done: flaky)
        while len(workers := _workers_of(proc.pid)) < 2 or min(cpu for _, cpu in workers) < 0.2:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()
            time.sleep(0.05)
        if stop == "kill-a-worker":
            os.kill(workers[0][0], signal.SIGKILL)
        else:  # what a terminal sends on Ctrl-C: SIGINT to the whole process group
            os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert ("a tokenizing worker process died" if stop == "kill-a-worker" else "KeyboardInterrupt") in err.decode()
    assert _leftovers(tmp_path, "out") == []
    assert not any(_alive(pid) for pid, _ in workers)
