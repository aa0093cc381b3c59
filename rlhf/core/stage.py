"""What SFT and reward stages share around a TRL trainer: config, run directory, resume, outputs."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from rlhf.core.allocator import keep_freed_memory
from rlhf.core.config import build_config
from rlhf.core.data import DataArguments
from rlhf.core.errors import UserError
from rlhf.core.hooks import StageHooks, as_trainer_callback
from rlhf.core.models import ModelArguments
from rlhf.core.outputs import RunDir, wandb_offline_without_key, write_run_outputs

logger = logging.getLogger(__name__)


def trainer_defaults() -> dict[str, Any]:
    """Defaults we change from TRL's, and why.

    - bf16 only where the hardware has it (TRL turns it on everywhere); use_cpu on CPU machines.
    - no gradient checkpointing by default: these models are small and it costs ~30 % speed.
    - evaluate and save every 20 steps and keep the best checkpoint by validation loss.
    - trackers off unless ``report_to`` asks (tensorboard, wandb offline...).
    """
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return {
        "bf16": bf16,
        # Without it, several processes on a CPU machine each believe they are alone (no gloo group).
        "use_cpu": not torch.cuda.is_available(),
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


def stage_callbacks(stage: "StageRun", has_validation: bool, hooks: StageHooks | None) -> list:
    """Early stopping (when there is validation data) plus the caller's hooks, as TrainerCallbacks."""
    from transformers import EarlyStoppingCallback

    args = stage.training_args
    if not has_validation:
        args.eval_strategy = "no"
        args.load_best_model_at_end = False
    extra = [as_trainer_callback(hooks), *hooks.trainer_callbacks()] if hooks is not None else []
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
    parameter_counts: dict[str, Any] = field(default_factory=dict)

    def prepare(self) -> str | None:
        """Create the work dir (after data validated), point the trainer at it and seed the RNG.

        The seed is set here, before the model is built, because new weights (LoRA A matrices, a
        reward score head, prompt embeddings) are drawn from the global RNG; the Trainer only seeds
        it later, in its constructor, so without this the same config gave a different adapter.
        """
        from transformers import set_seed

        from accelerate import PartialState

        # Under several processes only the main one touches the run directory; the others wait.
        state = PartialState(cpu=not torch.cuda.is_available())
        checkpoint = self.run.prepare_on_main(self.resume, self.overwrite, state)
        self.training_args.output_dir = str(self.run.work)
        self.training_args.logging_dir = str(self.run.work / "logs")
        set_seed(self.training_args.seed)
        return str(checkpoint) if checkpoint else None


def parse_stage(stage_class: type, training_class: type, config: dict[str, Any] | None = None, *,
                argv: list[str] | None = None, defaults: dict[str, Any] | None = None, prog: str | None = None,
                description: str = "", commands: dict[str, str] | None = None) -> StageRun:
    """Build a stage's four config dataclasses from its defaults, ``config`` (a dict of keys, which may
    name a YAML file under ``config``) and ``argv`` (``--key value`` tokens, which win)."""
    import dataclasses

    classes = [ModelArguments, DataArguments, stage_class, training_class]
    # Our trainer defaults apply to the keys this stage has (GRPOConfig/RLOOConfig have no max_length).
    known = {f.name for cls in classes for f in dataclasses.fields(cls)}
    (model_args, data_args, stage_args, training_args), given = build_config(
        classes,
        argv,
        values=config,
        extra_keys=("resume", "overwrite_output_dir"),
        defaults={**{k: v for k, v in trainer_defaults().items() if k in known}, **(defaults or {})},
        prog=prog, description=description, commands=commands,
    )
    wandb_offline_without_key()
    keep_freed_memory()
    return StageRun(
        model_args, data_args, stage_args, training_args, given,
        run=RunDir(training_args.output_dir),
        resume=bool(given.get("resume", False)),
        overwrite=bool(given.get("overwrite_output_dir", False)),
    )


def build_stage_model(stage: "StageRun", task: str):
    """The base model for ``task`` ('causal-lm' or 'seq-cls') wrapped by the configured PEFT method.

    Returns (model, peft_config or None). For 'seq-cls', peft trains and saves the score head too.
    """
    from peft import get_peft_model

    from rlhf.core.models import build_peft_config, count_parameters, load_base_model

    model = load_base_model(stage.model_args, task, stage.training_args.gradient_checkpointing)
    peft_config = build_peft_config(stage.model_args, model, task)
    if peft_config is not None:
        model = get_peft_model(model, peft_config)
    trainable, total = count_parameters(model)
    logger.info("%s: %s trainable of %s parameters (%s)", task, trainable, total, stage.model_args.peft_method)
    stage.parameter_counts = {"trainable_parameters": trainable, "total_parameters": total,
                              "peft_method": stage.model_args.peft_method}
    return model, peft_config


def make_trainer(stage: "StageRun", trainer_class: type, model, tokenizer, data: dict, hooks: StageHooks | None):
    """A TRL trainer on the stage's train/validation data, with early stopping and the caller's hooks."""
    trainer = trainer_class(
        model=model,
        args=stage.training_args,
        train_dataset=data["train"],
        eval_dataset=data.get("validation"),
        processing_class=tokenizer,
        callbacks=stage_callbacks(stage, "validation" in data, hooks),
    )
    if stage.model_args.peft_method.startswith("qlora"):
        # float16 compute trains float32 parameters under autocast (the grad scaler refuses fp16 ones).
        bf16 = stage.model_args.torch_dtype == "bfloat16"
        match_trainable_dtype(trainer.model, torch.bfloat16 if bf16 else torch.float32)
    return trainer


def match_trainable_dtype(model, dtype: torch.dtype) -> None:
    """Give the trainable parameters the dtype the quantised base computes in.

    TRL's trainers cast them to bfloat16 on a quantised base (the QLoRA paper's bf16 setting). With
    a float32 compute dtype (the CPU default) a reward model's score head then meets float32 hidden
    states and the first forward fails ("expected m1 and m2 to have the same dtype"). Runs before
    training, so the optimizer is built on the cast parameters.
    """
    for param in model.parameters():
        if param.requires_grad and param.dtype != dtype and param.is_floating_point():
            param.data = param.data.to(dtype)


def log_at_checkpoints():
    """A TrainerCallback that makes every checkpoint step a logging step.

    A resumed Trainer starts a fresh logging window at the checkpoint, and the losses of the steps
    before it are known only through the logged windows (:func:`whole_run_train_loss`). With a
    checkpoint inside a window (save_steps 9, logging_steps 5: the window 6-10) the resumed run logged
    a different loss at step 10 than an uninterrupted one and its train_loss was off. Logging at
    each save, in every run, closes a window there, so both runs log the same windows.
    """
    from transformers import TrainerCallback

    class LogAtCheckpoints(TrainerCallback):
        def _log_if_saving(self, args, control):
            # "best" decides to save after evaluating, which comes after logging: log at every evaluation.
            if control.should_save or (args.save_strategy == "best" and control.should_evaluate):
                control.should_log = True
            return control

        def on_step_end(self, args, state, control, **kwargs):
            return self._log_if_saving(args, control)

        def on_epoch_end(self, args, state, control, **kwargs):
            return self._log_if_saving(args, control)

    return LogAtCheckpoints()


def train_with_resume(trainer, checkpoint: str | None) -> dict[str, float]:
    """Train (from ``checkpoint`` when resuming); ``train_loss`` is the whole run's either way."""
    trainer.add_callback(log_at_checkpoints())  # in uninterrupted runs too, so their logs match resumed ones
    if checkpoint:
        logger.info("resuming from %s", checkpoint)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    metrics = {k: v for k, v in result.metrics.items() if k not in ("total_flos",)}
    if checkpoint and "train_loss" in metrics:
        resumed_at = json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"]
        since_resume = metrics["train_loss"]
        metrics["train_loss"] = whole_run_train_loss(
            trainer.state.log_history, since_resume, resumed_at, trainer.state.global_step)
        # The Trainer also logged its since-resume mean as the run's last entry (log_history.json).
        for entry in reversed(trainer.state.log_history):
            if entry.get("train_loss") == since_resume:
                entry["train_loss"] = metrics["train_loss"]
                break
    return metrics


def evaluate_split(trainer, dataset, name: str) -> dict[str, float]:
    """The trained model's metrics on one held-out split, filed under its name (``test_loss``, ...).

    Early stopping is over once training is, and comes off first: on metrics named after a split
    (``test_loss``, not ``eval_loss``) it would warn that early stopping is disabled. TRL logs its
    own metrics as ``eval_*`` whatever the prefix, so those are renamed to the split's.
    """
    from transformers import EarlyStoppingCallback

    trainer.remove_callback(EarlyStoppingCallback)
    found = trainer.evaluate(dataset, metric_key_prefix=name)
    return {(f"{name}_{k[5:]}" if k.startswith("eval_") else k): v for k, v in found.items()}


def whole_run_train_loss(log_history: list[dict], resumed_loss: float, resumed_at: int, final_step: int) -> float:
    """Mean training loss over every step of a resumed run.

    The Trainer reports the mean over the steps trained since the resume only, so a resumed run's
    metrics would differ from an uninterrupted one. The steps before the checkpoint are recovered
    from the logged ``loss`` values, each the mean of its logging window (weighted by its length);
    this is exact when the checkpoint step is a logging step, which :func:`log_at_checkpoints`
    ensures (a checkpoint written without it may fall inside a window: then it is an estimate).
    """
    total, covered, last = 0.0, 0, 0
    for entry in log_history:
        step = entry.get("step", 0)
        if "loss" in entry and last < step <= resumed_at:
            total += entry["loss"] * (step - last)
            covered, last = covered + step - last, step
    if covered == 0 or final_step <= resumed_at:
        return resumed_loss
    before = total / covered
    return (before * resumed_at + resumed_loss * (final_step - resumed_at)) / final_step


def finish_stage(stage: StageRun, trainer, tokenizer, metrics: dict[str, Any], title: str,
                 curve_keys: list[list[str]], extra: Callable[[Any], None] | None = None) -> dict[str, Any]:
    """Save model, tokenizer, resolved config, metrics.json and curves; then move the run into place."""
    work = stage.run.work
    trainer.save_model(str(work))  # collective under FSDP/DeepSpeed: every process calls it
    if not trainer.is_world_process_zero():
        trainer.accelerator.wait_for_everyone()
        return metrics
    if extra:
        extra(work)
    # Counters that restart on resume or depend on machine speed would make a resumed run's
    # metrics differ from an uninterrupted one; wall time is reported on its own.
    metrics = {k: v for k, v in metrics.items()
               if "num_tokens" not in k and "runtime" not in k and "per_second" not in k}
    metrics = write_run_outputs(stage.run, tokenizer, [stage.model_args, stage.data_args, stage.stage_args],
                                stage.given, metrics, trainer.state.log_history, title, curve_keys, stage.started)
    trainer.accelerator.wait_for_everyone()
    return metrics
