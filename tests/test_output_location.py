"""Unwritable, missing or full output locations: a clear error before training where it can be seen coming, and
a full disk in the middle of a save leaves the previous checkpoint intact with one line of explanation. The full
disk is real where this machine lets us mount a small tmpfs (root, as in CI), else simulated with the errno."""

import errno
import subprocess

import pytest
import torch

from lmforge.checkpoint import load_model, save_checkpoint
from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.model import Transformer
from tests.conftest import tiny_config


def _mount_tmpfs(path, size_kb, read_only=False) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size_kb}k" + (",ro" if read_only else "")
    return subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True).returncode == 0


@pytest.fixture
def mounts():
    mounted = []

    def mount(path, size_kb, read_only=False):
        ok = _mount_tmpfs(path, size_kb, read_only)
        if ok:
            mounted.append(path)
        return ok

    yield mount
    for path in mounted:
        subprocess.run(["umount", str(path)], capture_output=True)


@pytest.fixture(scope="module")
def sft_inputs(tok, tmp_path_factory):
    import json

    from tests.conftest import tiny_sft_policy

    root = tmp_path_factory.mktemp("sft_inputs")
    save_checkpoint(root / "init", tiny_sft_policy(tok), tok)
    (root / "sft.jsonl").write_text("".join(json.dumps({"instruction": f"say {i}", "output": "the fox"}) + "\n"
                                            for i in range(8)))
    return root


def _sft(inputs, out) -> int:
    return main(["sft", "--init", str(inputs / "init"), "--data", str(inputs / "sft.jsonl"), "--out", str(out),
                 "optim.max_steps=2", "optim.warmup_steps=1", "batch_size=2", "eval_every=0", "device=cpu"])


def test_an_output_that_cannot_be_written_fails_before_training(sft_inputs, tmp_path, capsys, mounts):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert _sft(sft_inputs, blocker / "run") == 1
    err = capsys.readouterr().err.strip()
    assert err == f"lmforge sft: error: config key 'out': {blocker / 'run'}: cannot write in {blocker} (not a directory)"
    if mounts(tmp_path / "ro", 1024, read_only=True):
        assert _sft(sft_inputs, tmp_path / "ro" / "run") == 1
        err = capsys.readouterr().err.strip()
        assert "cannot write in" in err and "Read-only file system" in err and len(err.splitlines()) == 1


def test_too_little_free_space_fails_before_training(sft_inputs, tmp_path, capsys, mounts, monkeypatch):
    out = tmp_path / "small" / "run"
    if not mounts(tmp_path / "small", 256):  # 256 kB: less than two checkpoints of the tiny model
        import shutil
        from collections import namedtuple

        usage = namedtuple("usage", "total used free")
        monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(1 << 18, 0, 1 << 18))
    assert _sft(sft_inputs, out) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "MiB free, but saving this run's checkpoints needs about" in err
    assert not out.exists()


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(tok, tmp_path, mounts, monkeypatch):
    model = Transformer(tiny_config(tok.vocab_size))
    size_kb = 4096
    disk = tmp_path / "disk"
    real = mounts(disk, size_kb)
    if not real:
        disk.mkdir(exist_ok=True)
    out = disk / "ck"
    save_checkpoint(out, model, tok, {"step": 1}, {"step": 1})
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    if real:  # fill the disk: the next save runs out of space for real
        filler = disk / "filler"
        with open(filler, "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
            except OSError as e:
                assert e.errno == errno.ENOSPC
    else:
        import lmforge.checkpoint as ck

        def no_space(*a, **kw):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(ck, "save_file", no_space)
    with pytest.raises(LmforgeError, match="could not write the checkpoint .*[Nn]o space left.*previous checkpoint"):
        save_checkpoint(out, model, tok, {"step": 2}, {"step": 2})
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before  # untouched
    assert [p.name for p in disk.iterdir() if p.name.startswith(".")] == []  # no half-written sibling left
    if real:
        (disk / "filler").unlink()
    loaded, _, meta = load_model(out)  # the manifest still verifies
    assert meta["step"] == 1


@pytest.fixture(scope="module")
def inputs(tok, corpus_file, tmp_path_factory):
    """Valid inputs for every command that writes something, so only the output location can be at fault."""
    import json

    root = tmp_path_factory.mktemp("cmd_inputs")
    tok.save(root / "tok")
    save_checkpoint(root / "policy", Transformer(tiny_config(tok.vocab_size)), tok, meta={"stage": "sft"})
    save_checkpoint(root / "rm", Transformer(tiny_config(tok.vocab_size), head="scalar"), tok,
                    meta={"stage": "rm", "reward_mean": 0.0, "reward_std": 1.0})
    assert main(["export", "hf", str(root / "policy"), "--out", str(root / "hf")]) == 0
    (root / "prompts.jsonl").write_text("".join(json.dumps({"instruction": f"Say {w}."}) + "\n"
                                                for w in ("hi", "yes", "no", "ok")))
    (root / "candidates.jsonl").write_text(json.dumps({"input": "Say hi.", "candidates": ["hi", "hello"]}) + "\n")
    (root / "ranked.jsonl").write_text("".join(json.dumps({"input": f"Say {w}.", "choices": [
        {"text": w, "rank": 1}, {"text": "no", "rank": 2}]}) + "\n" for w in ("hi", "yes", "ok", "fine", "sure")))
    return root


def _commands(i, corpus, out):
    """Every command that writes an output, with `out` as its output; whether `out` should be a file or a dir."""
    policy, rm, prompts, ranked = (str(i / n) for n in ("policy", "rm", "prompts.jsonl", "ranked.jsonl"))
    judge = ["--judge", "openai", "judge.url=http://127.0.0.1:9/v1", "judge.model=m"]  # never asked
    return {
        "tokenizer": ("dir", ["tokenizer", "train", "--input", str(corpus), "--vocab-size", "300", "--out", out]),
        "data": ("dir", ["data", "prepare", "--input", str(corpus), "--tokenizer", str(i / "tok"), "--out", out]),
        "world": ("dir", ["world", "--preset", "tiny", "--out", out]),
        "rm": ("dir", ["rm", "train", "--init", policy, "--data", ranked, "--out", out, "optim.max_steps=2"]),
        "ppo": ("dir", ["ppo", "--sft-model", policy, "--reward-model", rm, "--prompts", prompts, "--out", out,
                        "iterations=1", "batch_size=2", "minibatch_size=2", "micro_batch_size=2", "max_new_tokens=8"]),
        "run": ("dir", ["run", "--preset", "tiny", "--out", out]),
        "export": ("dir", ["export", "hf", policy, "--out", out]),
        "import": ("dir", ["import", "hf", str(i / "hf"), "--out", out]),
        "report": ("dir", ["report", "--run", out]),
        "sample": ("file", ["sample", "--model", policy, "--prompts", prompts, "--out", out, "k=2",
                            "max_new_tokens=2"]),
        "label": ("file", ["label", "rank", "--input", str(i / "candidates.jsonl"), "--out", out, *judge]),
        "rm score": ("file", ["rm", "score", "--model", rm, "--input", ranked, "--out", out]),
        "eval": ("file", ["eval", "--policies", f"a={policy}", "--prompts", prompts, "--out", out, *judge]),
    }


@pytest.mark.parametrize("name", ["tokenizer", "data", "world", "rm", "ppo", "run", "export", "import", "report",
                                  "sample", "label", "rm score", "eval"])
def test_every_command_refuses_an_unusable_output_in_one_line_before_working(inputs, corpus_file, tmp_path,
                                                                             capsys, mounts, name):
    def refused(out, *needles):
        kind, argv = _commands(inputs, corpus_file, str(out))[name]
        assert main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"lmforge {name.split()[0]}: error: ") and len(err.splitlines()) == 1, err
        assert all(n in err for n in needles), err
        return kind

    a_file = tmp_path / "a-file"
    a_file.write_text("keep me")
    a_dir = tmp_path / "a-dir"
    (a_dir / "sub").mkdir(parents=True)
    kind = _commands(inputs, corpus_file, "x")[name][0]
    if kind == "dir":  # a file where the output directory should be
        refused(a_file, str(a_file), "not a directory")
        assert a_file.read_text() == "keep me"
    else:  # a directory where the output file should be
        refused(a_dir, str(a_dir), "is a directory")
        assert [p.name for p in a_dir.iterdir()] == ["sub"]
    refused(a_file / "out", str(a_file), "not a directory")  # a file where a parent folder should be
    if name != "report" and mounts(tmp_path / "ro", 1024, read_only=True):  # report: the run must exist
        refused(tmp_path / "ro" / "out", "Read-only file system")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["a-file", "a-dir"] + (["ro"] if (tmp_path / "ro").exists() else []))


def test_import_and_export_never_replace_a_directory_that_is_not_their_checkpoint(inputs, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "sft").mkdir(parents=True)
    (run / "report.md").write_text("results")
    assert main(["export", "hf", str(inputs / "policy"), "--out", str(run)]) == 1
    assert "is not empty and is not a checkpoint" in capsys.readouterr().err
    assert (run / "sft").is_dir() and (run / "report.md").read_text() == "results"  # a save would drop sft/
    out = tmp_path / "exported"
    assert main(["export", "hf", str(inputs / "policy"), "--out", str(out)]) == 0
    assert main(["export", "hf", str(inputs / "policy"), "--out", str(out)]) == 1
    assert "already holds a checkpoint; pass overwrite=true" in capsys.readouterr().err
    assert main(["export", "hf", str(inputs / "policy"), "--out", str(out), "overwrite=true"]) == 0
    assert main(["import", "hf", str(inputs / "hf"), "--out", str(out)]) == 1
    assert main(["import", "hf", str(inputs / "hf"), "--out", str(out), "overwrite=true"]) == 0
