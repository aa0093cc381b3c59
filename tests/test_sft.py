"""The SFT stage: completion-only labels, row formats, what a run writes, early stopping, atomic output."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import TrainerCallback
from transformers.utils import logging as hf_logging

from rlhf.core.data import write_jsonl
from rlhf.core.formatting import encode_prompt, encode_reply
from rlhf.core.hooks import with_trainer_callbacks
from rlhf.core.models import load_tokenizer
from rlhf.core.stage import TrainerStageArguments, parse_stage
from sft.train import run, tokenize_sft_rows

WORDS = ["coffee", "tea", "pizza", "bread", "cheese", "apple", "mango", "pasta", "soup", "salad", "book", "song"]


def prompt_completion_rows() -> list[dict]:
    return [{"prompt": f"write a short review of the {w}", "completion": f"the {w} is good and i like it ."}
            for w in WORDS]


def message_rows() -> list[dict]:
    return [{"messages": [{"role": "system", "content": "reply with one sentence ."},
                          {"role": "user", "content": f"what do you think of the {w} ?"},
                          {"role": "assistant", "content": f"i love the {w} ."}]} for w in WORDS]


def text_rows() -> list[dict]:
    return [{"text": f"the {w} is really nice ."} for w in WORDS]


def base_argv(model_dir, train_file, out) -> list[str]:
    return ["--model_name_or_path", str(model_dir), "--train_file", str(train_file), "--output_dir", str(out),
            "--lora_r", "4", "--lora_alpha", "8", "--per_device_train_batch_size", "4", "--logging_steps", "1"]


class FirstBatch(TrainerCallback):
    """Keeps the first training batch exactly as the collator hands it to the model."""

    batch = None

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        self.batch = next(iter(train_dataloader))


# ----------------------------------------------------------------------------------------------
# Tokenisation and completion-only labels
# ----------------------------------------------------------------------------------------------


def test_tokenize_sft_rows_masks_the_prompt(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    rows = [{"prompt": "write a review of the tea", "completion": "the tea is good ."},
            {"prompt": [{"role": "user", "content": "hi"}], "completion": "hello"},
            {"prompt": "", "text": "a poem about the river ."}]
    out = tokenize_sft_rows(tokenizer, rows)
    for row, ids, mask in zip(rows, out["input_ids"], out["completion_mask"]):
        reply = encode_reply(tokenizer, row.get("text", row.get("completion")))
        prompt = encode_prompt(tokenizer, row["prompt"]) if row["prompt"] else []
        assert ids == prompt + reply and ids[-1] == tokenizer.eos_token_id
        assert mask == [0] * len(prompt) + [1] * len(reply)
    # the chat template wraps the prompt: "<|im_start|>user : ... <|im_end|> <|im_start|>assistant :"
    assert tokenizer.decode(out["input_ids"][0][: out["completion_mask"][0].index(1)]).startswith("<|im_start|> user")


@pytest.mark.parametrize("kind", ["prompt_completion", "messages", "text"])
def test_labels_are_ignored_exactly_on_prompt_tokens(kind, tiny_model_dir, tmp_path):
    rows = {"prompt_completion": prompt_completion_rows, "messages": message_rows, "text": text_rows}[kind]()
    write_jsonl(tmp_path / "train.jsonl", rows)
    grab = FirstBatch()
    metrics = run(argv=base_argv(tiny_model_dir, tmp_path / "train.jsonl", tmp_path / "out")
                  + ["--max_steps", "1", "--validation_size", "2", "--test_size", "2"], hooks=with_trainer_callbacks(grab))
    assert math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["test_loss"])

    # What each row should look like: prompt tokens (label -100), reply tokens + EOS (label = token).
    tokenizer = load_tokenizer(str(tiny_model_dir))
    from rlhf.core.data import normalize_row, Record

    expected = {}
    for row in rows:
        norm = normalize_row(Record("x", row), "sft")
        prompt = encode_prompt(tokenizer, norm["prompt"]) if norm["prompt"] else []
        reply = encode_reply(tokenizer, norm.get("text", norm.get("completion")))
        expected[tuple(prompt + reply)] = len(prompt)

    batch = grab.batch
    assert batch["labels"].shape == batch["input_ids"].shape
    for ids, labels, attention in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        length = int(attention.sum())
        n_prompt = expected[tuple(ids[:length].tolist())]
        if kind == "text":
            assert n_prompt == 0
        else:
            assert n_prompt > 0
        assert (labels[:n_prompt] == -100).all()
        assert torch.equal(labels[n_prompt:length], ids[n_prompt:length])  # reply and EOS are learned
        assert (labels[length:] == -100).all()  # padding is not


# ----------------------------------------------------------------------------------------------
# A run's output directory
# ----------------------------------------------------------------------------------------------


class WatchOutputDir(TrainerCallback):
    """Records, at every step, whether ``<out>`` and ``<out>.tmp`` exist."""

    def __init__(self, out):
        self.out, self.seen = out, []

    def on_step_end(self, args, state, control, **kwargs):
        self.seen.append((self.out.exists(), self.out.with_name(self.out.name + ".tmp").exists()))


@pytest.mark.slow
def test_run_writes_a_complete_output_dir_only_at_the_end(tiny_model_dir, tmp_path, caplog):
    write_jsonl(tmp_path / "train.jsonl", prompt_completion_rows())
    write_jsonl(tmp_path / "val.jsonl", prompt_completion_rows()[:2])
    write_jsonl(tmp_path / "test.jsonl", prompt_completion_rows()[2:5])
    out = tmp_path / "runs" / "sft"
    watch = WatchOutputDir(out)
    argv = base_argv(tiny_model_dir, tmp_path / "train.jsonl", out) + [
        "--validation_file", str(tmp_path / "val.jsonl"), "--test_file", str(tmp_path / "test.jsonl"),
        "--max_steps", "3", "--eval_steps", "1", "--save_steps", "1", "--learning_rate", "3e-3"]
    hf_logging.enable_propagation()  # transformers' loggers do not reach caplog otherwise
    try:
        run(argv=argv, hooks=with_trainer_callbacks(watch))
    finally:
        hf_logging.disable_propagation()
    # early stopping ran during training and is off for the held-out evaluations after it
    assert not [r for r in caplog.records if "early stopping is disabled" in r.getMessage()]

    assert watch.seen == [(False, True)] * 3  # while training only <out>.tmp exists
    assert out.is_dir() and not out.with_name("sft.tmp").exists()
    assert not list(out.glob("checkpoint-*"))
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "config.yaml", "metrics.json", "curves.png", "log_history.json"} <= {p.name for p in out.iterdir()}
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_perplexity"] == pytest.approx(math.exp(metrics["test_loss"]))
    assert math.isfinite(metrics["validation_loss"])
    # each held-out split keeps its own token metrics (TRL logs them as eval_* whatever the split)
    assert {"validation_mean_token_accuracy", "test_mean_token_accuracy", "validation_entropy",
            "test_entropy"} <= metrics.keys()
    assert not [k for k in metrics if k.startswith("eval_")]
    assert metrics["train_rows"] == len(prompt_completion_rows())

    # The tokenizer saved with the run is the one it trained with.
    saved = load_tokenizer(str(out))
    assert saved.get_vocab() == load_tokenizer(str(tiny_model_dir)).get_vocab()
    assert saved.chat_template == load_tokenizer(str(tiny_model_dir)).chat_template

    # config.yaml is a loadable config that gives back the run's settings.
    first = parse_stage(TrainerStageArguments, _sft_config(), argv=argv)
    again = parse_stage(TrainerStageArguments, _sft_config(), argv=["--config", str(out / "config.yaml")])
    assert again.model_args == first.model_args and again.data_args == first.data_args
    assert again.stage_args == first.stage_args
    assert again.model_args.lora_r == 4 and again.data_args.test_file == str(tmp_path / "test.jsonl")
    for key in ("learning_rate", "max_steps", "eval_steps", "per_device_train_batch_size", "output_dir"):
        assert getattr(again.training_args, key) == getattr(first.training_args, key), key


def _sft_config():
    from trl import SFTConfig

    return SFTConfig


@pytest.mark.slow
def test_early_stopping_ends_the_run_before_max_steps(tiny_model_dir, tmp_path):
    write_jsonl(tmp_path / "train.jsonl", prompt_completion_rows())
    # A learning rate this large makes the validation loss worse after the first evaluation.
    common = base_argv(tiny_model_dir, tmp_path / "train.jsonl", tmp_path / "x") + [
        "--max_steps", "8", "--eval_steps", "1", "--save_steps", "1", "--learning_rate", "2.0",
        "--lr_scheduler_type", "constant", "--warmup_steps", "0", "--validation_size", "3", "--test_size", "0"]

    def steps(out, patience: str) -> tuple[int, list[float]]:
        run(argv=common + ["--output_dir", str(out), "--early_stopping_patience", patience])
        history = json.loads((out / "log_history.json").read_text())
        eval_losses = [e["eval_loss"] for e in history if "eval_loss" in e]
        return max(e["step"] for e in history), eval_losses

    stopped_at, losses = steps(tmp_path / "patience1", "1")
    full_at, _ = steps(tmp_path / "never", "null")
    assert full_at == 8
    assert stopped_at < 8
    # it stopped at the first evaluation that was not better than the best so far
    assert not losses[-1] < min(losses[:-1])
    assert all(later < earlier for earlier, later in zip(losses[:-2], losses[1:-1]))
