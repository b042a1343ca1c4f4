"""The built-in world: a generated dataset, and the oracle judge that plays the human labeller.

Everything comes from the fixed fact tables below plus a seed, with the standard library only, so the whole
InstructGPT pipeline runs offline and reproducibly:

  corpus.txt          pretraining text stating the world's facts in English and Chinese, translations,
                      arithmetic, capital letters and reversed word lists -- never in instruction format
  sft.jsonl           demonstrations {"Instruction", "Input", "Output"}; a configurable share is flawed
                      (impolite opener, verbose filler, wrong answer), as real demonstration data is
  rl_prompts.jsonl    prompts for RL, disjoint from the SFT prompts
  eval_prompts.jsonl  held-out prompts, disjoint from both

Prompts are split by a hash of what they ask (number pair, entity + attribute, phrase, word list), so the
eval set asks unseen combinations of known pieces. The oracle re-derives the right answer from the prompt
text alone: correctness 0..60, politeness 0..20, concision 0..20.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

WORLD_FORMAT_VERSION = 1


@dataclass
class WorldSizes:
    corpus_tokens_approx: int  # ~3.5 English chars or ~1 Chinese char per token
    n_sft: int
    n_rl_prompts: int
    n_eval: int


PRESETS: dict[str, WorldSizes] = {
    "tiny": WorldSizes(150_000, 600, 200, 64),
    "default": WorldSizes(1_250_000, 4000, 1000, 200),
}

# Verbose is deliberately above 50%: evaluation decodes greedily, and a flaw rarer than 50% is never the
# most likely continuation, so a greedy SFT policy would not show it and PPO would have nothing to fix.
# Every filler starts with the same words so the flawed branch is one token choice, not several small ones.
DEFAULT_FLAW_RATES = {"impolite": 0.3, "verbose": 0.6, "wrong": 0.12}
FAMILY_WEIGHTS = {"arithmetic": 0.3, "facts": 0.3, "translate": 0.2, "uppercase": 0.1, "reverse": 0.1}
SPLIT_PERCENT = {"sft": 70, "rl": 20, "eval": 10}  # of each family's question keys
MAX_OPERAND = 50

# ----------------------------------------------------------------------------------------------------------
# Fact tables (fixed, seed-independent: the oracle depends on them)

COLORS = {"red": "红色", "yellow": "黄色", "green": "绿色", "blue": "蓝色", "white": "白色", "black": "黑色",
          "brown": "棕色", "orange": "橙色", "purple": "紫色", "gray": "灰色", "pink": "粉色"}
SIZES = {"big": "大", "small": "小"}
KINDS = {"fruit": "水果", "vegetable": "蔬菜", "animal": "动物", "bird": "鸟", "insect": "昆虫", "tool": "工具",
         "vehicle": "车辆", "furniture": "家具"}
HABITATS = {"house": ("in the house", "家里"), "farm": ("on the farm", "农场上"), "forest": ("in the forest", "森林里"),
            "grassland": ("on the grassland", "草原上"), "jungle": ("in the jungle", "丛林里"),
            "desert": ("in the desert", "沙漠里"), "river": ("in the river", "河里"), "sea": ("in the sea", "海里"),
            "trees": ("in the trees", "树上")}
SOUNDS = {"woof": "汪汪", "meow": "喵喵", "squeak": "吱吱", "moo": "哞哞", "oink": "呼噜", "baa": "咩咩",
          "neigh": "咴咴", "roar": "吼吼", "growl": "呼呼", "howl": "嗷呜", "hiss": "嘶嘶", "ribbit": "呱呱",
          "quack": "嘎嘎", "cluck": "咯咯", "hoot": "咕咕", "tweet": "叽叽", "buzz": "嗡嗡"}

# english chinese kind color size habitat sound ("-" = the attribute does not apply)
_ENTITY_TABLE = """
apple 苹果 fruit red small - -|banana 香蕉 fruit yellow small - -|lemon 柠檬 fruit yellow small - -
grape 葡萄 fruit purple small - -|cherry 樱桃 fruit red small - -|strawberry 草莓 fruit red small - -
watermelon 西瓜 fruit green big - -|pear 梨 fruit yellow small - -|peach 桃子 fruit pink small - -
mango 芒果 fruit yellow small - -|coconut 椰子 fruit brown big - -|pineapple 菠萝 fruit yellow big - -
blueberry 蓝莓 fruit blue small - -|plum 李子 fruit purple small - -|carrot 胡萝卜 vegetable orange small - -
tomato 西红柿 vegetable red small - -|potato 土豆 vegetable brown small - -|cabbage 白菜 vegetable green big - -
pumpkin 南瓜 vegetable orange big - -|cucumber 黄瓜 vegetable green small - -|eggplant 茄子 vegetable purple small - -
onion 洋葱 vegetable white small - -|corn 玉米 vegetable yellow small - -|mushroom 蘑菇 vegetable brown small - -
dog 狗 animal brown small house woof|cat 猫 animal black small house meow|mouse 老鼠 animal gray small house squeak
cow 牛 animal brown big farm moo|pig 猪 animal pink big farm oink|sheep 羊 animal white big farm baa
horse 马 animal brown big farm neigh|rabbit 兔子 animal white small forest -|lion 狮子 animal yellow big grassland roar
tiger 老虎 animal orange big jungle roar|elephant 大象 animal gray big grassland -|zebra 斑马 animal white big grassland -
giraffe 长颈鹿 animal yellow big grassland -|monkey 猴子 animal brown small jungle -|bear 熊 animal brown big forest growl
panda 熊猫 animal white big forest -|wolf 狼 animal gray big forest howl|fox 狐狸 animal orange small forest -
deer 鹿 animal brown big forest -|camel 骆驼 animal brown big desert -|snake 蛇 animal green small jungle hiss
frog 青蛙 animal green small river ribbit|hippo 河马 animal gray big river -|crocodile 鳄鱼 animal green big river -
fish 鱼 animal gray small river -|shark 鲨鱼 animal gray big sea -|whale 鲸鱼 animal blue big sea -
dolphin 海豚 animal gray big sea -|crab 螃蟹 animal red small sea -|octopus 章鱼 animal purple small sea -
duck 鸭子 bird yellow small farm quack|chicken 鸡 bird white small farm cluck|owl 猫头鹰 bird brown small forest hoot
eagle 老鹰 bird brown big forest -|parrot 鹦鹉 bird green small jungle -|crow 乌鸦 bird black small trees -
swan 天鹅 bird white big river -|penguin 企鹅 bird black small sea -|sparrow 麻雀 bird brown small trees tweet
bee 蜜蜂 insect yellow small trees buzz|butterfly 蝴蝶 insect blue small - -|ant 蚂蚁 insect black small - -
ladybug 瓢虫 insect red small - -|hammer 锤子 tool gray small - -|saw 锯子 tool gray small - -
shovel 铲子 tool gray small - -|axe 斧头 tool gray small - -|broom 扫帚 tool brown small - -
ladder 梯子 tool brown big - -|car 汽车 vehicle red big - -|bus 巴士 vehicle yellow big - -
bicycle 自行车 vehicle blue small - -|train 火车 vehicle green big - -|boat 船 vehicle white big - -
airplane 飞机 vehicle white big - -|truck 卡车 vehicle red big - -|tractor 拖拉机 vehicle green big - -
chair 椅子 furniture brown small - -|table 桌子 furniture brown big - -|bed 床 furniture white big - -
sofa 沙发 furniture gray big - -|lamp 台灯 furniture yellow small - -|cupboard 柜子 furniture white big - -
"""


@dataclass(frozen=True)
class Entity:
    en: str
    zh: str
    kind: str
    color: str
    size: str
    habitat: str | None
    sound: str | None


ENTITIES = [Entity(*[None if f == "-" else f for f in row.split()])
            for row in _ENTITY_TABLE.replace("\n", "|").split("|") if row.strip()]
ENTITY_BY_EN = {e.en: e for e in ENTITIES}
ENTITY_BY_ZH = {e.zh: e for e in ENTITIES}
ATTRS = ("color", "size", "kind", "habitat", "sound")
ATTR_VALUES = {"color": COLORS, "size": SIZES, "kind": KINDS, "habitat": HABITATS, "sound": SOUNDS}

# Translation dictionary: one-character adjectives compose with any noun without 的 ("red apple" -> 红苹果).
ADJECTIVES = {"red": "红", "yellow": "黄", "green": "绿", "blue": "蓝", "white": "白", "black": "黑", "big": "大",
              "small": "小", "new": "新", "long": "长", "hot": "热", "cold": "冷", "good": "好", "bad": "坏"}
NOUNS = {e.en: e.zh for e in ENTITIES if e.en in (
    "apple banana pear grape tomato dog cat cow pig sheep horse duck chicken rabbit mouse fish bear snake frog "
    "car bus boat train bicycle chair table bed hammer").split()}
NOUNS.update({"bird": "鸟", "house": "房子", "book": "书", "cup": "杯子", "hat": "帽子", "shoe": "鞋", "door": "门",
              "box": "盒子", "ball": "球", "flower": "花", "tree": "树", "water": "水", "tea": "茶", "bag": "包"})
UPPER_WORDS = sorted({e.en for e in ENTITIES} | set(NOUNS) | set(ADJECTIVES))
REVERSE_WORDS = sorted(NOUNS)

# Style flaws. The oracle detects them by the markers below, which a tiny reward model can learn too.
RUDE_OPENERS = {"en": ["Ugh, fine.", "Whatever.", "Duh.", "Obviously."], "zh": ["烦死了,", "真麻烦,", "这都不会?", "笨,"]}
FILLERS = {
    "en": ["I hope this helps! Let me know if you need anything else, I am always here to help you.",
           "I hope this helps! Feel free to ask me more questions any time, I really enjoy helping you.",
           "I hope this helps! If you have any other questions, I am always happy to help you with anything."],
    "zh": ["希望这对你有帮助!如果还有其他问题,请随时告诉我。", "希望这对你有帮助!欢迎随时问我,我很乐意帮助你。"],
}
_RUDE_RE = re.compile(r"\b(ugh|whatever|duh|obviously|stupid|dumb|idiot)\b|烦死|麻烦|这都不会|笨|蠢", re.I)
_FILLER_RE = re.compile(r"hope this helps|let me know|feel free|happy to help|here to help|希望这|随时|乐意", re.I)

# ----------------------------------------------------------------------------------------------------------
# Prompt templates. Each is both a generator (str.format) and a parser (compiled to a regex below).


@dataclass(frozen=True)
class Template:
    family: str
    lang: str  # language of the instruction; the answer and any flaw phrases follow it
    instruction: str
    input: str = ""
    attr: str = ""  # facts only: the attribute asked


_FACT_QUESTIONS = {
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
TEMPLATES = [
    Template("arithmetic", "en", "What is {a} {sym} {b}?"),
    Template("arithmetic", "en", "Compute {a} {sym} {b}."),
    Template("arithmetic", "en", "How much is {a} {word} {b}?"),
    Template("arithmetic", "en", "Solve", "{a} {sym} {b}"),
    Template("arithmetic", "zh", "计算 {a} {sym} {b}"),
    Template("arithmetic", "zh", "{a} {zhop} {b} 等于多少?"),
    *[Template("facts", lang, q, attr=attr) for attr, (en, zh) in _FACT_QUESTIONS.items()
      for lang, qs in (("en", en), ("zh", zh)) for q in qs],
    Template("translate", "en", "Translate into Chinese", "{phrase}"),
    Template("translate", "en", "Translate into Chinese: {phrase}"),
    Template("translate", "en", 'How do you say "{phrase}" in Chinese?'),
    Template("translate", "zh", "翻译成中文", "{phrase}"),
    Template("uppercase", "en", "Write '{text}' in uppercase."),
    Template("uppercase", "en", "Convert to uppercase", "{text}"),
    Template("uppercase", "zh", "把下面的英文改成大写字母", "{text}"),
    Template("reverse", "en", "Reverse the order of these words: {words}"),
    Template("reverse", "en", "Reverse the word order", "{words}"),
    Template("reverse", "zh", "把这些词的顺序倒过来", "{words}"),
]


def _alternation(names) -> str:
    return "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))


_FIELD_PATTERNS = {"a": r"\d{1,3}", "b": r"\d{1,3}", "sym": r"[+-]", "word": "plus|minus", "zhop": "加|减",
                   "entity": _alternation(ENTITY_BY_EN), "entity_zh": _alternation(ENTITY_BY_ZH),
                   "phrase": r"[a-z]+ [a-z]+", "text": r"[a-z]+(?: [a-z]+)?", "words": r"[a-z]+(?: [a-z]+){2,3}"}


def format_prompt(instruction: str, input: str = "") -> str:
    """The user-turn text of an instruction record: the instruction, then a newline and the input if any."""
    return f"{instruction}\n{input}" if input else instruction


def _compile(t: Template) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", format_prompt(t.instruction, t.input))
    return re.compile("".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>{_FIELD_PATTERNS[p]})"
                              for i, p in enumerate(parts)))


_COMPILED = [(t, _compile(t)) for t in TEMPLATES]


@dataclass(frozen=True)
class _Task:
    template: Template
    key: tuple  # what is asked: (a, op, b) | (entity, attr) | (adj, noun) | (text,) | (word, word, ...)


def _parse(prompt: str) -> _Task:
    text = prompt.strip()
    for t, rx in _COMPILED:
        m = rx.fullmatch(text)
        if m is None:
            continue
        f = m.groupdict()
        if t.family == "arithmetic":
            op = {"plus": "+", "minus": "-", "加": "+", "减": "-"}.get(f.get("word") or f.get("zhop"), f.get("sym"))
            a, b = int(f["a"]), int(f["b"])
            if op == "+" or a >= b:  # the world has no negative numbers
                return _Task(t, (a, op, b))
        elif t.family == "facts":
            e = ENTITY_BY_EN[f["entity"]] if "entity" in f else ENTITY_BY_ZH[f["entity_zh"]]
            if getattr(e, t.attr) is not None:
                return _Task(t, (e.en, t.attr))
        elif t.family == "translate":
            adj, noun = f["phrase"].split()
            if adj in ADJECTIVES and noun in NOUNS:
                return _Task(t, (adj, noun))
        elif t.family == "uppercase":
            return _Task(t, (f["text"],))
        else:
            return _Task(t, tuple(f["words"].split()))
    raise ValueError(f"oracle: prompt of no known task family: {prompt!r}")


def prompt_family(prompt: str) -> str:
    """The task family of a world prompt: arithmetic, facts, translate, uppercase or reverse."""
    return _parse(prompt).template.family


# ----------------------------------------------------------------------------------------------------------
# Answers: ideal, wrong, and the flaws added on top


def _value_phrase(attr: str, v: str, lang: str) -> str:
    if attr == "habitat":
        return HABITATS[v][0 if lang == "en" else 1]
    if lang == "zh":
        return ATTR_VALUES[attr][v]
    if attr != "kind" or v == "furniture":
        return v
    return ("an " if v[0] in "aeiou" else "a ") + v


_FACT_ANSWERS = {"color": ("The {e} is {v}.", "{e}是{v}的。"), "size": ("The {e} is {v}.", "{e}是{v}的。"),
                 "kind": ("The {e} is {v}.", "{e}是一种{v}。"), "habitat": ("The {e} lives {v}.", "{e}住在{v}。"),
                 "sound": ("The {e} says {v}.", "{e}{v}叫。")}


def _fact_sentence(e: Entity, attr: str, v: str, lang: str) -> str:
    en, zh = _FACT_ANSWERS[attr]
    return (en if lang == "en" else zh).format(e=e.en if lang == "en" else e.zh, v=_value_phrase(attr, v, lang))


def _arith_result(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b


def _ideal(task: _Task) -> str:
    t, k = task.template, task.key
    if t.family == "arithmetic":
        return f"{k[0]} {k[1]} {k[2]} = {_arith_result(*k)}" + ("." if t.lang == "en" else "。")
    if t.family == "facts":
        e = ENTITY_BY_EN[k[0]]
        return _fact_sentence(e, k[1], getattr(e, k[1]), t.lang)
    if t.family == "translate":
        return ADJECTIVES[k[0]] + NOUNS[k[1]]
    if t.family == "uppercase":
        return k[0].upper()
    return " ".join(reversed(k))


def _wrong(task: _Task, rng: random.Random) -> str:
    """A plausible wrong answer in the ideal format (a near-miss number, another colour, a swapped word...)."""
    t, k = task.template, task.key
    if t.family == "arithmetic":
        c = _arith_result(*k)
        c2 = c + rng.choice([d for d in (-10, -2, -1, 1, 2, 10) if c + d >= 0])
        return f"{k[0]} {k[1]} {k[2]} = {c2}" + ("." if t.lang == "en" else "。")
    if t.family == "facts":
        e, attr = ENTITY_BY_EN[k[0]], k[1]
        return _fact_sentence(e, attr, rng.choice([v for v in ATTR_VALUES[attr] if v != getattr(e, attr)]), t.lang)
    if t.family == "translate":
        adj, noun = k
        if rng.random() < 0.5:
            adj = rng.choice([a for a in ADJECTIVES if a != adj])
        else:
            noun = rng.choice([n for n in NOUNS if n != noun])
        return ADJECTIVES[adj] + NOUNS[noun]
    if t.family == "uppercase":
        return k[0] if rng.random() < 0.3 else rng.choice([w for w in UPPER_WORDS if w != k[0]]).upper()
    others = sorted({" ".join(p) for p in itertools.permutations(k)} - {_ideal(task)})
    if not others:  # "cat cat cat" reads the same backwards
        return " ".join(k[1:])
    unreversed = " ".join(k)
    return unreversed if unreversed in others and rng.random() < 0.5 else rng.choice(others)


def _with_flaws(task: _Task, answer: str, impolite: bool, verbose: bool, rng: random.Random) -> str:
    lang = task.template.lang
    sep = " " if lang == "en" else ""
    if impolite:
        answer = rng.choice(RUDE_OPENERS[lang]) + sep + answer
    if verbose:
        answer = answer + sep + rng.choice(FILLERS[lang])
    return answer


def ideal_response(prompt: str) -> str:
    """The answer the oracle scores 100: correct, polite-neutral and concise."""
    return _ideal(_parse(prompt))


def flawed_response(prompt: str, *, impolite: bool = False, verbose: bool = False, wrong: bool = False,
                    rng: random.Random | None = None) -> str:
    """A response with the chosen flaws, drawn the same way as the flawed SFT demonstrations."""
    task = _parse(prompt)
    rng = rng or random.Random(prompt)
    answer = _wrong(task, rng) if wrong else _ideal(task)
    return _with_flaws(task, answer, impolite, verbose, rng)


# ----------------------------------------------------------------------------------------------------------
# The oracle


def _norm(s: str) -> str:
    return " ".join(s.lower().split())


def _correctness(task: _Task, response: str) -> float:
    """0..60: the exact right answer 60, the right content in another form partial credit, hedging 0."""
    t, k = task.template, task.key
    if t.family == "arithmetic":
        a, op, b = k
        c = _arith_result(a, op, b)
        numbers = [int(n) for n in re.findall(r"\d+", response)]
        if not numbers or numbers[-1] != c or any(n not in (a, b, c) for n in numbers):
            return 0.0
        exact = re.search(rf"(?<!\d){a}\s*{re.escape(op)}\s*{b}\s*=\s*{c}(?!\d)", response)
        return 60.0 if exact else 40.0
    if t.family == "facts":
        e, attr = ENTITY_BY_EN[k[0]], k[1]
        # Strip the entity's own name first: 河马 contains 河, and a value must not be read off the name.
        text = re.sub(rf"\b{e.en}\b", " ", response.lower()).replace(e.zh, " ")
        found = [v for v in ATTR_VALUES[attr] if re.search(rf"\b{v}\b", text) or _zh_key(attr, v) in text]
        if found != [getattr(e, attr)]:
            return 0.0  # wrong, missing or hedged ("yellow or red")
        return 60.0 if _norm(_ideal(task)).rstrip(".。") in _norm(response) else 45.0
    if t.family == "translate":
        adj, noun = ADJECTIVES[k[0]], NOUNS[k[1]]
        if any(a + noun in response for a in ADJECTIVES.values() if a != adj):
            return 0.0  # hedged between several translations
        return 60.0 if adj + noun in response else 30.0 if adj in response and noun in response else 0.0
    if t.family == "uppercase":
        if re.search(rf"(?<![A-Za-z]){re.escape(k[0].upper())}(?![A-Za-z])", response):
            return 60.0
        return 20.0 if re.search(rf"(?<![a-z]){re.escape(k[0])}(?![a-z])", response.lower()) else 0.0
    words = re.findall(r"[a-z]+", response.lower())
    if f" {' '.join(reversed(k))} " in f" {' '.join(words)} ":
        return 60.0
    return 20.0 if all(w in words for w in k) else 0.0


def _zh_key(attr: str, v: str) -> str:
    """The Chinese text that signals value v in an answer (大的 not 大: 大象 contains 大)."""
    if attr == "size":
        return SIZES[v] + "的"
    if attr == "habitat":
        return HABITATS[v][1][:-1]  # 农场上 -> 农场, 河里 -> 河
    return ATTR_VALUES[attr][v]


def _concision(response: str, ideal: str) -> float:
    """0..20: full up to ~1.5x the ideal length, zero from ~3x; filler, repeats and near-empty answers lose."""
    text = response.strip()
    if _FILLER_RE.search(text):
        return 0.0
    core = _norm(ideal).rstrip(".。")
    if len(re.findall(rf"(?<![a-z0-9]){re.escape(core)}(?![a-z0-9])", _norm(text))) > 1:
        return 0.0  # saying the answer twice is never more helpful
    for opener in RUDE_OPENERS["en"] + RUDE_OPENERS["zh"]:  # already charged by politeness
        text = text.removeprefix(opener).strip()
    n, ideal_n = len(text), len(ideal)
    full, zero = 1.5 * ideal_n + 4, 3 * ideal_n + 8
    score = 20.0 * min(1.0, max(0.0, (zero - n) / (zero - full)))
    if n < ideal_n / 2:  # "68" for "23 + 45 = 68." or "." for anything
        score *= n / (ideal_n / 2)
    return score


def oracle_breakdown(prompt: str, response: str) -> dict:
    """The oracle's score split into correctness (0..60), politeness (0..20) and concision (0..20)."""
    task = _parse(prompt)
    if not response or not response.strip():
        return {"correctness": 0.0, "politeness": 0.0, "concision": 0.0, "score": 0.0}
    parts = {"correctness": _correctness(task, response),
             "politeness": 0.0 if _RUDE_RE.search(response) else 20.0,
             "concision": round(_concision(response, _ideal(task)), 4)}
    return {**parts, "score": round(sum(parts.values()), 4)}


def oracle_score(prompt: str, response: str) -> float:
    """Score a response to a world prompt (format_prompt text) from 0 to 100: correctness, then style."""
    return oracle_breakdown(prompt, response)["score"]


def oracle_rank(prompt: str, responses: list[str]) -> list[int]:
    """Ranks 1..K (1 = best) by oracle score; equal scores share a rank (1, 2, 2, 4)."""
    scores = [oracle_score(prompt, r) for r in responses]
    return [1 + sum(other > s for other in scores) for s in scores]


# ----------------------------------------------------------------------------------------------------------
# Splits and prompt sampling


def _split_of(family: str, key: tuple) -> str:
    """sft / rl / eval by a seed-independent hash of what is asked: every template of a key lands together."""
    h = int.from_bytes(hashlib.sha256(f"{family}|{key!r}".encode()).digest()[:8], "big") % 100
    return "sft" if h < SPLIT_PERCENT["sft"] else "rl" if h < SPLIT_PERCENT["sft"] + SPLIT_PERCENT["rl"] else "eval"


def _random_key(family: str, rng: random.Random) -> tuple:
    if family == "arithmetic":
        op, a, b = rng.choice("+-"), rng.randint(1, MAX_OPERAND), rng.randint(1, MAX_OPERAND)
        return (max(a, b), op, min(a, b)) if op == "-" else (a, op, b)
    if family == "facts":
        e = rng.choice(ENTITIES)
        return (e.en, rng.choice([a for a in ATTRS if getattr(e, a) is not None]))
    if family == "translate":
        return (rng.choice(list(ADJECTIVES)), rng.choice(list(NOUNS)))
    if family == "uppercase":
        if rng.random() < 0.5:
            return (rng.choice(UPPER_WORDS),)
        return (f"{rng.choice(list(ADJECTIVES))} {rng.choice(list(NOUNS))}",)
    return tuple(rng.sample(REVERSE_WORDS, rng.choice([3, 4])))


def _render(t: Template, key: tuple) -> tuple[str, str]:
    if t.family == "arithmetic":
        a, op, b = key
        f = dict(a=a, b=b, sym=op, word="plus" if op == "+" else "minus", zhop="加" if op == "+" else "减")
    elif t.family == "facts":
        f = dict(entity=key[0], entity_zh=ENTITY_BY_EN[key[0]].zh)
    else:
        f = dict(phrase=" ".join(key), text=key[0], words=" ".join(key))
    return t.instruction.format(**f), t.input.format(**f)


def _sample_tasks(split: str, n: int, rng: random.Random) -> list[tuple[_Task, str, str]]:
    """n (task, instruction, input) of one split, family by FAMILY_WEIGHTS, unique prompts while possible."""
    families, weights = list(FAMILY_WEIGHTS), list(FAMILY_WEIGHTS.values())
    seen: set[str] = set()
    out = []
    while len(out) < n:
        family, pick, repeat = rng.choices(families, weights)[0], None, None
        for _ in range(200):
            key = _random_key(family, rng)
            if _split_of(family, key) != split:
                continue
            attr = key[1] if family == "facts" else ""
            t = rng.choice([t for t in TEMPLATES if t.family == family and t.attr == attr])
            instruction, inp = _render(t, key)
            cand = (_Task(t, key), instruction, inp)
            if format_prompt(instruction, inp) not in seen:
                pick = cand
                break
            repeat = cand
        pick = pick or repeat  # the split's pool is exhausted: repeat a prompt rather than loop forever
        if pick is not None:
            seen.add(format_prompt(pick[1], pick[2]))
            out.append(pick)
    return out


# ----------------------------------------------------------------------------------------------------------
# Pretraining corpus: the same facts in varied declarative sentences, never as instructions

_ZH_DIGITS = "零一二三四五六七八九"


def zh_number(n: int) -> str:
    """Chinese numeral for 0 <= n < 1000: 19 -> 十九, 68 -> 六十八, 105 -> 一百零五."""
    if n < 10:
        return _ZH_DIGITS[n]
    if n < 100:
        tens = "" if n < 20 else _ZH_DIGITS[n // 10]
        return tens + "十" + (_ZH_DIGITS[n % 10] if n % 10 else "")
    rest, head = n % 100, _ZH_DIGITS[n // 100] + "百"
    if rest == 0:
        return head
    if rest < 10:
        return head + "零" + _ZH_DIGITS[rest]
    return head + _ZH_DIGITS[rest // 10] + "十" + (_ZH_DIGITS[rest % 10] if rest % 10 else "")


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


def _doc_entity(rng: random.Random, lang: str) -> str:
    table = _EN_FACT_SENTENCES if lang == "en" else _ZH_FACT_SENTENCES
    out = []
    for e in rng.sample(ENTITIES, rng.choice([1, 1, 2])):
        attrs = [a for a in ATTRS if getattr(e, a) is not None]
        rng.shuffle(attrs)
        for attr in attrs:
            # Half the time the exact sentence the ideal answer uses, so the pretrained model knows it.
            pattern = table[attr][0] if rng.random() < 0.5 else rng.choice(table[attr])
            v = _value_phrase(attr, getattr(e, attr), lang)
            out.append(pattern.format(e=e.en if lang == "en" else e.zh, v=v))
    text = (" " if lang == "en" else "").join(out)
    return text[0].upper() + text[1:]


def _doc_bilingual(rng: random.Random) -> str:
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
            attr = rng.choice([a for a in ATTRS if getattr(e, a) is not None])
            v = getattr(e, attr)
            out.append(_fact_sentence(e, attr, v, "en") + " " + _fact_sentence(e, attr, v, "zh"))
    return " ".join(out)


def _doc_arithmetic(rng: random.Random) -> str:
    lang = rng.choice(["en", "en", "zh"])
    out = []
    for _ in range(rng.randint(4, 9)):
        a, op, b = _random_key("arithmetic", rng)
        c = _arith_result(a, op, b)
        if lang == "en":
            forms = (["{a} plus {b} is {c}.", "{a} + {b} = {c}.", "Adding {a} and {b} gives {c}.",
                      "{a} and {b} make {c}."] if op == "+" else
                     ["{a} minus {b} is {c}.", "{a} - {b} = {c}.", "Take {b} away from {a} and you get {c}."])
            out.append(rng.choice(forms).format(a=a, b=b, c=c))
        else:
            w = "加" if op == "+" else "减"
            forms = ["{A}" + w + "{B}等于{C}。", "{a}" + w + "{b}等于{c}。", "{a} " + op + " {b} = {c}。"]
            out.append(rng.choice(forms).format(a=a, b=b, c=c, A=zh_number(a), B=zh_number(b), C=zh_number(c)))
    return ("\n" if rng.random() < 0.3 else " " if lang == "en" else "").join(out)


def _doc_uppercase(rng: random.Random) -> str:
    out = []
    for _ in range(rng.randint(3, 6)):
        text = _random_key("uppercase", rng)[0]
        out.append(rng.choice(["In capital letters, {t} is written {T}.", "{T} is {t} in uppercase.",
                               "Written in big letters, {t} becomes {T}."]).format(t=text, T=text.upper()))
    return " ".join(out)


def _doc_reverse(rng: random.Random) -> str:
    out = []
    for _ in range(rng.randint(3, 5)):
        words = _random_key("reverse", rng)
        pattern = rng.choice(["The words {w} in reverse order are {r}.", "Read backwards, {w} becomes {r}.",
                              "Turn {w} around and you get {r}."])
        out.append(pattern.format(w=" ".join(words), r=" ".join(reversed(words))))
    return " ".join(out)


_DOC_MAKERS = [(lambda rng: _doc_entity(rng, "en"), 0.25), (lambda rng: _doc_entity(rng, "zh"), 0.15),
               (_doc_bilingual, 0.15), (_doc_arithmetic, 0.3), (_doc_uppercase, 0.075), (_doc_reverse, 0.075)]


def estimate_tokens(text: str) -> float:
    """Rough byte-BPE token count: ~3.5 ASCII characters or ~1 other (Chinese) character per token."""
    ascii_chars = len(text.encode("ascii", "ignore"))
    return ascii_chars / 3.5 + (len(text) - ascii_chars)


def _corpus(rng: random.Random, target_tokens: int) -> list[str]:
    makers, weights = [m for m, _ in _DOC_MAKERS], [w for _, w in _DOC_MAKERS]
    docs, tokens = [], 0.0
    while tokens < target_tokens:
        doc = re.sub(r"\b([Aa]) (?=[aeiou])", r"\1n ", rng.choices(makers, weights)[0](rng))  # a apple -> an apple
        docs.append(doc)
        tokens += estimate_tokens(doc)
    return docs


# ----------------------------------------------------------------------------------------------------------
# Writing the world


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    os.replace(tmp, path)


def _jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def _family_counts(tasks) -> dict[str, int]:
    return {f: sum(task.template.family == f for task, _, _ in tasks) for f in FAMILY_WEIGHTS}


def generate_world(out_dir, preset: str = "default", seed: int = 0, flaw_rates: dict | None = None) -> dict:
    """Write corpus.txt, sft.jsonl, rl_prompts.jsonl, eval_prompts.jsonl and manifest.json into out_dir.

    Deterministic: the same seed and preset give byte-identical files. flaw_rates overrides entries of
    DEFAULT_FLAW_RATES (impolite, verbose, wrong: independent probabilities per SFT demonstration).
    Returns the manifest (file names, sizes, counts).
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown world preset {preset!r} (expected one of {', '.join(PRESETS)})")
    rates = dict(DEFAULT_FLAW_RATES)
    for name, rate in (flaw_rates or {}).items():
        if name not in rates or not 0.0 <= float(rate) <= 1.0:
            raise ValueError(f"bad flaw rate {name}={rate!r} (expected {', '.join(rates)} in [0, 1])")
        rates[name] = float(rate)
    sizes = PRESETS[preset]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # Independent random streams per file, so changing one size does not reshuffle the others.
    corpus_docs = _corpus(random.Random(f"corpus-{seed}"), sizes.corpus_tokens_approx)
    corpus = "\n\n".join(corpus_docs) + "\n"

    rng = random.Random(f"sft-{seed}")
    sft_tasks = _sample_tasks("sft", sizes.n_sft, rng)
    sft, flawed = [], dict.fromkeys(["impolite", "verbose", "wrong", "any"], 0)
    for task, instruction, inp in sft_tasks:
        flags = {name: rng.random() < rates[name] for name in ("impolite", "verbose", "wrong")}
        answer = _wrong(task, rng) if flags["wrong"] else _ideal(task)
        sft.append({"Instruction": instruction, "Input": inp,
                    "Output": _with_flaws(task, answer, flags["impolite"], flags["verbose"], rng)})
        for name, on in flags.items():
            flawed[name] += on
        flawed["any"] += any(flags.values())
    rl_tasks = _sample_tasks("rl", sizes.n_rl_prompts, random.Random(f"rl-{seed}"))
    eval_tasks = _sample_tasks("eval", sizes.n_eval, random.Random(f"eval-{seed}"))

    files = {"corpus": "corpus.txt", "sft": "sft.jsonl", "rl_prompts": "rl_prompts.jsonl",
             "eval_prompts": "eval_prompts.jsonl"}
    _write_atomic(out / files["corpus"], corpus)
    _write_atomic(out / files["sft"], _jsonl(sft))
    for name, tasks in (("rl_prompts", rl_tasks), ("eval_prompts", eval_tasks)):
        _write_atomic(out / files[name], _jsonl([{"Instruction": i, "Input": x} for _, i, x in tasks]))

    manifest = {
        "format_version": WORLD_FORMAT_VERSION, "preset": preset, "seed": seed, "flaw_rates": rates,
        "sizes": asdict(sizes), "files": files,
        "counts": {
            "corpus_docs": len(corpus_docs), "corpus_chars": len(corpus),
            "corpus_tokens_est": int(estimate_tokens(corpus)),
            "sft": len(sft), "rl_prompts": len(rl_tasks), "eval_prompts": len(eval_tasks),
            "sft_flawed": flawed,
            "families": {"sft": _family_counts(sft_tasks), "rl_prompts": _family_counts(rl_tasks),
                         "eval_prompts": _family_counts(eval_tasks)},
        },
    }
    _write_atomic(out / "manifest.json", json.dumps(manifest, ensure_ascii=False, indent=2) + "\n")
    return manifest
