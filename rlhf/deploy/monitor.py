"""Drift monitoring for a deployed model: compare a window of logged prompts/replies with a reference one.

    rlhf monitor --reference logs/week1.jsonl --current logs/week2.jsonl --out monitor/week2
    rlhf monitor --reference ref.jsonl --current now.jsonl --reward_model runs/demo/reward --threshold 0.001
    # exit code 0: no drift; 3: drift past the threshold (a scheduler alerts on it); 2: bad input

Each log row has ``prompt`` (a string or chat messages) and ``response`` (or ``completion``; may be
empty: empty replies are one of the things measured), optionally ``score`` (a reward-model score,
as ``rlhf reward score`` writes it). Any format the toolkit's data loader reads works.

What is compared, and with which two-sample test (scipy):

==================  ==========================================  ==============================
metric              test                                        effect size
==================  ==========================================  ==============================
reward_score        Kolmogorov-Smirnov (``ks_2samp``)           KS statistic D (0..1)
reply_length        Kolmogorov-Smirnov, words per reply         D
prompt_length       Kolmogorov-Smirnov, words per prompt        D
empty_rate          2x2 chi-square (Fisher's exact when small)  Cohen's h
refusal_rate        2x2 chi-square (Fisher's exact when small)  Cohen's h
reply_vocabulary    chi-square on the top-K word counts         Cramér's V
prompt_vocabulary   chi-square on the top-K word counts         Cramér's V
==================  ==========================================  ==============================

A metric has drifted when its p-value is below ``threshold / m`` (Bonferroni over the m tests run,
so an unchanged model raises a false alarm with probability at most ``threshold`` per check) AND
its effect size is at least ``min_effect``: with thousands of logged replies a p-value alone flags
changes too small to matter. reward_score runs when ``--reward_model`` is given (the replies are
scored with it) or when every row of both files carries a ``score``.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from rlhf.core.errors import DataError, UserError

DRIFT_EXIT_CODE = 3
MIN_ROWS = 2
# Openings and phrases of a refusal; matched case-insensitively anywhere in the first 200 characters.
REFUSAL_PATTERN = (r"\b(i can ?not|i can't|i'm not able to|i am not able to|i'm unable to|i am unable to|"
                   r"i won't|i will not|i'm sorry|i am sorry|i apologi[sz]e|sorry, but|as an ai)\b")
_WORD = re.compile(r"\w+")


@dataclass
class Window:
    """One log file's rows, reduced to what the tests compare."""

    path: str
    prompts: list[str]
    replies: list[str]
    scores: list[float] | None
    """The rows' own ``score`` fields when every row has one, else None."""


def _text(value) -> str:
    if isinstance(value, list):  # chat messages
        return "\n".join(str(m.get("content", "")) for m in value if isinstance(m, dict))
    return value


def read_window(path: str | os.PathLike) -> Window:
    """Read a log file through the toolkit's data loader; bad rows are a one-line DataError."""
    from rlhf.core.data import read_records

    prompts, replies, scores = [], [], []
    for rec in read_records(path):
        prompt = rec.row.get("prompt")
        if not (isinstance(prompt, str) or isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt)):
            raise DataError(rec.location, "prompt", "a string or a list of chat messages",
                            "<missing>" if "prompt" not in rec.row else prompt)
        key = "completion" if "completion" in rec.row and "response" not in rec.row else "response"
        reply = rec.row.get(key)
        if not isinstance(reply, str):
            raise DataError(rec.location, key, "a string, the logged reply (may be empty)",
                            "<missing>" if key not in rec.row else reply)
        score = rec.row.get("score")
        if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score)):
            raise DataError(rec.location, "score", "a finite number", score)
        prompts.append(_text(prompt))
        replies.append(reply)
        scores.append(score)
    if len(prompts) < MIN_ROWS:
        raise UserError(f"{path}: expected at least {MIN_ROWS} logged rows to compare, found {len(prompts)}")
    have = [s for s in scores if s is not None]
    return Window(str(path), prompts, replies, [float(s) for s in scores] if len(have) == len(scores) else None)


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


# ----------------------------------------------------------------------------------------------
# Two-sample tests (scipy), each returning statistic, p-value and an effect size
# ----------------------------------------------------------------------------------------------


def compare_samples(reference: list[float], current: list[float]) -> dict:
    """Kolmogorov-Smirnov two-sample test; the effect size is the KS statistic D itself."""
    import numpy as np
    from scipy.stats import ks_2samp

    result = ks_2samp(reference, current)
    ref, cur = np.asarray(reference, float), np.asarray(current, float)
    return {"test": "ks_2samp", "statistic": float(result.statistic), "p_value": float(result.pvalue),
            "effect": float(result.statistic), "effect_name": "ks_d",
            "reference": {"mean": float(ref.mean()), "median": float(np.median(ref)), "std": float(ref.std())},
            "current": {"mean": float(cur.mean()), "median": float(np.median(cur)), "std": float(cur.std())}}


def compare_rates(k_ref: int, n_ref: int, k_cur: int, n_cur: int) -> dict:
    """2x2 chi-square test of two proportions (Fisher's exact test when an expected count is below 5).

    Effect size: Cohen's h = 2 asin(sqrt(p_cur)) - 2 asin(sqrt(p_ref)) (0.2 small, 0.5 medium).
    """
    from scipy.stats import chi2_contingency, fisher_exact

    table = [[k_ref, n_ref - k_ref], [k_cur, n_cur - k_cur]]
    p_ref, p_cur = k_ref / n_ref, k_cur / n_cur
    h = 2 * math.asin(math.sqrt(p_cur)) - 2 * math.asin(math.sqrt(p_ref))
    total = k_ref + k_cur
    if total in (0, n_ref + n_cur):  # nobody (or everybody) in both windows: nothing to test
        test, statistic, p = "none (identical rates)", 0.0, 1.0
    elif min(n * col / (n_ref + n_cur) for n in (n_ref, n_cur) for col in (total, n_ref + n_cur - total)) < 5:
        test, (statistic, p) = "fisher_exact", fisher_exact(table)
    else:
        result = chi2_contingency(table)
        test, statistic, p = "chi2_contingency", result.statistic, result.pvalue
    return {"test": test, "statistic": float(statistic), "p_value": float(p), "effect": abs(h),
            "effect_name": "cohens_h", "reference": {"rate": p_ref, "count": k_ref, "n": n_ref},
            "current": {"rate": p_cur, "count": k_cur, "n": n_cur}}


def compare_vocabulary(reference: list[str], current: list[str], top_k: int = 50) -> dict:
    """Chi-square test of word counts over the ``top_k`` most frequent words of both windows (+ 'other').

    Effect size: Cramér's V = sqrt(chi2 / N) for a 2-row table (0.1 small, 0.3 medium). Also lists
    the words whose share of the text moved most, for a person reading the report.
    """
    from scipy.stats import chi2_contingency

    ref = Counter(w for text in reference for w in words(text))
    cur = Counter(w for text in current for w in words(text))
    n_ref, n_cur = sum(ref.values()), sum(cur.values())
    if n_ref == 0 or n_cur == 0:
        return {"test": "none (no words in a window)", "statistic": 0.0, "p_value": 1.0,
                "effect": 1.0 if n_ref != n_cur else 0.0, "effect_name": "cramers_v",
                "reference": {"words": n_ref}, "current": {"words": n_cur}, "moved": []}
    top = [w for w, _ in (ref + cur).most_common(top_k)]
    rows = [[ref[w] for w in top] + [n_ref - sum(ref[w] for w in top)],
            [cur[w] for w in top] + [n_cur - sum(cur[w] for w in top)]]
    keep = [j for j in range(len(rows[0])) if rows[0][j] + rows[1][j] > 0]
    table = [[row[j] for j in keep] for row in rows]
    if len(keep) < 2:
        statistic, p = 0.0, 1.0
    else:
        result = chi2_contingency(table, correction=False)
        statistic, p = float(result.statistic), float(result.pvalue)
    v = math.sqrt(statistic / (n_ref + n_cur))
    moved = sorted(((cur[w] / n_cur - ref[w] / n_ref, w) for w in top), key=lambda t: -abs(t[0]))[:10]
    return {"test": "chi2_contingency", "statistic": statistic, "p_value": p, "effect": v,
            "effect_name": "cramers_v", "reference": {"words": n_ref, "distinct": len(ref)},
            "current": {"words": n_cur, "distinct": len(cur)},
            "moved": [{"word": w, "share_change": round(d, 5)} for d, w in moved]}


# ----------------------------------------------------------------------------------------------
# The check
# ----------------------------------------------------------------------------------------------


def drift_report(reference: Window, current: Window, threshold: float = 0.01, min_effect: float = 0.1,
                 reward_scores: tuple[list[float], list[float]] | None = None, top_k: int = 50,
                 refusal_pattern: str = REFUSAL_PATTERN) -> dict:
    """Every comparison, which ones drifted, and the overall status ('ok' or 'drift')."""
    if not 0 < threshold < 1:
        raise UserError(f"--threshold: expected a p-value in (0, 1), found {threshold}")
    if min_effect < 0:
        raise UserError(f"--min_effect: expected a non-negative effect size, found {min_effect}")
    try:
        refusal = re.compile(refusal_pattern, re.IGNORECASE)
    except re.error as e:
        raise UserError(f"--refusal_regex: expected a regular expression, found {refusal_pattern!r} ({e})") from None

    def count(window: Window, test) -> int:
        return sum(1 for r in window.replies if test(r))

    n_ref, n_cur = len(reference.replies), len(current.replies)
    metrics: dict[str, dict] = {}
    if reward_scores is None and reference.scores is not None and current.scores is not None:
        reward_scores = (reference.scores, current.scores)
    if reward_scores is not None:
        metrics["reward_score"] = compare_samples(*reward_scores)
    metrics["reply_length"] = compare_samples([len(words(r)) for r in reference.replies],
                                              [len(words(r)) for r in current.replies])
    metrics["prompt_length"] = compare_samples([len(words(p)) for p in reference.prompts],
                                               [len(words(p)) for p in current.prompts])
    empty = lambda r: not r.strip()  # noqa: E731
    refused = lambda r: bool(refusal.search(r[:200]))  # noqa: E731
    metrics["empty_rate"] = compare_rates(count(reference, empty), n_ref, count(current, empty), n_cur)
    metrics["refusal_rate"] = compare_rates(count(reference, refused), n_ref, count(current, refused), n_cur)
    metrics["reply_vocabulary"] = compare_vocabulary(reference.replies, current.replies, top_k)
    metrics["prompt_vocabulary"] = compare_vocabulary(reference.prompts, current.prompts, top_k)

    alpha = threshold / len(metrics)  # Bonferroni: one false alarm in 1/threshold unchanged checks
    for m in metrics.values():
        m["drifted"] = bool(m["p_value"] < alpha and m["effect"] >= min_effect)
    drifted = [name for name, m in metrics.items() if m["drifted"]]
    return {
        "status": "drift" if drifted else "ok",
        "drifted": drifted,
        "reference": reference.path, "current": current.path,
        "n_reference": n_ref, "n_current": n_cur,
        "threshold": threshold, "alpha_per_test": alpha, "min_effect": min_effect,
        "metrics": metrics,
    }


def plot_report(report: dict, reference: Window, current: Window, path: str | os.PathLike,
                reward_scores: tuple[list[float], list[float]] | None = None) -> None:
    """One PNG: distributions of each window side by side, rates, the words that moved; drifted panels in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = report["metrics"]
    fig, axes = plt.subplots(2, 3, figsize=(14, 8))

    def title(ax, name: str, label: str) -> None:
        m = metrics[name]
        flag = "  DRIFT" if m["drifted"] else ""
        ax.set_title(f"{label}\np={m['p_value']:.2g}, {m['effect_name']}={m['effect']:.2f}{flag}",
                     color="red" if m["drifted"] else "black", fontsize=10)

    def hist(ax, ref, cur, name, label) -> None:
        import numpy as np

        bins = np.histogram_bin_edges(list(ref) + list(cur), bins=30)
        ax.hist(ref, bins=bins, alpha=0.5, density=True, label=f"reference (n={len(ref)})")
        ax.hist(cur, bins=bins, alpha=0.5, density=True, label=f"current (n={len(cur)})")
        ax.legend(fontsize=8)
        title(ax, name, label)

    scores = reward_scores or ((reference.scores, current.scores) if "reward_score" in metrics else None)
    if scores is not None:
        hist(axes[0, 0], scores[0], scores[1], "reward_score", "reward-model score")
    else:
        axes[0, 0].text(0.5, 0.5, "no reward model given", ha="center", va="center")
        axes[0, 0].set_axis_off()
    hist(axes[0, 1], [len(words(r)) for r in reference.replies], [len(words(r)) for r in current.replies],
         "reply_length", "reply length (words)")
    hist(axes[0, 2], [len(words(p)) for p in reference.prompts], [len(words(p)) for p in current.prompts],
         "prompt_length", "prompt length (words)")

    ax = axes[1, 0]
    names = ["empty_rate", "refusal_rate"]
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [metrics[n]["reference"]["rate"] for n in names], 0.4, label="reference")
    ax.bar([x + 0.2 for x in xs], [metrics[n]["current"]["rate"] for n in names], 0.4, label="current")
    ax.set_xticks(list(xs), [f"{n}{' DRIFT' if metrics[n]['drifted'] else ''}" for n in names])
    for tick, n in zip(ax.get_xticklabels(), names):
        tick.set_color("red" if metrics[n]["drifted"] else "black")
    ax.set_title("share of replies", fontsize=10)
    ax.legend(fontsize=8)
    for ax, name, label in ((axes[1, 1], "reply_vocabulary", "reply words"),
                            (axes[1, 2], "prompt_vocabulary", "prompt words")):
        moved = metrics[name].get("moved", [])[:8][::-1]
        ax.barh([m["word"] for m in moved], [m["share_change"] for m in moved],
                color=["tab:green" if m["share_change"] > 0 else "tab:gray" for m in moved])
        ax.axvline(0, color="black", linewidth=0.5)
        ax.set_xlabel("change in share of words (current - reference)", fontsize=8)
        title(ax, name, label)
    status = report["status"].upper()
    fig.suptitle(f"{status}: {report['current']} vs {report['reference']}", color="red" if report["drifted"] else "green")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def score_windows(reward_model: str, reference: Window, current: Window, batch_size: int = 16):
    """Reward-model scores of both windows' replies, laid out as the reward model was trained."""
    # The reward stage's own scorer, so a reply is laid out exactly as in reward training.
    from rlhf.core.scoring import score_replies
    from rlhf.core.runs import load_run

    model, tokenizer = load_run(reward_model, "seq-cls")
    return tuple(score_replies(model, tokenizer, w.prompts, w.replies, batch_size) for w in (reference, current))


def monitor_command(argv: list[str]) -> int:
    """``rlhf monitor --reference <file> --current <file>``: exit 0 (no drift), 3 (drift) or 2 (bad input)."""
    from rlhf.core.outputs import write_json

    parser = argparse.ArgumentParser(prog="rlhf monitor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", required=True, help="logged prompt/response rows of the reference window")
    parser.add_argument("--current", required=True, help="logged prompt/response rows of the window to check")
    parser.add_argument("--reward_model", help="a reward stage output to score both windows' replies with")
    parser.add_argument("--threshold", type=float, default=0.01,
                        help="family-wise p-value: a test drifts below threshold / number of tests (default 0.01)")
    parser.add_argument("--min_effect", type=float, default=0.1,
                        help="smallest effect that counts: KS D, Cohen's h or Cramér's V (default 0.1)")
    parser.add_argument("--top_k", type=int, default=50, help="words compared by the vocabulary tests")
    parser.add_argument("--refusal_regex", default=REFUSAL_PATTERN, help="what counts as a refusal (case-insensitive)")
    parser.add_argument("--out", help="write report.json and drift.png into this directory")
    parser.add_argument("--batch_size", type=int, default=16, help="reward-model scoring batch")
    args = parser.parse_args(argv)
    if args.top_k < 1:
        raise UserError(f"--top_k: expected at least 1, found {args.top_k}")
    reference, current = read_window(args.reference), read_window(args.current)
    scores = score_windows(args.reward_model, reference, current, args.batch_size) if args.reward_model else None
    report = drift_report(reference, current, args.threshold, args.min_effect, scores, args.top_k, args.refusal_regex)
    for name, m in report["metrics"].items():
        ref, cur = m["reference"], m["current"]
        key = next(k for k in ("mean", "rate", "words") if k in ref)
        print(f"{name:>18}: {key} {ref[key]:.4g} -> {cur[key]:.4g}  {m['test']} p={m['p_value']:.3g} "
              f"{m['effect_name']}={m['effect']:.3f}{'  DRIFT' if m['drifted'] else ''}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "report.json", report)
        plot_report(report, reference, current, out / "drift.png", scores)
    where = f" (report in {args.out})" if args.out else ""
    if report["drifted"]:
        print(f"DRIFT: {', '.join(report['drifted'])}{where}")
        return DRIFT_EXIT_CODE
    print(f"ok: no drift past p < {args.threshold} (family-wise) and effect >= {args.min_effect}{where}")
    return 0
