"""The one chat template, used by SFT, the reward model, RL rollouts, generation and serving alike.
lmforge's own tokenizer renders

    <|bos|><|system|>...<|end|><|user|>...<|end|><|assistant|>...<|end|><|user|>...<|end|><|assistant|>...<|end|>

The template is the tokenizer's Jinja `chat_template` (tokenizer_config.json), rendered as transformers'
apply_chat_template renders it, so a pretrained model's own format (ChatML `<|im_start|>`, Llama 3 headers)
works as well as lmforge's. The seed's instruction layout `[Instruction] + [separator] + ([Input]) +
[separator] + [Output]` maps onto one user turn (instruction, a newline, then the input when there is one) and
one assistant turn (the output).
The reward model must see exactly the layout it was trained on, so every stage renders through here.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache

from lmforge.errors import LmforgeError
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


@lru_cache(maxsize=16)
def _compile(template: str):
    """A Jinja template compiled as transformers' apply_chat_template compiles it (sandboxed, trim_blocks,
    lstrip_blocks, loop controls, `raise_exception`, `tojson`, `strftime_now`)."""
    from datetime import datetime

    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask markers) renders its body as is:
        the loss mask comes from the offsets of the messages' contents here."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols", Generation])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent, ensure_ascii=ensure_ascii)
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env.from_string(template)


def render_text(tok: Tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The conversation as text, through the tokenizer's chat template (what apply_chat_template renders)."""
    import jinja2

    values = {k: tok.token_text(k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    try:
        return _compile(tok.chat_template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                  tools=None, documents=None, **values)
    except jinja2.exceptions.TemplateError as e:
        raise LmforgeError(f"chat template: {e}") from None


_SENTINEL = "\ue000{}\ue001"  # private-use characters: never in real text, untouched by templates
_SENTINEL_RE = re.compile("\ue000(\\d+)\ue001")


def _layout(tok: Tokenizer, messages: list[dict], add_generation_prompt: bool) -> tuple[str, list[tuple[int, int, int]]]:
    """Rendered text and the (message index, start, end) character span of each message's content in it.

    The template is rendered once with placeholders for the contents, to see where each one lands, and the
    result must equal the plain rendering: a template that rewrites content beyond trimming it is refused.
    """
    marked = render_text(tok, [{**m, "content": _SENTINEL.format(i)} for i, m in enumerate(messages)],
                         add_generation_prompt)
    real = render_text(tok, messages, add_generation_prompt)
    for transform in (lambda c: c, str.strip):
        parts, spans, pos = [], [], 0
        for match in _SENTINEL_RE.finditer(marked):
            i = int(match.group(1))
            parts.append(marked[pos:match.start()])
            start = sum(map(len, parts))
            parts.append(transform(messages[i]["content"]))
            spans.append((i, start, start + len(parts[-1])))
            pos = match.end()
        parts.append(marked[pos:])
        if "".join(parts) == real and len({i for i, _, _ in spans}) == len(spans):
            return real, spans
    raise LmforgeError("chat template rewrites message content (beyond trimming it); lmforge cannot place the "
                       "loss mask in its output")


def end_of_turn_token(tok: Tokenizer) -> int | None:
    """The added token the template puts right after an assistant message's content (None: no such token).
    Some fine-tunes add `<|im_end|>` without marking it special: any added token counts."""
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    text, spans = _layout(tok, msgs, False)
    tail = text[spans[-1][2]:]
    for t in tok.hf.encode(tail, add_special_tokens=False).ids[:1]:
        if t in tok.hf.get_added_tokens_decoder():
            return t
    return None


def render(tok: Tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids and loss mask of a whole conversation, exactly as apply_chat_template tokenizes it.

    The mask is 1 on the tokens of each assistant message's content and on the end-of-turn token that closes
    it (so the model learns to stop), 0 elsewhere (BOS, role headers, system and user turns, and anything the
    template writes after the end-of-turn token). Special-token text inside a message is read as that special
    token, as transformers does.
    """
    text, spans = _layout(tok, messages, False)
    enc = tok.hf.encode(text, add_special_tokens=False)
    ids, offsets = enc.ids, enc.offsets  # each read of enc.offsets builds a new list: read it once
    learn = []  # character spans to learn: assistant content through its end-of-turn token
    for i, start, end in spans:
        if messages[i]["role"] == "assistant":
            learn.append((start, end))
    mask = [0] * len(ids)
    for start, end in learn:
        k = 0
        while k < len(ids) and offsets[k][1] <= start:
            k += 1
        while k < len(ids) and offsets[k][0] < end:
            mask[k] = 1
            k += 1
        # the end-of-turn token: the first special token after the content (only whitespace may come between)
        while k < len(ids) and ids[k] != tok.special.end and not text[offsets[k][0]:offsets[k][1]].strip():
            k += 1
        if k < len(ids) and ids[k] == tok.special.end:
            mask[k] = 1
    return ids, mask


def render_prompt(tok: Tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation that ends in a user turn, followed by the template's assistant header,
    ready for generation (the model continues with the response and the end-of-turn token)."""
    return tok.hf.encode(render_text(tok, messages, add_generation_prompt=True), add_special_tokens=False).ids


def render_completion(tok: Tokenizer, prompt: list[dict], response: str) -> list[int]:
    """Token ids of prompt + response, ending at the response's end-of-turn token: the layout of a finished
    rollout, and where a decoder reward model reads its score."""
    ids, mask = render(tok, prompt + [{"role": "assistant", "content": response}])
    last = max(i for i, m in enumerate(mask) if m) if any(mask) else len(ids) - 1
    return ids[:last + 1]


def stop_ids(tok: Tokenizer) -> list[int]:
    """Tokens that end free generation (`lmforge generate`, chat, serving, generation_config.json): the
    end-of-turn token and EOS."""
    return sorted({tok.special.end, tok.special.eos})


def turn_stop_ids(tok: Tokenizer) -> list[int]:
    """The one token that ends a response in RL and evaluation: the end-of-turn token that closes every
    reward-model layout (`render_completion`). Rollouts, candidate sampling and evaluation stop on it alone, so
    a policy cannot end a response in a layout the reward model never saw (e.g. <|eos|> instead of <|end|>)."""
    return [tok.special.end]


def render_encoder_pair(tok: Tokenizer, prompt: str, candidate: str) -> list[int]:
    """The seed's encoder (BERT-style) reward-model layout: [BOS] prompt [SEP] candidate [EOS]."""
    sp = tok.special
    if not tok.is_lmforge:
        raise LmforgeError("an encoder (BERT-style) model needs lmforge's own tokenizer (its BOS/SEP/EOS layout)")
    return [sp.bos] + tok.encode(prompt) + [sp.sep] + tok.encode(candidate) + [sp.eos]
