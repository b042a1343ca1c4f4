"""`lmforge run`: the InstructGPT pipeline as a graph of stages, driven by one table.

    world -> tokenizer -> data -> pretrain -> sft -> sample -> label -> rm -> ppo, grpo -> eval -> report
                                                               label -> dpo ----------> eval

Each row of STAGES (lmforge.stage.Stage) names the artifacts a stage reads and writes. A run plans the graph:
a stage runs when a later stage needs one of its outputs and the user did not supply it (`sources.*`), so
`sources.base_model=DIR` skips tokenizer, data and pretraining, and `sources.preferences=FILE` skips sampling and
labelling. Branch stages (the policy optimisers after SFT: ppo, dpo, grpo) run when listed in `branches`: DPO
learns from the ranked data directly, PPO and GRPO from rollouts scored by the reward model. Evaluation compares every policy the run produces (the stages with `policy` set).

Each stage writes OUT/<stage>/ and, when it finishes, OUT/<stage>/stage.json with a fingerprint of its config
and of its inputs' fingerprints. A stage whose fingerprint matches is skipped, so an interrupted run resumes
where it stopped; `--from STAGE` reruns from a stage. Every config and user file is checked before the first
stage runs. Adding a stage: write its module (a config dataclass, a run function, a STAGE) and add one line
to STAGES.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from lmforge.cli import Command, Flag, key_help
from lmforge.config import _build, _merge, load_config, read_yaml, to_dict
from lmforge.errors import LmforgeError
from lmforge.rundir import RUN_FILE, check_output_dir
from lmforge.stage import POLICIES, Stage, StageContext
from lmforge.stages import (
    data,
    dpo,
    evaluate,
    grpo,
    label,
    ppo,
    pretrain,
    report,
    rm,
    sample,
    sft,
    tokenizer,
    world,
)

STAGES: list[Stage] = [
    world.STAGE,
    tokenizer.STAGE,
    data.STAGE,
    pretrain.STAGE,
    sft.STAGE,
    sample.STAGE,
    label.STAGE,
    rm.STAGE,
    ppo.STAGE,
    dpo.STAGE,
    grpo.STAGE,
    evaluate.STAGE,
    report.STAGE,
]
PRESET_DIR = Path(__file__).parent / "presets"
STAGE_FILE = "stage.json"


@dataclass
class Sources:
    """The user's own files, each replacing the stage that would make it; empty = the built-in world."""
    corpus: list[str] = field(default_factory=list)   # pretraining text (.txt/.jsonl/.gz)
    sft: str = ""              # instruction data (seed format or chat records)
    preferences: str = ""      # ranked / scored / pairwise data: skips sample + label
    rl_prompts: str = ""       # prompts for sampling candidates and PPO
    eval_prompts: str = ""     # held-out prompts (the oracle judge needs the built-in world's prompts)
    tokenizer: str = ""        # an existing tokenizer directory: skips tokenizer training
    base_model: str = ""       # a pretrained checkpoint, hf:DIR or gguf:FILE: skips tokenizer, data, pretraining

    def artifacts(self) -> dict[str, Any]:
        """artifact name -> the user's path, for the sources that are set."""
        named = {"corpus": self.corpus, "sft_data": self.sft, "preferences": self.preferences,
                 "rl_prompts": self.rl_prompts, "eval_prompts": self.eval_prompts, "tokenizer": self.tokenizer,
                 "base_model": self.base_model}
        return {k: v for k, v in named.items() if v}

    def validate(self) -> None:
        if self.base_model.startswith(("hf:", "gguf:")):
            from lmforge.hf import model_source_path

            model_source_path(self.base_model, key="sources.base_model")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "base_model" and value.startswith(("hf:", "gguf:")):
                continue
            for p in value if isinstance(value, list) else [value] if value else []:
                is_dir = f.name in ("tokenizer", "base_model")
                if not (Path(p).is_dir() if is_dir else Path(p).is_file()):
                    raise LmforgeError(f"config key 'sources.{f.name}': {'directory' if is_dir else 'file'} "
                                       f"not found: {p}")


@dataclass
class RunConfig:
    """`lmforge run` settings. Every stage also has a section named after it (`sft.optim.lr=1e-3`, see
    `lmforge sft --help` for its keys); paths between stages are set by the pipeline."""
    out: str = "runs/lmforge"           # the run directory: one sub-directory per stage
    preset: Literal["tiny", "default", "smollm2"] = "default"  # src/lmforge/presets/run_<preset>.yaml
    seed: int = 0                       # world, sampling and evaluation seed (training stages have their own)
    device: str = "auto"                # auto: cuda when available
    nproc: int = 1                      # processes per training stage (torchrun: DDP; GPUs or CPU cores)
    branches: list[str] = field(default_factory=lambda: ["ppo", "dpo", "grpo"])  # policy optimisers after SFT
    sources: Sources = field(default_factory=Sources)
    sections: dict = field(default_factory=dict)   # the stage sections as given (set from top-level keys)


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _path_fingerprint(path: str) -> str:
    """Identity of a user file or directory: path, size and modification time (of config/tokenizer files in a
    directory), so editing a source reruns the stages that read it."""
    if path.startswith(("hf:", "gguf:")):
        from lmforge.hf import model_source_path

        path = str(model_source_path(path))
    p = Path(path)
    files = [p] if p.is_file() else sorted(q for q in p.glob("*.json") if q.is_file())
    return f"{p.resolve()}:" + ",".join(f"{q.stat().st_size}:{int(q.stat().st_mtime)}" for q in files)


class Pipeline:
    """Plans and runs the stages of one `lmforge run` (see the module docstring)."""

    def __init__(self, cfg: RunConfig, from_stage: str | None = None, stages: list[Stage] | None = None):
        self.cfg, self.from_stage = cfg, from_stage
        self.table = STAGES if stages is None else stages
        self.out = Path(cfg.out)
        self.plan_: list[Stage] = []
        self.sections: dict[str, Any] = {}
        self.ctx: StageContext | None = None

    # ------------------------------------------------------------------ planning
    def enabled(self) -> list[Stage]:
        branches = [s.name for s in self.table if s.branch]
        for b in self.cfg.branches:
            if b not in branches:
                raise LmforgeError(f"config key 'branches': unknown branch '{b}' (branches: {', '.join(branches)})")
        return [s for s in self.table if not s.branch or s.name in self.cfg.branches]

    def expand(self, inputs) -> list[str]:
        """A stage's inputs with POLICIES replaced by every policy artifact of the run."""
        return [a for i in inputs for a in (self.policy_artifacts if i == POLICIES else [i])]

    def plan(self) -> list[Stage]:
        """The stages this run needs, in table order, with their configs wired and validated."""
        names = [s.name for s in self.table]
        if self.cfg.nproc < 1:
            raise LmforgeError(f"config key 'nproc' must be >= 1, got {self.cfg.nproc}")
        for key in self.cfg.sections:
            if key not in names:
                raise LmforgeError(f"unknown config key '{key}' (run keys: {', '.join(f.name for f in fields(RunConfig) if f.name != 'sections')}; stages: {', '.join(names)})")
        if self.from_stage is not None and self.from_stage not in names:
            raise LmforgeError(f"--from: unknown stage '{self.from_stage}' (stages: {', '.join(names)})")
        self.cfg.sources.validate()
        provided = self.cfg.sources.artifacts()
        enabled = self.enabled()
        self.policy_artifacts = [next(iter(s.outputs)) for s in enabled if s.policy]
        expand = self.expand

        consumed = {a for s in enabled for a in expand(s.inputs)}
        needed: set[str] = set()
        plan: list[Stage] = []
        for s in reversed(enabled):
            outs = list(s.outputs)
            if outs and all(a in provided for a in outs):
                continue  # the user supplied what this stage makes
            if s.always or not outs or not consumed & set(outs) or needed & set(outs):
                plan.insert(0, s)
                needed |= set(expand(s.inputs))
        artifacts = dict(provided)
        for s in plan:
            for a, rel in s.outputs.items():
                artifacts.setdefault(a, str(self.out / s.name / rel) if rel else str(self.out / s.name))
        for s in plan:
            missing = [a for a in expand(s.inputs) if a not in artifacts and a not in self.policy_artifacts]
            if missing:
                raise LmforgeError(f"stage '{s.name}' needs {', '.join(missing)}, which no stage of this run makes "
                                   "(set the matching sources.* key)")
        policies = {s.policy: artifacts[next(iter(s.outputs))] for s in enabled
                    if s.policy and next(iter(s.outputs)) in artifacts}
        self.ctx = StageContext(self.out, self.cfg.seed, self.cfg.device, artifacts, policies, [s.name for s in plan])
        self.sections = {s.name: self._section(s) for s in plan}
        self._check_judges()
        self._check_tokenizers()
        self._check_source_records()
        self.plan_ = plan
        return plan

    def _section(self, stage: Stage):
        """The stage's typed config: the user's section with the pipeline's wiring on top."""
        user = self.cfg.sections.get(stage.name) or {}
        if not isinstance(user, dict):
            raise LmforgeError(f"config key '{stage.name}': expected a mapping of {stage.name} settings")
        wired = stage.wire(self.ctx) if stage.wire else {}
        return load_config(stage.config, base=_merge(user, wired), prefix=f"{stage.name}.")

    def _check_judges(self) -> None:
        """Build every judge the run will use, so an unknown or misconfigured judge fails before training."""
        from lmforge.judges import JudgeConfig, make_judge

        for section in self.sections.values():
            judge = getattr(section, "judge", None)
            if isinstance(judge, JudgeConfig) and judge.name != "human":  # people need no building
                make_judge(judge)

    def _check_source_records(self) -> None:
        """Read every user record file now, with the reader its stage will use, so a malformed file fails in
        seconds rather than when its stage starts, after pretraining (each error names file:line)."""
        from lmforge.preferences import parse_record
        from lmforge.prompts import read_prompts
        from lmforge.records import read_records
        from lmforge.stages.sft import read_sft_records

        src = self.cfg.sources
        if src.sft and "sft" in self.sections:
            read_sft_records(src.sft, skip_invalid=self.sections["sft"].skip_invalid)
        for path in (src.rl_prompts, src.eval_prompts):
            if path:
                read_prompts(path)
        if src.preferences:
            prompts, skip = set(), any(getattr(self.sections.get(n), "skip_invalid", False) for n in ("rm", "dpo"))
            for line, rec in read_records(src.preferences, tolerant=skip):
                try:
                    if isinstance(rec, json.JSONDecodeError):
                        raise ValueError(f"invalid JSON ({rec.msg})")
                    ex = parse_record(rec)
                except ValueError as e:
                    if skip:
                        continue
                    raise LmforgeError(f"{src.preferences}:{line}: {e}") from None
                prompts.add(json.dumps(ex.prompt, ensure_ascii=False, sort_keys=True))
            held_out = [n for n in ("rm", "dpo") if n in self.sections and not self.sections[n].val_data
                        and self.sections[n].val_fraction > 0]
            if held_out and len(prompts) < 2:
                raise LmforgeError(f"config key 'sources.preferences': {src.preferences} has {len(prompts)} distinct "
                                   f"prompt(s); {held_out[0]} holds some prompts out for validation and trains on "
                                   "the rest, so it needs at least 2")

    def _check_tokenizers(self) -> None:
        """A user tokenizer and a user base model must agree (their token ids mean different things otherwise)."""
        src = self.cfg.sources
        if src.tokenizer and src.base_model:
            from lmforge.checkpoint import read_config
            from lmforge.tokenizer import Tokenizer, check_same_tokenizer

            check_same_tokenizer(Tokenizer.load(src.tokenizer).fingerprint(),
                                 read_config(src.base_model).get("lmforge", {}).get("tokenizer_fingerprint"),
                                 f"sources.tokenizer ({src.tokenizer})", f"sources.base_model ({src.base_model})")

    def resolved_config(self) -> dict:
        """The run config with every stage section as the stage will get it (for --print-config)."""
        self.plan()
        core = to_dict(self.cfg)
        core.pop("sections")
        return {**core, **{name: to_dict(sec) for name, sec in self.sections.items()}}

    # ------------------------------------------------------------------ fingerprints
    def fingerprint(self, stage: Stage, fps: dict[str, str]) -> str:
        """Hash of the stage's config and of what it reads: a producer's fingerprint, or a user file's identity."""
        producers = {a: s.name for s in self.plan_ for a in s.outputs}
        inputs = {}
        for a in self.expand(stage.inputs):
            if a not in self.ctx.artifacts:
                continue  # a policy this run does not make
            p = self.ctx.artifacts[a]
            inputs[a] = fps.get(producers.get(a)) or [_path_fingerprint(x) for x in (p if isinstance(p, list) else [p])]
        return _hash({"stage": stage.name, "config": to_dict(self.sections[stage.name]), "inputs": inputs})

    def done(self, stage: str, fp: str) -> dict | None:
        marker = self.out / stage / STAGE_FILE
        if not marker.is_file():
            return None
        rec = json.loads(marker.read_text(encoding="utf-8"))
        return rec if rec.get("fingerprint") == fp else None

    # ------------------------------------------------------------------ running
    def run(self) -> dict:
        plan = self.plan()
        check_output_dir(self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        fps: dict[str, str] = {}
        forced = False
        for stage in plan:
            fp = fps[stage.name] = self.fingerprint(stage, fps)
            forced = forced or stage.name == self.from_stage
            prev = None if forced or stage.always else self.done(stage.name, fp)
            if prev is not None:
                print(f"[lmforge run] {stage.name}: up to date, skipped")
                self.ctx.summaries[stage.name] = prev.get("summary", {})
                continue
            print(f"[lmforge run] {stage.name} ...", flush=True)
            t0 = time.perf_counter()
            spread, note = (split_for_processes(stage, self.sections[stage.name], self.cfg.nproc)
                            if self.cfg.nproc > 1 and stage.command else (None, None))
            if note:
                print(f"[lmforge run] {stage.name}: {note}", flush=True)
            if spread is not None:
                summary = run_under_torchrun(stage, spread, self.cfg.nproc, self.out)
            else:
                summary = stage.run(self.ctx, self.sections[stage.name]) or {}
            secs = time.perf_counter() - t0
            self.ctx.summaries[stage.name] = summary
            if not stage.always:
                marker = {"fingerprint": fp, "seconds": secs, "summary": summary}
                (self.out / stage.name).mkdir(parents=True, exist_ok=True)
                (self.out / stage.name / STAGE_FILE).write_text(json.dumps(marker, indent=2, default=str),
                                                                encoding="utf-8")
            print(f"[lmforge run] {stage.name}: done in {secs:.1f}s", flush=True)
        return self.ctx.summaries


# torchrun's launcher, minus the traceback it prints when a worker fails (the worker's own one line says why).
_LAUNCH = ("import sys\nfrom torch.distributed.run import main\n"
           "from torch.distributed.elastic.multiprocessing.errors import ChildFailedError\n"
           "try:\n    main()\nexcept ChildFailedError:\n    sys.exit(1)\n")


def split_for_processes(stage: Stage, cfg: Any, nproc: int) -> tuple[Any, str | None]:
    """The stage's config for `nproc` processes with the same global batch (batch_size x optim.grad_accum): each
    process runs grad_accum / nproc micro-batches. When nproc does not divide grad_accum but divides batch_size,
    micro-batches get batch_size / nproc rows and grad_accum x nproc of them make a step; when it divides
    neither, None: the stage runs in one process. Returns (config, a note for the user or None)."""
    import dataclasses

    if hasattr(cfg, "check_processes"):  # PPO, GRPO: each process samples and trains on a share of every batch
        try:
            cfg.check_processes(nproc)
        except LmforgeError as e:
            return None, f"{e}; it runs in one process"
        return cfg, None
    batch, accum = cfg.batch_size, cfg.optim.grad_accum
    if accum % nproc == 0:
        return cfg, None
    if batch % nproc == 0:
        new = dataclasses.replace(cfg, batch_size=batch // nproc,
                                  optim=dataclasses.replace(cfg.optim, grad_accum=accum * nproc))
        return new, (f"batch_size {batch} x grad_accum {accum} runs as {batch // nproc} x {accum * nproc} on "
                     f"{nproc} processes (the same global batch)")
    return None, (f"batch_size {batch} x grad_accum {accum} does not split over {nproc} processes; it runs in one "
                  f"(make {stage.name}.optim.grad_accum or {stage.name}.batch_size a multiple of {nproc})")


def run_under_torchrun(stage: Stage, cfg: Any, nproc: int, run_dir: Path) -> dict:
    """Run a training stage as `torchrun --standalone --nproc_per_node N -m lmforge.cli <command> --config F` (the
    stage's wired config written to F) and return the summary its run.json records. The pipeline itself stays
    in this process: only training is spread over processes (DDP, each a share of every step's micro-batches)."""
    import subprocess
    import sys
    import tempfile

    import yaml

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix=f".lmforge-{stage.name}-", dir=run_dir,
                                     delete=False) as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False, allow_unicode=True)
    try:
        argv = [sys.executable, "-c", _LAUNCH, "--standalone", f"--nproc_per_node={nproc}",
                "-m", "lmforge.cli", *stage.command.split(), "--config", f.name]
        # Its progress and messages go straight to the terminal; LOGLEVEL quiets the launcher's own logging.
        code = subprocess.run(argv, env={**os.environ, "LOGLEVEL": "CRITICAL"}, check=False).returncode
    finally:
        Path(f.name).unlink()
    if code != 0:
        raise LmforgeError(f"{stage.name} on {nproc} processes failed (its message is above)")
    return json.loads((Path(cfg.out) / RUN_FILE).read_text(encoding="utf-8"))["summary"]


def run_config(tree: dict) -> RunConfig:
    """A RunConfig from a raw config tree: run keys typed and checked, stage sections kept for the planner."""
    run_keys = {f.name for f in fields(RunConfig)} - {"sections"}
    core = {k: v for k, v in tree.items() if k in run_keys}
    sections = {k: v for k, v in tree.items() if k not in run_keys}
    return _build(RunConfig, {**core, "sections": sections})


def with_preset(tree: dict) -> dict:
    """The preset's YAML (src/lmforge/presets/run_<preset>.yaml) under the user's config."""
    name = tree.get("preset") or "default"
    preset_file = PRESET_DIR / f"run_{name}.yaml"
    if not isinstance(name, str) or not preset_file.is_file():
        presets = ", ".join(sorted(p.stem.removeprefix("run_") for p in PRESET_DIR.glob("run_*.yaml")))
        raise LmforgeError(f"config key 'preset': unknown preset {name!r} (presets: {presets})")
    return _merge(_merge(read_yaml(preset_file), {"preset": name}), tree)


def _run(cfg: RunConfig, from_stage: str | None = None) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise LmforgeError("lmforge run starts its own processes: run it without torchrun and pass --nproc N")
    t0 = time.perf_counter()
    pipe = Pipeline(cfg, from_stage=from_stage)
    pipe.run()
    print(f"[lmforge run] finished in {time.perf_counter() - t0:.0f}s: report in {Path(cfg.out) / 'report.md'}")
    policies = pipe.ctx.policies
    if policies:  # the PPO policy when the run made one, else the last policy
        name = "ppo" if "ppo" in policies else list(policies)[-1]
        print(f"[lmforge run] talk to the {name} policy: lmforge chat --model {policies[name]}")
        models = " ".join(f"--model {n}={d}" for n, d in policies.items())
        print(f"[lmforge run] serve every policy (OpenAI API on http://127.0.0.1:8000/v1): lmforge serve {models}")


def _help_keys() -> list[str]:
    lines = key_help(RunConfig, skip=("sections",))
    lines += ["", "stage sections (keys of each stage's own command; paths between stages are set by the run):"]
    commands = {"tokenizer": "tokenizer train", "data": "data prepare", "rm": "rm train"}
    lines += [f"  {s.name + '.*':<14} see `lmforge {commands.get(s.name, s.name)} --help`" for s in STAGES]
    return lines


class RunCommand(Command):
    """`lmforge run`: the Command grammar, plus --preset, --from and sections typed by the stage table."""

    def parser(self):
        p = super().parser()
        p.epilog = "\n".join(["config keys (YAML file or key=value; defaults in brackets):", *_help_keys(), "",
                              "examples:", *(f"  {e}" for e in self.examples)])
        p.add_argument("--from", dest="from_stage", metavar="STAGE",
                       help=f"rerun from this stage ({', '.join(s.name for s in STAGES)})")
        return p

    def top_keys(self) -> set[str]:
        return super().top_keys() | {s.name for s in STAGES}

    def load(self, args):
        return run_config(with_preset(super().tree(args)))

    def main(self, argv: list[str]) -> None:
        import yaml

        args = self.parser().parse_intermixed_args(argv)
        cfg = self.load(args)
        if args.print_config:
            print(yaml.safe_dump(Pipeline(cfg).resolved_config(), sort_keys=False, allow_unicode=True), end="")
            return
        _run(cfg, args.from_stage)


COMMAND = RunCommand(
    "lmforge run", "The whole InstructGPT pipeline on the built-in dataset (or your sources.*), with a report.",
    RunConfig, _run,
    flags=(Flag("--preset", "preset", "tiny (about two minutes) or default"), Flag("--out", "out", "run directory"),
           Flag("--nproc", "nproc", "processes per training stage (torchrun, DDP): GPUs, or CPU cores"),
           Flag("--branches", "branches", "policy optimisers after SFT: any of ppo, dpo, grpo (--branches ppo grpo)")),
    examples=("lmforge run --preset tiny",
              "lmforge run ppo.iterations=50 seed=1",
              "lmforge run --preset tiny sft.optim.lr=3e-4 ppo.actor_optim.lr=2e-5 eval.max_new_tokens=48",
              "lmforge run --preset tiny sources.preferences=runs/lmforge-tiny/label/ranked.jsonl out=runs/own-prefs",
              "lmforge run --preset tiny label.judge.name=oracle world.flaw_rates.verbose=0.8"))
