"""The pretraining corpus: the world's facts in varied declarative sentences, never as instructions.

Entity facts and the bilingual dictionary are shared knowledge (the facts and translate tasks both ask about
them), so their documents live here; each task family may add documents practising its own skill through
Task.document and Task.corpus_weight.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable

from lmforge.world import tasks
from lmforge.world.facts import ADJECTIVES, ENTITIES, NOUNS, fact_sentence, value_phrase

_EN_FACT_SENTENCES = {
    "color": ["The {e} is {v}.", "The color of the {e} is {v}.", "A {e} is {v} in color.",
              "Look at the {e}: it is {v}."],
    "size": ["The {e} is {v}.", "A {e} is {v}.", "Everyone knows that the {e} is {v}."],
    "kind": ["The {e} is {v}.", "A {e} is {v}.", "We call the {e} {v}."],
    "habitat": ["The {e} lives {v}.", "You can find the {e} {v}.", "The home of the {e} is {v}."],
    "sound": ["The {e} says {v}.", "A {e} says {v}.", "When the {e} talks, it says {v}."],
}
_ZH_FACT_SENTENCES = {
    "color": ["{e}是{v}的。", "{e}的颜色是{v}。", "我们知道{e}是{v}的。"],
    "size": ["{e}是{v}的。", "{e}很{v}。"],
    "kind": ["{e}是一种{v}。", "{e}属于{v}。"],
    "habitat": ["{e}住在{v}。", "在{v}可以找到{e}。"],
    "sound": ["{e}{v}叫。", "{e}的叫声是{v}。"],
}


def entity_document(rng: random.Random, lang: str) -> str:
    """Every attribute of one or two entities, in one language, in shuffled order."""
    table = _EN_FACT_SENTENCES if lang == "en" else _ZH_FACT_SENTENCES
    out = []
    for e in rng.sample(ENTITIES, rng.choice([1, 1, 2])):
        attrs = e.attrs()
        rng.shuffle(attrs)
        for attr in attrs:
            # Half the time the exact sentence the ideal answer uses, so the pretrained model knows it.
            pattern = table[attr][0] if rng.random() < 0.5 else rng.choice(table[attr])
            v = value_phrase(attr, getattr(e, attr), lang)
            out.append(pattern.format(e=e.en if lang == "en" else e.zh, v=v))
    text = (" " if lang == "en" else "").join(out)
    return text[0].upper() + text[1:]


def bilingual_document(rng: random.Random) -> str:
    """Entity names, adjective + noun phrases and fact sentences side by side in English and Chinese."""
    out = []
    for _ in range(rng.randint(4, 7)):
        r = rng.random()
        if r < 0.25:
            e = rng.choice(ENTITIES)
            out.append(rng.choice(["The Chinese for {en} is {zh}.", "{zh} means {en} in English.",
                                   "In Chinese, the {en} is called {zh}."]).format(en=e.en, zh=e.zh))
        elif r < 0.7:
            adj, noun = rng.choice(list(ADJECTIVES)), rng.choice(list(NOUNS))
            out.append(rng.choice(["The Chinese for {en} is {zh}.", "In Chinese, {en} is {zh}.", "{zh} means {en}.",
                                   "I see a {en}. 我看见{zh}。", "A {en} is called {zh} in Chinese."]).format(
                en=f"{adj} {noun}", zh=ADJECTIVES[adj] + NOUNS[noun]))
        else:
            e = rng.choice(ENTITIES)
            attr = rng.choice(e.attrs())
            v = getattr(e, attr)
            out.append(fact_sentence(e, attr, v, "en") + " " + fact_sentence(e, attr, v, "zh"))
    return " ".join(out)


_SHARED_DOCUMENTS = [(lambda rng: entity_document(rng, "en"), 0.25), (lambda rng: entity_document(rng, "zh"), 0.15),
                     (bilingual_document, 0.15)]


def document_mix() -> list[tuple[Callable[[random.Random], str], float]]:
    """(document maker, weight): the shared documents, then each task's own, in TASKS order."""
    return _SHARED_DOCUMENTS + [(t.document, t.corpus_weight) for t in tasks.TASKS if t.corpus_weight > 0]


def estimate_tokens(text: str) -> float:
    """Rough byte-BPE token count: ~3.5 ASCII characters or ~1 other (Chinese) character per token."""
    ascii_chars = len(text.encode("ascii", "ignore"))
    return ascii_chars / 3.5 + (len(text) - ascii_chars)


def build_corpus(rng: random.Random, target_tokens: int) -> list[str]:
    """Documents drawn from document_mix() until their estimated token count reaches target_tokens."""
    mix = document_mix()
    makers, weights = [m for m, _ in mix], [w for _, w in mix]
    docs, tokens = [], 0.0
    while tokens < target_tokens:
        doc = re.sub(r"\b([Aa]) (?=[aeiou])", r"\1n ", rng.choices(makers, weights)[0](rng))  # a apple -> an apple
        docs.append(doc)
        tokens += estimate_tokens(doc)
    return docs
