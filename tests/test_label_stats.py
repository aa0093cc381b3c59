"""`rlhf label stats`: agreement and position bias against values computed by hand."""

import json
import uuid

import pytest

from rlhf.label.cli import main
from rlhf.label.stats import (binomial_two_sided_p, campaign_stats, cohen_kappa, krippendorff_alpha_nominal,
                         majority, position_bias)
from rlhf.label.store import Campaign
from test_label_api import hand_out


def test_cohen_kappa_by_hand():
    x = ["a", "a", "b", "b", "tie", "a"]
    y = ["a", "b", "b", "b", "tie", "a"]
    # p_o = 5/6 (all but item 2). Marginals x: a 3, b 2, tie 1; y: a 2, b 3, tie 1.
    # p_e = (3*2 + 2*3 + 1*1) / 36 = 13/36; kappa = (30/36 - 13/36) / (1 - 13/36) = 17/23.
    assert cohen_kappa(x, y) == pytest.approx(17 / 23)
    assert cohen_kappa(x, x) == pytest.approx(1.0)
    # Systematic disagreement: p_o = 0, p_e = (1*1 + 1*1) / 4 = 1/2, kappa = -1.
    assert cohen_kappa(["a", "b"], ["b", "a"]) == pytest.approx(-1.0)
    assert cohen_kappa([], []) is None                 # nothing in common
    assert cohen_kappa(["a", "a"], ["a", "a"]) is None  # p_e = 1: undefined, not 1


def test_krippendorff_alpha_by_hand():
    # Units [a,a], [a,b], [b,b]. Coincidences (each ordered pair of a unit's 2 labels counts 1/(2-1)):
    # o_aa = 2, o_ab = o_ba = 1, o_bb = 2; n_a = n_b = 3, n = 6.
    # D_o = (1 + 1) / 6 = 1/3; D_e = (3*3 + 3*3) / (6*5) = 3/5; alpha = 1 - (1/3) / (3/5) = 4/9.
    assert krippendorff_alpha_nominal([["a", "a"], ["a", "b"], ["b", "b"]]) == pytest.approx(4 / 9)
    # Units with one label are not pairable and change nothing.
    assert krippendorff_alpha_nominal([["a", "a"], ["a", "b"], ["b", "b"], ["tie"]]) == pytest.approx(4 / 9)
    assert krippendorff_alpha_nominal([["a", "a"], ["b", "b"]]) == pytest.approx(1.0)
    assert krippendorff_alpha_nominal([["a", "a"], ["a", "a"]]) is None  # one category only: D_e = 0
    assert krippendorff_alpha_nominal([["a"]]) is None


def test_krippendorff_alpha_published_example():
    # Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", nominal example: 4 observers,
    # 12 units, missing values ("."); the paper reports alpha = 0.743.
    observers = ["1 2 3 3 2 1 4 1 2 . . .",
                 "1 2 3 3 2 2 4 1 2 5 . 3",
                 ". 3 3 3 2 3 4 2 2 5 1 .",
                 "1 2 3 3 2 4 4 1 2 5 1 ."]
    units = [[v for v in unit if v != "."] for unit in zip(*(o.split() for o in observers))]
    assert krippendorff_alpha_nominal(units) == pytest.approx(0.743, abs=5e-4)


def test_majority():
    assert majority(["a", "a", "b"]) == "a"
    assert majority(["tie", "tie", "a"]) == "tie"
    assert majority(["a", "b"]) is None
    assert majority(["a", "b", "tie", "tie", "a"]) is None
    assert majority([]) is None


def test_binomial_two_sided_p_by_hand():
    # 8 of 10 at p = 1/2: P(X >= 8) + P(X <= 2) = 2 * (45 + 10 + 1) / 1024.
    assert binomial_two_sided_p(8, 10) == pytest.approx(112 / 1024)
    assert binomial_two_sided_p(10, 10) == pytest.approx(2 / 1024)
    assert binomial_two_sided_p(5, 10) == pytest.approx(1.0)
    assert binomial_two_sided_p(0, 0) == 1.0


def test_position_bias_counts_decisive_labels_only():
    labels = [{"choice": "a", "left_side": "a"}, {"choice": "b", "left_side": "b"},
              {"choice": "b", "left_side": "a"}, {"choice": "tie", "left_side": "a"}]
    assert position_bias(labels) == {"decisive_labels": 3, "chose_left": 2, "left_rate": pytest.approx(2 / 3),
                                     "p_value": pytest.approx(1.0)}


def test_campaign_stats_and_png(tmp_path, capsys):
    campaign = Campaign.create_or_open(tmp_path / "c")
    campaign.add_responses([(f"f:{i}", f"p{i}", [f"x{i}", f"y{i}"], "test") for i in range(4)])
    campaign.set_k(2)
    ids = [p["pair_id"] for p in campaign.pairs()]
    # ann and bob label all 4 pairs (the same as x and y in the kappa-by-hand test's first 4 items).
    plan = {"ann": ["a", "a", "b", "b"], "bob": ["a", "b", "b", "b"], "cy": ["tie"]}
    for name, choices in plan.items():
        for pair_id, choice in zip(ids, choices):
            # Left side a for every label: a chosen = left chosen.
            hand_out(campaign, name, pair_id, "a")
            campaign.submit_label(str(uuid.uuid4()), name, pair_id, choice, "a", elapsed_ms=2000)
    hand_out(campaign, "cy", ids[1])
    campaign.submit_skip(str(uuid.uuid4()), "cy", ids[1])
    report = campaign_stats(campaign)
    assert report["labels"] == 9 and report["skips"] == 1
    assert report["progress"]["labeled"] == 8 and report["progress"]["target"] == 8
    assert report["annotators"]["cy"] == {"labels": 1, "skips": 1, "choices": {"a": 0, "b": 0, "tie": 1, "both_bad": 0},
                                          "median_seconds": 2.0, "left_rate": None}
    # ann/bob: p_o = 3/4; marginals ann a2 b2, bob a1 b3; p_e = (2*1 + 2*3)/16 = 1/2; kappa = 1/2.
    kappas = {tuple(k["annotators"]): k for k in report["cohen_kappa"]}
    assert kappas["ann", "bob"]["kappa"] == pytest.approx(0.5) and kappas["ann", "bob"]["pairs"] == 4
    assert kappas["ann", "cy"]["pairs"] == 1 and kappas["bob", "cy"]["pairs"] == 1
    # Decisive labels 8, left (= a) chosen 3 times.
    assert report["position_bias"]["chose_left"] == 3 and report["position_bias"]["decisive_labels"] == 8
    assert report["krippendorff_alpha"] is not None

    png = tmp_path / "stats.png"
    assert main(["stats", str(campaign.path), "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "ann / bob: 0.5 on 4 pairs" in out and "Krippendorff's alpha" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["stats", str(campaign.path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["labels"] == 9
    assert (campaign.path / "stats.png").exists()
