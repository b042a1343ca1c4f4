"""Tokenizer: lossless round trip, special tokens, input validation, the fast (tiktoken) encoder."""

import gzip
import json
import os
import pickle
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmforge.errors import LmforgeError
from lmforge.tokenizer import MIN_VOCAB_SIZE, SPECIAL_TOKENS, Tokenizer, iter_documents, train_tokenizer

FUZZ = settings(max_examples=int(os.environ.get("LMFORGE_FUZZ_EXAMPLES", "100")), deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

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


# ----------------------------------------------------------------------------------------------------------
# The fast encoder (tiktoken over the same vocabulary) must give exactly the ids of `tokenizers`

def _world_documents(seed: int, tokens: int) -> list[str]:
    from lmforge.world.corpus import build_corpus

    return build_corpus(random.Random(f"corpus-{seed}"), tokens)


@pytest.fixture(scope="module")
def world_tok(tmp_path_factory):
    """A larger vocabulary than `tok`'s (more merge rules that can compete), trained on the world corpus."""
    path = tmp_path_factory.mktemp("world") / "corpus.txt"
    path.write_text("\n\n".join(_world_documents(0, 150_000)) + "\n", encoding="utf-8")
    return train_tokenizer([path], 2048)


# Text pieces where the two libraries could part: special tokens and pieces of them, contractions, runs of
# whitespace before words and at the end, digits, CJK, combining marks, emoji, non-ASCII spaces, control characters.
PIECES = SPECIAL_TOKENS + ["<|", "|>", "<|eos", "s|>", "<|<|bos|>|>", "'s", "'ll", "'D", " '", " ", "  ", "\n",
                           "\n\n", "\t", " \n ", "\r\n", "\u3000", "\u00a0", "\u2028", "\x85", "\x1c", "\x00",
                           "12", " 3.5", "٣", "Ⅻ", "苹果", " 大", "é", "e\u0301", "🍎", "👩‍👩‍👧", "the", " the", " The", "!!"]
any_text = st.lists(st.text(st.characters(exclude_categories=["Cs"]), max_size=8) | st.sampled_from(PIECES),
                    max_size=16).map("".join)


@pytest.fixture(scope="module")
def fast_pairs(tok, world_tok):
    return [(t, t.fast_encoder()) for t in (tok, world_tok)]


@FUZZ
@given(text=any_text)
def test_fast_encoder_equals_tokenizers_on_any_text(fast_pairs, text):
    for t, fast in fast_pairs:
        assert fast.encode(text) == t.encode(text)


def test_fast_encoder_equals_tokenizers_on_a_corpus(tok, world_tok):
    docs = _world_documents(1, 100_000) + MIXED + ["<|user|>hi<|end|><|assistant|>hello<|end|>", "a<|eos|>b"]
    for t in (tok, world_tok):
        fast = t.fast_encoder()
        assert fast.encode_batch(docs) == t.encode_batch(docs)
        # A worker process gets the encoder by pickle.
        assert pickle.loads(pickle.dumps(fast)).encode_batch(docs[:50]) == t.encode_batch(docs[:50])


def _variant(tok, change) -> Tokenizer:
    """`tok` with its tokenizer.json changed by `change(spec)`."""
    from tokenizers import Tokenizer as HFTokenizer

    spec = json.loads(tok.hf.to_str())
    change(spec)
    return Tokenizer(HFTokenizer.from_str(json.dumps(spec)))


def _remove_merge_of(spec, token):
    spec["model"]["merges"] = [m for m in spec["model"]["merges"] if "".join(m) != token]


@pytest.mark.parametrize("change", [
    lambda s: s.update(normalizer={"type": "NFC"}),  # Qwen2
    lambda s: s.update(pre_tokenizer={"type": "Sequence", "pretokenizers": [  # Llama 3 / SmolLM-style regex split
        {"type": "Split", "pattern": {"Regex": "\\p{N}{1,3}"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}),
    lambda s: s["pre_tokenizer"].update(add_prefix_space=True),
    lambda s: s["model"].update(dropout=0.1),
    lambda s: s.update(post_processor={"type": "TemplateProcessing", "special_tokens": {},
                                       "single": [{"Sequence": {"id": "A", "type_id": 0}}],
                                       "pair": [{"Sequence": {"id": "A", "type_id": 0}}]}),
    lambda s: s["added_tokens"].append({"id": 0, "content": "<|pad|>x", "single_word": False, "lstrip": False,
                                        "rstrip": False, "normalized": False, "special": True}),
    lambda s: s["added_tokens"][0].update(normalized=True),
    lambda s: s["model"]["merges"].reverse(),  # ids no longer grow with the merge rules
    lambda s: _remove_merge_of(s, "Ġthe"),  # a token its own bytes no longer encode to
], ids=["normalizer", "split-pretokenizer", "prefix-space", "dropout", "post-processor", "prefix-special",
        "normalized-special", "merge-order", "unreachable-token"])
def test_fast_encoder_declines_other_tokenizers(tok, world_tok, change):
    assert tok.fast_encoder() is not None and world_tok.fast_encoder() is not None
    assert _variant(world_tok, change).fast_encoder() is None
