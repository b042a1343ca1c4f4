"""The `lmforge` command and its one grammar:

    lmforge COMMAND [SUBCOMMAND] [--config FILE] [--flag VALUE ...] [key=value ...] [--print-config]

Every command is a `Command`: a typed config dataclass (lmforge.config), a few flags that set its most common
keys, and a run function. Values come from the dataclass defaults <- the YAML file <- flags <- key=value
overrides, and every key is checked against the dataclass before anything runs. `--help` lists every key with
its default and the comment from the dataclass source. Commands are found lazily (`module:ATTRIBUTE`), so
`lmforge --help` imports no torch.

Every user-facing error (LmforgeError) is printed as one line on stderr with a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import importlib
import inspect
import re
import sys
import typing
from dataclasses import dataclass
from typing import Any, Callable

import yaml

from lmforge.config import _merge, load_config, parse_overrides, read_yaml, to_dict
from lmforge.errors import LmforgeError

# command -> "module:ATTRIBUTE" of a Command, or a dict of subcommands (one level of nesting).
COMMANDS: dict[str, Any] = {
    "world": "lmforge.stages.world:COMMAND",
    "tokenizer": {"train": "lmforge.stages.tokenizer:COMMAND"},
    "data": {"prepare": "lmforge.stages.data:COMMAND"},
    "pretrain": "lmforge.stages.pretrain:COMMAND",
    "sft": "lmforge.stages.sft:COMMAND",
    "selfinstruct": "lmforge.stages.selfinstruct:COMMAND",
    "sample": "lmforge.stages.sample:COMMAND",
    "label": {"rank": "lmforge.stages.label:COMMAND", "agreement": "lmforge.stages.label:AGREEMENT"},
    "rm": {"train": "lmforge.stages.rm:COMMAND", "score": "lmforge.stages.rm:SCORE_COMMAND"},
    "ppo": "lmforge.stages.ppo:COMMAND",
    "grpo": "lmforge.stages.grpo:COMMAND",
    "dpo": "lmforge.stages.dpo:COMMAND",
    "eval": "lmforge.stages.evaluate:COMMAND",
    "report": "lmforge.stages.report:COMMAND",
    "generate": "lmforge.generation:COMMAND",
    "chat": "lmforge.chat_cli:COMMAND",
    "serve": "lmforge.serve:COMMAND",
    "import": {"hf": "lmforge.hf:IMPORT_HF", "gguf": "lmforge.hf:IMPORT_GGUF"},
    "export": {"hf": "lmforge.hf:EXPORT_HF"},
    "run": "lmforge.pipeline:COMMAND",
}
# The one-line help of each command, here so that `lmforge --help` needs no imports.
HELP = {
    "world": "generate the built-in world: corpus, instruction data, prompts (oracle judge)",
    "tokenizer": "tokenizer train: a byte-level BPE tokenizer with chat special tokens",
    "data": "data prepare: tokenize a corpus into token shards",
    "pretrain": "pretrain a Transformer (objective clm or mlm)",
    "sft": "supervised instruction fine-tuning, loss on responses only",
    "selfinstruct": "new instruction data from a few seed tasks, written by a model (Self-Instruct)",
    "sample": "write K candidate responses per prompt",
    "label": "label rank: rank candidates with a judge (oracle, openai, human page); label agreement: labellers' agreement",
    "rm": "rm train: train a reward model; rm score: score records with one",
    "ppo": "RLHF with PPO against a reward model",
    "grpo": "RL with GRPO: group-relative advantages, no critic (reward model and/or a reward function)",
    "dpo": "direct preference optimization (DPO, IPO, hinge) of the SFT policy on preference data",
    "eval": "evaluate policies on held-out prompts with a judge",
    "report": "the report (tables and plots) of a run directory",
    "generate": "sample text from a checkpoint",
    "chat": "talk to a policy checkpoint in the terminal (several turns, streamed)",
    "serve": "serve checkpoints over an OpenAI-compatible HTTP API (continuous batching)",
    "import": "import hf|gguf: a Hugging Face folder or a GGUF file as an lmforge checkpoint",
    "export": "export hf: a checkpoint as a transformers folder (AutoModelForCausalLM)",
    "run": "the whole InstructGPT pipeline with a report",
}
DEFAULT_SUBCOMMAND = {"rm": "train", "label": "rank"}  # `lmforge rm --config ...` trains, as before subcommands existed


@dataclass(frozen=True)
class Flag:
    """`--name VALUE` sets config key `key` (a bool key becomes a switch; a list key takes several values)."""
    name: str
    key: str
    help: str = ""


@dataclass(frozen=True)
class Command:
    """One `lmforge` command: its typed config, its common flags, and `run(cfg)` (or `run(cfg, resume)`)."""
    prog: str
    description: str
    config: type
    run: Callable
    flags: tuple[Flag, ...] = ()
    examples: tuple[str, ...] = ()
    resume: bool = False               # the command has --resume (training stages)
    positional: Flag | None = None     # one positional argument that sets a key (`lmforge import hf PATH`)

    def parser(self) -> argparse.ArgumentParser:
        epilog = ["config keys (YAML file or key=value; defaults in brackets):", *key_help(self.config)]
        if self.examples:
            epilog += ["", "examples:", *(f"  {e}" for e in self.examples)]
        p = argparse.ArgumentParser(prog=self.prog, description=self.description, epilog="\n".join(epilog),
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        if self.positional is not None:
            p.add_argument(self.positional.key, nargs="?", metavar=self.positional.name, help=self.positional.help)
        p.add_argument("--config", help="YAML config file (see configs/)")
        for f in self.flags:
            tp = key_type(self.config, f.key)
            if tp is bool:
                p.add_argument(f.name, dest=f.key, action="store_const", const="true", help=f.help)
            elif typing.get_origin(tp) is list:
                p.add_argument(f.name, dest=f.key, nargs="+", action="extend", metavar="VALUE", help=f.help)
            else:
                p.add_argument(f.name, dest=f.key, metavar="VALUE", help=f.help)
        if self.resume:
            p.add_argument("--resume", action="store_true", help="continue from the checkpoint in the output directory")
        p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (keys listed below)")
        return p

    def tree(self, args: argparse.Namespace) -> dict:
        """The raw config tree: the --config file <- flags <- key=value overrides."""
        tree = read_yaml(args.config) if args.config else {}
        overrides = list(args.overrides)
        for f in self.flags + ((self.positional,) if self.positional else ()):
            value = getattr(args, f.key, None)
            if isinstance(value, list):  # a list flag swallows what follows it: config key=value items are overrides
                overrides = [v for v in value if self.is_override(v)] + overrides
                value = [v for v in value if not self.is_override(v)] or None
            if value is not None:
                tree = _merge(tree, _key_tree(f.key, _flag_value(key_type(self.config, f.key), value)))
        return _merge(tree, parse_overrides(overrides))

    def is_override(self, item: str) -> bool:
        """Whether `item` is a key=value override of this command's config (not a value like sft=runs/sft)."""
        return bool(_KEY_VALUE.match(item)) and item.split(".", 1)[0].split("=", 1)[0] in self.top_keys()

    def top_keys(self) -> set[str]:
        """The top-level config keys."""
        return {f.name for f in dataclasses.fields(self.config)}

    def load(self, args: argparse.Namespace):
        """The typed config, every key and type checked against the dataclass."""
        return load_config(self.config, base=self.tree(args))

    def main(self, argv: list[str]) -> None:
        args = self.parser().parse_intermixed_args(argv)  # key=value may follow --resume or any flag
        cfg = self.load(args)
        if args.print_config:
            print(yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True), end="")
            return
        self.run(cfg, args.resume) if self.resume else self.run(cfg)


_KEY_VALUE = re.compile(r"^[A-Za-z_][\w.]*=")


def _key_tree(key: str, value) -> dict:
    tree: dict = {}
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return tree


def _flag_value(tp, value):
    """A flag's text as the key's type expects it: strings stay verbatim, other values parse as YAML scalars."""
    if tp is bool:
        return True
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp) or (str,)
        return [v if item is str else yaml.safe_load(v) for v in value]
    return value if tp is str else yaml.safe_load(value)


def key_type(cls: type, key: str):
    """The annotation of a dotted key of a config dataclass."""
    tp = cls
    for part in key.split("."):
        tp = typing.get_type_hints(tp)[part]
    return tp


def _field_comments(cls: type) -> dict[str, str]:
    """name -> the `# comment` after each field in the dataclass source: the documentation --help shows."""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^\s+(\w+):[^#\n]*#\s*(.*)$", src, re.M)}


def key_help(cls: type, prefix: str = "", skip: tuple[str, ...] = (), default=None) -> list[str]:
    """One line per config key (nested dataclasses flattened), with its default and its source comment. A nested
    section shows the defaults its parent gives it (PPO's actor_optim.lr 1e-05, not OptimConfig's own 1e-3)."""
    lines, comments, hints = [], _field_comments(cls), typing.get_type_hints(cls)
    default = cls() if default is None else default
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        value = getattr(default, f.name)
        if dataclasses.is_dataclass(value):
            lines += key_help(type(value), f"{prefix}{f.name}.", default=value)
            continue
        tp = hints[f.name]
        name = getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
        shown = f"  {prefix}{f.name} ({name}) [{value!r}]"
        note = comments.get(f.name, "")
        lines.append(f"{shown:<52} {note}" if note else shown)
    return lines


def _find(argv: list[str]) -> tuple[Command | None, list[str], str]:
    """The Command named by argv (with a subcommand where the command has them), the rest of argv, an error."""
    name = argv[0]
    entry = COMMANDS.get(name)
    if entry is None:
        return None, [], f"unknown command '{name}'"
    rest = argv[1:]
    if isinstance(entry, dict):
        if rest and rest[0] in entry:
            entry, rest = entry[rest[0]], rest[1:]
        elif name in DEFAULT_SUBCOMMAND and not (rest and rest[0] in ("-h", "--help")):
            entry = entry[DEFAULT_SUBCOMMAND[name]]
        else:
            subs = ", ".join(entry)
            return None, [], f"'{name}' needs a subcommand ({subs}): lmforge {name} {next(iter(entry))} --help"
    module, attr = entry.split(":")
    return getattr(importlib.import_module(module), attr), rest, ""


def usage() -> str:
    lines = ["usage: lmforge COMMAND [SUBCOMMAND] [--config FILE] [--flag VALUE ...] [key=value ...]", "", "commands:"]
    lines += [f"  {name:<10} {HELP[name]}" for name in COMMANDS]
    lines += ["", "Run `lmforge COMMAND --help` for a command's flags and every config key."]
    return "\n".join(lines)


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the kernel (the `lmforge`
    command does this first; so do its engine processes and the CPU benchmarks). Returns whether it applied.

    By default glibc serves blocks of 128 KB and up with mmap and trims the heap as soon as its top is free, so
    every training step's activations and gradients, and every decode step's (batch, vocab) temporaries, come back
    as fresh pages that the kernel zeroes and faults in one by one: on the 2-core VM that cost ~1 us per 4 KB page,
    0.66 ms of a 1.4 ms sampling call over 32 rows x 4096. Blocks up to 32 MB from the heap and no trimming below
    1 GB (the CPU counterpart of PyTorch's CUDA caching allocator; Intel's PyTorch tuning guide uses jemalloc for
    the same reason): the default run's page faults fell from 3.7M to 0.28M, PPO iterations 5-12% faster
    (BENCHMARKS.md). The price: the process keeps its peak heap. Left alone where the user tunes malloc
    (MALLOC_*_ variables, GLIBC_TUNABLES) or the C library is not glibc."""
    import ctypes

    tuned = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
    if any(k in os.environ for k in tuned) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return False
        mallopt = ctypes.CDLL(None).mallopt
    except (ValueError, OSError, AttributeError):  # not glibc
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
    mmap_ok = mallopt(M_MMAP_THRESHOLD, 32 << 20)
    trim_ok = mallopt(M_TRIM_THRESHOLD, 1 << 30)
    return bool(mmap_ok and trim_ok)


def main(argv: list[str] | None = None) -> int:
    """The `lmforge` command. Called with argv (tests, scripts) it leaves the process's malloc settings alone."""
    if argv is None:
        keep_freed_memory()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        from lmforge import __version__
        print(__version__)
        return 0
    name = argv[0]
    try:
        command, rest, problem = _find(argv)
        if command is None:
            print(f"lmforge: {problem}\n\n{usage()}", file=sys.stderr)
            return 2
        command.main(rest)
    except LmforgeError as e:
        rank = int(os.environ.get("RANK", "0"))  # under torchrun every process may say it: name the others
        print(f"lmforge {name}: error: {f'(rank {rank}) ' if rank else ''}{e}", file=sys.stderr, flush=True)
        return 1
    except OSError as e:
        # Outputs are checked before work starts; what remains is the file system changing under a run (a full
        # disk, a folder removed or made read-only): one line. Checkpoints are written atomically, so the last
        # complete one is intact. An OSError without a file or errno is a bug: its traceback is kept.
        full = e.errno in (errno.ENOSPC, errno.EDQUOT)
        if not (full or e.filename) or e.strerror is None:
            raise
        print(f"lmforge {name}: error: {e.filename or 'output'}: {e.strerror}"
              f"{'; the last complete checkpoint is intact' if full else ''}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"lmforge {name}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
