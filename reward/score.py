"""Scoring prompt/reply rows with a trained reward model, and the held-out pair metrics.

    rlhf reward score --model runs/reward --input rows.jsonl --out scored.jsonl
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from rlhf.core.scoring import score_replies


@dataclass
class ScoreArguments:
    """Settings of ``rlhf reward score``."""

    model: str
    """A reward stage output directory."""
    input: str
    """Rows with a prompt and a response (or completion): .jsonl, .json, .csv, .parquet."""
    out: str
    """Where to write the rows, each with a 'score' field added (JSONL)."""
    batch_size: int = 16
    """Sequences per forward pass."""


def score_command(argv: list[str]) -> int:
    """``rlhf reward score --model <reward run> --input <rows> --out <jsonl>``."""
    from rlhf.core.config import build_config

    (args,), _ = build_config([ScoreArguments], argv, prog="rlhf reward score",
                              description="Score prompt/response rows with a trained reward model.")
    n = score_file(args.model, args.input, args.out, args.batch_size)
    print(f"scored {n} rows -> {args.out}")
    return 0


def pair_metrics(chosen: list[float], rejected: list[float], bins: int = 10) -> dict:
    """Pairwise accuracy, mean margin, and reliability-diagram data of P(chosen) = sigmoid(margin).

    Each pair is counted in both orders ((chosen, rejected) with outcome 1, (rejected, chosen) with
    outcome 0), so the diagram compares predicted probabilities with observed frequencies over the
    whole [0, 1] range, not only above one half.
    """
    margins = [c - r for c, r in zip(chosen, rejected)]
    n = len(margins)
    probs = [1 / (1 + math.exp(-m)) for m in margins]
    predictions = probs + [1 - p for p in probs]
    outcomes = [1.0] * n + [0.0] * n
    edges = [i / bins for i in range(bins + 1)]
    calibration = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        idx = [i for i, p in enumerate(predictions) if lo <= p < hi or (hi == 1.0 and p == 1.0)]
        if idx:
            calibration.append({
                "bin": [lo, hi],
                "mean_predicted": sum(predictions[i] for i in idx) / len(idx),
                "observed": sum(outcomes[i] for i in idx) / len(idx),
                "count": len(idx),
            })
    ece = sum(c["count"] * abs(c["mean_predicted"] - c["observed"]) for c in calibration) / (2 * n) if n else 0.0
    return {
        "accuracy": sum(m > 0 for m in margins) / n if n else float("nan"),
        "mean_margin": sum(margins) / n if n else float("nan"),
        "expected_calibration_error": ece,
        "calibration": calibration,
        "pairs": n,
    }


def plot_calibration(path: str | Path, calibration: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 4.2))
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    xs = [c["mean_predicted"] for c in calibration]
    ys = [c["observed"] for c in calibration]
    sizes = [10 + 2 * c["count"] for c in calibration]
    ax.plot(xs, ys, "-", color="tab:blue")
    ax.scatter(xs, ys, s=sizes, color="tab:blue", label="held-out pairs (size = count)")
    ax.set_xlabel("predicted P(chosen)")
    ax.set_ylabel("observed frequency")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_reward_model(run_dir: str):
    """(model, tokenizer) of a reward stage output: the base with the reward adapter and score head.

    See :func:`rlhf.core.runs.load_run`: a QLoRA reward adapter goes onto the same quantised base; any
    other stage's output (an SFT run, say) is refused with a one-line error naming what it is.
    """
    from rlhf.core.runs import load_run

    return load_run(run_dir, "seq-cls")


def score_file(model_dir: str, input_path: str, out_path: str, batch_size: int = 16) -> int:
    """Score every prompt/response row of ``input_path`` into ``out_path`` (adds a ``score`` field)."""
    from rlhf.core.data import DataError, read_records, write_jsonl

    records = read_records(input_path)
    rows = []
    for rec in records:
        reply = rec.row.get("response", rec.row.get("completion"))
        if not isinstance(rec.row.get("prompt"), (str, list)) or not rec.row.get("prompt"):
            raise DataError(rec.location, "prompt", "a non-empty string or a list of chat messages", rec.row.get("prompt", "<missing>"))
        if not isinstance(reply, str) or not reply.strip():
            raise DataError(rec.location, "response", "a non-empty string (or 'completion')", reply if reply is not None else "<missing>")
        rows.append((rec.row, reply))
    model, tokenizer = load_reward_model(model_dir)
    scores = score_replies(model, tokenizer, [r["prompt"] for r, _ in rows], [reply for _, reply in rows],
                           batch_size, progress=True)
    write_jsonl(out_path, [{**row, "score": s} for (row, _), s in zip(rows, scores)])
    return len(rows)
