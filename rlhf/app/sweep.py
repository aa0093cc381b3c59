"""``rlhf sweep``: hyper-parameter search over any config key of a stage, with optuna.

    rlhf sweep --config configs/sft.yaml --space configs/sweep/sft.yaml --trials 20 --study runs/sweep/sft
    rlhf sweep --config configs/dpo.yaml --space configs/sweep/dpo.yaml --trials 12 --study runs/sweep/dpo \
        --max_steps 30            # any other --key value goes to every trial

The search space is a small YAML, one config key per entry (docs/sweep.md):

    learning_rate: {type: float, low: 1.0e-5, high: 1.0e-3, log: true}
    lora_r: {type: int, low: 4, high: 32, step: 4}
    loss_type: {type: categorical, choices: [sigmoid, ipo]}

Each trial is one run of the stage (its config plus the trial's values) into ``<study>/trials/<n>``.
The objective is the stage's own held-out figure (:data:`OBJECTIVES`). Trials report an intermediate
figure at each evaluation or log (a TrainerCallback), so the pruner (median by default) stops bad
ones early; PPO runs its own loop, without Trainer callbacks: its trials are never pruned.

The study is a SQLite file, ``<study>/study.db``: killing the sweep and running the same command again
continues it. Finished and pruned trials are kept; a trial that was running when the sweep died is
marked failed and its values are queued again, so it is re-run from the start. One sweep process per
study. At the end (and after each trial): ``best_config.yaml`` (the stage config with the best
trial's values, ready for ``rlhf <stage> --config``), ``trials.md`` (a table of every trial) and
``search.png`` (optimization history and parameter importances, optuna's matplotlib plots).
"""

from __future__ import annotations

import argparse
import importlib
import io
import logging
import math
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from rlhf.core.config import load_yaml
from rlhf.core.errors import UserError

logger = logging.getLogger(__name__)

STAGE_MODULES = {"sft": "sft.train", "reward": "reward.train", "ppo": "rlhf.ppo.trainer",
                 "dpo": "rlhf.methods.dpo", "grpo": "rlhf.methods.grpo", "rloo": "rlhf.methods.rloo"}
POLICY_STAGES = ("ppo", "dpo", "grpo", "rloo")
OBJECTIVES = {
    "sft": ("minimize", "validation loss of the final (best) model", "eval_loss"),
    "reward": ("maximize", "validation pairwise accuracy of the final (best) model", "eval_accuracy"),
    "ppo": ("maximize", "held-out reward-model score minus the KL budget penalty", None),
    "dpo": ("maximize", "held-out reward-model score minus the KL budget penalty", "eval_rewards/margins"),
    "grpo": ("maximize", "held-out reward-model score minus the KL budget penalty", "reward"),
    "rloo": ("maximize", "held-out reward-model score minus the KL budget penalty", "reward"),
}
"""stage -> (direction, objective, the logged figure each trial reports on the way for pruning)."""
KINDS = ("float", "int", "categorical")


# ----------------------------------------------------------------------------------------------
# The search space
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """One searched config key."""

    name: str
    kind: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple | None = None

    def suggest(self, trial) -> Any:
        if self.kind == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return trial.suggest_categorical(self.name, list(self.choices))


def load_space(path: str | os.PathLike) -> list[Param]:
    """Read a search-space YAML; every mistake names the file, the key and what was expected."""
    space = load_yaml(path)
    if not space:
        raise UserError(f"{path}: expected at least one key to search, found none")
    params = []
    for name, spec in space.items():
        where = f"{path}: key '{name}'"
        if not isinstance(spec, dict):
            raise UserError(f"{where}: expected a mapping like {{type: float, low: 1e-5, high: 1e-3, log: true}}, "
                            f"found {spec!r}")
        kind = spec.get("type")
        if kind not in KINDS:
            raise UserError(f"{where}: type: expected one of {', '.join(KINDS)}, found {kind!r}")
        allowed = {"type", "choices"} if kind == "categorical" else {"type", "low", "high", "log", "step"}
        unknown = sorted(set(spec) - allowed)
        if unknown:
            raise UserError(f"{where}: expected only {', '.join(sorted(allowed))}, found {', '.join(unknown)}")
        if kind == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, list) or not choices:
                raise UserError(f"{where}: choices: expected a non-empty list, found {choices!r}")
            params.append(Param(name, kind, choices=tuple(choices)))
            continue
        low, high = spec.get("low"), spec.get("high")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or not low < high:
            raise UserError(f"{where}: expected numbers low < high, found low={low!r} high={high!r}")
        log = bool(spec.get("log", False))
        if log and low <= 0:
            raise UserError(f"{where}: log: true needs low > 0, found {low}")
        if kind == "int" and (int(low) != low or int(high) != high):
            raise UserError(f"{where}: type int: expected whole numbers, found low={low} high={high}")
        step = spec.get("step")
        if step is not None and log:
            raise UserError(f"{where}: expected either step or log: true, found both")
        params.append(Param(name, kind, float(low), float(high), log, step))
    return params


# ----------------------------------------------------------------------------------------------
# The objective
# ----------------------------------------------------------------------------------------------


def objective_value(stage: str, metrics: dict[str, Any], kl_budget: float, kl_penalty: float) -> float:
    """The figure a trial is judged by (OBJECTIVES); ``metrics`` is the run's metrics.json.

    Policy stages: ``eval_policy_reward_model_score - kl_penalty * max(0, eval_policy_kl_to_reference
    - kl_budget)``, both measured on held-out prompts against the SFT reference: reward the model
    earns within ``kl_budget`` nats per reply counts fully, reward bought with more drift is taxed
    (a reward model is easy to exploit far from the data it was trained on).
    """
    if stage == "sft":
        return float(metrics["validation_loss"])
    if stage == "reward":
        return float(metrics["validation_accuracy"])
    try:
        score, kl = metrics["eval_policy_reward_model_score"], metrics["eval_policy_kl_to_reference"]
    except KeyError:
        raise UserError(f"{stage}: the sweep objective needs the held-out evaluation (eval_prompts > 0 and a "
                        "reward_model in the stage config), found no eval_policy_* metrics")
    return float(score) - kl_penalty * max(0.0, float(kl) - kl_budget)


def reward_validation_accuracy(run_dir: Path) -> float | None:
    """The reward run's validation accuracy: its metrics say so only when there is no test split."""
    import json

    history = json.loads((run_dir / "log_history.json").read_text())
    found = [e["eval_accuracy"] for e in history if "eval_accuracy" in e]
    return max(found) if found else None


def pruning_callback(trial, key: str) -> Any:
    """A TrainerCallback that reports ``key`` (an evaluation or a logged figure) and prunes the trial."""
    import optuna
    from transformers import TrainerCallback

    class ReportAndPrune(TrainerCallback):
        def _report(self, state, values: dict) -> None:
            value = values.get(key)
            if value is None or not math.isfinite(value):
                return
            trial.report(float(value), step=state.global_step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"{key} = {value:.4g} at step {state.global_step}")

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            self._report(state, metrics or {})

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not key.startswith("eval_"):
                self._report(state, logs or {})

    return ReportAndPrune()


# ----------------------------------------------------------------------------------------------
# The study
# ----------------------------------------------------------------------------------------------


@dataclass
class SweepArguments:
    config: str
    space: str
    trials: int
    study: str
    stage: str
    overrides: list[str]
    sampler: str = "tpe"
    pruner: str = "median"
    seed: int = 0
    kl_budget: float = 4.0
    kl_penalty: float = 0.1


def infer_stage(config: str, stage: str | None) -> str:
    if stage:
        if stage not in STAGE_MODULES:
            raise UserError(f"--stage: expected one of {', '.join(STAGE_MODULES)}, found {stage!r}")
        return stage
    name = Path(config).stem
    if name not in STAGE_MODULES:
        raise UserError(f"--config {config}: cannot tell the stage from the file name; pass --stage "
                        f"({', '.join(STAGE_MODULES)})")
    return name


def make_study(args: SweepArguments, pruner=None):
    import optuna

    study_dir = Path(args.study)
    study_dir.mkdir(parents=True, exist_ok=True)
    sampler = {"tpe": lambda: optuna.samplers.TPESampler(seed=args.seed),
               "random": lambda: optuna.samplers.RandomSampler(seed=args.seed)}[args.sampler]()
    if pruner is None:
        pruner = {"median": lambda: optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0),
                  "none": optuna.pruners.NopPruner}[args.pruner]()
    return optuna.create_study(
        study_name=f"{args.stage}-sweep", storage=f"sqlite:///{(study_dir / 'study.db').resolve()}",
        load_if_exists=True, direction=OBJECTIVES[args.stage][0], sampler=sampler, pruner=pruner)


def requeue_interrupted(study, trials_dir: Path) -> int:
    """Trials left RUNNING by a killed sweep: mark them failed, queue their values again."""
    from optuna.trial import TrialState

    count = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        logger.info("trial %d was interrupted: marked failed, its values queued to run again", trial.number)
        study.tell(trial.number, state=TrialState.FAIL)
        study.enqueue_trial(trial.params, user_attrs={"rerun_of": trial.number})
        for leftover in (trials_dir / str(trial.number), trials_dir / f"{trial.number}.tmp"):
            shutil.rmtree(leftover, ignore_errors=True)
        count += 1
    return count


def run_sweep(args: SweepArguments, callbacks: list | None = None, pruner=None):
    """Run (or continue) the study until ``args.trials`` trials finished or were pruned; returns it."""
    import optuna
    from optuna.trial import TrialState

    params = load_space(args.space)
    base_config = load_yaml(args.config)
    direction, _, report_key = OBJECTIVES[args.stage]
    run_stage: Callable = importlib.import_module(STAGE_MODULES[args.stage]).run
    study_dir = Path(args.study)
    trials_dir = study_dir / "trials"
    study = make_study(args, pruner)
    requeue_interrupted(study, trials_dir)

    def objective(trial) -> float:
        values = {p.name: p.suggest(trial) for p in params}
        out = trials_dir / str(trial.number)
        argv = ["--config", args.config, *args.overrides, "--output_dir", str(out), "--overwrite_output_dir", "true"]
        logger.info("trial %d: %s", trial.number, values)
        trial.set_user_attr("run_dir", str(out))
        try:
            if args.stage == "ppo":  # its own loop: no Trainer callbacks, so no intermediate reports
                metrics = run_stage(argv, values=values)
            else:
                extra = list(callbacks or []) + ([pruning_callback(trial, report_key)] if report_key else [])
                metrics = run_stage(argv, values=values, callbacks=extra)
        except optuna.TrialPruned:
            shutil.rmtree(out.with_name(out.name + ".tmp"), ignore_errors=True)  # nothing to resume, ever
            raise
        if args.stage == "reward" and "validation_accuracy" not in metrics:
            metrics = {**metrics, "validation_accuracy": reward_validation_accuracy(out)}
        return objective_value(args.stage, metrics, args.kl_budget, args.kl_penalty)

    def done() -> int:
        return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))

    def after_trial(study, trial) -> None:
        write_reports(study, args, base_config, params)
        if done() >= args.trials:
            study.stop()

    if done() < args.trials:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.optimize(objective, n_trials=args.trials - done(), callbacks=[after_trial])
    write_reports(study, args, base_config, params)
    return study


# ----------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------


def write_reports(study, args: SweepArguments, base_config: dict, params: list[Param]) -> None:
    """best_config.yaml, trials.md and search.png in the study directory."""
    from optuna.trial import TrialState

    study_dir = Path(args.study)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    if complete:
        best = study.best_trial
        config = {**base_config, **{k: v for k, v in best.params.items()}}
        config.pop("output_dir", None)
        header = (f"# Best of {len(complete)} finished trials of {study_dir} (trial {best.number}): "
                  f"{OBJECTIVES[args.stage][1]} = {best.value:.6g}\n"
                  f"# rlhf {args.stage} --config {study_dir / 'best_config.yaml'} --output_dir <dir>\n")
        (study_dir / "best_config.yaml").write_text(header + yaml.safe_dump(config, sort_keys=False))
    (study_dir / "trials.md").write_text(trials_table(study, args, params))
    try:
        plot_search(study, study_dir / "search.png")
    except Exception as e:  # a plot must never cost the sweep its trials
        logger.warning("search.png not written: %s", e)


def trials_table(study, args: SweepArguments, params: list[Param]) -> str:
    """Markdown: one row per trial, with its state, objective, values and run directory."""
    direction, what, _ = OBJECTIVES[args.stage]
    names = [p.name for p in params]
    lines = [f"# Sweep of {args.stage}: {what} ({direction})", "",
             "| trial | state | value | " + " | ".join(names) + " | seconds | run dir |",
             "|---:|---|---:|" + "---:|" * len(names) + "---:|---|"]
    # A pruned trial carries its last intermediate value, but only finished ones can be the best.
    best = study.best_trial.number if any(t.state.name == "COMPLETE" for t in study.trials) else None

    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))

    for t in study.trials:
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else None
        state = t.state.name.lower() + (" (best)" if t.number == best else "")
        if t.state.name == "PRUNED" and t.intermediate_values:
            step = max(t.intermediate_values)
            state += f" at step {step}"
        lines.append(f"| {t.number} | {state} | {cell(t.value)} | "
                     + " | ".join(cell(t.params.get(n)) for n in names)
                     + f" | {cell(round(seconds, 1) if seconds is not None else None)} | {t.user_attrs.get('run_dir', '')} |")
    return "\n".join(lines) + "\n"


def plot_search(study, path: Path) -> None:
    """Optimization history and parameter importances (optuna's matplotlib plots) side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    panels = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        makers = [ovm.plot_optimization_history]
        finished = [t for t in study.trials if t.state.name == "COMPLETE"]
        if len(finished) >= 2 and study.trials[0].params:
            makers.append(ovm.plot_param_importances)
        for make in makers:
            try:
                ax = make(study)
            except (ValueError, RuntimeError) as e:  # e.g. importances of a parameter that never varied
                logger.info("%s skipped: %s", make.__name__, e)
                continue
            buffer = io.BytesIO()
            ax.figure.set_size_inches(6, 4.2)
            ax.figure.tight_layout()
            ax.figure.savefig(buffer, format="png", dpi=100)
            plt.close(ax.figure)
            buffer.seek(0)
            panels.append(plt.imread(buffer))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, image in zip(axes[0], panels):
        ax.imshow(image)
        ax.axis("off")
    fig.tight_layout(pad=0)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def parse_sweep_args(argv: list[str]) -> SweepArguments:
    parser = argparse.ArgumentParser(
        prog="rlhf sweep", description="optuna search over a stage's config keys; other --key value pairs go to "
                                       "every trial")
    parser.add_argument("--config", required=True, help="the stage config (YAML) every trial starts from")
    parser.add_argument("--space", required=True, help="search space YAML: key: {type: float|int|categorical, ...}")
    parser.add_argument("--trials", type=int, required=True, help="finished + pruned trials to reach")
    parser.add_argument("--study", required=True, help="directory of the study (study.db, trials/, reports)")
    parser.add_argument("--stage", choices=sorted(STAGE_MODULES), help="default: the config file's name")
    parser.add_argument("--sampler", choices=["tpe", "random"], default="tpe")
    parser.add_argument("--pruner", choices=["median", "none"], default="median")
    parser.add_argument("--seed", type=int, default=0, help="the sampler's seed")
    parser.add_argument("--kl_budget", type=float, default=4.0,
                        help="policy stages: nats per reply of KL to the reference that cost nothing")
    parser.add_argument("--kl_penalty", type=float, default=0.1,
                        help="policy stages: objective lost per nat of KL beyond the budget")
    known, overrides = parser.parse_known_args(argv)
    if known.trials < 1:
        raise UserError(f"--trials: expected at least 1, found {known.trials}")
    for path, what in ((known.config, "--config"), (known.space, "--space")):
        if not Path(path).is_file():
            raise UserError(f"{what} {path}: no such file")
    if "--output_dir" in overrides:
        raise UserError("--output_dir: each trial writes to <study>/trials/<n>; leave it out")
    stage = infer_stage(known.config, known.stage)
    return SweepArguments(known.config, known.space, known.trials, known.study, stage, overrides, known.sampler,
                          known.pruner, known.seed, known.kl_budget, known.kl_penalty)


def sweep_command(argv: list[str]) -> int:
    args = parse_sweep_args(argv)
    study = run_sweep(args)
    from optuna.trial import TrialState

    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    print(f"{len(complete)} finished, {len(pruned)} pruned -> {args.study}/trials.md, search.png")
    if complete:
        print(f"best: trial {study.best_trial.number}, {OBJECTIVES[args.stage][1]} = {study.best_value:.6g}, "
              f"{study.best_trial.params} -> {args.study}/best_config.yaml")
    return 0
