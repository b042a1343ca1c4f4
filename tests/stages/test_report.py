"""The run report: report.json shape, report.md table, PNG plots from each stage's metrics.jsonl."""

import json
import math

import matplotlib.image
import pytest

from lmforge.stages.report import write_report
from lmforge.training import MetricsLogger

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

RESULTS = {
    "judge": "oracle",
    "policies": {
        "base": {"judge_score": 3.0, "win_rate_vs_sft": 0.05, "rm_score": -2.5, "kl_to_sft": 80.25, "mean_length": 64.0,
                 "parts": {"correctness": 0.0, "politeness": 1.5, "concision": 1.5}},
        "sft": {"judge_score": 41.5, "win_rate_vs_sft": 0.5, "rm_score": 0.0, "kl_to_sft": 0.0, "mean_length": 12.5,
                "parts": {"correctness": 30.0, "politeness": 5.5, "concision": 6.0},
                "examples": [{"prompt": "What is 2 | 3?", "response": "5", "judge_score": 0.0}]},
        "ppo": {"judge_score": 38.0, "win_rate_vs_sft": 0.45, "rm_score": 1.75, "kl_to_sft": 6.5, "mean_length": 30.0,
                "parts": {"correctness": 18.0, "politeness": 20.0, "concision": 0.0},
                "examples": [{"prompt": "What is 2 | 3?", "response": "3 3 3", "judge_score": 10.0}]},
    },
    # computed by the evaluation (a paired test over prompts); the report passes it through
    "reward_hacking": ["ppo"],
    "rm": {"heldout_accuracy": 0.8125, "margin": 1.5},
    "stages": {"pretrain": {"seconds": 12.0}, "sft": {"seconds": 5.5}, "rm": {"seconds": 3.0}, "ppo": {"seconds": 20.0}},
}


def _log(out, stage, rows):
    logger = MetricsLogger(out / stage)
    for step, metrics in rows:
        logger.log(step, metrics)


@pytest.fixture
def run_dir(tmp_path):
    _log(tmp_path, "pretrain", [(s, {"loss": 6.0 - 0.05 * s, "lr": 1e-3}) for s in range(1, 60)]
         + [(60, {"loss": 3.0, "val_loss": 3.2})])
    _log(tmp_path, "sft", [(s, {"loss": 2.0 - 0.1 * s}) for s in range(1, 10)] + [(10, {"loss": 1.0, "val_loss": 1.1})])
    _log(tmp_path, "rm", [(s, {"loss": 0.69 - 0.02 * s, "accuracy": 0.5 + 0.03 * s}) for s in range(1, 10)]
         + [(10, {"loss": 0.5, "val_accuracy": 0.81})])
    _log(tmp_path, "ppo", [(s, {"rm_score": 0.2 * s, "kl": 0.5 * s, "policy_loss": 0.01}) for s in range(1, 8)])
    return tmp_path


def _check_png(path):
    assert path.read_bytes()[:8] == PNG_MAGIC
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300
    assert img[..., :3].std() > 0.05  # something is drawn, not a blank canvas


def test_report_json_shape_markdown_and_plots(run_dir):
    write_report(run_dir, RESULTS)
    rep = json.loads((run_dir / "report.json").read_text())
    assert rep["judge"] == "oracle"
    assert set(rep["policies"]) == {"base", "sft", "ppo"}
    for name, row in rep["policies"].items():
        for key in ("judge_score", "win_rate_vs_sft", "rm_score", "kl_to_sft", "mean_length", "parts"):
            assert row[key] == RESULTS["policies"][name][key]
    assert rep["rm"] == {"heldout_accuracy": 0.8125, "margin": 1.5}
    assert rep["stages"] == RESULTS["stages"]
    assert rep["reward_hacking"] == ["ppo"]  # RM score rose (0 -> 1.75) while the judge score fell (41.5 -> 38)
    for png in ("loss.png", "rm_accuracy.png", "ppo.png"):
        _check_png(run_dir / png)
    md = (run_dir / "report.md").read_text()
    assert "| ppo | 38.0 | -3.5 | 45.0% | 1.750 | 6.50 | 30.0 |" in md
    assert "| sft | 41.5 | +0.0 | 50.0% | 0.000 | 0.00 | 12.5 |" in md
    assert "| policy | oracle score (0-100) |" in md
    assert "| policy | correctness | politeness | concision |" in md and "| ppo | 18.0 | 20.0 | 0.0 |" in md
    assert "Held-out pairwise accuracy: 81.2%" in md
    assert "| ppo | 20.0 |" in md
    assert "**Reward hacking flagged:** ppo" in md
    assert "![PPO reward and KL](ppo.png)" in md and "![Training loss](loss.png)" in md
    assert "**Prompt:** What is 2 \\| 3?" in md and "- *ppo* (oracle 10): 3 3 3" in md


def test_report_skips_missing_stages_and_fills_unknowns_with_null(tmp_path):
    _log(tmp_path, "sft", [(1, {"loss": 2.0}), (2, {"loss": 1.5, "val_loss": 1.7})])
    write_report(tmp_path, {"policies": {"sft": {"judge_score": float("nan"), "mean_length": 3.0}},
                            "stages": {"sft": 1.5}})
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["judge"] == "oracle"
    assert rep["policies"] == {"sft": {"judge_score": None, "win_rate_vs_sft": None, "rm_score": None,
                                       "kl_to_sft": None, "mean_length": 3.0}}
    assert rep["rm"] == {"heldout_accuracy": None}
    assert rep["stages"] == {"sft": {"seconds": 1.5}}
    assert rep["reward_hacking"] == []
    _check_png(tmp_path / "loss.png")
    assert not (tmp_path / "ppo.png").exists() and not (tmp_path / "rm_accuracy.png").exists()
    md = (tmp_path / "report.md").read_text()
    assert "| sft | – | – | – | – | – | 3.0 |" in md and "ppo.png" not in md
    assert "Parts of the" not in md and "Reward hacking" not in md
    assert not any(isinstance(v, float) and math.isnan(v) for v in rep["policies"]["sft"].values())


def test_report_plots_only_the_given_stages_and_names_the_judge(run_dir):
    results = {**RESULTS, "judge": "openai"}
    write_report(run_dir, results, stages=["sft"])
    rep = json.loads((run_dir / "report.json").read_text())
    assert rep["judge"] == "openai"
    _check_png(run_dir / "loss.png")
    assert not (run_dir / "ppo.png").exists() and not (run_dir / "rm_accuracy.png").exists()
    md = (run_dir / "report.md").read_text()
    assert "| policy | openai score (0-100) |" in md and "Parts of the openai score:" in md
    assert "- *ppo* (openai 10): 3 3 3" in md and "ppo.png" not in md


def test_report_breaks_results_down_by_prompt_category_and_plots_grpo(run_dir):
    res = json.loads(json.dumps(RESULTS))
    res["policies"]["sft"]["by_category"] = {"facts": {"prompts": 4, "judge_score": 50.0, "correctness": 30.0},
                                             "arithmetic": {"prompts": 2, "judge_score": 40.0, "correctness": 15.5}}
    res["policies"]["grpo"] = {"judge_score": 60.0, "by_category": {"facts": {"prompts": 4, "judge_score": 70.0,
                                                                              "correctness": 45.25}}}
    _log(run_dir, "grpo", [(s, {"reward": 0.1 * s, "kl": 0.2 * s}) for s in range(1, 6)])
    write_report(run_dir, res)
    md = (run_dir / "report.md").read_text()
    assert "Correctness by prompt category" in md
    assert "| policy | arithmetic (2) | facts (4) |" in md
    assert "| sft | 15.5 | 30.0 |" in md and "| grpo | – | 45.2 |" in md
    assert "![GRPO reward and KL](grpo.png)" in md
    _check_png(run_dir / "grpo.png")


def test_the_wall_time_table_shows_each_training_stage_s_tokens_per_second_and_mfu(tmp_path):
    from lmforge.stages.report import ReportConfig, report_from_run

    _log(tmp_path, "pretrain", [(1, {"loss": 6.0, "tokens_per_s": 100.0, "mfu": 0.10}),  # warm-up: left out
                                (2, {"loss": 5.0, "tokens_per_s": 1000.0, "mfu": 0.40}),
                                (3, {"loss": 4.0, "tokens_per_s": 3000.0, "mfu": 0.60}),
                                (4, {"loss": 3.5, "tokens_per_s": 2000.0, "mfu": 0.50})])
    _log(tmp_path, "ppo", [(1, {"rollout_tokens_per_s": 50.0}), (2, {"rollout_tokens_per_s": 700.0})])
    for stage, secs in (("pretrain", 12.0), ("ppo", 4.0), ("label", 0.5)):
        (tmp_path / stage).mkdir(exist_ok=True)
        (tmp_path / stage / "stage.json").write_text(json.dumps({"fingerprint": "x", "seconds": secs, "summary": {}}))
    report_from_run(ReportConfig(run=str(tmp_path)))
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["stages"]["pretrain"] == {"seconds": 12.0, "tokens_per_s": 2000.0, "mfu": 0.5}  # medians of steps 2-4
    assert rep["stages"]["ppo"] == {"seconds": 4.0, "tokens_per_s": 700.0, "mfu": None, "rollout": True}
    md = (tmp_path / "report.md").read_text()
    assert "| stage | seconds | tokens/s | MFU |" in md
    assert "| pretrain | 12.0 | 2,000 | 50% |" in md and "| ppo | 4.0 | 700 (rollout) | – |" in md
    assert "| label | 0.5 | – | – |" in md
    wall = md[md.index("## Wall time"):]
    assert wall.index("| pretrain |") < wall.index("| label |") < wall.index("| ppo |")  # run order, not by name
