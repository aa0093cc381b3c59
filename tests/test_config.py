"""Stage configs: YAML + command-line precedence, type coercion, and the resolved config round trip."""

from __future__ import annotations

import pytest
import yaml

from rlhf.core.config import build_config, parse_overrides, save_resolved_config
from rlhf.core.data import DataArguments
from rlhf.core.errors import UserError
from rlhf.core.models import ModelArguments
from rlhf.core.stage import TrainerStageArguments, parse_stage, trainer_defaults


def sft_config():
    from trl import SFTConfig

    return SFTConfig


def write_yaml(path, text: str):
    path.write_text(text)
    return str(path)


def test_precedence_defaults_yaml_values_command_line(tmp_path):
    config = write_yaml(tmp_path / "c.yaml", "learning_rate: 1.0e-4\nlora_r: 8\nlogging_steps: 2\nmax_steps: 7\n"
                                             f"output_dir: {tmp_path / 'out'}\n")
    stage = parse_stage(TrainerStageArguments, sft_config(), {"lora_r": 2, "max_steps": 9},
                        argv=["--config", config, "--learning_rate", "3e-3"], defaults={"learning_rate": 2e-4})
    args = stage.training_args
    assert args.learning_rate == 3e-3  # command line beats YAML
    assert stage.model_args.lora_r == 2 and args.max_steps == 9  # values beat YAML
    assert args.logging_steps == 2  # YAML beats the stage defaults (5)
    assert args.eval_steps == trainer_defaults()["eval_steps"] == 20  # stage defaults beat TRL's (None)
    assert stage.model_args.lora_alpha == ModelArguments().lora_alpha  # untouched: the dataclass default
    assert stage.given["learning_rate"] == 3e-3 and stage.given["lora_r"] == 2
    assert stage.run.final == tmp_path / "out"

    plain = parse_stage(TrainerStageArguments, sft_config(), argv=[], defaults={"learning_rate": 2e-4})
    assert plain.training_args.learning_rate == 2e-4  # the stage's own default beats TRL's


def test_yaml_and_command_line_values_get_the_field_types(tmp_path):
    # PyYAML reads "1e-4" (no dot) as a string; it must still become a float.
    config = write_yaml(tmp_path / "c.yaml", "learning_rate: 1e-4\nmax_steps: 1e3\nlora_dropout: 0\n"
                                             "lora_target_modules: [q_proj, k_proj]\nbf16: no\n")
    (model, data, stage, train), given = build_config(
        [ModelArguments, DataArguments, TrainerStageArguments, sft_config()],
        ["--config", config, "--validation_size", "3", "--max_train_samples", "null",
         "--early_stopping_patience=2", "--trust_remote_code", "--gradient_checkpointing", "false"],
        extra_keys=("resume",))
    assert isinstance(train.learning_rate, float) and train.learning_rate == 1e-4
    assert train.max_steps == 1000 and isinstance(train.max_steps, int)
    assert model.lora_dropout == 0.0 and isinstance(model.lora_dropout, float)
    assert model.lora_target_modules == ["q_proj", "k_proj"]
    assert train.bf16 is False and train.gradient_checkpointing is False
    assert model.trust_remote_code is True  # a bare flag is true
    assert data.validation_size == 3.0 and data.max_train_samples is None
    assert stage.early_stopping_patience == 2
    assert given["max_steps"] == 1000 and given["learning_rate"] == 1e-4


@pytest.mark.parametrize("value,expected", [
    ("q_proj,v_proj", ["q_proj", "v_proj"]),
    ("[q_proj, v_proj]", ["q_proj", "v_proj"]),
    ("o_proj", ["o_proj"]),
])
def test_list_from_the_command_line(value, expected):
    (model,), _ = build_config([ModelArguments], ["--lora_target_modules", value])
    assert model.lora_target_modules == expected


@pytest.mark.parametrize("text,expected", [("true", True), ("yes", True), ("1", True), ("False", False),
                                           ("off", False), ("0", False)])
def test_bools(text, expected):
    (model,), _ = build_config([ModelArguments], ["--trust_remote_code", text])
    assert model.trust_remote_code is expected


def test_resume_is_a_bare_flag(tmp_path):
    stage = parse_stage(TrainerStageArguments, sft_config(), argv=["--output_dir", str(tmp_path / "o"), "--resume"])
    assert stage.resume is True and stage.overwrite is False
    stage = parse_stage(TrainerStageArguments, sft_config(), argv=["--output_dir", str(tmp_path / "o"),
                                                                "--resume", "false", "--overwrite_output_dir"])
    assert stage.resume is False and stage.overwrite is True


def test_parse_overrides():
    assert parse_overrides(["--config", "a.yaml", "--lr", "1e-4", "--resume", "--x=1", "--dash-key", "v"]) == (
        {"lr": "1e-4", "resume": "true", "x": "1", "dash_key": "v"}, "a.yaml")
    # Several values make a list (for list keys such as rlhf eval's --runs); so does a repeated key.
    assert parse_overrides(["--runs", "a", "b", "--model", "x", "--model", "y"]) == (
        {"runs": ["a", "b"], "model": ["x", "y"]}, None)
    with pytest.raises(UserError, match="key 'learning_rate': expected one float, found 2 values: 1 2"):
        build_config([sft_config()], ["--learning_rate", "1", "2"])
    with pytest.raises(UserError, match="expected --key value, found 'stray'"):
        parse_overrides(["stray", "--lr", "1"])
    # A positional shortcut fills its key: rlhf export runs/ppo = rlhf export --model runs/ppo.
    assert parse_overrides(["runs/ppo", "--out", "x"], positional=("model",)) == (
        {"model": "runs/ppo", "out": "x"}, None)


def test_config_file_errors(tmp_path):
    with pytest.raises(UserError, match="no such config file"):
        build_config([ModelArguments], ["--config", str(tmp_path / "missing.yaml")])
    with pytest.raises(UserError, match="expected a mapping of key: value, found a list"):
        build_config([ModelArguments], ["--config", write_yaml(tmp_path / "l.yaml", "- a\n- b\n")])
    with pytest.raises(UserError, match=r"l2.yaml: key 'lora_r': expected int, found 'four'"):
        build_config([ModelArguments], ["--config", write_yaml(tmp_path / "l2.yaml", "lora_r: four\n")])


def test_resolved_config_reloads_to_the_same_values(tmp_path):
    argv = ["--output_dir", str(tmp_path / "run"), "--learning_rate", "3e-4", "--lora_target_modules", "q_proj,v_proj",
            "--bf16", "false", "--max_train_samples", "null", "--validation_size", "0.25", "--test_size", "3",
            "--max_steps", "12", "--early_stopping_patience", "null", "--peft_method", "ia3", "--resume",
            "--train_file", "data/x.jsonl", "--max_length", "64"]
    first = parse_stage(TrainerStageArguments, sft_config(), argv=argv)
    save_resolved_config(tmp_path / "config.yaml", [first.model_args, first.data_args, first.stage_args], first.given)

    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert "resume" not in saved  # resuming is an action, not a setting of the run
    assert saved["lora_target_modules"] == ["q_proj", "v_proj"] and saved["learning_rate"] == 3e-4

    again = parse_stage(TrainerStageArguments, sft_config(), argv=["--config", str(tmp_path / "config.yaml")])
    assert again.model_args == first.model_args
    assert again.data_args == first.data_args
    assert again.stage_args == first.stage_args
    assert again.stage_args.early_stopping_patience is None and again.model_args.peft_method == "ia3"
    for key in first.given:
        if hasattr(first.training_args, key):
            assert getattr(again.training_args, key) == getattr(first.training_args, key), key
    assert again.resume is False


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_every_key_with_its_default_and_help_text(flag, capsys):
    from rlhf.app.cli import main
    from rlhf.core.config import field_help
    from rlhf.ppo.trainer import PPOArguments

    with pytest.raises(SystemExit) as stopped:
        main(["ppo", "--config", "configs/ppo.yaml", flag])
    assert stopped.value.code == 0
    out = capsys.readouterr().out
    # Our help strings are the docstrings under the fields, written once.
    assert "  --lam (float, default: 0.95)\n      GAE lambda.\n" in out
    assert field_help(PPOArguments)["kl_coef"] == "(Initial) KL penalty coefficient beta."
    assert "  --resume\n      Continue an interrupted run" in out
    # The stage's defaults replace the dataclass defaults, and every key appears once.
    assert "  --validation_size (float, default: 0)\n" in out
    keys = [line.split()[0] for line in out.splitlines() if line.startswith("  --")]
    assert len(keys) == len(set(keys)) and "--max_new_tokens" in keys and "--model_name_or_path" in keys


def test_help_of_a_trainer_stage_shows_trl_help_and_our_defaults(capsys):
    with pytest.raises(SystemExit):
        parse_stage(TrainerStageArguments, sft_config(), argv=["--help"], defaults={"learning_rate": 2e-4})
    out = capsys.readouterr().out
    assert "  --learning_rate (float, default: 0.0002)\n      The initial learning rate" in out  # TRL's metadata
    assert "  --early_stopping_patience (int, default: 3)\n      Stop after" in out


# ----------------------------------------------------------------------------------------------
# Renamed keys and value ranges
# ----------------------------------------------------------------------------------------------


def test_renamed_key_is_refused_with_the_new_name_and_why(tmp_path):
    from dataclasses import dataclass

    from rlhf.core.config import RENAMED_KEYS

    @dataclass
    class Controller:
        kl_target: float = 4.0
        """Adaptive KL controller target."""

    assert RENAMED_KEYS["target_kl"][0] == "kl_target"
    with pytest.raises(UserError) as raised:
        build_config([Controller], ["--target_kl", "3"])
    message = str(raised.value)
    assert message.startswith("command line: key 'target_kl' was renamed 'kl_target': ")
    assert "in TRL and CleanRL target_kl is an early-stopping threshold" in message
    assert "adaptive KL controller" in message and "\n" not in message
    config = write_yaml(tmp_path / "c.yaml", "target_kl: 3\n")
    with pytest.raises(UserError, match=r"c.yaml: key 'target_kl' was renamed 'kl_target'"):
        build_config([Controller], ["--config", config])
    (controller,), _ = build_config([Controller], ["--kl_target", "3"])
    assert controller.kl_target == 3.0
    # Where the new name is no key either, the old one is just unknown (no hint about another stage).
    with pytest.raises(UserError, match="unknown key 'target_kl'"):
        build_config([ModelArguments], ["--target_kl", "3"])


def test_ranges_cover_trl_and_our_fields_and_keep_meaningful_sentinels():
    from rlhf.core.config import range_problem
    from rlhf.ppo.trainer import PPOArguments

    SFTConfig = sft_config()
    assert range_problem(SFTConfig, "max_steps", -1) is None  # transformers: -1 = train num_train_epochs
    assert range_problem(SFTConfig, "max_steps", -2) == "an integer >= 1 or -1 (train for num_train_epochs)"
    assert range_problem(PPOArguments, "max_steps", -1) == "an integer >= 1"  # PPO has no "unset"
    assert range_problem(SFTConfig, "logging_steps", 0.5) is None  # a fraction of the run
    assert range_problem(SFTConfig, "warmup_steps", 0) is None and range_problem(SFTConfig, "warmup_steps", -1)
    assert range_problem(SFTConfig, "eval_steps", None) is None  # null: same as logging_steps
    assert range_problem(SFTConfig, "num_train_epochs", 0) == "a number > 0"
    assert range_problem(SFTConfig, "dataloader_num_workers", 0) is None
    assert range_problem(SFTConfig, "bf16", False) is None
    assert range_problem(PPOArguments, "eval_prompts", 0) is None  # 0 = no final evaluation
    assert range_problem(PPOArguments, "eval_batch_size", 0) == "an integer >= 1"
    assert range_problem(DataArguments, "test_size", 0) is None


def test_range_is_checked_where_the_value_came_from(tmp_path):
    config = write_yaml(tmp_path / "c.yaml", "per_device_train_batch_size: 0\n")
    with pytest.raises(UserError, match=r"c.yaml: key 'per_device_train_batch_size': expected an integer >= 1, "
                                        r"found 0$"):
        parse_stage(TrainerStageArguments, sft_config(), argv=["--config", config])
    stage = parse_stage(TrainerStageArguments, sft_config(), argv=["--max_steps", "-1", "--num_train_epochs", "0.5"])
    assert stage.training_args.max_steps == -1 and stage.training_args.num_train_epochs == 0.5


def test_data_arguments_built_in_code_are_checked():
    with pytest.raises(UserError, match="max_train_samples: expected an integer >= 1 or null, found 0"):
        DataArguments(train_file="x.jsonl", max_train_samples=0)
    with pytest.raises(UserError, match="validation_size: expected a number >= 0, found -0.5"):
        DataArguments(validation_size=-0.5)
