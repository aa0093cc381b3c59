"""A stage runs from Python with ``run({...}, hooks)``: the hooks hear logs, evaluations and checkpoints,
a StopTraining from a hook ends the run early but finished, and the registry runs every stage the same way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from rlhf.app.stages import METHODS, STAGES, get_stage, run_stage
from rlhf.core.data import write_jsonl
from rlhf.core.errors import UserError
from rlhf.core.hooks import StageHooks, StopTraining

REPO = Path(__file__).resolve().parents[1]
WORDS = ["coffee", "tea", "pizza", "bread", "cheese", "apple", "mango", "pasta", "soup", "salad", "book", "song"]


class Recorder(StageHooks):
    """Every event, and whether each checkpoint was on disk when its hook ran."""

    def __init__(self, stop_at: int | None = None):
        self.logs, self.evaluations, self.checkpoints = [], [], []
        self.stop_at = stop_at

    def on_log(self, step, logs):
        self.logs.append((step, logs))
        if step == self.stop_at:
            raise StopTraining("enough")

    def on_evaluate(self, step, metrics):
        self.evaluations.append((step, metrics))

    def on_checkpoint(self, step, path):
        self.checkpoints.append((step, Path(path).name, Path(path).is_dir()))


def sft_config(tiny_model_dir, tmp_path: Path, out: str) -> dict:
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": f"write a short review of the {w}",
                                            "completion": f"the {w} is good and i like it ."} for w in WORDS])
    return {"config": str(REPO / "configs/tiny/sft.yaml"), "model_name_or_path": str(tiny_model_dir),
            "train_file": str(tmp_path / "train.jsonl"), "validation_file": None, "test_file": None,
            "validation_size": 4, "test_size": 0, "output_dir": str(tmp_path / out), "max_steps": 4,
            "eval_steps": 2, "save_steps": 2, "logging_steps": 1, "learning_rate": 5e-3}


def test_a_stage_runs_from_python_and_calls_its_hooks(tiny_model_dir, tmp_path):
    hooks = Recorder()
    metrics = run_stage("sft", sft_config(tiny_model_dir, tmp_path, "sft"), hooks)
    assert "train_loss" in metrics and (tmp_path / "sft" / "metrics.json").exists()
    # A checkpoint every 2 steps, each written completely before its hook ran.
    assert hooks.checkpoints == [(2, "checkpoint-2", True), (4, "checkpoint-4", True)]
    # The validation evaluations at steps 2 and 4 (then the best model's, reported in the metrics).
    assert [step for step, m in hooks.evaluations if "eval_loss" in m][:2] == [2, 4]
    assert [step for step, logs in hooks.logs if "loss" in logs] == [1, 2, 3, 4]
    # The resolved config records the keys given in the dict over the YAML's (the file's own keys too).
    resolved = yaml.safe_load((tmp_path / "sft" / "config.yaml").read_text())
    assert resolved["max_steps"] == 4 and resolved["eval_steps"] == 2 and resolved["output_dir"] == str(tmp_path / "sft")
    assert resolved["lora_r"] == yaml.safe_load((REPO / "configs/tiny/sft.yaml").read_text())["lora_r"]


def test_stop_training_from_a_hook_ends_the_run_finished(tiny_model_dir, tmp_path):
    hooks = Recorder(stop_at=3)
    config = {**sft_config(tiny_model_dir, tmp_path, "sft"), "max_steps": 8}
    metrics = run_stage("sft", config, hooks)
    history = json.loads((tmp_path / "sft" / "log_history.json").read_text())
    assert max(e["step"] for e in history) == 3 and "train_loss" in metrics
    assert (3, "checkpoint-3", True) in hooks.checkpoints  # the run ends at a checkpoint like any other
    assert not (tmp_path / "sft.tmp").exists()


def test_command_line_tokens_win_over_the_config_dict(tiny_model_dir, tmp_path):
    hooks = Recorder()
    run_stage("sft", sft_config(tiny_model_dir, tmp_path, "sft"), hooks, argv=["--max_steps", "2"])
    assert [step for step, _, _ in hooks.checkpoints] == [2]


def test_the_registry():
    assert {"sft", "reward", "ppo", "dpo", "grpo", "rloo"} <= set(STAGES) and list(STAGES)[0] == "sft"
    assert METHODS == ("ppo", "dpo", "grpo", "rloo")
    import importlib
    import inspect

    for stage in STAGES.values():  # one entry point for every stage
        run = importlib.import_module(stage.module).run
        parameters = inspect.signature(run).parameters
        assert list(parameters) == ["config", "hooks", "argv"], stage.name
        assert parameters["argv"].kind is inspect.Parameter.KEYWORD_ONLY
    with pytest.raises(UserError, match="did you mean ppo"):
        get_stage("ppp")
    with pytest.raises(TypeError, match="takes no trainer_callbacks"):
        from rlhf.core.hooks import with_trainer_callbacks

        run_stage("ppo", {}, with_trainer_callbacks(object()))
