"""Let the demo annotator (rlhf/demo/annotator.py) label a campaign, as a stand-in for people.

It takes items exactly as a person's page does (``Campaign.next_item``: partly labeled pairs first,
then uncertain ones, each with a random left side) and answers with the annotator's noisy
Bradley-Terry choice, so the stored labels look like a person's: same tables, same order, same
position-bias bookkeeping. Each choice is drawn from a ``random.Random`` seeded by the pair, and each
label is its own transaction with a client id made from the pair, so a run that is killed and rerun
stores the same labels, none twice.

    rlhf label annotate runs/label/demo --noise 0.25
"""

from __future__ import annotations

import random

from rlhf.label.store import Campaign

ANNOTATOR = "demo-annotator"


def last_user_text(prompt: str | list[dict]) -> str:
    """The text the annotator judges a reply against: the prompt, or its chat's last user message."""
    if isinstance(prompt, str):
        return prompt
    users = [m.get("content", "") for m in prompt if m.get("role") == "user"]
    return str(users[-1] if users else prompt[-1].get("content", ""))


def annotate_campaign(campaign: Campaign, noise: float = 0.25, seed: int = 0, name: str = ANNOTATOR,
                      k: int | None = None) -> int:
    """Label every pair that ``name`` may still label (fewer than k labels, not labeled by it); returns
    how many labels it stored. ``k``: labels wanted per pair (default: the campaign's)."""
    from rlhf.demo.annotator import prefer

    k = k or campaign.k
    stored = 0
    sides_rng = random.Random(f"{seed}:{name}:sides")  # which reply is shown on the left
    while (item := campaign.next_item(name, k, sides_rng)) is not None:
        sides = {item["left"]["side"]: item["left"]["text"], item["right"]["side"]: item["right"]["text"]}
        rng = random.Random(f"{seed}:{name}:{item['pair_id']}")
        choice = ("a", "b")[prefer(last_user_text(item["prompt"]), sides["a"], sides["b"], rng, noise)]
        _, duplicate = campaign.submit_label(f"{name}:{seed}:{item['pair_id']}", name, item["pair_id"], choice,
                                             item["left"]["side"])
        stored += not duplicate
    return stored
