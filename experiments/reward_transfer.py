"""How reward runs order free-form policy replies: agreement with the annotator on an evaluation's samples.

    rlhf eval --runs runs/demo/sft runs/levers/baseline-s1 runs/levers/steps_32 runs/demo/ppo \
        --prompts data/demo/prompts_test.jsonl --judges annotator --k 4 --skip forgetting,factual,bias \
        --out runs/rmx/replies
    python experiments/reward_transfer.py runs/rmx/replies/samples.jsonl runs/demo/reward runs/levers/reward_432_pairs

A reward model is fitted to templated preference pairs; PPO then asks it about the policy's own,
free-form replies. This scores every reply of ``samples.jsonl`` (``rlhf eval``'s samples: several
policies' replies to each prompt) with each reward run and prints the share of same-prompt reply
pairs it orders as the demo annotator (the labeller) does, and as the lexicon judge does, with the
reward run's accuracy on its own templated test pairs beside them. Use training-split or test-split
prompts here, not the held-out ones: this is for choosing a reward model.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("samples", help="an rlhf eval output's samples.jsonl")
    parser.add_argument("reward_runs", nargs="+", help="reward stage outputs to compare")
    args = parser.parse_args(argv)
    from rlhf.demo.annotator import annotator_score
    from rlhf.eval.statistics import judge_agreement
    from rlhf.eval.judges import RewardModelJudge, lexicon_score

    by_prompt: dict[str, list[dict]] = collections.defaultdict(list)
    for line in Path(args.samples).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            by_prompt[row["prompt"]].append(row)
    prompts = sorted(by_prompt)
    replies = min(len(rows) for rows in by_prompt.values())  # every prompt's replies: same count per prompt
    rows = [row for prompt in prompts for row in by_prompt[prompt][:replies]]
    shape = (len(prompts), replies)

    def grid(scores: list[float]) -> np.ndarray:
        return np.asarray(scores, float).reshape(shape)

    annotator = grid([annotator_score(r["prompt"], r["response"]) for r in rows])
    lexicon = grid([lexicon_score(r["prompt"], r["response"]) for r in rows])
    print(f"{len(prompts)} prompts x {replies} replies; lexicon vs annotator "
          f"{judge_agreement(lexicon, annotator)['agreement']:.1%}")
    print("| reward run | vs annotator | vs lexicon | its templated test accuracy |\n|---|---:|---:|---:|")
    for run in args.reward_runs:
        judge = RewardModelJudge("reward", run)
        scores = grid(judge.score([r["prompt"] for r in rows], [r["response"] for r in rows]))
        judge.close()
        accuracy = json.loads((Path(run) / "metrics.json").read_text()).get("test_accuracy")
        print(f"| {run} | {judge_agreement(scores, annotator)['agreement']:.1%} | "
              f"{judge_agreement(scores, lexicon)['agreement']:.1%} | {accuracy:.1%} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
