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
    assert "config key 'out': cannot write in" in err and len(err.splitlines()) == 1
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
