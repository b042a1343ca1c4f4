"""The one chat template, used by SFT, the reward model, RL rollouts, generation and serving alike.

    <|bos|><|system|>...<|end|><|user|>...<|end|><|assistant|>...<|end|><|user|>...<|end|><|assistant|>...<|end|>

The seed's instruction layout `[Instruction] + [separator] + ([Input]) + [separator] + [Output]` maps onto one
user turn (instruction, a newline, then the input when there is one) and one assistant turn (the output).
The reward model must see exactly the layout it was trained on, so every stage renders through here.
"""

from __future__ import annotations

from lmforge.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")


def format_instruction(instruction: str, input: str = "") -> str:
    """User-turn text of an instruction record: the instruction, then a newline and the input if any."""
    return f"{instruction}\n{input}" if input else instruction


def _lower_keys(rec: dict) -> dict:
    return {k.lower() if isinstance(k, str) else k: v for k, v in rec.items()}


def record_to_messages(rec, require_response: bool = True) -> list[dict]:
    """Turn one data record into a list of {"role", "content"} messages.

    Accepts instruction records (keys instruction / input / output, any case: the seed's
    `{"Instruction", "Input", "Output"}` and Alpaca's lowercase form) and chat records `{"messages": [...]}`.
    With require_response, the conversation must contain an assistant turn (SFT); without it, a prompt record
    (no output, or a chat ending in a user turn) is expected. Raises ValueError with a short reason.
    """
    if not isinstance(rec, dict):
        raise ValueError("a record must be a JSON object")
    low = _lower_keys(rec)
    if "messages" in low:
        msgs = low["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError("'messages' must be a non-empty list")
        out = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict):
                raise ValueError(f"messages[{i}] must be an object")
            role, content = m.get("role"), m.get("content")
            if role not in ROLES:
                raise ValueError(f"messages[{i}]: unknown role {role!r} (expected system, user or assistant)")
            if not isinstance(content, str):
                raise ValueError(f"messages[{i}]: 'content' must be a string")
            out.append({"role": role, "content": content})
        if require_response and not any(m["role"] == "assistant" for m in out):
            raise ValueError("chat record has no assistant turn")
        if not require_response:
            if out[-1]["role"] != "user":
                raise ValueError("a prompt record must end with a user turn")
        return out
    if "instruction" in low:
        for key in ("instruction", "input", "output"):
            if key in low and low[key] is not None and not isinstance(low[key], str):
                raise ValueError(f"field '{key}' must be a string")
        instruction, inp = low["instruction"] or "", low.get("input") or ""
        if not instruction.strip():
            raise ValueError("empty 'instruction'")
        msgs = [{"role": "user", "content": format_instruction(instruction, inp)}]
        if require_response:
            output = low.get("output")
            if not output:
                raise ValueError("instruction record has no 'output'")
            msgs.append({"role": "assistant", "content": output})
        return msgs
    if "prompt" in low and isinstance(low["prompt"], str) and not require_response:
        return [{"role": "user", "content": low["prompt"]}]
    raise ValueError("expected an instruction record (instruction/input/output) or a chat record (messages)")


def _role_id(tok: Tokenizer, role: str) -> int:
    return {"system": tok.special.system, "user": tok.special.user, "assistant": tok.special.assistant}[role]


def render(tok: Tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids and loss mask of a whole conversation.

    The mask is 1 exactly on assistant content tokens and the <|end|> closing each assistant turn (so the
    model learns to stop), 0 elsewhere (BOS, role tokens, system and user turns).
    """
    sp = tok.special
    ids, mask = [sp.bos], [0]
    for m in messages:
        body = tok.encode(m["content"])
        learn = 1 if m["role"] == "assistant" else 0
        ids += [_role_id(tok, m["role"])] + body + [sp.end]
        mask += [0] + [learn] * (len(body) + 1)
    return ids, mask


def render_prompt(tok: Tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation that ends in a user turn, followed by the assistant role token,
    ready for generation (the model continues with the response and <|end|>)."""
    ids, _ = render(tok, messages)
    return ids + [tok.special.assistant]


def render_response(tok: Tokenizer, response: str) -> list[int]:
    """Token ids of an assistant response as the template closes it (content + <|end|>)."""
    return tok.encode(response) + [tok.special.end]


def stop_ids(tok: Tokenizer) -> list[int]:
    """Tokens that end a generated response."""
    return [tok.special.end, tok.special.eos]


def render_encoder_pair(tok: Tokenizer, prompt: str, candidate: str) -> list[int]:
    """The seed's encoder (BERT-style) reward-model layout: [BOS] prompt [SEP] candidate [EOS]."""
    sp = tok.special
    return [sp.bos] + tok.encode(prompt) + [sp.sep] + tok.encode(candidate) + [sp.eos]
