"""PPO's four roles share ONE base: SFT and reward outputs that cannot share it are refused up front.

Policy and reference come from the SFT output, reward and value from the reward output (a LoRA
adapter + score head), all on one base model. Each case below used to load and train on a wrong
base (a silently wrong reward) or crash in peft with a traceback; now ``build_roles`` refuses it
with a one-line ``UserError`` (exit 2 through the CLI) before loading anything. Also here:
``rlhf.core.runs.read_run``, which reads what a stage output directory holds.

Real tiny stage outputs (one training step each) where the case is about what training writes;
copies with an edited adapter_config.json / config.yaml where only the recorded facts matter.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from rlhf.app.cli import main
from rlhf.core.errors import UserError

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny"
DATA = REPO / "data" / "demo"
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # a handful of one-step tiny stage runs




def train(stage: str, model: Path, out: Path, *extra: str) -> Path:
    """One training step of the tiny ``stage`` ('sft' or 'reward') config on ``model``."""
    from reward.train import run as reward_run
    from sft.train import run as sft_run

    runner, data = (sft_run, "sft") if stage == "sft" else (reward_run, "prefs")
    runner(argv=["--config", str(TINY / f"{stage}.yaml"), "--model_name_or_path", str(model), "--output_dir", str(out),
                 "--train_file", str(DATA / f"{data}_train.jsonl"), "--validation_file", "null", "--test_file", "null",
                 "--validation_size", "0", "--test_size", "0", "--max_steps", "1", "--max_train_samples", "8",
                 "--warmup_steps", "0", "--learning_rate", "1e-2", *extra])
    return out


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """Real tiny outputs: LoRA and full SFT, a reward adapter on the base and one on the full SFT model."""
    root = tmp_path_factory.mktemp("role_compat")
    return {
        "root": root,
        "model": tiny_model_dir,
        "sft": train("sft", tiny_model_dir, root / "sft"),
        "sft_full": train("sft", tiny_model_dir, root / "sft_full", "--peft_method", "full"),
        "reward": train("reward", tiny_model_dir, root / "reward"),
        "reward_on_full_sft": train("reward", root / "sft_full", root / "reward_on_full_sft"),
    }


def ppo_argv(sft: Path, reward: Path, *extra: str) -> list[str]:
    return ["--config", str(TINY / "ppo.yaml"), "--sft_model", str(sft), "--reward_model", str(reward),
            "--train_file", str(DATA / "prompts_train.jsonl"), "--test_file", str(DATA / "prompts_test.jsonl"),
            *extra]


def build(sft: Path, reward: Path, *extra: str):
    """``rlhf.ppo.trainer.build_roles`` as ``rlhf ppo`` calls it."""
    from rlhf.ppo.trainer import build_roles, parse_ppo

    model_args, _, args, _, _ = parse_ppo(argv=ppo_argv(sft, reward, *extra))
    return build_roles(model_args, args, torch.device("cpu"))


def refused(sft: Path, reward: Path, *extra: str) -> str:
    """The one-line message ``build_roles`` refuses these outputs with."""
    with pytest.raises(UserError) as caught:
        build(sft, reward, *extra)
    message = str(caught.value)
    assert "\n" not in message
    return message


def edited_copy(source: Path, target: Path, adapter: dict | None = None, stage: dict | None = None) -> Path:
    """A copy of a stage output with keys of its adapter_config.json / config.yaml replaced."""
    shutil.copytree(source, target)
    if adapter:
        config = json.loads((target / "adapter_config.json").read_text())
        (target / "adapter_config.json").write_text(json.dumps({**config, **adapter}))
    if stage:
        config = yaml.safe_load((target / "config.yaml").read_text())
        (target / "config.yaml").write_text(yaml.safe_dump({**config, **stage}))
    return target


# -- what a stage output holds --------------------------------------------------------------------


def test_read_run_of_real_stage_outputs(runs):
    from rlhf.core.runs import read_run

    sft, full, reward = read_run(runs["sft"]), read_run(runs["sft_full"]), read_run(runs["reward"])
    assert (sft.kind, sft.is_adapter, sft.peft_type, sft.task, sft.has_score_head) == ("sft", True, "LORA", "causal-lm", False)
    assert sft.base_model == str(runs["model"]) and sft.quantisation == "none" and sft.torch_dtype == "float32"
    assert (full.kind, full.is_adapter, full.peft_type, full.task) == ("sft", False, None, "causal-lm")
    assert full.base_model == str(runs["sft_full"])
    assert (reward.kind, reward.is_adapter, reward.task, reward.has_score_head) == ("reward", True, "seq-cls", True)
    assert read_run(runs["model"]).kind is None  # a plain model directory: no stage wrote it
    assert read_run(runs["reward_on_full_sft"]).base_model == str(runs["sft_full"])


# -- A: roles that cannot share a base ------------------------------------------------------------


def test_full_sft_with_a_reward_adapter_on_the_original_base_is_refused(runs):
    # The full SFT model becomes PPO's base; the reward adapter learned on the original weights.
    message = refused(runs["sft_full"], runs["reward"])
    assert "fully fine-tuned" in message and str(runs["model"]) in message
    assert f"model_name_or_path: {runs['sft_full']}" in message  # what to do


def test_full_sft_with_a_reward_adapter_trained_on_it_builds(runs):
    registry, reference = build(runs["sft_full"], runs["reward_on_full_sft"])
    assert reference is None  # the base with every adapter off is the SFT model
    assert set(registry.names) == {"policy", "reward", "value"}


def test_full_sft_refused_through_the_cli_as_one_line(runs, tmp_path, capsys):
    out = tmp_path / "ppo"
    code = main(["ppo", *ppo_argv(runs["sft_full"], runs["reward"], "--output_dir", str(out))])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and "Traceback" not in err
    assert len(errors) == 1 and "fully fine-tuned" in errors[0]
    assert not out.exists()


@pytest.mark.parametrize("method, peft_type", [("prefix", "PREFIX_TUNING"), ("prompt", "PROMPT_TUNING"), ("ia3", "IA3")])
def test_non_lora_sft_adapters_are_refused_before_loading(method, peft_type, runs):
    # Real SFT outputs of each method; before, peft raised "Cannot combine adapters with different peft types".
    sft = train("sft", runs["model"], runs["root"] / f"sft_{method}", "--peft_method", method,
                "--num_virtual_tokens", "4")
    assert json.loads((sft / "adapter_config.json").read_text())["peft_type"] == peft_type
    message = refused(sft, runs["reward"])
    assert "PPO needs a LoRA SFT adapter or a fully fine-tuned SFT model" in message
    assert f"peft_method: {method}" in message and "peft_method: lora" in message


def test_reward_adapter_on_another_base_is_refused(runs, tmp_path):
    from rlhf.demo.tiny_model import make_tiny_model_dir

    other = make_tiny_model_dir(tmp_path / "other_model", seed=1)  # same shapes, other weights
    reward = edited_copy(runs["reward"], tmp_path / "reward", adapter={"base_model_name_or_path": str(other)})
    message = refused(runs["sft"], reward)
    assert str(other) in message and str(runs["model"]) in message
    assert f"model_name_or_path: {runs['model']}" in message


def test_reward_adapter_on_a_copy_of_the_same_base_is_accepted(runs, tmp_path):
    copy = Path(shutil.copytree(runs["model"], tmp_path / "copy_of_model"))
    reward = edited_copy(runs["reward"], tmp_path / "reward", adapter={"base_model_name_or_path": str(copy)})
    registry, reference = build(runs["sft"], reward)
    assert reference == "reference"


def test_reward_adapter_from_another_quantisation_is_refused(runs, tmp_path):
    reward = edited_copy(runs["reward"], tmp_path / "reward", stage={"peft_method": "qlora-4bit"})
    message = refused(runs["sft"], reward)
    assert "4-bit quantised" in message and "unquantised" in message and "same peft_method" in message


def test_ppo_loading_the_base_otherwise_than_the_stages_is_refused(runs):
    message = refused(runs["sft"], runs["reward"], "--peft_method", "qlora-8bit")
    assert message.startswith("peft_method:") and "expected lora, found qlora-8bit" in message


def test_swapped_sft_and_reward_outputs_are_named(runs):
    message = refused(runs["sft"], runs["sft"])
    assert "expected a reward stage output" in message and "found an SFT stage output" in message
    message = refused(runs["reward"], runs["reward"])
    assert "expected an SFT stage output" in message and "found a reward stage output" in message


# -- rlhf generate on a reward output ------------------------------------------------------------


def test_generate_from_a_reward_output_is_one_line(runs, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "describe the city"}) + "\n")
    code = main(["generate", "--model", str(runs["reward"]), "--prompts", str(prompts), "--out", str(tmp_path / "o.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "expected a causal LM" in err and "found a reward stage output" in err
    assert not (tmp_path / "o.jsonl").exists()
