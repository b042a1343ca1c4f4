"""The judge interface and registry: plugging in a judge, the defaults, and config errors."""

import importlib
import subprocess
import sys

import pytest

from lmforge import judges
from lmforge.errors import LmforgeError
from lmforge.judges import Judge, JudgeConfig, make_judge, ranks_from_scores, register_judge


@pytest.fixture(autouse=True)
def clean_registry(monkeypatch):
    """Each test registers its toy judges into a copy of the registry, so no test sees another's. The built-in
    judges register on first import, so import them before copying or the first test would keep them."""
    for module in ("lmforge.judges.oracle", "lmforge.judges.openai"):
        importlib.import_module(module)
    monkeypatch.setattr(judges, "JUDGES", dict(judges.JUDGES))


def test_ranks_from_scores_competition_ranking():
    assert ranks_from_scores([3, 9, 3, 1]) == [2, 1, 2, 4]
    assert ranks_from_scores([5, 5]) == [1, 1]
    assert ranks_from_scores([0.5]) == [1] and ranks_from_scores([]) == []


def test_a_judge_registered_with_the_decorator_alone_is_found():
    @register_judge("by-length")
    class ByLength(Judge):
        def __init__(self, cap: int = 100):
            self.cap = cap

        @classmethod
        def from_config(cls, cfg):
            return cls(cap=cfg.workers)

        def score(self, prompt, response):
            return min(self.cap, len(response))

    judge = make_judge(JudgeConfig(name="by-length", workers=3))
    assert isinstance(judge, ByLength) and judge.name == "by-length" and judge.cap == 3
    # the default rank: competition ranks of the scores, ties sharing the best rank
    assert judge.rank("q", ["ab", "abcdef", "ba", "a"]) == [2, 1, 2, 4]
    assert judge.rank("q", ["abcdef", "abcd"]) == [1, 1]  # both capped at 3
    assert judge.score_many(["q", "q"], ["a", "abc"]) == [1, 3]
    assert judge.parts("q", "a") == {}
    assert "by-length" in judges.JUDGES and "by-length" in str(pytest.raises(
        LmforgeError, make_judge, JudgeConfig(name="nope")).value)


def test_a_judge_without_from_config_takes_no_settings():
    @register_judge("const")
    class Const(Judge):
        def score(self, prompt, response):
            return 50.0

    assert make_judge(JudgeConfig(name="const")).rank("q", ["a", "b", "c"]) == [1, 1, 1]


def test_a_ranking_only_judge_refuses_to_score():
    @register_judge("ranker")
    class Ranker(Judge):
        def rank(self, prompt, responses, messages=None):
            return ranks_from_scores([-len(r) for r in responses])

    judge = make_judge(JudgeConfig(name="ranker"))
    assert judge.rank("q", ["aaa", "a", "aa"]) == [3, 1, 2]
    with pytest.raises(LmforgeError, match=r"^judge 'ranker' cannot score single responses; it only ranks$"):
        judge.score("q", "a")


def test_a_judge_implementing_neither_says_so():
    @register_judge("empty")
    class Empty(Judge):
        pass

    with pytest.raises(LmforgeError, match="implements neither rank"):
        make_judge(JudgeConfig(name="empty")).rank("q", ["a", "b"])


def test_unknown_judge_lists_the_judges():
    with pytest.raises(LmforgeError) as e:
        make_judge(JudgeConfig(name="gpt-judge"))
    assert str(e.value).startswith("config key 'judge.name': unknown judge 'gpt-judge' (judges: oracle, openai")
    assert "human" not in str(e.value)


def test_built_in_judges_are_made_by_name():
    oracle = make_judge(JudgeConfig())
    assert type(oracle).__name__ == "OracleJudge" and oracle.name == "oracle"
    oa = make_judge(JudgeConfig(name="openai", url="http://127.0.0.1:1/v1/", model="m", workers=2, timeout=5))
    assert oa.name == "openai" and oa.url == "http://127.0.0.1:1/v1/chat/completions"
    assert (oa.model, oa.workers, oa.timeout) == ("m", 2, 5)


def test_api_key_comes_from_the_named_environment_variable(monkeypatch):
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-x")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    cfg = JudgeConfig(name="openai", url="http://h/v1", model="m")
    assert make_judge(cfg).api_key is None
    assert make_judge(JudgeConfig(name="openai", url="http://h/v1", model="m", api_key_env="MY_JUDGE_KEY")).api_key == "sk-x"


def test_a_taken_name_cannot_be_registered_again():
    class Impostor(Judge):
        pass

    with pytest.raises(LmforgeError, match="judge name 'oracle' is already taken"):
        register_judge("oracle")(Impostor)

    @register_judge("mine")
    class Mine(Judge):
        pass

    with pytest.raises(LmforgeError, match="judge name 'mine' is already taken"):
        register_judge("mine")(Impostor)


@pytest.mark.parametrize("kw, message", [
    ({"name": "openai", "model": "m"}, "config key 'url' is required with judge name=openai"),
    ({"name": "openai", "url": "http://h/v1"}, "config key 'model' is required with judge name=openai"),
    ({"workers": 0}, "config key 'workers' must be at least 1, got 0"),
    ({"timeout": 0.0}, "config key 'timeout' must be positive"),
    ({"name": ""}, "config key 'name' must name a judge"),
])
def test_config_errors_name_the_key_relative_to_the_section(kw, message):
    with pytest.raises(LmforgeError, match="^" + message):
        JudgeConfig(**kw).validate()
    with pytest.raises(LmforgeError, match="^" + message):
        make_judge(JudgeConfig(**kw))


def test_config_loader_builds_and_validates_a_judge_section():
    from lmforge.config import load_config

    cfg = load_config(JudgeConfig, overrides=["name=openai", "url=http://h/v1", "model=m", "workers=8"])
    assert cfg == JudgeConfig(name="openai", url="http://h/v1", model="m", workers=8)
    with pytest.raises(LmforgeError, match="'url' is required with judge name=openai"):
        load_config(JudgeConfig, overrides=["name=openai", "model=m"])


def test_importing_the_registry_is_cheap():
    """`import lmforge.judges` must not pull in torch, the world tables or an HTTP client."""
    code = ("import sys, lmforge.judges; "
            "print(sorted(m for m in ('torch', 'lmforge.world', 'urllib.request', 'lmforge.judges.oracle', "
            "'lmforge.judges.openai') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
