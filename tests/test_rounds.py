"""Labeling rounds (rlhf/app/rounds.py, rlhf pipeline --rounds): the loop on tiny models, a stop for labels and
its continuation, a kill mid-round; PPO continuing from an earlier policy; the reward model's warm start."""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from rlhf.label.annotate import annotate_campaign
from rlhf.label.store import Campaign
from rlhf.core.errors import UserError
from rlhf.core.hooks import StageHooks
from rlhf.app.pipeline import run_pipeline
from rlhf.app.rounds import RoundsArguments, pair_accuracy, prompt_slice

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------
# Pure helpers
# ----------------------------------------------------------------------------------------------


def test_pair_accuracy_leaves_out_pairs_without_a_right_answer():
    # truth > 0: a is better. Right, wrong, zero prediction (half), and a true tie (left out).
    assert pair_accuracy([1.0, 2.0, 0.5, 0.0], [0.3, -1.0, 0.0, 4.0]) == pytest.approx(1.5 / 3)
    assert pair_accuracy([0.0], [1.0]) is None


def test_prompt_slices_differ_from_round_to_round_and_wrap_around():
    prompts = list(range(10))
    first, second, third = (prompt_slice(prompts, 4, r, seed=0) for r in (1, 2, 3))
    assert len(set(first) | set(second)) == 8  # rounds 1 and 2 share no prompt
    assert len(third) == 4 and len(set(first + second + third)) == 10  # round 3 wraps around
    assert sorted(prompt_slice(prompts, None, 5, 0)) == prompts


# ----------------------------------------------------------------------------------------------
# The loop on tiny models
# ----------------------------------------------------------------------------------------------


def _tiny_configs(directory: Path, model: Path) -> dict[str, Path]:
    """configs/tiny/* made smaller still: 2 steps per stage, PPO checkpoints every step."""
    configs = {}
    for stage, changes in (("sft", {"max_steps": 2, "eval_steps": 2}),
                           ("reward", {"max_steps": 2, "eval_steps": 2, "max_train_samples": 16,
                                       "test_file": "data/demo/prefs_validation.jsonl"}),
                           ("ppo", {"max_steps": 2, "save_steps": 1, "eval_prompts": 0}),  # as make demo: rounds turn it on
                           ("rounds", {}),
                           ("label", {"max_prompts": 6})):
        config = yaml.safe_load((REPO / "configs/tiny" / f"{stage}.yaml").read_text())
        config.update(changes)
        for key in ("train_file", "validation_file", "test_file", "prompts_file"):
            if key in config:
                config[key] = str(REPO / config[key])
        configs[stage] = directory / f"{stage}.yaml"
        configs[stage].write_text(yaml.safe_dump(config))
    return configs


def _pipeline_argv(configs: dict[str, Path], root: Path, model: Path, *extra: str) -> list[str]:
    return ["--sft_config", str(configs["sft"]), "--label_config", str(configs["label"]),
            "--reward_config", str(configs["reward"]),
            "--ppo_config", str(configs["ppo"]), "--rounds_config", str(configs["rounds"]),
            "--output_root", str(root), "--model_name_or_path", str(model), *extra]


@pytest.fixture(scope="module")
def round0(tiny_model_dir, tmp_path_factory) -> dict:
    """SFT -> reward -> PPO on the tiny model, once; tests copy it."""
    directory = tmp_path_factory.mktemp("rounds")
    configs = _tiny_configs(directory, tiny_model_dir)
    root = directory / "runs"
    run_pipeline(_pipeline_argv(configs, root, tiny_model_dir))
    return {"configs": configs, "root": root, "model": tiny_model_dir}


def _copy(round0: dict, tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    shutil.copytree(round0["root"], root)
    return root


@pytest.mark.slow
def test_two_rounds_with_the_demo_annotator(round0, tmp_path, capsys):
    root = _copy(round0, tmp_path)
    outputs = run_pipeline(_pipeline_argv(round0["configs"], root, round0["model"], "--rounds", "2"))
    assert "waiting_for_labels" not in outputs
    one, two = (json.loads((root / f"round-{r}" / "metrics.json").read_text()) for r in (1, 2))
    for m in (one, two):
        # 6 pairs chosen: round(6 * 0.34) = 2 random, 4 uncertain; every one labeled by the annotator.
        assert (m["pairs"], m["uncertain_pairs"], m["random_pairs"], m["labels"]) == (6, 4, 2, 6)
        assert m["ppo_steps"] == 2 and m["kl"] is not None and m["response_length"] > 0
        assert 0 <= m["win_rate"] <= 1 and 0 <= m["start_win_rate"] <= 1
        assert m["win_rate_ci"][0] <= m["win_rate"] <= m["win_rate_ci"][1]
        for key in ("rm_annotator_accuracy_before", "rm_annotator_accuracy_after"):
            assert m[key] is None or 0 <= m[key] <= 1
        assert set(m["campaign_rm_accuracy"]) >= {"uncertain", "random", "all"}
    # Round 2 starts where round 1 ended: its start samples are round 1's end samples, its PPO continues
    # round 1's policy against round 2's reward model, with SFT as reference.
    assert (root / "round-2/start_samples.jsonl").read_text() == (root / "round-1/end_samples.jsonl").read_text()
    assert two["start_win_rate"] == one["win_rate"]
    ppo2 = yaml.safe_load((root / "round-2/ppo/config.yaml").read_text())
    assert ppo2["policy_model"] == str(root / "round-1/ppo")
    assert ppo2["reward_model"] == str(root / "round-2/reward")
    assert ppo2["sft_model"] == str(root / "sft")
    ppo1 = json.loads((root / "round-1/ppo/metrics.json").read_text())
    assert ppo2["kl_coef"] == pytest.approx(ppo1["final_kl_coef"])  # the adaptive controller continues
    # reward_init: previous: round 2's reward model starts from round 1's (the stage's warm_start key).
    assert yaml.safe_load((root / "round-2/reward/config.yaml").read_text())["warm_start"] == str(root / "round-1/reward")
    # Reward training: all labels so far, this round's random pairs held out (and measured on).
    labels1 = [json.loads(x) for x in (root / "round-1/labels.jsonl").read_text().splitlines()]
    train2 = [json.loads(x) for x in (root / "round-2/reward_train.jsonl").read_text().splitlines()]
    test2 = [json.loads(x) for x in (root / "round-2/reward_test.jsonl").read_text().splitlines()]
    assert all(row in train2 for row in labels1)  # round 1's labels, its random pairs included
    assert test2 and all(row["chosen_as"] == "random" and row not in train2 for row in test2)
    assert two["rm_accuracy_pairs"] == len(test2) and two["rm_accuracy_before"] is not None
    original = 16  # the reward config's max_train_samples does not cut the labels off
    assert two["reward_train_pairs"] == len(train2) > original
    summary = (root / "rounds.md").read_text()
    assert "| 0 (pipeline) |" in summary and "| 1 |" in summary and "| 2 |" in summary
    assert "| 2 |" in capsys.readouterr().out
    # A rerun finds every round finished and does nothing.
    before = (root / "round-2/metrics.json").stat().st_mtime
    run_pipeline(_pipeline_argv(round0["configs"], root, round0["model"], "--rounds", "2"))
    assert (root / "round-2/metrics.json").stat().st_mtime == before


@pytest.mark.slow
def test_campaign_labeler_stops_for_labels_and_a_rerun_continues(round0, tmp_path, capsys):
    root = _copy(round0, tmp_path)
    argv = _pipeline_argv(round0["configs"], root, round0["model"], "--rounds", "1")
    rounds = yaml.safe_load(round0["configs"]["rounds"].read_text())
    config = tmp_path / "rounds.yaml"
    config.write_text(yaml.safe_dump({**rounds, "labeler": "campaign", "k": 2}))
    argv[argv.index("--rounds_config") + 1] = str(config)
    outputs = run_pipeline(argv)
    campaign_dir = root / "round-1" / "campaign"
    assert outputs["waiting_for_labels"] == str(campaign_dir)
    out = capsys.readouterr().out
    assert f"rlhf label serve {campaign_dir} --k 2" in out and "rerun" in out
    assert not (root / "round-1/reward").exists() and not (root / "round-1/metrics.json").exists()
    campaign = Campaign(campaign_dir)
    pairs = campaign.pairs()
    # People label: one annotator gives each pair one label (k = 2 wants two): still waiting.
    annotate_campaign(campaign, noise=0.25, name="ann1")
    assert run_pipeline(argv)["waiting_for_labels"] == str(campaign_dir)
    assert Campaign(campaign_dir).pairs() == pairs  # the same campaign, not sampled again
    annotate_campaign(campaign, noise=0.25, name="ann2", seed=1)
    outputs = run_pipeline(argv)
    assert "waiting_for_labels" not in outputs
    m = json.loads((root / "round-1/metrics.json").read_text())
    assert m["labels"] == 12 and m["pairs"] == 6 and m["labeler"] == "campaign"
    assert "rm_annotator_accuracy_before" not in m  # the demo annotator is no judge of people's labels
    assert Campaign(campaign_dir).pairs() == pairs


@pytest.mark.slow
def test_a_kill_mid_round_resumes_where_it_stopped(round0, tmp_path, monkeypatch, caplog):
    import rlhf.ppo.trainer

    root = _copy(round0, tmp_path)
    argv = _pipeline_argv(round0["configs"], root, round0["model"], "--rounds", "1")
    original = rlhf.ppo.trainer.run

    class Kill(StageHooks):
        def on_checkpoint(self, step, path):
            raise KeyboardInterrupt

    def killed_after_first_checkpoint(config=None, hooks=None, *, argv=None):
        return original(config, Kill(), argv=argv)

    monkeypatch.setattr(rlhf.ppo.trainer, "run", killed_after_first_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(argv)
    round_dir = root / "round-1"
    assert (round_dir / "ppo.tmp" / "checkpoint-1").is_dir() and not (round_dir / "metrics.json").exists()
    reward_mtime = (round_dir / "reward" / "metrics.json").stat().st_mtime
    labels = Campaign(round_dir / "campaign").labels()

    monkeypatch.setattr(rlhf.ppo.trainer, "run", original)
    with caplog.at_level("INFO"):
        run_pipeline(argv)
    assert any("resuming from" in r.getMessage() and "checkpoint-1" in r.getMessage() for r in caplog.records)
    m = json.loads((round_dir / "metrics.json").read_text())
    assert m["ppo_steps"] == 2
    assert (round_dir / "reward" / "metrics.json").stat().st_mtime == reward_mtime  # not trained again
    assert Campaign(round_dir / "campaign").labels() == labels  # not sampled or labeled again


@pytest.mark.slow
def test_rounds_need_ppo_and_valid_settings(round0, tmp_path):
    root = _copy(round0, tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("labeler: people\n")
    argv = _pipeline_argv(round0["configs"], root, round0["model"], "--rounds", "1")
    argv[argv.index("--rounds_config") + 1] = str(bad)
    with pytest.raises(UserError, match="labeler: expected one of annotator, campaign, found 'people'"):
        run_pipeline(argv)


@pytest.mark.parametrize("bad, message", [
    # The annotator labels a pair once: with k = 2 a round would wait for labels nobody gives.
    ({"k": 2}, "k: the demo annotator gives each pair one label"),
    ({"labeler": "campaign", "k": 0}, "k: expected at least 1"),
    ({"labeler": "campaign", "min_labeled_share": 1.5}, "min_labeled_share: expected a number from 0 to 1"),
    ({"annotator_noise": -1}, "annotator_noise: expected a number >= 0"),
    ({"random_share": -0.1}, "random_share: expected a number from 0 to 1"),
])
def test_rounds_check_who_labels_as_the_label_stage_does(bad, message):
    with pytest.raises(UserError, match=message):
        RoundsArguments(**bad)
    RoundsArguments(labeler="campaign", k=2)  # people may give a pair several labels


# ----------------------------------------------------------------------------------------------
# The pieces: PPO from an earlier policy, the reward model's warm start
# ----------------------------------------------------------------------------------------------


def _adapter_weights(directory: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(directory / "adapter_model.safetensors"))


@pytest.mark.slow
def test_ppo_policy_model_starts_the_policy_from_an_earlier_ppo_run(round0):
    import torch
    from peft import get_peft_model_state_dict

    from rlhf.ppo.trainer import build_roles, check_policy_model, parse_ppo
    from rlhf.core.runs import check_shared_base

    root = round0["root"]
    model_args, _, args, _, _ = parse_ppo(argv=["--config", str(round0["configs"]["ppo"]), "--sft_model", str(root / "sft"),
                                                "--reward_model", str(root / "reward"), "--policy_model", str(root / "ppo")])
    registry, reference = build_roles(model_args, args, torch.device("cpu"))
    assert reference == "reference"
    for role, directory in (("policy", root / "ppo"), ("reference", root / "sft")):
        saved = _adapter_weights(directory)
        live = get_peft_model_state_dict(registry.peft_model, adapter_name=role)
        assert saved.keys() == live.keys()
        for key in saved:
            torch.testing.assert_close(live[key], saved[key])
    # The PPO policy moved away from SFT, so the two roles really differ.
    assert any(not torch.equal(a, b) for a, b in zip(_adapter_weights(root / "ppo").values(),
                                                    _adapter_weights(root / "sft").values()))
    shared = check_shared_base(root / "sft", root / "reward", model_args)
    with pytest.raises(UserError, match="policy_model: expected a LoRA policy adapter"):
        check_policy_model(str(root / "reward"), shared)
    with pytest.raises(UserError, match="policy_model: expected an earlier PPO output, found no"):
        check_policy_model(str(root / "nothing"), shared)


@pytest.mark.slow
def test_reward_warm_start_copies_the_previous_adapter_and_head(round0):
    from peft import get_peft_model

    from rlhf.core.models import ModelArguments, build_peft_config, load_base_model
    from reward.train import load_adapter_weights
    from rlhf.core.runs import load_run
    from rlhf.core.scoring import score_replies

    previous = round0["root"] / "reward"
    config = yaml.safe_load((previous / "config.yaml").read_text())
    args = ModelArguments(model_name_or_path=str(round0["model"]), lora_r=config["lora_r"],
                          lora_alpha=config["lora_alpha"])
    base = load_base_model(args, "seq-cls")
    fresh = get_peft_model(base, build_peft_config(args, base, "seq-cls"))
    prompts, replies = ["write a short review of tea"] * 3, ["tea is good", "tea is bad", "i love it"]
    trained, tokenizer = load_run(str(previous), "seq-cls")
    want = score_replies(trained, tokenizer, prompts, replies)
    assert score_replies(fresh, tokenizer, prompts, replies) != pytest.approx(want, abs=1e-4)
    load_adapter_weights(fresh, str(previous))  # what the reward stage's warm_start does before training
    assert score_replies(fresh, tokenizer, prompts, replies) == pytest.approx(want, abs=1e-5)
