"""The built-in world: deterministic generation, disjoint splits, and an oracle that ranks flaws correctly."""

import json
import random
import re
import time

import pytest

from lmforge import world
from lmforge.world import (DEFAULT_FLAW_RATES, flawed_response, format_prompt, generate_world, ideal_response,
                           oracle_breakdown, oracle_rank, oracle_score, prompt_family)

FILES = ("corpus.txt", "sft.jsonl", "rl_prompts.jsonl", "eval_prompts.jsonl", "manifest.json")

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


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _prompts(path):
    return [format_prompt(r["Instruction"], r["Input"]) for r in _read_jsonl(path)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    return out, generate_world(out, "tiny", seed=0)


def test_deterministic_per_seed(tiny, tmp_path):
    out, manifest = tiny
    again = generate_world(tmp_path / "a", "tiny", seed=0)
    assert again == manifest
    for name in FILES:
        assert (tmp_path / "a" / name).read_bytes() == (out / name).read_bytes(), name
    generate_world(tmp_path / "b", "tiny", seed=1)
    for name in FILES:
        assert (tmp_path / "b" / name).read_bytes() != (out / name).read_bytes(), name
    assert not list(tmp_path.glob("*/.*.tmp"))  # atomic writes leave no temp files


def test_files_counts_and_keys(tiny):
    out, manifest = tiny
    sizes = world.PRESETS["tiny"]
    assert json.loads((out / "manifest.json").read_text(encoding="utf-8")) == manifest
    assert manifest["format_version"] == world.WORLD_FORMAT_VERSION
    sft = _read_jsonl(out / "sft.jsonl")
    assert len(sft) == sizes.n_sft and all(list(r) == ["Instruction", "Input", "Output"] for r in sft)
    for name, n in (("rl_prompts.jsonl", sizes.n_rl_prompts), ("eval_prompts.jsonl", sizes.n_eval)):
        recs = _read_jsonl(out / name)
        assert len(recs) == n and all(list(r) == ["Instruction", "Input"] for r in recs)
    assert any(r["Input"] for r in sft) and any(not r["Input"] for r in sft)
    families = {prompt_family(format_prompt(r["Instruction"], r["Input"])) for r in sft}
    assert len(families) >= 4


def test_splits_are_disjoint(tiny):
    out, _ = tiny
    sft, rl, ev = (set(_prompts(out / n)) for n in ("sft.jsonl", "rl_prompts.jsonl", "eval_prompts.jsonl"))
    assert not sft & rl and not sft & ev and not rl & ev
    assert len(ev) == world.PRESETS["tiny"].n_eval  # no repeats where the pool is large enough


def test_every_prompt_scoreable_and_ideal_is_100(tiny):
    out, _ = tiny
    for name in ("sft.jsonl", "rl_prompts.jsonl", "eval_prompts.jsonl"):
        for p in _prompts(out / name):
            assert oracle_score(p, ideal_response(p)) == 100.0, p
    # A flawless demonstration is exactly the ideal answer.
    for r in _read_jsonl(out / "sft.jsonl"):
        p = format_prompt(r["Instruction"], r["Input"])
        if oracle_score(p, r["Output"]) == 100.0:
            assert r["Output"] == ideal_response(p)


def test_corpus_states_facts_without_instruction_format(tiny):
    corpus = (tiny[0] / "corpus.txt").read_text(encoding="utf-8")
    assert "\n\n" in corpus and re.search(r"[\u4e00-\u9fff]", corpus)
    for marker in ("Translate into", "What color is", "Write '", "Reverse the", "计算", "翻译成中文", "?"):
        assert marker not in corpus, marker
    assert re.search(r"\d+ \+ \d+ = \d+", corpus) and "The Chinese for" in corpus and "等于" in corpus


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


def test_oracle_rank_ties():
    p = "What is 23 + 45?"
    ranks = oracle_rank(p, ["Whatever. 23 + 45 = 68.", "23 + 45 = 68.", "23 + 45 = 68.", "23 + 45 = 70.", ""])
    assert ranks == [3, 1, 1, 4, 5]
    assert oracle_rank(p, []) == []


def test_flaw_shares_match_rates(tiny):
    out, manifest = tiny
    recs = _read_jsonl(out / "sft.jsonl")
    parts = [oracle_breakdown(format_prompt(r["Instruction"], r["Input"]), r["Output"]) for r in recs]
    shares = {"impolite": sum(b["politeness"] == 0 for b in parts) / len(parts),
              "verbose": sum(b["concision"] == 0 for b in parts) / len(parts),
              "wrong": sum(b["correctness"] < 60 for b in parts) / len(parts)}
    for name, share in shares.items():
        assert abs(share - DEFAULT_FLAW_RATES[name]) < 0.07, (name, share)
        assert manifest["counts"]["sft_flawed"][name] == round(share * len(parts))


def test_custom_flaw_rates(tmp_path):
    generate_world(tmp_path, "tiny", seed=3, flaw_rates={"impolite": 0, "verbose": 0, "wrong": 0})
    for r in _read_jsonl(tmp_path / "sft.jsonl"):
        assert oracle_score(format_prompt(r["Instruction"], r["Input"]), r["Output"]) == 100.0
    with pytest.raises(ValueError):
        generate_world(tmp_path, "tiny", flaw_rates={"rude": 0.5})
    with pytest.raises(ValueError):
        generate_world(tmp_path, "tiny", flaw_rates={"wrong": 1.5})
    with pytest.raises(ValueError):
        generate_world(tmp_path, "huge")


def test_unknown_prompt_raises():
    for bad in ("Tell me a joke.", "What color is the spaceship?", "What does the hammer say?", "What is 3 - 7?"):
        with pytest.raises(ValueError, match=re.escape(repr(bad))):
            oracle_score(bad, "anything")


def test_default_preset_size_and_speed(tmp_path):
    t0 = time.perf_counter()
    manifest = generate_world(tmp_path, "default", seed=0)
    assert time.perf_counter() - t0 < 10.0
    corpus = (tmp_path / "corpus.txt").read_text(encoding="utf-8")
    chinese = len(re.findall(r"[\u4e00-\u9fff]", corpus))
    english = len(corpus.encode("ascii", "ignore"))
    assert english / 4 + chinese >= 1.0e6
    sizes = world.PRESETS["default"]
    assert manifest["counts"]["sft"] == sizes.n_sft and manifest["counts"]["eval_prompts"] == sizes.n_eval
    for fact in ("The banana is yellow.", "香蕉是黄色的。", "The dog says woof.", "大象是大的。", "RED APPLE"):
        assert fact in corpus, fact
