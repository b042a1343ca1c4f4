"""Uppercase: write an English word or phrase in capital letters ("Write 'cat' in uppercase." -> 'CAT')."""

from __future__ import annotations

import random
import re

from lmforge.world.facts import ADJECTIVES, ENTITIES, NOUNS
from lmforge.world.tasks.base import Task, Template

WORDS = sorted({e.en for e in ENTITIES} | set(NOUNS) | set(ADJECTIVES))


class Uppercase(Task):
    """Key (text,): one known word or an adjective + noun phrase."""

    name = "uppercase"
    weight = 0.1
    templates = (
        Template("en", "Write '{text}' in uppercase."),
        Template("en", "Convert to uppercase", "{text}"),
        Template("zh", "把下面的英文改成大写字母", "{text}"),
    )
    fields = {"text": r"[a-z]+(?: [a-z]+)?"}
    corpus_weight = 0.075

    def random_key(self, rng: random.Random) -> tuple:
        """Half the time a single word, else an adjective + noun phrase."""
        if rng.random() < 0.5:
            return (rng.choice(WORDS),)
        return (f"{rng.choice(list(ADJECTIVES))} {rng.choice(list(NOUNS))}",)

    def placeholders(self, key: tuple) -> dict:
        """The lower-case text."""
        return dict(text=key[0])

    def key_from_fields(self, template: Template, fields: dict[str, str]) -> tuple | None:
        """(text,): any lower-case word or two can be written in capitals."""
        return (fields["text"],)

    def ideal(self, key: tuple, lang: str) -> str:
        """The text in capitals alone: CAT."""
        return key[0].upper()

    def wrong(self, key: tuple, lang: str, rng: random.Random) -> str:
        """The text left in lower case, or another word in capitals."""
        return key[0] if rng.random() < 0.3 else rng.choice([w for w in WORDS if w != key[0]]).upper()

    def correctness(self, key: tuple, lang: str, response: str) -> float:
        """60 for the text in capitals, 20 for the text in another case, else 0."""
        if re.search(rf"(?<![A-Za-z]){re.escape(key[0].upper())}(?![A-Za-z])", response):
            return 60.0
        return 20.0 if re.search(rf"(?<![a-z]){re.escape(key[0])}(?![a-z])", response.lower()) else 0.0

    def document(self, rng: random.Random) -> str:
        """A few words or phrases shown in lower case and in capitals."""
        out = []
        for _ in range(rng.randint(3, 6)):
            text = self.random_key(rng)[0]
            out.append(rng.choice(["In capital letters, {t} is written {T}.", "{T} is {t} in uppercase.",
                                   "Written in big letters, {t} becomes {T}."]).format(t=text, T=text.upper()))
        return " ".join(out)
