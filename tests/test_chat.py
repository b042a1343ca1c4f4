"""The chat template: loss mask on assistant tokens + end-of-turn, record formats."""

import pytest

from lmforge.chat import record_to_messages, render, render_prompt


def _assistant_positions(tok, ids):
    """Brute force: positions inside assistant turns, after the role token, through the closing <|end|>."""
    sp, out, inside = tok.special, [], False
    for i, t in enumerate(ids):
        if t == sp.assistant:
            inside = True
            continue
        if inside:
            out.append(i)
            if t == sp.end:
                inside = False
    return out


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 = 5."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "你好"},
     {"role": "user", "content": "again"}, {"role": "assistant", "content": "Hello 🎉"}],
])
def test_loss_mask_is_exactly_assistant_tokens_and_end(tok, messages):
    ids, mask = render(tok, messages)
    assert [i for i, m in enumerate(mask) if m] == _assistant_positions(tok, ids)
    learned = [ids[i] for i, m in enumerate(mask) if m]
    assert learned.count(tok.special.end) == sum(m["role"] == "assistant" for m in messages)


def test_capitalized_and_lowercase_instruction_keys_are_identical(tok):
    a = record_to_messages({"Instruction": "请帮我翻译一句话", "Input": "hello", "Output": "你好"})
    b = record_to_messages({"instruction": "请帮我翻译一句话", "input": "hello", "output": "你好"})
    assert a == b and render(tok, a) == render(tok, b)
    assert a[0]["content"] == "请帮我翻译一句话\nhello"


def test_prompt_rendering_ends_with_assistant_role(tok):
    msgs = record_to_messages({"Instruction": "Say hi"}, require_response=False)
    ids = render_prompt(tok, msgs)
    assert ids[-1] == tok.special.assistant
    full, _ = render(tok, msgs + [{"role": "assistant", "content": "hi"}])
    assert full[:len(ids)] == ids


@pytest.mark.parametrize("rec, msg", [
    ({"instruction": "x"}, "no 'output'"),
    ({"messages": [{"role": "user", "content": "x"}]}, "no assistant turn"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "unknown role"),
    ({"instruction": "x", "output": 3}, "must be a string"),
    ({"foo": 1}, "expected an instruction record"),
])
def test_bad_records(rec, msg):
    with pytest.raises(ValueError, match=msg):
        record_to_messages(rec)
