"""Generating the world: byte-identical files per seed, disjoint splits, flaw shares, config errors."""

import hashlib
import json
import re
import time

import pytest

from lmforge import world
from lmforge.errors import LmforgeError
from lmforge.world import (DEFAULT_FLAW_RATES, format_prompt, generate_world, ideal_response, oracle_breakdown,
                           oracle_score, prompt_family)

FILES = ("corpus.txt", "sft.jsonl", "rl_prompts.jsonl", "eval_prompts.jsonl", "manifest.json")

# sha256 of every file as written by lmforge.world before it became a package (results in the README were
# produced from these files). A change here means the world changed: bump WORLD_FORMAT_VERSION and rerun.
STORED_SHA256 = {
    ("tiny", 0): {
        "corpus.txt": "0b44413b5e1daa07170529b49986662ca01f56791f902e1321e2c721b6262bad",
        "sft.jsonl": "265dd59db097e5d2e26b9ca391f0765c3770cc365ed70f33566429ea728d1937",
        "rl_prompts.jsonl": "3283c5d6f0ed7e58cfbb949b4a4133024111e0a56005bbb3fe67c4d4a8cb65e0",
        "eval_prompts.jsonl": "be03f2804a97518bb30f861b45884485d5b3b3469dad5fcc79ca787cabe2465e",
        "manifest.json": "3fcbd2c13035462007a311425ae21b8960aab607902d599c257afc4c691372d1",
    },
    ("default", 0): {
        "corpus.txt": "44b07949e760bcb399648577eafe69eff8daaaf8449d73a981071764f135c9db",
        "sft.jsonl": "2b1c6ce062a8c813f10c7b86e4342ce115c983cc1a480b18364e8fd77e9c8e2c",
        "rl_prompts.jsonl": "7e45492da4bc6bb2ef6225ceb9f55ca0dd72e709433b4d9f7f4f5599296e981c",
        "eval_prompts.jsonl": "3f8cad94215122d6202fb2f46c01be1c547d99fb8cef0c45a2bdfcf0b216d6e4",
        "manifest.json": "47a2fafd2d684af795d92d89d59a70a35d65ebf67ab6d001da11c7463ea3633e",
    },
}


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _prompts(path):
    return [format_prompt(r["Instruction"], r["Input"]) for r in _read_jsonl(path)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    return out, generate_world(out, "tiny", seed=0)


@pytest.fixture(scope="module")
def default(tmp_path_factory):
    out = tmp_path_factory.mktemp("world-default")
    t0 = time.perf_counter()
    manifest = generate_world(out, "default", seed=0)
    return out, manifest, time.perf_counter() - t0


def _sha256s(out):
    return {name: hashlib.sha256((out / name).read_bytes()).hexdigest() for name in FILES}


def test_stored_hashes_tiny(tiny):
    assert _sha256s(tiny[0]) == STORED_SHA256["tiny", 0]


def test_stored_hashes_default(default):
    assert _sha256s(default[0]) == STORED_SHA256["default", 0]


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
    families = [prompt_family(format_prompt(r["Instruction"], r["Input"])) for r in sft]
    assert len(set(families)) >= 4
    assert manifest["counts"]["families"]["sft"] == {f: families.count(f) for f in manifest["counts"]["families"]["sft"]}


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


@pytest.mark.parametrize("kwargs, message", [
    ({"preset": "huge"}, "config key 'world.preset': unknown world preset 'huge' (expected one of tiny, default)"),
    ({"flaw_rates": {"rude": 0.5}}, "config key 'world.flaw_rates.rude': unknown flaw 'rude'"),
    ({"flaw_rates": {"wrong": 1.5}}, "config key 'world.flaw_rates.wrong': flaw rate 1.5 is not a probability"),
    ({"flaw_rates": {"verbose": "often"}}, "config key 'world.flaw_rates.verbose': flaw rate 'often' is not"),
    ({"flaw_rates": {"impolite": float("nan")}}, "config key 'world.flaw_rates.impolite': flaw rate nan"),
])
def test_config_errors(tmp_path, kwargs, message):
    with pytest.raises(LmforgeError, match="^" + re.escape(message)):
        generate_world(tmp_path / "w", **{"preset": "tiny", **kwargs})
    assert not (tmp_path / "w").exists()  # checked before anything is written


def test_default_preset_size_and_speed(default):
    out, manifest, seconds = default
    assert seconds < 10.0
    corpus = (out / "corpus.txt").read_text(encoding="utf-8")
    chinese = len(re.findall(r"[\u4e00-\u9fff]", corpus))
    english = len(corpus.encode("ascii", "ignore"))
    assert english / 4 + chinese >= 1.0e6
    sizes = world.PRESETS["default"]
    assert manifest["counts"]["sft"] == sizes.n_sft and manifest["counts"]["eval_prompts"] == sizes.n_eval
    for fact in ("The banana is yellow.", "香蕉是黄色的。", "The dog says woof.", "大象是大的。", "RED APPLE"):
        assert fact in corpus, fact
