"""The run report: OUT/report.md with plots read from each stage's metrics.jsonl, and OUT/report.json.

The table follows InstructGPT's comparisons (Ouyang et al. 2022, figure 1 and section 4): each policy's
judged quality (here the oracle's 0..100 score and win rate against SFT), the reward model's opinion, the
KL distance from the SFT policy, and response length (a classic symptom of reward over-optimisation).

report.json is shaped
    {"judge": name, "policies": {name: {"judge_score", "win_rate_vs_sft", "rm_score", "kl_to_sft", "mean_length",
     "parts"}}, "reward_hacking": [names], "rm": {"heldout_accuracy"}, "stages": {stage: {"seconds"}}}
plus whatever else the caller passed (missing numbers are null). `lmforge report --run DIR` rebuilds it from a
run directory: the evaluation's results.json and each stage's stage.json (its summary and wall time).
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.figure import (
    Figure,  # object API: no pyplot global state, renders with Agg
)

from lmforge.cli import Command, Flag
from lmforge.errors import ConfigError, LmforgeError
from lmforge.rundir import check_output_dir
from lmforge.stage import Stage, StageContext
from lmforge.training import read_metrics

POLICY_KEYS = ("judge_score", "win_rate_vs_sft", "rm_score", "kl_to_sft", "mean_length")
PPO_REWARD_KEYS = ("rm_score", "score", "reward")


def _clean(x):
    """JSON-safe copy: non-finite floats become null (strict JSON has no NaN)."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def report_json(results: dict) -> dict:
    """`results` with the report's required keys filled in (null where unknown)."""
    rep = _clean(copy.deepcopy(results))
    rep.setdefault("policies", {})
    for row in rep["policies"].values():
        for k in POLICY_KEYS:
            row.setdefault(k, None)
    rep["rm"] = rep.get("rm") or {}
    rep["rm"].setdefault("heldout_accuracy", None)
    rep["stages"] = {s: ({"seconds": v} if not isinstance(v, dict) else {"seconds": None, **v})
                     for s, v in (rep.get("stages") or {}).items()}
    rep.setdefault("reward_hacking", [])
    rep.setdefault("judge", "oracle")
    return rep


def _series(records: list[dict], key: str, x_key: str = "step") -> tuple[list, list]:
    pts = [(r.get(x_key, i), r[key]) for i, r in enumerate(records)
           if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [p[0] for p in pts], [p[1] for p in pts]


def _ema(ys: list[float], alpha: float = 0.1) -> list[float]:
    out, m = [], None
    for y in ys:
        m = y if m is None else (1 - alpha) * m + alpha * y
        out.append(m)
    return out


def _plot_keys(ax, records: list[dict], keys: list[str], title: str, ylabel: str) -> bool:
    """Plot each key of `keys` present in `records` on `ax` (raw, plus a smoothed line when noisy)."""
    drew = False
    for key in keys:
        xs, ys = _series(records, key)
        if not xs:
            continue
        drew = True
        val = key.startswith("val")
        if len(xs) > 30 and not val:
            (line,) = ax.plot(xs, ys, alpha=0.25, lw=1)
            ax.plot(xs, _ema(ys), color=line.get_color(), lw=1.8, label=f"{key} (EMA)")
        else:
            ax.plot(xs, ys, marker="o" if val or len(xs) < 30 else None, ms=3, lw=1.5, label=key)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if drew:
        ax.legend(fontsize=8)
    return drew


def _save(fig: Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_losses(metrics: dict[str, list[dict]], path: Path) -> bool:
    """One panel per stage with a loss (train and validation). False when no stage logged one."""
    stages = [s for s in metrics if any(k in r for r in metrics[s] for k in ("loss", "val_loss"))]
    if not stages:
        return False
    fig = Figure(figsize=(4.2 * len(stages), 3.4))
    axes = fig.subplots(1, len(stages), squeeze=False)[0]
    for ax, s in zip(axes, stages):
        _plot_keys(ax, metrics[s], ["loss", "val_loss"], f"{s} loss", "loss")
    _save(fig, path)
    return True


def plot_rm_accuracy(records: list[dict], path: Path) -> bool:
    """Reward-model accuracy (validation first, any key with 'acc') per step."""
    keys = sorted({k for r in records for k in r if "acc" in k}, key=lambda k: (not k.startswith("val"), k))
    if not keys:
        return False
    fig = Figure(figsize=(5.5, 3.6))
    ax = fig.subplots()
    _plot_keys(ax, records, keys, "reward model: pairwise accuracy", "accuracy")
    ax.axhline(0.5, color="grey", ls=":", lw=1)  # chance
    _save(fig, path)
    return True


def plot_rl(records: list[dict], path: Path, method: str = "PPO") -> bool:
    """An RL stage's reward (whichever of rm_score / score / reward exist) and KL to the reference, per
    iteration (PPO, GRPO)."""
    reward_keys = [k for k in PPO_REWARD_KEYS if any(k in r for r in records)]
    kl_keys = [k for k in ("kl",) if any(k in r for r in records)]
    panels = [(reward_keys, f"{method}: reward", "reward"), (kl_keys, f"{method}: KL to reference (per sequence)", "KL")]
    panels = [p for p in panels if p[0]]
    if not panels:
        return False
    fig = Figure(figsize=(5.0 * len(panels), 3.6))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (keys, title, ylabel) in zip(axes, panels):
        _plot_keys(ax, records, keys, title, ylabel)
        ax.set_xlabel("iteration")
    _save(fig, path)
    return True


def _fmt(v, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def render_markdown(rep: dict, plots: list[tuple[str, str]]) -> str:
    """report.md text from the report dict and (title, png file) pairs."""
    lines = ["# lmforge run report", ""]
    pol = rep["policies"]
    if pol:
        judge = rep["judge"]
        lines += ["## Policies on held-out prompts", "",
                  f"| policy | {judge} score (0-100) | vs SFT (points) | win rate vs SFT | RM score | KL to SFT (nats) "
                  "| mean length (tokens) |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        sft = (pol.get("sft") or {}).get("judge_score")
        for name, r in pol.items():
            win = "–" if r["win_rate_vs_sft"] is None else f"{100 * r['win_rate_vs_sft']:.1f}%"
            gain = None if sft is None or r["judge_score"] is None else r["judge_score"] - sft
            lines.append(f"| {name} | {_fmt(r['judge_score'], '.1f')} | {_fmt(gain, '+.1f')} | {win} | "
                         f"{_fmt(r['rm_score'], '.3f')} | {_fmt(r['kl_to_sft'], '.2f')} | {_fmt(r['mean_length'], '.1f')} |")
        method = rep.get("win_method") or f"the {judge} judge's scores of the two answers"
        lines += ["", f"Win rate: per prompt, each policy's response against the SFT policy's, judged by {method} "
                      "(ties count half). KL: mean per-sequence sum of log pi - log pi_SFT on temperature-1 "
                      "samples.", ""]
        parts = {n: r["parts"] for n, r in pol.items() if r.get("parts")}
        if parts:
            keys = list(next(iter(parts.values())))
            lines += [f"Parts of the {judge} score:", "", "| policy | " + " | ".join(keys) + " |",
                      "|---|" + "---:|" * len(keys)]
            lines += [f"| {n} | " + " | ".join(_fmt(p.get(k), ".1f") for k in keys) + " |" for n, p in parts.items()]
            lines.append("")
        cats = {n: r["by_category"] for n, r in pol.items() if r.get("by_category")}
        if cats:
            names = sorted({c for by in cats.values() for c in by})
            counts = {c: next(by[c]["prompts"] for by in cats.values() if c in by) for c in names}
            part = "correctness" if all("correctness" in by[c] for by in cats.values() for c in by) else "judge_score"
            lines += [f"{part.replace('_', ' ').capitalize()} by prompt category (prompts per category in brackets):",
                      "", "| policy | " + " | ".join(f"{c} ({counts[c]})" for c in names) + " |",
                      "|---|" + "---:|" * len(names)]
            lines += [f"| {n} | " + " | ".join(_fmt(by.get(c, {}).get(part), ".1f") for c in names) + " |"
                      for n, by in cats.items()]
            lines.append("")
    if rep.get("reward_hacking"):
        lines += [f"**Reward hacking flagged:** {', '.join(rep['reward_hacking'])} — the reward model's score rose "
                  f"above SFT while the {rep['judge']} score fell significantly below it (one-sided paired t-test "
                  "over the prompts, p < 0.05).", ""]
    acc = rep["rm"].get("heldout_accuracy")
    lines += ["## Reward model", "", f"Held-out pairwise accuracy: {_fmt(None if acc is None else 100 * acc, '.1f')}"
              + ("%" if acc is not None else ""), ""]
    if rep["stages"]:
        speeds = any("tokens_per_s" in v for v in rep["stages"].values())
        lines += ["## Wall time", ""]
        if speeds:
            lines += ["| stage | seconds | tokens/s | MFU |", "|---|---:|---:|---:|"]
            for s, v in rep["stages"].items():
                tok_s = f"{v['tokens_per_s']:,.0f}" + (" (rollout)" if v.get("rollout") else "") \
                    if v.get("tokens_per_s") is not None else "–"
                mfu = f"{100 * v['mfu']:.0f}%" if v.get("mfu") is not None else "–"
                lines.append(f"| {s} | {_fmt(v.get('seconds'), '.1f')} | {tok_s} | {mfu} |")
            lines += ["", "Tokens/s and MFU: medians over a stage's logged steps (the first, a warm-up, left out); MFU "
                      "against the device's peak (on CPU the fp32 matmul peak, measured once per process). "
                      "PPO and GRPO: tokens sampled per second of rollout."]
        else:
            lines += ["| stage | seconds |", "|---|---:|"]
            lines += [f"| {s} | {_fmt(v.get('seconds'), '.1f')} |" for s, v in rep["stages"].items()]
        lines.append("")
    for title, png in plots:
        lines += [f"## {title}", "", f"![{title}]({png})", ""]
    examples = {n: r.get("examples") for n, r in pol.items() if r.get("examples")}
    if examples:
        lines += ["## Example responses", ""]
        first = next(iter(examples.values()))
        for i, ex in enumerate(first):
            lines += [f"**Prompt:** {_oneline(ex['prompt'])}", ""]
            for name, exs in examples.items():
                if i < len(exs):
                    score = exs[i].get("judge_score")
                    tag = f" ({rep['judge']} {score:.0f})" if isinstance(score, (int, float)) else ""
                    lines.append(f"- *{name}*{tag}: {_oneline(exs[i]['response']) or '(empty)'}")
            lines.append("")
    return "\n".join(lines)


def _oneline(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def write_report(out_dir: str | Path, results: dict, stages: list[str] | None = None) -> None:
    """Write OUT/report.md, OUT/report.json and PNG plots from OUT/<stage>/metrics.jsonl for `stages` (default:
    every sub-directory; stages without metrics are skipped). `results` holds the evaluation table, RM accuracy
    and stage times."""
    out = Path(out_dir)
    check_output_dir(out, "run")
    out.mkdir(parents=True, exist_ok=True)
    if stages is None:
        stages = pipeline_order([d.name for d in out.iterdir() if d.is_dir()])
    metrics = {s: read_metrics(out / s) for s in stages}
    plots = []
    if plot_losses(metrics, out / "loss.png"):
        plots.append(("Training loss", "loss.png"))
    if plot_rm_accuracy(metrics.get("rm", []), out / "rm_accuracy.png"):
        plots.append(("Reward model accuracy", "rm_accuracy.png"))
    for stage in ("ppo", "grpo"):
        if plot_rl(metrics.get(stage, []), out / f"{stage}.png", stage.upper()):
            plots.append((f"{stage.upper()} reward and KL", f"{stage}.png"))
    rep = report_json(results)
    (out / "report.json").write_text(json.dumps(rep, indent=2, ensure_ascii=False, allow_nan=False) + "\n", encoding="utf-8")
    (out / "report.md").write_text(render_markdown(rep, plots), encoding="utf-8")


@dataclass
class ReportConfig:
    """`lmforge report` settings."""
    run: str = ""                   # a run directory of `lmforge run`
    stages: list[str] = field(default_factory=list)  # stage directories to include; default: every one present
    eval_results: str = ""          # the evaluation's results.json; default: RUN/eval/results.json

    def validate(self) -> None:
        if not self.run:
            raise ConfigError("run", "is required (a directory written by `lmforge run`)")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LmforgeError(f"{path}: cannot read ({e})") from None


def training_speed(records: list[dict]) -> dict:
    """A stage's median training tokens/s and MFU over its logged steps, the first (warm-up) left out; for PPO
    and GRPO the rollout's sampled tokens/s ("rollout": True). {} for a stage that logs neither."""
    import statistics

    def median(key: str) -> float | None:
        vals = [r[key] for r in records if isinstance(r.get(key), (int, float))]
        return statistics.median(vals[1:] or vals) if vals else None

    if (tok_s := median("tokens_per_s")) is not None:
        return {"tokens_per_s": round(tok_s, 1), "mfu": None if (m := median("mfu")) is None else round(m, 4)}
    if (tok_s := median("rollout_tokens_per_s")) is not None:
        return {"tokens_per_s": round(tok_s, 1), "mfu": None, "rollout": True}
    return {}


def pipeline_order(names: list[str]) -> list[str]:
    """Stage names in the order `lmforge run` runs them (its stage table), unknown names after, by name."""
    try:  # imported here, not at the top: the pipeline's table imports this stage
        from lmforge.pipeline import STAGES
    except ImportError:  # a stage's optional dependency is missing: the report still gets written
        STAGES = []
    rank = {s.name: i for i, s in enumerate(STAGES)}
    return sorted(names, key=lambda n: (rank.get(n, len(rank)), n))


def report_from_run(cfg: ReportConfig) -> dict:
    """Rebuild report.md / report.json / plots of a run directory from its stages' stage.json files."""
    run = Path(cfg.run)
    if not run.is_dir():
        raise LmforgeError(f"config key 'run': {run} is not a directory")
    stages = cfg.stages or pipeline_order([d.name for d in run.iterdir() if (d / "stage.json").is_file()])
    markers = {s: _read_json(run / s / "stage.json") for s in stages if (run / s / "stage.json").is_file()}
    results_file = Path(cfg.eval_results) if cfg.eval_results else run / "eval" / "results.json"
    ev = _read_json(results_file) if results_file.is_file() else {}
    results = {"judge": ev.get("judge", "oracle"), "win_method": ev.get("win_method"), "policies": ev.get("policies", {}),
               "reward_hacking": ev.get("reward_hacking", []),
               "rm": {"heldout_accuracy": markers.get("rm", {}).get("summary", {}).get("heldout_accuracy")},
               "stages": {s: {"seconds": round(m.get("seconds", 0.0), 1), **training_speed(read_metrics(run / s))}
                          for s, m in markers.items()}}
    write_report(run, results, stages)
    return {"report": str(run / "report.md")}


COMMAND = Command(
    "lmforge report", "Write report.md, report.json and plots for a run directory of `lmforge run`.", ReportConfig,
    lambda cfg: print(f"report: {report_from_run(cfg)['report']}"),
    flags=(Flag("--run", "run", "the run directory"),),
    examples=("lmforge report --run runs/lmforge-tiny",))


def _wire(ctx: StageContext) -> dict:
    return {"run": str(ctx.out), "stages": [s for s in ctx.stages if s != "report"],
            "eval_results": ctx.artifacts.get("eval_results", "")}


STAGE = Stage("report", ReportConfig, lambda ctx, cfg: report_from_run(cfg), inputs=("eval_results",),
              wire=_wire, always=True)
