"""Bad input a user can cause: one line on stderr naming where, what was expected and what was found,
exit status 2, no traceback, and nothing written. Also the train/validation/test split."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from rlhf.app.cli import main
from rlhf.core.data import load_splits, split_rows, write_jsonl
from rlhf.core.errors import UserError

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
    with caplog.at_level(logging.WARNING, logger="rlhf.core.data"):
        splits = load_splits(str(tmp_path / "train.jsonl"), "sft", validation_file=str(tmp_path / "val.jsonl"),
                             test_file=str(tmp_path / "test.jsonl"))
    assert len(splits["train"]) == 10 and len(splits["test"]) == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["1 prompt(s) appear in more than one split (test and train): held-out figures may be optimistic"]

    caplog.clear()
    write_jsonl(tmp_path / "test.jsonl", [{"prompt": "new", "completion": "x"}])
    with caplog.at_level(logging.WARNING, logger="rlhf.core.data"):
        load_splits(str(tmp_path / "train.jsonl"), "sft", validation_file=str(tmp_path / "val.jsonl"),
                    test_file=str(tmp_path / "test.jsonl"))
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


# ----------------------------------------------------------------------------------------------
# Files that are not UTF-8
# ----------------------------------------------------------------------------------------------


# (file name, content as bytes, stage, expected line, byte offset of the bad byte): 0xe9 is "é" in
# Latin-1 / Windows-1252, what a spreadsheet or an old editor writes.
LATIN1 = "café".encode("latin-1")
ENCODING_CASES = [
    ("train.jsonl", jsonl(GOOD_SFT).encode() + b'{"prompt": "' + LATIN1 + b'", "completion": "x"}\n', "sft",
     2, len(jsonl(GOOD_SFT).encode()) + len(b'{"prompt": "caf')),
    ("train.json", b'[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": "' + LATIN1 + b'", "completion": "x"}\n]\n',
     "sft", 3, len(b'[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": "caf')),
    ("prefs.csv", b"prompt,chosen,rejected\nhi,good,bad\nhi," + LATIN1 + b",bad\n", "reward",
     3, len(b"prompt,chosen,rejected\nhi,good,bad\nhi,caf")),
]


@pytest.mark.parametrize("name,content,stage,line,offset", ENCODING_CASES, ids=[c[0] for c in ENCODING_CASES])
def test_file_that_is_not_utf8_names_the_line_and_byte(name, content, stage, line, offset, tiny_model_dir, tmp_path,
                                                       capsys):
    data = tmp_path / name
    data.write_bytes(content)
    assert content[offset] == 0xE9
    out = tmp_path / "out"
    code, err = run_cli(capsys, [stage, "--model_name_or_path", str(tiny_model_dir), "--train_file", str(data),
                                 "--output_dir", str(out)])
    assert_one_line_error(code, err, f"{data}:{line}:", "expected UTF-8 text",
                          f"found byte 0xe9 at byte offset {offset}", "save the file as UTF-8")
    assert_nothing_written(out)


def test_utf8_byte_order_mark_is_accepted(tmp_path):
    # Excel's "CSV UTF-8" starts the file with a byte-order mark; it is not part of the first header.
    path = tmp_path / "train.csv"
    path.write_bytes(b"\xef\xbb\xbfprompt,completion\nhi,the tea is good .\n")
    assert load_splits(str(path), "sft", validation_size=0, test_size=0)["train"] == [
        {"prompt": "hi", "completion": "the tea is good ."}]


def test_config_file_that_is_not_utf8(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_bytes(b"learning_rate: 1.0e-4\n# r\xe9glages\n")
    code, err = run_cli(capsys, ["sft", "--config", str(config)])
    offset = len(b"learning_rate: 1.0e-4\n# r")
    assert_one_line_error(code, err, f"{config}:2:", "expected UTF-8 text", f"found byte 0xe9 at byte offset {offset}")


# ----------------------------------------------------------------------------------------------
# Sizes, lengths and step counts out of range
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage,key,value,expected", [
    ("sft", "per_device_train_batch_size", "-3", "expected an integer >= 1, found -3"),
    ("sft", "per_device_eval_batch_size", "0", "expected an integer >= 1, found 0"),
    ("sft", "max_length", "0", "expected an integer >= 1 or null, found 0"),
    # -1 is transformers' "unset" (train for num_train_epochs); other values below 1 mean nothing
    ("sft", "max_steps", "-5", "expected an integer >= 1 or -1 (train for num_train_epochs), found -5"),
    ("sft", "max_steps", "0", "expected an integer >= 1 or -1 (train for num_train_epochs), found 0"),
    ("sft", "gradient_accumulation_steps", "0", "expected an integer >= 1, found 0"),
    ("sft", "logging_steps", "0", "expected a number > 0, found 0"),  # below 1 is a fraction of the run
    ("sft", "num_train_epochs", "-1", "expected a number > 0, found -1"),
    ("sft", "lora_r", "0", "expected an integer >= 1, found 0"),
    ("sft", "max_train_samples", "0", "expected an integer >= 1 or null, found 0"),
    ("sft", "validation_size", "-2", "expected a number >= 0, found -2"),
    ("sft", "seed", "-1", "expected an integer >= 0, found -1"),
    ("reward", "max_length", "-8", "expected an integer >= 1 or null, found -8"),
    ("reward", "eval_steps", "-1", "expected a number > 0 or null, found -1"),
    ("ppo", "batch_size", "0", "expected an integer >= 1, found 0"),
    ("ppo", "max_steps", "-1", "expected an integer >= 1, found -1"),  # ours has no "unset" value
    ("ppo", "max_new_tokens", "0", "expected an integer >= 1, found 0"),
])
def test_size_out_of_range_is_refused_before_any_work(stage, key, value, expected, tmp_path, capsys):
    # The data file and the model do not exist: the range is checked first, before anything loads.
    out = tmp_path / "out"
    code, err = run_cli(capsys, [stage, "--model_name_or_path", str(tmp_path / "no-model"),
                                 "--train_file", str(tmp_path / "no-data.jsonl"), "--output_dir", str(out),
                                 f"--{key}", value])
    assert_one_line_error(code, err, f"command line: key '{key}': {expected}")
    assert_nothing_written(out)


# ----------------------------------------------------------------------------------------------
# An error after the run directory was made leaves nothing behind
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def model_without_weights(tiny_model_dir, tmp_path) -> Path:
    """A model directory whose tokenizer and config load but whose weights are missing."""
    import shutil

    path = tmp_path / "no-weights"
    shutil.copytree(tiny_model_dir, path)
    for weights in path.glob("*.safetensors"):
        weights.unlink()
    return path


@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_error_after_the_run_dir_was_made_leaves_nothing(stage, model_without_weights, tiny_model_dir, tmp_path,
                                                         capsys, monkeypatch):
    import importlib

    train_file = tmp_path / "train.jsonl"
    write_jsonl(train_file, [GOOD_SFT] * 6 if stage == "sft" else [GOOD_PREF] * 6)
    module = importlib.import_module({"sft": "sft.train", "reward": "reward.train"}[stage])
    made = []
    real_prepare = module.StageRun.prepare

    def prepare_and_note(self):
        checkpoint = real_prepare(self)
        made.append(self.run.work.is_dir())
        return checkpoint

    monkeypatch.setattr(module.StageRun, "prepare", prepare_and_note)

    # The model's weights are found missing only once the run directory exists: one line, nothing left.
    out = tmp_path / "out"
    code, err = run_cli(capsys, [stage, "--model_name_or_path", str(model_without_weights), "--train_file",
                                 str(train_file), "--output_dir", str(out)])
    assert_one_line_error(code, err, f"model_name_or_path: could not load a model from {model_without_weights}")
    assert made == [True]
    assert_nothing_written(out)

    # Bad input reported as one line after the directory was made: still nothing written.
    def bad_model(stage_run, task):
        raise UserError(f"{stage_run.model_args.model_name_or_path}: expected a usable model, found none")

    monkeypatch.setattr(module, "build_stage_model", bad_model)
    code, err = run_cli(capsys, [stage, "--model_name_or_path", str(tiny_model_dir), "--train_file", str(train_file),
                                 "--output_dir", str(out)])
    assert_one_line_error(code, err, "expected a usable model")
    assert made == [True, True]
    assert_nothing_written(out)


def test_renamed_key_names_the_new_one_and_why(tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_cli(capsys, ["ppo", "--output_dir", str(out), "--target_kl", "3"])
    assert_one_line_error(code, err, "command line: key 'target_kl' was renamed 'kl_target'",
                          "in TRL and CleanRL target_kl is an early-stopping threshold", "adaptive KL controller")
    assert_nothing_written(out)


def test_lora_target_modules_not_in_the_model_are_named(tiny_model_dir, tmp_path, capsys):
    train_file = tmp_path / "train.jsonl"
    write_jsonl(train_file, [GOOD_SFT] * 6)
    out = tmp_path / "out"
    code, err = run_cli(capsys, ["sft", "--model_name_or_path", str(tiny_model_dir), "--train_file", str(train_file),
                                 "--output_dir", str(out), "--lora_target_modules", "q_proj,query_key_value"])
    # The model is loaded before its layers can be checked: its progress bar precedes the error.
    err = "\n".join(line for line in err.splitlines() if not line.startswith("Loading weights"))
    assert_one_line_error(code, err, "lora_target_modules: query_key_value not in LlamaForCausalLM",
                          "its linear layers are", "q_proj")
    assert_nothing_written(out)
