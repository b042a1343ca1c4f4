"""Style: the flaws added to demonstrations, and the oracle's politeness (0..20) and concision (0..20) parts.

Shared by every task family: a flaw is the same rude opener or filler whatever was asked, so a reward model
can learn it once. The oracle detects flaws by the markers below, which a tiny reward model can learn too.
"""

from __future__ import annotations

import random
import re

RUDE_OPENERS = {"en": ["Ugh, fine.", "Whatever.", "Duh.", "Obviously."], "zh": ["烦死了,", "真麻烦,", "这都不会?", "笨,"]}
# Every filler starts with the same words so the flawed branch is one token choice, not several small ones.
FILLERS = {
    "en": ["I hope this helps! Let me know if you need anything else, I am always here to help you.",
           "I hope this helps! Feel free to ask me more questions any time, I really enjoy helping you.",
           "I hope this helps! If you have any other questions, I am always happy to help you with anything."],
    "zh": ["希望这对你有帮助!如果还有其他问题,请随时告诉我。", "希望这对你有帮助!欢迎随时问我,我很乐意帮助你。"],
}
_RUDE_RE = re.compile(r"\b(ugh|whatever|duh|obviously|stupid|dumb|idiot)\b|烦死|麻烦|这都不会|笨|蠢", re.I)
_FILLER_RE = re.compile(r"hope this helps|let me know|feel free|happy to help|here to help|希望这|随时|乐意", re.I)


def add_flaws(answer: str, lang: str, impolite: bool, verbose: bool, rng: random.Random) -> str:
    """The answer with a rude opener before it and/or a filler after it, in the prompt's language."""
    sep = " " if lang == "en" else ""
    if impolite:
        answer = rng.choice(RUDE_OPENERS[lang]) + sep + answer
    if verbose:
        answer = answer + sep + rng.choice(FILLERS[lang])
    return answer


def normalize(s: str) -> str:
    """Lower case with runs of whitespace collapsed, for comparing an answer with the ideal one."""
    return " ".join(s.lower().split())


def politeness(response: str) -> float:
    """0..20: full unless the response contains a rude marker anywhere."""
    return 0.0 if _RUDE_RE.search(response) else 20.0


def concision(response: str, ideal: str) -> float:
    """0..20: full up to ~1.5x the ideal length, zero from ~3x; filler, repeats and near-empty answers lose."""
    text = response.strip()
    if _FILLER_RE.search(text):
        return 0.0
    core = normalize(ideal).rstrip(".。")
    if len(re.findall(rf"(?<![a-z0-9]){re.escape(core)}(?![a-z0-9])", normalize(text))) > 1:
        return 0.0  # saying the answer twice is never more helpful
    for opener in RUDE_OPENERS["en"] + RUDE_OPENERS["zh"]:  # already charged by politeness
        text = text.removeprefix(opener).strip()
    n, ideal_n = len(text), len(ideal)
    full, zero = 1.5 * ideal_n + 4, 3 * ideal_n + 8
    score = 20.0 * min(1.0, max(0.0, (zero - n) / (zero - full)))
    if n < ideal_n / 2:  # "68" for "23 + 45 = 68." or "." for anything
        score *= n / (ideal_n / 2)
    return score
