"""The reward stage: pair metrics, the pairwise loss, what a run writes, and ``rlhf reward score``."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from rlhf.core.adapters import read_score_head
from rlhf.app.cli import main
from rlhf.core.data import write_jsonl
from rlhf.core.models import ModelArguments, load_base_model, load_tokenizer
from reward.score import load_reward_model, pair_metrics
from rlhf.core.scoring import score_replies
from reward.train import run, tokenize_pairs

WORDS = ["coffee", "tea", "pizza", "bread", "cheese", "apple", "mango", "pasta", "soup", "salad", "book", "song"]


def pref_rows(words=WORDS) -> list[dict]:
    return [{"prompt": f"write a short review of the {w}", "chosen": f"the {w} is lovely and i love it .",
             "rejected": f"the {w} is awful ."} for w in words]


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# ----------------------------------------------------------------------------------------------
# pair_metrics, by hand
# ----------------------------------------------------------------------------------------------


def test_pair_metrics_by_hand():
    # margins: 2 - 0 = 2, 0 - 1 = -1, 1 - 1 = 0  -> only the first pair is ranked right (a tie is not)
    m = pair_metrics([2.0, 0.0, 1.0], [0.0, 1.0, 1.0], bins=2)
    assert m["pairs"] == 3
    assert m["accuracy"] == pytest.approx(1 / 3)
    assert m["mean_margin"] == pytest.approx((2 - 1 + 0) / 3)
    # Each pair counts in both orders: predictions s(2), s(-1), s(0) with outcome 1 and
    # 1-s(2), 1-s(-1), 1-s(0) with outcome 0, where s(2)=0.881, s(-1)=0.269, s(0)=0.5.
    # bin [0, 0.5): s(-1) (outcome 1) and 1-s(2)=0.119 (outcome 0)
    # bin [0.5, 1]: s(2) (1), s(0) (1), 1-s(-1)=0.731 (0), 1-s(0)=0.5 (0)
    low, high = m["calibration"]
    assert low["bin"] == [0.0, 0.5] and high["bin"] == [0.5, 1.0]
    assert low["count"] == 2 and high["count"] == 4
    assert low["mean_predicted"] == pytest.approx((sigmoid(-1) + 1 - sigmoid(2)) / 2)
    assert low["observed"] == pytest.approx(0.5)
    assert high["mean_predicted"] == pytest.approx((sigmoid(2) + 0.5 + 1 - sigmoid(-1) + 0.5) / 4)
    assert high["observed"] == pytest.approx(0.5)
    # ECE = sum over bins of count * |mean_predicted - observed| / (2 * pairs)
    ece = (2 * abs(low["mean_predicted"] - 0.5) + 4 * abs(high["mean_predicted"] - 0.5)) / 6
    assert m["expected_calibration_error"] == pytest.approx(ece)
    assert ece == pytest.approx(0.2040, abs=1e-4)


def test_pair_metrics_confident_and_right_is_well_calibrated():
    # margin 20: P(chosen) = 1 - 2e-9, always right -> everything lands in the end bins, ECE ~ 0
    m = pair_metrics([20.0, 21.0], [0.0, 1.0], bins=10)
    assert m["accuracy"] == 1.0 and m["mean_margin"] == pytest.approx(20.0)
    assert [c["bin"] for c in m["calibration"]] == [[0.0, 0.1], [0.9, 1.0]]
    assert [c["observed"] for c in m["calibration"]] == [0.0, 1.0]
    assert m["expected_calibration_error"] == pytest.approx(0.0, abs=1e-8)


# ----------------------------------------------------------------------------------------------
# The trainer's loss
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_reward_trainer_loss_is_pairwise_logsigmoid(tiny_model_dir, tmp_path):
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    torch.manual_seed(0)
    model = load_base_model(ModelArguments(model_name_or_path=str(tiny_model_dir), peft_method="full"), "seq-cls")
    model.config.pad_token_id = tokenizer.pad_token_id
    # Different reply lengths, so the batch is padded and the score position matters.
    rows = pref_rows(WORDS[:3]) + [{"prompt": "hi", "chosen": "a good long answer about the city and the river .",
                                    "rejected": "no"}]
    dataset = Dataset.from_dict(tokenize_pairs(tokenizer, rows))
    args = RewardConfig(output_dir=str(tmp_path), report_to="none", bf16=False, gradient_checkpointing=False,
                        per_device_eval_batch_size=len(rows), max_length=None)
    trainer = RewardTrainer(model=model, args=args, train_dataset=dataset, eval_dataset=dataset,
                            processing_class=tokenizer)
    batch = next(iter(trainer.get_eval_dataloader()))  # in order, chosen rows first then rejected
    model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch))

        def score(ids: list[int]) -> float:
            # one sequence, no padding: the head reads the last token that is not the pad/EOS id
            return model(input_ids=torch.tensor([ids])).logits[0, 0].item()

        pairs = tokenize_pairs(tokenizer, rows)
        chosen = torch.tensor([score(ids) for ids in pairs["chosen_ids"]])
        rejected = torch.tensor([score(ids) for ids in pairs["rejected_ids"]])
    expected = -F.logsigmoid(chosen - rejected).mean()
    assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(chosen, rejected)  # a real check, not log(2) from equal scores


# ----------------------------------------------------------------------------------------------
# A reward run and scoring
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reward_run(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("reward")
    write_jsonl(root / "train.jsonl", pref_rows(WORDS[:8]))
    write_jsonl(root / "val.jsonl", pref_rows(WORDS[8:10]))
    write_jsonl(root / "test.jsonl", pref_rows(WORDS[10:]))
    out = root / "out"
    metrics = run(argv=["--model_name_or_path", str(tiny_model_dir), "--train_file", str(root / "train.jsonl"),
                        "--validation_file", str(root / "val.jsonl"), "--test_file", str(root / "test.jsonl"),
                        "--output_dir", str(out), "--max_steps", "3", "--eval_steps", "3", "--save_steps", "3",
                        "--per_device_train_batch_size", "4", "--lora_r", "4", "--lora_alpha", "8",
                        "--learning_rate", "1e-2", "--warmup_steps", "0", "--logging_steps", "1"])
    return out, metrics


@pytest.mark.slow
def test_reward_run_outputs(reward_run, tiny_model_dir):
    out, returned = reward_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_pairs"] == 2 and metrics["validation_pairs"] == 2
    assert metrics["test_accuracy"] in (0.0, 0.5, 1.0)
    assert metrics["test_accuracy"] == returned["test_accuracy"]
    assert (out / "calibration.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "curves.png").exists() and (out / "adapter_config.json").exists()
    assert sum(c["count"] for c in metrics["calibration"]["test"]) == 2 * 2

    head = read_score_head(out)
    hidden = json.loads((tiny_model_dir / "config.json").read_text())["hidden_size"]
    assert head is not None and head.shape == (1, hidden)
    model, _ = load_reward_model(str(out))
    assert_close(model.base_model.model.score.modules_to_save["default"].weight.detach(), head)

    # The saved test metrics are the saved model's: rescoring the test pairs gives the same numbers.
    rows = pref_rows(WORDS[10:])
    tokenizer = load_tokenizer(str(out))
    prompts = [r["prompt"] for r in rows]
    again = pair_metrics(score_replies(model, tokenizer, prompts, [r["chosen"] for r in rows]),
                         score_replies(model, tokenizer, prompts, [r["rejected"] for r in rows]))
    assert again["accuracy"] == metrics["test_accuracy"]
    assert again["mean_margin"] == pytest.approx(metrics["test_mean_margin"], abs=1e-5)


@pytest.mark.slow
def test_reward_score_command(reward_run, tmp_path, capsys):
    out, _ = reward_run
    rows = [{"prompt": "write a short review of the tea", "response": "the tea is lovely .", "id": 1},
            {"prompt": [{"role": "user", "content": "describe the city"}], "response": "a nice city", "id": 2},
            {"prompt": "write a poem", "completion": "the river and the forest and the mountain .", "id": 3}]
    write_jsonl(tmp_path / "rows.jsonl", rows)
    assert main(["reward", "score", "--model", str(out), "--input", str(tmp_path / "rows.jsonl"),
                 "--out", str(tmp_path / "scored.jsonl"), "--batch_size", "2"]) == 0
    scored = [json.loads(line) for line in (tmp_path / "scored.jsonl").read_text().splitlines()]
    assert [r["id"] for r in scored] == [1, 2, 3]
    assert all({k: v for k, v in r.items() if k != "score"} == row for r, row in zip(scored, rows))

    model, tokenizer = load_reward_model(str(out))
    expected = score_replies(model, tokenizer, [r["prompt"] for r in rows],
                             [r.get("response", r.get("completion")) for r in rows], batch_size=8)
    assert [r["score"] for r in scored] == pytest.approx(expected, abs=1e-5)
    assert len(set(round(s, 6) for s in expected)) == 3
    assert "scored 3 rows" in capsys.readouterr().out


@pytest.mark.slow
def test_reward_score_of_an_sft_run_is_one_line(tiny_model_dir, tmp_path, capsys):
    # `rlhf reward score --model runs/demo/sft`: an SFT output where a reward output is expected.
    from sft.train import run as sft_run

    write_jsonl(tmp_path / "sft.jsonl", [{"prompt": f"write a short review of the {w}", "completion": f"the {w} is good ."}
                                         for w in WORDS[:8]])
    sft = tmp_path / "sft"
    sft_run(argv=["--model_name_or_path", str(tiny_model_dir), "--train_file", str(tmp_path / "sft.jsonl"),
                  "--output_dir", str(sft), "--validation_size", "0", "--test_size", "0", "--max_steps", "1",
                  "--per_device_train_batch_size", "4", "--lora_r", "4", "--lora_alpha", "8", "--warmup_steps", "0"])
    write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "write a short review of the tea", "response": "the tea is good ."}])
    capsys.readouterr()  # the SFT run's progress bars
    code = main(["reward", "score", "--model", str(sft), "--input", str(tmp_path / "rows.jsonl"),
                 "--out", str(tmp_path / "scored.jsonl")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith(f"error: {sft}: expected a reward model"), err
    assert "found an SFT stage output (a LoRA adapter for a causal LM)" in lines[0]
    assert not (tmp_path / "scored.jsonl").exists()


@pytest.mark.slow
def test_qlora_reward_model_loads_onto_the_quantised_base_it_trained_on(tiny_model_dir_4bit, tmp_path):
    root = tmp_path
    write_jsonl(root / "train.jsonl", pref_rows(WORDS[:8]))
    write_jsonl(root / "test.jsonl", pref_rows(WORDS[8:]))
    out = root / "out"
    run(argv=["--model_name_or_path", str(tiny_model_dir_4bit), "--peft_method", "qlora-4bit",
              "--train_file", str(root / "train.jsonl"), "--validation_size", "0", "--test_file", str(root / "test.jsonl"),
              "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "4", "--lora_r", "4",
              "--lora_alpha", "8", "--learning_rate", "1e-2", "--warmup_steps", "0"])
    metrics = json.loads((out / "metrics.json").read_text())
    model, tokenizer = load_reward_model(str(out))
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
    # Scored on the base it trained against, the test pairs give the stage's own test metrics back
    # (bitsandbytes' inference kernels differ from its training ones in the last digits).
    rows = pref_rows(WORDS[8:])
    prompts = [r["prompt"] for r in rows]
    again = pair_metrics(score_replies(model, tokenizer, prompts, [r["chosen"] for r in rows]),
                         score_replies(model, tokenizer, prompts, [r["rejected"] for r in rows]))
    assert again["mean_margin"] == pytest.approx(metrics["test_mean_margin"], abs=1e-2)
