"""DPO, GRPO and RLOO (methods/) on a tiny model: the run directory, kill-and-resume, the shared base.

One tiny SFT run and one tiny reward run (module fixture) are the start of every method, as in the
pipeline. Each method trains 4 steps straight, and again in a child process killed right after its
step-2 checkpoint and resumed here: same adapter, same metrics.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from rlhf.core.data import write_jsonl
from rlhf.core.hooks import with_trainer_callbacks
from test_resume import (adapter_tensors, assert_same, comparable_metrics, kill_after_the_step_2_checkpoint,
                         pref_rows, sft_rows)

RUN_FILES = ("adapter_model.safetensors", "adapter_config.json", "config.yaml", "metrics.json", "curves.png",
             "log_history.json", "tokenizer_config.json", "eval_samples.jsonl")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def starts(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """The tiny SFT and reward runs every method starts from, and the data files."""
    from reward.train import run as run_reward
    from sft.train import run as run_sft

    root = tmp_path_factory.mktemp("methods")
    files = {"sft": root / "sft.jsonl", "prefs": root / "prefs.jsonl", "prompts": root / "prompts.jsonl"}
    write_jsonl(files["sft"], sft_rows())
    write_jsonl(files["prefs"], pref_rows())
    write_jsonl(files["prompts"], [{"prompt": r["prompt"]} for r in pref_rows()])
    common = ["--model_name_or_path", str(tiny_model_dir), "--validation_size", "4", "--test_size", "4",
              "--max_steps", "2", "--save_steps", "2", "--eval_steps", "2", "--logging_steps", "1",
              "--per_device_train_batch_size", "4", "--learning_rate", "5e-3", "--lora_r", "4", "--lora_alpha", "8"]
    run_sft(argv=common + ["--train_file", str(files["sft"]), "--output_dir", str(root / "sft_run")])
    run_reward(argv=common + ["--train_file", str(files["prefs"]), "--output_dir", str(root / "reward_run")])
    return {**files, "sft_run": root / "sft_run", "reward_run": root / "reward_run", "root": root}


def method_argv(method: str, starts: dict, out: Path) -> list[str]:
    argv = ["--sft_model", str(starts["sft_run"]), "--reward_model", str(starts["reward_run"]),
            "--output_dir", str(out), "--max_steps", "4", "--save_steps", "2", "--logging_steps", "1",
            "--per_device_train_batch_size", "4", "--learning_rate", "5e-3", "--seed", "7",
            "--eval_prompts", "2", "--eval_batch_size", "2", "--eval_max_new_tokens", "4"]
    if method == "dpo":
        return argv + ["--train_file", str(starts["prefs"]), "--validation_size", "4", "--test_size", "4",
                       "--eval_steps", "2", "--max_length", "64"]
    return argv + ["--train_file", str(starts["prompts"]), "--test_size", "4", "--num_generations", "2", "--beta", "0.04",
                   "--max_completion_length", "6"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dpo", "grpo", "rloo"])
def test_method_trains_resumes_and_generates(method, starts, tmp_path):
    from rlhf.core.generation import SamplingArguments, generate_replies, load_for_generation

    run = importlib.import_module(f"rlhf.methods.{method}").run
    straight = tmp_path / "straight"
    metrics = run(argv=method_argv(method, starts, straight))
    for name in RUN_FILES:
        assert (straight / name).exists(), name
    assert not (straight / "ref").exists() and not (straight / "reward").exists()  # only the policy adapter
    assert not straight.with_name("straight.tmp").exists()
    assert metrics["reference"] == "frozen adapter 'ref' on the shared base"
    for key in ("eval_policy_reward_model_score", "eval_policy_kl_to_reference", "eval_policy_distinct_2"):
        assert key in metrics
    # The policy moved away from the SFT adapter it started from.
    sft = adapter_tensors(starts["sft_run"])
    trained = adapter_tensors(straight)
    assert trained.keys() == sft.keys()
    assert any(not torch.equal(trained[k], sft[k]) for k in sft)

    resumed = tmp_path / "resumed"
    argv = method_argv(method, starts, resumed)
    kill_after_the_step_2_checkpoint(f"rlhf.methods.{method}", argv, tmp_path)
    steps: list[int] = []

    class StepsSeen(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            steps.append(state.global_step)

    run(argv=argv + ["--resume"], hooks=with_trainer_callbacks(StepsSeen()))
    assert steps == [3, 4]
    a, b = adapter_tensors(straight), adapter_tensors(resumed)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)
    assert_same(comparable_metrics(resumed), comparable_metrics(straight), "metrics")

    # rlhf generate reads it: the adapter on the base it was trained on.
    model, tokenizer = load_for_generation(str(resumed))
    replies = generate_replies(model, tokenizer, ["write a short review of the tea"],
                               SamplingArguments(max_new_tokens=4), progress=False)
    assert len(replies) == 1 and len(replies[0]) == 1


@pytest.mark.slow
def test_dpo_reference_is_the_sft_adapter(starts, tmp_path):
    """After training, the logits under TRL's "ref" adapter equal the SFT adapter's, loaded on its own,
    while the trained adapter's differ; the trainer holds no second model."""
    from rlhf.methods.dpo import run
    from rlhf.core.runs import load_run

    ids = torch.tensor([[3, 10, 11, 12, 13, 14, 15]])
    seen = {}

    class Probe(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            from trl.trainer.utils import use_adapter

            seen["adapters"] = sorted(model.peft_config)
            was = model.training
            model.eval()
            with torch.no_grad():
                with use_adapter(model, "ref"):
                    seen["ref"] = model(input_ids=ids).logits
                seen["policy"] = model(input_ids=ids).logits
            model.train(was)

    argv = method_argv("dpo", starts, tmp_path / "dpo") + ["--max_steps", "2", "--eval_prompts", "0"]
    metrics = run(argv=argv, hooks=with_trainer_callbacks(Probe()))
    sft_model, _ = load_run(starts["sft_run"])
    with torch.no_grad():
        expected = sft_model(input_ids=ids).logits
    assert seen["adapters"] == ["default", "ref", "reward"]  # one base: policy, reference, reward adapters
    torch.testing.assert_close(seen["ref"], expected, rtol=0, atol=1e-6)
    assert not torch.allclose(seen["policy"], expected, atol=1e-6)
    assert metrics["reference"] == "frozen adapter 'ref' on the shared base"


@pytest.mark.slow
def test_reward_function_scores_like_the_reward_model(starts):
    """The reward function (the reward adapter switched on inside it, on the policy's base) gives the
    scores of the stand-alone reward model loaded from its run directory, and leaves the policy active."""
    from rlhf.methods.common import POLICY, adapter_reward
    from rlhf.core.adapters import AdapterRegistry
    from rlhf.core.formatting import as_messages, encode_reply
    from rlhf.core.models import load_base_model
    from rlhf.core.runs import load_run, read_run
    from rlhf.core.scoring import score_replies

    reward_model, tokenizer = load_run(starts["reward_run"], "seq-cls")
    registry = AdapterRegistry(load_base_model(read_run(starts["sft_run"]).base_args(), "causal-lm"))
    registry.load(POLICY, starts["sft_run"], trainable=True)
    registry.load("reward", starts["reward_run"], trainable=False)
    prompts = ["write a short review of the tea", "describe the river"]
    replies = ["the tea is lovely and i love it .", "it is awful"]
    found = adapter_reward(registry, tokenizer)(
        prompts=[as_messages(p) for p in prompts], completions=replies,
        completion_ids=[encode_reply(tokenizer, r) for r in replies])  # TRL's completion ids end with EOS
    expected = score_replies(reward_model, tokenizer, prompts, replies)
    assert found == pytest.approx(expected, abs=1e-5)
    assert registry.peft_model.active_adapter == POLICY
    assert all(p.requires_grad for p in registry.parameters_of(POLICY))
    assert registry.parameters_of("reward") == []



@pytest.mark.slow
def test_reward_function_scores_a_cut_off_reply_as_ppo_does(starts):
    """GRPO and RLOO score a completion without EOS (cut off at the length limit) with
    missing_eos_penalty, as PPO does; a finished one keeps the reward model's score."""
    from rlhf.core.adapters import AdapterRegistry
    from rlhf.core.formatting import as_messages, encode_reply
    from rlhf.core.models import load_base_model, load_tokenizer
    from rlhf.core.runs import read_run
    from rlhf.methods.common import POLICY, adapter_reward

    tokenizer = load_tokenizer(starts["sft_run"])
    registry = AdapterRegistry(load_base_model(read_run(starts["sft_run"]).base_args(), "causal-lm"))
    registry.load(POLICY, starts["sft_run"], trainable=True)
    registry.load("reward", starts["reward_run"], trainable=False)
    prompts = [as_messages("describe the river")] * 2
    finished = encode_reply(tokenizer, "it is lovely")
    assert finished[-1] == tokenizer.eos_token_id
    cut_off = finished[:-1]
    kwargs = dict(prompts=prompts, completions=["it is lovely"] * 2, completion_ids=[finished, cut_off])
    plain = adapter_reward(registry, tokenizer)(**kwargs)
    assert plain[0] != -7.5
    assert adapter_reward(registry, tokenizer, -7.5)(**kwargs) == [pytest.approx(plain[0]), -7.5]

@pytest.mark.slow
def test_pipeline_method_key_runs_the_method_from_the_finished_stages(starts, tmp_path):
    """``method: grpo`` runs GRPO after the (finished, skipped) SFT and reward runs, into <root>/grpo."""
    import shutil

    from rlhf.core.config import load_yaml
    from rlhf.app.pipeline import run_pipeline

    root = tmp_path / "runs"
    shutil.copytree(starts["sft_run"], root / "sft")
    shutil.copytree(starts["reward_run"], root / "reward")
    config = tmp_path / "grpo.yaml"
    argv = method_argv("grpo", starts, root / "unused")
    settings = {k[2:]: v for k, v in zip(argv[::2], argv[1::2]) if k not in ("--sft_model", "--reward_model")}
    settings.update(output_dir=str(root / "elsewhere"), max_steps=1, eval_prompts=0)
    config.write_text("".join(f"{k}: {v}\n" for k, v in settings.items()))
    outputs = run_pipeline(["--output_root", str(root), "--method", "grpo", "--grpo_config", str(config),
                            "--label_config", "null"])
    assert outputs["grpo"] == str(root / "grpo")
    assert json.loads((root / "grpo" / "metrics.json").read_text())["num_generations"] == 2
    assert load_yaml(root / "grpo" / "config.yaml")["sft_model"] == str(root / "sft")


@pytest.mark.parametrize("method", ["dpo", "rloo"])
@pytest.mark.slow
def test_runs_that_cannot_share_a_base_are_refused_before_any_output(method, starts, tmp_path):
    """Swapped SFT and reward runs: a one-line error naming the key, and no output directory at all."""
    from rlhf.core.errors import UserError

    run = importlib.import_module(f"rlhf.methods.{method}").run
    argv = method_argv(method, starts, tmp_path / "out")
    swapped = [{str(starts["sft_run"]): str(starts["reward_run"]),
                str(starts["reward_run"]): str(starts["sft_run"])}.get(a, a) for a in argv]
    with pytest.raises(UserError, match="sft_model: expected an SFT stage output"):
        run(argv=swapped)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()
