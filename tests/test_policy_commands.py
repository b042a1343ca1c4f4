"""Every command that generates text refuses a reward/value model or a masked-LM encoder with one line (their LM
head would be random, and the output garbage), instead of exiting 0 with nonsense."""

import json

import pytest

from lmforge.checkpoint import save_checkpoint
from lmforge.cli import main
from lmforge.model import Transformer
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def not_policies(tok, tmp_path_factory):
    root = tmp_path_factory.mktemp("not_policies")
    save_checkpoint(root / "rm", Transformer(tiny_config(tok.vocab_size), head="scalar"), tok, meta={"stage": "rm"})
    save_checkpoint(root / "mlm", Transformer(tiny_config(tok.vocab_size, causal=False)), tok)
    (root / "prompts.jsonl").write_text(json.dumps({"instruction": "Say hi."}) + "\n")
    return root


@pytest.mark.parametrize("kind, needle", [("rm", "is a reward/value model (scalar head)"),
                                          ("mlm", "is a bidirectional encoder")])
def test_text_generating_commands_refuse_non_policies(not_policies, kind, needle, capsys):
    model, prompts = str(not_policies / kind), str(not_policies / "prompts.jsonl")
    commands = {"generate": ["generate", "--model", model, "--prompt", "The library"],
                "sample": ["sample", "--model", model, "--prompts", prompts, "--out", str(not_policies / "c.jsonl")],
                "chat": ["chat", "--model", model],
                "eval": ["eval", "--policies", f"x={model}", "--prompts", prompts, "--judge", "openai",
                         "judge.url=http://127.0.0.1:9/v1", "judge.model=m"],
                "serve": ["serve", "--model", model, "engine_process=false"]}
    for name, argv in commands.items():
        assert main(argv) == 1, name
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"lmforge {name}: error: {model} {needle}") and len(err.splitlines()) == 1, err
    assert not (not_policies / "c.jsonl").exists()
