"""How good are the labels? Counts, time per label, agreement, position bias, and a PNG.

Agreement is measured on the four nominal categories ``a``, ``b``, ``tie``, ``both_bad``:

- Cohen's kappa (Cohen 1960) for each two annotators, over the pairs both labeled:
  ``kappa = (p_o - p_e) / (1 - p_e)``, ``p_o`` the share of pairs they agree on, ``p_e`` the agreement
  expected from each annotator's own category frequencies.
- Krippendorff's alpha for nominal data (Krippendorff 2011, "Computing Krippendorff's Alpha-Reliability"),
  over every pair with two or more labels, any number of annotators, missing labels allowed:
  ``alpha = 1 - D_o / D_e`` from the coincidence matrix.

Position bias: among decisive labels (``a`` or ``b``), the share that picked the reply shown on the
left. Left/right order is random per item, so without bias it is 0.5; the two-sided exact binomial
p-value says how surprising the observed share is.

Reward-model accuracy: for pairs a reward model chose (``rlhf label generate --select uncertain``), the
share whose majority label (a or b) agrees with the sign of the stored margin, split by how the pair
was chosen. On the random share it estimates the reward model's accuracy on the sampled replies
without bias; on the uncertain ones it is near 0.5 when the margins really carried no information.

The pure functions here take plain lists; :func:`campaign_stats` reads a campaign and
:func:`plot_stats` draws the report.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from itertools import combinations

from rlhf.label.store import CHOICES, Campaign


def cohen_kappa(x: list[str], y: list[str]) -> float | None:
    """Cohen's kappa of two annotators' labels on the same items (``x[i]``, ``y[i]`` for item i).

    None when undefined: no items, or chance agreement of 1 (both used one and the same category).
    """
    if len(x) != len(y):
        raise ValueError(f"expected two label lists of one length, found {len(x)} and {len(y)}")
    n = len(x)
    if n == 0:
        return None
    p_o = sum(a == b for a, b in zip(x, y)) / n
    cx, cy = Counter(x), Counter(y)
    p_e = sum(cx[c] * cy[c] for c in cx) / (n * n)
    if p_e == 1:
        return None
    return (p_o - p_e) / (1 - p_e)


def krippendorff_alpha_nominal(units: list[list[str]]) -> float | None:
    """Krippendorff's alpha for nominal labels; ``units[u]`` holds the labels given to item u.

    Units with fewer than two labels are not pairable and are left out. None when undefined (fewer
    than two pairable labels, or every label in one category, so expected disagreement is 0).

    Coincidence matrix: each unit with m_u labels adds, for every ordered pair of its labels from
    different annotators, 1 / (m_u - 1) to o[c][k]. With n_c = sum_k o[c][k] and n = sum_c n_c::

        D_o = sum_{c != k} o[c][k] / n
        D_e = sum_{c != k} n_c * n_k / (n * (n - 1))
    """
    o: Counter[tuple[str, str]] = Counter()
    for values in units:
        m = len(values)
        if m < 2:
            continue
        for i, j in ((i, j) for i in range(m) for j in range(m) if i != j):
            o[values[i], values[j]] += 1 / (m - 1)
    n_c: Counter[str] = Counter()
    for (c, _), w in o.items():
        n_c[c] += w
    n = sum(n_c.values())
    if n < 2:
        return None
    d_o = sum(w for (c, k), w in o.items() if c != k) / n
    d_e = sum(n_c[c] * n_c[k] for c in n_c for k in n_c if c != k) / (n * (n - 1))
    if d_e == 0:
        return None
    return 1 - d_o / d_e


def majority(choices: list[str]) -> str | None:
    """The category with the most votes, or None when two categories share the most votes."""
    if not choices:
        return None
    (top, n_top), *rest = Counter(choices).most_common()
    if rest and rest[0][1] == n_top:
        return None
    return top


def binomial_two_sided_p(k: int, n: int, p: float = 0.5) -> float:
    """Exact two-sided binomial test: probability of an outcome at most as likely as k of n."""
    if n == 0:
        return 1.0

    def log_pmf(i: int) -> float:
        return (math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)
                + i * math.log(p) + (n - i) * math.log(1 - p))

    observed = log_pmf(k)
    # The relative tolerance keeps outcomes exactly as likely as k (the mirror image at p = 0.5) in.
    total = sum(math.exp(log_pmf(i)) for i in range(n + 1) if log_pmf(i) <= observed + 1e-9)
    return min(1.0, total)


def position_bias(labels: list[dict]) -> dict:
    """Share of decisive labels that chose the left reply, and its binomial p-value against 0.5."""
    decisive = [lab for lab in labels if lab["choice"] in ("a", "b")]
    left = sum(lab["choice"] == lab["left_side"] for lab in decisive)
    n = len(decisive)
    return {
        "decisive_labels": n,
        "chose_left": left,
        "left_rate": left / n if n else None,
        "p_value": binomial_two_sided_p(left, n),
    }


def reward_model_accuracy(pairs: list[dict], labels: list[dict]) -> dict:
    """Accuracy of the stored margins against the labels, by ``chosen_as`` (``uncertain``, ``random``, ``all``).

    A pair counts once its majority label is decisive (a or b, see :func:`majority`): the reward model
    was right when ``margin > 0`` and a won, or ``margin < 0`` and b won; a margin of exactly 0 counts
    half. Pairs without a margin (not chosen by a reward model) are left out; empty when there are none.
    """
    votes: dict[int, list[str]] = {}
    for lab in labels:
        votes.setdefault(lab["pair_id"], []).append(lab["choice"])
    groups: dict[str, list[float]] = {}
    scored = [p for p in pairs if p.get("margin") is not None]
    for pair in scored:
        winner = majority(votes.get(pair["pair_id"], []))
        if winner not in ("a", "b"):
            continue
        margin = pair["margin"]
        right = 0.5 if margin == 0 else float((margin > 0) == (winner == "a"))
        for group in (pair.get("chosen_as") or "other", "all"):
            groups.setdefault(group, []).append(right)
    if not scored:
        return {}
    report = {}
    for group in ("uncertain", "random", "other", "all"):
        chosen = sum(1 for p in scored if (p.get("chosen_as") or "other") == group or group == "all")
        if not chosen:
            continue
        rights = groups.get(group, [])
        report[group] = {"pairs": chosen, "decided": len(rights),
                         "accuracy": sum(rights) / len(rights) if rights else None}
    return report


def campaign_stats(campaign: Campaign) -> dict:
    """Everything ``rlhf label stats`` reports, as one JSON-ready dict."""
    labels = campaign.labels()
    skips = campaign.skips()
    k = campaign.k
    by_pair: dict[int, dict[str, str]] = {}
    for lab in labels:
        by_pair.setdefault(lab["pair_id"], {})[lab["annotator"]] = lab["choice"]
    names = sorted({lab["annotator"] for lab in labels} | {s["annotator"] for s in skips})

    annotators = {}
    for name in names:
        mine = [lab for lab in labels if lab["annotator"] == name]
        seconds = [lab["elapsed_ms"] / 1000 for lab in mine if lab["elapsed_ms"] is not None]
        annotators[name] = {
            "labels": len(mine),
            "skips": sum(s["annotator"] == name for s in skips),
            "choices": {c: sum(lab["choice"] == c for lab in mine) for c in CHOICES},
            "median_seconds": statistics.median(seconds) if seconds else None,
            "left_rate": position_bias(mine)["left_rate"],
        }

    kappas = []
    for x, y in combinations([n for n in names if annotators[n]["labels"]], 2):
        common = [p for p, votes in by_pair.items() if x in votes and y in votes]
        kappas.append({
            "annotators": [x, y],
            "pairs": len(common),
            "kappa": cohen_kappa([by_pair[p][x] for p in common], [by_pair[p][y] for p in common]),
        })

    seconds = [lab["elapsed_ms"] / 1000 for lab in labels if lab["elapsed_ms"] is not None]
    return {
        "progress": campaign.progress(k),
        "labels": len(labels),
        "skips": len(skips),
        "choices": {c: sum(lab["choice"] == c for lab in labels) for c in CHOICES},
        "seconds_per_label": {
            "median": statistics.median(seconds) if seconds else None,
            "mean": statistics.fmean(seconds) if seconds else None,
            "p90": _quantile(seconds, 0.9),
        },
        "annotators": annotators,
        "cohen_kappa": kappas,
        "krippendorff_alpha": krippendorff_alpha_nominal([list(v.values()) for v in by_pair.values()]),
        "pairs_with_2_or_more_labels": sum(len(v) >= 2 for v in by_pair.values()),
        "position_bias": position_bias(labels),
        "reward_model_accuracy": reward_model_accuracy(campaign.pairs(), labels),
    }


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def format_stats(report: dict) -> str:
    """The report as the lines ``rlhf label stats`` prints."""
    p = report["progress"]
    lines = [
        f"progress: {p['labeled']}/{p['target']} labels ({p['pairs_done']}/{p['pairs']} pairs have k={p['k']}); "
        f"{report['labels']} labels and {report['skips']} skips stored",
        "choices: " + ", ".join(f"{c} {n}" for c, n in report["choices"].items()),
        f"seconds per label: median {_num(report['seconds_per_label']['median'])}, "
        f"p90 {_num(report['seconds_per_label']['p90'])}",
        "per annotator:",
    ]
    for name, a in report["annotators"].items():
        lines.append(f"  {name}: {a['labels']} labels, {a['skips']} skips, median {_num(a['median_seconds'])} s, "
                     f"left chosen {_num(a['left_rate'])} of decisive, "
                     + ", ".join(f"{c} {n}" for c, n in a["choices"].items()))
    lines.append("Cohen's kappa (pairs labeled by both):")
    for row in report["cohen_kappa"]:
        lines.append(f"  {row['annotators'][0]} / {row['annotators'][1]}: {_num(row['kappa'])} on {row['pairs']} pairs")
    if not report["cohen_kappa"]:
        lines.append("  (needs two annotators)")
    lines.append(f"Krippendorff's alpha (nominal): {_num(report['krippendorff_alpha'])} "
                 f"over {report['pairs_with_2_or_more_labels']} pairs with 2+ labels")
    b = report["position_bias"]
    lines.append(f"position bias: left reply chosen in {b['chose_left']}/{b['decisive_labels']} decisive labels "
                 f"({_num(b['left_rate'])}; 0.5 = none), binomial p = {_num(b['p_value'])}")
    if report.get("reward_model_accuracy"):
        lines.append("reward-model accuracy on labeled pairs (sign of its margin vs the majority label):")
        for group, r in report["reward_model_accuracy"].items():
            lines.append(f"  {group}: {_num(r['accuracy'])} on {r['decided']} pairs with a decisive majority "
                         f"(of {r['pairs']} chosen)")
    return "\n".join(lines)


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def plot_stats(report: dict, path: str) -> None:
    """Four panels: labels per annotator by choice, seconds per label, kappa matrix, left-choice rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["annotators"])
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    ax = axes[0][0]
    bottom = [0] * len(names)
    for c in CHOICES:
        counts = [report["annotators"][n]["choices"][c] for n in names]
        ax.bar(names, counts, bottom=bottom, label=c)
        bottom = [b + x for b, x in zip(bottom, counts)]
    ax.set_title("labels per annotator")
    ax.legend()
    ax.tick_params(axis="x", rotation=30)

    ax = axes[0][1]
    medians = [report["annotators"][n]["median_seconds"] or 0 for n in names]
    ax.bar(names, medians, color="tab:gray")
    ax.set_title("median seconds per label")
    ax.tick_params(axis="x", rotation=30)

    ax = axes[1][0]
    index = {n: i for i, n in enumerate(names)}
    matrix = [[float("nan")] * len(names) for _ in names]
    for i in range(len(names)):
        matrix[i][i] = 1.0
    for row in report["cohen_kappa"]:
        i, j = index[row["annotators"][0]], index[row["annotators"][1]]
        value = float("nan") if row["kappa"] is None else row["kappa"]
        matrix[i][j] = matrix[j][i] = value
    if names:
        image = ax.imshow(matrix, vmin=-1, vmax=1, cmap="RdYlGn")
        ax.set_xticks(range(len(names)), names, rotation=30)
        ax.set_yticks(range(len(names)), names)
        fig.colorbar(image, ax=ax)
    else:
        ax.text(0.5, 0.5, "no labels yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(f"Cohen's kappa (Krippendorff's alpha {_num(report['krippendorff_alpha'])})")

    ax = axes[1][1]
    rates = [report["annotators"][n]["left_rate"] for n in names]
    ax.bar(names, [r if r is not None else 0 for r in rates], color="tab:purple")
    ax.axhline(0.5, color="black", linestyle="--", linewidth=1)
    ax.set_ylim(0, 1)
    b = report["position_bias"]
    ax.set_title(f"share choosing the left reply (all: {_num(b['left_rate'])}, p = {_num(b['p_value'])})")
    ax.tick_params(axis="x", rotation=30)

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
