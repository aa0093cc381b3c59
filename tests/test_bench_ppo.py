"""bench/bench_ppo.py's rounds: the speed children take turns and their timed steps are pooled."""

from __future__ import annotations

from pathlib import Path

import pytest

from script_modules import script_module

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    with script_module(REPO / "bench" / "bench_ppo.py", "bench_ppo") as module:
        yield module


def test_speed_children_take_turns_in_alternating_order(bench):
    children = ["prepare", "sft", "ppo", "ppo_head", "rloo"]
    assert bench.run_plan(children, 1) == children
    assert bench.run_plan(children, 3) == ["prepare", "sft", "ppo", "ppo_head", "rloo", "rloo", "ppo_head", "ppo",
                                           "ppo", "ppo_head", "rloo"]
    assert bench.run_plan(["prepare", "rloo"], 2) == ["prepare", "rloo", "rloo"]


def test_rounds_pool_their_timed_steps(bench):
    def ppo_round(steps, generate, peak):
        return {"peak_rss_mb": peak, "step_seconds": bench.median(steps), "samples_per_second": 8 / bench.median(steps),
                "phase_seconds": {"generate": bench.median(generate)}, "rollout_tokens_per_second": 1.0,
                "reply_tokens": [len(steps)], "timed": {"step": steps, "generate": generate,
                                                        "rollout_tokens_per_second": [1.0] * len(steps)}}

    pooled = bench.pool_rounds([ppo_round([20.0, 30.0, 31.0], [9.0, 10.0, 11.0], 100.0),
                                ppo_round([21.0, 22.0, 23.0], [8.0, 8.5, 12.0], 120.0)], batch_size=8)
    # The median of the six steps, not the mean of the two rounds' medians (30 and 22: 26).
    assert pooled["step_seconds"] == pytest.approx(22.5)
    assert pooled["samples_per_second"] == pytest.approx(8 / 22.5)
    assert pooled["round_step_seconds"] == [30.0, 22.0]
    assert pooled["phase_seconds"] == {"generate": pytest.approx(9.5)}
    assert pooled["peak_rss_mb"] == 120.0
    assert pooled["reply_tokens"] == [3, 3]

    rloo = bench.pool_rounds([{"peak_rss_mb": 1.0, "step_seconds": 5.0, "samples_per_second": 1.6, "all_steps": [9.0, 5.0],
                               "completion_lengths": [4.0, 4.0], "timed": {"step": [5.0]}},
                              {"peak_rss_mb": 1.0, "step_seconds": 7.0, "samples_per_second": 8 / 7, "all_steps": [9.0, 7.0],
                               "completion_lengths": [3.0, 3.0], "timed": {"step": [7.0]}}], batch_size=8)
    assert rloo["step_seconds"] == pytest.approx(6.0) and rloo["all_steps"] == [9.0, 5.0, 9.0, 7.0]


def test_rounds_must_be_positive(bench):
    with pytest.raises(SystemExit):
        bench.parse_args(["--rounds", "0"])
