"""rlhf monitor: a drifted window trips it (exit 3), another sample of the same distribution does not."""

from __future__ import annotations

import itertools
import json
import random

import pytest

from rlhf.app.cli import main
from rlhf.core.data import write_jsonl
from rlhf.core.formatting import prompt_text
from rlhf.deploy.monitor import (
    Window,
    compare_rates,
    drift_report,
    fisher_exact_many,
    read_window,
    score_windows,
)

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


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory, tiny_model_dir):
    """A reward model: the tiny model with a random one-score head, and its tokenizer (with a chat template)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = tmp_path_factory.mktemp("reward") / "reward"
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    return path


def test_reward_model_scores_both_windows(tmp_path, reward_dir, one_thread):
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
    assert capsys.readouterr().err == "error: threshold: expected a p-value in (0, 1), found 2\n"


# ----------------------------------------------------------------------------------------------
# False alarms: windows drawn from one distribution, for four kinds of text
# ----------------------------------------------------------------------------------------------

LEXICON = [f"w{i}" for i in range(400)]
ZIPF = list(itertools.accumulate(1 / (i + 1) for i in range(len(LEXICON))))  # cumulative weights, as rng.choices takes
ADJECTIVES = ["good", "great", "lovely", "nice", "fine", "bad", "dull", "odd", "calm", "loud", "warm", "cold"]
SHORT = ["", "ok", "yes", "no", "sure", "thanks!", "fine.", "no idea", "ok ok", "yes, sure", "no no no",
         "I’m sorry, I can’t help"]


def reply_of_kind(kind: str, rng: random.Random) -> str:
    if kind == "varied":  # free text: Zipf-distributed words, 3 to 40 of them
        return " ".join(rng.choices(LEXICON, cum_weights=ZIPF, k=rng.randint(3, 40)))
    if kind == "templated":  # one template, a few slots
        subject = rng.choice(SUBJECTS)
        return (f"Here is my review of the {subject}. The {subject} is {rng.choice(ADJECTIVES)} and "
                f"{rng.choice(ADJECTIVES)}, and I would {rng.choice(['recommend', 'avoid', 'revisit'])} it.")
    if kind == "repetitive":  # a degenerate policy: one word, said 1 to 60 times
        return " ".join([rng.choice(ADJECTIVES)] * rng.randint(1, 60))
    return rng.choice(SHORT)  # very short: 0 to 3 words, some empty, some refusals


def same_distribution_pair(kind: str, seed: int, n: int = 150) -> tuple[Window, Window]:
    """Two windows of ``n`` rows each, every row an independent draw from one distribution."""
    rng = random.Random(seed)

    def row() -> tuple:
        subject = rng.choice(SUBJECTS)
        prompt = (rng.choice(["hi", subject, f"{subject}?"]) if kind == "short"
                  else f"tell me about the {subject}" + " please" * rng.randint(0, 3))
        if rng.random() < 0.3:  # a multi-turn chat prompt
            prompt = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
                      {"role": "assistant", "content": "hi"}, {"role": "user", "content": prompt}]
        return prompt, reply_of_kind(kind, rng), rng.gauss(0.0, 1.0)

    def window(name: str) -> Window:
        prompts, replies, scores = zip(*(row() for _ in range(n)))
        return Window(name, [prompt_text(p) for p in prompts], list(replies), list(scores), list(prompts))

    return window("reference"), window("current")


PAIRS = 200
# If the monitor keeps its promise, the number of the PAIRS same-distribution checks that alarm is at
# most Binomial(200, threshold = 0.01): 2 expected, more than 8 with probability 0.02 %
# (scipy.stats.binom.sf(8, 200, 0.01)), so a pass is no accident of the seeds and a failure no bad
# luck. Likewise each single test, a valid p-value being below 0.05 in at most Binomial(200, 0.05)
# pairs: more than 21 with probability 0.05 % (binom.sf(21, 200, 0.05)); this looks at each test
# with far more draws than its rare alarms give. The word-count chi-square this replaced alarmed on
# 200 of 200 repetitive pairs and had p < 0.05 on 28 of 200 very short ones; the reply-level tests
# alarm on 0-1 of 200 of each kind, with p < 0.05 at most 11 times.
MAX_ALARMS, MAX_BELOW_005 = 8, 21


@pytest.mark.parametrize("kind", ["varied", "templated", "repetitive", "short"])
def test_false_alarm_rate_on_same_distribution_windows_is_at_most_the_threshold(kind):
    """Every test at once (min_effect 0: the p-values alone), as ``rlhf monitor`` runs them."""
    alarms, below = 0, dict.fromkeys(["reward_score", "reply_length", "prompt_length", "empty_rate", "refusal_rate",
                                      "reply_vocabulary", "prompt_vocabulary"], 0)
    for seed in range(PAIRS):
        report = drift_report(*same_distribution_pair(kind, seed), threshold=0.01, min_effect=0.0)
        alarms += report["status"] == "drift"
        for name, m in report["metrics"].items():
            below[name] += m["p_value"] < 0.05
    assert alarms <= MAX_ALARMS, (alarms, below)
    assert max(below.values()) <= MAX_BELOW_005, below


def test_fisher_exact_many_is_scipys_fisher_exact_table_by_table():
    from scipy.stats import fisher_exact

    rng = random.Random(0)
    for n_ref, n_cur in [(5, 7), (40, 25), (300, 300), (2, 2000)]:
        k_ref = [0, n_ref, 0] + [rng.randint(0, n_ref) for _ in range(20)]
        k_cur = [0, n_cur, n_cur] + [rng.randint(0, n_cur) for _ in range(20)]
        p = fisher_exact_many(k_ref, n_ref, k_cur, n_cur)
        for j, (a, c) in enumerate(zip(k_ref, k_cur)):
            expected = fisher_exact([[a, n_ref - a], [c, n_cur - c]]).pvalue
            assert p[j] == pytest.approx(expected, rel=1e-6, abs=1e-300), (n_ref, n_cur, a, c)


def test_vocabulary_counts_a_word_once_per_reply():
    """The same share of replies says "great" in both windows, only more often per reply in one: not vocabulary drift."""
    reference = Window("r", ["p"] * 100, ["great " * 40] * 50 + ["fine"] * 50, None)
    current = Window("c", ["p"] * 100, ["great"] * 50 + ["fine"] * 50, None)
    vocabulary = drift_report(reference, current, min_effect=0.0)["metrics"]["reply_vocabulary"]
    assert vocabulary["p_value"] == 1.0 and not vocabulary["drifted"]


# ----------------------------------------------------------------------------------------------
# Refusals and reward-model scoring
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("apostrophe", ["'", "\u2019", "\u2018", "\u02bc"])
def test_refusals_with_typographic_apostrophes_count(apostrophe):
    reference = Window("r", ["p"] * 40, ["the tea is good"] * 40, None)
    current = Window("c", ["p"] * 40, [f"I{apostrophe}m sorry, I can{apostrophe}t help with that."] * 20
                     + [f"Sadly I can{apostrophe}t."] * 20, None)
    report = drift_report(reference, current)
    assert report["metrics"]["refusal_rate"]["current"]["count"] == 40
    assert "refusal_rate" in report["drifted"]
    # A user's own pattern, written with the ASCII apostrophe, reads the typographic ones too.
    own = drift_report(reference, current, refusal_pattern=r"\bcan't\b")
    assert own["metrics"]["refusal_rate"]["current"]["count"] == 40


CHAT_PROMPTS = [
    [{"role": "system", "content": "you are a short reviewer"}, {"role": "user", "content": "describe the tea"},
     {"role": "assistant", "content": "the tea is good"}, {"role": "user", "content": "and the coffee ?"}],
    [{"role": "user", "content": "write a short review of the park"}],
    "give your opinion of the movie",
    [{"role": "user", "content": "do you like pizza ?"}, {"role": "assistant", "content": "i like pizza"},
     {"role": "user", "content": "why ?"}],
]


def test_reward_model_scores_chat_prompts_as_in_reward_training(tmp_path, reward_dir, one_thread):
    """Each (prompt, reply) is scored as reward/train.py tokenizes a pair: multi-turn chat prompts
    through the chat template turn by turn, not joined into one user turn."""
    import torch

    from reward.train import tokenize_pairs
    from rlhf.core.runs import load_run

    rows = [{"prompt": CHAT_PROMPTS[i % 4], "response": f"the {s} is good" if i % 3 else "", "score": 0.0}
            for i, s in enumerate(SUBJECTS)]
    reference = read_window_rows(tmp_path / "r.jsonl", rows)
    current = read_window_rows(tmp_path / "c.jsonl", rows[::-1])
    scores = score_windows(str(reward_dir), reference, current, batch_size=5)

    model, tokenizer = load_run(str(reward_dir), "seq-cls")

    def trained_layout(window_rows: list[dict], flatten: bool = False) -> list[float]:
        pairs = [{"prompt": prompt_text(r["prompt"]) if flatten else r["prompt"], "chosen": r["response"],
                  "rejected": "x"} for r in window_rows]
        with torch.no_grad():  # one sequence at a time: no padding at all
            return [model(input_ids=torch.tensor([ids])).logits[0, 0].item()
                    for ids in tokenize_pairs(tokenizer, pairs)["chosen_ids"]]

    for got, window_rows in zip(scores, (rows, rows[::-1])):
        assert got == pytest.approx(trained_layout(window_rows), abs=1e-4)
        # The check can tell: a joined prompt (one user turn) scores differently.
        assert got != pytest.approx(trained_layout(window_rows, flatten=True), abs=1e-4)


def test_chat_prompt_messages_are_checked_as_the_data_loader_checks_them(tmp_path, capsys):
    rows = make_window(0, n=5)
    rows[2]["prompt"] = [{"role": "user", "content": "hi"}, {"content": "no role"}]
    args = _files(tmp_path, make_window(0, n=5), rows)
    assert main(["monitor", *args]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'cur.jsonl'}:3: field 'prompt[1]': expected a message")


# ----------------------------------------------------------------------------------------------
# The command line: one dialect with the stages (--key value, --config file.yaml, --help)
# ----------------------------------------------------------------------------------------------


def test_options_come_from_a_yaml_config_and_the_command_line(tmp_path, capsys):
    args = _files(tmp_path, make_window(0), make_window(1, refusals=0.25))
    config = tmp_path / "monitor.yaml"
    config.write_text(f"reference: {args[1]}\ncurrent: {args[3]}\nthreshold: 0.05\nmin_effect: 0.1\n")
    assert main(["monitor", "--config", str(config)]) == 3
    assert main(["monitor", "--config", str(config), "--min_effect", "0.99"]) == 0  # the command line wins
    assert capsys.readouterr().out.strip().splitlines()[-1] == "ok: no drift past p < 0.05 (family-wise) and effect >= 0.99"


@pytest.mark.parametrize("argv, error", [
    (["--current", "c.jsonl"],
     ("error: reference: expected a log file of prompt/response rows (--reference FILE), found none\n")),
    (["--reference", "r.jsonl", "--current", "c.jsonl", "--treshold", "0.1"],
     "error: command line: unknown key 'treshold'; did you mean threshold?\n"),
    (["--reference", "r.jsonl", "--current", "c.jsonl", "--top_k", "0"],
     "error: top_k: expected at least 1 word to compare, found 0\n"),
    (["--reference", "r.jsonl", "--current", "c.jsonl", "--refusal_regex", "(sorry"],
     ("error: refusal_regex: expected a regular expression, found '(sorry' (missing ), unterminated subpattern "
      "at position 0)\n")),
])
def test_bad_options_are_one_line_errors_before_any_file_is_read(argv, error, capsys):
    assert main(["monitor", *argv]) == 2
    assert capsys.readouterr().err == error


def test_help_lists_every_option_with_its_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["monitor", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for key in ("reference", "current", "reward_model", "threshold", "min_effect", "top_k", "refusal_regex", "out",
                "batch_size"):
        assert f"--{key} (" in out
    assert "Family-wise false-alarm probability" in out
