"""rlhf monitor: a drifted window trips it (exit 3), another sample of the same distribution does not."""

from __future__ import annotations

import json
import random

import pytest

from rlhf.app.cli import main
from rlhf.core.data import write_jsonl
from rlhf.deploy.monitor import compare_rates, drift_report, read_window

SUBJECTS = ["tea", "coffee", "pizza", "bread", "river", "city", "park", "song", "movie", "garden", "camera", "book"]
GOOD = ["good", "great", "lovely", "nice", "fine", "really", "very", "enjoy", "like", "the", "it", "is", "and", "a"]
BAD = ["bad", "terrible", "awful", "boring", "dull", "poor", "hate", "not", "the", "it", "is", "and", "a", "too"]


def make_window(seed: int, n: int = 300, longer: bool = False, refusals: float = 0.03, empties: float = 0.02,
                vocabulary: list[str] = GOOD, prompt_words: int = 0, score_shift: float | None = None) -> list[dict]:
    """Logged rows of a synthetic deployment; each keyword argument moves one thing away from the reference."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        subject = rng.choice(SUBJECTS)
        prompt = f"write a short review of the {subject}" + " please" * (prompt_words + rng.randint(0, 3))
        u = rng.random()
        if u < empties:
            reply = ""
        elif u < empties + refusals:
            reply = rng.choice(["I'm sorry, I can't help with that.", "As an AI I cannot review the " + subject])
        else:
            length = rng.randint(15, 50) if longer else rng.randint(5, 25)
            reply = " ".join([f"the {subject}"] + rng.choices(vocabulary, k=length))
        row = {"prompt": prompt, "response": reply}
        if score_shift is not None:
            row["score"] = rng.gauss(score_shift, 1.0)
        rows.append(row)
    return rows


def _files(tmp_path, reference: list[dict], current: list[dict]):
    write_jsonl(tmp_path / "ref.jsonl", reference)
    write_jsonl(tmp_path / "cur.jsonl", current)
    return ["--reference", str(tmp_path / "ref.jsonl"), "--current", str(tmp_path / "cur.jsonl")]


@pytest.mark.parametrize("seed", range(1, 9))
def test_same_distribution_does_not_trip(seed, tmp_path, capsys):
    args = _files(tmp_path, make_window(0, score_shift=0.0), make_window(seed, score_shift=0.0))
    assert main(["monitor", *args, "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out/report.json").read_text())
    assert report["status"] == "ok" and report["drifted"] == []
    assert set(report["metrics"]) == {"reward_score", "reply_length", "prompt_length", "empty_rate", "refusal_rate",
                                      "reply_vocabulary", "prompt_vocabulary"}
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("ok: no drift")


def test_drifted_window_trips_with_exit_3_a_report_and_a_png(tmp_path, capsys):
    args = _files(tmp_path, make_window(0), make_window(1, longer=True, refusals=0.25, vocabulary=BAD))
    assert main(["monitor", *args, "--out", str(tmp_path / "out")]) == 3
    report = json.loads((tmp_path / "out/report.json").read_text())
    assert report["status"] == "drift"
    assert {"reply_length", "refusal_rate", "reply_vocabulary"} <= set(report["drifted"])
    assert not {"prompt_length", "prompt_vocabulary"} & set(report["drifted"])  # the prompts did not change
    assert "reward_score" not in report["metrics"]  # no reward model and no scores in the rows
    moved = {m["word"] for m in report["metrics"]["reply_vocabulary"]["moved"]}
    assert {"terrible", "awful"} & moved
    png = (tmp_path / "out/drift.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("DRIFT: ")


@pytest.mark.parametrize("change, metric", [
    ({"longer": True}, "reply_length"),
    ({"refusals": 0.3}, "refusal_rate"),
    ({"empties": 0.3}, "empty_rate"),
    ({"prompt_words": 6}, "prompt_length"),
    ({"vocabulary": BAD}, "reply_vocabulary"),
    ({"score_shift": 1.0}, "reward_score"),
])
def test_each_kind_of_drift_trips_its_own_test(change, metric, tmp_path):
    reference = read_window_rows(tmp_path / "r.jsonl", make_window(0, score_shift=0.0))
    current = read_window_rows(tmp_path / "c.jsonl", make_window(1, **{"score_shift": 0.0, **change}))
    assert metric in drift_report(reference, current)["drifted"]


def read_window_rows(path, rows):
    write_jsonl(path, rows)
    return read_window(path)


def test_min_effect_ignores_a_real_but_tiny_shift(tmp_path):
    """20,000 scores per window: a shift of 0.05 sd is significant, but too small to alert on by default."""
    rng = random.Random(0)
    ref = [{"prompt": "p", "response": "r", "score": rng.gauss(0, 1)} for _ in range(20_000)]
    cur = [{"prompt": "p", "response": "r", "score": rng.gauss(0.05, 1)} for _ in range(20_000)]
    args = _files(tmp_path, ref, cur)
    assert main(["monitor", *args]) == 0
    assert main(["monitor", *args, "--min_effect", "0"]) == 3  # p-value alone: the shift is real


def test_rates_use_fisher_when_counts_are_small_and_none_when_identical():
    assert compare_rates(0, 50, 0, 60)["p_value"] == 1.0
    small = compare_rates(1, 20, 6, 20)
    assert small["test"] == "fisher_exact" and 0 < small["p_value"] < 0.1
    assert compare_rates(30, 300, 90, 300)["test"] == "chi2_contingency"


def test_reward_model_scores_both_windows(tmp_path, tiny_model_dir):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    reward_dir = tmp_path / "reward"
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1).save_pretrained(reward_dir)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(reward_dir)
    args = _files(tmp_path, make_window(0, n=40), make_window(1, n=40))
    main(["monitor", *args, "--reward_model", str(reward_dir), "--out", str(tmp_path / "out")])
    reward = json.loads((tmp_path / "out/report.json").read_text())["metrics"]["reward_score"]
    assert reward["test"] == "ks_2samp" and reward["reference"]["std"] > 0 and reward["current"]["std"] > 0


def test_bad_rows_are_one_line_errors(tmp_path, capsys):
    rows = make_window(0, n=5)
    del rows[3]["response"]
    args = _files(tmp_path, make_window(0, n=5), rows)
    assert main(["monitor", *args]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {tmp_path / 'cur.jsonl'}:4: field 'response': expected a string, the logged reply "
                   "(may be empty), found missing\n")
    assert main(["monitor", *_files(tmp_path, make_window(0, n=5), make_window(1, n=5)), "--threshold", "2"]) == 2
    assert "--threshold: expected a p-value in (0, 1), found 2.0" in capsys.readouterr().err
