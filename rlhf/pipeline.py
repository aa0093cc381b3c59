"""SFT -> reward -> PPO in one command, skipping finished stages and resuming an interrupted one.

    rlhf pipeline --config configs/pipeline.yaml [--output_root runs/demo]

A stage is finished when its output directory exists (outputs are renamed into place only when a
stage completes); it was interrupted when ``<output_dir>.tmp`` holds a checkpoint.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from rlhf.config import build_config, load_yaml
from rlhf.errors import UserError
from rlhf.outputs import RunDir

logger = logging.getLogger(__name__)
STAGES = ("sft", "reward", "ppo")


@dataclass
class PipelineArguments:
    """Which stage configs to run, and where their outputs go."""

    sft_config: str = "configs/sft.yaml"
    """Config of the SFT stage."""
    reward_config: str = "configs/reward.yaml"
    """Config of the reward stage."""
    ppo_config: str = "configs/ppo.yaml"
    """Config of the PPO stage."""
    output_root: str | None = None
    """If set, each stage writes to <output_root>/<stage> (else its config's output_dir)."""
    model_name_or_path: str | None = None
    """If set, overrides every stage's base model."""
    stages: list[str] | None = None
    """Run only these stages (default: all three)."""


def stage_output(config_path: str, stage: str, root: str | None) -> str:
    if root:
        return str(Path(root) / stage)
    config = load_yaml(config_path)
    if "output_dir" not in config:
        raise UserError(f"{config_path}: expected an output_dir key (or set output_root in the pipeline config)")
    return str(config["output_dir"])


def run_pipeline(argv: list[str] | None = None) -> dict[str, str]:
    """Run the stages in order; returns {stage: output_dir}."""
    from reward.train import run as run_reward
    from rlhf.ppo import run as run_ppo
    from sft.train import run as run_sft

    (args,), _ = build_config([PipelineArguments], argv)
    wanted = args.stages or list(STAGES)
    for s in wanted:
        if s not in STAGES:
            raise UserError(f"stages: expected some of {', '.join(STAGES)}, found {s!r}")
    configs = {"sft": args.sft_config, "reward": args.reward_config, "ppo": args.ppo_config}
    outputs = {s: stage_output(configs[s], s, args.output_root) for s in STAGES}
    runners = {"sft": run_sft, "reward": run_reward, "ppo": run_ppo}
    for stage in STAGES:
        if stage not in wanted:
            continue
        run_dir = RunDir(outputs[stage])
        if run_dir.is_complete():
            logger.info("%s: finished run in %s, skipping", stage, run_dir.final)
            continue
        argv_stage = ["--config", configs[stage], "--output_dir", outputs[stage]]
        if args.model_name_or_path and stage != "ppo":
            argv_stage += ["--model_name_or_path", args.model_name_or_path]
        if stage == "ppo":
            argv_stage += ["--sft_model", outputs["sft"], "--reward_model", outputs["reward"]]
        if run_dir.last_checkpoint() is not None:
            logger.info("%s: resuming the interrupted run in %s", stage, run_dir.work)
            argv_stage.append("--resume")
        logger.info("%s: running %s", stage, " ".join(argv_stage))
        runners[stage](argv_stage)
    return outputs
