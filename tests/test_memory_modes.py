"""Memory modes on CPU: all three stages on QLoRA 4-bit / 8-bit bases and on a bfloat16 base, with
gradient checkpointing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny"
DATA = ROOT / "data" / "demo"
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("method, dtype", [("qlora-4bit", "float32"), ("qlora-8bit", "float32"), ("lora", "bfloat16")])
def test_all_stages_train_in_each_memory_mode_with_gradient_checkpointing(method, dtype, tiny_model_dir_4bit, tmp_path):
    from reward.train import run as run_reward
    from rlhf.ppo.trainer import run as run_ppo
    from sft.train import run as run_sft

    common = ["--model_name_or_path", str(tiny_model_dir_4bit), "--peft_method", method, "--torch_dtype", dtype,
              "--gradient_checkpointing", "true", "--warmup_steps", "0"]
    run_sft(argv=["--config", str(TINY / "sft.yaml"), *common, "--output_dir", str(tmp_path / "sft"),
                  "--train_file", str(DATA / "sft_train.jsonl"), "--validation_file", str(DATA / "sft_validation.jsonl"),
                  "--test_file", str(DATA / "sft_test.jsonl")])
    run_reward(argv=["--config", str(TINY / "reward.yaml"), *common, "--output_dir", str(tmp_path / "reward"),
                     "--train_file", str(DATA / "prefs_train.jsonl"),
                     "--validation_file", str(DATA / "prefs_validation.jsonl"),
                     "--test_file", str(DATA / "prefs_test.jsonl")])
    metrics = run_ppo(argv=["--config", str(TINY / "ppo.yaml"), "--sft_model", str(tmp_path / "sft"),
                            "--reward_model", str(tmp_path / "reward"), "--output_dir", str(tmp_path / "ppo"),
                            "--peft_method", method, "--torch_dtype", dtype, "--gradient_checkpointing", "true",
                            "--max_steps", "2",
                            "--learning_rate", "1e-2", "--train_file", str(DATA / "prompts_train.jsonl"),
                            "--test_file", str(DATA / "prompts_test.jsonl")])
    assert all(torch.isfinite(torch.tensor(v)) for k, v in metrics.items()
               if k.startswith("final_") and isinstance(v, float) and k != "final_explained_variance")
    before = load_file(str(tmp_path / "sft" / "adapter_model.safetensors"))
    after = load_file(str(tmp_path / "ppo" / "adapter_model.safetensors"))
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before), f"PPO on a {method} {dtype} base changed nothing"
