"""Bad input a user can cause: one line on stderr naming where, what was expected and what was found,
exit status 2, no traceback, and nothing written. Also the train/validation/test split."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from rlhf.cli import main
from rlhf.data import load_splits, split_rows, write_jsonl
from rlhf.errors import UserError

GOOD_SFT = {"prompt": "write a short review of the tea", "completion": "the tea is good ."}
GOOD_PREF = {"prompt": "write a short review of the tea", "chosen": "the tea is lovely .", "rejected": "the tea is awful ."}


def jsonl(*rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def run_cli(capsys, argv: list[str]) -> tuple[int, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.err


def assert_one_line_error(code: int, err: str, *parts: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    for part in parts:
        assert part in lines[0], (part, lines[0])
    return lines[0]


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not out.with_name(out.name + ".tmp").exists()


# (case id, file name, file content, stage, expected parts of the message)
DATA_CASES = [
    ("invalid-json", "train.jsonl", jsonl(GOOD_SFT, '{"prompt": "a", "completion": '), "sft",
     ["train.jsonl:2:", "expected a JSON object", "found invalid JSON"]),
    ("not-an-object", "train.jsonl", jsonl(GOOD_SFT, GOOD_SFT, "[1, 2]"), "sft",
     ["train.jsonl:3:", "expected a JSON object", "found a JSON list"]),
    ("missing-field", "train.jsonl", jsonl(GOOD_SFT, {"prompt": "hello"}), "sft",
     ["train.jsonl:2:", "field 'completion'", "expected a non-empty string", "found missing"]),
    ("wrong-type", "train.jsonl", jsonl({"prompt": 3, "completion": "x"}), "sft",
     ["train.jsonl:1:", "field 'prompt'", "expected a non-empty string or a list of chat messages", "found 3"]),
    ("empty-string", "train.jsonl", jsonl(GOOD_SFT, GOOD_SFT, {"prompt": "hi", "completion": "   "}), "sft",
     ["train.jsonl:3:", "field 'completion'", "expected a non-empty string", "found an empty string"]),
    ("bad-role", "train.jsonl",
     jsonl({"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]}), "sft",
     ["train.jsonl:1:", "field 'messages[1].role'", "expected one of system, user, assistant", "found 'robot'"]),
    ("last-not-assistant", "train.jsonl",
     jsonl(GOOD_SFT, {"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "yo"}]}),
     "sft", ["train.jsonl:2:", "field 'messages'", "expected the last message to be from the assistant",
             "found 'user'"]),
    ("chosen-equals-rejected", "prefs.jsonl",
     jsonl(GOOD_PREF, {"prompt": "hi", "chosen": "same answer", "rejected": "same answer"}), "reward",
     ["prefs.jsonl:2:", "field 'rejected'", "expected a reply different from 'chosen'", "found the same text"]),
    ("empty-file", "train.jsonl", "\n\n", "sft", ["train.jsonl:", "expected at least one row", "found an empty file"]),
    # a quoted cell spanning two lines: the bad row starts on line 4, counting the header as line 1
    ("csv-missing-value", "train.csv",
     'prompt,completion\n"write a\nshort review",the tea is good .\nhello,\n', "sft",
     ["train.csv:4:", "field 'completion'", "expected a non-empty string", "found an empty string"]),
    ("json-array-element", "train.json",
     '[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": "c",\n   "completion": ""}\n]\n', "sft",
     ["train.json:3:", "field 'completion'", "found an empty string"]),
    ("json-array-non-object", "train.json", '[\n  {"prompt": "a", "completion": "b"},\n\n  42\n]\n', "sft",
     ["train.json:4:", "expected a JSON object", "found a JSON int"]),
    ("unknown-extension", "train.txt", "prompt: hi\n", "sft",
     ["train.txt", "unknown data format '.txt'", "expected .jsonl, .json, .csv, .parquet"]),
]


@pytest.mark.parametrize("case,name,content,stage,parts", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_data_file(case, name, content, stage, parts, tiny_model_dir, tmp_path, capsys):
    data = tmp_path / name
    data.write_text(content)
    out = tmp_path / "out"
    code, err = run_cli(capsys, [stage, "--model_name_or_path", str(tiny_model_dir), "--train_file", str(data),
                                 "--output_dir", str(out)])
    line = assert_one_line_error(code, err, *parts)
    assert str(data) in line
    assert_nothing_written(out)


def test_missing_data_file(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_cli(capsys, ["sft", "--model_name_or_path", str(tiny_model_dir),
                                 "--train_file", str(tmp_path / "nope.jsonl"), "--output_dir", str(out)])
    assert_one_line_error(code, err, str(tmp_path / "nope.jsonl"), "no such file")
    assert_nothing_written(out)


@pytest.fixture
def good_sft(tmp_path) -> Path:
    path = tmp_path / "train.jsonl"
    write_jsonl(path, [GOOD_SFT] * 5)
    return path


def test_unknown_key_names_the_closest_valid_key(good_sft, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_cli(capsys, ["sft", "--model_name_or_path", str(tiny_model_dir), "--train_file", str(good_sft),
                                 "--output_dir", str(out), "--learnig_rate", "1e-3"])
    assert_one_line_error(code, err, "command line", "unknown key 'learnig_rate'", "did you mean learning_rate")
    assert_nothing_written(out)

    config = tmp_path / "c.yaml"
    config.write_text(f"train_file: {good_sft}\noutput_dir: {out}\nlora_rank: 4\n")
    code, err = run_cli(capsys, ["sft", "--config", str(config)])
    assert_one_line_error(code, err, str(config), "unknown key 'lora_rank'", "lora_r")
    assert_nothing_written(out)


def test_bad_yaml_syntax_names_the_line(good_sft, tmp_path, capsys):
    out = tmp_path / "out"
    config = tmp_path / "c.yaml"
    config.write_text(f"train_file: {good_sft}\nlora_r: 4\n  lora_alpha: 8\noutput_dir: {out}\n")
    code, err = run_cli(capsys, ["sft", "--config", str(config)])
    assert_one_line_error(code, err, f"{config}:3:", "expected valid YAML", "found a syntax error")
    assert_nothing_written(out)


@pytest.mark.parametrize("key,value,parts", [
    ("learning_rate", "abc", ["command line", "key 'learning_rate'", "expected float", "found 'abc'"]),
    ("lora_r", "8.5", ["key 'lora_r'", "expected int", "found '8.5'"]),
    ("trust_remote_code", "maybe", ["key 'trust_remote_code'", "expected bool", "found 'maybe'"]),
    ("peft_method", "lorax", ["peft_method", "expected one of full, lora, qlora-4bit", "found 'lorax'"]),
])
def test_bad_value(key, value, parts, good_sft, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_cli(capsys, ["sft", "--model_name_or_path", str(tiny_model_dir), "--train_file", str(good_sft),
                                 "--output_dir", str(out), f"--{key}", value])
    assert_one_line_error(code, err, *parts)
    assert_nothing_written(out)


def test_finished_run_is_not_overwritten(good_sft, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text('{"train_loss": 1.0}\n')
    code, err = run_cli(capsys, ["sft", "--model_name_or_path", str(tiny_model_dir), "--train_file", str(good_sft),
                                 "--output_dir", str(out)])
    assert_one_line_error(code, err, str(out), "expected a new output_dir", "found a finished run",
                          "--overwrite_output_dir")
    assert [p.name for p in out.iterdir()] == ["metrics.json"]
    assert (out / "metrics.json").read_text() == '{"train_loss": 1.0}\n'
    assert not out.with_name("out.tmp").exists()


def test_unknown_command(capsys):
    code, err = run_cli(capsys, ["rewrad"])
    assert_one_line_error(code, err, "unknown command 'rewrad'", "did you mean reward")


# ----------------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------------


ROWS = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(20)]


def test_split_is_deterministic_by_seed():
    a, b, c = split_rows(ROWS, 0.1, 0.2, seed=1), split_rows(ROWS, 0.1, 0.2, seed=1), split_rows(ROWS, 0.1, 0.2, seed=2)
    assert a == b
    assert a != c
    for split in (a, c):
        together = split["train"] + split["validation"] + split["test"]
        assert sorted(r["prompt"] for r in together) == sorted(r["prompt"] for r in ROWS)  # a partition


@pytest.mark.parametrize("validation,test,sizes", [
    (0.1, 0.25, (13, 2, 5)),  # fractions of 20 rows
    (3, 4, (13, 3, 4)),  # row counts
    (0.5, 1, (9, 10, 1)),  # mixed
    (0, 0, (20, 0, 0)),
])
def test_split_sizes(validation, test, sizes):
    split = split_rows(ROWS, validation, test, seed=0)
    assert (len(split["train"]), len(split["validation"]), len(split["test"])) == sizes


def test_split_that_leaves_no_training_rows_is_an_error():
    with pytest.raises(UserError, match="expected fewer than the 20 rows, found 10 \\+ 10"):
        split_rows(ROWS, 10, 0.5, seed=0)


def test_prompt_in_train_and_test_files_warns(tmp_path, caplog):
    write_jsonl(tmp_path / "train.jsonl", ROWS[:10])
    write_jsonl(tmp_path / "test.jsonl", [ROWS[3], {"prompt": "new", "completion": "x"}])
    write_jsonl(tmp_path / "val.jsonl", [{"prompt": "other", "completion": "y"}])
    with caplog.at_level(logging.WARNING, logger="rlhf.data"):
        splits = load_splits(str(tmp_path / "train.jsonl"), "sft", validation_file=str(tmp_path / "val.jsonl"),
                             test_file=str(tmp_path / "test.jsonl"))
    assert len(splits["train"]) == 10 and len(splits["test"]) == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["1 prompt(s) appear in more than one split (test and train): held-out figures may be optimistic"]

    caplog.clear()
    write_jsonl(tmp_path / "test.jsonl", [{"prompt": "new", "completion": "x"}])
    with caplog.at_level(logging.WARNING, logger="rlhf.data"):
        load_splits(str(tmp_path / "train.jsonl"), "sft", validation_file=str(tmp_path / "val.jsonl"),
                    test_file=str(tmp_path / "test.jsonl"))
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
