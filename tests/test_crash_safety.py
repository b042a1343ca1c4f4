"""kill -9 anywhere: SFT training killed in the middle of a checkpoint save (held there by the
LMFORGE_TEST_SAVE_DELAY fault hook, at the moment the previous checkpoint is renamed aside) and again at a random
moment, each time continued with --resume, ends with weights equal bit for bit to an uninterrupted run's; a
half-written checkpoint is never taken for a finished one."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from lmforge.checkpoint import save_checkpoint


@pytest.fixture(scope="module")
def sft_inputs(tok, tmp_path_factory):
    from tests.conftest import tiny_sft_policy

    root = tmp_path_factory.mktemp("crash_inputs")
    save_checkpoint(root / "init", tiny_sft_policy(tok), tok)
    words = "the quick brown fox jumps over the lazy dog".split()
    (root / "sft.jsonl").write_text("".join(
        json.dumps({"instruction": f"say {i}", "output": " ".join(words[i % 5:i % 5 + 3])}) + "\n" for i in range(32)))
    return root


def _argv(inputs, out, *extra):
    return [sys.executable, "-m", "lmforge.cli", "sft", "--init", str(inputs / "init"), "--data",
            str(inputs / "sft.jsonl"), "--out", str(out), "optim.max_steps=40", "optim.warmup_steps=2",
            "batch_size=4", "save_every=2", "eval_every=0", "device=cpu", "seed=3", *extra]


def _weights(out):
    return load_file(str(out / "model.safetensors"))


def test_sigkill_inside_a_save_and_anywhere_then_resume_is_bit_exact(sft_inputs, tmp_path):
    ref = tmp_path / "ref"
    subprocess.run(_argv(sft_inputs, ref), check=True, capture_output=True, timeout=600)

    out = tmp_path / "run"
    env = {**os.environ, "LMFORGE_TEST_SAVE_DELAY": "0.3"}
    proc = subprocess.Popen(_argv(sft_inputs, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    old = tmp_path / ".run.old"
    deadline = time.time() + 120
    while not ((old / "config.json").is_file() and not out.exists()):  # a save with a checkpoint renamed aside
        assert proc.poll() is None and time.time() < deadline, "never caught a save in progress"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert not out.exists() and (old / "config.json").is_file()  # killed between the two renames: the worst moment

    # --resume puts the previous checkpoint back and continues; kill it again at a random moment
    proc = subprocess.Popen(_argv(sft_inputs, out, "--resume"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(random.uniform(2.0, 4.0))
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)

    done = subprocess.run(_argv(sft_inputs, out, "--resume"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert not old.exists() and not list(tmp_path.glob(".run.tmp-*"))
    a, b = _weights(ref), _weights(out)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)  # bit for bit
    steps = lambda d: [json.loads(x)["step"] for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert steps(out) == steps(ref)  # lines logged after the checkpoint a resume started from were trimmed


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_saves_a_resumable_checkpoint(sft_inputs, tmp_path, sig):
    out = tmp_path / "run"
    proc = subprocess.Popen(_argv(sft_inputs, out, "optim.max_steps=2000", "save_every=0", "log_every=1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not ((out / "metrics.jsonl").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "continue with --resume" in stdout and "lmforge sft: interrupted" in stderr and "Traceback" not in stderr
    step = int(stdout.split("stopped at step ")[1].split()[0])
    state = json.loads((out / "config.json").read_text())["lmforge"]
    assert state["step"] == step >= 3  # hundreds of steps are never thrown away: the work so far is saved
    done = subprocess.run(_argv(sft_inputs, out, "optim.max_steps=2000", "save_every=0", "log_every=1",
                                f"stop_step={step + 2}", "--resume"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "config.json").read_text())["lmforge"]["step"] == step + 2
