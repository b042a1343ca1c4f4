"""`lmforge run`: the whole InstructGPT pipeline, stage after stage, with a report.

    world -> tokenizer -> data -> pretrain -> sft -> sample -> label -> rm -> ppo -> eval -> report

Each stage writes OUT/<stage>/ (a checkpoint directory where the stage makes a model) and, when it finishes,
OUT/<stage>/stage.json with a fingerprint of its config and of everything upstream. A stage whose
fingerprint matches is skipped, so an interrupted run resumes where it stopped; `--from STAGE` reruns from
a stage. Every config and input is checked before the first stage trains.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lmforge.config import _merge, load_config, read_yaml, to_dict
from lmforge.errors import LmforgeError

STAGES = ["world", "tokenizer", "data", "pretrain", "sft", "sample", "label", "rm", "ppo", "eval", "report"]
PRESET_DIR = Path(__file__).parent / "presets"
STAGE_FILE = "stage.json"


@dataclass
class Sources:
    """The user's own files; empty = the built-in generated world (lmforge.world)."""
    corpus: list[str] = field(default_factory=list)   # pretraining text (.txt/.jsonl/.gz)
    sft: str = ""              # instruction data (seed format or chat records)
    preferences: str = ""      # ranked / scored / pairwise data: skips sample + label
    rl_prompts: str = ""       # prompts for sampling candidates and PPO
    eval_prompts: str = ""     # held-out prompts (evaluation needs the oracle: built-in world prompts)
    tokenizer: str = ""        # an existing tokenizer directory: skips tokenizer training
    base_model: str = ""       # an existing pretrained checkpoint: skips data + pretrain


@dataclass
class RunConfig:
    """`lmforge run` settings. Stage sections (pretrain, sft, rm, ppo) are overrides of that stage's own
    config (see configs/); paths between stages are filled in by the pipeline."""
    out: str = "runs/lmforge"
    preset: Literal["tiny", "default"] = "default"
    world_preset: str = ""              # default: same as preset
    seed: int = 0
    device: str = "auto"
    sources: Sources = field(default_factory=Sources)
    vocab_size: int = 4096
    k: int = 4                          # candidates per prompt for ranking (InstructGPT: 4 to 9)
    sample_temperature: float = 1.0
    sample_prompts: int = 0             # 0: all RL prompts are used to collect rankings
    max_new_tokens: int = 48
    judge: Literal["oracle", "openai"] = "oracle"
    judge_url: str = ""
    judge_model: str = ""
    eval_max_new_tokens: int = 48
    pretrain: dict = field(default_factory=dict)
    sft: dict = field(default_factory=dict)
    rm: dict = field(default_factory=dict)
    ppo: dict = field(default_factory=dict)

    def validate(self) -> None:
        if self.k < 2:
            raise LmforgeError("config key 'k' must be at least 2 (rankings need two candidates)")
        if self.judge == "openai" and not (self.judge_url and self.judge_model):
            raise LmforgeError("config keys 'judge_url' and 'judge_model' are required with judge=openai")


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_fingerprint(path: str) -> str:
    p = Path(path)
    st = p.stat()
    return f"{p.resolve()}:{st.st_size}:{int(st.st_mtime)}"


class Pipeline:
    """Plans and runs the stages of one `lmforge run` (see the module docstring)."""

    def __init__(self, cfg: RunConfig, from_stage: str | None = None):
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.from_stage = from_stage
        self.src = cfg.sources
        self.world_dir = self.out / "world"
        self.stage_cfgs: dict[str, Any] = {}
        self.fingerprints: dict[str, str] = {}
        self.summaries: dict[str, dict] = {}
        self.seconds: dict[str, float] = {}
        self.builtin = not (self.src.sft and self.src.corpus or self.src.base_model)

    # ------------------------------------------------------------------ paths
    def path(self, stage: str) -> Path:
        return self.out / stage

    def files(self) -> dict[str, Any]:
        w, s = self.world_dir, self.src
        return {
            "corpus": s.corpus or [str(w / "corpus.txt")],
            "sft": s.sft or str(w / "sft.jsonl"),
            "rl_prompts": s.rl_prompts or str(w / "rl_prompts.jsonl"),
            "eval_prompts": s.eval_prompts or str(w / "eval_prompts.jsonl"),
            "preferences": s.preferences or str(self.path("label") / "ranked.jsonl"),
            "candidates": str(self.path("sample") / "candidates.jsonl"),
            "tokenizer": s.tokenizer or str(self.path("tokenizer")),
            "base_model": s.base_model or str(self.path("pretrain")),
        }

    # ------------------------------------------------------------------ planning and checks
    def plan(self) -> list[str]:
        """The stages this run needs, in order, after validating every config and user file."""
        from lmforge.ppo import PPOConfig
        from lmforge.pretrain import PretrainConfig
        from lmforge.reward import RMConfig
        from lmforge.sft import SFTConfig

        c, f = self.cfg, self.files()
        stages = list(STAGES)
        if not self.builtin and not (c.sources.eval_prompts or c.sources.rl_prompts):
            stages.remove("world")
        if c.sources.tokenizer:
            stages.remove("tokenizer")
        if c.sources.base_model:
            stages = [s for s in stages if s not in ("tokenizer", "data", "pretrain")]
        if c.sources.preferences:
            stages = [s for s in stages if s not in ("sample", "label")]
        if self.from_stage is not None and self.from_stage not in STAGES:
            raise LmforgeError(f"--from: unknown stage '{self.from_stage}' (stages: {', '.join(STAGES)})")
        for key, value in (("sources.corpus", c.sources.corpus), ("sources.sft", [c.sources.sft]),
                           ("sources.preferences", [c.sources.preferences]), ("sources.rl_prompts", [c.sources.rl_prompts]),
                           ("sources.eval_prompts", [c.sources.eval_prompts])):
            for p in value:
                if p and not Path(p).is_file():
                    raise LmforgeError(f"config key '{key}': file not found: {p}")
        for key, value in (("sources.tokenizer", c.sources.tokenizer), ("sources.base_model", c.sources.base_model)):
            if value and not Path(value).is_dir():
                raise LmforgeError(f"config key '{key}': directory not found: {value}")
        self._check_tokenizers()
        dev = {"device": c.device}
        self.stage_cfgs = {
            "pretrain": self._stage_config("pretrain", PretrainConfig, {**dev, "data": str(self.path("data")),
                                                                       "out": str(self.path("pretrain")), "overwrite": True}),
            "sft": self._stage_config("sft", SFTConfig, {**dev, "init": f["base_model"], "data": f["sft"],
                                                        "out": str(self.path("sft")), "overwrite": True}),
            "rm": self._stage_config("rm", RMConfig, {**dev, "init": str(self.path("sft")), "data": f["preferences"],
                                                     "reference_data": f["sft"], "out": str(self.path("rm"))}),
            "ppo": self._stage_config("ppo", PPOConfig, {**dev, "sft_model": str(self.path("sft")),
                                                        "reward_model": str(self.path("rm")),
                                                        "prompts": f["rl_prompts"], "out": str(self.path("ppo"))}),
        }
        return stages

    def _stage_config(self, name: str, cls, fixed: dict):
        user = getattr(self.cfg, name)
        try:
            return load_config(cls, base=_merge(user, fixed))
        except LmforgeError as e:
            raise LmforgeError(f"section '{name}': {e}") from None

    def _check_tokenizers(self) -> None:
        """A user tokenizer and a user base model must agree (their token ids mean different things otherwise)."""
        src = self.cfg.sources
        if src.tokenizer and src.base_model:
            from lmforge.checkpoint import read_config
            from lmforge.tokenizer import Tokenizer

            tok_fp = Tokenizer.load(src.tokenizer).fingerprint()
            model_fp = read_config(src.base_model).get("lmforge", {}).get("tokenizer_fingerprint")
            if model_fp and model_fp != tok_fp:
                raise LmforgeError(f"tokenizer mismatch between stages: sources.tokenizer ({src.tokenizer}) is not the "
                                   f"tokenizer of sources.base_model ({src.base_model})")

    def fingerprint(self, stage: str, upstream: str) -> str:
        c, f = self.cfg, self.files()
        spec: dict[str, Any] = {"stage": stage, "upstream": upstream, "seed": c.seed}
        if stage == "world":
            spec.update(preset=c.world_preset or c.preset)
        elif stage == "tokenizer":
            spec.update(vocab=c.vocab_size, corpus=[_file_fingerprint(p) for p in f["corpus"]] if not self.builtin else None)
        elif stage == "data":
            spec.update(corpus=[_file_fingerprint(p) for p in f["corpus"]] if not self.builtin else None)
        elif stage in self.stage_cfgs:
            spec.update(config=to_dict(self.stage_cfgs[stage]))
        elif stage == "sample":
            spec.update(k=c.k, t=c.sample_temperature, n=c.sample_prompts, max_new=c.max_new_tokens)
        elif stage == "label":
            spec.update(judge=c.judge, url=c.judge_url, model=c.judge_model)
        elif stage == "eval":
            spec.update(max_new=c.eval_max_new_tokens)
        return _hash(spec)

    def done(self, stage: str, fp: str) -> dict | None:
        marker = self.path(stage) / STAGE_FILE
        if not marker.is_file():
            return None
        rec = json.loads(marker.read_text(encoding="utf-8"))
        return rec if rec.get("fingerprint") == fp else None

    # ------------------------------------------------------------------ running
    def run(self) -> dict:
        stages = self.plan()
        self.out.mkdir(parents=True, exist_ok=True)
        upstream, forced = "", False
        for stage in stages:
            fp = self.fingerprint(stage, upstream)
            forced = forced or stage == self.from_stage
            prev = None if forced else self.done(stage, fp)
            if prev is not None and stage != "report":
                print(f"[lmforge run] {stage}: up to date, skipped")
                self.summaries[stage], self.seconds[stage] = prev.get("summary", {}), prev.get("seconds", 0.0)
            else:
                print(f"[lmforge run] {stage} ...", flush=True)
                t0 = time.perf_counter()
                summary = getattr(self, f"stage_{stage}")() or {}
                secs = time.perf_counter() - t0
                self.summaries[stage], self.seconds[stage] = summary, secs
                if stage != "report":
                    marker = {"fingerprint": fp, "seconds": secs, "summary": summary}
                    (self.path(stage) / STAGE_FILE).write_text(json.dumps(marker, indent=2, default=str), encoding="utf-8")
                print(f"[lmforge run] {stage}: done in {secs:.1f}s", flush=True)
            upstream = fp
        return self.summaries

    def stage_world(self) -> dict:
        from lmforge.world import generate_world

        return generate_world(self.world_dir, self.cfg.world_preset or self.cfg.preset, seed=self.cfg.seed)

    def stage_tokenizer(self) -> dict:
        from lmforge.tokenizer import train_tokenizer

        tok = train_tokenizer(self.files()["corpus"], self.cfg.vocab_size, self.path("tokenizer"))
        return {"vocab_size": tok.vocab_size}

    def stage_data(self) -> dict:
        from lmforge.data import prepare_data

        return prepare_data(self.files()["corpus"], self.files()["tokenizer"], self.path("data"))

    def stage_pretrain(self) -> dict:
        from lmforge.pretrain import run_pretrain

        return run_pretrain(self.stage_cfgs["pretrain"])

    def stage_sft(self) -> dict:
        from lmforge.sft import run_sft

        return run_sft(self.stage_cfgs["sft"])

    def stage_sample(self) -> dict:
        from lmforge.sample import sample_candidates

        prompts = self.files()["rl_prompts"]
        if self.cfg.sample_prompts:  # a subset of the RL prompts for the rankings
            lines = Path(prompts).read_text(encoding="utf-8").splitlines()[: self.cfg.sample_prompts]
            self.path("sample").mkdir(parents=True, exist_ok=True)
            prompts = str(self.path("sample") / "prompts.jsonl")
            Path(prompts).write_text("\n".join(lines) + "\n", encoding="utf-8")
        return sample_candidates(self.path("sft"), prompts, self.files()["candidates"], k=self.cfg.k,
                                 temperature=self.cfg.sample_temperature, max_new_tokens=self.cfg.max_new_tokens,
                                 seed=self.cfg.seed, device=self.cfg.device)

    def stage_label(self) -> dict:
        from lmforge.label import label_candidates

        self.path("label").mkdir(parents=True, exist_ok=True)
        return label_candidates(self.files()["candidates"], self.files()["preferences"], judge=self.cfg.judge,
                                url=self.cfg.judge_url or None, model=self.cfg.judge_model or None)

    def stage_rm(self) -> dict:
        from lmforge.reward import run_rm

        return run_rm(self.stage_cfgs["rm"])

    def stage_ppo(self) -> dict:
        from lmforge.ppo import run_ppo

        return run_ppo(self.stage_cfgs["ppo"])

    def stage_eval(self) -> dict:
        from lmforge.evaluate import evaluate_policies

        policies = {"base": self.files()["base_model"], "sft": str(self.path("sft")), "ppo": str(self.path("ppo"))}
        self.path("eval").mkdir(parents=True, exist_ok=True)
        res = evaluate_policies(policies, self.files()["eval_prompts"], rm_dir=str(self.path("rm")),
                                max_new_tokens=self.cfg.eval_max_new_tokens, seed=self.cfg.seed, device=self.cfg.device)
        (self.path("eval") / "results.json").write_text(json.dumps(res, indent=2, ensure_ascii=False), encoding="utf-8")
        return res

    def stage_report(self) -> dict:
        from lmforge.report import write_report

        ev = self.summaries.get("eval", {})
        rm = self.summaries.get("rm", {})
        # Only a policy optimised against the reward model can hack it; the base model never saw it.
        hacking = [name for name in ev.get("reward_hacking", []) if name != "base"]
        results = {"policies": ev.get("policies", {}), "reward_hacking": hacking,
                   "rm": {"heldout_accuracy": rm.get("heldout_accuracy")},
                   "stages": {s: {"seconds": round(t, 1)} for s, t in self.seconds.items() if s != "report"}}
        write_report(self.out, results)
        return {"report": str(self.out / "report.md")}


def load_run_config(config: str | None, preset: str | None, overrides: list[str]) -> RunConfig:
    """Preset YAML (src/lmforge/presets/run_<preset>.yaml) <- user config file <- overrides."""
    user = read_yaml(config) if config else {}
    name = preset or user.get("preset") or "default"
    preset_file = PRESET_DIR / f"run_{name}.yaml"
    if not preset_file.is_file():
        raise LmforgeError(f"unknown preset '{name}' (presets: tiny, default)")
    base = _merge(read_yaml(preset_file), {"preset": name})
    return load_config(RunConfig, base=_merge(base, user), overrides=overrides)


def cli(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="lmforge run", description=__doc__.split("\n")[0])
    p.add_argument("--config", help="YAML run config (keys of RunConfig; stage sections override stage configs)")
    p.add_argument("--preset", choices=["tiny", "default"], help="model and data sizes (default: default)")
    p.add_argument("--out", help="output directory (default: runs/lmforge)")
    p.add_argument("--from", dest="from_stage", metavar="STAGE", help=f"rerun from this stage ({', '.join(STAGES)})")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. ppo.iterations=20 seed=1")
    args = p.parse_args(argv)
    overrides = list(args.overrides) + ([f"out={args.out}"] if args.out else [])
    cfg = load_run_config(args.config, args.preset, overrides)
    t0 = time.perf_counter()
    Pipeline(cfg, from_stage=args.from_stage).run()
    print(f"[lmforge run] finished in {time.perf_counter() - t0:.0f}s: report in {Path(cfg.out) / 'report.md'}")
