"""Does the demo annotator reward length at equal sentiment? Measured on a policy's own replies.

    python experiments/annotator_length.py --samples runs/demo/label/campaign   # replies in a campaign
    python experiments/annotator_length.py --model runs/demo/sft --prompts data/demo/prompts_train.jsonl

Two measurements for each sentiment rule (VADER's compound of the whole reply, and the mean of the
compound over the reply's sentences):

1. Joined replies: two positive replies A and B to the same prompt, and A + " " + B. At equal sentiment
   per sentence, a length-neutral score of the joined reply lies between the two (here: its excess
   over the higher of the two). VADER's compound of the joined reply exceeds both whenever both are
   positive, since it sums the valence of every word before squashing it.
2. Same-prompt pairs of replies: how often the longer reply has the higher score, among pairs whose
   replies are both positive and on topic; and Spearman's correlation of score and word count.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def replies_by_prompt(args) -> dict[str, list[str]]:
    if args.samples:
        from rlhf.label.store import Campaign

        by_prompt: dict[str, list[str]] = {}
        campaign = Campaign(args.samples)
        for pair in campaign.pairs():
            replies = by_prompt.setdefault(str(pair["prompt"]), [])
            for side in ("a", "b"):
                if pair[side] not in replies:
                    replies.append(pair[side])
        return by_prompt
    from rlhf.core.data import load_rows
    from rlhf.core.generation import SamplingArguments, generate_replies, load_for_generation

    prompts = [r["prompt"] for r in load_rows(args.prompts, "prompt")]
    model, tokenizer = load_for_generation(args.model)
    sampling = SamplingArguments(max_new_tokens=32, temperature=0.7)
    replies = generate_replies(model, tokenizer, prompts, sampling, n=4, batch_size=32, seed=0)
    return {str(p): r for p, r in zip(prompts, replies)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", help="a label campaign directory whose replies to measure")
    parser.add_argument("--model", help="or: a stage output to sample 4 replies per prompt from")
    parser.add_argument("--prompts", default="data/demo/prompts_train.jsonl")
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args()
    import numpy as np
    from scipy.stats import spearmanr

    from rlhf.demo import annotator as ann

    data = replies_by_prompt(args)
    rules = {"whole-reply compound": ann.whole_reply_sentiment, "mean over sentences": ann.sentence_mean_sentiment}
    result = {"prompts": len(data), "replies": sum(len(r) for r in data.values())}
    for name, sentiment in rules.items():
        excess, longer_wins, lengths, scores = [], [], [], []
        for prompt, replies in data.items():
            for r in replies:
                if ann.words(r):
                    lengths.append(len(ann.words(r)))
                    scores.append(sentiment(r) + ann.score_parts(prompt, r).topic)
            good = [r for r in replies if ann.words(r) and sentiment(r) > 0.05 and ann.is_on_topic(prompt, r)]
            for a, b in itertools.combinations(good, 2):
                excess.append(sentiment(a + " " + b) - max(sentiment(a), sentiment(b)))
                la, lb = len(ann.words(a)), len(ann.words(b))
                if la != lb and sentiment(a) != sentiment(b):
                    longer_wins.append((sentiment(a) > sentiment(b)) == (la > lb))
        result[name] = {
            "joined_pairs": len(excess),
            "joined_above_both_share": float(np.mean([e > 1e-9 for e in excess])),
            "joined_excess_mean": float(np.mean(excess)),
            "longer_wins_share": float(np.mean(longer_wins)),
            "positive_pairs": len(longer_wins),
            "spearman_score_words": float(spearmanr(scores, lengths).statistic),
        }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
