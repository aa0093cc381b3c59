"""Kill-and-resume equality for the SFT and reward stages.

Run A trains 4 steps straight. Run B trains the same config in a child process that dies with
``os._exit(137)`` (no cleanup, like a SIGKILL) right after the step-2 checkpoint is written, then
resumes in this process with ``--resume``. LoRA dropout is on, so equal adapters also prove that the
RNG state was restored, not only the weights and the optimizer.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from rlhf.data import write_jsonl

REPO = Path(__file__).resolve().parents[1]
FOODS = ["coffee", "tea", "pizza", "bread", "cheese", "apple", "mango", "pasta", "soup", "salad",
         "book", "novel", "poem", "song", "movie", "game"]


def sft_rows() -> list[dict]:
    return [{"prompt": f"write a short review of the {w}", "completion": f"the {w} is {a} and i {v} it ."}
            for w in FOODS for a, v in (("good", "like"), ("bad", "hate"))]


def pref_rows() -> list[dict]:
    return [{"prompt": f"write a short review of the {w}", "chosen": f"the {w} is lovely and i love it .",
             "rejected": f"the {w} is awful ."} for w in FOODS]


def stage_argv(model_dir: Path, train_file: Path, out: Path) -> list[str]:
    return [
        "--model_name_or_path", str(model_dir), "--train_file", str(train_file), "--output_dir", str(out),
        "--validation_size", "4", "--test_size", "4",
        "--max_steps", "4", "--save_steps", "2", "--eval_steps", "2", "--logging_steps", "1",
        "--per_device_train_batch_size", "4", "--learning_rate", "5e-3",
        "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0.3", "--seed", "7",
    ]


KILL_AT_STEP_2 = textwrap.dedent("""
    import os, sys
    from transformers import TrainerCallback
    from {module} import run

    class DieAfterCheckpoint(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 2:
                os._exit(137)  # no cleanup, no finally blocks: what a kill -9 leaves behind

    run({argv!r}, callbacks=[DieAfterCheckpoint()])
    sys.exit(0)  # not reached when the callback fires
""")


def adapter_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter_model.safetensors"))


def comparable_metrics(run_dir: Path) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics.pop("wall_seconds")
    return metrics


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_killed_run_resumes_to_the_same_result(stage, tiny_model_dir, tmp_path):
    module = {"sft": "sft.train", "reward": "reward.train"}[stage]
    run = importlib.import_module(module).run
    train_file = tmp_path / "train.jsonl"
    write_jsonl(train_file, sft_rows() if stage == "sft" else pref_rows())

    straight = tmp_path / "straight"
    run(stage_argv(tiny_model_dir, train_file, straight))

    resumed = tmp_path / "resumed"
    argv = stage_argv(tiny_model_dir, train_file, resumed)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.run([sys.executable, "-c", KILL_AT_STEP_2.format(module=module, argv=argv)],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert child.returncode == 137, child.stderr[-3000:]
    work = resumed.with_name("resumed.tmp")
    assert not resumed.exists()  # a killed run never looks finished
    assert (work / "checkpoint-2" / "trainer_state.json").exists()
    assert not (work / "checkpoint-4").exists()

    seen_steps: list[int] = []

    class StepsSeen(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen_steps.append(state.global_step)

    run(argv + ["--resume"], callbacks=[StepsSeen()])
    assert seen_steps == [3, 4]  # it really continued from step 2 instead of starting over
    assert not work.exists()

    a, b = adapter_tensors(straight), adapter_tensors(resumed)
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)
    assert_same(comparable_metrics(resumed), comparable_metrics(straight), "metrics")
    assert_same(losses_by_step(resumed), losses_by_step(straight), "log_history")


def losses_by_step(run_dir: Path) -> list[list]:
    history = json.loads((run_dir / "log_history.json").read_text())
    return [[e["step"], k, e[k]] for e in history for k in ("loss", "eval_loss", "eval_accuracy") if k in e]


def assert_same(found, expected, where: str) -> None:
    """Equal structure; numbers equal to 1e-6 (float sums may be reordered, nothing more)."""
    if isinstance(expected, dict):
        assert isinstance(found, dict) and found.keys() == expected.keys(), where
        for key in expected:
            assert_same(found[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(found, list) and len(found) == len(expected), where
        for i, (f, e) in enumerate(zip(found, expected)):
            assert_same(f, e, f"{where}[{i}]")
    elif isinstance(expected, float):
        assert found == pytest.approx(expected, rel=1e-6, abs=1e-6), where
    else:
        assert found == expected, where


def test_whole_run_train_loss_by_hand():
    from rlhf.stage import whole_run_train_loss

    history = [{"loss": 4.0, "step": 2}, {"eval_loss": 9.0, "step": 2}, {"loss": 2.0, "step": 4},
               {"loss": 7.0, "step": 6}]  # logged after the resume: already inside resumed_loss
    # steps 1-2 average 4, steps 3-4 average 2, steps 5-6 (this call) average 1: (2*4 + 2*2 + 2*1) / 6
    assert whole_run_train_loss(history, 1.0, resumed_at=4, final_step=6) == pytest.approx(14 / 6)
    # the checkpoint (step 4) falls inside a logging window: steps 1-3 average 3 stands for steps 1-4
    assert whole_run_train_loss([{"loss": 3.0, "step": 3}], 1.0, resumed_at=4, final_step=8) == pytest.approx(2.0)
    # nothing logged before the checkpoint: only this call's mean is known
    assert whole_run_train_loss([], 1.5, resumed_at=4, final_step=8) == 1.5


def test_resume_skips_a_checkpoint_cut_off_while_being_written(tmp_path):
    from rlhf.outputs import RunDir

    run = RunDir(tmp_path / "out")
    for step, files in ((2, ["adapter_model.safetensors", "optimizer.pt", "trainer_state.json"]),
                        (10, ["adapter_model.safetensors", "optimizer.pt", "trainer_state.json"]),
                        (12, ["adapter_model.safetensors"])):  # killed before its trainer_state.json
        (run.work / f"checkpoint-{step}").mkdir(parents=True)
        for name in files:
            (run.work / f"checkpoint-{step}" / name).write_text("x")
    (run.work / "checkpoint-20").mkdir()  # killed right after mkdir
    assert run.last_checkpoint() == run.work / "checkpoint-10"  # numeric order, not "checkpoint-2" > "-10"
    (run.work / "checkpoint-14").mkdir()  # the PPO stage's checkpoints end with trainer_state.pt
    (run.work / "checkpoint-14" / "trainer_state.pt").write_text("x")
    assert run.last_checkpoint() == run.work / "checkpoint-14"
    assert run.prepare(resume=True) == run.work / "checkpoint-14"
    assert run.prepare(resume=False) is None and not list(run.work.iterdir())  # a fresh start clears it
