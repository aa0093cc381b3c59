"""Issue 13's levers, each measured on the held-out prompts: PPO variants from the same SFT and reward runs.

    python scripts/ppo_levers.py                       # after make demo: runs/demo/{sft,reward} -> runs/levers
    python scripts/ppo_levers.py --variants baseline,policy_head --jobs 1

Each variant is ``rlhf ppo --config configs/ppo.yaml`` plus a few overrides (VARIANTS below), trained
from ``--sft`` and ``--reward`` into ``<out>/<variant>``; ``baseline`` is the demo's own config and
``baseline_seed1`` the same with another seed, so the table shows how far one seed moves the figures.
``sft_pairs`` first adds preference pairs of the SFT model's own replies (``rlhf label generate``
from SFT on the training prompts, labelled by the demo annotator, as the InstructGPT recipe labels
samples of the SFT model) to the reward model's training file and trains a reward model on both
(``<out>/reward_sft_pairs``), then runs the baseline against it.

Then ONE ``rlhf eval`` samples ``--k`` replies per held-out prompt (data/demo/prompts_heldout.jsonl)
from SFT and every variant with the same seed and judges them with the lexicon judge (independent of
the annotator), the annotator and the demo reward model; ``<out>/levers.md`` gets one row per
variant: share of prompts won against SFT (ties half) with its 95 % bootstrap interval per judge,
on-topic rate, distinct-2, reply words, KL to SFT and the PPO run's wall time. ``--jobs 2`` trains
two variants side by side with one thread each (wall times are then those of a shared machine).
Finished runs are kept, so a rerun only does what is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HELDOUT = "data/demo/prompts_heldout.jsonl"
RLHF = [sys.executable, "-m", "rlhf.cli"]

VARIANTS: dict[str, tuple[str, list[str]]] = {
    "baseline": ("configs/ppo.yaml as it is", []),
    "baseline_seed1": ("the same, seed 1", ["--seed", "1"]),
    "policy_head": ("value_model: policy_head", ["--value_model", "policy_head"]),
    "normalize_reward": ("normalize_reward: true, reward_clip: 3", ["--normalize_reward", "true", "--reward_clip", "3.0"]),
    "kl_coef_0.2": ("kl_coef: 0.2 (4x)", ["--kl_coef", "0.2"]),
    "lr_1e-4": ("learning_rate: 1e-4 (half)", ["--learning_rate", "1.0e-4"]),
    "steps_32": ("max_steps: 32 (twice the replies)", ["--max_steps", "32"]),
    "batch_16": ("batch_size: 16, mini_batch_size: 4 (twice the replies, 4 updates a step)",
                 ["--batch_size", "16", "--mini_batch_size", "4"]),
    "ppo_epochs_2": ("ppo_epochs: 2", ["--ppo_epochs", "2"]),
    "replies_per_prompt_4": ("replies_per_prompt: 4 (2 prompts x 4 replies a step)", ["--replies_per_prompt", "4"]),
    "sft_pairs": ("reward model also trained on 384 annotator-labelled pairs of SFT replies", []),
}


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
    from rlhf.config import load_yaml

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


def train(name: str, out: Path, sft: str, reward: str, threads: int | None) -> None:
    run = out / name
    if (run / "metrics.json").exists():
        print(f"{name}: finished run kept", flush=True)
        return
    if name == "sft_pairs":
        reward = sft_pairs_reward(out, sft, reward, threads)
    print(f"{name}: training ...", flush=True)
    started = time.time()
    rlhf(["ppo", "--config", "configs/ppo.yaml", "--sft_model", sft, "--reward_model", reward, "--output_dir", str(run),
          *VARIANTS[name][1]], out / f"{name}.log", threads)
    print(f"{name}: {time.time() - started:.0f} s", flush=True)


def table(report: dict, names: list[str], out: Path) -> str:
    from rlhf.evaluate import format_interval

    runs, rates = report["runs"], report["win_rates"]
    judge = {j.split(":")[0]: j for j in next(iter(rates.values()))}

    def won(name: str, which: str) -> str:
        return format_interval(rates[name][judge[which]], "prompt_win_rate")

    lines = [f"# PPO levers on {report['settings']['prompts']} held-out prompts x {report['settings']['k']} samples per policy", "",
             "Prompts won against SFT (ties half; 95 % bootstrap interval over prompts) by each judge.", "",
             "| variant | what changed | lexicon (independent) | annotator | reward model | on topic | distinct-2 "
             "| reply words | KL to SFT | PPO wall s |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|"]
    sft = report["baseline"]
    r = runs[sft]
    lines.append(f"| SFT | the starting policy | | | | {r['on_topic_rate']:.0%} | {r['distinct_2']:.3f} | "
                 f"{r['reply_length']:.1f} | 0.00 | |")
    for name in names:
        r = runs[name]
        wall = json.loads((out / name / "metrics.json").read_text()).get("wall_seconds")
        lines.append(f"| {name} | {VARIANTS[name][0]} | {won(name, 'lexicon')} | {won(name, 'annotator')} | "
                     f"{won(name, 'reward')} | {r['on_topic_rate']:.0%} | {r['distinct_2']:.3f} | "
                     f"{r['reply_length']:.1f} | {r['kl_to_reference']:.2f} | {wall:.0f} |")
    agreement = [f"{a['judge'].split(':')[0]} vs {a['other'].split(':')[0]} {a['agreement']:.1%} of {a['pairs']:,}"
                 for a in report.get("judge_agreement", []) if a["agreement"] is not None]
    lines += ["", "Same-prompt reply pairs (every policy's samples) two judges order alike: " + "; ".join(agreement) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/levers", help="variant runs, the evaluation and levers.md go here")
    parser.add_argument("--sft", default="runs/demo/sft", help="SFT run every variant starts from")
    parser.add_argument("--reward", default="runs/demo/reward", help="reward run (also the eval's reward judge)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {', '.join(VARIANTS)}")
    parser.add_argument("--k", type=int, default=4, help="samples per held-out prompt and policy")
    parser.add_argument("--jobs", type=int, default=1, help="variants trained side by side (one thread each when > 1)")
    args = parser.parse_args(argv)
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)}; expected some of {', '.join(VARIANTS)}")
    for path in (args.sft, args.reward):
        if not (REPO / path / "metrics.json").exists():
            parser.error(f"{path}: expected a finished stage output (run make demo first)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    threads = 1 if args.jobs > 1 else None
    with ThreadPoolExecutor(args.jobs) as pool:
        for future in [pool.submit(train, n, out, args.sft, args.reward, threads) for n in names]:
            future.result()
    from rlhf.evaluate import kept_report

    report = kept_report(out / "eval", names, args.k)
    if report:
        print(f"{out / 'eval' / 'report.json'}: every variant evaluated, kept", flush=True)
    else:
        rlhf(["eval", "--runs", args.sft, *[str(out / n) for n in names], "--prompts", HELDOUT, "--out",
              str(out / "eval"), "--judges", f"lexicon,annotator,reward:{args.reward}", "--k", str(args.k),
              "--skip", "forgetting,factual,bias", "--max_new_tokens", "32", "--bootstrap", "2000"],
             out / "eval.log", None)
        report = json.loads((out / "eval" / "report.json").read_text())
    text = table(report, names, out)
    (out / "levers.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
