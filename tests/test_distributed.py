"""Every stage under 2 gloo processes (torchrun on CPU) against 1 process on the same global batch,
PPO sharded with FSDP against DDP, and on a GPU machine SFT and reward under FSDP and DeepSpeed
ZeRO-2/3 against 1 process.

`accelerate launch --cpu --num_processes 2` silently starts one process, so the CPU tests use
torchrun, which gives real gloo DDP on a CPU machine. The GPU tests are skipped without CUDA;
scripts/gpu_distributed_check.sh runs them (and the demo-sized runs) on a GPU machine.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny"
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Runs a script as __main__, then says whether it left the process group open: one left to the
# interpreter's exit can abort a finished run (gloo, SIGABRT), rarely enough to pass most runs.
REPORT_GROUP = """import os, runpy, sys
import torch.distributed as dist
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as e:
    code = e.code
else:
    code = 0
sys.stdout.flush()
os.write(1, f"process group left open: {dist.is_initialized()}\\n".encode())  # one write: lines stay whole
sys.exit(code)
"""


def torchrun(script: str, args: list[str], cwd: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    launcher = cwd / "report_group.py"
    launcher.write_text(REPORT_GROUP)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", str(launcher), str(ROOT / "scripts" / script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("process group left open: False") == nproc, result.stdout[-3000:]
    return result


def accelerate_launch(config: str, script: str, args: list[str], cwd: Path, nproc: int, launch: tuple[str, ...] = (),
                      env: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """``accelerate launch --config_file configs/accelerate/<config>.yaml`` of ``scripts/<script>``, as a user runs it."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs" / "accelerate" / f"{config}.yaml"), "--num_processes", str(nproc),
           "--main_process_port", str(free_port()), *launch, str(ROOT / "scripts" / script), *args]
    result = subprocess.run(cmd, cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def stage_outputs(tiny_model_dir, tmp_path_factory):
    """A tiny SFT adapter and reward adapter (one process) for PPO to start from."""
    from reward.train import run as run_reward
    from sft.train import run as run_sft

    out = tmp_path_factory.mktemp("dist")
    common = ["--model_name_or_path", str(tiny_model_dir)]
    run_sft(argv=["--config", str(TINY / "sft.yaml"), *common, "--output_dir", str(out / "sft"),
                  "--train_file", str(ROOT / "data/demo/sft_train.jsonl"),
                  "--validation_file", str(ROOT / "data/demo/sft_validation.jsonl"),
                  "--test_file", str(ROOT / "data/demo/sft_test.jsonl")])
    run_reward(argv=["--config", str(TINY / "reward.yaml"), *common, "--output_dir", str(out / "reward"),
                     "--train_file", str(ROOT / "data/demo/prefs_train.jsonl"),
                     "--validation_file", str(ROOT / "data/demo/prefs_validation.jsonl"),
                     "--test_file", str(ROOT / "data/demo/prefs_test.jsonl")])
    return out


def stage_args(stage: str, model_dir: Path, out: Path, batch_size: int) -> list[str]:
    """A tiny SFT or reward run on the demo data, ``batch_size`` rows (pairs) per process and step."""
    kind = {"sft": "sft", "reward": "prefs"}[stage]
    return ["--config", str(TINY / f"{stage}.yaml"), "--model_name_or_path", str(model_dir),
            "--output_dir", str(out),
            "--train_file", str(ROOT / f"data/demo/{kind}_train.jsonl"),
            "--validation_file", str(ROOT / f"data/demo/{kind}_validation.jsonl"),
            "--test_file", str(ROOT / f"data/demo/{kind}_test.jsonl"),
            "--per_device_train_batch_size", str(batch_size)]


def assert_matches_one_process(out: Path, reference: Path, stage: str) -> None:
    """``out`` (several processes) trained as ``reference`` (one process, the same global batch) did:
    a complete run, finite metrics that match, and LoRA updates that are not zero and match."""
    assert (out / "adapter_model.safetensors").exists(), sorted(p.name for p in out.iterdir())
    assert not Path(str(out) + ".tmp").exists()
    got, want = (json.loads((p / "metrics.json").read_text()) for p in (out, reference))
    held_out = "test_loss" if stage == "sft" else "test_mean_margin"
    for key in ("train_loss", held_out):
        assert math.isfinite(got[key]), (key, got[key])
        # On CPU the two agree to the last digit; a run on half the global batch moves train_loss by ~0.5 %.
        assert got[key] == pytest.approx(want[key], rel=2e-3, abs=1e-4), (key, got[key], want[key])
    a, b = (load_file(str(p / "adapter_model.safetensors")) for p in (out, reference))
    assert a.keys() == b.keys()
    assert all(torch.isfinite(v).all() for v in a.values())
    # peft starts every lora_B at zero, so lora_B is the training's whole update: it must have moved,
    # and the same way as in one process (a norm, not elementwise: Adam's first steps are sign-like,
    # and a gradient entry near zero may flip sign with the reduction order). On CPU the two differ by
    # 1e-7 of the norm; a run on half the global batch differs by about 0.3.
    keys = sorted(k for k in a if "lora_B" in k)
    assert keys, sorted(a)[:5]
    update = torch.cat([a[k].float().flatten() for k in keys])
    expected = torch.cat([b[k].float().flatten() for k in keys])
    assert update.abs().max() > 0
    assert (update - expected).norm() <= 0.05 * expected.norm(), ((update - expected).norm(), expected.norm())


@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_trainer_stages_run_under_two_processes(stage, tiny_model_dir, tmp_path):
    two, one = tmp_path / "two" / stage, tmp_path / "one" / stage
    torchrun(f"{stage}.py", stage_args(stage, tiny_model_dir, two, batch_size=4), cwd=tmp_path)
    torchrun(f"{stage}.py", stage_args(stage, tiny_model_dir, one, batch_size=8), cwd=tmp_path, nproc=1)
    # Both processes trained as one gloo group: 4 steps of 2 x 4 rows = 32 rows seen, one epoch of the
    # 32 training rows (a lone process would have seen 16, half an epoch).
    assert json.loads((two / "metrics.json").read_text())["epoch"] == pytest.approx(1.0)
    assert_matches_one_process(two, one, stage)


def ppo_args(outputs: Path, out: Path, batch_size: int, report_to: str = "none") -> list[str]:
    return [
        "--config", str(TINY / "ppo.yaml"),
        "--sft_model", str(outputs / "sft"), "--reward_model", str(outputs / "reward"),
        "--output_dir", str(out),
        "--train_file", str(ROOT / "data/demo/prompts_train.jsonl"),
        "--test_file", str(ROOT / "data/demo/prompts_test.jsonl"),
        "--max_steps", "2", "--save_steps", "2",
        "--batch_size", str(batch_size), "--mini_batch_size", str(batch_size),
        "--gradient_accumulation_steps", "1", "--ppo_epochs", "1",
        # Greedy decoding: both runs generate the same replies for the same global batch.
        "--do_sample", "false", "--max_new_tokens", "6",
        "--kl_coef", "0.2", "--learning_rate", "1e-3",
        "--report_to", report_to,
    ]


def assert_ppo_runs_match(got: Path, want: Path) -> None:
    """Two 2-step PPO runs on the same global batch: the same statistics at each step (the second
    step starts from the first step's update, so equal statistics there mean equal gradients) and
    the same policy and value adapters, saved whole under the same names."""
    history_want = json.loads((want / "log_history.json").read_text())
    history_got = json.loads((got / "log_history.json").read_text())
    assert len(history_want) == len(history_got) == 2
    for h1, h2 in zip(history_want, history_got):
        for key in ("score", "kl", "response_length", "policy_loss", "value_loss", "entropy", "clipfrac",
                    "approx_kl", "explained_variance", "kl_coef"):
            assert h2[key] == pytest.approx(h1[key], rel=2e-3, abs=2e-4), key
    assert history_want[1]["policy_loss"] != history_want[0]["policy_loss"]
    for role in ("", "value/"):
        a = load_file(str(want / role / "adapter_model.safetensors"))
        b = load_file(str(got / role / "adapter_model.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-5)


def test_two_process_ppo_matches_one_process_on_the_same_global_batch(stage_outputs, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    torchrun("ppo.py", ppo_args(stage_outputs, one, batch_size=8), cwd=tmp_path, nproc=1)
    torchrun("ppo.py", ppo_args(stage_outputs, two, batch_size=4, report_to="tensorboard"), cwd=tmp_path)

    assert_ppo_runs_match(two, one)
    # Only rank 0 writes logs: every tensorboard event file comes from one process (the writer's pid
    # is the last part of the file name; accelerate adds a second file for hparams).
    event_files = list(two.rglob("events.out.tfevents*"))
    assert event_files
    assert len({f.name.split(".")[-2] for f in event_files}) == 1, event_files


def test_ppo_with_its_base_sharded_by_fsdp_matches_ddp_on_the_same_global_batch(stage_outputs, tmp_path):
    """The user's command on 2 CPU processes (gloo): accelerate launch with configs/accelerate/ppo_fsdp.yaml.
    accelerate reports a CPU run as multi-CPU, and PPO shards its base with FSDP2 from the launch's
    settings; the steps, the final evaluation (every process joins its sharded forwards) and the
    saved adapters match plain DDP on the same global batch. With gradient checkpointing, which
    recomputes each sharded layer in the backward and changes no result."""
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    torchrun("ppo.py", ppo_args(stage_outputs, ddp, batch_size=4), cwd=tmp_path)
    result = accelerate_launch("ppo_fsdp", "ppo.py", ppo_args(stage_outputs, fsdp, batch_size=4)
                               + ["--gradient_checkpointing", "true"], tmp_path, 2, env={"OMP_NUM_THREADS": "1"})
    assert result.stderr.count("decoder layers are sharded over 2 processes") == 2  # both processes sharded

    assert_ppo_runs_match(fsdp, ddp)
    metrics_ddp, metrics_fsdp = (json.loads((p / "metrics.json").read_text()) for p in (ddp, fsdp))
    for key in ("eval_policy_reward_model_score", "eval_policy_kl_to_reference", "eval_reference_reward_model_score"):
        assert metrics_fsdp[key] == pytest.approx(metrics_ddp[key], rel=2e-3, abs=2e-4), key


def test_two_process_ppo_resumes_with_the_same_number_of_processes(stage_outputs, tmp_path):
    """3 steps straight == 3 steps killed after the step-2 checkpoint and resumed, on 2 processes."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    sampling = ["--max_steps", "3", "--save_steps", "2", "--do_sample", "true"]
    torchrun("ppo.py", ppo_args(stage_outputs, straight, batch_size=2) + sampling, cwd=tmp_path)

    killer = tmp_path / "ppo_killed_at_step_2.py"
    killer.write_text(
        "import os, sys\n"
        "from rlhf.core.hooks import StageHooks\n"
        "from rlhf.ppo.trainer import run\n"
        "class Die(StageHooks):\n"
        "    def on_checkpoint(self, step, path):\n"
        "        if step == 2:\n"
        "            os._exit(137)\n"
        "run(argv=sys.argv[1:], hooks=Die())\n"
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(killer), *ppo_args(stage_outputs, resumed, batch_size=2), *sampling]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    killed = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode != 0
    assert (Path(str(resumed) + ".tmp") / "checkpoint-2" / "rng_1.pt").exists()
    assert not resumed.exists()

    torchrun("ppo.py", ppo_args(stage_outputs, resumed, batch_size=2) + sampling + ["--resume"], cwd=tmp_path)
    for role in ("", "value/"):
        a = load_file(str(straight / role / "adapter_model.safetensors"))
        b = load_file(str(resumed / role / "adapter_model.safetensors"))
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)
    history_a = json.loads((straight / "log_history.json").read_text())
    history_b = json.loads((resumed / "log_history.json").read_text())
    for ha, hb in zip(history_a, history_b):
        assert hb["score"] == pytest.approx(ha["score"], abs=1e-6)
        assert hb["kl"] == pytest.approx(ha["kl"], abs=1e-6)


def test_accelerate_configs_parse():
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {}
    for path in sorted((ROOT / "configs" / "accelerate").glob("*.yaml")):
        config = load_config_from_file(str(path))
        kinds[path.stem] = str(config.distributed_type)
        assert config.num_processes >= 2
    assert {"ddp", "fsdp", "ppo_fsdp", "deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero2_offload",
            "deepspeed_zero3_offload", "multi_node_ddp"} <= set(kinds)
    assert "FSDP" in kinds["fsdp"] and "FSDP" in kinds["ppo_fsdp"] and "DEEPSPEED" in kinds["deepspeed_zero3_offload"]


@pytest.fixture(scope="module")
def one_process_gpu(tiny_model_dir, tmp_path_factory):
    """SFT or reward in one process on the GPU with the global batch of the sharded launches below
    (4 rows per GPU), run once per stage for all of them."""
    runs: dict[str, Path] = {}

    def get(stage: str) -> Path:
        if stage not in runs:
            out = tmp_path_factory.mktemp(f"one-gpu-{stage}") / stage
            torchrun(f"{stage}.py", stage_args(stage, tiny_model_dir, out, 4 * torch.cuda.device_count()),
                     cwd=out.parent, nproc=1)
            runs[stage] = out
        return runs[stage]

    return get


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP and DeepSpeed need CUDA (accelerate's FSDP plugin "
                    "finds 'no available devices' on CPU); scripts/gpu_distributed_check.sh runs these")
@pytest.mark.parametrize("config", ["fsdp", "deepspeed_zero2", "deepspeed_zero2_offload", "deepspeed_zero3",
                                    "deepspeed_zero3_offload"])
@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_sharded_stage_on_gpu_matches_one_process(stage, config, tiny_model_dir, one_process_gpu, tmp_path):
    """SFT and reward under each sharded accelerate config, fp32 (``--mixed_precision no``) so that the
    run can be held against one process: the adapter is saved whole at the output's root (not as
    shards), the losses match and the LoRA update matches."""
    if config.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
    out = tmp_path / stage
    accelerate_launch(config, f"{stage}.py", stage_args(stage, tiny_model_dir, out, batch_size=4), tmp_path,
                      torch.cuda.device_count(), launch=("--mixed_precision", "no"), timeout=900)
    assert_matches_one_process(out, one_process_gpu(stage), stage)


def test_two_process_ppo_stops_together_on_a_nan_found_by_one_process(stage_outputs, tmp_path):
    """A NaN reward on process 1 only: both processes stop with the message (none waits in an
    all-reduce until the timeout), and the last good checkpoint is kept."""
    script = tmp_path / "ppo_nan_on_rank_1.py"
    script.write_text(
        "import os, sys\n"
        "import torch\n"
        "import rlhf.ppo.trainer as ppo\n"
        "built, build_roles = [], ppo.build_roles\n"
        "def keep(*args, **kwargs):\n"
        "    roles = build_roles(*args, **kwargs)\n"
        "    built.append(roles[0])\n"
        "    return roles\n"
        "ppo.build_roles = keep\n"
        "rank = int(os.environ['RANK'])\n"
        "class Poison(ppo.StageHooks):\n"
        "    def on_checkpoint(self, step, path):\n"
        "        if step == 2 and rank == 1:\n"
        "            with torch.no_grad():\n"
        "                built[0].heads['reward'].weight.fill_(float('nan'))\n"
        "try:\n"
        "    ppo.run(argv=sys.argv[1:], hooks=Poison())\n"
        "except ppo.NonFiniteError as error:\n"
        "    print(f'process {rank} stopped: {error}', flush=True)\n"
        "    sys.exit(3)\n"
    )
    out = tmp_path / "ppo"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(script), *ppo_args(stage_outputs, out, batch_size=2), "--max_steps", "4", "--save_steps", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode != 0
    for rank in (0, 1):
        assert f"process {rank} stopped: step 3: non-finite values (NaN/Inf) in the " in result.stdout, result.stdout
    assert "(found by process 1)" in result.stdout
    work = Path(str(out) + ".tmp")
    assert str(work / "checkpoint-2") in result.stdout
    assert sorted(p.name for p in work.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not out.exists()
