"""PPO levers, each measured on the held-out prompts: PPO variants from the same SFT and reward runs.

    python experiments/ppo_levers.py                       # after make demo: runs/demo/{sft,reward} -> runs/levers
    python experiments/ppo_levers.py --variants baseline,replies_per_prompt_4 --seeds 42,1,2,3 --jobs 2

Each variant is ``rlhf ppo --config configs/ppo.yaml`` plus a few overrides (VARIANTS below), trained
from ``--sft`` and ``--reward`` into ``<out>/<variant>`` (``<out>/<variant>-s<seed>`` for each of
``--seeds`` other than the config's own), so the table shows how far a seed moves the figures.
Two variants train their own reward model first: ``sft_pairs`` adds preference pairs of the SFT
model's own replies (``rlhf label generate`` from SFT on the training prompts, labelled by the demo
annotator, as the InstructGPT recipe labels samples of the SFT model) to the reward model's
training file (``<out>/reward_sft_pairs``); ``replies_per_prompt_4_reward_432`` trains against a reward
model fitted to three times the demo's preference pairs (``rlhf/demo/make_data.py --prefs-train
432``, whose first 144 are the demo's own; ``<out>/reward_432_pairs``). ``--data`` points PPO at
another demo data directory's prompts.

Then ``rlhf eval`` samples ``--k`` replies per held-out prompt (data/demo/prompts_heldout.jsonl) from
SFT and every variant with the same seed and judges them with the lexicon judge (independent of the
annotator), the annotator and the ``--reward`` model; runs an earlier evaluation in ``<out>/eval*``
already covers are not sampled again (SFT's samples are the same in each, so the figures compare).
``<out>/levers.md`` gets one row per run: share of prompts won against SFT (ties half) with its 95 %
bootstrap interval per judge, on-topic rate, distinct-2, reply words, KL to SFT, the PPO run's wall
time and whether it meets the goal (GOAL below); then one row per variant over its seeds. ``--jobs 2``
trains two runs side by side with one thread each (wall times are then those of a shared machine).
Finished runs are kept, so a rerun only does what is missing.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HELDOUT = "data/demo/prompts_heldout.jsonl"
RLHF = [sys.executable, "-m", "rlhf.app.cli"]

VARIANTS: dict[str, tuple[str, list[str]]] = {
    "baseline": ("configs/ppo.yaml as it is", []),
    "policy_head": ("value_model: policy_head", ["--value_model", "policy_head"]),
    "normalize_reward": ("normalize_reward: true, reward_clip: 3", ["--normalize_reward", "true", "--reward_clip", "3.0"]),
    "kl_coef_0.1": ("kl_coef: 0.1 (twice the starting KL coefficient)", ["--kl_coef", "0.1"]),
    "kl_coef_0.2": ("kl_coef: 0.2 (4x)", ["--kl_coef", "0.2"]),
    "lr_1e-4": ("learning_rate: 1e-4 (half)", ["--learning_rate", "1.0e-4"]),
    "steps_32": ("max_steps: 32 (twice the replies)", ["--max_steps", "32"]),
    "batch_16": ("batch_size: 16, mini_batch_size: 4 (twice the replies, 4 updates a step)",
                 ["--batch_size", "16", "--mini_batch_size", "4"]),
    "replies_per_prompt_4": ("replies_per_prompt: 4 (2 prompts x 4 replies a step)", ["--replies_per_prompt", "4"]),
    "remove_length_trend": ("remove_length_trend: true (the reward's linear trend in length taken out)",
                            ["--remove_length_trend", "true"]),
    "keep_length_trend": ("remove_length_trend: false (configs/ppo.yaml before it took the trend out)",
                          ["--remove_length_trend", "false"]),
    "steps_32_remove_length_trend": ("max_steps: 32 and remove_length_trend: true",
                                     ["--max_steps", "32", "--remove_length_trend", "true"]),
    "ppo_epochs_2": ("ppo_epochs: 2", ["--ppo_epochs", "2"]),
    "ppo_epochs_2_kl_coef_0.1": ("ppo_epochs: 2 and kl_coef: 0.1 (twice the starting KL coefficient)",
                                 ["--ppo_epochs", "2", "--kl_coef", "0.1"]),
    "ppo_epochs_2_steps_12": ("ppo_epochs: 2 and max_steps: 12 (about the default's time: 96 replies, 48 optimizer steps)",
                              ["--ppo_epochs", "2", "--max_steps", "12"]),
    "ppo_epochs_2_steps_12_entropy_0.01": ("ppo_epochs: 2, max_steps: 12 and entropy_coef: 0.01",
                                           ["--ppo_epochs", "2", "--max_steps", "12", "--entropy_coef", "0.01"]),
    "ppo_epochs_2_steps_12_entropy_0.05": ("ppo_epochs: 2, max_steps: 12 and entropy_coef: 0.05",
                                           ["--ppo_epochs", "2", "--max_steps", "12", "--entropy_coef", "0.05"]),
    "ppo_epochs_2_steps_16_entropy_0.01": ("ppo_epochs: 2, max_steps: 16 and entropy_coef: 0.01",
                                           ["--ppo_epochs", "2", "--max_steps", "16", "--entropy_coef", "0.01"]),
    "ppo_epochs_4": ("ppo_epochs: 4 (every rollout used for 8 optimizer steps)", ["--ppo_epochs", "4"]),
    "no_eos_penalty": ("missing_eos_penalty: null (a cut-off reply keeps its reward-model score)",
                       ["--missing_eos_penalty", "null"]),
    "sft_pairs": ("reward model also trained on 384 annotator-labelled pairs of SFT replies", []),
    "replies_per_prompt_4_reward_432": ("replies_per_prompt: 4 and the 432-pair reward model",
                                        ["--replies_per_prompt", "4"]),
}
OWN_REWARD = {"sft_pairs": "sft_pairs", "replies_per_prompt_4_reward_432": "432_pairs"}
"""Variants that train against a reward model of their own (built once by REWARD_BUILDERS, shared)."""
GOAL = {"prompts_won_each": 0.65, "prompts_won_mean": 0.75, "ci_low": 0.60, "distinct_ratio": 0.9,
        "length_ratio": (0.7, 1.3)}
"""The goal against SFT, prompts won by the independent lexicon judge: every seed's run at least
``prompts_won_each``, their mean at least ``prompts_won_mean``, the low end of the config seed's interval
above ``ci_low``; each run at least as on topic as SFT, distinct-2 at least ``distinct_ratio`` x SFT's,
mean reply length within ``length_ratio`` x SFT's and mean KL below the run's kl_target."""


def rlhf(args: list[str], log: Path, threads: int | None) -> None:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    with open(log, "w") as f:
        code = subprocess.run(RLHF + args, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if code:
        raise SystemExit(f"rlhf {' '.join(args[:2])} failed with exit code {code}: see {log}")


def sft_pairs_reward(out: Path, sft: str, reward: str, threads: int | None) -> str:
    """A reward run trained on the reward config's pairs plus annotator-labelled pairs of SFT replies."""
    run = out / "reward_sft_pairs"
    if (run / "metrics.json").exists():
        return str(run)
    campaign, pairs, mixed = out / "sft_pairs_campaign", out / "sft_pairs.jsonl", out / "prefs_with_sft_pairs.jsonl"
    if not (campaign / "campaign.sqlite").exists():
        rlhf(["label", "generate", "--model", sft, "--prompts", "data/demo/prompts_train.jsonl", "--out", str(campaign),
              "--n", "4", "--max_pairs_per_prompt", "3", "--max_new_tokens", "32", "--temperature", "0.7",
              "--batch_size", "16"], out / "sft_pairs_generate.log", threads)
        rlhf(["label", "annotate", str(campaign)], out / "sft_pairs_annotate.log", threads)
    rlhf(["label", "export", str(campaign), "--out", str(pairs)], out / "sft_pairs_export.log", threads)
    from rlhf.core.config import load_yaml

    train_file = load_yaml(REPO / Path(reward) / "config.yaml")["train_file"]
    with open(mixed, "w") as f:
        for source in (REPO / train_file, pairs):
            for line in Path(source).read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    f.write(json.dumps({k: row[k] for k in ("prompt", "chosen", "rejected")}) + "\n")
    rlhf(["reward", "--config", str(Path(reward) / "config.yaml"), "--train_file", str(mixed), "--output_dir", str(run),
          "--eval_steps", "20", "--save_steps", "20"], out / "reward_sft_pairs.log", threads)
    return str(run)


def more_pairs_reward(out: Path, sft: str, reward: str, threads: int | None) -> str:
    """A reward run like ``reward`` on three times as many generated pairs (the first 144 are the demo's own)."""
    run = out / "reward_432_pairs"
    if (run / "metrics.json").exists():
        return str(run)
    data = out / "data_432_pairs"
    subprocess.run([sys.executable, "-m", "rlhf.demo.make_data", "--out", str(data), "--prefs-train", "432"], cwd=REPO,
                   check=True, stdout=subprocess.DEVNULL)
    rlhf(["reward", "--config", str(Path(reward) / "config.yaml"), "--train_file", str(data / "prefs_train.jsonl"),
          "--output_dir", str(run), "--eval_steps", "18", "--save_steps", "18"], out / "reward_432_pairs.log", threads)
    return str(run)


REWARD_BUILDERS = {"sft_pairs": sft_pairs_reward, "432_pairs": more_pairs_reward}
REWARD_LOCKS = {key: threading.Lock() for key in REWARD_BUILDERS}
"""Two runs on one own reward model (several seeds, --jobs 2) wait for one build instead of racing."""


@functools.cache
def config_seed() -> int:
    from rlhf.core.config import load_yaml

    return int(load_yaml(REPO / "configs" / "ppo.yaml")["seed"])


def run_name(variant: str, seed: int) -> str:
    """``variant`` for the config's own seed (the runs measured before seeds were a flag), else ``variant-s<seed>``."""
    return variant if seed == config_seed() else f"{variant}-s{seed}"


def train(variant: str, seed: int, out: Path, sft: str, reward: str, data: str, threads: int | None) -> None:
    name = run_name(variant, seed)
    run = out / name
    if (run / "metrics.json").exists():
        print(f"{name}: finished run kept", flush=True)
        return
    if variant in OWN_REWARD:
        with REWARD_LOCKS[OWN_REWARD[variant]]:
            reward = REWARD_BUILDERS[OWN_REWARD[variant]](out, sft, reward, threads)
    print(f"{name}: training ...", flush=True)
    started = time.time()
    rlhf(["ppo", "--config", "configs/ppo.yaml", "--sft_model", sft, "--reward_model", reward, "--output_dir", str(run),
          "--train_file", f"{data}/prompts_train.jsonl", "--test_file", f"{data}/prompts_test.jsonl", "--seed", str(seed),
          *VARIANTS[variant][1]], out / f"{name}.log", threads)
    print(f"{name}: {time.time() - started:.0f} s", flush=True)


def evaluations(out: Path, k: int) -> list[dict]:
    """Every finished ``<out>/eval*`` report with ``k`` samples per prompt, each with its ``dir``."""
    reports = []
    for path in sorted(out.glob("eval*/report.json")):
        report = json.loads(path.read_text())
        if report["settings"]["k"] == k and report["settings"].get("prompts_file", HELDOUT).endswith(HELDOUT):
            reports.append({**report, "dir": path.parent.name})
    return reports


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def meets_goal(report: dict, name: str, kl_target: float) -> bool:
    """The per-run part of the goal (GOAL) for one run of ``report``, judged by the independent lexicon judge."""
    runs, rates = report["runs"], report["win_rates"][name]
    won = next(v for judge, v in rates.items() if judge.startswith("lexicon"))
    sft = runs[report["baseline"]]
    r = runs[name]
    low, high = GOAL["length_ratio"]
    return (won["prompt_win_rate"] >= GOAL["prompts_won_each"] and r["on_topic_rate"] >= sft["on_topic_rate"]
            and r["distinct_2"] >= GOAL["distinct_ratio"] * sft["distinct_2"]
            and low * sft["reply_length"] <= r["reply_length"] <= high * sft["reply_length"]
            and r["kl_to_reference"] < kl_target)


def variant_meets_goal(runs: list[tuple[float, float, bool]]) -> bool:
    """The whole goal over one variant's seeds: ``(prompts won, its CI low end, per-run goal met)`` per
    seed, the config seed's first."""
    return (all(met for _, _, met in runs) and mean([w for w, _, _ in runs]) >= GOAL["prompts_won_mean"]
            and runs[0][1] > GOAL["ci_low"])


def table(reports: dict[str, dict], names: list[str], variants: list[str], seeds: list[int], out: Path) -> str:
    """levers.md: one row per run (from the report that evaluated it), then one per variant over its seeds."""
    from rlhf.core.config import load_yaml
    from rlhf.eval.statistics import format_interval

    first = reports[names[0]]
    lines = [f"# PPO levers on {first['settings']['prompts']} held-out prompts x {first['settings']['k']} samples per policy",
             "", "Prompts won against SFT (ties half; 95 % bootstrap interval over prompts) by each judge.", "",
             ("| run | what changed | seed | lexicon (independent) | annotator | reward model | on topic | distinct-2 "
              "| reply words | KL to SFT | PPO wall s | goal |"),
             "|---|---|---:|---|---|---|---:|---:|---:|---:|---:|---|"]
    r = first["runs"][first["baseline"]]
    lines.append(f"| SFT | the starting policy | | | | | {r['on_topic_rate']:.0%} | {r['distinct_2']:.3f} | "
                 f"{r['reply_length']:.1f} | 0.00 | | |")
    won_by_run = {}
    for variant in variants:
        for seed in seeds:
            name = run_name(variant, seed)
            report = reports[name]
            rates, r = report["win_rates"][name], report["runs"][name]
            judge = {j.split(":")[0]: j for j in rates}
            metrics = json.loads((out / name / "metrics.json").read_text())
            kl_target = float(load_yaml(out / name / "config.yaml")["kl_target"])
            won_by_run[name] = (rates[judge["lexicon"]]["prompt_win_rate"], meets_goal(report, name, kl_target), r,
                                rates[judge["lexicon"]]["prompt_win_rate_ci"][0])
            lines.append(f"| {name} | {VARIANTS[variant][0]} | {seed} | "
                         + " | ".join(format_interval(rates[judge[j]], "prompt_win_rate") for j in ("lexicon", "annotator", "reward"))
                         + f" | {r['on_topic_rate']:.0%} | {r['distinct_2']:.3f} | {r['reply_length']:.1f} | "
                         f"{r['kl_to_reference']:.2f} | {metrics.get('wall_seconds', float('nan')):.0f} | "
                         f"{'met' if won_by_run[name][1] else 'not met'} |")
    if len(seeds) > 1:
        lines += ["", f"Over the seeds {', '.join(map(str, seeds))} (mean of the runs' figures; prompts won by the lexicon judge):",
                  "", ("| variant | prompts won, mean | each seed | on topic | distinct-2 | reply words | KL to SFT "
                       "| runs meeting the per-run goal | goal over the seeds |"),
                  "|---|---:|---|---:|---:|---:|---:|---:|---|"]
        for variant in variants:
            runs = [won_by_run[run_name(variant, seed)] for seed in seeds]
            ordered = sorted(runs, key=lambda run: seeds[runs.index(run)] != config_seed())
            whole = variant_meets_goal([(w, low, m) for w, m, _, low in ordered])
            lines.append(f"| {variant} | {mean([w for w, _, _, _ in runs]):.0%} | {', '.join(f'{w:.0%}' for w, _, _, _ in runs)} | "
                         f"{mean([r['on_topic_rate'] for _, _, r, _ in runs]):.0%} | {mean([r['distinct_2'] for _, _, r, _ in runs]):.3f} | "
                         f"{mean([r['reply_length'] for _, _, r, _ in runs]):.1f} | "
                         f"{mean([r['kl_to_reference'] for _, _, r, _ in runs]):.2f} | {sum(m for _, m, _, _ in runs)} of {len(runs)} | "
                         f"{'met' if whole else 'not met'} |")
    lines += ["", "Same-prompt reply pairs (every policy's samples of one evaluation) two judges order alike:", ""]
    for report in {reports[name]["dir"]: reports[name] for name in names}.values():
        agreement = [f"{a['judge'].split(':')[0]} vs {a['other'].split(':')[0]} {a['agreement']:.1%} of {a['pairs']:,}"
                     for a in report.get("judge_agreement", []) if a["agreement"] is not None]
        lines.append(f"- {report['dir']} ({len(report['runs']) - 1} runs): " + "; ".join(agreement))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/levers", help="variant runs, the evaluations and levers.md go here")
    parser.add_argument("--sft", default="runs/demo/sft", help="SFT run every variant starts from")
    parser.add_argument("--reward", default="runs/demo/reward", help="reward run (also the eval's reward judge)")
    parser.add_argument("--data", default="data/demo", help="demo data directory whose prompts_{train,test}.jsonl PPO uses")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {', '.join(VARIANTS)}")
    parser.add_argument("--seeds", default=None, help="comma-separated PPO seeds for every variant (default: the config's)")
    parser.add_argument("--k", type=int, default=4, help="samples per held-out prompt and policy")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained side by side (one thread each when > 1)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of every run and evaluation (default: 1 when --jobs > 1, else torch's "
                             "choice); 1 leaves a core to a measurement beside it")
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)}; expected some of {', '.join(VARIANTS)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [config_seed()]
    except ValueError:
        parser.error(f"--seeds: expected comma-separated integers, found {args.seeds!r}")
    for path in (args.sft, args.reward):
        if not (REPO / path / "metrics.json").exists():
            parser.error(f"{path}: expected a finished stage output (run make demo first)")
    for name in ("prompts_train.jsonl", "prompts_test.jsonl"):
        if not (REPO / args.data / name).exists():
            parser.error(f"--data {args.data}: expected {name} there (rlhf/demo/make_data.py writes it)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads: expected 1 or more, found {args.threads}")
    threads = args.threads or (1 if args.jobs > 1 else None)
    with ThreadPoolExecutor(args.jobs) as pool:
        jobs = [pool.submit(train, v, seed, out, args.sft, args.reward, args.data, threads) for v in variants for seed in seeds]
        for future in jobs:
            future.result()
    names = [run_name(v, seed) for v in variants for seed in seeds]
    reports = {name: report for report in evaluations(out, args.k) for name in report["runs"]}
    missing = [name for name in names if name not in reports]
    if missing:
        done = {p.name for p in out.glob("eval*")}
        eval_dir = out / next(d for d in (f"eval{i or ''}" for i in range(len(done) + 1)) if d not in done)
        rlhf(["eval", "--runs", args.sft, *[str(out / n) for n in missing], "--prompts", HELDOUT, "--out",
              str(eval_dir), "--judges", f"lexicon,annotator,reward:{args.reward}", "--k", str(args.k),
              "--skip", "forgetting,factual,bias", "--max_new_tokens", "32", "--bootstrap", "2000"],
             out / f"{eval_dir.name}.log", args.threads)
        report = json.loads((eval_dir / "report.json").read_text())
        reports.update({name: {**report, "dir": eval_dir.name} for name in report["runs"]})
    else:
        print(f"every run already evaluated in {', '.join(sorted({reports[n]['dir'] for n in names}))}", flush=True)
    text = table(reports, names, variants, seeds, out)
    (out / "levers.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
