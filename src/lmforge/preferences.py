"""Preference data, read by the reward model (and DPO): the seed's ranked and scored formats and the common
pairwise form, parsed, validated (errors name file:line) and rendered with the one chat template.

    ranked    {"input": ..., "choices": [{"text": ..., "rank": 1}, ...]}   K >= 2, rank 1 = best, ties allowed
    pairwise  {"prompt" or "input": ..., "chosen": ..., "rejected": ...}
    scored    {"input": ..., "output": ..., "score": 4.5}
A chat prompt comes as `"messages": [..., {"role": "user", ...}]` in place of (or beside) `input`/`prompt`, as
`lmforge sample` and `label` write it; the responses then answer that whole conversation.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.chat import record_to_messages
from lmforge.errors import LmforgeError, where
from lmforge.records import read_records
from lmforge.scoring import render_example


def kendall_tau(x: list[float], y: list[float]) -> float:
    """Kendall's tau-b between two score lists (ties allowed), by brute force over pairs; nan if one is constant."""
    s = nx = ny = 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            dx, dy = (x[i] > x[j]) - (x[i] < x[j]), (y[i] > y[j]) - (y[i] < y[j])
            s, nx, ny = s + dx * dy, nx + (dx != 0), ny + (dy != 0)
    return s / math.sqrt(nx * ny) if nx and ny else float("nan")


def comparison_pairs(ranks: list[int]) -> list[tuple[int, int]]:
    """(better, worse) index pairs among one prompt's K choices: the C(K,2) pairs minus ties (rank 1 = best)."""
    return [(i, j) if ranks[i] < ranks[j] else (j, i)
            for i in range(len(ranks)) for j in range(i + 1, len(ranks)) if ranks[i] != ranks[j]]


@dataclass
class Example:
    """One prompt, its candidate responses and their labels: ranks (preference data) or a score."""
    prompt: list[dict]                   # chat messages before the response (one user turn in the seed's formats)
    responses: list[str]
    ranks: list[int] | None = None       # 1 = best; pairwise data is ranks [1, 2]
    score: float | None = None
    origin: str = ""                     # "file:line", for error messages
    record: dict | None = None           # the source record (`rm score` writes it back with rewards)
    ids: list[list[int]] = field(default_factory=list)  # rendered token ids, one list per response

    @property
    def kind(self) -> str:
        return "preference" if self.ranks is not None else "scored" if self.score is not None else "unlabelled"


def _text(value, name: str) -> str:
    if value is None:
        raise ValueError(f"missing '{name}'")
    if not isinstance(value, str):
        raise ValueError(f"'{name}' must be a string")
    if not value.strip():
        raise ValueError(f"empty '{name}'")
    return value


def _ranks(choices: list, require_labels: bool) -> list[int] | None:
    ranks = [c.get("rank") for c in choices]
    if not require_labels and all(r is None for r in ranks):
        return None
    for i, r in enumerate(ranks):
        if r is None:
            raise ValueError(f"choices[{i}]: missing 'rank'")
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ValueError(f"choices[{i}]: 'rank' must be a positive integer, got {r!r}")
    return ranks


def _prompt_messages(rec: dict) -> list[dict]:
    """The conversation a labelled record's responses answer: its `messages` (a chat prompt ending in a user
    turn, as `lmforge sample` / `label` write it for chat prompts: system and earlier turns included, so the
    reward model trains on the rendering PPO samples from), an Alpaca-style `instruction` (+ `input`) as one user
    turn, else one user turn from `prompt` or `input`."""
    if "messages" in rec:
        msgs = record_to_messages({"messages": rec["messages"]}, require_response=False)
        _text(msgs[-1]["content"], "messages[-1].content")
        return msgs
    alpaca = {k: v for k, v in rec.items() if isinstance(k, str) and k.lower() in ("instruction", "input")}
    if any(k.lower() == "instruction" for k in alpaca):  # instruction + optional input, as SFT renders them
        return record_to_messages(alpaca, require_response=False)
    key = "prompt" if "prompt" in rec else "input"
    return [{"role": "user", "content": _text(rec.get(key), key)}]


def parse_record(rec, require_labels: bool = True) -> Example:
    """One record (ranked, pairwise, scored, or an SFT demonstration) -> Example; ValueError with a reason.

    Without require_labels (scoring), ranks and scores may be absent, and SFT records
    (instruction/input/output or messages) are read with their last assistant turn as the response.
    """
    if not isinstance(rec, dict):
        raise ValueError("a record must be a JSON object")
    msgs = rec.get("messages")
    chat_prompt = isinstance(msgs, list) and bool(msgs) and isinstance(msgs[-1], dict) and msgs[-1].get("role") == "user"
    labelled = chat_prompt or any(k in rec for k in ("choices", "chosen", "rejected", "score"))
    if not labelled and any(isinstance(k, str) and k.lower() in ("instruction", "messages") for k in rec):
        msgs = record_to_messages(rec)
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        ex = Example(msgs[:last], [_text(msgs[last]["content"], "output")])
    elif not any(k in rec for k in ("choices", "chosen", "rejected", "output")):
        raise ValueError("expected a ranked (input, choices), pairwise (prompt, chosen, rejected) "
                         "or scored (input, output, score) record")
    else:
        prompt = _prompt_messages(rec)
        if "choices" in rec:
            choices = rec["choices"]
            if not isinstance(choices, list) or len(choices) < 2:
                raise ValueError("'choices' must be a list of at least 2 candidates")
            for i, c in enumerate(choices):
                if not isinstance(c, dict):
                    raise ValueError(f"choices[{i}] must be an object")
            texts = [_text(c.get("text"), f"choices[{i}].text") for i, c in enumerate(choices)]
            ex = Example(prompt, texts, ranks=_ranks(choices, require_labels))
        elif "chosen" in rec or "rejected" in rec:
            ex = Example(prompt, [_text(rec.get("chosen"), "chosen"), _text(rec.get("rejected"), "rejected")], ranks=[1, 2])
        else:
            score = rec.get("score")
            if score is not None or require_labels:
                if not isinstance(score, (int, float)) or isinstance(score, bool) or not math.isfinite(score):
                    raise ValueError(f"'score' must be a finite number, got {score!r}")
                score = float(score)
            ex = Example(prompt, [_text(rec["output"], "output")], score=score)
    if require_labels and ex.kind == "unlabelled":
        raise ValueError("no label: training needs ranked choices, a chosen/rejected pair or a score")
    return ex


def load_data(path: str | Path, tok, encoder: bool, max_len: int, require_labels: bool = True,
              skip_invalid: bool = False) -> tuple[list[Example], int]:
    """Parse and render every record of `path`: (examples, number skipped). Bad records raise LmforgeError
    naming file:line, or are skipped and counted with skip_invalid."""
    examples, skipped = [], 0
    for line, obj in read_records(path, tolerant=True):
        try:
            if isinstance(obj, json.JSONDecodeError):
                raise ValueError(f"invalid JSON ({obj.msg})")
            ex = parse_record(obj, require_labels)
            if require_labels and ex.ranks is not None and not comparison_pairs(ex.ranks):
                skipped += 1  # all choices tied (allowed): the record holds no comparison to learn from
                continue
            ex.ids = [render_example(tok, ex.prompt, r, encoder) for r in ex.responses]
            longest = max(map(len, ex.ids))
            if longest > max_len:
                raise ValueError(f"a response renders to {longest} tokens, more than the model's context of {max_len}")
        except ValueError as e:
            if not skip_invalid:
                raise LmforgeError(f"{where(path, line)}: {e}") from None
            skipped += 1
            continue
        ex.origin, ex.record = where(path, line), obj
        examples.append(ex)
    if not examples:
        raise LmforgeError(f"{path}: no valid records")
    return examples, skipped


def data_kind(examples: list[Example]) -> str:
    """The one label kind of a data set ("preference" or "scored"); mixing kinds is an error naming the line."""
    kind = examples[0].kind
    for ex in examples:
        if ex.kind != kind:
            raise LmforgeError(f"{ex.origin}: a {ex.kind} record among {kind} records (use one kind per file)")
    return kind


def _prompt_key(ex: Example) -> str:
    return json.dumps(ex.prompt, ensure_ascii=False, sort_keys=True)


def split_by_prompt(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, held-out): a seeded `fraction` of the distinct prompts is held out, with all of their records."""
    keys = list(dict.fromkeys(_prompt_key(ex) for ex in examples))
    random.Random(seed).shuffle(keys)
    held = set(keys[:max(1, round(fraction * len(keys)))] if fraction > 0 else [])
    return [ex for ex in examples if _prompt_key(ex) not in held], [ex for ex in examples if _prompt_key(ex) in held]


def best_responses(examples: list[Example]) -> list[list[int]]:
    """Token ids of each prompt's preferred responses (rank 1, chosen, highest score; all if unlabelled):
    the default reference set that normalisation centres at 0."""
    seqs, top = [], {}
    for ex in examples:
        if ex.ranks is not None:
            seqs += [ids for ids, r in zip(ex.ids, ex.ranks) if r == min(ex.ranks)]
        elif ex.score is not None:
            best = top.setdefault(_prompt_key(ex), [ex.score, []])
            if ex.score > best[0]:
                best[:] = [ex.score, []]
            if ex.score == best[0]:
                best[1].append(ex.ids[0])
        else:
            seqs += ex.ids
    return seqs + [ids for _, group in top.values() for ids in group]


@dataclass
class PreferencePair:
    """One comparison (DPO): a prompt, its preferred (chosen) and other (rejected) response, their renderings
    (prompt + response through the end-of-turn token, as `load_data` renders them) and the records' "file:line"."""
    prompt: list[dict]
    chosen: str
    rejected: str
    chosen_ids: list[int]
    rejected_ids: list[int]
    origin: str = ""                     # the chosen response's record
    rejected_origin: str = ""            # the rejected response's record (another line for scored data)


def preference_pairs(examples: list[Example]) -> list[PreferencePair]:
    """Every (chosen, rejected) comparison the labels state.

    Ranked records give their C(K,2) pairs minus ties (`comparison_pairs`), pairwise records their one pair, in
    file order. Scored records pair up among the records with the same prompt: the higher score is chosen and
    equal scores give no pair (pairs by prompt in order of first appearance, then by line).
    """
    pairs, by_prompt = [], {}
    for ex in examples:
        if ex.ranks is not None:
            pairs += [PreferencePair(ex.prompt, ex.responses[b], ex.responses[w], ex.ids[b], ex.ids[w], ex.origin,
                                     ex.origin) for b, w in comparison_pairs(ex.ranks)]
        elif ex.score is not None:
            by_prompt.setdefault(_prompt_key(ex), []).append(ex)
    for group in by_prompt.values():
        for i, a in enumerate(group):
            for b in group[i + 1:]:
                if a.score != b.score:
                    c, r = (a, b) if a.score > b.score else (b, a)
                    pairs.append(PreferencePair(c.prompt, c.responses[0], r.responses[0], c.ids[0], r.ids[0],
                                                c.origin, r.origin))
    return pairs
