"""``rlhf estimate-memory`` against the peak RSS of the ``rlhf ppo`` run it sizes, side by side.

    .venv/bin/python bench/bench_estimate_vs_cli.py                        # SmolLM2-360M's shape (about 8 GB)
    .venv/bin/python bench/bench_estimate_vs_cli.py --quick                # a tiny shape, under a minute (the test)
    .venv/bin/python bench/bench_estimate_vs_cli.py --bf16_forwards false  # as the issue's run (before the option)
    .venv/bin/python bench/bench_estimate_vs_cli.py --modes ckpt --json runs/bench_scale/estimate_vs_cli.json

The model directory is bench/bench_scale.py's (``prepare``: the shape's config with random bf16
weights, the default model's tokenizer, random SFT and reward LoRA adapters; built once under
``--cache``). For each mode (``nockpt``, ``ckpt``) the script runs, from the repository root so the
demo's prompt files are the defaults,

    /usr/bin/time -v rlhf ppo --sft_model <dir>/sft --reward_model <dir>/reward --output_dir <tmp> \\
        --torch_dtype bfloat16 --max_steps 2 --max_new_tokens 64 [--gradient_checkpointing true]

which is the issue's run: the demo's prompts, 8 a step, micro-batch 8, PPO's defaults otherwise
(``bf16_forwards`` auto, ``merge_for_generation`` auto, a checkpoint at step 2, the final evaluation of
32 held-out prompts, 16 at a time), and reads its "Maximum resident set size"; then the estimate
for the same settings,

    rlhf estimate-memory --model <dir> --stage ppo --method lora --dtype bfloat16 --device cpu \\
        --batch_size 8 --micro_batch_size 8 --seq_len <longest prompt> --max_new_tokens 64 [--gradient_checkpointing]

and prints both with their ratio. ``--seq_len`` is the longest chat-formatted prompt of the train and
test files in tokens (42 for the demo's), the width every batch is padded to at most. Random
weights almost never sample EOS, so replies run to ``--max_new_tokens``, as the estimate assumes.

Measure alone: a 360M PPO step took minutes on 2 busy cores and needs about 8 GB. Torch uses its
default threads unless ``OMP_NUM_THREADS`` is set (two threads peaked 3 % above one at 8 layers).
The quick shape is a smoke test of the script, not a calibration: at its size the runtime and the
vocabulary-sized work, not the layers, make the peak. Figures and what they mean: docs/memory.md,
"The estimate against `rlhf ppo`".
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import bench_scale  # the shapes, the model directory, the children's environment

MODES = {"nockpt": False, "ckpt": True}
TRAIN_FILE, TEST_FILE = "data/demo/prompts_train.jsonl", "data/demo/prompts_test.jsonl"  # rlhf ppo's defaults
PEAK = re.compile(r"Maximum resident set size \(kbytes\): (\d+)")
TOTAL = re.compile(r"^total\s+([\d,.]+)$", re.MULTILINE)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="360m", choices=list(bench_scale.SHAPES), help="model shape (bench_scale.py)")
    p.add_argument("--quick", action="store_true", help="the tiny shape, 8 new tokens (the smoke test)")
    p.add_argument("--modes", default="nockpt,ckpt", help="comma-separated: nockpt, ckpt (gradient checkpointing)")
    p.add_argument("--max_steps", type=int, default=2, help="PPO steps of the run")
    p.add_argument("--max_new_tokens", type=int, default=None, help="reply tokens (default 64; --quick 8)")
    p.add_argument("--batch_size", type=int, default=8, help="prompts per step; the micro-batch is the same")
    p.add_argument("--bf16_forwards", default="auto", choices=["auto", "true", "false"], help="PPO's option")
    p.add_argument("--tokenizer", default=None, help="a model dir whose tokenizer to use (bench_scale.py --tokenizer)")
    p.add_argument("--cache", default=str(REPO / "runs" / "bench_scale"), help="where the random models are kept")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    a = p.parse_args(argv)
    if a.quick:
        a.shape = "quick"
    a.max_new_tokens = a.max_new_tokens or (8 if a.shape == "quick" else 64)
    a.modes = a.modes.split(",")
    for mode in a.modes:
        if mode not in MODES:
            p.error(f"--modes: expected nockpt or ckpt, found {mode!r}")
    return a


def longest_prompt(model_dir: Path) -> int:
    """Tokens of the longest chat-formatted prompt PPO reads (train file, and test file for the evaluation)."""
    from rlhf.core.data import load_rows
    from rlhf.core.formatting import encode_prompt
    from rlhf.core.models import load_tokenizer

    tokenizer = load_tokenizer(str(model_dir / "sft"))
    rows = [r for name in (TRAIN_FILE, TEST_FILE) for r in load_rows(str(REPO / name), "prompt")]
    return max(len(encode_prompt(tokenizer, r["prompt"])) for r in rows)


def rlhf() -> list[str]:
    """The ``rlhf`` command of this interpreter's environment (or the module it runs)."""
    script = Path(sys.executable).with_name("rlhf")
    return [str(script)] if script.exists() else [sys.executable, "-m", "rlhf.app.cli"]


def ppo_command(a: argparse.Namespace, model_dir: Path, out: Path, ckpt: bool) -> list[str]:
    return [*rlhf(), "ppo", "--sft_model", str(model_dir / "sft"), "--reward_model", str(model_dir / "reward"),
            "--output_dir", str(out), "--torch_dtype", "bfloat16", "--max_steps", str(a.max_steps),
            "--max_new_tokens", str(a.max_new_tokens), "--batch_size", str(a.batch_size), "--mini_batch_size",
            str(a.batch_size), "--bf16_forwards", a.bf16_forwards, "--gradient_checkpointing", str(ckpt).lower()]


def estimate_command(a: argparse.Namespace, model_dir: Path, seq_len: int, ckpt: bool) -> list[str]:
    return [*rlhf(), "estimate-memory", "--model", str(model_dir), "--stage", "ppo", "--method", "lora", "--dtype",
            "bfloat16", "--device", "cpu", "--batch_size", str(a.batch_size), "--micro_batch_size", str(a.batch_size),
            "--seq_len", str(seq_len), "--max_new_tokens", str(a.max_new_tokens), "--bf16_forwards",
            a.bf16_forwards] + (["--gradient_checkpointing"] if ckpt else [])


def measure(command: list[str], env: dict[str, str], log: Path) -> tuple[float, float, str]:
    """(peak RSS MiB, wall seconds, how it was read) of ``command``, run under ``/usr/bin/time -v``;
    without GNU time, the child's own ``ru_maxrss`` from ``wait4``, which is what ``time -v`` reports."""
    started = time.perf_counter()
    with open(log, "w") as out:
        if Path("/usr/bin/time").exists():
            code = subprocess.run(["/usr/bin/time", "-v", *command], cwd=REPO, env=env, stdout=out,
                                  stderr=subprocess.STDOUT).returncode
            found = PEAK.search(log.read_text())
            peak, how = (int(found.group(1)) / 1024 if found else None), "/usr/bin/time -v"
        else:
            child = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
            _, status, usage = os.wait4(child.pid, 0)
            child.returncode = code = os.waitstatus_to_exitcode(status)
            peak, how = usage.ru_maxrss / 1024, "the child's ru_maxrss (wait4; no /usr/bin/time)"
    if code != 0 or peak is None:
        raise SystemExit(f"{' '.join(command)} failed (exit {code}):\n{log.read_text()[-4000:]}")
    return peak, time.perf_counter() - started, how


def estimate(command: list[str], env: dict[str, str]) -> tuple[float, str]:
    """(total MiB, the printed breakdown) of ``rlhf estimate-memory``."""
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    found = TOTAL.search(done.stdout)
    if done.returncode != 0 or not found:
        raise SystemExit(f"{' '.join(command)} failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr[-4000:]}")
    return float(found.group(1).replace(",", "")), done.stdout


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    model_dir = bench_scale.prepare(argparse.Namespace(cache=a.cache, shape=a.shape, tokenizer=a.tokenizer,
                                                       device="cpu"))
    seq_len = longest_prompt(model_dir)
    env = bench_scale.child_env()
    rows = []
    with tempfile.TemporaryDirectory(prefix="estimate_vs_cli_") as tmp:
        for mode in a.modes:
            ckpt = MODES[mode]
            est_cmd = estimate_command(a, model_dir, seq_len, ckpt)
            estimated, breakdown = estimate(est_cmd, env)
            print(f"[{mode}] {' '.join(est_cmd)}\n{breakdown}", file=sys.stderr, flush=True)
            if not bench_scale.wait_for_memory(estimated):
                raise SystemExit(f"less than {estimated:,.0f} + 2,048 MiB available for 10 minutes: measure alone")
            ppo_cmd = ppo_command(a, model_dir, Path(tmp) / mode, ckpt)
            print(f"[{mode}] {' '.join(ppo_cmd)}", file=sys.stderr, flush=True)
            measured, seconds, how = measure(ppo_cmd, env, Path(tmp) / f"{mode}.log")
            rows.append(dict(mode=mode, gradient_checkpointing=ckpt, measured_mib=round(measured),
                             estimate_mib=round(estimated), ratio=round(estimated / measured, 3),
                             seconds=round(seconds), peak_from=how, ppo_command=" ".join(ppo_cmd),
                             estimate_command=" ".join(est_cmd)))
            print(f"[{mode}] peak {measured:,.0f} MiB ({how}), estimate {estimated:,.0f} MiB, {seconds:.0f} s",
                  file=sys.stderr, flush=True)
    hidden, inter, layers, heads, kv = bench_scale.SHAPES[a.shape]
    settings = (f"shape {a.shape} (hidden {hidden}, intermediate {inter}, {layers} layers, {heads} heads, "
                f"{kv} KV heads, vocab {bench_scale.VOCAB}), bf16, random weights, the demo's prompts (longest "
                f"{seq_len} tokens), {a.batch_size} a step, micro-batch {a.batch_size}, {a.max_new_tokens} new "
                f"tokens, {a.max_steps} steps, bf16_forwards {a.bf16_forwards}, {os.cpu_count()} CPUs, "
                f"OMP_NUM_THREADS {os.environ.get('OMP_NUM_THREADS', 'unset')}")
    lines = ["| gradient checkpointing | rlhf ppo peak RSS MiB | rlhf estimate-memory MiB | estimate / measured |",
             "|---|---:|---:|---:|"]
    lines += [f"| {'on' if r['gradient_checkpointing'] else 'off'} | {r['measured_mib']:,} | {r['estimate_mib']:,} | "
              f"{r['ratio']:.2f} |" for r in rows]
    print(f"\nrlhf estimate-memory against rlhf ppo: {settings}\n\n" + "\n".join(lines) + "\n")
    out = {"settings": {**{k: v for k, v in vars(a).items()}, "seq_len": seq_len}, "rows": rows}
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
