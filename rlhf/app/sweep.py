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
ones early; PPO runs its own loop, without Trainer callbacks: its trials are never pruned. The
pruner compares trials at the same optuna step, so the step is the number of training samples seen
(not optimizer steps: trials may differ in batch size) and the figure is one a searched key does not
rescale (DPO reports preference accuracy, not beta-scaled reward margins).

The study is a SQLite file, ``<study>/study.db``: killing the sweep and running the same command again
continues it. Finished and pruned trials are kept; a trial that was running when the sweep died is
marked failed and its values are queued again, so it is re-run from the start. The sampler's seed
is drawn from ``--seed`` and the number of trials already in the study (:func:`sampler_seed`): the
same seed again would replay the first trials' values. One sweep process per study. At the end
(and after each trial): ``best_config.yaml`` (the stage config with the best trial's values, ready
for ``rlhf <stage> --config``), ``trials.md`` (a table of every trial) and ``search.png``
(optimization history and parameter importances, optuna's matplotlib plots).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rlhf.app.stages import METHODS, run_stage
from rlhf.core.config import build_config, format_help, load_yaml, parse_overrides
from rlhf.core.errors import UserError
from rlhf.core.hooks import with_trainer_callbacks

logger = logging.getLogger(__name__)

OBJECTIVES = {
    "sft": ("minimize", "validation loss of the final (best) model", "eval_loss"),
    "reward": ("maximize", "validation pairwise accuracy of the final (best) model", "eval_accuracy"),
    "ppo": ("maximize", "held-out reward-model score minus the KL budget penalty", None),
    # Not eval_rewards/margins: TRL's rewards are beta * log-ratio, so a beta search would prune low betas
    # for their beta. Preference accuracy (chosen log-ratio above rejected) is the same for every beta > 0.
    "dpo": ("maximize", "held-out reward-model score minus the KL budget penalty", "eval_rewards/accuracies"),
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


def samples_seen(args, state) -> int:
    """Training samples behind ``state.global_step`` optimizer steps (``args``: the TrainingArguments):
    per-device batch x devices of this process x gradient accumulation x processes."""
    return state.global_step * args.train_batch_size * args.gradient_accumulation_steps * args.world_size


def pruning_callback(trial, key: str) -> Any:
    """A TrainerCallback that reports ``key`` (an evaluation or a logged figure) and prunes the trial.

    The optuna step of a report is the number of training samples seen (:func:`samples_seen`): the
    pruner compares a trial with the others' values at the same step, and trials that search the
    batch size reach a given optimizer step having seen different amounts of data."""
    import optuna
    from transformers import TrainerCallback

    class ReportAndPrune(TrainerCallback):
        def _report(self, args, state, values: dict) -> None:
            value = values.get(key)
            if value is None or not math.isfinite(value):
                return
            samples = samples_seen(args, state)
            trial.report(float(value), step=samples)
            if trial.should_prune():
                raise optuna.TrialPruned(f"{key} = {value:.4g} after {samples} samples")

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            self._report(args, state, metrics or {})

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not key.startswith("eval_"):
                self._report(args, state, logs or {})

    return ReportAndPrune()


# ----------------------------------------------------------------------------------------------
# The study
# ----------------------------------------------------------------------------------------------


SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "none")


@dataclass
class SweepArguments:
    """What a sweep searches and how it judges trials. Command line only: ``--config`` names the stage
    config, and every ``--key value`` that is not one of these goes to every trial."""

    stage_config: str
    """The stage config (YAML) every trial starts from; --config FILE says the same. Its file name (sft.yaml,
    dpo.yaml, ...) names the stage unless stage is set."""
    space: str
    """Search space YAML, one config key per entry: key: {type: float|int|categorical, ...} (docs/sweep.md)."""
    trials: int
    """Finished + pruned trials to reach; a continued sweep counts the ones its study already has."""
    study: str
    """Directory of the study: study.db, trials/<n>/, best_config.yaml, trials.md, search.png."""
    stage: str | None = None
    """sft, reward, ppo, dpo, grpo or rloo (null: the config file's name)."""
    sampler: str = "tpe"
    """tpe or random."""
    pruner: str = "median"
    """median (from the third trial on, stop a trial whose figure is worse than the median of the earlier
    trials' after as many training samples) or none."""
    seed: int = 0
    """The sampler's seed (a continued sweep derives a fresh one from it and the trials so far); the trials
    keep the stage config's seed."""
    kl_budget: float = 4.0
    """Policy stages: nats per reply of KL to the reference that cost nothing."""
    kl_penalty: float = 0.1
    """Policy stages: objective lost per nat of KL beyond the budget."""
    overrides: list[str] = field(default_factory=list, init=False)
    """The --key value pairs every trial gets: the command line's keys that are not the sweep's."""

    def __post_init__(self) -> None:
        if self.trials < 1:
            raise UserError(f"trials: expected at least 1, found {self.trials}")
        for name, allowed in (("sampler", SAMPLERS), ("pruner", PRUNERS)):
            if getattr(self, name) not in allowed:
                raise UserError(f"{name}: expected one of {', '.join(allowed)}, found {getattr(self, name)!r}")
        for name in ("kl_budget", "kl_penalty"):
            if getattr(self, name) < 0:
                raise UserError(f"{name}: expected a number >= 0, found {getattr(self, name)}")
        for name, key in (("stage_config", "stage_config (--config)"), ("space", "space")):
            if not Path(getattr(self, name)).is_file():
                raise UserError(f"{key}: expected a YAML file, found no {getattr(self, name)}")
        self.stage = infer_stage(self.stage_config, self.stage)


def infer_stage(config: str, stage: str | None) -> str:
    if stage:
        if stage not in OBJECTIVES:
            raise UserError(f"stage: expected one of {', '.join(OBJECTIVES)} (stages a sweep can score), found "
                            f"{stage!r}")
        return stage
    name = Path(config).stem
    if name not in OBJECTIVES:
        raise UserError(f"--config {config}: cannot tell the stage from the file name; pass --stage "
                        f"({', '.join(OBJECTIVES)})")
    return name


def sampler_seed(seed: int, started: int) -> int:
    """The sampler's seed for a sweep (re)started with ``started`` trials already in its study.

    A new study takes ``seed`` itself, so a sweep run in one go is reproducible from it. A continued
    one must not: the sampler's random state is not in study.db, and the same seed would draw the
    first trials' values again (TPE's first trials are random draws), duplicates that count toward
    ``trials``. Every start that ran a trial leaves the count higher, so each start that draws gets
    its own stream, and the same kills followed by the same commands give the same trials.
    """
    if started == 0:
        return seed
    import numpy as np

    return int(np.random.SeedSequence([seed, started]).generate_state(1)[0])


def make_study(args: SweepArguments, pruner=None):
    import optuna

    study_dir = Path(args.study)
    study_dir.mkdir(parents=True, exist_ok=True)
    if pruner is None:
        pruner = {"median": lambda: optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0),
                  "none": optuna.pruners.NopPruner}[args.pruner]()
    study = optuna.create_study(
        study_name=f"{args.stage}-sweep", storage=f"sqlite:///{(study_dir / 'study.db').resolve()}",
        load_if_exists=True, direction=OBJECTIVES[args.stage][0], pruner=pruner)
    started = len(study.get_trials(deepcopy=False))  # the seed depends on it: set the sampler once loaded
    seed = sampler_seed(args.seed, started)
    make_sampler = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler}[args.sampler]
    study.sampler = make_sampler(seed=seed)
    logger.info("%s sampler, seed %d (%d trials already in the study)", args.sampler, seed, started)
    return study


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
    base_config = load_yaml(args.stage_config)
    direction, _, report_key = OBJECTIVES[args.stage]
    study_dir = Path(args.study)
    trials_dir = study_dir / "trials"
    study = make_study(args, pruner)
    requeue_interrupted(study, trials_dir)

    def objective(trial) -> float:
        values = {p.name: p.suggest(trial) for p in params}
        out = trials_dir / str(trial.number)
        # The trial's values over the stage config; the command line's other keys win over both.
        config = {"config": args.stage_config, **values, "output_dir": str(out), "overwrite_output_dir": True}
        logger.info("trial %d: %s", trial.number, values)
        trial.set_user_attr("run_dir", str(out))
        try:
            if args.stage == "ppo":  # its own loop: no Trainer callbacks, so no intermediate reports
                metrics = run_stage(args.stage, config, argv=args.overrides)
            else:
                extra = list(callbacks or []) + ([pruning_callback(trial, report_key)] if report_key else [])
                metrics = run_stage(args.stage, config, with_trainer_callbacks(*extra), argv=args.overrides)
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
            state += f" after {step} samples"
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


HELP_NOTE = """
rlhf sweep: the keys above are command-line only; --config FILE is the stage config (--stage_config).
Every other --key value, any key of that stage, goes to every trial (e.g. --max_steps 30)."""


def parse_sweep_args(argv: list[str]) -> SweepArguments:
    """``rlhf sweep``'s command line in the stages' dialect (rlhf.core.config): ``--key value`` for the
    fields of :class:`SweepArguments`, ``--config`` for the stage config, every other ``--key value``
    kept in ``overrides`` for the trials; ``-h``/``--help`` lists the sweep's keys and exits."""
    if any(token in ("-h", "--help") for token in argv):
        print(format_help([SweepArguments]) + "\n" + HELP_NOTE)
        raise SystemExit(0)
    given, config = parse_overrides(argv)
    # Here --config is the stage config, as in every documented sweep command; build_config would read
    # it as a YAML of the sweep's own keys, so it reaches the dataclass under its field name.
    if config is not None:
        if "stage_config" in given:
            raise UserError(f"command line: expected --config or --stage_config, found both ({config} and "
                            f"{given['stage_config']})")
        given["stage_config"] = config
    fields = [f for f in dataclasses.fields(SweepArguments) if f.init]
    missing = [f.name for f in fields if f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING and f.name not in given]
    if missing:
        names = ", ".join("--config" if k == "stage_config" else f"--{k}" for k in missing)
        raise UserError(f"command line: expected {names}, found none (rlhf sweep --help lists the keys)")
    if "output_dir" in given:
        raise UserError("command line: key 'output_dir': each trial writes to <study>/trials/<n>; leave it out")
    own = {f.name for f in fields}

    def tokens(keys: list[str]) -> list[str]:
        return [t for k in keys for t in (f"--{k}", *(given[k] if isinstance(given[k], list) else [given[k]]))]

    (args,), _ = build_config([SweepArguments], tokens([k for k in given if k in own]))
    args.overrides = tokens([k for k in given if k not in own])
    return args


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
