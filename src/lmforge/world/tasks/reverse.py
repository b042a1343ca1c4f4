"""Reverse: a list of words backwards ('Reverse the order of these words: cat dog bird' -> 'bird dog cat')."""

from __future__ import annotations

import itertools
import random
import re

from lmforge.world.facts import NOUNS
from lmforge.world.tasks.base import Task, Template

WORDS = sorted(NOUNS)


class Reverse(Task):
    """Key (word, word, ...): three or four nouns, in prompt order."""

    name = "reverse"
    weight = 0.1
    templates = (
        Template("en", "Reverse the order of these words: {words}"),
        Template("en", "Reverse the word order", "{words}"),
        Template("zh", "把这些词的顺序倒过来", "{words}"),
    )
    fields = {"words": r"[a-z]+(?: [a-z]+){2,3}"}
    corpus_weight = 0.075

    def random_key(self, rng: random.Random) -> tuple:
        """Three or four different nouns."""
        return tuple(rng.sample(WORDS, rng.choice([3, 4])))

    def placeholders(self, key: tuple) -> dict:
        """The words, space-separated."""
        return dict(words=" ".join(key))

    def key_from_fields(self, template: Template, fields: dict[str, str]) -> tuple | None:
        """The words as asked: any lower-case words can be reversed."""
        return tuple(fields["words"].split())

    def ideal(self, key: tuple, lang: str) -> str:
        """The words backwards, space-separated."""
        return " ".join(reversed(key))

    def wrong(self, key: tuple, lang: str, rng: random.Random) -> str:
        """The words unreversed or in another order (a word dropped when every order reads the same)."""
        others = sorted({" ".join(p) for p in itertools.permutations(key)} - {self.ideal(key, lang)})
        if not others:  # "cat cat cat" reads the same backwards
            return " ".join(key[1:])
        unreversed = " ".join(key)
        return unreversed if unreversed in others and rng.random() < 0.5 else rng.choice(others)

    def correctness(self, key: tuple, lang: str, response: str) -> float:
        """60 for the words backwards (punctuation between them allowed), 20 for all words in another order."""
        words = re.findall(r"[a-z]+", response.lower())
        if f" {' '.join(reversed(key))} " in f" {' '.join(words)} ":
            return 60.0
        return 20.0 if all(w in words for w in key) else 0.0

    def document(self, rng: random.Random) -> str:
        """A few word lists stated forwards and backwards."""
        out = []
        for _ in range(rng.randint(3, 5)):
            words = self.random_key(rng)
            pattern = rng.choice(["The words {w} in reverse order are {r}.", "Read backwards, {w} becomes {r}.",
                                  "Turn {w} around and you get {r}."])
            out.append(pattern.format(w=" ".join(words), r=" ".join(reversed(words))))
        return " ".join(out)
