"""Translate: an adjective + noun phrase into Chinese ('Translate into Chinese: red apple' -> '红苹果')."""

from __future__ import annotations

import random

from lmforge.world.facts import ADJECTIVES, NOUNS
from lmforge.world.tasks.base import Task, Template


class Translate(Task):
    """Key (adjective, noun); the answer is the two Chinese words joined (one-character adjectives need no 的)."""

    name = "translate"
    weight = 0.2
    templates = (
        Template("en", "Translate into Chinese", "{phrase}"),
        Template("en", "Translate into Chinese: {phrase}"),
        Template("en", 'How do you say "{phrase}" in Chinese?'),
        Template("zh", "翻译成中文", "{phrase}"),
    )
    fields = {"phrase": r"[a-z]+ [a-z]+"}
    # Translations are learned from the shared bilingual documents (world/corpus.py), not one of its own.

    def random_key(self, rng: random.Random) -> tuple:
        """A random adjective and noun."""
        return (rng.choice(list(ADJECTIVES)), rng.choice(list(NOUNS)))

    def placeholders(self, key: tuple) -> dict:
        """The English phrase."""
        return dict(phrase=" ".join(key))

    def key_from_fields(self, template: Template, fields: dict[str, str]) -> tuple | None:
        """(adjective, noun), or None when either word is not in the dictionary."""
        adj, noun = fields["phrase"].split()
        return (adj, noun) if adj in ADJECTIVES and noun in NOUNS else None

    def ideal(self, key: tuple, lang: str) -> str:
        """The Chinese phrase alone: 红苹果 (the same whatever the prompt's language)."""
        return ADJECTIVES[key[0]] + NOUNS[key[1]]

    def wrong(self, key: tuple, lang: str, rng: random.Random) -> str:
        """The phrase with either the adjective or the noun mistranslated."""
        adj, noun = key
        if rng.random() < 0.5:
            adj = rng.choice([a for a in ADJECTIVES if a != adj])
        else:
            noun = rng.choice([n for n in NOUNS if n != noun])
        return ADJECTIVES[adj] + NOUNS[noun]

    def correctness(self, key: tuple, lang: str, response: str) -> float:
        """60 for the joined phrase, 30 for both words apart; 0 when several adjectives are offered."""
        adj, noun = ADJECTIVES[key[0]], NOUNS[key[1]]
        if any(a + noun in response for a in ADJECTIVES.values() if a != adj):
            return 0.0  # hedged between several translations
        return 60.0 if adj + noun in response else 30.0 if adj in response and noun in response else 0.0
