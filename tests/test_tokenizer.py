"""Tokenizer: lossless round trip, special tokens, input validation."""

import gzip
import json

import pytest

from lmforge.errors import LmforgeError
from lmforge.tokenizer import MIN_VOCAB_SIZE, SPECIAL_TOKENS, Tokenizer, iter_documents, train_tokenizer

MIXED = ["Hello, world!", "你好,世界。我们在训练语言模型。", "emoji 🎉🍎👩‍👩‍👧 mixed 中文 and English",
         "   leading and trailing spaces   ", "tabs\tand\nnewlines\n\n\nruns      of spaces", "", "ünïcödé ñ — “quotes”"]


def test_round_trip_mixed_text(tok):
    for text in MIXED:
        assert tok.decode(tok.encode(text)) == text


def test_special_tokens_distinct_and_pad_is_not_eos(tok):
    sp = tok.special
    ids = [sp.pad, sp.bos, sp.eos, sp.system, sp.user, sp.assistant, sp.end, sp.sep, sp.mask]
    assert len(set(ids)) == len(SPECIAL_TOKENS)
    assert sp.pad != sp.eos


def test_saved_file_loads_with_tokenizers_library(tok, tmp_path):
    from tokenizers import Tokenizer as HF

    tok.save(tmp_path)
    hf = HF.from_file(str(tmp_path / "tokenizer.json"))
    assert hf.encode("苹果 apple", add_special_tokens=False).ids == tok.encode("苹果 apple")
    assert Tokenizer.load(tmp_path).fingerprint() == tok.fingerprint()


def test_token_bytes_concatenate_to_utf8(tok):
    text = "混合 text 🎉"
    assert b"".join(tok.token_bytes(i) for i in tok.encode(text)).decode() == text


def test_jsonl_and_gz_inputs(tmp_path):
    p = tmp_path / "a.jsonl.gz"
    with gzip.open(p, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "first doc"}) + "\n\n" + json.dumps({"text": "第二"}) + "\n")
    assert list(iter_documents([p])) == ["first doc", "第二"]
    t = tmp_path / "b.txt"
    t.write_text("one\nstill one\n\ntwo\n", encoding="utf-8")
    assert list(iter_documents([t])) == ["one\nstill one", "two"]


@pytest.mark.parametrize("content, message", [
    (b"", "input is empty"),
    (b"ok line\n\xff\xfe bad bytes\n", "b.txt:2: not valid UTF-8"),
])
def test_bad_inputs_name_the_file(tmp_path, content, message):
    p = tmp_path / "b.txt"
    p.write_bytes(content)
    with pytest.raises(LmforgeError, match=message):
        train_tokenizer([p], 300, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_input_and_small_vocab(tmp_path, corpus_file):
    with pytest.raises(LmforgeError, match="not found"):
        train_tokenizer([tmp_path / "nope.txt"], 300)
    with pytest.raises(LmforgeError, match="smaller than the byte alphabet"):
        train_tokenizer([corpus_file], MIN_VOCAB_SIZE - 1)


def test_invalid_jsonl_names_line(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text('{"text": "a"}\n{oops\n', encoding="utf-8")
    with pytest.raises(LmforgeError, match="c.jsonl:2: invalid JSON"):
        list(iter_documents([p]))


def test_streaming_never_splits_a_multibyte_character(tok):
    from lmforge.generation import Utf8Streamer

    text = "混合 text 🎉 中文!"
    ids = tok.encode(text)
    streamer = Utf8Streamer(tok)
    chunks = [streamer.push(i) for i in ids] + [streamer.flush()]
    assert "".join(chunks) == text
    assert all("\ufffd" not in c for c in chunks)
    # byte-level BPE does split characters across tokens here, so the test is meaningful
    assert any(len(tok.token_bytes(i)) and not _is_utf8(tok.token_bytes(i)) for i in ids)


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False
