"""bench/bench_scale.py --quick: every kind of row runs in its own process and is printed beside its estimate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_rows_run_and_get_an_estimate(default_model_dir, tmp_path):
    out = tmp_path / "scale.json"
    rows = "sft-lora,ppo-lora,ppo-lora-ckpt,ppo-lora-nobf16fwd,ppo-lora-policyhead,trl019-lora"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(REPO / "bench/bench_scale.py"), "--quick", "--rows", rows,
                           "--tokenizer", str(default_model_dir), "--cache", str(tmp_path / "cache"),
                           "--json", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(out.read_text())
    assert [r["row"] for r in result["results"].values()] == rows.split(",")
    for r in result["results"].values():
        assert r["peak_rss_mib"] > 200  # python + torch at least
        assert r["estimate_mib"] > 0
        assert r["kept_heap"] is not None
    ppo = result["results"]["ppo-lora-ckpt/rlhf"]
    assert ppo["reply_lengths"] == [8.0]  # every reply forced to --new_tokens (quick: 8)
    # bf16_forwards: auto is on for the default row on the bf16 base, off where the row forces it off.
    assert ppo["bf16_forwards"] and result["results"]["ppo-lora/rlhf"]["bf16_forwards"]
    assert not result["results"]["ppo-lora-nobf16fwd/rlhf"]["bf16_forwards"]
    assert result["results"]["ppo-lora/rlhf"]["value_model"] == "critic"
    head = result["results"]["ppo-lora-policyhead/rlhf"]
    assert head["value_model"] == "policy_head"
    assert head["estimate_mib"] < result["results"]["ppo-lora/rlhf"]["estimate_mib"]  # no critic adapter
    assert {r["name"] for r in result["ratios"]} == {"PPO / SFT peak, lora", "TRL 0.19 layout / our PPO peak, lora",
                                                    "PPO peak, bf16 forwards on / off, lora",
                                                    "PPO / SFT peak, lora, value_model policy_head"}
    assert "| ppo-lora-ckpt | rlhf |" in done.stdout


def test_device_cuda_is_refused_where_torch_sees_no_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    done = subprocess.run([sys.executable, str(REPO / "bench/bench_scale.py"), "--device", "cuda", "--quick",
                           "--cache", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "--device cuda: torch sees no CUDA device" in done.stderr
    assert not any(tmp_path.iterdir())  # refused before any model was built
