"""The world's fixed fact tables: entities, their attributes, and the words the tasks ask about.

Fixed and seed-independent on purpose: the oracle re-derives every right answer from these tables and the
prompt text alone, so changing a table changes what the world considers true.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    """A thing of the world with its English and Chinese names; None = the attribute does not apply."""

    en: str
    zh: str
    kind: str
    color: str
    size: str
    habitat: str | None
    sound: str | None

    def attrs(self) -> list[str]:
        """The attributes this entity has, in ATTRS order (a hammer has no sound, an apple no habitat)."""
        return [a for a in ATTRS if getattr(self, a) is not None]


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

# ----------------------------------------------------------------------------------------------------------
# Saying a fact: shared by the facts task (its answers) and the corpus (so pretraining sees the same sentences)

_FACT_ANSWERS = {"color": ("The {e} is {v}.", "{e}是{v}的。"), "size": ("The {e} is {v}.", "{e}是{v}的。"),
                 "kind": ("The {e} is {v}.", "{e}是一种{v}。"), "habitat": ("The {e} lives {v}.", "{e}住在{v}。"),
                 "sound": ("The {e} says {v}.", "{e}{v}叫。")}


def value_phrase(attr: str, v: str, lang: str) -> str:
    """How value v of attr reads inside a sentence: 'in the river' / 河里, 'an animal' / 动物, 'red' / 红色."""
    if attr == "habitat":
        return HABITATS[v][0 if lang == "en" else 1]
    if lang == "zh":
        return ATTR_VALUES[attr][v]
    if attr != "kind" or v == "furniture":
        return v
    return ("an " if v[0] in "aeiou" else "a ") + v


def fact_sentence(e: Entity, attr: str, v: str, lang: str) -> str:
    """The canonical sentence stating that e's attr is v: 'The banana is yellow.' / 香蕉是黄色的。"""
    en, zh = _FACT_ANSWERS[attr]
    return (en if lang == "en" else zh).format(e=e.en if lang == "en" else e.zh, v=value_phrase(attr, v, lang))


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
