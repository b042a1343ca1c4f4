"""The one prompt type and the one prompt reader, for sampling candidates, RL rollouts and evaluation.

A prompt file holds instruction records without an output (the seed's `{"Instruction", "Input"}`, keys in any
case) or chat records `{"messages": [...]}` ending with a user turn. A reference answer, if present (an
instruction's output, or a chat's final assistant turn), is dropped, so SFT-format files serve as prompts too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lmforge.chat import record_to_messages, render_prompt
from lmforge.errors import LmforgeError, where
from lmforge.records import read_records


@dataclass
class Prompt:
    """One prompt: its messages (ending with a user turn), the last user turn's text, and where it came from.
    `ids` (the chat-template rendering, ending with the assistant role token) is set by `encode_prompts`."""
    messages: list[dict]
    text: str
    is_chat: bool = False
    line: int = 0
    ids: list[int] = field(default_factory=list)


def _has_answer(rec) -> bool:
    """True when the record carries a reference answer (an instruction 'output' or a final assistant turn)."""
    if not isinstance(rec, dict):
        return False
    low = {str(k).lower(): v for k, v in rec.items()}
    if "messages" in low:
        msgs = low["messages"]
        return isinstance(msgs, list) and bool(msgs) and isinstance(msgs[-1], dict) \
            and msgs[-1].get("role") == "assistant"
    return bool(low.get("output"))


def read_prompts(path: str | Path) -> list[Prompt]:
    """Every prompt record of a JSONL file (or JSON array); errors name file:line."""
    prompts = []
    for lineno, rec in read_records(path):
        try:
            msgs = record_to_messages(rec, require_response=_has_answer(rec))
            if msgs[-1]["role"] == "assistant":
                msgs = msgs[:-1]
            if not msgs or msgs[-1]["role"] != "user":
                raise ValueError("a prompt record must end with a user turn (optionally followed by one answer)")
        except ValueError as e:
            raise LmforgeError(f"{where(path, lineno)}: {e}") from None
        is_chat = any(str(k).lower() == "messages" for k in rec)
        prompts.append(Prompt(msgs, msgs[-1]["content"], is_chat, lineno))
    if not prompts:
        raise LmforgeError(f"{path}: no prompt records")
    return prompts


def encode_prompts(tok, prompts: list[Prompt], path: str | Path, contexts: dict[str, int],
                   new_tokens: int = 1) -> list[list[int]]:
    """Render every prompt with the chat template (setting `Prompt.ids`) and check that it plus `new_tokens`
    fits each model's context (`contexts`: model name -> positions). Returns the ids."""
    for p in prompts:
        p.ids = render_prompt(tok, p.messages)
        for name, ctx in contexts.items():
            if len(p.ids) + new_tokens > ctx:
                raise LmforgeError(f"{where(path, p.line)}: prompt of {len(p.ids)} tokens + {new_tokens} new tokens "
                                   f"exceeds the {name}'s context of {ctx} positions")
    return [p.ids for p in prompts]
