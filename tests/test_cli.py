"""The command grammar: help text shows each recipe's own defaults; key=value overrides may follow any flag."""

from lmforge.cli import key_help, main
from lmforge.stages.ppo import PPOConfig


def test_help_shows_the_defaults_a_recipe_gives_its_nested_sections():
    lines = key_help(PPOConfig)
    lr = next(line for line in lines if line.strip().startswith("actor_optim.lr "))
    eps = next(line for line in lines if line.strip().startswith("actor_optim.eps "))
    assert "[1e-05]" in lr and "[1e-05]" in eps  # PPO's optimizer, not OptimConfig's own lr 1e-3 / eps 1e-8


def test_overrides_may_follow_resume_and_flags(tmp_path, capsys):
    argv = ["ppo", "--resume", "sft_model=a", "--prompts", "p.jsonl", "iterations=7", "--print-config"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "iterations: 7" in out and "sft_model: a" in out and "prompts: p.jsonl" in out


def test_a_list_flag_does_not_swallow_the_overrides_after_it(capsys):
    assert main(["run", "--print-config", "--branches", "ppo", "grpo", "out=/tmp/lmforge-x", "seed=3"]) == 0
    out = capsys.readouterr().out
    assert "branches:\n- ppo\n- grpo\n" in out and "out: /tmp/lmforge-x" in out and "seed: 3" in out


def test_a_list_flag_keeps_values_that_only_look_like_overrides(capsys):
    argv = ["eval", "--policies", "sft=runs/sft", "ppo=runs/ppo", "max_new_tokens=9", "--prompts", "p.jsonl",
            "--print-config"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "policies:\n- sft=runs/sft\n- ppo=runs/ppo\n" in out and "max_new_tokens: 9" in out


def _page_faults_of_reused_buffers(keep: bool, env: dict | None = None) -> tuple[bool, int]:
    """(keep_freed_memory() applied, minor page faults of 50 float64 cumulative sums over 32 rows x ~4096 logits,
    whose temporaries of ~1 MB vary in size and are freed at once, as a step's often do) in a fresh process."""
    import json
    import os
    import subprocess
    import sys

    code = f"""
import json, resource, torch
from lmforge.cli import keep_freed_memory
applied = keep_freed_memory() if {keep} else False
cdf = lambda i: torch.ones(32, 4096 + 64 * (i % 8), dtype=torch.float64).cumsum(-1)
for i in range(8):  # the first calls may fault in any case
    cdf(i)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(50):
    cdf(i)
print(json.dumps([applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before]))
"""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "LD_PRELOAD")} | (env or {})
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    return tuple(json.loads(out))


def test_keep_freed_memory_stops_page_faults_on_reused_buffers():
    import platform

    import pytest

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc's malloc only")
    baseline = _page_faults_of_reused_buffers(keep=False)[1]
    if baseline < 50 * 20:  # glibc's default faults 30-200 pages a call here; elsewhere nothing to show
        pytest.skip(f"glibc's default malloc faulted only {baseline} pages in 50 calls")
    applied, faults = _page_faults_of_reused_buffers(keep=True)
    assert applied and faults < 50 * 5  # the freed blocks are reused: a few fresh pages at most
    for user_tuning in ({"MALLOC_TRIM_THRESHOLD_": "131072"}, {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"}):
        assert _page_faults_of_reused_buffers(keep=True, env=user_tuning)[0] is False  # the user's settings win
