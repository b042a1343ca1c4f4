"""kill -9 anywhere: pretraining, SFT, reward-model training and PPO killed in the middle of a checkpoint save (held
there by the LMFORGE_TEST_SAVE_DELAY fault hook, at the moment the previous checkpoint is renamed aside) and again
at a random step, each time continued with --resume, end with weights equal bit for bit to an uninterrupted run's;
a half-written checkpoint is never taken for a finished one. Ctrl-C or SIGTERM (SFT, PPO, GRPO) finishes the step,
saves a checkpoint that --resume continues, and exits 130.

Every run is a subprocess, references included: a run inside pytest's process differs in the last bits (~6e-7)."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from lmforge.checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_training_state

# One torch thread, as in pytest's own process (conftest): with a busy second core, two threads make these tiny
# runs several times slower. References and interrupted runs alike, so the comparisons stay like for like.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SAVE_DELAY = {**ENV, "LMFORGE_TEST_SAVE_DELAY": "0.2"}  # every save waits 0.2 s between its two renames


@pytest.fixture(scope="module")
def inputs(tok, corpus_file, tmp_path_factory):
    """Tiny inputs of every stage (tests.conftest.write_stage_inputs)."""
    from tests.conftest import write_stage_inputs

    return write_stage_inputs(tmp_path_factory.mktemp("crash_inputs"), tok, corpus_file)


# One short run per stage (a few seconds on a CPU, a metrics line per step or iteration); _argv adds the rest.
STAGES = {
    "pretrain": lambda i: ["pretrain", "--data", i / "data", "model.hidden_size=32", "model.num_hidden_layers=2",
                           "model.num_attention_heads=4", "model.num_key_value_heads=2",
                           "model.max_position_embeddings=64", "batch_size=4", "seq_len=32", "optim.max_steps=16",
                           "optim.warmup_steps=2", "eval_every=0", "eval_batches=2", "log_every=1"],
    "sft": lambda i: ["sft", "--init", i / "init", "--data", i / "sft.jsonl", "optim.max_steps=40",
                      "optim.warmup_steps=2", "batch_size=4", "eval_every=0", "log_every=1"],
    "rm": lambda i: ["rm", "train", "--init", i / "init", "--data", i / "ranked.jsonl", "epochs=2", "batch_size=4",
                     "optim.warmup_steps=2", "log_every=1"],
    "ppo": lambda i: ["ppo", "--sft-model", i / "init", "--reward-model", i / "rm", "--prompts", i / "prompts.jsonl",
                      "iterations=20", "batch_size=4", "minibatch_size=2", "micro_batch_size=1", "max_new_tokens=6",
                      "actor_optim.lr=1e-3", "critic_optim.lr=1e-3"],
    "grpo": lambda i: ["grpo", "--sft-model", i / "init", "--reward-model", i / "rm", "--prompts",
                       i / "prompts.jsonl", "iterations=20", "prompts_per_iteration=2", "group_size=4",
                       "minibatch_size=8", "micro_batch_size=4", "max_new_tokens=6", "optim.lr=1e-3"],
}


def _argv(stage, inputs, out, *extra):
    return [sys.executable, "-m", "lmforge.cli", *map(str, STAGES[stage](inputs)), "--out", str(out),
            "save_every=2", "device=cpu", "seed=3", *extra]


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory):
    """reference(stage): the output directory of the stage's uninterrupted run (run once per module)."""
    runs = {}

    def get(stage):
        if stage not in runs:
            out = tmp_path_factory.mktemp(f"reference_{stage}") / "out"
            subprocess.run(_argv(stage, inputs, out), env=ENV, check=True, capture_output=True, timeout=600)
            runs[stage] = out
        return runs[stage]
    return get


def _steps(out):
    """The steps of the complete lines of OUT/metrics.jsonl so far ([] while a checkpoint swap hides it)."""
    try:
        text = (out / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line)["step"] for line in text.split("\n")[:-1]]  # the last piece: a line being written


def _start(argv, log, env=ENV):
    """A run in the background, its output in `log` (read when it ends too early)."""
    with log.open("w") as f:
        return subprocess.Popen(argv, env=env, stdout=f, stderr=subprocess.STDOUT)


def _wait_for(proc, log, condition, what):
    deadline = time.time() + 120
    while not condition():
        assert proc.poll() is None, f"the run ended before {what}:\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, f"never caught {what}"
        time.sleep(0.005)


def _kill(proc):
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)


def _assert_same_as(ref, out):
    """`out` ended as the uninterrupted `ref`: every checkpoint in it (PPO: the policy and OUT/critic) equal bit
    for bit, the same logged steps, and nothing half-written or renamed aside left beside or inside it."""
    left = [p for d in (out.parent, out) for p in d.iterdir()
            if p.name.startswith(".") and (p.name.endswith(".old") or ".tmp-" in p.name)]
    assert not left
    weights = lambda d: {f.parent.relative_to(d): load_file(str(f)) for f in d.rglob(WEIGHTS_FILE)}  # noqa: E731
    a, b = weights(ref), weights(out)
    assert a.keys() == b.keys()
    for sub in a:
        assert a[sub].keys() == b[sub].keys() and all(torch.equal(a[sub][k], b[sub][k]) for k in a[sub]), sub
    assert _steps(out) == _steps(ref)  # lines logged after the checkpoint a resume started from were trimmed


@pytest.mark.slow  # four processes per stage, ~20-30 s each on 2 cores
@pytest.mark.parametrize("stage", ["pretrain", "sft", "rm", "ppo"])
def test_sigkill_inside_a_save_and_anywhere_then_resume_is_bit_exact(stage, inputs, reference, tmp_path):
    ref, out, old = reference(stage), tmp_path / "run", tmp_path / ".run.old"
    proc = _start(_argv(stage, inputs, out), tmp_path / "1.log", SAVE_DELAY)
    _wait_for(proc, tmp_path / "1.log", lambda: (old / CONFIG_FILE).is_file() and not out.exists(),
              "a save with the previous checkpoint renamed aside")
    _kill(proc)
    assert not out.exists() and (old / CONFIG_FILE).is_file()  # killed between the two renames: the worst moment

    # --resume puts the previous checkpoint back and continues; kill it again at a random moment of its training:
    # at most 0.15 s after a random step at least three before the end. Its saves are held 0.2 s again, so at least
    # two (one between, and the last) stand between that step and the end: the kill always lands inside training.
    saved_aside, target = _steps(old)[-1], random.randint(_steps(old)[-1] + 1, _steps(ref)[-1] - 3)
    print(f"killed inside the save of step {saved_aside}, then after step {target}")  # shown if the test fails
    proc = _start(_argv(stage, inputs, out, "--resume"), tmp_path / "2.log", SAVE_DELAY)
    _wait_for(proc, tmp_path / "2.log", lambda: max(_steps(out), default=0) >= target, f"step {target}")
    time.sleep(random.uniform(0.0, 0.15))
    assert proc.poll() is None
    _kill(proc)

    done = subprocess.run(_argv(stage, inputs, out, "--resume"), env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    _assert_same_as(ref, out)


def test_ppo_killed_inside_its_last_critic_save_resumes_to_the_same_critic(inputs, reference, tmp_path):
    """PPO saves the policy at OUT, then the critic at OUT/critic (a second atomic save). Killed inside the last
    iteration's critic save, the final policy is in place but the critic is half-written: --resume has no iteration
    left to run and must still write the critic (from training_state.pt) and remove the half-written one."""
    ref, out = reference("ppo"), tmp_path / "run"
    last = _steps(ref)[-1]
    proc = _start(_argv("ppo", inputs, out), tmp_path / "1.log", SAVE_DELAY)
    _wait_for(proc, tmp_path / "1.log", lambda: _steps(out)[-1:] == [last] and list(out.glob(".critic.tmp-*")),
              "the last iteration's critic save")
    _kill(proc)
    assert not (out / "critic").exists() and json.loads((out / CONFIG_FILE).read_text())["lmforge"]["iteration"] == last

    done = subprocess.run(_argv("ppo", inputs, out, "--resume"), env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    _assert_same_as(ref, out)


@pytest.mark.parametrize("stage", ["pretrain", "sft", "rm", "ppo"])
def test_killed_after_its_last_checkpoint_resume_ends_as_the_uninterrupted_run(stage, inputs, reference, tmp_path):
    """A kill after the last checkpoint and the last log line, before run.json (written last, atomically) marks the
    run finished. What it leaves is the finished run without run.json: --resume must finish it as it was, with
    nothing trained or logged twice."""
    ref, out = reference(stage), tmp_path / "run"
    shutil.copytree(ref, out)
    (out / "run.json").unlink()
    done = subprocess.run(_argv(stage, inputs, out, "--resume"), env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    _assert_same_as(ref, out)


# pretrain as shipped (configs/pretrain_tiny.yaml: save_every 0) once deleted hundreds of steps on Ctrl-C
@pytest.mark.parametrize("stage, sig", [("sft", signal.SIGINT), ("sft", signal.SIGTERM), ("pretrain", signal.SIGINT)])
def test_ctrl_c_or_sigterm_saves_a_resumable_checkpoint(stage, inputs, tmp_path, sig):
    out = tmp_path / "run"
    long = ("optim.max_steps=2000", "save_every=0")
    proc = subprocess.Popen(_argv(stage, inputs, out, *long), env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while len(_steps(out)) < 3:
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "continue with --resume" in stdout and f"lmforge {stage}: interrupted" in stderr and "Traceback" not in stderr
    step = int(stdout.split("stopped at step ")[1].split()[0])
    state = json.loads((out / "config.json").read_text())["lmforge"]
    assert state["step"] == step >= 3  # hundreds of steps are never thrown away: the work so far is saved
    done = subprocess.run(_argv(stage, inputs, out, *long, f"stop_step={step + 2}", "--resume"), env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "config.json").read_text())["lmforge"]["step"] == step + 2


@pytest.mark.parametrize("stage, sig", [("ppo", signal.SIGINT), ("grpo", signal.SIGTERM)])
def test_ctrl_c_or_sigterm_during_rl_saves_a_resumable_checkpoint(stage, sig, inputs, tmp_path):
    """PPO and GRPO run their own iteration loops: a signal finishes the iteration, saves it and exits 130."""
    out = tmp_path / "run"
    long = ("iterations=2000", "save_every=0")
    proc = subprocess.Popen(_argv(stage, inputs, out, *long), env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while len(_steps(out)) < 3:
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "continue with --resume" in stdout and f"lmforge {stage}: interrupted" in stderr
    assert "Traceback" not in stderr
    it = int(stdout.split("stopped at iteration ")[1].split()[0])
    assert f"({signal.Signals(sig).name})" in stdout
    # the policy (and PPO's critic) saved at the printed iteration, with the state a resume needs
    saved = {str(f.parent.relative_to(out)): json.loads(f.read_text())["lmforge"]["iteration"]
             for f in out.rglob(CONFIG_FILE)}
    assert saved == ({".": it, "critic": it} if stage == "ppo" else {".": it}) and it >= 3
    assert load_training_state(out)["iteration"] == it
    done = subprocess.run(_argv(stage, inputs, out, *long, f"iterations={it + 2}", "--resume"),
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert _steps(out) == list(range(1, it + 3))  # continued after `it`: nothing lost, nothing done twice
