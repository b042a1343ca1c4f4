"""`lmforge chat`: talk to a trained policy in the terminal, several turns, the reply streamed as it is sampled.

The conversation is rendered with the checkpoint's own chat template (`chat.render_prompt`), so any policy works:
lmforge's, or an imported Hugging Face / GGUF model with its template. Tokens are printed as they come through a
UTF-8-safe decoder (a Chinese character split over two byte-level tokens appears whole). The history is kept
within the context window: when the conversation plus `max_new_tokens` no longer fits, the oldest exchanges
(a user turn and its reply) are dropped, the system prompt stays, and a notice says so.

    lmforge chat --model runs/lmforge/ppo --system "Answer briefly." temperature=0.7

Commands at the prompt: /reset (forget the conversation), /system TEXT (a new system prompt; it also resets;
"/system" alone clears it), /help, /quit (or end of input).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, TextIO

import torch

from lmforge import chat
from lmforge.cli import Command, Flag
from lmforge.errors import ConfigError, LmforgeError
from lmforge.generation import SamplingParams, Utf8Streamer, generate

HELP = "commands: /reset  forget the conversation | /system TEXT  new system prompt (resets) | /quit"


@dataclass
class ChatConfig:
    """`lmforge chat` settings."""
    model: str = ""                 # a policy checkpoint directory (or hf:DIR / gguf:FILE)
    system: str = ""                # system prompt ("" = none)
    max_new_tokens: int = 256       # per reply (cut to what the context leaves)
    temperature: float = 0.7        # 0: greedy
    top_k: int = 0                  # 0: off
    top_p: float = 1.0              # 1: off
    seed: int = 0                   # the sampling stream of the whole session
    device: str = "auto"

    def validate(self) -> None:
        if not self.model:
            raise ConfigError("model", "is required (a policy checkpoint directory)")
        if self.max_new_tokens < 1:
            raise ConfigError("max_new_tokens", "must be positive")
        if self.temperature < 0:
            raise ConfigError("temperature", "must be >= 0")
        if self.top_k < 0:
            raise ConfigError("top_k", "must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ConfigError("top_p", "must be in (0, 1]")


class ChatSession:
    """One conversation with a model: the system prompt, the turns so far, and a seeded sampling stream."""

    def __init__(self, model, tok, cfg: ChatConfig):
        self.model, self.tok, self.cfg = model.eval(), tok, cfg
        self.context = model.config.max_position_embeddings
        self.max_new = min(cfg.max_new_tokens, self.context // 2)  # leave at least half for the conversation
        self.system = cfg.system
        self.turns: list[dict] = []   # alternating user / assistant messages
        device = next(model.parameters()).device
        self.generator = torch.Generator(device=device).manual_seed(cfg.seed)
        self.stops = chat.stop_ids(tok)

    def messages(self) -> list[dict]:
        """The conversation as chat messages: the system prompt (if any), then the turns."""
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.turns

    def reset(self, system: str | None = None) -> None:
        """Forget the turns; with `system`, also set a new system prompt."""
        self.turns = []
        if system is not None:
            self.system = system

    def _fit(self) -> tuple[list[int], int]:
        """The prompt ids of the conversation, after dropping the oldest exchanges until prompt + reply fit the
        context; returns (ids, exchanges dropped). A last user turn too long on its own is an error."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        alone = chat.render_prompt(self.tok, system + self.turns[-1:])
        if len(alone) + self.max_new > self.context:  # hopeless: refuse it, keep the history as it was
            self.turns.pop()
            raise LmforgeError(f"message too long: {len(alone)} tokens, and the model's context of {self.context} "
                               f"keeps {self.context - self.max_new} for the conversation (max_new_tokens "
                               f"{self.max_new})")
        dropped = 0
        while True:
            ids = chat.render_prompt(self.tok, self.messages())
            if len(ids) + self.max_new <= self.context:
                return ids, dropped
            self.turns = self.turns[2:]  # the oldest user turn and its reply
            dropped += 1

    def reply(self, text: str, on_text: Callable[[str], None] | None = None) -> tuple[str, int]:
        """Answer `text` as the next user turn; each decoded piece goes to on_text as it is sampled. Returns
        (the reply, exchanges dropped to make room)."""
        self.turns.append({"role": "user", "content": text})
        ids, dropped = self._fit()
        streamer, pieces = Utf8Streamer(self.tok), []

        def on_tokens(step, tokens, active):
            if active[0] and int(tokens[0]) not in self.stops:
                piece = streamer.push(int(tokens[0]))
                pieces.append(piece)
                if on_text is not None and piece:
                    on_text(piece)

        params = SamplingParams(self.max_new, self.cfg.temperature, self.cfg.top_k, self.cfg.top_p)
        try:
            generate(self.model, [ids], params, self.stops, self.tok.special.pad, self.generator, on_tokens)
        except BaseException:  # interrupted (Ctrl-C): the unanswered turn leaves, turns keep alternating
            self.turns.pop()
            raise
        tail = streamer.flush()
        pieces.append(tail)
        if on_text is not None and tail:
            on_text(tail)
        answer = "".join(pieces)
        self.turns.append({"role": "assistant", "content": answer})
        return answer, dropped


def chat_loop(cfg: ChatConfig, stdin: TextIO | None = None, stdout: TextIO | None = None) -> None:
    """The terminal session: read a line, answer it streamed, until /quit or end of input."""
    from lmforge.checkpoint import load_causal_lm
    from lmforge.training import pick_device

    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    model, tok, _ = load_causal_lm(cfg.model, "lmforge chat", device=pick_device(cfg.device))
    session = ChatSession(model, tok, cfg)
    say = lambda s="": print(s, file=stdout, flush=True)  # noqa: E731
    say(f"lmforge chat with {cfg.model} (context {session.context} tokens, replies up to {session.max_new}); "
        "/help for commands")
    while True:
        stdout.write(">>> ")
        stdout.flush()
        line = stdin.readline()
        if not line:  # end of input
            say()
            return
        text = line.rstrip("\n")
        command, _, arg = text.strip().partition(" ")
        if command in ("/quit", "/exit"):
            return
        if command == "/help":
            say(HELP)
        elif command == "/reset":
            session.reset()
            say("(conversation reset)")
        elif command == "/system":
            session.reset(system=arg.strip())
            say(f"(system prompt {'set' if arg.strip() else 'cleared'}; conversation reset)")
        elif command.startswith("/"):
            say(f"unknown command {command}; {HELP}")
        elif text.strip():
            try:
                _, dropped = session.reply(text, lambda piece: (stdout.write(piece), stdout.flush()))
            except LmforgeError as e:
                say(f"({e})")
                continue
            say()
            if dropped:
                say(f"(the {dropped} oldest exchange{'s' if dropped > 1 else ''} left the context window)")


COMMAND = Command(
    "lmforge chat", "Talk to a policy checkpoint in the terminal: several turns, streamed replies.", ChatConfig,
    chat_loop,
    flags=(Flag("--model", "model", "policy checkpoint directory"), Flag("--system", "system", "system prompt"),
           Flag("--temperature", "temperature"), Flag("--max-new-tokens", "max_new_tokens"), Flag("--seed", "seed")),
    examples=("lmforge chat --model runs/lmforge/ppo",
              'lmforge chat --model runs/lmforge/sft --system "Answer in one sentence." temperature=0 top_p=0.9'))
