"""experiments/ppo_levers.py's bookkeeping: run names per seed, the goal check, the table over evaluations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from script_modules import script_module

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "ppo_levers.py"


@pytest.fixture(scope="module")
def levers():
    with script_module(SCRIPT, "ppo_levers") as module:
        yield module


def run_figures(on_topic: float, distinct: float, kl: float) -> dict:
    return {"on_topic_rate": on_topic, "distinct_2": distinct, "kl_to_reference": kl, "reply_length": 10.0}


def win(rate: float, low: float) -> dict:
    return {"prompt_win_rate": rate, "prompt_win_rate_ci": [low, min(1.0, rate + 0.1)]}


def report(runs: dict[str, tuple[float, float, dict]], directory: str = "eval") -> dict:
    """A report.json as rlhf eval writes it: SFT plus ``runs`` {name: (lexicon rate, its CI low end, figures)}."""
    judges = ("lexicon", "annotator", "reward:runs/demo/reward")
    return {
        "baseline": "sft", "dir": directory,
        "settings": {"k": 4, "prompts": 60, "prompts_file": "data/demo/prompts_heldout.jsonl"},
        "runs": {"sft": run_figures(0.85, 0.726, 0.0), **{name: figures for name, (_, _, figures) in runs.items()}},
        "win_rates": {name: {j: win(rate, low) for j in judges} for name, (rate, low, _) in runs.items()},
        "judge_agreement": [{"judge": "reward:x", "other": "lexicon", "agreement": 0.6, "pairs": 100}],
    }


def test_run_name_is_bare_for_the_config_seed_and_suffixed_otherwise(levers):
    seed = levers.config_seed()
    assert levers.run_name("baseline", seed) == "baseline"
    assert levers.run_name("baseline", seed + 1) == f"baseline-s{seed + 1}"


@pytest.mark.parametrize("change, met", [
    ({}, True),
    ({"rate": 0.64}, False),                      # one seed under 65 % of prompts won
    ({"on_topic": 0.84}, False),                  # less on topic than SFT (85 %)
    ({"distinct": 0.9 * 0.726 - 0.001}, False),   # distinct-2 under 0.9 x SFT's
    ({"length": 6.9}, False),                     # replies under 0.7 x SFT's 10 words
    ({"length": 13.1}, False),                    # replies over 1.3 x SFT's 10 words
    ({"kl": 4.0}, False),                         # KL not below the target
])
def test_meets_goal_needs_every_part_of_the_per_run_goal(levers, change, met):
    values = {"rate": 0.65, "low": 0.5, "on_topic": 0.85, "distinct": 0.9 * 0.726, "kl": 3.9, "length": 10.0, **change}
    figures = {**run_figures(values["on_topic"], values["distinct"], values["kl"]), "reply_length": values["length"]}
    rep = report({"ppo": (values["rate"], values["low"], figures)})
    assert levers.meets_goal(rep, "ppo", kl_target=4.0) is met


@pytest.mark.parametrize("runs, met", [
    ([(0.80, 0.65, True), (0.75, 0.5, True), (0.70, 0.5, True)], True),
    ([(0.80, 0.65, True), (0.70, 0.5, True), (0.70, 0.5, True)], False),   # mean under 75 %
    ([(0.80, 0.60, True), (0.75, 0.5, True), (0.70, 0.5, True)], False),   # config seed's low end not above 60 %
    ([(0.90, 0.80, True), (0.90, 0.8, True), (0.64, 0.5, False)], False),  # one seed misses the per-run goal
])
def test_the_goal_over_seeds(levers, runs, met):
    assert levers.variant_meets_goal(runs) is met


def test_table_takes_each_run_from_the_evaluation_that_covered_it_and_averages_seeds(levers, tmp_path):
    seed = levers.config_seed()
    for name, wall in (("baseline", 100), (f"baseline-s{seed + 1}", 200)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps({"wall_seconds": wall}))
        (tmp_path / name / "config.yaml").write_text("kl_target: 4.0\n")
    first = report({"baseline": (0.40, 0.30, run_figures(0.80, 0.70, 2.0))}, "eval")
    second = report({f"baseline-s{seed + 1}": (0.90, 0.80, run_figures(0.90, 0.70, 3.0))}, "eval1")
    reports = {"baseline": first, f"baseline-s{seed + 1}": second}
    text = levers.table(reports, list(reports), ["baseline"], [seed, seed + 1], tmp_path)
    rows = {}
    for line in text.splitlines():  # the per-run table comes before the per-variant one
        if line.startswith("| baseline"):
            rows.setdefault(line.split(" | ")[0].strip("| "), line)
    assert "40% [30%, 50%]" in rows["baseline"] and rows["baseline"].endswith("| 100 | not met |")
    assert "90% [80%, 100%]" in rows[f"baseline-s{seed + 1}"] and rows[f"baseline-s{seed + 1}"].endswith("| 200 | met |")
    summary = next(line for line in text.splitlines() if line.startswith("| baseline | 65% |"))
    assert "40%, 90%" in summary and summary.endswith("| 2.50 | 1 of 2 | not met |")
    assert "- eval (1 runs)" in text and "- eval1 (1 runs)" in text
