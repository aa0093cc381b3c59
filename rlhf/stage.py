"""What SFT and reward stages share around a TRL trainer: config, run directory, resume, outputs."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from rlhf.config import build_config, save_resolved_config
from rlhf.data import DataArguments
from rlhf.errors import UserError
from rlhf.models import ModelArguments
from rlhf.outputs import RunDir, history_series, plot_curves, write_json

logger = logging.getLogger(__name__)


def trainer_defaults() -> dict[str, Any]:
    """Defaults we change from TRL's, and why.

    - bf16 only where the hardware has it (TRL turns it on everywhere).
    - no gradient checkpointing by default: these models are small and it costs ~30 % speed.
    - evaluate and save every 20 steps and keep the best checkpoint by validation loss.
    - trackers off unless ``report_to`` asks (tensorboard, wandb offline...).
    """
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return {
        "bf16": bf16,
        "gradient_checkpointing": False,
        "report_to": "none",
        "logging_steps": 5,
        "eval_strategy": "steps",
        "save_strategy": "steps",
        "eval_steps": 20,
        "save_steps": 20,
        "save_total_limit": 2,
        "load_best_model_at_end": True,
        "metric_for_best_model": "eval_loss",
        "greater_is_better": False,
        "num_train_epochs": 1,
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 16,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 0.05,
        "max_length": 256,
        "output_dir": "runs/stage",
    }


@dataclass
class TrainerStageArguments:
    """Settings every Trainer-based stage has beyond TRL's config."""

    early_stopping_patience: int | None = 3
    """Stop after this many evaluations without a better validation metric (None = never)."""

    def __post_init__(self) -> None:
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            raise UserError(f"early_stopping_patience: expected >= 1 or null, found {self.early_stopping_patience}")


def stage_callbacks(stage: "StageRun", has_validation: bool, callbacks: list | None) -> list:
    """Early stopping (when there is validation data) plus the caller's callbacks."""
    from transformers import EarlyStoppingCallback

    args = stage.training_args
    if not has_validation:
        args.eval_strategy = "no"
        args.load_best_model_at_end = False
    extra = list(callbacks or [])
    if has_validation and stage.stage_args.early_stopping_patience:
        extra.append(EarlyStoppingCallback(stage.stage_args.early_stopping_patience))
    return extra


@dataclass
class StageRun:
    """A parsed stage config and its run directory."""

    model_args: ModelArguments
    data_args: DataArguments
    stage_args: Any
    training_args: Any
    given: dict[str, Any]
    run: RunDir
    resume: bool
    overwrite: bool
    started: float = field(default_factory=time.time)

    def prepare(self) -> str | None:
        """Create the work dir (after data validated) and point the trainer at it."""
        checkpoint = self.run.prepare(self.resume, self.overwrite)
        self.training_args.output_dir = str(self.run.work)
        self.training_args.logging_dir = str(self.run.work / "logs")
        return str(checkpoint) if checkpoint else None


def parse_stage(stage_class: type, training_class: type, argv: list[str] | None,
                values: dict[str, Any] | None = None, defaults: dict[str, Any] | None = None) -> StageRun:
    """Build a stage's four config dataclasses from YAML/values/command line."""
    (model_args, data_args, stage_args, training_args), given = build_config(
        [ModelArguments, DataArguments, stage_class, training_class],
        argv,
        values=values,
        extra_keys=("resume", "overwrite_output_dir"),
        defaults={**trainer_defaults(), **(defaults or {})},
    )
    if not os.environ.get("WANDB_API_KEY"):
        os.environ.setdefault("WANDB_MODE", "offline")
    return StageRun(
        model_args, data_args, stage_args, training_args, given,
        run=RunDir(training_args.output_dir),
        resume=bool(given.get("resume", False)),
        overwrite=bool(given.get("overwrite_output_dir", False)),
    )


def train_with_resume(trainer, checkpoint: str | None) -> dict[str, float]:
    result = trainer.train(resume_from_checkpoint=checkpoint)
    return {k: v for k, v in result.metrics.items() if k not in ("total_flos",)}


def finish_stage(stage: StageRun, trainer, tokenizer, metrics: dict[str, Any], title: str,
                 curve_keys: list[list[str]], extra: Callable[[Any], None] | None = None) -> dict[str, Any]:
    """Save model, tokenizer, resolved config, metrics.json and curves; then move the run into place."""
    work = stage.run.work
    trainer.save_model(str(work))
    tokenizer.save_pretrained(str(work))
    save_resolved_config(work / "config.yaml", [stage.model_args, stage.data_args, stage.stage_args], stage.given)
    history = trainer.state.log_history
    keys = [k for panel in curve_keys for k in panel]
    plot_curves(work / "curves.png", history_series(history, keys), title, panels=curve_keys)
    if extra:
        extra(work)
    # Counters that restart on resume or depend on machine speed would make a resumed run's
    # metrics differ from an uninterrupted one; wall time is reported on its own.
    metrics = {k: v for k, v in metrics.items()
               if "num_tokens" not in k and "runtime" not in k and "per_second" not in k}
    metrics = {**metrics, "wall_seconds": round(time.time() - stage.started, 1)}
    write_json(work / "metrics.json", metrics)
    write_json(work / "log_history.json", history)
    final = stage.run.finalize()
    logger.info("wrote %s", final)
    return metrics
