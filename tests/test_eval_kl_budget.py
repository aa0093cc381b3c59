"""`rlhf eval` holds a PPO run's KL against its kl_target only where the two measure the same thing."""

from __future__ import annotations

import yaml

from rlhf.core.generation import SamplingArguments
from rlhf.eval.evaluate import kl_budget


def ppo_run(tmp_path, **config):
    run = tmp_path / "ppo"
    run.mkdir()
    sft = tmp_path / "sft"
    sft.mkdir(exist_ok=True)
    base = {"sft_model": str(sft), "kl_target": 4.0, "kl_controller": "adaptive", "max_new_tokens": 32,
            "temperature": 0.7, "do_sample": True}
    (run / "config.yaml").write_text(yaml.safe_dump({**base, **config}))
    return run, sft


def test_the_target_applies_to_the_same_reference_and_sampling(tmp_path):
    run, sft = ppo_run(tmp_path)
    assert kl_budget(str(run), None, str(sft), SamplingArguments(max_new_tokens=32, temperature=0.7)) == (4.0, None)


def test_another_reply_length_is_not_compared(tmp_path):
    run, sft = ppo_run(tmp_path)
    budget, note = kl_budget(str(run), None, str(sft), SamplingArguments(max_new_tokens=48, temperature=0.7))
    assert budget is None and "max_new_tokens 32" in note and "--max_new_tokens 32" in note


def test_another_temperature_is_not_compared(tmp_path):
    run, sft = ppo_run(tmp_path)
    budget, note = kl_budget(str(run), None, str(sft), SamplingArguments(max_new_tokens=32, temperature=1.0))
    assert budget is None and "temperature" in note


def test_greedy_replies_are_not_compared(tmp_path):
    run, sft = ppo_run(tmp_path)
    budget, note = kl_budget(str(run), None, str(sft), SamplingArguments(max_new_tokens=32, temperature=0.7,
                                                                           do_sample=False))
    assert budget is None and "do_sample" in note


def test_another_reference_is_not_compared(tmp_path):
    run, sft = ppo_run(tmp_path)
    base = tmp_path / "base"
    base.mkdir()
    budget, note = kl_budget(str(run), None, str(base), SamplingArguments(max_new_tokens=32, temperature=0.7))
    assert budget is None and f"--reference {sft}" in note


def test_a_fixed_kl_coefficient_has_no_target(tmp_path):
    run, sft = ppo_run(tmp_path, kl_controller="fixed")
    budget, note = kl_budget(str(run), None, str(sft), SamplingArguments(max_new_tokens=32, temperature=0.7))
    assert budget is None and "fixed" in note


def test_a_given_budget_applies_as_given(tmp_path):
    run, _ = ppo_run(tmp_path, kl_controller="fixed")
    assert kl_budget(str(run), 2.5, str(tmp_path / "other"), SamplingArguments()) == (2.5, None)


def test_a_run_without_a_target_has_no_budget_and_no_note(tmp_path):
    run = tmp_path / "sft_run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"learning_rate": 1e-4}))
    assert kl_budget(str(run), None, str(run), SamplingArguments()) == (None, None)
