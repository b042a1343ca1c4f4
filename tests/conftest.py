"""Shared fixtures: a small tokenizer trained once per session and tiny model configs."""

import os

# Hypothesis runs every installed package's "hypothesis" entry point when imported; trio 0.35 (pulled in by
# selenium, for the browser test) registers one that no longer exists and crashes the session's end. lmforge's
# tests use no third-party Hypothesis plugins.
os.environ.setdefault("HYPOTHESIS_NO_PLUGINS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from lmforge.model import ModelConfig  # noqa: E402

torch.set_num_threads(1)  # small ops: one thread is faster and immune to a busy second core

SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. 敏捷的棕色狐狸跳过了懒狗。\n\n"
    "12 + 7 = 19. The apple is red. 苹果是红色的。 🍎🚀 Emoji and   spaces\tand tabs.\n\n"
) * 40


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(SAMPLE_TEXT, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tok(corpus_file, tmp_path_factory):
    from lmforge.tokenizer import train_tokenizer

    return train_tokenizer([corpus_file], 400, tmp_path_factory.mktemp("tok"))


def tiny_config(vocab_size=400, causal=True, **kw):
    base = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, is_causal=causal)
    base.update(kw)
    return ModelConfig(**base)
