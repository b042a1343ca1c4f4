"""An LLM as judge: any OpenAI-compatible `/chat/completions` endpoint (vLLM, llama.cpp, Ollama, OpenAI, ...).

Ranking candidates with an LLM instead of people is AI feedback, RLAIF (Bai et al. 2022 "Constitutional AI";
Lee et al. 2023 "RLAIF"). The judge is asked for a whole best-first ranking at once, and for single-answer
grading on a 1..10 scale as in MT-Bench (Zheng et al. 2023 "Judging LLM-as-a-judge"). Requests are greedy
(temperature 0); a malformed reply or a failed request is retried once. Standard library only.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from lmforge.errors import LmforgeError
from lmforge.judges import Judge, JudgeConfig, ranks_from_scores, register_judge

T = TypeVar("T")

JUDGE_SYSTEM = ("You are a strict, impartial judge of assistant responses. You compare candidate responses to "
                "the same user request and rank them from best to worst by correctness, helpfulness and "
                "concision.")
SCORE_SYSTEM = ("You are a strict, impartial judge of assistant responses. You rate a response to a user request "
                "by correctness, helpfulness and concision.")


def _without_thinking(reply: str | None) -> str:
    # Reasoning models think aloud before answering; numbers inside <think> are not the answer.
    return re.sub(r"<think>.*?</think>", "", reply or "", flags=re.DOTALL)


def judge_prompt(prompt: str, candidates: list[str], messages: list[dict] | None = None) -> str:
    """The user message sent to an LLM judge: the request (with earlier turns if any), numbered candidates,
    and an exact answer format (a JSON list of candidate numbers, best first)."""
    parts = []
    if messages and len(messages) > 1:
        parts.append("Conversation so far:")
        parts += [f"[{m['role']}] {m['content']}" for m in messages]
    else:
        parts.append(f"User request:\n{prompt}")
    parts.append("")
    for i, c in enumerate(candidates, 1):
        parts.append(f"Candidate {i}:\n{c}\n")
    n = len(candidates)
    parts.append(f"Rank all {n} candidates from best to worst. Reply with only a JSON list of the candidate "
                 f"numbers 1..{n}, best first, each exactly once, e.g. {json.dumps(list(range(n, 0, -1)))}.")
    return "\n".join(parts)


def parse_ranking(reply: str, n: int) -> list[int] | None:
    """The best-first candidate numbers (1-based) in a judge's reply, or None unless it is a permutation of 1..n.

    Takes the last bracketed list in the reply (reasoning models think before answering) and ignores
    <think>...</think> sections.
    """
    reply = _without_thinking(reply)
    for match in reversed(re.findall(r"\[[^\[\]]*\]", reply)):
        try:
            order = json.loads(match)
        except json.JSONDecodeError:
            continue
        if not isinstance(order, list):
            continue
        order = [int(x) if isinstance(x, str) and x.strip().isdigit() else x for x in order]
        if not all(type(x) is int for x in order):
            continue
        return order if sorted(order) == list(range(1, n + 1)) else None
    return None


def score_prompt(prompt: str, response: str) -> str:
    """The user message asking an LLM judge to rate one response from 1 to 10, replying with a single integer."""
    return (f"User request:\n{prompt}\n\nResponse:\n{response}\n\n"
            "Rate the response from 1 (worst) to 10 (best). Reply with only a single integer from 1 to 10.")


def parse_score(reply: str) -> int | None:
    """The 1..10 rating in a judge's reply: its last integer, ignoring <think>...</think>; None if there is none,
    it is out of range, or the last number is not an integer (7.5)."""
    reply = _without_thinking(reply)
    reply = re.sub(r"\s*(?:/|out of)\s*10\b", "", reply)  # "8/10", "8 out of 10": that 10 is the scale
    numbers = re.findall(r"\d+(?:\.\d+)?", reply)
    if not numbers or "." in numbers[-1]:
        return None
    s = int(numbers[-1])
    return s if 1 <= s <= 10 else None


COMPARE_SYSTEM = ("You are a strict, impartial judge of assistant responses. You compare two responses to the same "
                  "user request by correctness, helpfulness and concision; their order must not sway you.")


def compare_prompt(prompt: str, first: str, second: str) -> str:
    """The user message asking an LLM judge which of two responses is better (AlpacaEval-style pairwise)."""
    return (f"User request:\n{prompt}\n\nResponse A:\n{first}\n\nResponse B:\n{second}\n\n"
            "Which response is better? Reply with only one word: A, B, or tie.")


def parse_preference(reply: str) -> float | None:
    """1.0 for A, 0.0 for B, 0.5 for a tie: the last standalone A / B / tie in the reply (ignoring
    <think>...</think>); None if there is none."""
    found = re.findall(r"(?<![\w])(A|B|[Tt][Ii][Ee])(?![\w])", _without_thinking(reply))
    if not found:
        return None
    return {"A": 1.0, "B": 0.0}.get(found[-1], 0.5)


@register_judge("openai")
class OpenAIJudge(Judge):
    """Ranks and scores responses by asking an OpenAI-compatible `/chat/completions` endpoint."""

    def __init__(self, url: str, model: str, api_key: str | None = None, timeout: float = 120.0, workers: int = 4,
                 max_tokens: int = 512):
        url = url.rstrip("/")
        self.url = url if url.endswith("/chat/completions") else url + "/chat/completions"
        self.model, self.api_key, self.timeout, self.workers = model, api_key, timeout, workers
        self.max_tokens = max_tokens

    @classmethod
    def from_config(cls, cfg: JudgeConfig) -> OpenAIJudge:
        """The judge at `cfg.url` serving `cfg.model`, with the key from the environment variable `cfg.api_key_env`."""
        import os

        return cls(cfg.url, cfg.model, os.environ.get(cfg.api_key_env) or None, cfg.timeout, cfg.workers,
                   cfg.max_tokens)

    def _complete(self, messages: list[dict]) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "temperature": 0,
                           "max_tokens": self.max_tokens}).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:
            data = json.loads(resp.read().decode("utf-8"))
        return data["choices"][0]["message"]["content"]

    def _ask(self, prompt: str, chat: list[dict], parse: Callable[[str], T | None], what: str, fix: str,
             unparseable_ok: bool = False) -> T | None:
        """Send `chat` and parse the reply. One retry on a failed request, or on a malformed reply (telling the
        judge what was wrong: `fix`); then an LmforgeError naming the prompt, or None for two malformed replies
        when `unparseable_ok` (a vote that does not count, rather than a stopped evaluation)."""
        problem, malformed = "", 0
        for _ in range(2):
            try:
                reply = self._complete(chat)
            except urllib.error.HTTPError as e:
                detail = " ".join(e.read().decode("utf-8", "replace").split())[:120]
                problem = f"HTTP {e.code} from {self.url}" + (f": {detail}" if detail else "")
                continue
            except (urllib.error.URLError, OSError) as e:
                problem = f"cannot reach {self.url} ({getattr(e, 'reason', e)})"
                continue
            except (ValueError, KeyError, IndexError, TypeError):
                problem = f"{self.url} did not return an OpenAI chat-completions response"
                continue
            answer = parse(reply)
            if answer is not None:
                return answer
            problem = f"the reply is not {what}: {(reply or '')[:80]!r}"
            malformed += 1
            chat = chat + [{"role": "assistant", "content": reply or ""},
                           {"role": "user", "content": f"That is not a valid answer. {fix}"}]
        if unparseable_ok and malformed == 2:
            return None
        short = prompt if len(prompt) <= 60 else prompt[:57] + "..."
        raise LmforgeError(f"judge failed twice on prompt {short!r}: {problem}")

    def _rank_distinct(self, prompt: str, candidates: list[str], messages: list[dict] | None) -> list[int]:
        """Ranks 1..n (a permutation, 1 = best) of distinct `candidates`, in one request."""
        n = len(candidates)
        chat = [{"role": "system", "content": JUDGE_SYSTEM},
                {"role": "user", "content": judge_prompt(prompt, candidates, messages)}]
        order = self._ask(prompt, chat, lambda reply: parse_ranking(reply, n), f"a ranking of 1..{n}",
                          f"Reply with only a JSON list of the numbers 1..{n}, best first, each exactly once.")
        ranks = [0] * n
        for r, c in enumerate(order, 1):
            ranks[c - 1] = r
        return ranks

    def rank(self, prompt: str, responses: list[str], messages: list[dict] | None = None) -> list[int]:
        """Competition ranks of `responses`. Each distinct text is ranked once (asking a judge to order two
        copies of one text is arbitrary) and duplicates share its rank: ["a", "b", "a"] -> [1, 3, 1] or [2, 1, 2]."""
        distinct = list(dict.fromkeys(responses))
        if len(distinct) <= 1:
            return [1] * len(responses)
        ranks = dict(zip(distinct, self._rank_distinct(prompt, distinct, messages)))
        return ranks_from_scores([-ranks[c] for c in responses])

    def score(self, prompt: str, response: str) -> float:
        """The judge's 1..10 rating of `response`, mapped to 0..100 as (s - 1) / 9 * 100."""
        chat = [{"role": "system", "content": SCORE_SYSTEM},
                {"role": "user", "content": score_prompt(prompt, response)}]
        s = self._ask(prompt, chat, parse_score, "a score from 1 to 10",
                      "Reply with only a single integer from 1 to 10.")
        return (s - 1) / 9 * 100

    def score_many(self, prompts: list[str], responses: list[str]) -> list[float]:
        """`score` of each pair, `workers` requests at a time (results in input order)."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        with ThreadPoolExecutor(max(1, self.workers)) as pool:
            return list(pool.map(self.score, prompts, responses))

    def compare(self, prompt: str, first: str, second: str) -> float | None:
        """Shown both responses (first as A), which is better: 1.0 / 0.0 / 0.5 for a tie; None when the judge
        twice gave no A / B / tie."""
        chat = [{"role": "system", "content": COMPARE_SYSTEM},
                {"role": "user", "content": compare_prompt(prompt, first, second)}]
        return self._ask(prompt, chat, parse_preference, "A, B or tie", "Reply with only one word: A, B, or tie.",
                         unparseable_ok=True)

    def compare_many(self, prompts: list[str], firsts: list[str], seconds: list[str]) -> list[float | None]:
        """`compare` of each triple, `workers` requests at a time (results in input order)."""
        with ThreadPoolExecutor(max(1, self.workers)) as pool:
            return list(pool.map(self.compare, prompts, firsts, seconds))
