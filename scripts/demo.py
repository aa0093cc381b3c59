"""The whole pipeline on the embedded SmolLM2-135M-Instruct, then an evaluation on held-out prompts.

    make demo                       # = .venv/bin/python scripts/demo.py
    python scripts/demo.py --config configs/pipeline.yaml --output_root runs/demo [--k 4]

Runs SFT -> label -> reward -> PPO (skipping finished stages, resuming an interrupted one): the label
stage samples 4 replies of the SFT policy to each training prompt and the demo annotator labels their
pairs (standing in for people), the reward model learns from those pairs. Then
``rlhf eval`` of the PPO policy against the SFT policy on data/demo/prompts_heldout.jsonl: subjects no
training file mentions, half of them in request forms no training prompt uses. Each policy answers
every prompt ``k`` times; three judges compare them: ``lexicon`` (a sentiment lexicon + on topic: NOT the
annotator that labelled the training pairs), the demo annotator, and the trained reward model. Win
rates count ties as half and carry 95 % bootstrap intervals over prompts. The table goes to
<output_root>/report.md, the full report to <output_root>/eval/report.html.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HELDOUT = "data/demo/prompts_heldout.jsonl"
JUDGES = ("lexicon", "annotator", "reward")


def eval_argv(root: Path, k: int, max_new_tokens: int) -> list[str]:
    return ["eval", "--runs", str(root / "sft"), str(root / "ppo"), "--prompts", HELDOUT, "--out", str(root / "eval"),
            "--judges", f"lexicon,annotator,reward:{root / 'reward'}", "--k", str(k),
            "--skip", "forgetting,factual,bias", "--max_new_tokens", str(max_new_tokens)]


def build_report(root: Path) -> str:
    from rlhf.eval.statistics import format_interval

    reward_metrics = json.loads((root / "reward" / "metrics.json").read_text())
    label_path = root / "label" / "metrics.json"
    label_metrics = json.loads(label_path.read_text()) if label_path.exists() else None
    sft_metrics = json.loads((root / "sft" / "metrics.json").read_text())
    ppo_metrics = json.loads((root / "ppo" / "metrics.json").read_text())
    ppo_config = yaml.safe_load((root / "ppo" / "config.yaml").read_text())
    report = json.loads((root / "eval" / "report.json").read_text())
    forms = [json.loads(line)["form"] for line in Path(HELDOUT).read_text().splitlines() if line.strip()]
    runs = report["runs"]
    sft = report["baseline"]
    ppo = next(name for name in runs if name != sft)
    judge_names = {j.split(":")[0]: j for j in next(iter(report["win_rates"].values()))}
    held_out = ("agreement with the noiseless annotator on pairs of SFT replies to held-out prompts"
                if label_metrics and label_metrics["labeler"] == "annotator" else "held-out pairwise accuracy")
    lines = [
        f"# Demo report ({len(forms)} held-out prompts x {report['settings']['k']} samples per policy)",
        "",
        f"Reward model {held_out}: **{reward_metrics['test_accuracy']:.1%}** "
        f"({reward_metrics['test_pairs']} test pairs; mean margin {reward_metrics['test_mean_margin']:.2f})  ",
        f"SFT held-out test loss {sft_metrics['test_loss']:.3f} (perplexity {sft_metrics['test_perplexity']:.2f})  ",
        *([f"Labels: {label_metrics['train_pairs']} training pairs of the SFT policy's own replies "
           f"({label_metrics['replies_per_prompt']} per prompt), labelled by the {label_metrics['labeler']}"
           + (f" (agreeing with its noiseless choice on {label_metrics['label_agreement_with_noiseless']:.0%})"
              if label_metrics.get("label_agreement_with_noiseless") is not None else "") + "  "]
          if label_metrics else []),
        f"Stage wall times: SFT {sft_metrics['wall_seconds']:.0f} s, "
        + (f"label {label_metrics['wall_seconds']:.0f} s, " if label_metrics else "")
        + f"reward {reward_metrics['wall_seconds']:.0f} s, "
        f"PPO {ppo_metrics['wall_seconds']:.0f} s ({ppo_config['value_model']} value model), evaluation "
        f"{report['wall_seconds']:.0f} s",
        "",
        "| policy | lexicon judge | annotator | reward model | on topic | distinct-2 | reply words | KL to SFT |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, label in ((sft, "SFT"), (ppo, "PPO")):
        r = runs[name]
        scores = " | ".join(f"{r['scores'][judge_names[j]]['mean']:.3f}" for j in JUDGES)
        lines.append(f"| {label} | {scores} | {r['on_topic_rate']:.0%} | {r['distinct_2']:.3f} | "
                     f"{r['reply_length']:.1f} | {r['kl_to_reference']:.2f} |")
    lines += ["", "PPO against SFT (ties count half; 95 % bootstrap intervals over prompts):", "",
              "| judge | prompts won | trained forms | new forms | win rate over sample pairs |",
              "|---|---|---|---|---|"]
    for j in JUDGES:
        w = report["win_rates"][ppo][judge_names[j]]
        per_prompt = w["per_prompt"]
        by_form = {}
        for form in ("trained", "new"):
            rates = [r for r, f in zip(per_prompt, forms) if f == form]
            won = sum(1.0 if r > 0.5 else 0.5 if r == 0.5 else 0.0 for r in rates)
            by_form[form] = f"{won / len(rates):.0%} of {len(rates)}"
        lines.append(f"| {j}{' (independent)' if j == 'lexicon' else ''} | {format_interval(w, 'prompt_win_rate')} | "
                     f"{by_form['trained']} | {by_form['new']} | {format_interval(w, 'win_rate')} |")
    agreement = [f"{a['judge'].split(':')[0]} vs {a['other'].split(':')[0]} {a['agreement']:.0%}"
                 for a in report.get("judge_agreement", []) if a["agreement"] is not None]
    if agreement:
        lines += ["", "Judges ordering the same-prompt reply pairs of both policies alike (for the reward model, its "
                  f"accuracy on the policies' own replies): {'; '.join(agreement)}."]
    by_run = report.get("judge_agreement_by_run", {})
    reward_vs_annotator = {
        label: next((a["agreement"] for a in by_run.get(name, []) if a["judge"].startswith("reward")
                     and a["other"] == "annotator" and a["agreement"] is not None), None)
        for name, label in ((sft, "SFT"), (ppo, "PPO"))}
    if all(v is not None for v in reward_vs_annotator.values()):
        lines += ["", "Reward model vs the noiseless annotator on same-prompt pairs of one policy's replies to the "
                  "held-out prompts: " + "; ".join(f"{k}'s replies {v:.0%}" for k, v in reward_vs_annotator.items())
                  + "."]
    flags = report.get("hacking_flags", {}).get(ppo) or []
    note = runs[ppo].get("kl_budget_note")
    lines += ["", f"KL target of the adaptive controller: {ppo_config['kl_target']} nats per reply"
              + (f" ({note})" if note else "") + ". Reward-hacking "
              f"flags: {', '.join(f['flag'] for f in flags) if flags else 'none'}. Full report: "
              f"{root / 'eval' / 'report.html'}", "", "## Replies the judges disagree on most", ""]
    for row in report.get("examples", {}).get("rows", [])[:4]:
        lines += [f"**{row['prompt']}**", ""]
        for name, label in ((sft, "SFT"), (ppo, "PPO")):
            lines.append(f"- {label}: {row['replies'][name]['text']}")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/pipeline.yaml")
    parser.add_argument("--output_root", default="runs/demo")
    parser.add_argument("--k", type=int, default=4, help="samples per held-out prompt and policy")
    parser.add_argument("--report_only", action="store_true", help="only rebuild the report of a finished run")
    args = parser.parse_args()
    from rlhf.app.cli import main as rlhf_main

    started = time.time()
    root = Path(args.output_root)
    if not args.report_only:
        code = rlhf_main(["pipeline", "--config", args.config, "--output_root", args.output_root])
        if code:
            return code
        ppo_config = yaml.safe_load((root / "ppo" / "config.yaml").read_text())
        code = rlhf_main(eval_argv(root, args.k, ppo_config["max_new_tokens"]))
        if code:
            return code
    report = build_report(root)
    report += f"\nTotal wall time of this command: {time.time() - started:.0f} s\n"
    (root / "report.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
