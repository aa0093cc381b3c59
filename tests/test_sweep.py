"""rlhf sweep (rlhf/app/sweep.py): a killed sweep continues with its finished trials kept and repeats none,
pruning compares trials at equal samples seen on a figure the searched keys do not rescale, the command
line, the search space and the objectives."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rlhf.core.config import load_yaml
from rlhf.core.errors import UserError

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture
def sft_sweep(tiny_model_dir, tmp_path) -> dict[str, Path]:
    """A tiny SFT config (2 steps, evaluation and checkpoint at step 2) and a two-key search space."""
    config = tmp_path / "sft.yaml"
    config.write_text(textwrap.dedent(f"""\
        model_name_or_path: {tiny_model_dir}
        peft_method: lora
        lora_alpha: 8
        train_file: {REPO}/data/demo/sft_train.jsonl
        max_train_samples: 16
        validation_file: {REPO}/data/demo/sft_validation.jsonl
        validation_size: 0
        test_size: 0
        output_dir: unused
        max_steps: 2
        per_device_train_batch_size: 4
        per_device_eval_batch_size: 16
        eval_steps: 2
        save_steps: 2
        logging_steps: 1
        max_length: 48
        report_to: none
        """))
    space = tmp_path / "space.yaml"
    space.write_text("learning_rate: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}\n"
                     "lora_r: {type: categorical, choices: [2, 4]}\n")
    return {"config": config, "space": space, "study": tmp_path / "study"}


def sweep_args(paths: dict, trials: int, pruner: str = "median"):
    from rlhf.app.sweep import parse_sweep_args

    return parse_sweep_args(["--config", str(paths["config"]), "--space", str(paths["space"]), "--trials",
                             str(trials), "--study", str(paths["study"]), "--pruner", pruner])


KILLED_IN_TRIAL_3 = textwrap.dedent("""
    import os, sys
    from transformers import TrainerCallback
    from rlhf.app.sweep import parse_sweep_args, run_sweep

    class DieInTrial3(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if args.output_dir.endswith(os.path.join("trials", "3.tmp")):
                os._exit(137)  # a kill -9 in the middle of the fourth trial, after three finished ones

    run_sweep(parse_sweep_args({argv!r}), callbacks=[DieInTrial3()])
    sys.exit(0)
""")


@pytest.mark.slow
def test_killed_sweep_continues_with_its_finished_trials_and_repeats_none(sft_sweep):
    import optuna
    from optuna.trial import TrialState

    from rlhf.app.sweep import parse_sweep_args, run_sweep

    # --logging_steps is no sweep key: it goes to every trial (the fixture's config says 1).
    argv = ["--config", str(sft_sweep["config"]), "--space", str(sft_sweep["space"]), "--trials", "5",
            "--study", str(sft_sweep["study"]), "--pruner", "none", "--logging_steps", "2"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.run([sys.executable, "-c", KILLED_IN_TRIAL_3.format(argv=argv)], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == 137, child.stderr[-3000:]
    storage = f"sqlite:///{(sft_sweep['study'] / 'study.db').resolve()}"
    before = optuna.load_study(study_name="sft-sweep", storage=storage).trials
    assert [t.state for t in before] == [TrialState.COMPLETE] * 3 + [TrialState.RUNNING]

    study = run_sweep(parse_sweep_args(argv))  # the same command again
    trials = study.trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3 + [TrialState.FAIL] + [TrialState.COMPLETE] * 2
    for old, new in zip(before[:3], trials[:3]):  # kept as they were, not run again
        assert (new.params, new.value, new.datetime_complete) == (old.params, old.value, old.datetime_complete)
    assert trials[4].params == before[3].params  # the interrupted trial's values, re-run
    assert trials[4].user_attrs["rerun_of"] == 3
    # No parameter set ran twice: a sampler seeded as at the start would have drawn trial 0's values for
    # trial 5 (the re-run of trial 3 takes no draw), a duplicate counted toward --trials.
    finished = [tuple(sorted(t.params.items())) for t in trials if t.state == TrialState.COMPLETE]
    assert len(set(finished)) == len(finished) == 5
    trials_dir = sft_sweep["study"] / "trials"
    for n in (0, 1, 2, 4, 5):
        assert (trials_dir / str(n) / "metrics.json").exists()
        assert load_yaml(trials_dir / str(n) / "config.yaml")["logging_steps"] == 2  # passed through
    assert not (trials_dir / "3").exists() and not (trials_dir / "3.tmp").exists()
    # The reports: the best trial's config runs as it is, the table lists every trial, the PNG exists.
    best = load_yaml(sft_sweep["study"] / "best_config.yaml")
    assert best["learning_rate"] == study.best_params["learning_rate"] and best["lora_r"] == study.best_params["lora_r"]
    assert best["train_file"] == load_yaml(sft_sweep["config"])["train_file"] and "output_dir" not in best
    table = (sft_sweep["study"] / "trials.md").read_text()
    assert table.count("| complete") == 5 and "| fail |" in table
    assert (sft_sweep["study"] / "search.png").stat().st_size > 10_000


@pytest.mark.slow
def test_pruned_trial_is_recorded_as_pruned(sft_sweep):
    import optuna
    from optuna.trial import TrialState

    from rlhf.app.sweep import run_sweep

    # Every validation loss is above 0: the first intermediate report prunes the trial.
    study = run_sweep(sweep_args(sft_sweep, 1), pruner=optuna.pruners.ThresholdPruner(upper=0.0))
    (trial,) = study.trials
    assert trial.state == TrialState.PRUNED
    # Reported at the step-2 evaluation, after 2 x 4 samples (per_device_train_batch_size 4), then stopped.
    assert list(trial.intermediate_values) == [8]
    assert not (sft_sweep["study"] / "trials" / "0").exists()
    assert not (sft_sweep["study"] / "trials" / "0.tmp").exists()
    assert "| pruned after 8 samples |" in (sft_sweep["study"] / "trials.md").read_text()


def test_search_space_errors_name_the_file_and_key(tmp_path):
    from rlhf.app.sweep import Param, load_space

    space = tmp_path / "space.yaml"
    space.write_text("learning_rate: {type: float, low: 1.0e-5, high: 1.0e-3, log: true}\n"
                     "lora_r: {type: int, low: 4, high: 16, step: 4}\n"
                     "loss_type: {type: categorical, choices: [sigmoid, ipo]}\n")
    assert load_space(space) == [Param("learning_rate", "float", 1e-5, 1e-3, True),
                                 Param("lora_r", "int", 4.0, 16.0, False, 4),
                                 Param("loss_type", "categorical", choices=("sigmoid", "ipo"))]
    for text, expected in [
        ("lr: {type: loguniform, low: 1, high: 2}", "key 'lr': type: expected one of float, int, categorical"),
        ("lr: {type: float, low: 0, high: 1, log: true}", "key 'lr': log: true needs low > 0"),
        ("lr: {type: float, low: 2, high: 1}", "key 'lr': expected numbers low < high"),
        ("r: {type: categorical, choices: []}", "key 'r': choices: expected a non-empty list"),
        ("r: {type: int, low: 1, high: 4, choices: [1]}", "key 'r': expected only high, log, low, step, type"),
    ]:
        space.write_text(text + "\n")
        with pytest.raises(UserError, match=f"{space}: {expected}".replace("(", r"\(").replace(")", r"\)")):
            load_space(space)


def test_objectives():
    from rlhf.app.sweep import objective_value

    assert objective_value("sft", {"validation_loss": 1.5}, 4.0, 0.1) == 1.5
    assert objective_value("reward", {"validation_accuracy": 0.75}, 4.0, 0.1) == 0.75
    # Within the KL budget the reward-model score counts fully; beyond it each nat costs kl_penalty.
    within = {"eval_policy_reward_model_score": 0.5, "eval_policy_kl_to_reference": 3.0}
    beyond = {"eval_policy_reward_model_score": 0.5, "eval_policy_kl_to_reference": 6.0}
    assert objective_value("dpo", within, 4.0, 0.1) == 0.5
    assert objective_value("grpo", beyond, 4.0, 0.1) == pytest.approx(0.5 - 0.1 * 2.0)
    with pytest.raises(UserError, match="eval_prompts > 0 and a reward_model"):
        objective_value("rloo", {"train_loss": 0.1}, 4.0, 0.1)


def sweep_files(tmp_path: Path) -> dict[str, Path]:
    """A stage config (named sft.yaml, so the stage is sft) and a search space; no model needed."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    config, space = tmp_path / "sft.yaml", tmp_path / "space.yaml"
    config.write_text("max_steps: 2\n")
    space.write_text("learning_rate: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}\n"
                     "lora_r: {type: categorical, choices: [2, 4]}\n")
    return {"config": config, "space": space, "study": tmp_path / "study"}


@pytest.mark.parametrize("sampler", ["tpe", "random"])
def test_a_continued_study_draws_no_values_it_already_ran(tmp_path, sampler):
    """Three trials, the sweep process ends (its sampler with it), the same command again: three more,
    all new. A sampler seeded with --seed alone replayed trials 0-2 as trials 3-5."""
    from rlhf.app.sweep import load_space, make_study, parse_sweep_args

    def sweep_twice(paths: dict) -> list[tuple]:
        args = parse_sweep_args(["--config", str(paths["config"]), "--space", str(paths["space"]), "--trials", "6",
                                 "--study", str(paths["study"]), "--sampler", sampler, "--seed", "3"])
        params = load_space(args.space)
        for _ in range(2):
            make_study(args).optimize(lambda trial: {p.name: p.suggest(trial) for p in params}["learning_rate"],
                                      n_trials=3)
        return [tuple(sorted(t.params.items())) for t in make_study(args).trials]

    drawn = sweep_twice(sweep_files(tmp_path / "a"))
    assert len(drawn) == 6 and len(set(drawn)) == 6
    assert sweep_twice(sweep_files(tmp_path / "b")) == drawn  # the same seed and stops: the same trials


def test_trials_are_compared_at_equal_samples_seen(tmp_path):
    """Trials that search the batch size report after as many samples, not at the same optimizer step.

    A batch-4 trial whose loss per sample seen follows a finished batch-8 trial's is not pruned for
    having seen half the data at step 2; one that is worse after as many samples is."""
    import optuna
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from rlhf.app.sweep import pruning_callback

    study = optuna.create_study(direction="minimize", pruner=optuna.pruners.MedianPruner(n_startup_trials=1))

    def evaluate(batch_size: int, losses: list[float]):
        """A trial that evaluates every 2 optimizer steps; returns it, finished with its last loss."""
        trial = study.ask()
        args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=batch_size,
                                 gradient_accumulation_steps=1, use_cpu=True, report_to="none")
        callback = pruning_callback(trial, "eval_loss")
        for n, loss in enumerate(losses, start=1):
            callback.on_evaluate(args, TrainerState(global_step=2 * n), TrainerControl(), metrics={"eval_loss": loss})
        study.tell(trial, losses[-1])
        return trial

    big = evaluate(8, [2.0, 1.5])  # after 16 and 32 samples
    # At step 2 the batch-4 trial's 2.5 is above the batch-8 trial's 2.0, but it has seen 8 samples, not 16.
    small = evaluate(4, [2.5, 2.0, 1.7, 1.5])  # after 8, 16, 24 and 32 samples
    assert study.trials[big.number].intermediate_values == {16: 2.0, 32: 1.5}
    assert study.trials[small.number].intermediate_values == {8: 2.5, 16: 2.0, 24: 1.7, 32: 1.5}
    assert study.trials[small.number].state == optuna.trial.TrialState.COMPLETE
    with pytest.raises(optuna.TrialPruned, match="after 8 samples"):  # worse than the median after 8 samples
        evaluate(4, [2.6])


def test_command_line_keys_pass_through_and_help(tmp_path, capsys):
    from rlhf.app.sweep import parse_sweep_args

    paths = sweep_files(tmp_path)
    base = ["--config", str(paths["config"]), "--space", str(paths["space"]), "--study", str(paths["study"])]
    args = parse_sweep_args(base + ["--trials", "3", "--seed", "5", "--max_steps", "30", "--beta=0.2", "--resume"])
    assert (args.stage_config, args.space, args.trials, args.seed, args.stage, args.sampler) == (
        str(paths["config"]), str(paths["space"]), 3, 5, "sft", "tpe")
    # Keys the sweep does not know go to every trial, as --key value; --seed is the sampler's.
    assert args.overrides == ["--max_steps", "30", "--beta", "0.2", "--resume", "true"]

    with pytest.raises(SystemExit) as stopped:
        parse_sweep_args(["--help"])
    assert stopped.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())
    for text in ("--trials (int", "Finished + pruned trials to reach", "--kl_penalty (float, default: 0.1)",
                 "--config FILE is the stage config"):
        assert text in shown, text

    for argv, expected in [
        (base, "command line: expected --trials, found none"),
        (["--space", str(paths["space"]), "--trials", "2", "--study", "s"], "expected --config, found none"),
        (base + ["--trials", "two"], "command line: key 'trials': expected int, found 'two'"),
        (base + ["--trials", "0"], "trials: expected at least 1, found 0"),
        (base + ["--trials", "2", "--sampler", "grid"], "sampler: expected one of tpe, random, found 'grid'"),
        (base + ["--trials", "2", "--output_dir", "x"], "key 'output_dir': each trial writes to <study>/trials/<n>"),
    ]:
        with pytest.raises(UserError, match=expected.replace("(", r"\(").replace(")", r"\)")):
            parse_sweep_args(argv)


@pytest.mark.slow
def test_dpo_trials_report_a_figure_beta_does_not_scale(tiny_model_dir, tmp_path):
    """Two DPO runs that differ only in beta report the same figure for pruning.

    One optimizer step from the SFT adapter (where policy = reference, so the DPO gradient is beta x a
    beta-free vector) with an Adam epsilon too small to matter (so the step is lr x the gradient's sign)
    leaves both runs with the same weights: their held-out reward margins differ by the ratio of their
    betas, 25, which is what the sweep used to prune on; their preference accuracy does not."""
    from transformers import TrainerCallback

    from rlhf.app.sweep import OBJECTIVES, pruning_callback
    from rlhf.core.hooks import with_trainer_callbacks
    from rlhf.methods.dpo import run as run_dpo
    from sft.train import run as run_sft

    sft_run = tmp_path / "sft"
    run_sft(argv=["--model_name_or_path", str(tiny_model_dir), "--train_file", f"{REPO}/data/demo/sft_train.jsonl",
                  "--max_train_samples", "16", "--validation_size", "0", "--test_size", "0", "--max_steps", "2",
                  "--save_steps", "2", "--eval_steps", "2", "--per_device_train_batch_size", "4", "--learning_rate", "5e-3",
                  "--lora_r", "4", "--lora_alpha", "8", "--max_length", "48", "--report_to", "none", "--output_dir",
                  str(sft_run)])

    class Reports:  # the part of an optuna trial the pruning callback uses
        def __init__(self) -> None:
            self.values: list[float] = []

        def report(self, value: float, step: int) -> None:
            self.values.append(value)

        def should_prune(self) -> bool:
            return False

    class Margins(TrainerCallback):
        def __init__(self) -> None:
            self.values: list[float] = []

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            self.values.append(metrics["eval_rewards/margins"])

    seen = {}
    for beta in (0.02, 0.5):
        reports, margins = Reports(), Margins()
        run_dpo(argv=["--sft_model", str(sft_run), "--reward_model", "null", "--eval_prompts", "0",
                      "--train_file", f"{REPO}/data/demo/prefs_train.jsonl", "--max_train_samples", "8",
                      "--validation_file", f"{REPO}/data/demo/prefs_validation.jsonl", "--validation_size", "0",
                      "--test_size", "0", "--max_steps", "1", "--eval_steps", "1", "--save_steps", "1",
                      "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "16",
                      "--learning_rate", "5e-3", "--warmup_steps", "0", "--adam_epsilon", "1e-20",
                      "--max_length", "64", "--seed", "7",
                      "--report_to", "none", "--beta", str(beta), "--output_dir", str(tmp_path / f"dpo_{beta}")],
                hooks=with_trainer_callbacks(pruning_callback(reports, OBJECTIVES["dpo"][2]), margins))
        seen[beta] = (reports.values, margins.values)
    (reported_low, margins_low), (reported_high, margins_high) = seen[0.02], seen[0.5]
    assert margins_high[0] != 0 and margins_high[0] == pytest.approx(25 * margins_low[0], rel=1e-3)  # same weights
    assert reported_low and reported_high == pytest.approx(reported_low, abs=1e-9)
