"""`lmforge run`: the tiny preset end to end, stage skipping, --from, and bad configs failing before training."""

import json

import pytest

from lmforge.cli import main

STAGE_DIRS = ["world", "tokenizer", "data", "pretrain", "sft", "sample", "label", "rm", "ppo", "eval"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "tiny"
    assert main(["run", "--preset", "tiny", "--out", str(out)]) == 0
    return out


def test_tiny_preset_runs_every_stage_and_writes_the_report(tiny_run):
    for stage in STAGE_DIRS:
        marker = json.loads((tiny_run / stage / "stage.json").read_text())
        assert marker["seconds"] >= 0 and marker["fingerprint"]
    for model_stage in ("pretrain", "sft", "rm", "ppo"):
        assert (tiny_run / model_stage / "model.safetensors").is_file()
    ranked = [json.loads(line) for line in (tiny_run / "label" / "ranked.jsonl").read_text().splitlines()]
    assert ranked and all({"input", "choices"} <= set(r) and len(r["choices"]) == 4 for r in ranked)
    rep = json.loads((tiny_run / "report.json").read_text())
    assert set(rep["policies"]) == {"base", "sft", "ppo"}
    for row in rep["policies"].values():
        assert {"oracle_score", "win_rate_vs_sft", "rm_score", "kl_to_sft", "mean_length"} <= set(row)
        assert 0 <= row["oracle_score"] <= 100 and 0 <= row["win_rate_vs_sft"] <= 1
    assert rep["policies"]["sft"]["win_rate_vs_sft"] == 0.5 and rep["policies"]["sft"]["kl_to_sft"] == 0
    assert 0 <= rep["rm"]["heldout_accuracy"] <= 1
    assert set(STAGE_DIRS) <= set(rep["stages"])
    md = (tiny_run / "report.md").read_text()
    assert "oracle" in md.lower() and (tiny_run / "loss.png").is_file()


def test_rerun_skips_finished_stages_and_from_reruns(tiny_run, capsys):
    capsys.readouterr()
    assert main(["run", "--preset", "tiny", "--out", str(tiny_run)]) == 0
    out = capsys.readouterr().out
    assert all(f"{s}: up to date, skipped" in out for s in STAGE_DIRS)
    assert main(["run", "--preset", "tiny", "--out", str(tiny_run), "--from", "eval"]) == 0
    out = capsys.readouterr().out
    assert "ppo: up to date, skipped" in out and "eval: done" in out


def test_changed_stage_config_reruns_it_and_downstream(tiny_run, capsys):
    capsys.readouterr()
    assert main(["run", "--preset", "tiny", "--out", str(tiny_run), "ppo.iterations=2"]) == 0
    out = capsys.readouterr().out
    assert "rm: up to date, skipped" in out and "ppo: done" in out and "eval: done" in out


@pytest.mark.parametrize("args, message", [
    (["--from", "dpo"], "unknown stage 'dpo'"),
    (["sources.sft=/nonexistent/sft.jsonl", "sources.corpus=/nonexistent/c.txt"], "file not found"),
    (["ppo.no_such_key=1"], "unknown config key 'no_such_key'"),
    (["pretrain.seq_len=100000"], "seq_len"),
    (["ppo.minibatch_size=7"], "minibatch_size"),
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
    assert "tokenizer mismatch" in capsys.readouterr().err
    assert not out.exists()
