"""experiments/reward_length.py's agreement by the annotator's gap, against counting pairs by hand."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from script_modules import script_module

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "reward_length.py"


@pytest.fixture(scope="module")
def reward_length():
    with script_module(SCRIPT, "reward_length") as module:
        yield module


def test_agreement_by_gap_bins_every_same_prompt_pair_by_the_annotators_gap(reward_length):
    # One prompt, three replies: annotator 0.0 / 0.1 / 1.6, so pairs (0,1) gap 0.1, (0,2) 1.6, (1,2) 1.5.
    annotator = np.array([[0.0, 0.1, 1.6]])
    reward = np.array([[0.5, 0.0, 1.0]])  # orders (0,1) the other way, (0,2) and (1,2) like the annotator
    lines = reward_length.agreement_by_gap(reward, annotator, noise=0.25)
    one_label = lambda gap: 1 / (1 + math.exp(-gap / 0.25))  # noqa: E731
    assert lines == [
        f"gap 0-0.25: 1 pairs, reward model 0.0%, one noisy label {one_label(0.1):.1%}",
        f"gap 1-inf: 2 pairs, reward model 100.0%, one noisy label {(one_label(1.6) + one_label(1.5)) / 2:.1%}",
    ]


def test_agreement_by_gap_leaves_out_pairs_either_scores_as_a_tie(reward_length):
    annotator = np.array([[0.0, 0.0, 0.7], [0.2, 0.9, 0.2]])
    reward = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 1.0]])
    # Counted: prompt 0 (0,2) and (1,2) gap 0.7, both agree; prompt 1 (0,2) is the annotator's tie,
    # (0,1) the reward model's; (1,2) gap 0.7, the reward model orders it the other way.
    lines = reward_length.agreement_by_gap(reward, annotator, noise=0.25)
    assert len(lines) == 1 and lines[0].startswith("gap 0.5-1: 3 pairs, reward model 66.7%")
