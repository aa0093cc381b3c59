"""rlhf sweep (rlhf/app/sweep.py): a killed sweep continues with its finished trials kept, pruning is recorded,
the search space and the objectives."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

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


KILLED_IN_TRIAL_2 = textwrap.dedent("""
    import os, sys
    from transformers import TrainerCallback
    from rlhf.app.sweep import parse_sweep_args, run_sweep

    class DieInTrial2(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if args.output_dir.endswith(os.path.join("trials", "2.tmp")):
                os._exit(137)  # a kill -9 in the middle of the third trial

    run_sweep(parse_sweep_args({argv!r}), callbacks=[DieInTrial2()])
    sys.exit(0)
""")


@pytest.mark.slow
def test_killed_sweep_continues_with_its_finished_trials(sft_sweep):
    import optuna
    from optuna.trial import TrialState

    from rlhf.app.sweep import run_sweep

    argv = ["--config", str(sft_sweep["config"]), "--space", str(sft_sweep["space"]), "--trials", "4",
            "--study", str(sft_sweep["study"]), "--pruner", "none"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.run([sys.executable, "-c", KILLED_IN_TRIAL_2.format(argv=argv)], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == 137, child.stderr[-3000:]
    storage = f"sqlite:///{(sft_sweep['study'] / 'study.db').resolve()}"
    before = optuna.load_study(study_name="sft-sweep", storage=storage).trials
    assert [t.state for t in before] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.RUNNING]

    study = run_sweep(sweep_args(sft_sweep, 4, pruner="none"))  # the same command again
    trials = study.trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.FAIL,
                                         TrialState.COMPLETE, TrialState.COMPLETE]
    for old, new in zip(before[:2], trials[:2]):  # kept as they were, not run again
        assert (new.params, new.value, new.datetime_complete) == (old.params, old.value, old.datetime_complete)
    assert trials[3].params == before[2].params  # the interrupted trial's values, re-run
    assert trials[3].user_attrs["rerun_of"] == 2
    trials_dir = sft_sweep["study"] / "trials"
    for n in (0, 1, 3, 4):
        assert (trials_dir / str(n) / "metrics.json").exists()
    assert not (trials_dir / "2").exists() and not (trials_dir / "2.tmp").exists()
    # The reports: the best trial's config runs as it is, the table lists every trial, the PNG exists.
    from rlhf.core.config import load_yaml

    best = load_yaml(sft_sweep["study"] / "best_config.yaml")
    assert best["learning_rate"] == study.best_params["learning_rate"] and best["lora_r"] == study.best_params["lora_r"]
    assert best["train_file"] == load_yaml(sft_sweep["config"])["train_file"] and "output_dir" not in best
    table = (sft_sweep["study"] / "trials.md").read_text()
    assert table.count("| complete") == 4 and "| fail |" in table
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
    assert list(trial.intermediate_values) == [2]  # reported at the step-2 evaluation, then stopped
    assert not (sft_sweep["study"] / "trials" / "0").exists()
    assert not (sft_sweep["study"] / "trials" / "0.tmp").exists()
    assert "| pruned at step 2 |" in (sft_sweep["study"] / "trials.md").read_text()


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
