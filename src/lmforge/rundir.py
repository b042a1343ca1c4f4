"""The output directory of one training run, with one lifecycle for every training stage:

    rd = RunDir(cfg.out, "sft", resume, cfg.overwrite, inputs={"init": cfg.init})
    state = rd.check()          # before anything is written: refuse to clobber, or load the state to resume
    ...                         # load data and models (still nothing written)
    with rd.active(step):       # clear (overwrite) or trim logs (resume); a failure before the first
        ...train...             # checkpoint removes the directory again, so no half-written run remains
    rd.finish(summary, config)  # run.json: what ran and what it reported

A directory counts as a run when it holds a checkpoint (config.json), a log (metrics.jsonl), run.json or the
pipeline's stage.json; any other non-empty directory is never deleted.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path

from lmforge.errors import LmforgeError

RUN_FILE = "run.json"
LOGS = ("metrics.jsonl", "samples.jsonl")


def truncate_logs(out_dir: str | Path, step: int, names: tuple[str, ...] = LOGS) -> None:
    """Drop log lines written after the checkpoint's `step` (a crash between a log line and the next save),
    so a resumed run's logs match an uninterrupted run's. A line's step is its "step" (or "iteration")."""
    for name in names:
        path = Path(out_dir) / name
        if path.is_file():
            keep = []
            for ln in path.read_text(encoding="utf-8").splitlines():
                if ln.strip():
                    rec = json.loads(ln)
                    if rec.get("step", rec.get("iteration", 0)) <= step:
                        keep.append(ln)
            path.write_text("".join(ln + "\n" for ln in keep), encoding="utf-8")


class RunDir:
    """See the module docstring. `inputs` maps config keys to directories the run reads, which `out` may not be."""

    def __init__(self, out: str | Path, stage: str, resume: bool = False, overwrite: bool = False,
                 inputs: dict[str, str] | None = None, is_main: bool = True):
        self.path, self.stage, self.resume, self.overwrite = Path(out), stage, resume, overwrite
        self.inputs, self.is_main = inputs or {}, is_main
        self.fresh = not resume

    def is_run(self) -> bool:
        return any((self.path / f).is_file() for f in ("config.json", "metrics.jsonl", RUN_FILE, "stage.json"))

    def check(self) -> dict | None:
        """Refuse an output directory that must not be written; with resume, the saved training state."""
        out = self.path
        if self.is_main:  # a crash inside a save: the previous checkpoint back in place, no half-written copies
            from lmforge.checkpoint import recover_interrupted_save

            recover_interrupted_save(out)
        for key, d in self.inputs.items():
            if d and out.resolve() == Path(d).resolve():
                raise LmforgeError(f"config key 'out' must differ from '{key}' (the input would be overwritten)")
        if self.is_main:
            check_output_dir(out)
        if not self.resume:
            if out.is_dir() and any(out.iterdir()):
                if not self.is_run():
                    raise LmforgeError(f"config key 'out': {out} is not empty and is not a training run; choose another")
                if not self.overwrite:
                    raise LmforgeError(f"config key 'out': {out} already holds a run; pass --resume to continue it "
                                       "or overwrite=true to start over")
            return None
        from lmforge.checkpoint import load_training_state, read_config

        if not (out / "config.json").is_file():
            raise LmforgeError(f"{out}: no checkpoint to resume (start without --resume, with overwrite=true "
                               "if the directory holds a run stopped before its first checkpoint)")
        stage = read_config(out).get("lmforge", {}).get("stage")
        if stage != self.stage:
            raise LmforgeError(f"{out}: cannot resume: the checkpoint is from stage {stage!r}, not {self.stage}")
        state = load_training_state(out)
        if state is None:
            raise LmforgeError(f"{out}: cannot resume: no training_state.pt (the run saved weights only)")
        return state

    @contextlib.contextmanager
    def active(self, resume_step: int = 0, checkpoint_bytes: int = 0):
        """Prepare the directory (cleared for a fresh run, logs trimmed to `resume_step` on resume) and remove it
        again if the body fails before a fresh run wrote its first checkpoint. With `checkpoint_bytes` (the size
        of one checkpoint, `checkpoint.estimate_bytes`), first make sure the disk can hold two of them: a save
        writes the new one beside the old before the swap."""
        if self.is_main and checkpoint_bytes:
            _check_free_space(self.path, 2 * checkpoint_bytes, freed=0 if self.resume else _dir_bytes(self.path))
        if self.is_main:
            if self.resume:
                truncate_logs(self.path, resume_step)
            elif self.path.exists():
                shutil.rmtree(self.path)  # check() made sure it is a previous run and overwrite is set
            self.path.mkdir(parents=True, exist_ok=True)
        try:
            yield self
        except BaseException:
            if self.fresh and self.is_main and not (self.path / "config.json").is_file():
                shutil.rmtree(self.path, ignore_errors=True)
            raise

    def finish(self, summary: dict, config: dict | None = None) -> None:
        """Write run.json (the stage, its config and its summary) atomically: the run is complete."""
        if not self.is_main:
            return
        rec = {"stage": self.stage, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "summary": summary,
               "config": config or {}}
        tmp = self.path / f".{RUN_FILE}.tmp"
        tmp.write_text(json.dumps(rec, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
        os.replace(tmp, self.path / RUN_FILE)


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_dir(out: str | Path, key: str = "out") -> None:
    """Refuse, before any work, an output directory that cannot be created or written: a file in its place, a
    file where one of its parents should be, missing permissions, a read-only filesystem. A probe file is
    created and removed where the output will go."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LmforgeError(f"config key '{key}': {out} exists and is not a directory")
    _check_writable(out if out.is_dir() else _existing_ancestor(out), key, out)


def check_output_file(path: str | Path, key: str = "out") -> None:
    """Refuse, before any work, an output file that cannot be written: a directory in its place, or a folder
    that cannot be created or written (see check_output_dir)."""
    path = Path(path)
    if path.is_dir():
        raise LmforgeError(f"config key '{key}': {path} is a directory; give the path of a file")
    _check_writable(_existing_ancestor(path.parent), key, path)


def check_new_checkpoint_dir(out: str | Path, overwrite: bool, key: str = "out") -> None:
    """For commands that write one checkpoint (import, export): refuse to replace what is already at `out`
    unless it is a checkpoint and overwrite is set. A checkpoint save replaces the whole directory, so a
    run directory given by mistake would lose its sub-directories."""
    out = Path(out)
    check_output_dir(out, key)
    if out.is_dir() and any(out.iterdir()):
        if not (out / "config.json").is_file():
            raise LmforgeError(f"config key '{key}': {out} is not empty and is not a checkpoint; choose another")
        if not overwrite:
            raise LmforgeError(f"config key '{key}': {out} already holds a checkpoint; pass overwrite=true to "
                               "replace it")


def _check_writable(base: Path, key: str, target: Path) -> None:
    """Refuse `target` unless a file can be created in `base`, the folder it goes in (or its nearest existing
    ancestor): the message names both."""
    named = "" if target == base else f"{target}: "
    if not base.is_dir():  # a file where a folder of the path should be
        raise LmforgeError(f"config key '{key}': {named}cannot write in {base} (not a directory)")
    probe = base / f".lmforge-write-probe-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise LmforgeError(f"config key '{key}': {named}cannot write in {base} ({e.strerror})") from None


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def _check_free_space(out: Path, need: int, freed: int = 0) -> None:
    free = shutil.disk_usage(_existing_ancestor(out)).free + freed
    if free < need:
        raise LmforgeError(f"config key 'out': {out} has {free / 2**20:.0f} MiB free, but saving this run's "
                           f"checkpoints needs about {need / 2**20:.0f} MiB (a new checkpoint is written beside "
                           "the previous one); free some space or choose another directory")
