"""The `lmforge` command: one subcommand per stage, dispatched lazily to the module that implements it.

Every user-facing error (LmforgeError) is printed as one line on stderr with a non-zero exit, never a traceback.
"""

from __future__ import annotations

import importlib
import sys

from lmforge.errors import LmforgeError

# command -> (module, one-line help). Each module has `cli(argv: list[str]) -> None`.
COMMANDS = {
    "tokenizer": ("lmforge.tokenizer", "train a byte-level BPE tokenizer (tokenizer train ...)"),
    "data": ("lmforge.data", "tokenize a corpus into token shards (data prepare ...)"),
    "pretrain": ("lmforge.pretrain", "pretrain a Transformer (objective clm or mlm)"),
    "sft": ("lmforge.sft", "supervised instruction fine-tuning, loss on responses only"),
    "rm": ("lmforge.reward", "train a reward model (rm ...) or score records (rm score ...)"),
    "ppo": ("lmforge.ppo", "RLHF with PPO against a reward model"),
    "generate": ("lmforge.generation", "sample text from a checkpoint"),
    "sample": ("lmforge.sample", "write K candidate responses per prompt"),
    "label": ("lmforge.label", "rank candidates with a judge into the seed's ranked format"),
    "run": ("lmforge.pipeline", "the whole InstructGPT pipeline on the built-in dataset, with a report"),
}


def usage() -> str:
    lines = ["usage: lmforge COMMAND [args]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `lmforge COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        from lmforge import __version__
        print(__version__)
        return 0
    name = argv[0]
    if name not in COMMANDS:
        print(f"lmforge: unknown command '{name}'\n\n{usage()}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(COMMANDS[name][0])
        module.cli(argv[1:])
    except LmforgeError as e:
        print(f"lmforge {name}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"lmforge {name}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
