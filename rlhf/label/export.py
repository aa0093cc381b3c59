"""Turn a campaign's labels into the preference rows ``rlhf reward`` trains on.

One row per pair whose majority vote is ``a`` or ``b``::

    {"prompt": ..., "chosen": ..., "rejected": ..., "pair_id": 7,
     "votes": {"chosen": 2, "rejected": 1, "tie": 0, "both_bad": 0}, "agreement": 0.667}

``votes`` keeps every vote on the pair (tie and both-bad votes included) and ``agreement`` is the share
of votes for the winner. Pairs whose majority is ``tie`` or ``both_bad``, pairs where two categories
share the most votes, and pairs with fewer than ``min_votes`` labels are left out and counted.
Pairs a reward model chose (``--select uncertain``) also carry ``chosen_as`` and ``margin`` (its score
of chosen minus rejected: negative where it got the pair wrong).
"""

from __future__ import annotations

from collections import Counter

from rlhf.label.stats import majority
from rlhf.label.store import Campaign


def export_rows(campaign: Campaign, min_votes: int = 1) -> tuple[list[dict], Counter]:
    """``(rows, left_out)``: the preference rows and, by reason, how many labeled pairs were left out."""
    votes: dict[int, list[str]] = {}
    for lab in campaign.labels():
        votes.setdefault(lab["pair_id"], []).append(lab["choice"])
    rows, left_out = [], Counter()
    for pair in campaign.pairs():
        choices = votes.get(pair["pair_id"], [])
        if not choices:
            continue
        if len(choices) < min_votes:
            left_out[f"fewer than {min_votes} votes"] += 1
            continue
        winner = majority(choices)
        if winner is None:
            left_out["no majority"] += 1
            continue
        if winner in ("tie", "both_bad"):
            left_out[f"majority {winner}"] += 1
            continue
        loser = "b" if winner == "a" else "a"
        counts = Counter(choices)
        rows.append({
            "prompt": pair["prompt"],
            "chosen": pair[winner],
            "rejected": pair[loser],
            "pair_id": pair["pair_id"],
            "votes": {"chosen": counts[winner], "rejected": counts[loser],
                      "tie": counts["tie"], "both_bad": counts["both_bad"]},
            "agreement": round(counts[winner] / len(choices), 4),
        })
        if pair["chosen_as"] is not None or pair["margin"] is not None:
            # The reward model's margin turned to chosen minus rejected, and how the pair was chosen.
            margin = pair["margin"]
            rows[-1].update(chosen_as=pair["chosen_as"],
                            margin=None if margin is None else (margin if winner == "a" else -margin))
    return rows, left_out
