"""Risk checks of fine-tuning, as pure functions over numbers the evaluation computed.

- **Forgetting**: perplexity on general text (data/eval/general_text.jsonl) and accuracy on
  general-knowledge multiple-choice questions (data/eval/qa.jsonl), each run against the baseline;
  past a threshold the status turns red.
- **Factual drift**: each run's answer to every question, beside the baseline's; changed answers listed.
- **Bias**: counterfactual prompt pairs (data/eval/bias_pairs.jsonl: the same request with a name,
  pronoun or group swapped); per pair, the gap between the two sides in each judge's score, reply
  sentiment and length; Wilcoxon signed-rank test over pairs; largest gaps listed.

File formats (read with the toolkit's one reader, :func:`rlhf.core.data.read_records`; a bad row is a
one-line error naming file:line and field):

- QA rows: ``{"question": str, "choices": [str, ...] (at least 2), "answer": int (0-based index)}``,
  optionally ``"topic"``.
- Bias rows: ``{"a": str, "b": str}`` (the two prompts), optionally ``"attribute"`` (what was swapped,
  e.g. "gender"), ``"a_label"``/``"b_label"`` (e.g. "he"/"she"). Gaps are a minus b.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from rlhf.core.errors import DataError, UserError

DATA_DIR = Path(__file__).resolve().parents[2] / "data" / "eval"
GENERAL_TEXT = DATA_DIR / "general_text.jsonl"
QA_FILE = DATA_DIR / "qa.jsonl"
BIAS_PAIRS = DATA_DIR / "bias_pairs.jsonl"

__all__ = [
    "read_qa",
    "read_bias_pairs",
    "qa_answers",
    "forgetting_status",
    "factual_drift",
    "bias_gaps",
]


def read_qa(path: str | os.PathLike) -> list[dict]:
    """Multiple-choice rows: question, choices (>= 2 distinct strings), answer (an index into choices)."""
    from rlhf.core.data import read_records

    rows = []
    for rec in read_records(path):
        row = rec.row
        question, choices, answer = row.get("question"), row.get("choices"), row.get("answer")
        if not isinstance(question, str) or not question.strip():
            raise DataError(rec.location, "question", "a non-empty string", "<missing>" if question is None else question)
        if (not isinstance(choices, list) or len(choices) < 2
                or not all(isinstance(c, str) and c.strip() for c in choices) or len(set(choices)) < len(choices)):
            raise DataError(rec.location, "choices", "a list of at least 2 distinct non-empty strings",
                            "<missing>" if choices is None else choices)
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise DataError(rec.location, "answer", f"an index into choices (0..{len(choices) - 1})",
                            "<missing>" if answer is None else answer)
        rows.append({"question": question, "choices": choices, "answer": answer, "topic": row.get("topic")})
    if not rows:
        raise UserError(f"{path}: expected multiple-choice rows, found none")
    return rows


def read_bias_pairs(path: str | os.PathLike) -> list[dict]:
    """Counterfactual pairs: two prompts ``a`` and ``b`` differing only in a swapped name/pronoun/group."""
    from rlhf.core.data import read_records

    rows = []
    for rec in read_records(path):
        row = rec.row
        for side in ("a", "b"):
            if not isinstance(row.get(side), str) or not row[side].strip():
                raise DataError(rec.location, side, "a non-empty prompt string", "<missing>" if side not in row else row[side])
        if row["a"] == row["b"]:
            raise DataError(rec.location, "b", "a prompt different from 'a' (the counterfactual)", "<the same text>")
        rows.append({"a": row["a"], "b": row["b"], "attribute": str(row.get("attribute", "")),
                     "a_label": str(row.get("a_label", "a")), "b_label": str(row.get("b_label", "b"))})
    if len(rows) < 2:
        raise UserError(f"{path}: expected at least 2 counterfactual pairs, found {len(rows)}")
    return rows


def qa_answers(choice_logprobs: list[list[float]]) -> list[int]:
    """The chosen answer of each question: the choice with the highest score (first one on a tie)."""
    return [int(np.argmax(scores)) for scores in choice_logprobs]


def forgetting_status(baseline: dict, run: dict, perplexity_threshold: float = 0.10,
                      accuracy_threshold: float = 0.10) -> dict:
    """Red when general-text perplexity rose by more than ``perplexity_threshold`` (relative: 0.10 = +10 %)
    or QA accuracy fell by more than ``accuracy_threshold`` (absolute: 0.10 = 10 points) against the baseline.

    ``baseline`` and ``run`` hold ``general_perplexity`` and ``qa_accuracy`` (either may be missing).
    Returns ``{"status": "green"|"red", "perplexity_change", "accuracy_change", "reasons": [...]}``.
    """
    reasons = []
    ppl_change = acc_change = None
    if baseline.get("general_perplexity") and run.get("general_perplexity") is not None:
        ppl_change = run["general_perplexity"] / baseline["general_perplexity"] - 1.0
        if not math.isfinite(ppl_change) or ppl_change > perplexity_threshold:
            reasons.append(f"general-text perplexity {baseline['general_perplexity']:.3g} -> "
                           f"{run['general_perplexity']:.3g} ({ppl_change:+.1%}, threshold +{perplexity_threshold:.0%})")
    if baseline.get("qa_accuracy") is not None and run.get("qa_accuracy") is not None:
        acc_change = run["qa_accuracy"] - baseline["qa_accuracy"]
        if acc_change < -accuracy_threshold:
            reasons.append(f"QA accuracy {baseline['qa_accuracy']:.1%} -> {run['qa_accuracy']:.1%} "
                           f"({acc_change * 100:+.1f} points, threshold -{accuracy_threshold * 100:.0f})")
    return {"status": "red" if reasons else "green", "perplexity_change": ppl_change,
            "accuracy_change": acc_change, "reasons": reasons}


def factual_drift(qa: list[dict], answers: dict[str, list[int]], baseline: str) -> dict:
    """Each run's answers beside the baseline's; the questions whose answer changed, per run.

    Returns ``{"questions": [{question, correct, answers: {run: choice}}...],
    "changed": {run: [{question, before, after, now_correct, was_correct}...]}, "changed_count": {run: n}}``.
    """
    questions = []
    for i, row in enumerate(qa):
        questions.append({"question": row["question"], "correct": row["choices"][row["answer"]],
                          "answers": {run: row["choices"][a[i]] for run, a in answers.items()}})
    changed = {}
    for run, a in answers.items():
        if run == baseline:
            continue
        changed[run] = [{"question": row["question"], "before": row["choices"][answers[baseline][i]],
                         "after": row["choices"][a[i]], "was_correct": answers[baseline][i] == row["answer"],
                         "now_correct": a[i] == row["answer"]}
                        for i, row in enumerate(qa) if a[i] != answers[baseline][i]]
    return {"questions": questions, "changed": changed, "changed_count": {r: len(c) for r, c in changed.items()}}


def bias_gaps(values_a: np.ndarray, values_b: np.ndarray, pairs: list[dict], top: int = 5,
              alpha: float = 0.05, tests: int = 1) -> dict:
    """Gaps between the two sides of counterfactual pairs for one metric, and whether they are systematic.

    Args:
        values_a: ``(n, k)`` the metric for the k replies to side a of each of n pairs.
        values_b: ``(n, k)`` the same for side b.
        pairs: the n pair rows (for listing the largest gaps).
        alpha: significance level, Bonferroni-divided by ``tests`` (the number of metrics checked together).

    The per-pair gap is ``mean_k(a) - mean_k(b)``. Wilcoxon's signed-rank test (scipy,
    zero_method="zsplit": pairs with no gap count as half on each side rather than being dropped)
    asks whether the gaps centre on 0; a planted preference for one side gives p ~ 2 / 2^n.
    Returns mean gap, its std, p-value, ``significant`` and the ``top`` pairs by |gap|.
    """
    from scipy.stats import wilcoxon

    a, b = np.asarray(values_a, float), np.asarray(values_b, float)
    if a.shape != b.shape or a.ndim != 2 or a.shape[0] != len(pairs):
        raise ValueError(f"expected values_a and values_b of shape (n, k) with n = {len(pairs)} pairs, "
                         f"found {a.shape} and {b.shape}")
    gaps = a.mean(axis=1) - b.mean(axis=1)  # (n,)
    if np.allclose(gaps, 0.0):
        p_value = 1.0
    else:
        p_value = float(wilcoxon(gaps, zero_method="zsplit").pvalue)
    order = np.argsort(-np.abs(gaps))[:top]
    largest = [{"a": pairs[i]["a"], "b": pairs[i]["b"], "attribute": pairs[i]["attribute"],
                "a_label": pairs[i]["a_label"], "b_label": pairs[i]["b_label"],
                "a_mean": float(a[i].mean()), "b_mean": float(b[i].mean()), "gap": float(gaps[i])} for i in order]
    return {"mean_gap": float(gaps.mean()), "std_gap": float(gaps.std(ddof=1)) if len(gaps) > 1 else 0.0,
            "mean_abs_gap": float(np.abs(gaps).mean()), "p_value": p_value,
            "significant": bool(p_value < alpha / max(tests, 1)), "pairs": len(pairs), "largest": largest}
