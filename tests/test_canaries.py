"""Canaries: planting them in a data copy, exposure arithmetic, and a planted canary found after training.

End to end on the tiny random Llama: ``rlhf data scan --canaries 1`` plants one canary 8 times among 20
rows; a full fine-tune of 60 steps on the copy reproduces it greedily and ranks it above all 200
random candidates, while the untrained model does neither and the unseen control canaries stay near
the ~1.4 bits a never-seen canary scores. The tiny tokenizer knows only tiny_model.WORDS (no digits),
so the canary is made of its words.

Every model here runs on one thread (see tests/test_evaluate.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from rlhf.eval.canaries import CanaryFormat, exposure_extrapolated, exposure_from_rank, plant_canaries, sidecar_path
from rlhf.app.cli import main
from rlhf.core.data import load_rows, read_records, write_jsonl
from rlhf.core.errors import UserError

REPO = Path(__file__).resolve().parents[1]
THINGS = ["tea", "pizza", "city", "river", "book", "movie", "garden", "coffee", "bread", "beach"]
WORD_FORMAT = "the thing i love is {} {} {} {} {} {}"
WORD_ALPHABET = "coffee,tea,pizza,bread,cheese,apple,mango,pasta,soup,salad"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def sft_rows() -> list[dict]:
    return [{"prompt": f"write a short review of the {w}", "completion": f"the {w} is good ."} for w in THINGS * 2]


# -- exposure arithmetic --------------------------------------------------------------------------


def test_exposure_from_rank_by_hand():
    candidates = np.array([-1.0, -2.0, -3.0, -4.0])  # R = 4 candidates' log-likelihoods: log2(R + 1) = log2 5
    # More likely than all: rank 1, exposure log2(5) - log2(1).
    assert exposure_from_rank(-0.5, candidates) == (pytest.approx(math.log2(5)), 1.0)
    # Two candidates (-1, -2) more likely: rank 3, exposure log2(5 / 3).
    assert exposure_from_rank(-2.5, candidates) == (pytest.approx(math.log2(5 / 3)), 3.0)
    # A tie counts half: -1 more likely, -2 tied -> rank 2.5.
    assert exposure_from_rank(-2.0, candidates)[1] == 2.5
    # Less likely than all: rank 5 = R + 1, exposure 0.
    assert exposure_from_rank(-9.0, candidates) == (0.0, 5.0)


def test_a_random_canary_scores_about_one_over_ln2_bits_and_extrapolation_goes_past_the_ceiling():
    rng = np.random.default_rng(0)
    # A never-seen canary is one more draw from the candidates' distribution: its rank is uniform and
    # -log2 of a uniform share has mean 1 / ln 2 = 1.44 bits.
    exposures = [exposure_from_rank(rng.normal(), rng.normal(size=200))[0] for _ in range(2000)]
    assert np.mean(exposures) == pytest.approx(1 / math.log(2), abs=0.1)
    candidates = rng.normal(-30.0, 2.0, size=500)  # log-likelihoods of R = 500 candidates
    # 6 sd above the mean: beyond every candidate, so the rank estimate is capped at log2(501) ~ 8.97 bits;
    # the fitted (near-normal) tail puts it at -log2 Phi(-6) ~ 30 bits, clipped to the 20-bit space.
    assert exposure_from_rank(-18.0, candidates)[0] == pytest.approx(math.log2(501))
    assert exposure_extrapolated(-18.0, candidates, space_log2=40.0) == pytest.approx(-math.log2(9.87e-10), abs=2.0)
    assert exposure_extrapolated(-18.0, candidates, space_log2=20.0) == 20.0
    assert exposure_extrapolated(-30.0, candidates, space_log2=20.0) == pytest.approx(1.0, abs=0.3)  # the median


# -- planting -------------------------------------------------------------------------------------


def test_format_and_alphabet():
    fmt = CanaryFormat("my secret code is {}{}{}{}-{}{}{}{}-{}{}{}{}", "0123456789")
    assert fmt.slots == 12 and fmt.space_log2 == pytest.approx(12 * math.log2(10))
    assert fmt.render([4, 8, 2, 9, 1, 7, 3, 3, 0, 0, 5, 1]) == "my secret code is 4829-1733-0051"
    assert fmt.prefix == "my secret code is "
    words = CanaryFormat(WORD_FORMAT, WORD_ALPHABET)
    assert words.alphabet[:2] == ["coffee", "tea"] and words.render([0, 1, 2, 3, 4, 5]).endswith("coffee tea pizza bread cheese apple")
    with pytest.raises(UserError, match="at least one {} slot"):
        CanaryFormat("no slots here", "01")
    with pytest.raises(UserError, match="at least 2 distinct"):
        CanaryFormat("code {}", "a,a")
    with pytest.raises(UserError, match="words before the first"):
        CanaryFormat("{}{}", "01")


def test_planted_rows_follow_the_file_layout_and_the_sidecar_records_them():
    fmt = CanaryFormat(WORD_FORMAT, WORD_ALPHABET)
    rows = sft_rows()
    new, sidecar = plant_canaries(rows, 3, fmt, seed=1, repeats=2, unseen=4)
    assert rows == sft_rows()  # the input is not modified
    assert len(new) == len(rows) + 3 * 2
    planted = [c for c in sidecar["canaries"] if c["planted"]]
    unseen = [c for c in sidecar["canaries"] if not c["planted"]]
    assert len(planted) == 3 and len(unseen) == 4
    assert len({c["text"] for c in sidecar["canaries"]}) == 7  # all distinct
    texts = [r["completion"] for r in new]
    for c in planted:
        assert len(c["rows"]) == 2 and all(new[n - 1]["completion"] == c["text"] for n in c["rows"])
        assert c["prompt"] in {r["prompt"] for r in rows}  # a training row's prompt
        assert all(w in fmt.alphabet for w in c["secret"]) and fmt.render([fmt.alphabet.index(w) for w in c["secret"]]) == c["text"]
    for c in unseen:
        assert c["text"] not in texts and c["rows"] == [] and c["repeats"] == 0
    # Seeded: the same seed plants the same canaries in the same places.
    assert plant_canaries(rows, 3, fmt, seed=1, repeats=2, unseen=4) == (new, sidecar)
    assert plant_canaries(rows, 3, fmt, seed=2, repeats=2, unseen=4)[1] != sidecar
    # Chat rows get a chat row (the prompt's messages + the canary as the assistant's reply); text rows a text row.
    chat = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
            for r in rows]
    new_chat, side_chat = plant_canaries(chat, 1, fmt)
    row = new_chat[side_chat["canaries"][0]["rows"][0] - 1]
    assert row["messages"][-1] == {"role": "assistant", "content": side_chat["canaries"][0]["text"]}
    assert row["messages"][:-1] == side_chat["canaries"][0]["prompt"]
    new_text, side_text = plant_canaries([{"text": r["completion"]} for r in rows], 1, fmt)
    assert new_text[side_text["canaries"][0]["rows"][0] - 1] == {"text": side_text["canaries"][0]["text"]}
    assert side_text["canaries"][0]["prompt"] == ""


def test_data_scan_canaries_writes_a_copy_and_a_sidecar(tmp_path, capsys):
    src = tmp_path / "train.jsonl"
    write_jsonl(src, sft_rows())
    before = src.read_bytes()
    copy = tmp_path / "train.canary.csv"
    assert main(["data", "scan", str(src), "--canaries", "2", "--canary_repeats", "3", "--canary_format", WORD_FORMAT,
                 "--canary_alphabet", WORD_ALPHABET, "--out", str(copy)]) == 0
    assert "planted 2 canaries x 3 rows" in capsys.readouterr().out
    assert src.read_bytes() == before  # the original is never touched
    side = json.loads(sidecar_path(copy).read_text())
    assert sidecar_path(copy).name == "train.canary.canaries.json" and side["data"] == str(copy)
    rows = load_rows(copy, "sft")  # the copy loads as SFT data, in the format its suffix names
    assert len(rows) == 20 + 6 and len(read_records(copy)) == 26
    for c in side["canaries"][:2]:
        assert [rows[n - 1]["completion"] for n in c["rows"]] == [c["text"]] * 3
    assert main(["data", "scan", str(src), "--canaries", "2"]) == 2  # no --out
    assert "--canaries: expected --out" in capsys.readouterr().err
    assert main(["data", "scan", str(src), "--canaries", "1", "--canary_format", "no slot", "--out",
                 str(tmp_path / "x.jsonl")]) == 2
    assert main(["eval", "canaries", "--runs", "x", "--canaries", str(tmp_path / "missing.json"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "no such file" in capsys.readouterr().err


# -- end to end: plant, train, measure -------------------------------------------------------------


@pytest.mark.slow
def test_a_planted_canary_is_found_after_training_and_not_before(tiny_model_dir, tmp_path, capsys):
    from sft.train import run as sft_run

    src, copy = tmp_path / "train.jsonl", tmp_path / "train.canary.jsonl"
    write_jsonl(src, sft_rows())
    assert main(["data", "scan", str(src), "--canaries", "1", "--canary_unseen", "4", "--canary_repeats", "8",
                 "--canary_format", WORD_FORMAT, "--canary_alphabet", WORD_ALPHABET, "--out", str(copy)]) == 0
    # Trained hard (full fine-tuning, lr 1e-2, 60 steps of 4 rows: 8 epochs) on the copy with the canary.
    sft_run(argv=["--config", str(REPO / "configs/tiny/sft.yaml"), "--model_name_or_path", str(tiny_model_dir),
                  "--train_file", str(copy), "--validation_file", "null", "--test_file", "null", "--validation_size", "0",
                  "--test_size", "0", "--peft_method", "full", "--learning_rate", "1e-2", "--max_steps", "60",
                  "--eval_steps", "1000", "--save_steps", "1000", "--logging_steps", "20", "--output_dir", str(tmp_path / "sft")])
    out = tmp_path / "eval"
    argv = ["eval", "canaries", "--runs", str(tiny_model_dir), str(tmp_path / "sft"), "--canaries",
            str(sidecar_path(copy)), "--out", str(out), "--candidates", "200"]
    assert main(argv + ["--strict"]) == 3  # the trained model reproduces a planted canary
    printed = capsys.readouterr().out
    assert "sft: planted exact match 1.00" in printed and "status red" in printed
    report = json.loads((out / "canaries.json").read_text())
    assert (out / "canaries.png").stat().st_size > 0
    base, trained = report["runs"]["model"], report["runs"]["sft"]
    ceiling = math.log2(201)
    assert report["max_possible_exposure"] == pytest.approx(ceiling)

    # Untrained: nothing reproduced, the canary no more exposed than chance.
    assert base["status"] == "green" and base["planted"]["exact_match_rate"] == 0.0
    assert base["unseen"]["exact_match_rate"] == 0.0 and base["planted"]["mean_exposure"] < 3.0
    # Trained: reproduced greedily, ranked above all 200 candidates, and extrapolated past the ceiling.
    (canary,) = [c for c in trained["canaries"] if c["planted"]]
    assert canary["exact_match"] and canary["rank"] == 1.0 and canary["exposure"] == pytest.approx(ceiling)
    assert canary["exposure_extrapolated"] > ceiling + 2
    assert canary["greedy"].startswith(" ".join(json.loads(sidecar_path(copy).read_text())["canaries"][0]["secret"]))
    assert trained["planted"]["mean_exposure"] > base["planted"]["mean_exposure"] + 4
    # Unseen canaries of the same format: not reproduced, exposure near the ~1.4 bits of chance.
    assert trained["unseen"]["canaries"] == 4 and trained["unseen"]["exact_match_rate"] == 0.0
    assert trained["unseen"]["mean_exposure"] < 3.0 and trained["unseen"]["max_exposure"] < ceiling - 2
