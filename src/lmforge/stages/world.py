"""The world stage: lmforge's built-in generated dataset and its oracle judge (`lmforge world`).

It writes the pretraining corpus, instruction data with deliberately flawed demonstrations, RL prompts and
held-out evaluation prompts (lmforge.world), byte-identical for the same preset and seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lmforge.cli import Command, Flag
from lmforge.errors import ConfigError
from lmforge.rundir import check_output_dir
from lmforge.stage import Stage, StageContext
from lmforge.world import DEFAULT_FLAW_RATES, PRESETS, generate_world


@dataclass
class WorldConfig:
    """`lmforge world` settings."""
    out: str = ""                   # output directory
    preset: str = "default"         # tiny or default: corpus size and number of records
    seed: int = 0
    flaw_rates: dict = field(default_factory=dict)  # impolite / verbose / wrong: share of flawed demonstrations

    def validate(self) -> None:
        if not self.out:
            raise ConfigError("out", "is required")
        if self.preset not in PRESETS:
            raise ConfigError("preset", f"is an unknown world preset {self.preset!r} (presets: {', '.join(PRESETS)})")
        for name, rate in self.flaw_rates.items():
            if name not in DEFAULT_FLAW_RATES:
                raise ConfigError(f"flaw_rates.{name}", f"is not a flaw (flaws: {', '.join(DEFAULT_FLAW_RATES)})")
            if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not 0 <= rate <= 1:
                raise ConfigError(f"flaw_rates.{name}", f"must be a number in [0, 1], got {rate!r}")


def run_world(cfg: WorldConfig) -> dict:
    """Generate the world into cfg.out; returns its manifest."""
    check_output_dir(cfg.out)
    return generate_world(cfg.out, cfg.preset, seed=cfg.seed, flaw_rates=cfg.flaw_rates or None)


def _print_summary(cfg: WorldConfig) -> None:
    c = run_world(cfg)["counts"]
    print(f"world '{cfg.preset}' (seed {cfg.seed}) -> {cfg.out}: corpus ~{c['corpus_tokens_est']:,} tokens, "
          f"{c['sft']} SFT records ({c['sft_flawed']['any']} flawed), {c['rl_prompts']} RL prompts, "
          f"{c['eval_prompts']} eval prompts")


COMMAND = Command(
    "lmforge world", "Generate the built-in world: a bilingual corpus, instruction data with flawed "
    "demonstrations, RL and evaluation prompts (judged by the oracle).", WorldConfig, _print_summary,
    flags=(Flag("--out", "out", "output directory"), Flag("--preset", "preset", "tiny or default"),
           Flag("--seed", "seed")),
    examples=("lmforge world --out runs/world --preset tiny",
              "lmforge world --out runs/world_clean flaw_rates.verbose=0.0 flaw_rates.wrong=0.0"))


def _wire(ctx: StageContext) -> dict:
    return {"out": ctx.dir("world"), "seed": ctx.seed}


STAGE = Stage("world", WorldConfig, lambda ctx, cfg: run_world(cfg), wire=_wire,
              outputs={"corpus": "corpus.txt", "sft_data": "sft.jsonl", "rl_prompts": "rl_prompts.jsonl",
                       "eval_prompts": "eval_prompts.jsonl"})
