"""`lmforge chat`: streamed multi-turn replies equal plain generation, history trimmed to the context window with
the system prompt kept, the terminal commands, and bad input."""

import io

import pytest
import torch

from lmforge import chat
from lmforge.chat_cli import ChatConfig, ChatSession
from lmforge.checkpoint import save_checkpoint
from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.generation import SamplingParams, generate
from lmforge.model import Transformer
from tests.conftest import tiny_config


def _model(tok, context=128):
    torch.manual_seed(0)
    return Transformer(tiny_config(tok.vocab_size, max_position_embeddings=context, init_std=0.2)).eval()


def test_replies_stream_the_greedy_continuation_of_the_whole_conversation(tok):
    model = _model(tok)
    session = ChatSession(model, tok, ChatConfig(model="m", system="Be brief.", max_new_tokens=12, temperature=0.0))
    streamed = []
    first, dropped = session.reply("What is 2 + 3?", streamed.append)
    assert dropped == 0 and "".join(streamed) == first
    second, _ = session.reply("And 4 + 4?")
    # the second reply continues the rendering of system + first exchange + new user turn, exactly as generate would
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
            {"role": "assistant", "content": first}, {"role": "user", "content": "And 4 + 4?"}]
    assert session.messages() == msgs + [{"role": "assistant", "content": second}]
    out = generate(model, [chat.render_prompt(tok, msgs)], SamplingParams(12, 0.0), chat.stop_ids(tok),
                   tok.special.pad)
    tokens = out.tokens[0][:-1] if out.finished[0] else out.tokens[0]
    assert second == tok.decode(tokens)


def test_oldest_exchanges_leave_the_context_window_and_the_system_prompt_stays(tok):
    model = _model(tok, context=64)
    session = ChatSession(model, tok, ChatConfig(model="m", system="sys", max_new_tokens=8, temperature=0.0))
    drops = [session.reply(f"tell me about the quick brown fox number {i}")[1] for i in range(6)]
    assert sum(drops) > 0 and drops[0] == 0
    assert session.messages()[0] == {"role": "system", "content": "sys"}
    assert len(chat.render_prompt(tok, session.messages()[:-1])) + 8 <= 64
    assert session.messages()[-2]["content"].endswith("number 5")  # the newest exchange is always kept
    before = list(session.turns)
    with pytest.raises(LmforgeError, match="message too long"):
        session.reply("fox " * 200)
    assert session.turns == before  # only the message that cannot fit is refused; the history stays
    session.reply("hi")
    assert session.turns[-2] == {"role": "user", "content": "hi"}


def test_terminal_session_commands(tok, tmp_path):
    save_checkpoint(tmp_path / "policy", _model(tok), tok, {"stage": "sft"})
    stdin = io.StringIO("hello there\n/system 用中文回答。\n你好\n/reset\n/help\n/nope\n\nbye\n/quit\nnever read\n")
    import sys

    old = sys.stdin, sys.stdout
    sys.stdin, sys.stdout = stdin, io.StringIO()
    try:
        assert main(["chat", "--model", str(tmp_path / "policy"), "temperature=0", "max_new_tokens=6"]) == 0
        out = sys.stdout.getvalue()
    finally:
        sys.stdin, sys.stdout = old
    assert out.startswith(f"lmforge chat with {tmp_path / 'policy'} (context 128 tokens, replies up to 6)")
    assert out.count(">>> ") == 9  # nine lines read, the last one /quit
    assert "(system prompt set; conversation reset)" in out and "(conversation reset)" in out
    assert "commands: /reset" in out and "unknown command /nope" in out and "never read" not in out


def test_bad_config_is_one_line(tok, tmp_path, capsys):
    assert main(["chat", "top_p=0"]) == 1
    assert "config key 'model' is required" in capsys.readouterr().err
    assert main(["chat", "--model", str(tmp_path / "missing"), "top_p=1.5"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "top_p" in err
    assert main(["chat", "--model", "m", "top_k=-1"]) == 1
    assert "config key 'top_k' must be >= 0" in capsys.readouterr().err
