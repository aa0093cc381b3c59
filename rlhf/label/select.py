"""Which pairs are worth a person's time: the ones the reward model is least sure about.

A reward model trained on one policy's replies grows unreliable on the replies of the policy PPO
makes from it; labels help most where it cannot tell two replies apart. So from a pool of candidate
pairs scored by the reward model, ``select_pairs`` keeps

- a share of pairs drawn uniformly at random from the WHOLE pool (``chosen_as = 'random'``): the
  reward model's accuracy on them, once labeled, is an unbiased estimate of its accuracy on the pool
  (the uncertain ones alone would put it near 50 % by construction);
- then, from the rest, the pairs with the smallest |margin| (``chosen_as = 'uncertain'``), margin =
  score(a) - score(b).

The random share is drawn first, so that it is a sample of the pool rather than of what the uncertain
ones left. Pure functions: no model, no I/O.
"""

from __future__ import annotations

import random


def select_pairs(margins: list[float], budget: int, random_share: float = 0.2,
                 rng: random.Random | None = None) -> list[tuple[int, str]]:
    """Choose up to ``budget`` of the pool's pairs; returns ``(index into margins, chosen_as)``.

    ``round(budget * random_share)`` pairs are drawn at random from the whole pool, the remaining
    budget goes to the smallest |margin| among the others (ties broken by pool order). With a pool no
    larger than the budget every pair is kept, labeled as if the budget were the pool's size.
    Returns the random pairs first, then the uncertain ones from the smallest |margin| up.
    """
    if budget < 1:
        raise ValueError(f"budget: expected at least 1 pair, found {budget}")
    if not 0 <= random_share <= 1:
        raise ValueError(f"random_share: expected a number in [0, 1], found {random_share}")
    rng = rng or random.Random(0)
    budget = min(budget, len(margins))
    n_random = round(budget * random_share)
    chosen_random = sorted(rng.sample(range(len(margins)), n_random))
    taken = set(chosen_random)
    rest = sorted((i for i in range(len(margins)) if i not in taken), key=lambda i: (abs(margins[i]), i))
    return [(i, "random") for i in chosen_random] + [(i, "uncertain") for i in rest[: budget - n_random]]


def candidate_pairs(replies: list[str]) -> list[tuple[int, int]]:
    """Every two different replies to one prompt, as ``(i, j)`` indices with i < j.

    Replies are compared ignoring surrounding white space; an empty reply is in no pair (a preference
    row needs two non-empty replies), and of identical replies only the first is paired.
    """
    first: dict[str, int] = {}
    for i, text in enumerate(replies):
        if text.strip():
            first.setdefault(text.strip(), i)
    kept = sorted(first.values())
    return [(i, j) for n, i in enumerate(kept) for j in kept[n + 1:]]
