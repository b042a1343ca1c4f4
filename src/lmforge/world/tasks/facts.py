"""Facts: an attribute of an entity ('What color is the banana?' -> 'The banana is yellow.')."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from lmforge.world.facts import ATTR_VALUES, ENTITIES, ENTITY_BY_EN, ENTITY_BY_ZH, HABITATS, SIZES, fact_sentence
from lmforge.world.style import normalize
from lmforge.world.tasks.base import Task, Template, alternation


@dataclass(frozen=True)
class FactTemplate(Template):
    """A template asking one attribute: a colour question can only ask colours."""

    attr: str = ""


_QUESTIONS = {  # attribute -> (English questions, Chinese questions)
    "color": (["What color is the {entity}?", "What is the color of the {entity}?",
               "Tell me the color of the {entity}."],
              ["{entity_zh}是什么颜色的?", "{entity_zh}的颜色是什么?"]),
    "size": (["Is the {entity} big or small?", "Is the {entity} small or big?", "How big is the {entity}?"],
             ["{entity_zh}是大的还是小的?", "{entity_zh}大还是小?"]),
    "kind": (["What kind of thing is the {entity}?", "What type of thing is the {entity}?",
              "Which group does the {entity} belong to?"], ["{entity_zh}是哪一类东西?", "{entity_zh}属于什么类别?"]),
    "habitat": (["Where does the {entity} live?", "Where can you find the {entity}?",
                 "Where is the home of the {entity}?"],
                ["{entity_zh}住在哪里?", "在哪里能找到{entity_zh}?"]),
    "sound": (["What sound does the {entity} make?", "What does the {entity} say?", "How does the {entity} sound?"],
              ["{entity_zh}怎么叫?", "{entity_zh}发出什么声音?"]),
}


def _zh_key(attr: str, v: str) -> str:
    """The Chinese text that signals value v in an answer (大的 not 大: 大象 contains 大)."""
    if attr == "size":
        return SIZES[v] + "的"
    if attr == "habitat":
        return HABITATS[v][1][:-1]  # 农场上 -> 农场, 河里 -> 河
    return ATTR_VALUES[attr][v]


# Every entity name, longest first, so 熊猫 (panda) is not read as 熊 (bear) and 猫 (cat), nor 河马 as 马. An English
# name counts after an article only: "saw", "train", "fish" are also plain words ("I saw that...").
_ENTITY_NAME_RE = re.compile(r"\b(?:the|a|an)\s+(" + alternation(ENTITY_BY_EN) + r")\b|(" + alternation(ENTITY_BY_ZH)
                             + ")", re.I)


def _mentioned_entities(response: str) -> list:
    """The entities a response names (English with an article, or Chinese), in order."""
    found = (m.group(1) or m.group(2) for m in _ENTITY_NAME_RE.finditer(response))
    return [ENTITY_BY_EN.get(name.lower()) or ENTITY_BY_ZH[name] for name in found]


class Facts(Task):
    """Key (entity, attr): an entity's English name and one of the attributes it has."""

    name = "facts"
    weight = 0.3
    templates = tuple(FactTemplate(lang, q, attr=attr) for attr, (en, zh) in _QUESTIONS.items()
                      for lang, qs in (("en", en), ("zh", zh)) for q in qs)
    fields = {"entity": alternation(ENTITY_BY_EN), "entity_zh": alternation(ENTITY_BY_ZH)}
    # Facts are learned from the shared entity and bilingual documents (world/corpus.py), not one of its own.

    def random_key(self, rng: random.Random) -> tuple:
        """A random entity and one of its attributes."""
        e = rng.choice(ENTITIES)
        return (e.en, rng.choice(e.attrs()))

    def templates_for(self, key: tuple) -> list[Template]:
        """Only the questions about the key's attribute."""
        return [t for t in self.templates if t.attr == key[1]]

    def placeholders(self, key: tuple) -> dict:
        """The entity's English and Chinese names."""
        return dict(entity=key[0], entity_zh=ENTITY_BY_EN[key[0]].zh)

    def key_from_fields(self, template: Template, fields: dict[str, str]) -> tuple | None:
        """(entity, attr), or None when the entity lacks the attribute (a hammer has no sound)."""
        e = ENTITY_BY_EN[fields["entity"]] if "entity" in fields else ENTITY_BY_ZH[fields["entity_zh"]]
        return (e.en, template.attr) if getattr(e, template.attr) is not None else None

    def ideal(self, key: tuple, lang: str) -> str:
        """The canonical fact sentence: 'The banana is yellow.' / 香蕉是黄色的。"""
        e = ENTITY_BY_EN[key[0]]
        return fact_sentence(e, key[1], getattr(e, key[1]), lang)

    def wrong(self, key: tuple, lang: str, rng: random.Random) -> str:
        """The fact sentence with another value of the attribute (another colour, another home...)."""
        e, attr = ENTITY_BY_EN[key[0]], key[1]
        return fact_sentence(e, attr, rng.choice([v for v in ATTR_VALUES[attr] if v != getattr(e, attr)]), lang)

    def correctness(self, key: tuple, lang: str, response: str) -> float:
        """60 for the fact sentence, 45 for the right value alone; 0 for a wrong, missing or hedged value, and
        0 for an answer about another entity (锤子是大的还是小的? -> 台灯是小的。 names the wrong thing)."""
        e, attr = ENTITY_BY_EN[key[0]], key[1]
        if any(name != e for name in _mentioned_entities(response)):
            return 0.0
        # Strip the entity's own name first: 河马 contains 河, and a value must not be read off the name.
        text = re.sub(rf"\b{e.en}\b", " ", response.lower()).replace(e.zh, " ")
        found = [v for v in ATTR_VALUES[attr] if re.search(rf"\b{v}\b", text) or _zh_key(attr, v) in text]
        if found != [getattr(e, attr)]:
            return 0.0  # wrong, missing or hedged ("yellow or red")
        return 60.0 if normalize(self.ideal(key, lang)).rstrip(".。") in normalize(response) else 45.0
