"""bench/bench_estimate_vs_cli.py --quick: `rlhf ppo` runs under /usr/bin/time -v (or wait4) beside
`rlhf estimate-memory` for the same settings, and both figures are printed with their ratio."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_run_prints_the_measured_peak_beside_the_estimate(default_model_dir, tmp_path):
    out = tmp_path / "estimate_vs_cli.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(REPO / "bench/bench_estimate_vs_cli.py"), "--quick", "--modes", "ckpt",
               "--tokenizer", str(default_model_dir), "--cache", str(tmp_path / "cache"), "--json", str(out)]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["gradient_checkpointing"] and row["measured_mib"] > 200 and row["estimate_mib"] > 200
    assert row["ratio"] == pytest.approx(row["estimate_mib"] / row["measured_mib"], abs=0.01)
    # The run is the (rlhf ppo, 2 steps, bf16, checkpointing on), the estimate is for its settings.
    assert " ppo " in row["ppo_command"] and "--max_steps 2" in row["ppo_command"]
    assert "--gradient_checkpointing true" in row["ppo_command"] and "--torch_dtype bfloat16" in row["ppo_command"]
    assert " estimate-memory " in row["estimate_command"] and "--gradient_checkpointing" in row["estimate_command"]
    assert f"| on | {row['measured_mib']:,} | {row['estimate_mib']:,} | {row['ratio']:.2f} |" in done.stdout
