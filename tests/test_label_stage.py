"""The label stage: the SFT policy's own replies, labelled, split by prompt; a kill and rerun labels the same."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf.core.errors import UserError
from rlhf.label.stage import run, split_prompts

THINGS = ["tea", "pizza", "city", "river", "book", "movie", "garden", "coffee", "bread", "beach"]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("label") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"write a short review of the {t}"}) + "\n" for t in THINGS))
    return path


def config(model: Path, prompts: Path, out: Path, **extra) -> dict:
    return {"sft_model": str(model), "prompts_file": str(prompts), "output_dir": str(out), "samples_per_prompt": 4,
            "max_new_tokens": 8, "batch_size": 16, "validation_share": 0.2, "test_share": 0.2, "seed": 3, **extra}


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def outputs(out: Path) -> dict[str, list[dict]]:
    return {name: read(out / f"{name}.jsonl") for name in ("train", "validation", "test")}


@pytest.fixture(scope="module")
def straight(tiny_model_dir, prompts_file, tmp_path_factory, one_thread) -> Path:
    out = tmp_path_factory.mktemp("straight") / "label"
    run(config(tiny_model_dir, prompts_file, out))
    return out


@pytest.mark.slow
def test_pairs_of_own_replies_split_by_prompt(straight):
    from rlhf.demo.annotator import annotator_score

    parts = outputs(straight)
    metrics = json.loads((straight / "metrics.json").read_text())
    assert metrics["train_pairs"] == len(parts["train"]) > 0 and metrics["test_pairs"] == len(parts["test"]) > 0
    prompts = {name: {r["prompt"] for r in rows} for name, rows in parts.items()}
    assert not (prompts["train"] & prompts["test"]) and not (prompts["train"] & prompts["validation"])
    assert len(prompts["test"]) == 2 and len(prompts["validation"]) == 2  # 20 % of 10 prompts each
    # Up to 4 replies a prompt: at most 6 pairs each.
    assert max(sum(r["prompt"] == p for r in parts["train"]) for p in prompts["train"]) <= 6
    # The test pairs carry the noiseless annotator's choice; the training labels are noisy.
    for row in parts["test"]:
        text = row["prompt"]
        assert annotator_score(text, row["chosen"]) > annotator_score(text, row["rejected"])
    assert 0.5 < metrics["label_agreement_with_noiseless"] <= 1.0


@pytest.mark.slow
def test_a_kill_while_labelling_then_a_rerun_gives_the_same_labels(straight, tiny_model_dir, prompts_file,
                                                                   tmp_path):
    out = tmp_path / "label"
    cfg = config(tiny_model_dir, prompts_file, out)
    # A hard kill (os._exit, as kill -9 leaves it) after the 5th label is stored.
    code = f"""
import os, sys
from rlhf.label.store import Campaign
from rlhf.label.stage import run
original, calls = Campaign.submit_label, []
def submit(self, *args, **kwargs):
    result = original(self, *args, **kwargs)
    calls.append(1)
    if len(calls) == 5:
        os._exit(137)
    return result
Campaign.submit_label = submit
run({cfg!r})
"""
    killed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert killed.returncode == 137, killed.stderr[-2000:]
    assert (out / "campaign").exists() and not (out / "metrics.json").exists()
    run(cfg)
    assert outputs(out) == outputs(straight)


@pytest.mark.slow
def test_a_kill_while_sampling_leaves_no_half_campaign(tiny_model_dir, prompts_file, tmp_path):
    out = tmp_path / "label"
    cfg = config(tiny_model_dir, prompts_file, out)
    code = f"""
import os
import rlhf.label.ingest as ingest
def die(*args, **kwargs):
    os._exit(137)
ingest.Campaign.add_responses = die
from rlhf.label.stage import run
run({cfg!r})
"""
    killed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert killed.returncode == 137, killed.stderr[-2000:]
    assert not (out / "campaign").exists()


@pytest.mark.slow
def test_a_campaign_waits_for_people_and_a_rerun_continues(tiny_model_dir, prompts_file, tmp_path, capsys):
    from rlhf.label.annotate import annotate_campaign
    from rlhf.label.store import Campaign

    out = tmp_path / "label"
    cfg = config(tiny_model_dir, prompts_file, out, labeler="campaign")
    waiting = run(cfg)
    assert waiting == {"waiting_for_labels": str(out / "campaign")}
    assert "rlhf label serve" in capsys.readouterr().out
    assert not (out / "metrics.json").exists()
    annotate_campaign(Campaign(out / "campaign"), noise=0.0, name="alice")  # people label it
    metrics = run(cfg)
    assert metrics["labeler"] == "campaign" and "label_agreement_with_noiseless" not in metrics
    assert (out / "metrics.json").exists()


@pytest.mark.slow
def test_a_finished_stage_is_not_overwritten_silently(straight, tiny_model_dir, prompts_file):
    with pytest.raises(UserError, match="overwrite_output_dir"):
        run(config(tiny_model_dir, prompts_file, straight))


@pytest.mark.parametrize("bad, message", [
    ({"labeler": "crowd"}, "labeler: expected one of annotator, campaign"),
    ({"samples_per_prompt": 1}, "samples_per_prompt: expected at least 2"),
    ({"validation_share": 0.5, "test_share": 0.5}, "expected below 1"),
    ({"sft_model": "no/such/run"}, "sft_model: expected an SFT stage output"),
    ({"k": 2}, "k: the demo annotator gives each pair one label"),
])
def test_bad_settings_are_refused_before_any_work(bad, message, tiny_model_dir, prompts_file, tmp_path):
    with pytest.raises(UserError, match=message):
        run(config(tiny_model_dir, prompts_file, tmp_path / "out", **bad))
    assert not (tmp_path / "out").exists()


def test_split_is_by_prompt_and_seeded():
    prompts = [f"p{i}" for i in range(20)] * 3
    split = split_prompts(prompts, 0.1, 0.2, seed=0)
    assert sorted(split.values()).count("test") == 4 and sorted(split.values()).count("validation") == 2
    assert split == split_prompts(list(reversed(prompts)), 0.1, 0.2, seed=0)
    assert split != split_prompts(prompts, 0.1, 0.2, seed=1)


def _tiny_pipeline_configs(directory: Path) -> list[str]:
    """configs/tiny/{sft,label,reward}.yaml with repository paths, 2 steps each."""
    import yaml

    repo = Path(__file__).resolve().parents[1]
    argv = []
    for stage, changes in (("sft", {"max_steps": 2, "eval_steps": 2}), ("label", {"max_prompts": 6}),
                           ("reward", {"max_steps": 2, "eval_steps": 2})):
        config = yaml.safe_load((repo / "configs/tiny" / f"{stage}.yaml").read_text())
        config.update(changes)
        for key in ("train_file", "validation_file", "test_file", "prompts_file"):
            if key in config:
                config[key] = str(repo / config[key])
        path = directory / f"{stage}.yaml"
        path.write_text(yaml.safe_dump(config))
        argv += [f"--{stage}_config", str(path)]
    return argv


@pytest.mark.slow
def test_a_pipeline_killed_in_the_label_stage_resumes_to_the_same_labels_and_reward_model(tiny_model_dir, tmp_path,
                                                                                        one_thread):
    """SFT -> label -> reward, killed (os._exit, as kill -9) while the annotator labels, then rerun, gives the
    labels and the reward adapter of a run never interrupted; the reward model trained on the label pairs."""
    from safetensors.torch import load_file

    from rlhf.app.pipeline import run_pipeline

    argv = _tiny_pipeline_configs(tmp_path) + ["--model_name_or_path", str(tiny_model_dir),
                                               "--stages", "sft", "label", "reward"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_pipeline(argv + ["--output_root", str(straight)])
    code = f"""
import os
from rlhf.label.store import Campaign
from rlhf.app.pipeline import run_pipeline
original, calls = Campaign.submit_label, []
def submit(self, *args, **kwargs):
    result = original(self, *args, **kwargs)
    calls.append(1)
    if len(calls) == 3:
        os._exit(137)
    return result
Campaign.submit_label = submit
run_pipeline({argv + ["--output_root", str(resumed)]!r})
"""
    killed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    assert killed.returncode == 137, killed.stderr[-2000:]
    assert (resumed / "sft" / "metrics.json").exists() and not (resumed / "label" / "metrics.json").exists()
    run_pipeline(argv + ["--output_root", str(resumed)])
    assert outputs(resumed / "label") == outputs(straight / "label")
    reward_config = (straight / "reward" / "config.yaml").read_text()
    assert str(straight / "label" / "train.jsonl") in reward_config
    weights = [load_file(str(run / "reward" / "adapter_model.safetensors")) for run in (straight, resumed)]
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        assert (weights[0][key] == weights[1][key]).all(), key


def test_an_interrupted_stage_continues_only_with_its_own_settings(tiny_model_dir, prompts_file, tmp_path):
    from rlhf.label.store import Campaign

    out = tmp_path / "label"
    waiting = run(config(tiny_model_dir, prompts_file, out, labeler="campaign"))
    assert "waiting_for_labels" in waiting
    with pytest.raises(UserError, match="other settings \\(samples_per_prompt\\)"):
        run(config(tiny_model_dir, prompts_file, out, labeler="campaign", samples_per_prompt=3))
    run(config(tiny_model_dir, prompts_file, out, samples_per_prompt=3, overwrite_output_dir=True))
    pairs = Campaign(out / "campaign").pairs()
    assert max(sum(p["prompt"] == q["prompt"] for q in pairs) for p in pairs) <= 3  # resampled: 3 replies
