"""What a caller hears while a stage runs: one interface for every stage, PPO's own loop and TRL's alike.

    from rlhf.app.stages import run_stage

    class Report(StageHooks):
        def on_evaluate(self, step, metrics):
            print(step, metrics)

    run_stage("sft", {"config": "configs/sft.yaml", "output_dir": "runs/x"}, Report())

Every method is a no-op by default; a caller overrides the ones it needs. A hook may raise to end the
run: :class:`StopTraining` ends it early and still finishes it (the model, the final evaluation and
the outputs are written, from the step it stopped at); any other exception (optuna's ``TrialPruned``,
a test's ``KeyboardInterrupt``) aborts it, leaving its checkpoints for ``--resume``. Under several
processes every hook runs on each of them with the same step; one that stops must stop on all.

The Trainer-based stages (SFT, reward, DPO, GRPO, RLOO) hear the events through
:func:`as_trainer_callback`; PPO calls the hooks from its loop (rlhf/ppo/trainer.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class StopTraining(Exception):
    """Raised by a hook to end training at this step and finish the run normally (e.g. a time budget)."""


class StageHooks:
    """Events of a running stage, called on every process. Override what you need."""

    def on_log(self, step: int, logs: dict[str, Any]) -> None:
        """Training statistics were logged at optimizer step ``step`` (every ``logging_steps``)."""

    def on_evaluate(self, step: int, metrics: dict[str, Any]) -> None:
        """An evaluation was made at ``step`` (validation during training; held-out figures at the end)."""

    def on_checkpoint(self, step: int, path: Path) -> None:
        """A checkpoint of ``step`` was written completely to ``path`` (a ``--resume`` would start there)."""

    def trainer_callbacks(self) -> list:
        """Trainer-based stages only: extra ``transformers.TrainerCallback`` objects, for what the events
        above do not tell (per-step timings in bench/, tests that look at a batch or at the model).
        PPO runs no Trainer and refuses hooks that return any."""
        return []


class _WithCallbacks(StageHooks):
    def __init__(self, callbacks: list):
        self._callbacks = list(callbacks)

    def trainer_callbacks(self) -> list:
        return self._callbacks


def with_trainer_callbacks(*callbacks) -> StageHooks:
    """Hooks that only add these TrainerCallbacks to a Trainer-based stage."""
    return _WithCallbacks(list(callbacks))


def as_trainer_callback(hooks: StageHooks):
    """A ``transformers.TrainerCallback`` that forwards the Trainer's log, evaluate and save events to ``hooks``.

    ``on_save`` comes after the Trainer wrote ``checkpoint-<step>`` completely. A :class:`StopTraining`
    from a hook makes this step the last one: the Trainer saves it and ends training, and the stage
    finishes as after its last step.
    """
    from transformers import TrainerCallback

    class StageHooksCallback(TrainerCallback):
        def _call(self, control, hook, *args) -> None:
            try:
                hook(*args)
            except StopTraining:
                control.should_training_stop = True
                control.should_save = True  # the run ends at a checkpoint like any other

        def on_log(self, args, state, control, logs=None, **kwargs):
            self._call(control, hooks.on_log, state.global_step, dict(logs or {}))

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            self._call(control, hooks.on_evaluate, state.global_step, dict(metrics or {}))

        def on_save(self, args, state, control, **kwargs):
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            try:
                hooks.on_checkpoint(state.global_step, path)
            except StopTraining:
                control.should_training_stop = True

    return StageHooksCallback()
