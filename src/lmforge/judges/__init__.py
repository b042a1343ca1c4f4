"""Judges: whatever ranks or scores candidate responses -- the labeller of `lmforge label` and the grader of
evaluation.

A judge implements `rank` (competition ranks, 1 = best), `score` (0..100), or both: the default `rank` ranks by
`score`, so a scoring judge ranks for free, while a judge that can only compare (a human, an LLM asked for a
ranking) raises a clear error from `score`. `compare` gives a pairwise verdict (by default from the scores).
Built-ins: `oracle` (the built-in world's programmatic scorer) and `openai` (an OpenAI-compatible LLM as
judge); people judge through a web page instead (lmforge.judges.human: `--judge human` in label and eval).
Plug in your own with one decorator:

    @register_judge("mine")
    class MyJudge(Judge):
        def score(self, prompt, response): return 100.0 * ("please" in response)

then select it with `judge.name=mine` (the module defining it must be imported first).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from lmforge.errors import ConfigError, LmforgeError


def ranks_from_scores(scores: list[float]) -> list[int]:
    """Competition ranks, higher score = better: [3, 9, 3, 1] -> [2, 1, 2, 4] (ties share the best rank)."""
    return [1 + sum(s > x for s in scores) for x in scores]


class Judge:
    """The judge interface. Subclasses override `rank`, `score` or both; `parts` and `score_many` are optional."""

    name: str = "judge"

    @classmethod
    def from_config(cls, cfg: JudgeConfig) -> Judge:
        """Build the judge from its config section; judges without settings take none."""
        return cls()

    def check(self, prompt: str) -> None:
        """Raise LmforgeError if this judge cannot judge responses to `prompt` (called on every prompt before
        any response is generated, so a wrong prompt file fails in seconds, not after sampling)."""

    def rank(self, prompt: str, responses: list[str], messages: list[dict] | None = None) -> list[int]:
        """Competition ranks of `responses` to `prompt` (1 = best, ties share the best rank: [2, 1, 2, 4]).
        `messages` is the whole conversation when the prompt is a later turn of one."""
        cls = type(self)
        if cls.score is Judge.score and cls.score_many is Judge.score_many:  # nothing to rank by: say so plainly
            raise LmforgeError(f"judge {self.name!r} implements neither rank() nor score()")
        return ranks_from_scores(self.score_many([prompt] * len(responses), responses))

    def score(self, prompt: str, response: str) -> float:
        """How good `response` is as an answer to `prompt`, from 0 (worst) to 100 (best)."""
        raise LmforgeError(f"judge {self.name!r} cannot score single responses; it only ranks")

    def parts(self, prompt: str, response: str) -> dict[str, float]:
        """Optional named sub-scores behind `score` (the oracle: correctness, politeness, concision)."""
        return {}

    def category(self, prompt: str) -> str | None:
        """Optional group of a prompt for per-group results (the oracle: its task family); None = no groups."""
        return None

    def score_many(self, prompts: list[str], responses: list[str]) -> list[float]:
        """`score` of each (prompt, response) pair; a remote judge overrides this to send requests in parallel."""
        return [self.score(p, r) for p, r in zip(prompts, responses, strict=True)]

    def compare(self, prompt: str, first: str, second: str) -> float | None:
        """Pairwise preference: 1.0 if `first` is the better answer to `prompt`, 0.0 if `second` is, 0.5 for a
        tie, None if the judge gave no usable verdict. Default: compare the two `score`s. A judge that compares
        natively (an LLM shown both answers) overrides this, and evaluation then asks it in both orders."""
        a, b = self.score_many([prompt, prompt], [first, second])
        return 1.0 if a > b else 0.0 if a < b else 0.5

    def compare_many(self, prompts: list[str], firsts: list[str], seconds: list[str]) -> list[float | None]:
        """`compare` of each triple; a remote judge overrides this to send requests in parallel."""
        return [self.compare(p, a, b) for p, a, b in zip(prompts, firsts, seconds, strict=True)]

    @property
    def compares_natively(self) -> bool:
        """True when this judge overrides `compare` (so its verdict may depend on the order it sees)."""
        return type(self).compare is not Judge.compare


@dataclass
class JudgeConfig:
    """Which judge to use and its settings (a `judge:` section of a config). url/model/key/workers/timeout are
    for LLM judges; the oracle ignores them."""

    name: str = "oracle"
    url: str = ""  # openai: base URL of an OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1
    model: str = ""  # openai: the model name the endpoint serves
    api_key_env: str = "OPENAI_API_KEY"  # environment variable holding the API key (unset: no key is sent)
    workers: int = 4  # concurrent requests
    timeout: float = 120.0  # seconds per request
    max_tokens: int = 512  # longest reply asked for (a verdict is short; a reasoning judge may need more)

    def validate(self) -> None:
        """Raise naming the key for a value no judge could use. An unknown name is left to `make_judge`, so a
        judge registered by user code after the config is read is still found."""
        if not self.name:
            raise ConfigError("name", "must name a judge (e.g. oracle, openai)")
        if self.name == "openai":
            for key in ("url", "model"):
                if not getattr(self, key):
                    raise ConfigError(key, "is required with judge name=openai")
        if self.workers < 1:
            raise ConfigError("workers", f"must be at least 1, got {self.workers}")
        if self.timeout <= 0:
            raise ConfigError("timeout", f"must be positive, got {self.timeout}")
        if self.max_tokens < 1:
            raise ConfigError("max_tokens", f"must be at least 1, got {self.max_tokens}")


JUDGES: dict[str, type[Judge]] = {}
# Built-in judges register when their module is imported; make_judge imports only the one asked for, so that
# `import lmforge.judges` stays cheap (no HTTP client, no world tables, never torch).
_BUILTIN = {"oracle": "lmforge.judges.oracle", "openai": "lmforge.judges.openai"}


def register_judge(name: str):
    """Class decorator: make a `Judge` subclass selectable as `judge.name=<name>`."""
    def add(cls: type[Judge]) -> type[Judge]:
        old = JUDGES.get(name)
        builtin = _BUILTIN.get(name)
        # A name maps to one class: silently shadowing a judge would mislabel a whole dataset. Re-registering
        # the same class (a re-imported module) is fine.
        same = old is not None and (old.__module__, old.__qualname__) == (cls.__module__, cls.__qualname__)
        if (old is not None and not same) or (builtin and cls.__module__ != builtin):
            raise LmforgeError(f"judge name {name!r} is already taken; register {cls.__qualname__} under another")
        cls.name = name
        JUDGES[name] = cls
        return cls
    return add


def make_judge(cfg: JudgeConfig) -> Judge:
    """The judge `cfg.name` built from `cfg` (importing a built-in judge's module on first use)."""
    cfg.validate()
    if cfg.name not in JUDGES and cfg.name in _BUILTIN:
        importlib.import_module(_BUILTIN[cfg.name])
    if cfg.name not in JUDGES:
        known = ", ".join(dict.fromkeys([*_BUILTIN, *JUDGES]))
        raise LmforgeError(f"config key 'judge.name': unknown judge {cfg.name!r} (judges: {known})")
    return JUDGES[cfg.name].from_config(cfg)
