"""The whole pipeline on the embedded SmolLM2-135M-Instruct, then a before/after table.

    make demo                       # = .venv/bin/python scripts/demo.py
    python scripts/demo.py --config configs/pipeline.yaml --output_root runs/demo

Runs SFT -> reward -> PPO (skipping finished stages, resuming an interrupted one), then scores the
SFT (reference) and PPO replies to held-out prompts with the demo annotator (rlhf/annotator.py, the
stand-in for people) and writes the table to <output_root>/report.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_report(root: Path, examples: int = 4) -> str:
    from rlhf.annotator import annotator_score
    from rlhf.ppo_math import distinct_n

    reward_metrics = json.loads((root / "reward" / "metrics.json").read_text())
    sft_metrics = json.loads((root / "sft" / "metrics.json").read_text())
    ppo_metrics = json.loads((root / "ppo" / "metrics.json").read_text())
    ppo_config = yaml.safe_load((root / "ppo" / "config.yaml").read_text())
    samples = [json.loads(line) for line in (root / "ppo" / "eval_samples.jsonl").read_text().splitlines()]
    ann = {role: [annotator_score(s["prompt"], s[role]) for s in samples] for role in ("reference", "policy")}
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    wins = sum(p > r for p, r in zip(ann["policy"], ann["reference"]))
    ties = sum(p == r for p, r in zip(ann["policy"], ann["reference"]))
    lines = [
        f"# Demo report ({len(samples)} held-out prompts)",
        "",
        f"Reward model held-out pairwise accuracy: **{reward_metrics['test_accuracy']:.1%}** "
        f"({reward_metrics['test_pairs']} test pairs; mean margin {reward_metrics['test_mean_margin']:.2f})  ",
        f"SFT held-out test loss {sft_metrics['test_loss']:.3f} (perplexity {sft_metrics['test_perplexity']:.2f})  ",
        f"Stage wall times: SFT {sft_metrics['wall_seconds']:.0f} s, reward {reward_metrics['wall_seconds']:.0f} s, "
        f"PPO {ppo_metrics['wall_seconds']:.0f} s",
        "",
        "| policy | annotator score | reward-model score | KL to reference | distinct-2 | reply length |",
        "|---|---|---|---|---|---|",
        f"| SFT (reference) | {mean(ann['reference']):.3f} | {ppo_metrics['eval_reference_reward_model_score']:.3f} "
        f"| 0 | {distinct_n([s['reference'] for s in samples], 2):.3f} "
        f"| {ppo_metrics['eval_reference_response_length']:.1f} |",
        f"| PPO | {mean(ann['policy']):.3f} | {ppo_metrics['eval_policy_reward_model_score']:.3f} "
        f"| {ppo_metrics['eval_policy_kl_to_reference']:.2f} | {distinct_n([s['policy'] for s in samples], 2):.3f} "
        f"| {ppo_metrics['eval_policy_response_length']:.1f} |",
        "",
        f"PPO reply scored higher than the SFT reply by the annotator on {wins}/{len(samples)} prompts "
        f"({ties} ties). KL target of the adaptive controller: {ppo_config['kl_target']} nats per reply.",
        "",
        "## Replies before and after",
        "",
    ]
    for s, a_ref, a_pol in list(zip(samples, ann["reference"], ann["policy"]))[:examples]:
        lines += [f"**{s['prompt']}**", "",
                  f"- SFT ({a_ref:+.2f}): {s['reference']}",
                  f"- PPO ({a_pol:+.2f}): {s['policy']}", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/pipeline.yaml")
    parser.add_argument("--output_root", default="runs/demo")
    parser.add_argument("--report_only", action="store_true", help="only rebuild the report of a finished run")
    args = parser.parse_args()
    from rlhf.cli import main as rlhf_main

    started = time.time()
    if not args.report_only:
        code = rlhf_main(["pipeline", "--config", args.config, "--output_root", args.output_root])
        if code:
            return code
    report = build_report(Path(args.output_root))
    report += f"\nTotal wall time of this command: {time.time() - started:.0f} s\n"
    (Path(args.output_root) / "report.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
