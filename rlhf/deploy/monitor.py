"""Drift monitoring for a deployed model: compare a window of logged prompts/replies with a reference one.

    rlhf monitor --reference logs/week1.jsonl --current logs/week2.jsonl --out monitor/week2
    rlhf monitor --reference ref.jsonl --current now.jsonl --reward_model runs/demo/reward --threshold 0.001
    rlhf monitor --config configs/monitor.yaml --current logs/week3.jsonl   # keys of MonitorArguments
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
reply_vocabulary    Fisher's exact test per top-K word on the   Cohen's h of the word with the
                    share of replies using it, Bonferroni over  smallest p-value
                    the K words
prompt_vocabulary   the same, over prompts                      the same
==================  ==========================================  ==============================

Every test counts replies (or prompts), never words, because replies are the independent draws: the
words of one reply are not (a reply that says "great" once often says it ten times). A test on word
counts treats each word as a draw, so it mistakes one window's chance mix of long and short
repetitive replies for drift (measured: 200 of 200 alarms on same-distribution windows of
repetitive replies, tests/test_monitor.py). The vocabulary tests therefore ask, word by word, how
many replies use it, with an exact test that needs no large-count approximation, and take the
smallest p-value times the number of words (Bonferroni, valid however the words depend on each other).

A metric has drifted when its p-value is below ``threshold / m`` (Bonferroni over the m tests run,
so an unchanged model raises a false alarm with probability at most ``threshold`` per check, when
the rows of each window are independent draws) AND its effect size is at least ``min_effect``: with
thousands of logged replies a p-value alone flags changes too small to matter. reward_score runs
when ``--reward_model`` is given (the replies are scored with it, each after its prompt laid out as
in reward training: chat messages through the chat template, turn by turn) or when every row of
both files carries a ``score``.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rlhf.core.errors import DataError, UserError
from rlhf.core.formatting import prompt_text

if TYPE_CHECKING:
    import numpy as np

DRIFT_EXIT_CODE = 3
MIN_ROWS = 2
# Openings and phrases of a refusal; matched case-insensitively anywhere in the first 200 characters,
# after typographic apostrophes are read as ASCII ones (_APOSTROPHES).
REFUSAL_PATTERN = (r"\b(i can ?not|i can't|i'm not able to|i am not able to|i'm unable to|i am unable to|"
                   r"i won't|i will not|i'm sorry|i am sorry|i apologi[sz]e|sorry, but|as an ai)\b")
# Chat models and word processors write "I’m sorry, I can’t" with U+2019 (and some U+2018 or the
# modifier letter U+02BC); mapping them to "'" lets the default pattern and a user's own
# --refusal_regex be written with the ASCII apostrophe alone.
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'"})
_WORD = re.compile(r"\w+")


@dataclass
class Window:
    """One log file's rows, reduced to what the tests compare."""

    path: str
    prompts: list[str]
    """Each prompt's text (a chat prompt's messages joined), for the length and vocabulary tests."""
    replies: list[str]
    scores: list[float] | None
    """The rows' own ``score`` fields when every row has one, else None."""
    chat_prompts: list[str | list[dict]] | None = None
    """The prompts as logged: a string or a list of ``{'role', 'content'}`` messages, which the reward
    model scores in its training layout (None: the same as ``prompts``)."""


def read_window(path: str | os.PathLike) -> Window:
    """Read a log file through the toolkit's data loader; bad rows are a one-line DataError."""
    from rlhf.core.data import _check_messages, read_records

    prompts, replies, scores = [], [], []
    for rec in read_records(path):
        prompt = rec.row.get("prompt")
        if isinstance(prompt, list) and prompt:
            # As the data loader checks a training prompt (role and content of each message), so
            # a logged chat prompt can be scored turn by turn as the reward model saw them.
            prompt = _check_messages(rec, "prompt", prompt)
        elif not isinstance(prompt, str):
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
        prompts.append(prompt)
        replies.append(reply)
        scores.append(score)
    if len(prompts) < MIN_ROWS:
        raise UserError(f"{path}: expected at least {MIN_ROWS} logged rows to compare, found {len(prompts)}")
    have = [s for s in scores if s is not None]
    return Window(str(path), [prompt_text(p) for p in prompts], replies,
                  [float(s) for s in scores] if len(have) == len(scores) else None, prompts)


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


def fisher_exact_many(k_ref: np.ndarray | list[int], n_ref: int, k_cur: np.ndarray | list[int],
                      n_cur: int) -> np.ndarray:
    """Two-sided Fisher exact p-values of the 2x2 tables ``[[k_ref, n_ref - k_ref], [k_cur, n_cur - k_cur]]``.

    ``k_ref``, ``k_cur``: ``(w,)`` counts, one table per entry. Given the margins, k_cur is
    hypergeometric when both windows come from one distribution; the p-value sums the probability of
    every table no more likely than the observed one (scipy.stats.fisher_exact's rule, with its
    relative tolerance of 1e-7), vectorized over the tables; tests/test_monitor.py checks it
    against fisher_exact table by table.
    """
    import numpy as np
    from scipy.special import gammaln

    k_ref, k_cur = np.asarray(k_ref, dtype=np.int64), np.asarray(k_cur, dtype=np.int64)
    total, n = k_ref + k_cur, n_ref + n_cur  # (w,), users of each word in both windows; rows in both
    p = np.ones(len(total))
    x = np.arange(n_cur + 1)[:, None]  # (n_cur + 1, 1): every count the current window could have

    def log_choose(a, b):
        return gammaln(a + 1) - gammaln(b + 1) - gammaln(a - b + 1)

    # Chunks of words keep the (n_cur + 1, chunk) table near 2M numbers for windows of any size.
    step = max(1, 2_000_000 // (n_cur + 1))
    for lo in range(0, len(total), step):
        t, k = total[lo : lo + step], k_cur[lo : lo + step]  # (c,)
        possible = (x <= t) & (t - x <= n_ref)  # (n_cur + 1, c)
        with np.errstate(invalid="ignore", divide="ignore"):
            log_prob = log_choose(t, x) + log_choose(n - t, n_cur - x) - log_choose(n, n_cur)
        prob = np.where(possible, np.exp(np.where(possible, log_prob, 0.0)), 0.0)  # (n_cur + 1, c)
        observed = prob[k, np.arange(len(k))]  # (c,)
        p[lo : lo + step] = np.where(prob <= observed * (1 + 1e-7), prob, 0.0).sum(axis=0)
    return np.minimum(p, 1.0)


def compare_vocabulary(reference: list[str], current: list[str], top_k: int = 50) -> dict:
    """Which share of the texts uses each of the ``top_k`` words most used in both windows, compared.

    One text is one draw, whatever its length or how often it repeats a word: for each word, the
    number of texts using it in each window goes through Fisher's exact test
    (:func:`fisher_exact_many`), and the metric's p-value is the smallest times the number of words
    (Bonferroni). Effect size: Cohen's h of that word's share of texts (0.2 small, 0.5 medium).
    Also lists the words whose share of texts moved most, for a person reading the report.
    """
    return _compare_word_use([words(t) for t in reference], [words(t) for t in current], top_k)


def _compare_word_use(reference: list[list[str]], current: list[list[str]], top_k: int) -> dict:
    """:func:`compare_vocabulary` on texts already split into words."""
    import numpy as np

    n_ref, n_cur = len(reference), len(current)
    ref = Counter(w for text in reference for w in set(text))  # word -> texts using it
    cur = Counter(w for text in current for w in set(text))
    # Ties broken by the word, not by which window met it first: the choice of words then depends on
    # both windows pooled only, so the exact tests stay exact for the words chosen.
    top = sorted((ref + cur).items(), key=lambda item: (-item[1], item[0]))[:top_k]
    if not top:
        return {"test": "none (no words in either window)", "statistic": 0.0, "p_value": 1.0, "effect": 0.0,
                "effect_name": "cohens_h", "reference": {"words": 0, "texts": n_ref},
                "current": {"words": 0, "texts": n_cur}, "moved": []}
    top_words = [w for w, _ in top]
    k_ref, k_cur = np.array([ref[w] for w in top_words]), np.array([cur[w] for w in top_words])  # (w,)
    p = fisher_exact_many(k_ref, n_ref, k_cur, n_cur)  # (w,)
    r_ref, r_cur = k_ref / n_ref, k_cur / n_cur
    h = np.abs(2 * np.arcsin(np.sqrt(r_cur)) - 2 * np.arcsin(np.sqrt(r_ref)))  # (w,)
    best = min(range(len(top_words)), key=lambda j: (p[j], -h[j]))  # smallest p; the larger effect on a tie
    moved = sorted(range(len(top_words)), key=lambda j: -abs(r_cur[j] - r_ref[j]))[:10]
    return {"test": f"fisher_exact per word x {len(top_words)} (bonferroni)", "statistic": float(p[best]),
            "p_value": float(min(1.0, p[best] * len(top_words))), "effect": float(h[best]),
            "effect_name": "cohens_h", "word": top_words[best],
            "reference": {"words": sum(len(t) for t in reference), "distinct": len(ref), "texts": n_ref},
            "current": {"words": sum(len(t) for t in current), "distinct": len(cur), "texts": n_cur},
            "moved": [{"word": top_words[j], "share_change": round(float(r_cur[j] - r_ref[j]), 5),
                       "reference_share": round(float(r_ref[j]), 5), "current_share": round(float(r_cur[j]), 5),
                       "p_value": float(p[j])} for j in moved]}


# ----------------------------------------------------------------------------------------------
# The check
# ----------------------------------------------------------------------------------------------


def check_settings(threshold: float, min_effect: float, top_k: int, refusal_pattern: str) -> re.Pattern:
    """The refusal pattern, compiled, once every setting is in range (else a UserError naming the key)."""
    if not 0 < threshold < 1:
        raise UserError(f"threshold: expected a p-value in (0, 1), found {threshold:g}")
    if min_effect < 0:
        raise UserError(f"min_effect: expected a non-negative effect size, found {min_effect:g}")
    if top_k < 1:
        raise UserError(f"top_k: expected at least 1 word to compare, found {top_k}")
    try:
        return re.compile(refusal_pattern, re.IGNORECASE)
    except re.error as e:
        raise UserError(f"refusal_regex: expected a regular expression, found {refusal_pattern!r} ({e})") from None


def drift_report(reference: Window, current: Window, threshold: float = 0.01, min_effect: float = 0.1,
                 reward_scores: tuple[list[float], list[float]] | None = None, top_k: int = 50,
                 refusal_pattern: str = REFUSAL_PATTERN) -> dict:
    """Every comparison, which ones drifted, and the overall status ('ok' or 'drift')."""
    refusal = check_settings(threshold, min_effect, top_k, refusal_pattern)
    n_ref, n_cur = len(reference.replies), len(current.replies)
    # Each text split into words once, for its length and for the vocabulary test.
    reply_words = [[words(r) for r in w.replies] for w in (reference, current)]
    prompt_words = [[words(p) for p in w.prompts] for w in (reference, current)]
    metrics: dict[str, dict] = {}
    if reward_scores is None and reference.scores is not None and current.scores is not None:
        reward_scores = (reference.scores, current.scores)
    if reward_scores is not None:
        metrics["reward_score"] = compare_samples(*reward_scores)
    metrics["reply_length"] = compare_samples(*([len(t) for t in texts] for texts in reply_words))
    metrics["prompt_length"] = compare_samples(*([len(t) for t in texts] for texts in prompt_words))

    def count(window: Window, test) -> int:
        return sum(1 for r in window.replies if test(r))

    empty = lambda r: not r.strip()
    refused = lambda r: bool(refusal.search(r[:200].translate(_APOSTROPHES)))
    metrics["empty_rate"] = compare_rates(count(reference, empty), n_ref, count(current, empty), n_cur)
    metrics["refusal_rate"] = compare_rates(count(reference, refused), n_ref, count(current, refused), n_cur)
    metrics["reply_vocabulary"] = _compare_word_use(*reply_words, top_k)
    metrics["prompt_vocabulary"] = _compare_word_use(*prompt_words, top_k)

    alpha = threshold / len(metrics)  # Bonferroni: at most one false alarm in 1/threshold unchanged checks
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
        ax.set_xlabel("change in share of texts using the word (current - reference)", fontsize=8)
        title(ax, name, label)
    status = report["status"].upper()
    fig.suptitle(f"{status}: {report['current']} vs {report['reference']}", color="red" if report["drifted"] else "green")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def score_windows(reward_model: str, reference: Window, current: Window,
                  batch_size: int = 16) -> tuple[list[float], list[float]]:
    """Reward-model scores of both windows' replies, each after its prompt laid out as in reward training.

    The reward stage scores ``(prompt, reply)`` through :func:`rlhf.core.scoring.score_replies`, with the
    prompt as the data loader keeps it: a string, or chat messages that go through the chat template
    turn by turn (system, user, assistant, user...). So the logged prompt goes in as logged, not as
    the joined text the length and vocabulary tests read, which would be one user turn.
    """
    from rlhf.core.runs import load_run
    from rlhf.core.scoring import score_replies

    model, tokenizer = load_run(reward_model, "seq-cls")
    return tuple(score_replies(model, tokenizer, w.prompts if w.chat_prompts is None else w.chat_prompts,
                               w.replies, batch_size) for w in (reference, current))


@dataclass
class MonitorArguments:
    """What ``rlhf monitor`` compares, and when a difference counts as drift."""

    reference: str = ""
    """Logged prompt/response rows of the reference window (any format the data loader reads)."""
    current: str = ""
    """Logged prompt/response rows of the window to check."""
    reward_model: str | None = None
    """A reward stage output to score both windows' replies with, each prompt laid out as in reward training."""
    threshold: float = 0.01
    """Family-wise false-alarm probability: a test drifts when its p-value is below threshold / number of tests."""
    min_effect: float = 0.1
    """Smallest effect that counts: KS D, or Cohen's h of a rate or of a word's share of replies."""
    top_k: int = 50
    """Words compared by the vocabulary tests (the ones most used in both windows)."""
    refusal_regex: str = REFUSAL_PATTERN
    """What counts as a refusal, searched case-insensitively in a reply's first 200 characters
    (typographic apostrophes read as ')."""
    out: str | None = None
    """Write report.json and drift.png into this directory."""
    batch_size: int = 16
    """Reward-model scoring batch."""

    def __post_init__(self) -> None:
        for key in ("reference", "current"):
            if not getattr(self, key):
                raise UserError(f"{key}: expected a log file of prompt/response rows (--{key} FILE), found none")
        check_settings(self.threshold, self.min_effect, self.top_k, self.refusal_regex)


def monitor_command(argv: list[str]) -> int:
    """``rlhf monitor --reference <file> --current <file>``: exit 0 (no drift), 3 (drift) or 2 (bad input)."""
    from rlhf.core.config import build_config
    from rlhf.core.outputs import write_json

    (args,), _ = build_config([MonitorArguments], argv)
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
