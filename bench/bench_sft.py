"""SFT training speed on this machine: tokens/s, step time, peak memory, and model FLOP/s as a share
of the fp32 matmul ceiling measured in the same run.

    make bench-sft                                     # = .venv/bin/python bench/bench_sft.py
    .venv/bin/python bench/bench_sft.py --json runs/bench_sft.json
    .venv/bin/python bench/bench_sft.py --compare --steps 4 --warmup_steps 1   # our defaults vs the old ones
    .venv/bin/python bench/bench_sft.py --method full --batch_size 4
    .venv/bin/python bench/bench_sft.py --set attn_implementation=eager --set lora_target_modules=q_proj,v_proj

What runs is the SFT stage itself (``sft.train.run``: our model loader, peft config and TRL's
``SFTTrainer`` with the stage defaults), on synthetic rows of exactly ``seq_len`` tokens, so every
step trains on ``batch_size x gradient_accumulation_steps x seq_len`` tokens (checked against TRL's
own ``num_tokens`` counter). A callback times every optimizer step, data loading and logging
included; the first ``warmup_steps`` are left out. Checkpoints are off (``save_strategy=no``) and
there is no validation split, so no step waits on a save or an evaluation.

Conventions
- Model FLOPs per token: 6 x N for full fine-tuning (forward 2N, backward 4N), 4 x N for a frozen
  base with LoRA (forward 2N, input gradients 2N, no weight gradients). N counts every parameter of
  the base model once, embeddings included: the embedding matrix is tied to the LM head, whose
  (tokens x hidden x vocab) matmul is real work, while the lookup itself is not. Attention scores,
  LoRA's own matmuls and the loss are not counted, so the share is a slight underestimate.
- Ceiling: best of several fp32 ``torch.mm`` runs (bf16 when training in bf16) over matmul shapes of
  this model (tokens x hidden x intermediate and back, and a 2048 square), with the same thread
  count, measured before and after training: the best figure counts.
- Peak memory: the process's peak resident set size (``resource.getrusage(...).ru_maxrss``), which
  includes Python, torch, the model, optimizer state and activations.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import resource
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from rlhf.core.models import DEFAULT_MODEL, resolve_model_path  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="model directory or hub id (default: the embedded model)")
    p.add_argument("--method", default="lora", choices=["lora", "full"], help="LoRA on a frozen base, or full fine-tuning")
    p.add_argument("--seq_len", type=int, default=256, help="tokens per row (every row has exactly this many)")
    p.add_argument("--batch_size", type=int, default=None, help="rows per device step (default: the stage default)")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    p.add_argument("--warmup_steps", type=int, default=2, help="untimed optimizer steps before them")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any SFT stage key, as in configs/sft.yaml (repeatable), e.g. attn_implementation=eager")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--compare", action="store_true",
                   help="run the variants of COMPARE one after another (each in its own process, same sizes) "
                        "and print their figures side by side, as ratios to the first")
    return p.parse_args(argv)


# What our defaults changed, one at a time: (name, environment, extra --set values).
COMPARE = [
    ("defaults", {}, []),
    ("glibc malloc defaults", {"RLHF_KEEP_FREED_MEMORY": "0"}, []),
    ("lora_dropout 0.05", {}, ["lora_dropout=0.05"]),
    ("both (the old defaults)", {"RLHF_KEEP_FREED_MEMORY": "0"}, ["lora_dropout=0.05"]),
    ("bf16 autocast", {}, ["bf16=true"]),
]


def compare(argv: list[str]) -> list[dict]:
    """Each COMPARE variant in a fresh process (allocator settings are per process), in order."""
    import subprocess

    passed, skip = [], False
    for arg in argv:  # drop our own --compare/--json, keep everything else
        if skip:
            skip = False
        elif arg == "--json":
            skip = True
        elif arg != "--compare" and not arg.startswith("--json="):
            passed.append(arg)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_sft_") as tmp:
        for k, (name, env, sets) in enumerate(COMPARE):
            out = Path(tmp) / f"{k}.json"
            command = [sys.executable, __file__, *passed, "--json", str(out), *[x for s in sets for x in ("--set", s)]]
            print(f"[{k + 1}/{len(COMPARE)}] {name}", flush=True)
            subprocess.run(command, env={**os.environ, "TQDM_DISABLE": "1", **env}, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            rows.append({"variant": name, **json.loads(out.read_text())})
    return rows


def print_comparison(rows: list[dict]) -> None:
    first = rows[0]
    print(f"\n  {'variant':<26} {'tokens/s':>9} {'ratio':>6} {'share of ceiling':>17} {'ceiling GFLOP/s':>16} "
          f"{'peak RSS GB':>12} {'cores busy':>11}")
    for r in rows:
        print(f"  {r['variant']:<26} {r['tokens_per_s']:>9.1f} {r['tokens_per_s'] / first['tokens_per_s']:>6.2f} "
              f"{100 * r['ceiling_share']:>16.1f}% {r['ceiling_gflops']:>9.1f} {r['ceiling_dtype']:<6} "
              f"{r['peak_rss_gb']:>12.2f} {r['cores_busy']:>11.2f}")


# ----------------------------------------------------------------------------------------------
# The matmul ceiling
# ----------------------------------------------------------------------------------------------


def gemm_ceiling(shapes: list[tuple[int, int, int]], dtype: torch.dtype, repeats: int = 5) -> tuple[float, tuple]:
    """Best FLOP/s of ``(m, k) @ (k, n)`` over ``shapes``, best of ``repeats`` runs each."""
    best, best_shape = 0.0, shapes[0]
    for m, k, n in shapes:
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        torch.mm(a, b)  # first call: allocations and kernel selection
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b)
            flops = 2 * m * k * n / (time.perf_counter() - start)
            if flops > best:
                best, best_shape = flops, (m, k, n)
    return best, best_shape


def model_shapes(model_path: str, tokens: int) -> list[tuple[int, int, int]]:
    """The MLP matmuls of this model on one step's tokens, plus a 2048 square."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path).get_text_config()
    hidden, inner = config.hidden_size, config.intermediate_size
    return [(tokens, hidden, inner), (tokens, inner, hidden), (2048, 2048, 2048)]


# ----------------------------------------------------------------------------------------------
# Synthetic rows of exactly seq_len tokens
# ----------------------------------------------------------------------------------------------


def synthetic_rows(tokenizer, n_rows: int, seq_len: int, seed: int = 0) -> list[dict]:
    """``text`` rows that tokenise (reply + EOS, as the SFT stage does) to exactly ``seq_len`` ids.

    Each row is a first word that is one token on its own, then seq_len - 2 vocabulary entries of
    the form " word" (one token each: the byte-level pre-tokeniser splits before every space), then
    EOS. The caller checks the count with the stage's own tokeniser.
    """
    def one_token(text: str) -> bool:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"]) == 1

    words = sorted(
        text for text in (tokenizer.convert_tokens_to_string([t]) for t in tokenizer.get_vocab())
        if text.startswith(" ") and text[1:].isalpha() and text[1:].islower() and len(text) > 3 and one_token(text)
    )
    first = [w[1:] for w in words if one_token(w[1:])]
    rng = random.Random(seed)
    return [{"text": rng.choice(first) + "".join(rng.choices(words, k=seq_len - 2))} for _ in range(n_rows)]


# ----------------------------------------------------------------------------------------------
# Timing callback
# ----------------------------------------------------------------------------------------------


def make_timer(warmup_steps: int, total_steps: int):
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall time of every optimizer step (end to end), the base parameter count and TRL's token count."""

        def __init__(self):
            self.step_seconds: list[float] = []
            self.step_cpu_seconds: list[float] = []  # this process's CPU time, all threads
            self.logged_tokens: list[tuple[int, float]] = []  # (global_step, TRL's cumulative num_tokens)
            self.base_params = 0
            self.trainable_params = 0

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            # named_parameters() yields a tied tensor once; LoRA's own weights are not the base's.
            params = dict(model.named_parameters())
            self.base_params = sum(p.numel() for n, p in params.items() if "lora_" not in n)
            self.trainable_params = sum(p.numel() for p in params.values() if p.requires_grad)
            self.bar = tqdm(total=total_steps, desc="warm-up", unit="step")
            self.last, self.last_cpu = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            now, now_cpu = time.perf_counter(), time.process_time()
            self.step_seconds.append(now - self.last)
            self.step_cpu_seconds.append(now_cpu - self.last_cpu)
            self.last, self.last_cpu = now, now_cpu
            timed = self.step_seconds[warmup_steps:]
            if timed:
                self.bar.set_description("timed")
                self.bar.set_postfix(s_per_step=f"{statistics.median(timed):.2f}")
            self.bar.update(1)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "num_tokens" in logs:
                self.logged_tokens.append((state.global_step, logs["num_tokens"]))

        def on_train_end(self, args, state, control, **kwargs):
            self.bar.close()

    return StepTimer()


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def stage_overrides(pairs: list[str]) -> dict[str, str]:
    values = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set: expected KEY=VALUE, found {pair!r}")
        values[key.strip()] = value.strip()
    return values


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.compare:
        rows = compare(sys.argv[1:] if argv is None else argv)
        print_comparison(rows)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
        return {"variants": rows}
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    if args.threads:
        torch.set_num_threads(args.threads)

    from rlhf.core.models import load_tokenizer
    from rlhf.core.stage import trainer_defaults
    from rlhf.core.hooks import with_trainer_callbacks
    from sft.train import run, tokenize_sft_rows

    model_path = resolve_model_path(args.model)
    overrides = stage_overrides(args.set)
    batch_size = args.batch_size or int(overrides.pop("per_device_train_batch_size", 0)) \
        or trainer_defaults()["per_device_train_batch_size"]
    accumulation = int(overrides.get("gradient_accumulation_steps", 1))
    tokens_per_step = batch_size * accumulation * args.seq_len
    total_steps = args.warmup_steps + args.steps
    bf16 = str(overrides.get("bf16", "false")).lower() in ("1", "true", "yes", "on")
    dtype = torch.bfloat16 if bf16 else torch.float32

    shapes = model_shapes(model_path, batch_size * args.seq_len)
    print(f"measuring the {str(dtype).removeprefix('torch.')} matmul ceiling ({torch.get_num_threads()} threads)...",
          flush=True)
    ceiling_before = gemm_ceiling(shapes, dtype)

    tokenizer = load_tokenizer(model_path)
    rows = synthetic_rows(tokenizer, total_steps * batch_size * accumulation, args.seq_len)
    lengths = {len(ids) for ids in tokenize_sft_rows(tokenizer, rows)["input_ids"]}
    if lengths != {args.seq_len}:
        raise SystemExit(f"synthetic rows: expected {args.seq_len} tokens each, found lengths {sorted(lengths)}")

    timer = make_timer(args.warmup_steps, total_steps)
    with tempfile.TemporaryDirectory(prefix="bench_sft_") as tmp:
        with open(Path(tmp) / "train.jsonl", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        values = {
            "model_name_or_path": model_path,
            "peft_method": args.method,
            "train_file": str(Path(tmp) / "train.jsonl"),
            "validation_size": 0,
            "test_size": 0,
            "output_dir": str(Path(tmp) / "run"),
            "max_steps": total_steps,
            "per_device_train_batch_size": batch_size,
            "max_length": args.seq_len,
            "save_strategy": "no",
            "eval_strategy": "no",
            "load_best_model_at_end": False,
            "disable_tqdm": True,
            **overrides,
        }
        run(values, with_trainer_callbacks(timer))
        load_avg = os.getloadavg()[0]

    ceiling_after = gemm_ceiling(shapes, dtype)
    ceiling, ceiling_shape = max(ceiling_before, ceiling_after)
    logged = [n for step, n in timer.logged_tokens]
    expected = [step * tokens_per_step for step, n in timer.logged_tokens]
    if logged != expected:
        raise SystemExit(f"token count: TRL logged {logged}, expected {expected} (batch x accumulation x seq_len)")

    timed = timer.step_seconds[args.warmup_steps:]
    seconds = sum(timed)
    tokens_per_s = tokens_per_step * len(timed) / seconds
    flops_per_token = (6 if args.method == "full" else 4) * timer.base_params
    model_flops = tokens_per_s * flops_per_token
    figures = {
        "model": args.model,
        "method": args.method,
        "seq_len": args.seq_len,
        "batch_size": batch_size,
        "gradient_accumulation_steps": accumulation,
        "threads": torch.get_num_threads(),
        "stage_overrides": overrides,
        "timed_steps": len(timed),
        "warmup_steps": args.warmup_steps,
        "tokens_per_step": tokens_per_step,
        "tokens_per_s": round(tokens_per_s, 1),
        "step_s_mean": round(seconds / len(timed), 3),
        "step_s_median": round(statistics.median(timed), 3),
        "step_s_min": round(min(timed), 3),
        "step_s_max": round(max(timed), 3),
        # Below the thread count, the process waited (for memory, or for other processes on the cores).
        "step_cpu_s_median": round(statistics.median(timer.step_cpu_seconds[args.warmup_steps:]), 3),
        "cores_busy": round(sum(timer.step_cpu_seconds[args.warmup_steps:]) / seconds, 2),
        # The 1-minute load average as training ended: above the thread count, other processes shared the cores.
        "load_avg_1min": round(load_avg, 2),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2),
        "base_params": timer.base_params,
        "trainable_params": timer.trainable_params,
        "flops_per_token": flops_per_token,
        "model_gflops": round(model_flops / 1e9, 1),
        "ceiling_dtype": str(dtype).removeprefix("torch."),
        "ceiling_gflops": round(ceiling / 1e9, 1),
        "ceiling_shape": list(ceiling_shape),
        "ceiling_share": round(model_flops / ceiling, 4),
    }
    print_table(figures)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
        print(f"wrote {args.json}")
    return figures


def print_table(f: dict) -> None:
    k = 6 if f["method"] == "full" else 4
    rows = [
        ("setup", f"{f['method']}, {f['batch_size']} x {f['seq_len']} tokens"
                  f"{' x ' + str(f['gradient_accumulation_steps']) + ' accumulated' if f['gradient_accumulation_steps'] > 1 else ''}"
                  f", {f['threads']} threads{', ' + str(f['stage_overrides']) if f['stage_overrides'] else ''}"),
        ("timed steps", f"{f['timed_steps']} (after {f['warmup_steps']} warm-up)"),
        ("tokens/s", f"{f['tokens_per_s']:.1f}"),
        ("step time", f"{f['step_s_mean']:.2f} s mean, {f['step_s_median']:.2f} median "
                      f"({f['step_s_min']:.2f}-{f['step_s_max']:.2f})"),
        ("CPU use", f"{f['cores_busy']:.2f} of {f['threads']} cores busy during the timed steps "
                    f"(machine load average {f['load_avg_1min']:.1f})"),
        ("peak RSS", f"{f['peak_rss_gb']:.2f} GB (ru_maxrss)"),
        ("FLOPs/token", f"{k} x {f['base_params'] / 1e6:.1f} M base params = {f['flops_per_token'] / 1e9:.3f} GFLOP"),
        ("model FLOP/s", f"{f['model_gflops']:.1f} GFLOP/s"),
        ("matmul ceiling", f"{f['ceiling_gflops']:.1f} GFLOP/s ({f['ceiling_dtype']}, "
                           f"{' x '.join(map(str, f['ceiling_shape']))})"),
        ("share of ceiling", f"{100 * f['ceiling_share']:.1f} %"),
    ]
    width = max(len(name) for name, _ in rows)
    print()
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")


if __name__ == "__main__":
    main()
