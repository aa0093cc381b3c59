"""Does the reward model prefer short replies, and do the labels of cut-off replies teach it that?

    python experiments/reward_length.py --samples runs/levers/eval/samples.jsonl --reward runs/demo/reward
    python experiments/reward_length.py --samples runs/levers/eval/samples.jsonl --reward runs/demo/reward \\
        --finished_pairs_from runs/demo/label --out runs/reward_length

For each reward run, on the same-prompt replies of every policy in ``--samples`` (an ``rlhf eval``
samples file: several replies per held-out prompt), prints the correlation of its score with the
reply's length in words, beside the demo annotator's and the lexicon judge's, and how often it orders
two replies to one prompt like the noiseless annotator (also by how far apart the annotator scores
them, beside how often one label of the noisy annotator would). With ``--pairs FILE`` (repeatable: a label
stage's test.jsonl, whose test pairs carry the noiseless choice) it also prints each reward run's
accuracy on those pairs, so reward runs trained on different label sets are compared on the same pairs.

With ``--finished_pairs_from LABEL_DIR`` it first trains a second reward model like the first
(``configs/reward.yaml``) on the label stage's train and validation pairs less every pair with a
reply that looks cut off at ``max_new_tokens`` (it does not end in ., !, ?, a quote or a bracket;
on SFT's held-out samples this matches "no EOS" for 235 of 240 replies), tested on the same test
pairs, into ``<out>/reward_finished``; then measures both.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ENDINGS = (".", "!", "?", '"', ")")


def looks_cut_off(reply: str) -> bool:
    return not reply.rstrip().endswith(ENDINGS)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_on_finished_pairs(label_dir: Path, out: Path) -> Path:
    data = out / "label_finished"
    data.mkdir(parents=True, exist_ok=True)
    for split in ("train", "validation"):
        rows = read_jsonl(label_dir / f"{split}.jsonl")
        kept = [r for r in rows if not looks_cut_off(r["chosen"]) and not looks_cut_off(r["rejected"])]
        print(f"{split}: {len(kept)} of {len(rows)} pairs have no cut-off reply")
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    run = out / "reward_finished"
    if not (run / "metrics.json").exists():
        subprocess.run([sys.executable, "-m", "rlhf.app.cli", "reward", "--config", "configs/reward.yaml",
                        "--train_file", str(data / "train.jsonl"), "--validation_file", str(data / "validation.jsonl"),
                        "--test_file", str(label_dir / "test.jsonl"), "--output_dir", str(run)], check=True)
    return run


def measure(reward_dir: str, samples: list[dict], noise: float) -> None:
    from rlhf.eval.judges import RewardModelJudge
    from rlhf.eval.statistics import judge_agreement

    judge = RewardModelJudge("reward", reward_dir, 32)
    for run in dict.fromkeys(r["run"] for r in samples):
        rows = [r for r in samples if r["run"] == run]
        scores = judge.score([r["prompt"] for r in rows], [r["response"] for r in rows])
        words = [len(r["response"].split()) for r in rows]
        others = {name: np.corrcoef(words, [r["scores"][name] for r in rows])[0, 1]
                  for name in ("annotator", "lexicon") if name in rows[0]["scores"]}
        # (prompts, samples) arrays, as rlhf eval's judge agreement reads them.
        by_prompt: dict[str, list[tuple[float, float]]] = {}
        for row, score in zip(rows, scores):
            by_prompt.setdefault(row["prompt"], []).append((score, row["scores"]["annotator"]))
        grid = np.array(list(by_prompt.values()))  # (n, k, 2)
        agreement = judge_agreement(grid[:, :, 0], grid[:, :, 1])
        print(f"{reward_dir} on {run}'s replies: correlation with words: reward {np.corrcoef(words, scores)[0, 1]:+.3f}, "
              + ", ".join(f"{k} {v:+.3f}" for k, v in others.items())
              + f"; orders like the noiseless annotator {agreement['agreement']:.1%} of {agreement['pairs']} pairs")
        print("  " + "; ".join(agreement_by_gap(grid[:, :, 0], grid[:, :, 1], noise)))


GAP_EDGES = (0.0, 0.25, 0.5, 1.0, float("inf"))
"""Bins of the noiseless annotator's score gap between two replies (its noise in configs/label.yaml: 0.25)."""


def agreement_by_gap(reward: np.ndarray, annotator: np.ndarray, noise: float) -> list[str]:
    """How often the reward model orders two same-prompt replies like the noiseless annotator, by how
    far apart the annotator scores them, beside how often one label of the noisy annotator would
    (its Bradley-Terry probability of choosing the higher-scored reply, averaged over the bin's pairs).

    Args:
        reward, annotator: ``(n, k)`` scores of the k replies to each of n prompts.
    """
    from rlhf.demo.annotator import prob_prefer_a

    i, j = np.triu_indices(reward.shape[1], k=1)
    d_reward, d_annotator = (reward[:, i] - reward[:, j]).ravel(), (annotator[:, i] - annotator[:, j]).ravel()
    counted = (d_reward != 0) & (d_annotator != 0)
    gap, agree = np.abs(d_annotator[counted]), (d_reward[counted] > 0) == (d_annotator[counted] > 0)
    lines = []
    for low, high in zip(GAP_EDGES, GAP_EDGES[1:]):
        inside = (gap >= low) & (gap < high)
        if inside.any():
            one_label = np.mean([prob_prefer_a(g, 0.0, noise) for g in gap[inside]])
            lines.append(f"gap {low:g}-{high:g}: {inside.sum()} pairs, reward model {agree[inside].mean():.1%}, "
                         f"one noisy label {one_label:.1%}")
    return lines


def pair_accuracy(reward_dir: str, pairs_file: str) -> None:
    from rlhf.eval.judges import RewardModelJudge

    pairs = read_jsonl(Path(pairs_file))
    judge = RewardModelJudge("reward", reward_dir, 32)
    chosen = judge.score([p["prompt"] for p in pairs], [p["chosen"] for p in pairs])
    rejected = judge.score([p["prompt"] for p in pairs], [p["rejected"] for p in pairs])
    right = sum(c > r for c, r in zip(chosen, rejected))
    print(f"{reward_dir} on {pairs_file}: chosen scored higher in {right / len(pairs):.1%} of {len(pairs)} pairs")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", required=True, help="an rlhf eval samples.jsonl")
    parser.add_argument("--reward", action="append", required=True, help="a reward run (repeat for several)")
    parser.add_argument("--finished_pairs_from", default=None, help="a label stage output to filter and train on")
    parser.add_argument("--out", default="runs/reward_length", help="where the filtered pairs and run go")
    parser.add_argument("--noise", type=float, default=0.25,
                        help="the labels' annotator noise (configs/label.yaml), for the one-noisy-label column")
    parser.add_argument("--pairs", action="append", default=[], help="a pairs file to score each reward run on (repeat)")
    args = parser.parse_args(argv)
    rewards = list(args.reward)
    if args.finished_pairs_from:
        rewards.append(str(train_on_finished_pairs(Path(args.finished_pairs_from), Path(args.out))))
    samples = read_jsonl(Path(args.samples))
    for reward in rewards:
        measure(reward, samples, args.noise)
        for pairs_file in args.pairs:
            pair_accuracy(reward, pairs_file)


if __name__ == "__main__":
    main()
