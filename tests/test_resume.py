"""Kill-and-resume equality for the SFT and reward stages.

Run A trains 4 steps straight. Run B trains the same config in a child process that dies with
``os._exit(137)`` (no cleanup, like a SIGKILL) right after the step-2 checkpoint is written, then
resumes in this process with ``--resume``. LoRA dropout is on, so equal adapters also prove that the
RNG state was restored, not only the weights and the optimizer.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from rlhf.core.data import write_jsonl
from rlhf.core.hooks import with_trainer_callbacks

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
    from rlhf.core.hooks import StageHooks
    from {module} import run

    class DieAfterCheckpoint(StageHooks):
        def on_checkpoint(self, step, path):
            if step == 2:
                os._exit(137)  # no cleanup, no finally blocks: what a kill -9 leaves behind

    run(argv={argv!r}, hooks=DieAfterCheckpoint())
    sys.exit(0)  # not reached when the hook fires
""")


def kill_after_the_step_2_checkpoint(module: str, argv: list[str], cwd: Path) -> Path:
    """Run the stage in a child process killed right after its step-2 checkpoint; returns the work dir."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.run([sys.executable, "-c", KILL_AT_STEP_2.format(module=module, argv=argv)],
                           cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert child.returncode == 137, child.stderr[-3000:]
    out = Path(argv[argv.index("--output_dir") + 1])
    work = out.with_name(out.name + ".tmp")
    assert not out.exists()  # a killed run never looks finished
    assert (work / "checkpoint-2" / "trainer_state.json").exists()
    assert not (work / "checkpoint-4").exists()
    return work


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
    run(argv=stage_argv(tiny_model_dir, train_file, straight))

    resumed = tmp_path / "resumed"
    argv = stage_argv(tiny_model_dir, train_file, resumed)
    work = kill_after_the_step_2_checkpoint(module, argv, tmp_path)

    seen_steps: list[int] = []

    class StepsSeen(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen_steps.append(state.global_step)

    run(argv=argv + ["--resume"], hooks=with_trainer_callbacks(StepsSeen()))
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
    from rlhf.core.stage import whole_run_train_loss

    history = [{"loss": 4.0, "step": 2}, {"eval_loss": 9.0, "step": 2}, {"loss": 2.0, "step": 4},
               {"loss": 7.0, "step": 6}]  # logged after the resume: already inside resumed_loss
    # steps 1-2 average 4, steps 3-4 average 2, steps 5-6 (this call) average 1: (2*4 + 2*2 + 2*1) / 6
    assert whole_run_train_loss(history, 1.0, resumed_at=4, final_step=6) == pytest.approx(14 / 6)
    # the checkpoint (step 4) falls inside a logging window: steps 1-3 average 3 stands for steps 1-4
    assert whole_run_train_loss([{"loss": 3.0, "step": 3}], 1.0, resumed_at=4, final_step=8) == pytest.approx(2.0)
    # nothing logged before the checkpoint: only this call's mean is known
    assert whole_run_train_loss([], 1.5, resumed_at=4, final_step=8) == 1.5


def test_resume_skips_a_checkpoint_cut_off_while_being_written(tmp_path):
    from rlhf.core.outputs import RunDir

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


@pytest.mark.slow
def test_resume_from_a_checkpoint_that_is_not_a_logging_step(tiny_model_dir, tmp_path, caplog):
    """A checkpoint inside a logging window (as save_steps 9 / logging_steps 5), small: a checkpoint at
    step 2, logs every 3 steps.

    The resumed Trainer only knows the losses before its checkpoint through the logged windows; a
    window crossing the checkpoint used to leave the resumed run's train_loss (and its step-3 log) off.
    """
    from sft.train import run

    train_file = tmp_path / "train.jsonl"
    write_jsonl(train_file, sft_rows())
    schedule = ["--logging_steps", "3"]
    straight = tmp_path / "straight"
    run(argv=stage_argv(tiny_model_dir, train_file, straight) + schedule)

    resumed = tmp_path / "resumed"
    argv = stage_argv(tiny_model_dir, train_file, resumed) + schedule
    work = kill_after_the_step_2_checkpoint("sft.train", argv, tmp_path)
    with caplog.at_level(logging.INFO, logger="rlhf.core.stage"):
        run(argv=argv + ["--resume"])
    assert f"resuming from {work / 'checkpoint-2'}" in [r.getMessage() for r in caplog.records]

    found, expected = comparable_metrics(resumed), comparable_metrics(straight)
    assert found["train_loss"] == pytest.approx(expected["train_loss"], rel=0, abs=1e-6)
    assert_same(found, expected, "metrics")
    assert_same(losses_by_step(resumed), losses_by_step(straight), "log_history")
    # The Trainer's own end-of-training entry in log_history.json says the same.
    logged = [e["train_loss"] for e in json.loads((resumed / "log_history.json").read_text()) if "train_loss" in e]
    assert logged == [pytest.approx(expected["train_loss"], rel=0, abs=1e-6)]


def test_a_run_that_fails_before_its_first_checkpoint_leaves_nothing(tmp_path):
    from rlhf.core.outputs import RunDir

    run = RunDir(tmp_path / "out")
    with pytest.raises(ValueError, match="bad input"), run.removed_on_error():
        run.prepare(resume=False)
        (run.work / "logs").mkdir()  # what a run writes before its first checkpoint
        raise ValueError("bad input")
    assert not run.work.exists() and not run.final.exists()

    # A finished checkpoint is kept for --resume, whatever stopped the run.
    with pytest.raises(KeyboardInterrupt), run.removed_on_error():
        run.prepare(resume=False)
        (run.work / "checkpoint-2").mkdir()
        (run.work / "checkpoint-2" / "trainer_state.json").write_text("{}")
        raise KeyboardInterrupt
    assert (run.work / "checkpoint-2").is_dir()

    # A process that did not make the directory (a non-main rank) never removes it.
    shutil.rmtree(run.work / "checkpoint-2")
    other = RunDir(tmp_path / "out")
    with pytest.raises(RuntimeError), other.removed_on_error():
        raise RuntimeError("rank 1 failed")
    assert run.work.is_dir()

    # No exception: the block changes nothing.
    with run.removed_on_error():
        assert run.prepare(resume=True) is None
    assert run.work.is_dir()
