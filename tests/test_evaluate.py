"""rlhf eval: win-rate statistics, bootstrap coverage, and the report end to end on tiny models.

The runs compared are the tiny random Llama (``base``), a "sharpened" copy whose final norm is
scaled by 30 (logits x 30: it repeats one token and its perplexity explodes, a stand-in for a run
damaged by alignment), and a tiny LoRA SFT run on the base. A user judge that counts distinct words
prefers the base's varied replies to the sharpened copy's repeated token every time.

Every model here runs on one thread: the tiny matmuls gain nothing from two, and on a busy 2-core
machine two threads spin-wait each other into a 50x slowdown.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from rlhf.app.cli import main
from rlhf.eval.statistics import (bootstrap_ci, hacking_flags, judge_agreement, pairwise_outcomes, repetition_rate,
                                  win_rate_summary)

REPO = Path(__file__).resolve().parents[1]
THINGS = ["tea", "pizza", "city", "river", "book", "movie", "garden", "coffee", "bread", "beach"]
JUDGE_FILE = '''
def distinct_words(prompt: str, reply: str) -> float:
    return float(len(set(reply.split())))
'''


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# -- statistics -----------------------------------------------------------------------------------


def test_pairwise_outcomes_count_all_k_by_k_pairs():
    run = np.array([[1.0, 3.0], [2.0, 2.0]])   # (n=2 prompts, k=2)
    base = np.array([[2.0, 2.0], [2.0, 0.0]])
    out = pairwise_outcomes(run, base)
    # prompt 0: pairs (1,2) (1,2) (3,2) (3,2) -> 2 losses, 2 wins; prompt 1: (2,2) (2,0) (2,2) (2,0) -> 2 ties, 2 wins
    np.testing.assert_allclose(out["win"], [0.5, 0.5])
    np.testing.assert_allclose(out["tie"], [0.0, 0.5])
    np.testing.assert_allclose(out["loss"], [0.5, 0.0])
    np.testing.assert_allclose(out["rate"], [0.5, 0.75])
    # A run against itself: every pair (i, j) mirrored by (j, i), so exactly one half on every prompt.
    rng = np.random.default_rng(0)
    same = rng.normal(size=(20, 4))
    np.testing.assert_array_equal(pairwise_outcomes(same, same)["rate"], np.full(20, 0.5))
    # Tolerance turns near-equal scores into ties.
    assert pairwise_outcomes(np.array([[1.0]]), np.array([[1.0 + 1e-9]]), 1e-6)["tie"][0] == 1.0


def test_judge_agreement_counts_same_prompt_pairs_both_judges_order():
    def slow(a, b, tol):  # every pair of replies to one prompt, one at a time
        agree = pairs = 0
        for p in range(a.shape[0]):
            for i in range(a.shape[1]):
                for j in range(i + 1, a.shape[1]):
                    da, db = a[p, i] - a[p, j], b[p, i] - b[p, j]
                    if abs(da) > tol and abs(db) > tol:
                        pairs += 1
                        agree += (da > 0) == (db > 0)
        return agree / pairs, pairs

    rng = np.random.default_rng(3)
    a = rng.normal(size=(7, 5))
    b = a + rng.normal(scale=0.8, size=(7, 5))
    b[0, :2] = 1.0  # a tie for judge b: left out
    found = judge_agreement(a, b, 1e-9)
    expected = slow(a, b, 1e-9)
    assert found["agreement"] == pytest.approx(expected[0]) and found["pairs"] == expected[1] == 7 * 10 - 1
    assert judge_agreement(a, a)["agreement"] == 1.0 and judge_agreement(a, -a)["agreement"] == 0.0
    assert judge_agreement(np.ones((2, 3)), a[:2, :3]) == {"agreement": None, "pairs": 0}
    with pytest.raises(ValueError, match="one shape"):
        judge_agreement(a, a[:, :4])


def test_a_judge_that_prefers_one_run_gives_it_a_win_rate_near_one():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(32, 4))
    better = base.mean(axis=1, keepdims=True) + 5 + rng.normal(size=(32, 4))
    summary = win_rate_summary(better, base, n_boot=2000)
    assert summary["win_rate"] > 0.95 and summary["win_rate_ci"][0] > 0.5
    assert summary["prompt_win_rate"] == 1.0 and summary["prompts_won"] == 32
    assert summary["wins"] + summary["ties"] + summary["losses"] == pytest.approx(1.0)
    same = win_rate_summary(base, base, n_boot=2000)
    assert same["win_rate"] == 0.5 and same["win_rate_ci"] == (0.5, 0.5)  # 1/2 on every prompt: no spread


def test_bootstrap_interval_covers_the_true_mean_about_95_percent_of_the_time():
    """1,000 simulated datasets of 40 per-prompt win rates (Beta(2, 3): true mean 0.4, skewed, bounded
    like real ones): the 95 % percentile interval should contain 0.4 in about 95 % of them."""
    rng = np.random.default_rng(0)
    trials, n, true_mean = 1000, 40, 0.4
    covered = 0
    for t in range(trials):
        values = rng.beta(2, 3, size=n)
        lo, hi = bootstrap_ci(values, n_boot=1000, seed=t)
        covered += lo <= true_mean <= hi
    # Found: 0.938 (the percentile interval under-covers slightly at n = 40). Binomial(1000, 0.95) has
    # sd 0.7 %, so 0.92-0.97 holds it, while a 68 % interval or one that resamples replies instead of
    # prompts (4x the values) covers about 0.64 and fails.
    assert 0.92 <= covered / trials <= 0.97, covered / trials
    assert bootstrap_ci(np.full(10, 0.7), n_boot=100) == (pytest.approx(0.7), pytest.approx(0.7))


def test_repetition_and_hacking_flags():
    assert repetition_rate("great food great food great food") == pytest.approx(0.6)
    assert repetition_rate("a b c") == 0.0 and repetition_rate("one") == 0.0
    base = {"reply_length": 10.0, "repetition_rate": 0.0, "distinct_2": 0.8, "on_topic_rate": 0.9}
    run = {"reply_length": 20.0, "repetition_rate": 0.2, "distinct_2": 0.5, "on_topic_rate": 0.7,
           "kl_to_reference": 9.0}
    win = {"reward": {"win_rate": 0.8, "win_rate_ci": (0.7, 0.9)}, "lexicon": {"win_rate": 0.4, "win_rate_ci": (0.3, 0.5)}}
    flags = {f["flag"] for f in hacking_flags(run, base, win, ["reward"], ["lexicon"], kl_budget=6.0)}
    assert flags == {"reward_up_independent_down", "longer", "more_repetitive", "off_topic", "kl_over_budget"}
    assert hacking_flags(base | {"kl_to_reference": 1.0}, base, {"reward": win["lexicon"], "lexicon": win["reward"]},
                         ["reward"], ["lexicon"], kl_budget=6.0) == []


# -- end to end on tiny models --------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    from rlhf.core.data import write_jsonl
    from sft.train import run as sft_run

    root = tmp_path_factory.mktemp("eval")
    sharp = root / "sharp"
    shutil.copytree(tiny_model_dir, sharp)
    weights = load_file(sharp / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] * 30  # logits x 30: near-greedy, off its training
    save_file(weights, sharp / "model.safetensors", metadata={"format": "pt"})
    write_jsonl(root / "prompts.jsonl", [{"prompt": f"write a short review of the {w}"} for w in THINGS])
    write_jsonl(root / "sft.jsonl", [{"prompt": f"write a short review of the {w}", "completion": f"the {w} is good ."}
                                     for w in THINGS * 2])
    sft_run(argv=["--config", str(REPO / "configs/tiny/sft.yaml"), "--model_name_or_path", str(tiny_model_dir),
                  "--train_file", str(root / "sft.jsonl"), "--validation_file", "null", "--test_file", "null",
                  "--validation_size", "4", "--test_size", "0", "--max_steps", "2", "--eval_steps", "2",
                  "--output_dir", str(root / "sft")])
    (root / "my_judges.py").write_text(JUDGE_FILE)
    return {"root": root, "base": tiny_model_dir, "sharp": sharp, "sft": root / "sft", "prompts": root / "prompts.jsonl",
            "judge": root / "my_judges.py"}


@pytest.mark.slow
def test_report_win_rates_and_files(runs, tmp_path, capsys):
    out = tmp_path / "report"
    judge = f"{runs['judge']}:distinct_words"
    # sharp twice: the second copy is the first run against itself.
    argv = ["eval", "--runs", str(runs["sharp"]), str(runs["base"]), str(runs["sft"]), str(runs["sharp"]),
            "--prompts", str(runs["prompts"]), "--out", str(out), "--k", "3", "--max_new_tokens", "8",
            "--judges", f"{judge},annotator,lexicon", "--bootstrap", "2000", "--bias_k", "1",
            "--perplexity_file", str(REPO / "data/demo/sft_test.jsonl"), "--kl_budget", "1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "win rate" in printed and "report.html" in printed
    for name in ("report.html", "report.json", "samples.jsonl", "scores.png", "win_rates.png", "forgetting.png", "bias.png"):
        assert (out / name).stat().st_size > 0, name
    report = json.loads((out / "report.json").read_text())
    assert report["baseline"] == "sharp#0" and report["reference"] == "sharp#0"
    assert set(report["win_rates"]) == {"model", "sft", "sharp#3"}
    # The same run against itself: exactly one half for every judge, and all ties.
    for judge_name, w in report["win_rates"]["sharp#3"].items():
        assert w["win_rate"] == 0.5 and w["ties"] == 1.0, judge_name
    # The distinct-words judge prefers the base's varied replies to the sharpened copy's repeated token.
    preferred = report["win_rates"]["model"][judge]
    assert preferred["win_rate"] > 0.9 and preferred["win_rate_ci"][0] > 0.5, preferred
    # Per-run figures, KL (0 for the reference itself), flags, side-by-side table, risk sections.
    sharp, base = report["runs"]["sharp#0"], report["runs"]["model"]
    assert sharp["kl_to_reference"] == pytest.approx(0.0, abs=1e-3) and base["kl_to_reference"] > 1
    assert sharp["repetition_rate"] > 0.5 and base["distinct_2"] > sharp["distinct_2"]
    for key in ("reply_length", "distinct_1", "eos_share", "on_topic_rate", "heldout_perplexity", "general_perplexity",
                "qa_accuracy"):
        assert key in base, key
    assert "kl_over_budget" in {f["flag"] for f in report["hacking_flags"]["model"]}
    agreement = {(a["judge"], a["other"]): a for a in report["judge_agreement"]}
    assert set(agreement) == {(judge, "annotator"), (judge, "lexicon"), ("annotator", "lexicon")}
    assert all(a["pairs"] > 0 and 0.0 <= a["agreement"] <= 1.0 for a in agreement.values())
    assert "Judges against each other" in (out / "report.html").read_text()
    assert len(report["examples"]["rows"]) == 6 and set(report["examples"]["rows"][0]["replies"]) == set(report["runs"])
    assert report["forgetting"]["runs"]["model"]["status"] == "green"  # base is better than the sharpened baseline
    assert set(report["bias"]["runs"]["model"]) == {judge, "annotator", "lexicon", "sentiment", "reply_length"}
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 4 and "Win rates against the baseline" in html
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 4 * len(THINGS) * 3 and set(rows[0]["scores"]) == {judge, "annotator", "lexicon"}


@pytest.mark.slow
def test_forgetting_turns_red_when_perplexity_rises_and_factual_lists_changes(runs, tmp_path, capsys):
    out = tmp_path / "forgetting"
    argv = ["eval", "forgetting", "--runs", str(runs["base"]), str(runs["sharp"]), str(runs["base"]),
            "--out", str(out), "--strict"]
    assert main(argv) == 3  # --strict: red exits 3
    report = json.loads((out / "report.json").read_text())
    assert report["status"]["forgetting"] == "red" and report["status"]["overall"] == "red"
    damaged, same = report["forgetting"]["runs"]["sharp"], report["forgetting"]["runs"]["model#2"]
    assert damaged["status"] == "red" and damaged["perplexity_change"] > 0.10
    assert "general-text perplexity" in damaged["reasons"][0]
    assert same["status"] == "green" and same["perplexity_change"] == pytest.approx(0.0, abs=1e-6)
    assert (out / "forgetting.png").exists() and "Catastrophic forgetting" in (out / "report.html").read_text()
    capsys.readouterr()

    out = tmp_path / "factual"
    assert main(["eval", "factual", "--runs", str(runs["base"]), str(runs["sharp"]), "--out", str(out)]) == 0
    factual = json.loads((out / "report.json").read_text())["factual"]
    answers = {q["question"]: q["answers"] for q in factual["questions"]}
    changed = [q for q, a in answers.items() if a["model"] != a["sharp"]]
    assert [c["question"] for c in factual["changed"]["sharp"]] == changed
    assert factual["changed_count"]["sharp"] == len(changed) > 0
    assert len(factual["questions"]) == 40


PLANTED_JUDGE = '''
def prefers_she(prompt: str, reply: str) -> float:
    return 1.0 if " she " in f" {prompt.lower()} " else 0.0
'''


@pytest.mark.slow
def test_bias_check_detects_a_planted_bias(runs, tmp_path):
    from rlhf.core.data import write_jsonl

    (tmp_path / "planted.py").write_text(PLANTED_JUDGE)
    pairs = [{"a": f"she said : write a short review of the {w}", "b": f"he said : write a short review of the {w}",
              "attribute": "pronoun", "a_label": "she", "b_label": "he"} for w in THINGS + ["phone", "camera"]]
    write_jsonl(tmp_path / "pairs.jsonl", pairs)
    out = tmp_path / "bias"
    assert main(["eval", "bias", "--runs", str(runs["base"]), "--out", str(out), "--bias_pairs", str(tmp_path / "pairs.jsonl"),
                 "--judges", f"{tmp_path / 'planted.py'}:prefers_she,lexicon", "--bias_k", "2",
                 "--max_new_tokens", "6"]) == 0
    report = json.loads((out / "report.json").read_text())
    planted = report["bias"]["runs"]["model"][f"{tmp_path / 'planted.py'}:prefers_she"]
    assert planted["significant"] and planted["mean_gap"] == 1.0 and planted["p_value"] < 0.001
    assert planted["largest"][0]["a_label"] == "she"
    assert report["status"]["bias"] == "red"
    assert "Bias (counterfactual pairs)" in (out / "report.html").read_text()


@pytest.mark.slow
def test_bad_input_is_one_line(runs, tmp_path, capsys):
    assert main(["eval", "--runs", str(tmp_path / "nope"), "--prompts", str(runs["prompts"]), "--out", str(tmp_path)]) == 2
    assert "expected a stage output or model directory" in capsys.readouterr().err
    assert main(["eval", "--runs", str(runs["base"]), "--prompts", str(runs["prompts"]), "--out", str(tmp_path / "o"),
                 "--judges", "annotator,nomodule_xyz:f"]) == 2
    assert "expected an importable module 'nomodule_xyz'" in capsys.readouterr().err
    # The sampling settings are checked as every stage checks them, before any model is loaded.
    assert main(["eval", "--runs", str(runs["base"]), "--prompts", str(runs["prompts"]), "--out", str(tmp_path / "t"),
                 "--temperature", "0"]) == 2
    assert "temperature: expected a positive number" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


@pytest.mark.slow
def test_greedy_evaluation_gives_each_prompt_one_reply_k_times(runs, tmp_path):
    out = tmp_path / "greedy"
    assert main(["eval", "--runs", str(runs["base"]), str(runs["sft"]), "--prompts", str(runs["prompts"]),
                 "--out", str(out), "--k", "3", "--max_new_tokens", "6", "--judges", "annotator",
                 "--skip", "forgetting,factual,bias", "--bootstrap", "200", "--do_sample", "false"]) == 0
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    replies: dict = {}
    for row in rows:
        replies.setdefault((row["run"], json.dumps(row["prompt"])), set()).add(row["response"])
    assert len(replies) == 2 * len(THINGS) and all(len(r) == 1 for r in replies.values())
    assert json.loads((out / "report.json").read_text())["settings"]["sampling"]["do_sample"] is False


@pytest.mark.slow
def test_replies_are_sampled_generation_batch_size_at_a_time_and_scored_batch_size_at_a_time(runs, tmp_path,
                                                                                              monkeypatch):
    import rlhf.eval.evaluate as evaluate_module

    sampled, scored = [], []
    real_sample, real_logprobs = evaluate_module.sample_replies, evaluate_module.reply_logprobs

    def sample(model, tokenizer, prompts, sampling, k, batch_size, seed, desc=""):
        sampled.append(batch_size)
        return real_sample(model, tokenizer, prompts, sampling, k, batch_size, seed, desc)

    def logprobs(model, pad, sequences, temperature=1.0, batch_size=8, desc=None):
        scored.append((batch_size, desc))
        return real_logprobs(model, pad, sequences, temperature, batch_size, desc)

    monkeypatch.setattr(evaluate_module, "sample_replies", sample)
    monkeypatch.setattr(evaluate_module, "reply_logprobs", logprobs)
    out = tmp_path / "report"
    assert main(["eval", "--runs", str(runs["base"]), str(runs["sft"]), "--prompts", str(runs["prompts"]),
                 "--out", str(out), "--k", "3", "--max_new_tokens", "4", "--judges", "annotator",
                 "--skip", "forgetting,factual,bias", "--bootstrap", "200",
                 "--generation_batch_size", "5", "--batch_size", "3"]) == 0
    assert sampled == [5, 5] and scored and {size for size, _ in scored} == {3}
    # Each run's samples under itself, for the KL: the SFT run's only. The reference (the baseline,
    # base) needs no such pass: its KL to itself is 0 by definition.
    assert [desc for _, desc in scored if desc] == [f"logprobs {runs['sft'].name}"]
    report = json.loads((out / "report.json").read_text())
    assert report["runs"]["model"]["kl_to_reference"] == 0.0 and report["runs"]["sft"]["kl_to_reference"] != 0.0
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    prompts = len((runs["prompts"]).read_text().splitlines())
    assert len(rows) == 2 * 3 * prompts  # every prompt's k replies, for both runs, across partial batches
