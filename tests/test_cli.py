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
