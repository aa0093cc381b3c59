"""PPO, DPO, GRPO and RLOO from the same SFT run and labels, each with the same wall-clock training budget.

    make compare                                   # = python experiments/compare_methods.py
    python experiments/compare_methods.py --budget_seconds 600 --k 4 --out runs/compare
    python experiments/compare_methods.py --quick      # a tiny random model, a few seconds per method: the plumbing only

Each method runs in its own process (its peak RSS is its own) from ``--sft``, ``--label`` and ``--reward``
(made as the pipeline makes them, with configs/sft.yaml, configs/label.yaml and configs/reward.yaml, when
missing): the reward model trains on the label stage's pairs of SFT replies, and so does DPO, so every
method learns from the same labels. Each method has its demo config and its own
schedule (max_steps or epochs, as ``make demo`` would run it), and stops training early once
``--budget_seconds`` of training have passed (model loading, the first step and the final evaluation
are not counted): a StageHooks that hears every step's log (logging_steps 1) raises StopTraining,
and the stage writes a checkpoint there and finishes from it as after its last step, whichever its
training loop (TRL's Trainer or PPO's own). The table gives each method's training seconds and steps.
A method cut by the budget leaves its learning-rate schedule and KL horizon part-way. Each keeps its
own schedule because a huge max_steps ended by the clock would keep PPO's learning rate at its peak
and its adaptive KL coefficient frozen: that would measure the schedule, not the method.

Then ``rlhf eval`` samples ``--k`` replies per held-out prompt (data/demo/prompts_heldout.jsonl) from
SFT and every method with the same sampling settings and judges them: win rate against SFT (ties
count half, 95 % bootstrap interval over prompts) by the demo annotator (the labeller of the training
pairs) and by the lexicon judge (independent of it), reward-model score, KL to SFT, distinct-2 and
reply length. One table goes to <out>/compare.md (and compare.json).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rlhf.app.stages import METHODS  # noqa: E402  (ppo, dpo, grpo, rloo: the registry's alignment stages)

HELDOUT = "data/demo/prompts_heldout.jsonl"


# ----------------------------------------------------------------------------------------------
# One method in a child process
# ----------------------------------------------------------------------------------------------


def child(method: str, config: dict, budget: float, report: str) -> None:
    """Train ``method`` for at most ``budget`` seconds of training; write wall time and peak RSS to ``report``."""
    from rlhf.app.stages import run_stage
    from rlhf.core.hooks import StageHooks, StopTraining

    class Budget(StageHooks):
        """Ends training at the first step that ends ``budget`` seconds after the first one ended."""

        start: float | None = None
        last: float | None = None
        steps = 0

        def on_log(self, step: int, logs: dict) -> None:
            if "loss" not in logs and "score" not in logs:  # evaluations and the final summary log too
                return
            now = time.time()
            self.start = self.start or now  # setup and the first step (compilation, caches) excluded
            self.last, self.steps = now, step
            if now - self.start >= budget:
                raise StopTraining(f"{budget:.0f} s of training")

    started, hooks = time.time(), Budget()
    run_stage(method, {**config, "logging_steps": 1}, hooks)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    Path(report).write_text(json.dumps({"wall_seconds": time.time() - started, "peak_rss_bytes": peak,
                                        "steps": hooks.steps,
                                        "train_seconds": (hooks.last or 0.0) - (hooks.start or 0.0)}))


def run_method(method: str, config: dict, budget: float, out: Path) -> dict:
    report = out / f"{method}.process.json"
    if (out / method / "metrics.json").exists() and report.exists():
        print(f"{method}: finished run in {out / method}, kept")
        return json.loads(report.read_text())
    code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); from experiments.compare_methods import child; "
            f"child({method!r}, {config!r}, {budget!r}, {str(report)!r})")
    print(f"{method}: training for {budget:.0f} s ...", flush=True)
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
    return json.loads(report.read_text())


# ----------------------------------------------------------------------------------------------
# Inputs: the SFT and reward runs
# ----------------------------------------------------------------------------------------------


def quick_setup(out: Path) -> tuple[Path, Path, dict[str, dict]]:
    """A tiny random model, tiny SFT and reward runs, and each method's tiny config."""
    from rlhf.app.stages import run_stage
    from rlhf.demo.tiny_model import make_tiny_model_dir

    model = out / "tiny_model"
    if not (model / "config.json").exists():
        make_tiny_model_dir(model)
    sft, reward = out / "sft", out / "reward"
    for stage, run_dir in (("sft", sft), ("reward", reward)):
        if not (run_dir / "metrics.json").exists():
            run_stage(stage, {"config": f"configs/tiny/{stage}.yaml", "model_name_or_path": str(model),
                              "output_dir": str(run_dir), "overwrite_output_dir": True})
    configs = {m: {"config": f"configs/tiny/{m}.yaml", "max_steps": 200} for m in METHODS}
    configs["ppo"]["eval_prompts"] = 4
    return sft, reward, configs


def demo_setup(sft: Path, label: Path, reward: Path) -> dict[str, dict]:
    from rlhf.app.stages import run_stage

    pairs = {f"{split}_file": str(label / f"{split}.jsonl") for split in ("train", "validation", "test")}
    for stage, run_dir, extra in (("sft", sft, {}), ("label", label, {"sft_model": str(sft)}),
                                  ("reward", reward, pairs)):
        if not (run_dir / "metrics.json").exists():
            run_stage(stage, {"config": f"configs/{stage}.yaml", "output_dir": str(run_dir), **extra})
    # Each method's own demo schedule (its learning-rate decay and KL horizon end where its run
    # does); the budget only caps a slower one. No in-stage evaluation: rlhf eval below judges all.
    return {"ppo": {"config": "configs/ppo.yaml", "eval_prompts": 0},
            "dpo": {"config": "configs/dpo.yaml", "eval_prompts": 0, **pairs},
            "grpo": {"config": "configs/grpo.yaml", "eval_prompts": 0},
            "rloo": {"config": "configs/rloo.yaml", "eval_prompts": 0}}


# ----------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------


def table(report: dict, processes: dict[str, dict], budget: float, k: int, prompts: int) -> str:
    from rlhf.eval.statistics import format_interval

    runs, rates = report["runs"], report["win_rates"]
    judge = {name.split(":")[0]: name for name in next(iter(rates.values()))}

    def rate(method: str, which: str, key: str = "win_rate") -> str:
        return format_interval(rates[method][judge[which]], key)

    lines = [f"# PPO, DPO, GRPO, RLOO from the same SFT run and labels (each its demo schedule, at most {budget:.0f} s of training)", "",
             f"{prompts} held-out prompts x {k} samples per policy; win rates against SFT, ties half, "
             "95 % bootstrap intervals over prompts.", "",
             "| method | win rate vs SFT (annotator) | win rate (lexicon, independent) | prompts won (lexicon) | "
             "reward-model score | KL to SFT (nats/reply) | distinct-2 | reply words | steps | training s after step 1 | "
             "wall s (all) | peak RSS GiB |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in ["sft", *METHODS]:
        if name not in runs:
            continue
        r = runs[name]
        wins = (("(baseline)",) * 3 if name == "sft" else
                (rate(name, "annotator"), rate(name, "lexicon"), rate(name, "lexicon", "prompt_win_rate")))
        process = processes.get(name, {})
        wall = f"{process['wall_seconds']:.0f}" if process else ""
        steps = str(process.get("steps", "")) if process else ""
        trained = f"{process['train_seconds']:.0f}" if "train_seconds" in process else ""
        peak = f"{process['peak_rss_bytes'] / 2**30:.2f}" if process else ""
        lines.append(f"| {name.upper() if name != 'sft' else 'SFT'} | {wins[0]} | {wins[1]} | {wins[2]} | "
                     f"{r['scores'][judge['reward']]['mean']:.3f} | {r['kl_to_reference']:.2f} | "
                     f"{r['distinct_2']:.3f} | {r['reply_length']:.1f} | {steps} | {trained} | {wall} | {peak} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/compare", help="runs, eval and the table go here")
    parser.add_argument("--sft", help="SFT run (default: <out>/sft, trained with configs/sft.yaml if missing)")
    parser.add_argument("--label", help="label stage output (default: <out>/label, configs/label.yaml if missing)")
    parser.add_argument("--reward", help="reward run (default: <out>/reward, configs/reward.yaml on the label pairs "
                                         "if missing)")
    parser.add_argument("--budget_seconds", type=float, default=900.0,
                        help="most training time of each method (its own schedule may end it sooner)")
    parser.add_argument("--k", type=int, default=4, help="samples per held-out prompt and policy")
    parser.add_argument("--max_new_tokens", type=int, default=32, help="longest reply in the evaluation")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    parser.add_argument("--quick", action="store_true", help="tiny random model and configs: the plumbing only")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    methods = [m for m in args.methods.split(",") if m]
    if args.quick:
        budget = min(args.budget_seconds, 15.0)
        sft, reward, configs = quick_setup(out)
    else:
        budget = args.budget_seconds
        sft, reward = Path(args.sft or out / "sft"), Path(args.reward or out / "reward")
        configs = demo_setup(sft, Path(args.label or out / "label"), reward)
    processes = {}
    for method in methods:
        config = {**configs[method], "sft_model": str(sft), "reward_model": str(reward), "output_dir": str(out / method)}
        processes[method] = run_method(method, config, budget, out)

    from rlhf.app.cli import main as rlhf_main

    heldout = [line for line in (REPO / HELDOUT).read_text().splitlines() if line.strip()]
    k = 2 if args.quick else args.k
    eval_argv = ["eval", "--runs", str(sft), *[str(out / m) for m in methods], "--prompts", str(REPO / HELDOUT),
                 "--out", str(out / "eval"), "--judges", f"annotator,lexicon,reward:{reward}", "--k", str(k),
                 "--skip", "forgetting,factual,bias", "--max_new_tokens", str(8 if args.quick else args.max_new_tokens),
                 "--bootstrap", "2000"]
    from rlhf.eval.evaluate import kept_report

    report = kept_report(out / "eval", methods, k)
    if report:
        print(f"{out / 'eval' / 'report.json'}: every method evaluated, kept")
    else:
        code = rlhf_main(eval_argv)
        if code not in (0, 3):
            return code
        report = json.loads((out / "eval" / "report.json").read_text())
    text = table(report, processes, budget, k, len(heldout))
    (out / "compare.md").write_text(text)
    (out / "compare.json").write_text(json.dumps({"processes": processes, "budget_seconds": budget,
                                                  "win_rates": report["win_rates"]}, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
