"""What a stage of `lmforge run` is: the one declaration the pipeline's table holds for it.

A stage names the artifacts it reads (`inputs`) and writes (`outputs`), the typed config section it takes
(`lmforge run <name>.<key>=value`), how the pipeline wires paths into that config (`wire`) and the function that
runs it. The pipeline (lmforge.pipeline) plans a graph from these declarations: a stage runs when something
downstream needs one of its outputs and the user has not supplied it (`sources.*`), and it is skipped when its
fingerprint (its config plus the fingerprints of its inputs) matches the one its last run recorded.

Artifacts are named files or directories: corpus, sft_data, rl_prompts, eval_prompts, tokenizer, token_data,
base_model, sft_model, candidates, preferences, reward_model, <policy>_model, eval_results. The input name
"policies" stands for every policy the run produces (the stages with `policy` set), so evaluation sees them all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

POLICIES = "policies"  # the input that stands for every policy of the run


@dataclass
class StageContext:
    """What a stage sees of the run: where things are, and what earlier stages reported."""
    out: Path                                   # the run directory; stage S writes out/S
    seed: int
    device: str
    artifacts: dict[str, str]                   # artifact name -> path, for every artifact of this run
    policies: dict[str, str]                    # policy name -> checkpoint directory, in table order
    stages: list[str] = field(default_factory=list)   # the stages of this run, in order
    summaries: dict[str, dict] = field(default_factory=dict)

    def dir(self, stage: str) -> str:
        """The output directory of `stage`."""
        return str(self.out / stage)

    def artifact(self, name: str) -> str:
        """The path of artifact `name` (a file the user supplied, or an output of an earlier stage)."""
        return self.artifacts[name]


@dataclass(frozen=True)
class Stage:
    """One row of the stage table (see the module docstring)."""
    name: str
    config: type                                         # the typed section `run.<name>`
    run: Callable[[StageContext, Any], dict]             # run(ctx, cfg) -> summary (JSON-able)
    inputs: tuple[str, ...] = ()                         # artifacts read
    outputs: dict[str, str] = field(default_factory=dict)  # artifact -> path inside the stage dir ("" = the dir)
    wire: Callable[[StageContext], dict] | None = None   # config keys the pipeline sets (paths between stages)
    policy: str = ""                                     # its model output is a policy, evaluated by this name
    branch: bool = False                                 # an alternative optimiser after SFT, chosen by `branches`
    always: bool = False                                 # never skipped as up to date (the report)
    command: str = ""                                    # its CLI command, when it trains under torchrun
