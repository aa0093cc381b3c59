"""Does the demo annotator pay a policy for dropping sentences? Its rule beside a "strongest sentence" rule.

    python experiments/annotator_rules.py --campaign runs/demo/label/campaign      # the checks, on SFT's replies
    python experiments/annotator_rules.py --relabel runs/ann/label --sft runs/demo/sft   # labels by the other rule

The annotator (rlhf/demo/annotator.py) scores sentiment as the mean of VADER's compound over a
reply's sentences and penalises the share of repeated content words. Both can pay for shortening:
dropping a reply's milder later sentences raises a mean, and longer replies repeat words (a subject
named twice) more often. The other rule scored here:

- sentiment: the most positive sentence's compound (if positive) plus the most negative one's (if
  negative); a milder or neutral sentence neither raises nor lowers it;
- penalty: only repeated sentiment-bearing words (VADER's lexicon) count, over all content words.

``--campaign`` prints, for each rule and for the lexicon judge, how often a reply's first sentence
alone scores above and below the whole reply (replies of two or more sentences); for each rule, how
often the sentiment of two positive replies to one prompt joined is above both, and Spearman's
correlation of score and words. ``--relabel``
runs the label stage (configs/label.yaml, sampling the same replies with the same seed) with the
other rule labelling, so a reward model and PPO can be trained on its labels as on the demo's.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlhf.demo import annotator as ann  # noqa: E402


def strongest_sentence_sentiment(reply: str) -> float:
    found = [ann._vader().polarity_scores(s)["compound"] for s in ann.sentences(reply)]
    return max(0.0, max(found)) + min(0.0, min(found))


def repeated_sentiment_share(reply: str) -> float:
    content = ann.content_words(reply)
    valenced = [w for w in content if w in ann._vader().lexicon]
    return (len(valenced) - len(set(valenced))) / len(content) if content else 0.0


def strongest_sentence_parts(prompt: str, reply: str) -> ann.ScoreParts:
    """``annotator.score_parts`` with the other rule's sentiment and penalty (topic and empty unchanged)."""
    parts = DEMO_SCORE_PARTS(prompt, reply)
    if not ann.words(reply):
        return parts
    return parts._replace(sentiment=strongest_sentence_sentiment(reply),
                          penalty=-ann.REPEAT_WEIGHT * repeated_sentiment_share(reply))


DEMO_SCORE_PARTS = ann.score_parts
RULES = {"demo annotator (mean over sentences)": DEMO_SCORE_PARTS, "strongest sentence": strongest_sentence_parts}


def checks(campaign_dir: str) -> None:
    from annotator_length import replies_by_prompt  # this script's folder is first on sys.path
    from scipy.stats import spearmanr

    by_prompt = replies_by_prompt(argparse.Namespace(samples=campaign_dir))
    for name, parts in RULES.items():
        def score(prompt: str, reply: str) -> float:
            return sum(parts(prompt, reply))

        above = below = several = joined_above = joined = 0
        scores, lengths = [], []
        for prompt, replies in by_prompt.items():
            for reply in replies:
                whole = score(prompt, reply)
                scores.append(whole)
                lengths.append(len(reply.split()))
                found = ann.sentences(reply)
                if len(found) > 1:
                    several += 1
                    first = score(prompt, found[0])
                    above += first > whole
                    below += first < whole
            positive = [r for r in replies if parts(prompt, r).sentiment > 0.05]
            for a, b in itertools.combinations(positive, 2):
                joined += 1
                sentiment = [parts(prompt, r).sentiment for r in (a + " " + b, a, b)]
                joined_above += sentiment[0] > max(sentiment[1:]) + 1e-9
        print(f"{name}: first sentence alone above the whole reply {above / several:.1%}, below {below / several:.1%} "
              f"(of {several} replies of 2+ sentences); two positive replies joined above both "
              f"{joined_above / max(joined, 1):.1%} of {joined}; Spearman(score, words) "
              f"{spearmanr(scores, lengths)[0]:+.2f} over {len(scores)} replies")


    from rlhf.eval.judges import lexicon_score

    firsts = [(lexicon_score(p, parts[0]), lexicon_score(p, r)) for p, replies in by_prompt.items()
              for r in replies if len(parts := ann.sentences(r)) > 1]
    print(f"lexicon judge: first sentence alone above the whole reply "
          f"{sum(a > b for a, b in firsts) / len(firsts):.1%}, below {sum(a < b for a, b in firsts) / len(firsts):.1%}")


def relabel(out: str, sft: str) -> None:
    from rlhf.core.config import load_yaml
    from rlhf.label import stage

    ann.score_parts = strongest_sentence_parts  # annotator_score and prefer look it up at each call
    config = {**load_yaml("configs/label.yaml"), "sft_model": sft, "output_dir": out}
    print(json.dumps(stage.run(config), indent=1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--campaign", help="a label campaign whose replies to run the checks on")
    parser.add_argument("--relabel", metavar="OUT", help="run the label stage into OUT with the other rule labelling")
    parser.add_argument("--sft", default="runs/demo/sft", help="the SFT run the label stage samples (with --relabel)")
    args = parser.parse_args()
    if not (args.campaign or args.relabel):
        parser.error("expected --campaign, --relabel or both")
    if args.campaign:
        checks(args.campaign)
    if args.relabel:
        relabel(args.relabel, args.sft)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
