"""The pretraining corpus and its helpers: documents, the token estimate, Chinese numerals."""

import random

import pytest

from lmforge.world import estimate_tokens, zh_number
from lmforge.world.corpus import build_corpus, document_mix
from lmforge.world.tasks import TASKS


@pytest.mark.parametrize("n, zh", [(0, "零"), (7, "七"), (10, "十"), (19, "十九"), (20, "二十"), (68, "六十八"),
                                   (100, "一百"), (105, "一百零五"), (110, "一百一十"), (999, "九百九十九")])
def test_zh_number(n, zh):
    assert zh_number(n) == zh


def test_estimate_tokens():
    assert estimate_tokens("") == 0
    assert estimate_tokens("abcdefg") == pytest.approx(2.0)
    assert estimate_tokens("苹果 apple") == pytest.approx(2 + 6 / 3.5)


def test_document_mix():
    mix = document_mix()
    assert sum(w for _, w in mix) == pytest.approx(1.0)
    # Shared entity and bilingual documents first, then each task's own in TASKS order (fixes the seeded corpus).
    assert [m for m, _ in mix[3:]] == [t.document for t in TASKS if t.corpus_weight > 0]


def test_build_corpus():
    docs = build_corpus(random.Random(0), 2000)
    assert sum(map(estimate_tokens, docs)) >= 2000
    assert docs == build_corpus(random.Random(0), 2000)
    text = "\n\n".join(docs)
    assert " a apple" not in text and " a elephant" not in text  # articles fixed after drawing
