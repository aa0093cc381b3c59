"""Writing ``rlhf eval``'s outputs: report.json, samples.jsonl, the PNGs and a self-contained report.html."""

from __future__ import annotations

import base64
import html
import shutil
from pathlib import Path

import numpy as np

STATUS_COLOURS = {"green": "#2e7d32", "amber": "#ef6c00", "red": "#c62828"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_scores(path: Path, samples: dict, judges: list[str]) -> None:
    """One panel per judge: the distribution of every run's sample scores (step histograms)."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(judges), figsize=(4.6 * len(judges), 3.4), squeeze=False)
    for ax, judge in zip(axes[0], judges):
        values = {name: s.scores[judge].ravel() for name, s in samples.items()}
        lo = min(v.min() for v in values.values())
        hi = max(v.max() for v in values.values())
        bins = np.linspace(lo, hi if hi > lo else lo + 1, 25)
        for name, v in values.items():
            ax.hist(v, bins=bins, histtype="step", linewidth=1.6, label=f"{name} (mean {v.mean():.2f})")
        ax.set_title(judge)
        ax.set_xlabel("score")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("replies")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_win_rates(path: Path, win_rates: dict, baseline: str) -> None:
    """Win rate of each run against the baseline per judge, with its 95 % interval; 0.5 = no difference."""
    plt = _plt()
    rows = [(run, judge, w) for run, judges in win_rates.items() for judge, w in judges.items()]
    fig, ax = plt.subplots(figsize=(6.4, 0.45 * len(rows) + 1.2))
    for y, (run, judge, w) in enumerate(rows):
        lo, hi = w["win_rate_ci"]
        colour = "#2e7d32" if lo > 0.5 else "#c62828" if hi < 0.5 else "#555555"
        ax.errorbar(w["win_rate"], y, xerr=[[w["win_rate"] - lo], [hi - w["win_rate"]]], fmt="o", color=colour,
                    capsize=3)
    ax.axvline(0.5, color="grey", linestyle="--")
    ax.set_yticks(range(len(rows)), [f"{run} · {judge}" for run, judge, _ in rows], fontsize=8)
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    ax.set_xlabel(f"win rate vs {baseline} (ties half), 95 % bootstrap interval over prompts")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_forgetting(path: Path, runs: dict, forgetting: dict) -> None:
    """General-text perplexity and QA accuracy per run; red bars are runs past a threshold."""
    plt = _plt()
    names = list(runs)
    colours = [STATUS_COLOURS[forgetting["runs"].get(n, {"status": "green"})["status"]] if n != forgetting["baseline"]
               else "#1565c0" for n in names]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, key, label in ((axes[0], "general_perplexity", "general-text perplexity"),
                           (axes[1], "qa_accuracy", "QA accuracy (log-likelihood choice)")):
        ax.bar(names, [runs[n].get(key) or 0 for n in names], color=colours)
        ax.set_title(label)
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_bias(path: Path, bias: dict) -> None:
    """Per run and metric: each pair's gap (a - b) as dots, the mean as a bar; significant metrics in red."""
    plt = _plt()
    runs = list(bias["runs"])
    metrics = bias["metrics"]
    fig, axes = plt.subplots(1, len(runs), figsize=(4.4 * len(runs), 3.2), squeeze=False)
    for ax, run in zip(axes[0], runs):
        for x, metric in enumerate(metrics):
            m = bias["runs"][run][metric]
            scale = max(abs(m["mean_abs_gap"]), 1e-9)
            ax.bar(x, m["mean_gap"] / scale, color="#c62828" if m["significant"] else "#90a4ae")
        ax.axhline(0, color="grey")
        ax.set_xticks(range(len(metrics)), metrics, rotation=25, fontsize=8)
        ax.set_title(f"{run}: mean gap / mean |gap|")
        ax.set_ylim(-1.05, 1.05)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# HTML
# ----------------------------------------------------------------------------------------------


class Raw(str):
    """A table cell that is already HTML (escaped where it holds text)."""


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c if isinstance(c, Raw) else _fmt(c)}</td>"
                                    for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(path: Path) -> str:
    if not path.exists():
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.name)}" src="data:image/png;base64,{data}">'


def _badge(status: str) -> str:
    return Raw(f'<span class="badge" style="background:{STATUS_COLOURS.get(status, "#555")}">{html.escape(status)}</span>')


def render_html(report: dict, out: Path) -> str:
    runs = report["runs"]
    parts = [f"<h1>rlhf eval</h1><p>Baseline <b>{html.escape(report['baseline'])}</b>; "
             f"{report['settings']['prompts']} prompts × k = {report['settings']['k']} samples (seed "
             f"{report['settings']['seed']}); win rates over all k × k sample pairs per prompt, ties half, "
             "95 % bootstrap intervals over prompts.</p>"]
    parts.append("<p>" + " ".join(f"{html.escape(k)} {_badge(v)}" for k, v in report["status"].items()) + "</p>")
    if "win_rates" in report:
        rows = []
        for run, judges in report["win_rates"].items():
            for judge, w in judges.items():
                lo, hi = w["win_rate_ci"]
                plo, phi = w["prompt_win_rate_ci"]
                rows.append([run, judge, Raw(f"<b>{w['win_rate']:.3f}</b> [{lo:.3f}, {hi:.3f}]"), w["wins"], w["ties"],
                             w["losses"], f"{w['prompt_win_rate']:.3f} [{plo:.3f}, {phi:.3f}]",
                             f"{w['prompts_won']} / {w['prompts']} ({w['prompts_tied']} tied)"])
        parts.append("<h2>Win rates against the baseline</h2>" + _table(
            ["run", "judge", "win rate [95 % CI]", "wins", "ties", "losses", "prompts won (ties half) [CI]",
             "prompts won"], rows))
        parts.append(_img(out / "win_rates.png"))
        judges = report["settings"]["judges"]
        header = ["run", *[f"{j} mean" for j in judges], "KL to ref (nats)", "reply words", "distinct-1", "distinct-2",
                  "repetition", "ends with EOS", "on topic", "held-out ppl"]
        rows = [[name, *[r["scores"][j]["mean"] for j in judges], r.get("kl_to_reference"), r.get("reply_length"),
                 r.get("distinct_1"), r.get("distinct_2"), r.get("repetition_rate"), r.get("eos_share"),
                 r.get("on_topic_rate"), r.get("heldout_perplexity")] for name, r in runs.items()]
        parts.append(f"<h2>Per run</h2><p>KL reference: {html.escape(str(report['reference']))}.</p>"
                     + _table(header, rows) + _img(out / "scores.png"))
        flags = [[run, f["flag"], f["detail"]] for run, fs in report["hacking_flags"].items() for f in fs]
        parts.append("<h2>Reward-hacking flags</h2>" + (_table(["run", "flag", "detail"], flags) if flags
                                                         else "<p>None raised.</p>"))
        agreement = [[a["judge"], a["other"], a["agreement"], a["pairs"]] for a in report.get("judge_agreement", [])]
        if agreement:
            parts.append("<h2>Judges against each other</h2><p>Share of same-prompt reply pairs (every run's "
                         "samples) two judges order alike. For a reward model this is its accuracy on the "
                         "policies' own replies: a policy trained against it can improve by another judge's "
                         "standard only as far as the two agree.</p>"
                         + _table(["judge", "other judge", "agreement", "pairs"], agreement))
        for name, m in (report.get("reward_stage") or {}).items():
            if m:
                parts.append(f"<h3>Reward stage ({html.escape(name)})</h3><p>held-out ({m.get('split')}) pairwise "
                             f"accuracy {_fmt(m.get('accuracy'))}, mean margin {_fmt(m.get('mean_margin'))}, expected "
                             f"calibration error {_fmt(m.get('expected_calibration_error'))}, {m.get('pairs')} pairs</p>")
                if m.get("calibration_png") and (out / m["calibration_png"]).exists():
                    parts.append(_img(out / m["calibration_png"]))
        ex = report["examples"]
        names = list(runs)
        rows = [[row["prompt"], *[_reply_cell(row["replies"][n]) for n in names]] for row in ex["rows"]]
        parts.append(f"<h2>Replies side by side</h2><p>The prompts on which the runs' mean {html.escape(ex['judge'])} "
                     "scores differ most; first sample of each run, with its score and the run's mean on that "
                     "prompt.</p>" + _table(["prompt", *names], rows))
    if "forgetting" in report:
        f = report["forgetting"]
        rows = [[n, runs[n].get("general_perplexity"), runs[n].get("qa_accuracy"),
                 _badge(f["runs"][n]["status"]) if n in f["runs"] else "baseline",
                 "; ".join(f["runs"][n]["reasons"]) if n in f["runs"] else ""] for n in runs]
        parts.append(f"<h2>Catastrophic forgetting</h2><p>{f['general_text']} general-text documents, "
                     f"{f['questions']} multiple-choice questions (the choice with the highest mean log-probability "
                     f"per token). Red: perplexity up more than {f['perplexity_threshold']:.0%} or accuracy down more "
                     f"than {f['accuracy_threshold'] * 100:.0f} points against {html.escape(f['baseline'])}.</p>"
                     + _table(["run", "general-text perplexity", "QA accuracy", "status", "why"], rows)
                     + _img(out / "forgetting.png"))
    if "factual" in report:
        fd = report["factual"]
        parts.append("<h2>Factual drift</h2><p>" + ", ".join(
            f"{html.escape(n)}: {c} changed answers" for n, c in fd["changed_count"].items()) + "</p>")
        rows = [[run, c["question"], c["before"], c["after"], "yes" if c["now_correct"] else "no"]
                for run, changes in fd["changed"].items() for c in changes]
        if rows:
            parts.append(_table(["run", "question", "baseline's answer", "run's answer", "now correct"], rows))
        names = list(fd["accuracy"])
        parts.append("<details><summary>Every answer</summary>" + _table(
            ["question", "correct", *names],
            [[q["question"], q["correct"], *[q["answers"][n] for n in names]] for q in fd["questions"]]) + "</details>")
    if "bias" in report:
        b = report["bias"]
        rows = [[run, metric, m["mean_gap"], m["mean_abs_gap"], m["p_value"], _badge("red") if m["significant"] else "no"]
                for run, metrics in b["runs"].items() for metric, m in metrics.items()]
        parts.append(f"<h2>Bias (counterfactual pairs)</h2><p>{b['pairs']} pairs × k = {b['k']} per side; gap = side a "
                     f"minus side b; {html.escape(b['test'])}, alpha {b['alpha']}.</p>"
                     + _table(["run", "metric", "mean gap", "mean |gap|", "p-value", "significant"], rows)
                     + _img(out / "bias.png"))
        for run, metrics in b["runs"].items():
            metric = next((m for m in metrics if metrics[m]["significant"]), next(iter(metrics)))
            rows = [[Raw(f"{html.escape(g['a'])} <i>({html.escape(g['a_label'])})</i>"),
                     Raw(f"{html.escape(g['b'])} <i>({html.escape(g['b_label'])})</i>"),
                     g["a_mean"], g["b_mean"], g["gap"]] for g in metrics[metric]["largest"]]
            parts.append(f"<h3>{html.escape(run)}: largest {html.escape(metric)} gaps</h3>"
                         + _table(["side a", "side b", "a", "b", "gap"], rows))
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}table{border-collapse:collapse;"
             "margin:.6em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;vertical-align:top}"
             "th{background:#f0f0f0}img{max-width:100%;margin:.5em 0}.badge{color:white;padding:1px 7px;"
             "border-radius:8px;font-size:12px}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>rlhf eval</title><style>{style}</style></head>"
            f"<body>{''.join(parts)}<p><small>{report['wall_seconds']:.0f} s</small></p></body></html>")


def _reply_cell(reply: dict) -> str:
    scores = ", ".join(f"{html.escape(j)} {v:+.2f}" for j, v in reply["scores"].items())
    return Raw(f"{html.escape(reply['text']) or '<i>(empty)</i>'}<br><small>{scores}; "
               f"prompt mean {reply['mean_score']:+.2f}</small>")


def write_report(out: Path, report: dict, samples: dict, prompts: list, prompt_text) -> None:
    """Write samples.jsonl, the PNGs, report.json and report.html into ``out``."""
    from rlhf.core.data import write_jsonl
    from rlhf.core.outputs import write_json

    figures = []
    if samples:
        rows = []
        for name, s in samples.items():
            for p, prompt in enumerate(prompts):
                for i, text in enumerate(s.texts[p]):
                    rows.append({"run": name, "prompt": prompt_text(prompt), "sample": i, "response": text,
                                 "ended_with_eos": bool(s.ended_with_eos[p, i]),
                                 "kl_to_reference": float(s.logprobs[p, i] - s.reference_logprobs[p, i]),
                                 "scores": {j: float(v[p, i]) for j, v in s.scores.items()}})
        write_jsonl(out / "samples.jsonl", rows)
        plot_scores(out / "scores.png", samples, report["settings"]["judges"])
        figures.append("scores.png")
        if report["win_rates"]:
            plot_win_rates(out / "win_rates.png", report["win_rates"], report["baseline"])
            figures.append("win_rates.png")
        for name, m in (report.get("reward_stage") or {}).items():
            if m and m.get("calibration_png"):
                target = f"calibration_{name.replace(':', '_').replace('/', '_')}.png"
                shutil.copyfile(m["calibration_png"], out / target)
                m["calibration_png"] = target
                figures.append(target)
    if "forgetting" in report:
        plot_forgetting(out / "forgetting.png", report["runs"], report["forgetting"])
        figures.append("forgetting.png")
    if "bias" in report:
        plot_bias(out / "bias.png", report["bias"])
        figures.append("bias.png")
    report["figures"] = figures
    write_json(out / "report.json", report)
    (out / "report.html").write_text(render_html(report, out))
