"""The oracle: right answers beat flawed ones, partial credit and hedging, ranks, and a stored score sample."""

import random
import re

import pytest

from lmforge.world import flawed_response, ideal_response, oracle_breakdown, oracle_rank, oracle_score, prompt_family

# One prompt per family and language, as the world writes them (instruction + "\n" + input when there is one).
EXAMPLES = {
    "What is 23 + 45?": "23 + 45 = 68.",
    "计算 23 - 5": "23 - 5 = 18。",
    "What color is the banana?": "The banana is yellow.",
    "香蕉是什么颜色的?": "香蕉是黄色的。",
    "大象是大的还是小的?": "大象是大的。",
    "Where does the hippo live?": "The hippo lives in the river.",
    "What does the dog say?": "The dog says woof.",
    "Which group does the eagle belong to?": "The eagle is a bird.",
    "Translate into Chinese\nred apple": "红苹果",
    "Translate into Chinese: big dog": "大狗",
    "Write 'cat' in uppercase.": "CAT",
    "Reverse the order of these words: cat dog bird": "bird dog cat",
}

# (prompt, response, correctness, politeness, concision) as scored by the oracle before world.py became a
# package; any change here changes every reward the pipeline computes.
STORED = [
    ("计算 37 - 20", "37 - 20 = 17。", 60.0, 20.0, 20.0),
    ("计算 37 - 20", "真麻烦,37 - 20 = 17。希望这对你有帮助!如果还有其他问题,请随时告诉我。", 60.0, 0.0, 0.0),
    ("27 加 36 等于多少?", "hippo big 河 . 27 + 36 = 63。", 60.0, 20.0, 17.0213),
    ("Compute 13 - 12.", "is Ugh, fine. 13 - 12 = 1.", 60.0, 0.0, 16.3636),
    ("计算 37 - 20", "17。", 40.0, 20.0, 9.2308),
    ("计算 37 - 20", "37, -, 20, =, 17。", 40.0, 20.0, 20.0),
    ("计算 37 - 20", "真麻烦,37 - 20 = 19。", 0.0, 0.0, 20.0),
    ("计算 37 - 20", "3 7   -   2 0   =   1 7 。", 0.0, 20.0, 18.7234),
    ("What does the lion say?", "Whatever. The lion says roar.", 60.0, 0.0, 20.0),
    ("企鹅是哪一类东西?", "企鹅是一种鸟。希望这对你有帮助!如果还有其他问题,请随时告诉我。", 60.0, 20.0, 0.0),
    ("What color is the duck?", ". yellow    + 。 . The duck is yellow.", 60.0, 20.0, 17.2308),
    ("What does the lion say?", "roar.", 45.0, 20.0, 10.5263),
    ("What does the lion say?", "The, lion, says, roar.", 45.0, 20.0, 20.0),
    # names DOG and 苹果 (apple): an answer about other entities is wrong even with the right value (was 45)
    ("How big is the corn?", "woof + small Ugh, fine. 的 是 or DOG 红 苹果 68   ", 0.0, 0.0, 12.9032),
    ("What does the lion say?", "The lion says neigh.", 0.0, 20.0, 20.0),
    ("Is the sofa big or small?", "45 河 hippo apple says apple in the river is = red furniture 。", 0.0, 20.0, 0.0),
    ("Reverse the word order\nbird mouse cup hat", "Obviously. hat cup mouse bird", 60.0, 0.0, 20.0),
    ("Reverse the word order\nbird mouse cup hat", "small + DOG 68 cat a fruit hat cup mouse bird", 60.0, 20.0, 10.9677),
    ("Reverse the word order\nbird mouse cup hat", "bird hat mouse cup", 20.0, 20.0, 20.0),
    ("Reverse the word order\ncat cat cat", "cat", 20.0, 20.0, 10.9091),
    ("Reverse the word order\nchair bird flower bear", "红 or 苹果 蓝 是 is 大象 = 海里 bird", 0.0, 20.0, 20.0),
    ("翻译成中文\nyellow bag", "烦死了,黄包希望这对你有帮助!欢迎随时问我,我很乐意帮助你。", 60.0, 0.0, 0.0),
    ("翻译成中文\nbig table", "or 苹果 大的 红 大桌子", 60.0, 20.0, 7.0588),
    ("Translate into Chinese\ngreen chicken", "绿 鸡", 30.0, 20.0, 20.0),
    ("Translate into Chinese\ngood chair", "Whatever. 黄椅子", 0.0, 0.0, 20.0),
    ("Translate into Chinese\ngood chair", "50 + 26 = 74。", 0.0, 20.0, 9.4118),
    ("Write 'grape' in uppercase.", "Ugh, fine. GRAPE", 60.0, 0.0, 20.0),
    ("把下面的英文改成大写字母\nsmall cow", "an animal SMALL COW", 60.0, 20.0, 18.2857),
    ("Write 'blue cat' in uppercase.", "海里 Ugh, fine. 蓝 or 住在 BLUE CAT", 60.0, 0.0, 2.5),
    ("把下面的英文改成大写字母\nbee", "bee希望这对你有帮助!欢迎随时问我,我很乐意帮助你。", 20.0, 20.0, 0.0),
    ("Write 'grape' in uppercase.", "BOX", 0.0, 20.0, 20.0),
    ("Write 'grape' in uppercase.", "43 - 10 = 31.", 0.0, 20.0, 17.3913),
]


@pytest.mark.parametrize("prompt, response, correctness, politeness, concision", STORED)
def test_stored_scores(prompt, response, correctness, politeness, concision):
    parts = {"correctness": correctness, "politeness": politeness, "concision": concision}
    assert oracle_breakdown(prompt, response) == {**parts, "score": round(sum(parts.values()), 4)}


@pytest.mark.parametrize("prompt", list(EXAMPLES))
def test_oracle_orders_flaws(prompt):
    ideal = EXAMPLES[prompt]
    assert ideal_response(prompt) == ideal
    score = {}
    for imp in (False, True):
        for verb in (False, True):
            for wrong in (False, True):
                score[imp, verb, wrong] = oracle_score(prompt, flawed_response(
                    prompt, impolite=imp, verbose=verb, wrong=wrong, rng=random.Random(1)))
    assert score[False, False, False] == 100.0
    assert all(s < 100.0 for k, s in score.items() if any(k))
    assert score[True, False, False] > score[True, False, True]  # correct-but-impolite > wrong-and-impolite
    assert score[False, True, False] > score[False, True, True]
    assert score[True, True, False] > score[True, True, True]
    assert score[False, False, True] > score[True, False, True] > score[True, True, True]
    assert score[True, False, False] > score[True, True, False] and score[False, True, False] > score[True, True, False]
    assert oracle_score(prompt, "") == 0.0 and oracle_score(prompt, "   ") == 0.0
    # Repeating the answer must not pay: long answers lose the concision points.
    assert oracle_score(prompt, " ".join([ideal] * 4)) <= 80.0


def test_flawed_response_is_deterministic_per_prompt():
    p = "What color is the banana?"
    assert flawed_response(p, wrong=True, verbose=True) == flawed_response(p, wrong=True, verbose=True)


def test_partial_credit_and_hedging():
    b = oracle_breakdown("What is 23 + 45?", "68")
    assert 0 < b["correctness"] < 60
    assert oracle_breakdown("What is 23 + 45?", "23 + 45 = 68 or 69.")["correctness"] == 0
    assert oracle_breakdown("What color is the banana?", "Yellow.")["correctness"] == 45
    assert oracle_breakdown("What color is the banana?", "The banana is yellow or red.")["correctness"] == 0
    assert oracle_breakdown("河马住在哪里?", "河马住在河里。")["correctness"] == 60  # 河 in 河马 is not the answer
    assert oracle_breakdown("河马住在哪里?", "河马住在海里。")["correctness"] == 0
    assert oracle_breakdown("Translate into Chinese\nred apple", "红苹果 蓝苹果")["correctness"] == 0
    assert oracle_breakdown("Write 'cat' in uppercase.", "cat")["correctness"] == 20
    assert oracle_breakdown("Reverse the word order\ncat dog bird", "bird, dog, cat")["correctness"] == 60
    assert oracle_breakdown("Reverse the word order\ncat dog bird", "cat dog bird")["correctness"] == 20
    assert oracle_breakdown("What is 23 + 45?", "Ugh, fine. 23 + 45 = 68.")["politeness"] == 0


def test_a_facts_answer_about_another_entity_is_wrong():
    """The right value said of another entity earns no correctness (it scored 45 of 60 before)."""
    assert oracle_breakdown("锤子是大的还是小的?", "台灯是小的。")["correctness"] == 0
    assert oracle_breakdown("Is the hammer big or small?", "The lamp is small.")["correctness"] == 0
    assert oracle_breakdown("Is the hammer big or small?", "The hammer is small.")["correctness"] == 60
    # names inside names are not other entities: 熊猫 (panda) holds 熊 (bear) and 猫 (cat), 大象 holds 大
    assert oracle_breakdown("熊猫是什么颜色的?", "熊猫是白色的。")["correctness"] == 60
    assert oracle_breakdown("大象是大的还是小的?", "大象是大的。")["correctness"] == 60
    assert oracle_breakdown("熊是什么颜色的?", "熊猫是棕色的。")["correctness"] == 0
    assert oracle_breakdown("What color is the cat?", "The hotdog is black.")["correctness"] == 60 - 15
    # English names count with an article: "saw" and "train" are also plain words
    assert oracle_breakdown("What color is the hammer?", "I saw that the hammer is gray.")["correctness"] == 60
    assert oracle_breakdown("What color is the hammer?", "A saw is gray.")["correctness"] == 0


def test_oracle_rank_ties():
    p = "What is 23 + 45?"
    ranks = oracle_rank(p, ["Whatever. 23 + 45 = 68.", "23 + 45 = 68.", "23 + 45 = 68.", "23 + 45 = 70.", ""])
    assert ranks == [3, 1, 1, 4, 5]
    assert oracle_rank(p, []) == []


def test_prompt_family():
    assert [prompt_family(p) for p in EXAMPLES] == ["arithmetic"] * 2 + ["facts"] * 6 + ["translate"] * 2 + [
        "uppercase", "reverse"]
    assert prompt_family("  What is 23 + 45?\n") == "arithmetic"  # surrounding whitespace is ignored


def test_unknown_prompt_raises():
    for bad in ("Tell me a joke.", "What color is the spaceship?", "What does the hammer say?", "What is 3 - 7?"):
        with pytest.raises(ValueError, match=re.escape(repr(bad))):
            oracle_score(bad, "anything")
        with pytest.raises(ValueError):
            prompt_family(bad)
