"""The one registry of stages: name -> module and one line of help.

Every stage module has the same entry point,

    run(config: dict | None = None, hooks: StageHooks | None = None, *, argv: list[str] | None = None) -> dict

``config`` holds the keys of the stage's YAML (``"config"`` may name the YAML file itself, so errors name
it), ``argv`` command-line tokens (``--key value``, ``--config file.yaml``) which win over ``config``,
and ``hooks`` (rlhf/core/hooks.py) hear logs, evaluations and checkpoints; it returns the run's metrics.
The ``rlhf`` command, the pipeline, the labeling rounds, the sweep and experiments/compare_methods.py
all run stages through :func:`run_stage`:

    run_stage("ppo", {"config": "configs/ppo.yaml", "output_dir": "runs/x/ppo", "sft_model": "runs/x/sft"})
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from typing import Any

from rlhf.core.errors import UserError
from rlhf.core.hooks import StageHooks


@dataclass(frozen=True)
class Stage:
    """One stage: where its ``run`` lives and what it does."""

    name: str
    module: str
    description: str
    method: bool = False
    """An alignment method after SFT and reward: starts from ``sft_model``, judged by ``reward_model``."""

    def run(self, config: dict[str, Any] | None = None, hooks: StageHooks | None = None, *,
            argv: list[str] | None = None) -> dict:
        # Looked up at call time, so a test can wrap a stage's run with monkeypatch.
        return importlib.import_module(self.module).run(config, hooks, argv=argv)


STAGES: dict[str, Stage] = {stage.name: stage for stage in (
    Stage("sft", "sft.train", "supervised fine-tuning (TRL SFTTrainer, loss on the replies)"),
    Stage("label", "rlhf.label.stage", "preference pairs of the SFT policy's own replies, labelled (annotator or people)"),
    Stage("reward", "reward.train", "reward model: a LoRA adapter + score head on preference pairs"),
    Stage("ppo", "rlhf.ppo.trainer", "PPO against the reward model, policy/reference/reward/value on one base",
          method=True),
    Stage("dpo", "rlhf.methods.dpo", "DPO on the preference pairs, from the SFT adapter", method=True),
    Stage("grpo", "rlhf.methods.grpo", "GRPO (TRL) with the reward adapter as its reward", method=True),
    Stage("rloo", "rlhf.methods.rloo", "RLOO (TRL) with the reward adapter as its reward", method=True),
)}
METHODS = tuple(name for name, stage in STAGES.items() if stage.method)
"""The alignment stages that can follow SFT and reward: ppo, dpo, grpo, rloo."""


def get_stage(name: str) -> Stage:
    """The stage called ``name``; an unknown name is an error with the closest ones."""
    if name not in STAGES:
        close = difflib.get_close_matches(name, list(STAGES), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise UserError(f"stage: expected one of {', '.join(STAGES)}, found {name!r}{hint}")
    return STAGES[name]


def run_stage(name: str, config: dict[str, Any] | None = None, hooks: StageHooks | None = None, *,
              argv: list[str] | None = None) -> dict:
    """Run stage ``name`` in this process; returns its metrics."""
    return get_stage(name).run(config, hooks, argv=argv)
