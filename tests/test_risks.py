"""Risk checks of rlhf eval as pure functions: forgetting status, factual drift, bias gaps; the shipped files."""

from __future__ import annotations

import numpy as np
import pytest

from rlhf.core.errors import DataError
from rlhf.eval.risks import (BIAS_PAIRS, GENERAL_TEXT, QA_FILE, bias_gaps, factual_drift, forgetting_status, qa_answers,
                        read_bias_pairs, read_qa)


def test_forgetting_status_thresholds():
    before = {"general_perplexity": 20.0, "qa_accuracy": 0.6}
    assert forgetting_status(before, {"general_perplexity": 21.0, "qa_accuracy": 0.55})["status"] == "green"
    worse_ppl = forgetting_status(before, {"general_perplexity": 23.0, "qa_accuracy": 0.6})
    assert worse_ppl["status"] == "red" and worse_ppl["perplexity_change"] == pytest.approx(0.15)
    assert "+15.0%" in worse_ppl["reasons"][0]
    worse_acc = forgetting_status(before, {"general_perplexity": 20.0, "qa_accuracy": 0.45})
    assert worse_acc["status"] == "red" and worse_acc["accuracy_change"] == pytest.approx(-0.15)
    assert forgetting_status(before, {"general_perplexity": 23.0, "qa_accuracy": 0.6},
                             perplexity_threshold=0.2)["status"] == "green"
    assert forgetting_status(before, {"general_perplexity": float("inf")})["status"] == "red"


def test_factual_drift_lists_changed_answers():
    qa = [{"question": "q1", "choices": ["a", "b"], "answer": 0}, {"question": "q2", "choices": ["c", "d"], "answer": 1}]
    assert qa_answers([[-1.0, -2.0], [-3.0, -0.5]]) == [0, 1]
    drift = factual_drift(qa, {"base": [0, 0], "ppo": [0, 1]}, "base")
    assert drift["changed_count"] == {"ppo": 1}
    assert drift["changed"]["ppo"] == [{"question": "q2", "before": "c", "after": "d", "was_correct": False,
                                        "now_correct": True}]
    assert drift["questions"][1]["answers"] == {"base": "c", "ppo": "d"}


def test_bias_gaps_find_a_planted_gap_and_not_noise():
    rng = np.random.default_rng(0)
    pairs = [{"a": f"a{i}", "b": f"b{i}", "attribute": "x", "a_label": "A", "b_label": "B"} for i in range(20)]
    a, b = rng.normal(size=(20, 4)), rng.normal(size=(20, 4))
    null = bias_gaps(a, b, pairs, tests=3)
    assert not null["significant"] and null["p_value"] > 0.05
    planted = bias_gaps(a + 1.0, a, pairs, top=3)  # side a always 1 higher
    assert planted["significant"] and planted["mean_gap"] == pytest.approx(1.0) and planted["p_value"] < 1e-4
    assert len(planted["largest"]) == 3 and planted["largest"][0]["gap"] == pytest.approx(1.0)
    assert bias_gaps(a, a, pairs)["p_value"] == 1.0  # no gap at all
    with pytest.raises(ValueError, match="shape"):
        bias_gaps(a[:5], b[:5], pairs)


def test_shipped_files_load_and_bad_rows_name_file_and_line(tmp_path):
    from rlhf.core.data import load_rows

    qa = read_qa(QA_FILE)
    assert len(qa) >= 40 and all(0 <= q["answer"] < len(q["choices"]) for q in qa)
    pairs = read_bias_pairs(BIAS_PAIRS)
    assert len(pairs) >= 20 and all(p["a"] != p["b"] for p in pairs)
    assert len(load_rows(GENERAL_TEXT, "sft")) >= 20
    bad = tmp_path / "qa.jsonl"
    bad.write_text('{"question": "q", "choices": ["a", "b"], "answer": 0}\n{"question": "q", "choices": ["a"], "answer": 0}\n')
    with pytest.raises(DataError, match=r"qa.jsonl:2: field 'choices': expected a list of at least 2"):
        read_qa(bad)
    bad.write_text('{"question": "q", "choices": ["a", "b"], "answer": 2}\n')
    with pytest.raises(DataError, match=r"qa.jsonl:1: field 'answer': expected an index into choices \(0..1\), found 2"):
        read_qa(bad)
    pairs_file = tmp_path / "pairs.jsonl"
    pairs_file.write_text('{"a": "x", "b": "x"}\n{"a": "y", "b": "z"}\n')
    with pytest.raises(DataError, match=r"pairs.jsonl:1: field 'b': expected a prompt different from 'a'"):
        read_bias_pairs(pairs_file)
