"""SFT -> label -> reward -> PPO (or DPO, GRPO, RLOO) in one command, skipping finished stages and
resuming an interrupted one.

The label stage (rlhf/label/stage.py) samples the SFT policy's own replies and has them labelled (the
demo annotator, or people: ``labeler: campaign`` in its config stops the pipeline until they have, and
the same command continues); the reward stage and DPO then train on its pairs (train/validation) and
report their accuracy on its held-out pairs (test). Without the label stage (``label_config: null``)
they use their own configs' preference files.

    rlhf pipeline --config configs/pipeline.yaml [--output_root runs/demo] [--method dpo]
    rlhf pipeline --config configs/pipeline.yaml --rounds 2      # then labeling rounds (rlhf/app/rounds.py)

A stage is finished when its output directory holds metrics.json (written last); a training stage was
interrupted when ``<output_dir>.tmp`` holds a checkpoint, the label stage when its directory has no
metrics.json yet.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from rlhf.app.stages import METHODS, run_stage
from rlhf.core.config import build_config, load_yaml
from rlhf.core.errors import UserError
from rlhf.core.outputs import RunDir

logger = logging.getLogger(__name__)
DESCRIPTION = ("SFT -> label -> reward -> PPO (or DPO, GRPO, RLOO) in one command, skipping finished stages and "
               "resuming an interrupted one.")
PAIR_STAGES = ("reward", "dpo")
"""Stages that train on preference pairs: with a label stage, on its pairs."""


@dataclass
class PipelineArguments:
    """Which stage configs to run, and where their outputs go."""

    sft_config: str = "configs/sft.yaml"
    """Config of the SFT stage."""
    label_config: str | None = "configs/label.yaml"
    """Config of the label stage: pairs of the SFT policy's own replies, labelled (null = no label stage;
    the reward stage and DPO then train on their own configs' preference files)."""
    reward_config: str = "configs/reward.yaml"
    """Config of the reward stage."""
    method: str = "ppo"
    """The alignment stage after SFT and reward: ppo, dpo, grpo or rloo (each from the same SFT and reward runs)."""
    ppo_config: str = "configs/ppo.yaml"
    """Config of the PPO stage."""
    dpo_config: str = "configs/dpo.yaml"
    """Config of the DPO stage (method: dpo)."""
    grpo_config: str = "configs/grpo.yaml"
    """Config of the GRPO stage (method: grpo)."""
    rloo_config: str = "configs/rloo.yaml"
    """Config of the RLOO stage (method: rloo)."""
    output_root: str | None = None
    """If set, each stage writes to <output_root>/<stage> (else its config's output_dir)."""
    model_name_or_path: str | None = None
    """If set, overrides every stage's base model."""
    stages: list[str] | None = None
    """Run only these stages (default: all: sft, label, reward and the method)."""
    rounds: int = 0
    """Labeling rounds after the first PPO (rlhf/app/rounds.py, docs/rounds.md): each samples the current policy,
    has the pairs the reward model is least sure about labeled, retrains the reward model on all labels so
    far and continues PPO. 0 = none."""
    rounds_config: str = "configs/rounds.yaml"
    """Settings of the rounds: labeler (annotator or campaign), budget, random_share, reward_init..."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UserError(f"method: expected one of {', '.join(METHODS)}, found {self.method!r}")


def label_pair_files(label: Path) -> dict[str, str]:
    """The label stage's pair files as a pair-training stage's keys; a split it left empty is left out."""
    import json

    metrics = json.loads((label / "metrics.json").read_text())
    return {f"{split}_file": str(label / f"{split}.jsonl") for split in ("train", "validation", "test")
            if metrics.get(f"{split}_pairs")}


def stage_output(config_path: str, stage: str, root: str | None) -> str:
    if root:
        return str(Path(root) / stage)
    config = load_yaml(config_path)
    if "output_dir" not in config:
        raise UserError(f"{config_path}: expected an output_dir key (or set output_root in the pipeline config)")
    return str(config["output_dir"])


def run_pipeline(argv: list[str] | None = None) -> dict[str, str]:
    """Run the stages in order; returns {stage: output_dir}, plus ``waiting_for_labels`` (a campaign
    directory) when a stage stopped for people's labels."""
    (args,), _ = build_config([PipelineArguments], argv, prog="rlhf pipeline", description=DESCRIPTION)
    stages = ("sft", *(("label",) if args.label_config else ()), "reward", args.method)
    wanted = args.stages or list(stages)
    for s in wanted:
        if s not in stages:
            raise UserError(f"stages: expected some of {', '.join(stages)}, found {s!r}")
    configs = {"sft": args.sft_config, "label": args.label_config, "reward": args.reward_config,
               args.method: getattr(args, f"{args.method}_config")}
    outputs = {s: stage_output(configs[s], s, args.output_root) for s in stages}
    label = Path(outputs["label"]) if "label" in outputs else None
    if args.rounds and "ppo" not in outputs:
        raise UserError("rounds: labeling rounds continue a PPO policy; expected method: ppo, found another method")
    for stage in stages:
        if stage not in wanted:
            continue
        run_dir = RunDir(outputs[stage])
        if run_dir.is_complete():
            logger.info("%s: finished run in %s, skipping", stage, run_dir.final)
            continue
        config = {"config": configs[stage], "output_dir": outputs[stage]}
        if args.model_name_or_path and stage in ("sft", "reward"):
            config["model_name_or_path"] = args.model_name_or_path
        if stage == "label":
            config["sft_model"] = outputs["sft"]
        if stage in PAIR_STAGES and label is not None:
            config.update(label_pair_files(label))
        if stage == args.method:  # every method starts from the SFT run and its reward run
            config.update(sft_model=outputs["sft"], reward_model=outputs["reward"])
        if run_dir.last_checkpoint() is not None:
            logger.info("%s: resuming the interrupted run in %s", stage, run_dir.work)
            config["resume"] = True
        logger.info("%s: running %s", stage, config)
        result = run_stage(stage, config)
        if "waiting_for_labels" in result:  # people label the campaign; the same command continues
            outputs["waiting_for_labels"] = result["waiting_for_labels"]
            return outputs
    if args.rounds:
        from rlhf.app.rounds import run_rounds

        if any(not RunDir(outputs[s]).is_complete() for s in ("sft", "reward", "ppo")):
            raise UserError("rounds: expected finished sft, reward and ppo runs to start from; run those stages first")
        result = run_rounds(args.rounds, args.rounds_config, configs, outputs, args.model_name_or_path)
        if result["waiting_for_labels"]:
            outputs["waiting_for_labels"] = result["waiting_for_labels"]
    return outputs
