"""The statistics of ``rlhf eval``: pairwise outcomes, win rates with bootstrap intervals over prompts,
judge agreement, text statistics and reward-hacking flags. Pure: numpy only, no model."""

from __future__ import annotations


import numpy as np


def pairwise_outcomes(scores_run: np.ndarray, scores_base: np.ndarray, tie_tolerance: float = 0.0) -> dict:
    """Win/tie/loss shares per prompt over all k x k' pairs of (run sample, baseline sample).

    Args:
        scores_run: ``(n, k)`` judge scores of the run's k samples for each of n prompts.
        scores_base: ``(n, k')`` the same for the baseline.
        tie_tolerance: a pair whose scores differ by at most this much is a tie.

    Why all k x k' pairs and not k paired samples: sample i of the run and sample i of the baseline
    share a seed but come from different models, so pairing them by index couples nothing; every
    cross pair is an equally valid comparison, and averaging all k^2 of them (a U-statistic) estimates
    P(run beats baseline | prompt) with less variance than k pairs. It also makes a run against
    itself exactly 1/2: each pair (i, j) is mirrored by (j, i).

    Returns ``{"win", "tie", "loss", "rate"}``, each ``(n,)``; rate = win + tie / 2.
    """
    a, b = np.asarray(scores_run, float), np.asarray(scores_base, float)
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[0]:
        raise ValueError(f"expected (n, k) and (n, k') score arrays, found {a.shape} and {b.shape}")
    diff = a[:, :, None] - b[:, None, :]  # (n, k, k')
    tie = np.abs(diff) <= tie_tolerance
    win = (diff > 0) & ~tie
    loss = (diff < 0) & ~tie
    out = {"win": win.mean(axis=(1, 2)), "tie": tie.mean(axis=(1, 2)), "loss": loss.mean(axis=(1, 2))}
    out["rate"] = out["win"] + 0.5 * out["tie"]
    return out


def bootstrap_ci(values: np.ndarray, n_boot: int = 10_000, confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the MEAN of ``values`` (one value per prompt), resampling prompts.

    Prompts are the unit resampled because they are the independent draws (a prompt's k samples
    share it, so resampling samples would understate the spread). Vectorised: ``(n_boot, n)`` indices.
    """
    values = np.asarray(values, float)
    if values.ndim != 1 or len(values) == 0:
        raise ValueError(f"expected a non-empty 1-d array, found shape {values.shape}")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(axis=1)  # (n_boot,)
    alpha = (1.0 - confidence) / 2
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def win_rate_summary(scores_run: np.ndarray, scores_base: np.ndarray, tie_tolerance: float = 0.0,
                     n_boot: int = 10_000, seed: int = 0) -> dict:
    """Win rate (ties half) and prompt win rate against the baseline, each with a 95 % interval over prompts."""
    outcome = pairwise_outcomes(scores_run, scores_base, tie_tolerance)
    rate = outcome["rate"]  # (n,)
    prompt_won = np.where(rate > 0.5, 1.0, np.where(rate == 0.5, 0.5, 0.0))  # (n,) a prompt won, tied or lost
    return {
        "win_rate": float(rate.mean()), "win_rate_ci": bootstrap_ci(rate, n_boot, seed=seed),
        "wins": float(outcome["win"].mean()), "ties": float(outcome["tie"].mean()), "losses": float(outcome["loss"].mean()),
        "prompt_win_rate": float(prompt_won.mean()), "prompt_win_rate_ci": bootstrap_ci(prompt_won, n_boot, seed=seed),
        "prompts_won": int((rate > 0.5).sum()), "prompts_tied": int((rate == 0.5).sum()), "prompts": len(rate),
        "per_prompt": rate.tolist(),
    }


def judge_agreement(scores_a: np.ndarray, scores_b: np.ndarray, tie_tolerance: float = 0.0) -> dict:
    """How often two judges order two replies to the same prompt the same way.

    Args:
        scores_a: ``(n, m)`` judge A's scores of the m replies (every run's samples) to each of n prompts.
        scores_b: ``(n, m)`` judge B's scores of the same replies.
        tie_tolerance: a pair either judge scores within this much is left out (no order to agree on).

    Why: a policy trained against a reward model can only get better by an independent judge's
    standard where the reward model orders replies as that judge does; on the policy's own replies
    (not the reward stage's test pairs) this is the reward model's accuracy that matters.

    Returns ``{"agreement", "pairs"}``: the share of the ``pairs`` counted that both judges order alike
    (None when there are none).
    """
    a, b = np.asarray(scores_a, float), np.asarray(scores_b, float)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"expected two (n, m) score arrays of one shape, found {a.shape} and {b.shape}")
    i, j = np.triu_indices(a.shape[1], k=1)  # every unordered pair of replies to one prompt
    da, db = a[:, i] - a[:, j], b[:, i] - b[:, j]  # (n, pairs)
    counted = (np.abs(da) > tie_tolerance) & (np.abs(db) > tie_tolerance)
    pairs = int(counted.sum())
    agree = int((counted & ((da > 0) == (db > 0))).sum())
    return {"agreement": agree / pairs if pairs else None, "pairs": pairs}


def format_interval(summary: dict, key: str) -> str:
    """``summary[key]`` with its interval ``summary[key + "_ci"]`` as percentages: ``72% [61%, 82%]``."""
    lo, hi = summary[f"{key}_ci"]
    return f"{summary[key]:.0%} [{lo:.0%}, {hi:.0%}]"


def repetition_rate(text: str) -> float:
    """Share of a reply's word bigrams that repeat an earlier bigram of the same reply (0 = no repeats).

    Within one reply, unlike distinct-n over all replies: "great food great food great food" -> 0.6.
    """
    words = text.lower().split()
    bigrams = list(zip(words, words[1:]))
    return 1.0 - len(set(bigrams)) / len(bigrams) if bigrams else 0.0


def text_stats(prompts: list[str], replies: list[list[str]], ended_with_eos: np.ndarray) -> dict:
    """Reply length (words), distinct-1/2 over all replies, mean repetition rate, EOS share, on-topic rate."""
    from rlhf.eval.judges import on_topic
    from rlhf.core.tensors import distinct_n

    flat = [r for rs in replies for r in rs]
    topical = [on_topic(p, r) for p, rs in zip(prompts, replies) for r in rs]
    judged = [t for t in topical if t is not None]
    lengths = [len(r.split()) for r in flat]
    return {
        "reply_length": float(np.mean(lengths)), "reply_length_std": float(np.std(lengths)),
        "distinct_1": distinct_n(flat, 1), "distinct_2": distinct_n(flat, 2),
        "repetition_rate": float(np.mean([repetition_rate(r) for r in flat])),
        "eos_share": float(np.mean(ended_with_eos)),
        "empty_share": float(np.mean([not r.strip() for r in flat])),
        "on_topic_rate": float(np.mean(judged)) if judged else None,
    }


def hacking_flags(run: dict, base: dict, win_rates: dict, reward_judges: list[str], independent_judges: list[str],
                  kl_budget: float | None, length_tolerance: float = 0.25, repetition_tolerance: float = 0.05,
                  distinct_ratio: float = 0.9, on_topic_drop: float = 0.05) -> list[dict]:
    """Reward-hacking signals of one run against the baseline; each ``{"flag", "detail"}``.

    - ``reward_up_independent_down``: a reward model's win rate is significantly above 1/2 (interval
      above it) while an independent judge's win rate is below 1/2;
    - ``longer``: mean reply length above (1 + length_tolerance) x the baseline's;
    - ``more_repetitive``: repetition rate up by more than ``repetition_tolerance`` or distinct-2 below
      ``distinct_ratio`` x the baseline's;
    - ``off_topic``: on-topic rate down by more than ``on_topic_drop``;
    - ``kl_over_budget``: mean KL to the reference above ``kl_budget``.
    """
    flags = []
    for rm in reward_judges:
        for ind in independent_judges:
            r, i = win_rates[rm], win_rates[ind]
            if r["win_rate_ci"][0] > 0.5 and i["win_rate"] < 0.5:
                flags.append({"flag": "reward_up_independent_down",
                              "detail": f"{rm} win rate {r['win_rate']:.2f} [{r['win_rate_ci'][0]:.2f}, "
                                        f"{r['win_rate_ci'][1]:.2f}] but {ind} {i['win_rate']:.2f}"})
    if run["reply_length"] > (1 + length_tolerance) * base["reply_length"]:
        flags.append({"flag": "longer", "detail": f"mean reply length {base['reply_length']:.1f} -> "
                                                  f"{run['reply_length']:.1f} words"})
    if (run["repetition_rate"] > base["repetition_rate"] + repetition_tolerance
            or run["distinct_2"] < distinct_ratio * base["distinct_2"]):
        flags.append({"flag": "more_repetitive",
                      "detail": f"repetition {base['repetition_rate']:.3f} -> {run['repetition_rate']:.3f}, "
                                f"distinct-2 {base['distinct_2']:.3f} -> {run['distinct_2']:.3f}"})
    if (run.get("on_topic_rate") is not None and base.get("on_topic_rate") is not None
            and run["on_topic_rate"] < base["on_topic_rate"] - on_topic_drop):
        flags.append({"flag": "off_topic", "detail": f"on-topic rate {base['on_topic_rate']:.2f} -> "
                                                     f"{run['on_topic_rate']:.2f}"})
    if kl_budget is not None and run.get("kl_to_reference") is not None and run["kl_to_reference"] > kl_budget:
        flags.append({"flag": "kl_over_budget", "detail": f"mean KL {run['kl_to_reference']:.2f} nats > "
                                                          f"budget {kl_budget:g}"})
    return flags


def widest_disagreement(mean_scores: dict[str, np.ndarray], count: int) -> list[int]:
    """Indices of the ``count`` prompts whose per-run mean scores (``{run: (n,)}``) spread the most (max - min)."""
    stacked = np.stack(list(mean_scores.values()))  # (runs, n)
    spread = stacked.max(axis=0) - stacked.min(axis=0)  # (n,)
    return [int(i) for i in np.argsort(-spread, kind="stable")[:count]]


def mean_std(values: np.ndarray) -> dict:
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "median": float(np.median(values))}
