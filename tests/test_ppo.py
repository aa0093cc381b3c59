"""The PPO stage end to end on a tiny model: SFT -> reward model -> PPO, in seconds.

One module-scoped pipeline (a tiny SFT run and a tiny reward run) feeds every test:

1. smoke: a 4-step PPO run trains the policy and value roles, leaves reward and reference alone,
   and writes a complete output directory;
2. kill-and-resume: 4 steps straight == 2 steps, ``os._exit(137)``, ``--resume`` for 2 more;
3. guard: a NaN stops the run with NonFiniteError and keeps the last good checkpoint;
4. rollout invariants on a real ``PPOTrainer.generate`` batch (padding, EOS, ratio, KL, reward);
5. sampling settings come from our config, never from the model's generation_config;
6. the negative-KL and reward-collapse warnings.

Every model here runs on one thread: the tiny matmuls gain nothing from two, and on a busy 2-core
machine two threads spin-wait each other into a 50x slowdown.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from rlhf.ppo import math as pm
from rlhf.core.adapters import HEAD_FILE, read_score_head
from rlhf.core.data import write_jsonl
from rlhf.core.formatting import encode_prompt, encode_prompt_reply
from rlhf.core.hooks import StageHooks

REPO = Path(__file__).resolve().parents[1]
THINGS = ["coffee", "tea", "pizza", "bread", "cheese", "apple", "mango", "pasta", "soup", "salad",
          "beach", "city", "river", "forest", "museum", "phone", "laptop", "camera", "book", "movie"]
EOS_BIAS = 2.0  # added to the EOS logit while sampling in test 4, so some replies stop early


# -- the tiny pipeline ----------------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def pipeline(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """Tiny SFT and reward runs (LoRA) on the tiny model, plus PPO prompt files."""
    from reward.train import run as reward_run
    from sft.train import run as sft_run

    root = tmp_path_factory.mktemp("ppo_pipeline")
    sft_rows = [{"prompt": f"write a short review of the {w}", "completion": f"the {w} is {a} and i {v} it ."}
                for w in THINGS for a, v in (("good", "like"), ("bad", "hate"))]
    pref_rows = [{"prompt": f"write a short review of the {w}", "chosen": f"the {w} is lovely and i love it .",
                  "rejected": f"the {w} is awful ."} for w in THINGS]
    # Prompts of different lengths, so a rollout batch needs left padding.
    prompt_rows = [{"prompt": p} for w in THINGS for p in (f"give a short opinion on the {w}",
                                                            f"what do you think about the {w} ? reply in one sentence")]
    files = {}
    for name, rows in (("sft", sft_rows), ("prefs", pref_rows), ("prompts", prompt_rows[:32]),
                       ("prompts_test", prompt_rows[32:])):
        files[name] = root / f"{name}.jsonl"
        write_jsonl(files[name], rows)
    common = ["--model_name_or_path", str(tiny_model_dir), "--validation_file", "null", "--test_file", "null",
              "--validation_size", "4", "--test_size", "0", "--max_steps", "2", "--eval_steps", "2",
              "--learning_rate", "5e-3"]
    sft_run(argv=["--config", str(REPO / "configs/tiny/sft.yaml"), "--train_file", str(files["sft"]),
                  "--output_dir", str(root / "sft"), *common])
    reward_run(argv=["--config", str(REPO / "configs/tiny/reward.yaml"), "--train_file", str(files["prefs"]),
                     "--output_dir", str(root / "reward"), *common])
    return {"root": root, "model": tiny_model_dir, "sft": root / "sft", "reward": root / "reward",
            "prompts": files["prompts"], "prompts_test": files["prompts_test"]}


def ppo_argv(pipeline: dict[str, Path], out: Path, *extra: str) -> list[str]:
    """configs/tiny/ppo.yaml (4 steps, checkpoint every 2) on the tiny pipeline."""
    return ["--config", str(REPO / "configs/tiny/ppo.yaml"), "--model_name_or_path", str(pipeline["model"]),
            "--sft_model", str(pipeline["sft"]), "--reward_model", str(pipeline["reward"]),
            "--train_file", str(pipeline["prompts"]), "--test_file", str(pipeline["prompts_test"]),
            "--output_dir", str(out), "--learning_rate", "1e-3", *extra]


def capture_registry(monkeypatch) -> list:
    """Make rlhf.ppo.trainer.run hand us the AdapterRegistry it builds."""
    import rlhf.ppo.trainer

    built = []
    original = rlhf.ppo.trainer.build_roles

    def build_and_keep(*args, **kwargs):
        registry, reference = original(*args, **kwargs)
        built.append(registry)
        return registry, reference

    monkeypatch.setattr(rlhf.ppo.trainer, "build_roles", build_and_keep)
    return built


def make_trainer(pipeline: dict[str, Path], *extra: str, sft_model: Path | None = None, edit_model=None):
    """A PPOTrainer built the way rlhf.ppo.trainer.run builds it, without a run directory.
    ``edit_model(peft_model)`` runs on the loaded roles before the trainer is made."""
    from rlhf.core.models import load_tokenizer
    from rlhf.ppo.trainer import PPOTrainer, build_roles, parse_ppo

    argv = ppo_argv(pipeline, pipeline["root"] / "unused", *extra)
    if sft_model is not None:
        argv += ["--sft_model", str(sft_model)]
    model_args, data_args, args, sampling, _ = parse_ppo(argv=argv)
    prompts = [r["prompt"] for r in data_args.load("prompt")["train"]]
    registry, reference = build_roles(model_args, args, torch.device("cpu"))
    if edit_model is not None:
        edit_model(registry.peft_model)
    tokenizer = load_tokenizer(str(pipeline["sft"]))
    return PPOTrainer(args, sampling, registry, tokenizer, prompts, reference)


def adapter_state(registry, name: str) -> dict[str, torch.Tensor]:
    """In-memory weights of adapter ``name``, keyed as in its adapter_model.safetensors."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(registry.peft_model, adapter_name=name).items()}


def lora_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """The LoRA matrices of a saved adapter (no score head), by key."""
    return {k: v for k, v in load_file(str(directory / "adapter_model.safetensors")).items() if "lora_" in k}


def assert_all_equal(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    assert found.keys() == expected.keys() and found, what
    for key in expected:
        assert torch.equal(found[key], expected[key]), f"{what}: {key} changed"


def assert_some_differ(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    assert found.keys() == expected.keys() and found, what
    assert any(not torch.equal(found[k], expected[k]) for k in expected), f"{what}: nothing changed"


def comparable_metrics(run_dir: Path) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics.pop("wall_seconds")
    return metrics


# -- 1. smoke -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def straight_run(pipeline, tmp_path_factory):
    """4 PPO steps without interruption (checkpoints at 2 and 4); returns (output dir, registry)."""
    from rlhf.ppo.trainer import run

    monkeypatch = pytest.MonkeyPatch()
    built = capture_registry(monkeypatch)
    out = tmp_path_factory.mktemp("ppo_straight") / "ppo"
    try:
        run(argv=ppo_argv(pipeline, out))
    finally:
        monkeypatch.undo()
    return out, built[0]


@pytest.mark.slow
def test_smoke_trains_policy_and_value_only(pipeline, straight_run):
    from rlhf.core.generation import load_for_generation

    out, registry = straight_run
    sft, reward = pipeline["sft"], pipeline["reward"]
    # Trained roles moved away from where they started...
    assert_some_differ(lora_tensors(out), lora_tensors(sft), "policy vs SFT adapter")
    value, reward_lora = lora_tensors(out / "value"), lora_tensors(reward)
    assert_some_differ(value, reward_lora, "value vs reward adapter")
    value_head = load_file(str(out / "value" / HEAD_FILE))["weight"]
    assert not torch.equal(value_head.reshape(-1), read_score_head(reward).reshape(-1).float())
    # ...and the frozen ones did not move, in memory at the end of the run.
    assert_all_equal(adapter_state(registry, "reward"), lora_tensors(reward), "reward adapter")
    assert_all_equal(adapter_state(registry, "reference"), lora_tensors(sft), "reference adapter")
    assert torch.equal(registry.heads["reward"].weight.detach().reshape(-1), read_score_head(reward).reshape(-1).float())
    assert not any(p.requires_grad for n, p in registry.peft_model.named_parameters()
                   if ".reward." in n or ".reference." in n)

    # A complete output directory.
    assert not out.with_name(out.name + ".tmp").exists()
    model, tokenizer = load_for_generation(str(out))
    assert tokenizer.pad_token_id is not None and model.active_adapter == "default"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 4
    history = json.loads((out / "log_history.json").read_text())
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    for key in ("score", "kl", "entropy", "clipfrac", "approx_kl", "value_loss", "response_length"):
        assert key in history[-1] and f"final_{key}" in metrics, key
    assert (out / "curves.png").stat().st_size > 0
    samples = [json.loads(line) for line in (out / "eval_samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and {"prompt", "reference", "policy", "reference_score", "policy_score"} <= samples[0].keys()


# -- 2. kill and resume ---------------------------------------------------------------------------


class OnCheckpoint(StageHooks):
    """Hooks that call ``fn(step, path)`` after each checkpoint."""

    def __init__(self, fn):
        self.on_checkpoint = fn


KILL_AT_STEP_2 = textwrap.dedent("""
    import os, sys
    import torch
    torch.set_num_threads(1)
    from rlhf.core.hooks import StageHooks
    from rlhf.ppo.trainer import run

    class Die(StageHooks):
        def on_checkpoint(self, step, path):
            if step == 2:
                os._exit(137)  # no cleanup, no finally blocks: what a kill -9 leaves behind

    run(argv={argv!r}, hooks=Die())
    sys.exit(0)  # not reached when the hook fires
""")


def assert_killed_run_resumes_to(straight: Path, pipeline, tmp_path: Path, *extra: str) -> None:
    """Kill a run like ``straight`` (``extra`` args) after its step-2 checkpoint, resume it, and check
    it ends with the same policy, value model and metrics."""
    from rlhf.ppo.trainer import run

    resumed = tmp_path / "ppo"
    argv = ppo_argv(pipeline, resumed, *extra)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.run([sys.executable, "-c", KILL_AT_STEP_2.format(argv=argv)], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == 137, child.stderr[-3000:]
    work = resumed.with_name("ppo.tmp")
    assert not resumed.exists()
    assert (work / "checkpoint-2" / "trainer_state.pt").exists()
    assert not (work / "checkpoint-4").exists()

    steps_after_resume = []
    run(argv=argv + ["--resume"], hooks=OnCheckpoint(lambda step, path: steps_after_resume.append(step)))
    assert steps_after_resume == [4]  # continued from step 2, did not start over
    adapters = [sub for sub in (".", "value") if (straight / sub / "adapter_model.safetensors").exists()]
    assert "." in adapters
    for sub in adapters:
        a, b = load_file(str(straight / sub / "adapter_model.safetensors")), load_file(str(resumed / sub / "adapter_model.safetensors"))
        assert a.keys() == b.keys() and a
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=f"{sub}: {key}")
    torch.testing.assert_close(load_file(str(resumed / "value" / HEAD_FILE))["weight"],
                               load_file(str(straight / "value" / HEAD_FILE))["weight"], rtol=0, atol=1e-6)
    found, expected = comparable_metrics(resumed), comparable_metrics(straight)
    assert found.keys() == expected.keys()
    for key, value in expected.items():
        assert found[key] == pytest.approx(value, rel=1e-6, abs=1e-6), key


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result(pipeline, straight_run, tmp_path):
    assert_killed_run_resumes_to(straight_run[0], pipeline, tmp_path)


@pytest.mark.slow
def test_killed_policy_head_run_resumes_to_the_same_result(pipeline, tmp_path):
    from rlhf.core.errors import UserError
    from rlhf.ppo.trainer import run

    straight = tmp_path / "straight" / "ppo"
    run(argv=ppo_argv(pipeline, straight, "--value_model", "policy_head"))
    assert not (straight / "value" / "adapter_model.safetensors").exists()  # a head, no adapter of its own
    (tmp_path / "resumed").mkdir()
    assert_killed_run_resumes_to(straight, pipeline, tmp_path / "resumed", "--value_model", "policy_head")
    # A checkpoint resumes only with the value model that wrote it.
    killed = tmp_path / "other"
    killed.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    argv = ppo_argv(pipeline, killed / "ppo")
    subprocess.run([sys.executable, "-c", KILL_AT_STEP_2.format(argv=argv)], cwd=tmp_path, env=env, timeout=300)
    with pytest.raises(UserError, match="written with value_model critic; resume with the same, found policy_head"):
        run(argv=argv + ["--resume", "--value_model", "policy_head"])


@pytest.mark.slow
def test_policy_head_value_loss_trains_the_policy_trunk(pipeline):
    """With zero advantages the policy loss has no gradient: the policy's LoRA then gets gradients
    only through a value head on its own trunk (policy_head), never from a separate critic."""
    grads = {}
    for value_model in ("critic", "policy_head"):
        trainer = make_trainer(pipeline, *SINGLE_PASS, "--learning_rate", "0", "--value_model", value_model)
        rollout, scored = seeded_rollout(trainer)
        mask = rollout.response_mask
        returns = torch.randn(mask.shape, generator=torch.Generator().manual_seed(1)) * mask
        trainer.update(rollout, scored, torch.zeros(mask.shape), returns)
        policy = [p.grad for p in trainer.registry.parameters_of("policy")]
        head = trainer.registry.heads["value"].weight.grad
        grads[value_model] = (max(float(g.abs().max()) if g is not None else 0.0 for g in policy), head)
        assert head is not None and float(head.abs().max()) > 0
    assert grads["critic"][0] == 0.0
    assert grads["policy_head"][0] > 0.0


@pytest.mark.slow
def test_hooks_hear_the_loop_and_a_stop_ends_it_finished(pipeline, tmp_path):
    """run({...}, hooks): every log and checkpoint of the loop and the final evaluation reach the hooks;
    a StopTraining at step 3 of 4 writes checkpoint-3, evaluates and finishes the run there."""
    from rlhf.core.hooks import StopTraining
    from rlhf.ppo.trainer import run

    class Recorder(StageHooks):
        def __init__(self):
            self.logs, self.checkpoints, self.evaluations = [], [], []

        def on_log(self, step, logs):
            self.logs.append(step)
            if step == 3:
                raise StopTraining("enough")

        def on_checkpoint(self, step, path):
            self.checkpoints.append((step, path.name, (path / "trainer_state.pt").exists()))

        def on_evaluate(self, step, metrics):
            self.evaluations.append((step, sorted(metrics)))

    hooks = Recorder()
    out = tmp_path / "ppo"
    # The dict's keys over the YAML's; the command line's over both (max_steps 4 from the YAML).
    metrics = run({"eval_prompts": 2, "logging_steps": 1}, hooks, argv=ppo_argv(pipeline, out))
    assert hooks.logs == [1, 2, 3]
    assert hooks.checkpoints == [(2, "checkpoint-2", True), (3, "checkpoint-3", True)]
    ((step, keys),) = hooks.evaluations
    assert step == 3 and "eval_policy_kl_to_reference" in keys
    assert metrics["steps"] == 3 and (out / "adapter_model.safetensors").exists()
    assert yaml.safe_load((out / "config.yaml").read_text())["eval_prompts"] == 2


# -- 3. guard -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_non_finite_stops_and_keeps_last_checkpoint(pipeline, tmp_path, monkeypatch):
    from rlhf.core.generation import load_for_generation
    from rlhf.ppo.trainer import STATE_FILE, NonFiniteError, run

    built = capture_registry(monkeypatch)

    def poison_reward_model(step, path):
        if step == 2:  # right after checkpoint-2 was written: step 3 scores NaN
            with torch.no_grad():
                built[0].heads["reward"].weight.fill_(float("nan"))

    out = tmp_path / "ppo"
    with pytest.raises(NonFiniteError) as caught:
        run(argv=ppo_argv(pipeline, out, "--eval_prompts", "0"), hooks=OnCheckpoint(poison_reward_model))
    checkpoint = out.with_name("ppo.tmp") / "checkpoint-2"
    message = str(caught.value)
    assert "non-finite" in message and str(checkpoint) in message and "step 3" in message
    assert not out.exists()
    assert sorted(p.name for p in checkpoint.parent.glob("checkpoint-*")) == ["checkpoint-2"]
    # The checkpoint is whole: state, policy (loadable for generation), value adapter and head.
    assert torch.load(checkpoint / STATE_FILE, weights_only=False)["step"] == 2
    model, _ = load_for_generation(str(checkpoint / "policy"))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.isfinite(load_file(str(checkpoint / "value" / HEAD_FILE))["weight"]).all()
    assert all(torch.isfinite(t).all() for t in lora_tensors(checkpoint / "value").values())


# -- 4. rollout invariants ------------------------------------------------------------------------


def eos_biased_generate(trainer, prompts: list, seed: int = 0):
    """``trainer.generate`` with EOS made likelier (an LM-head hook), so some replies stop early."""
    eos = trainer.tokenizer.eos_token_id

    def bias(module, inputs, output):
        output = output.clone()
        output[..., eos] += EOS_BIAS
        return output

    hook = trainer.registry.lm_head().register_forward_hook(bias)
    try:
        torch.manual_seed(seed)
        return trainer.roles.generate("policy", prompts)
    finally:
        hook.remove()


@pytest.mark.slow
def test_rollout_invariants(pipeline):
    from reward.score import load_reward_model
    from rlhf.core.scoring import score_replies
    from rlhf.core.generation import decode_responses

    trainer = make_trainer(pipeline, "--batch_size", "8", "--mini_batch_size", "8", "--gradient_accumulation_steps",
                           "1", "--ppo_epochs", "1", "--max_new_tokens", "12")
    tok = trainer.tokenizer
    pad, eos = tok.pad_token_id, tok.eos_token_id
    prompts = trainer.sampler.next_batch()
    rollout = eos_biased_generate(trainer, prompts)
    s = rollout.query_width
    query, query_mask = rollout.input_ids[:, :s], rollout.attention_mask[:, :s]
    response, response_mask = rollout.input_ids[:, s:], rollout.response_mask

    # Left padding: each prompt sits flush right, pad tokens before it are masked out.
    for i, p in enumerate(prompts):
        ids = encode_prompt(tok, p)
        assert query[i, s - len(ids):].tolist() == ids
        assert query_mask[i].tolist() == [0] * (s - len(ids)) + [1] * len(ids)
        assert (query[i, : s - len(ids)] == pad).all()
    assert (query_mask[:, 0] == 0).any(), "the prompts should have needed padding"

    # Up to and including the first EOS is the reply; everything after it is masked pad.
    stopped_early = 0
    for i in range(len(prompts)):
        row = response[i].tolist()
        if rollout.ends_with_eos[i]:
            end = row.index(eos) + 1
            stopped_early += end < len(row)
        else:
            assert eos not in row
            end = len(row)
        assert response_mask[i].tolist() == [True] * end + [False] * (len(row) - end)
        assert row[end:] == [pad] * (len(row) - end)
        assert rollout.attention_mask[i, s:].tolist() == response_mask[i].long().tolist()
    assert stopped_early and not rollout.ends_with_eos.all(), "want rows that stopped early and rows cut off"

    # At step 1 the policy is the reference: the KL is exactly 0.
    scored = trainer.roles.score(rollout)
    assert torch.equal(scored.logprobs, scored.ref_logprobs)
    rewards, kl = pm.compute_rewards(scored.scores, scored.logprobs, scored.ref_logprobs, response_mask,
                                     trainer.kl_ctl.value)
    assert torch.equal(kl, torch.zeros_like(kl))
    # The first minibatch is scored by the same policy that sampled it, without dropout: ratio 1.
    # (Equal up to float rounding only: the minibatch is a row permutation of the scoring batch.)
    advantages, returns = pm.gae_advantages(rewards, scored.values, response_mask, 1.0, 0.95)
    advantages = pm.masked_whiten(advantages, response_mask)
    stats = trainer.update(rollout, scored, advantages, returns)  # one epoch, one minibatch
    assert stats["ratio"] == pytest.approx(1.0, abs=1e-6)
    assert stats["approx_kl"] == pytest.approx(0.0, abs=1e-9)
    assert stats["clipfrac"] == 0.0

    # The reward adapter scores a rollout as the stand-alone reward model scores the same tokens...
    in_ppo = trainer.registry.score("reward", rollout.input_ids, rollout.attention_mask, pad)
    model, _ = load_reward_model(str(pipeline["reward"]))
    sequences = [row[mask.bool()].tolist() for row, mask in zip(rollout.input_ids, rollout.attention_mask)]
    width = max(map(len, sequences))
    ids = torch.full((len(sequences), width), pad)
    attention = torch.zeros_like(ids)
    for i, seq in enumerate(sequences):  # right padding, as in reward training
        ids[i, : len(seq)], attention[i, : len(seq)] = torch.tensor(seq), 1
    with torch.no_grad():
        alone = model(input_ids=ids, attention_mask=attention).logits.squeeze(-1)
    torch.testing.assert_close(in_ppo, alone, rtol=0, atol=1e-4)
    # ...and as it scores the decoded text, where the text tokenises back to the same ids (a random
    # tiny model also samples special tokens and "it's", which decoding drops or re-splits).
    texts = decode_responses(tok, response)
    same = [i for i, t in enumerate(texts)
            if encode_prompt_reply(tok, prompts[i], t)[0] == sequences[i] + ([] if rollout.ends_with_eos[i] else [eos])]
    assert len(same) >= 4, texts
    from_text = score_replies(model, tok, [prompts[i] for i in same], [texts[i] for i in same])
    torch.testing.assert_close(torch.tensor(from_text), in_ppo[same], rtol=0, atol=1e-4)


SINGLE_PASS = ("--batch_size", "8", "--mini_batch_size", "8", "--gradient_accumulation_steps", "1",
               "--ppo_epochs", "1", "--max_new_tokens", "12")


def count_policy_forwards(trainer) -> list:
    """Record whether each policy forward of ``trainer`` ran with gradients."""
    calls = []
    original = trainer.roles.policy_forward

    def counted(*args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return original(*args, **kwargs)

    trainer.roles.policy_forward = counted
    return calls


@pytest.mark.slow
def test_single_pass_update_reuses_its_forward_for_the_rollout_logprobs(pipeline):
    """One epoch, one minibatch, one micro-batch: step 3's policy logprobs come from the update's own
    forward (one policy forward per step instead of two), and the step is the same as with both."""
    steps = {}
    for fused in (True, False):
        trainer = make_trainer(pipeline, *SINGLE_PASS)
        assert trainer.single_pass()
        if not fused:
            trainer.single_pass = lambda: False
        calls = count_policy_forwards(trainer)
        torch.manual_seed(0)
        stats = trainer.train_step()
        steps[fused] = (stats, calls, adapter_state(trainer.registry, "policy"), adapter_state(trainer.registry, "value"))
    (fused_stats, fused_calls, fused_policy, fused_value), (stats, calls, policy, value) = steps[True], steps[False]
    assert fused_calls == [True] and calls == [False, True]
    assert fused_stats["ratio"] == 1.0 and fused_stats["approx_kl"] == 0.0 and fused_stats["clipfrac"] == 0.0
    for key in ("score", "kl", "policy_loss", "value_loss", "entropy", "response_length"):
        assert fused_stats[key] == pytest.approx(stats[key], rel=1e-5, abs=1e-7), key
    for found, expected in ((fused_policy, policy), (fused_value, value)):
        assert found.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(found[key], expected[key], rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_single_pass_frees_the_policy_logits_before_the_value_forward(pipeline):
    """The update's policy logits (b x t x vocab, with their graph) are gone by the time the value
    forward with gradients runs, so the two roles' activations never add up."""
    import weakref

    trainer = make_trainer(pipeline, *SINGLE_PASS)
    policy_logits, alive_at_value_forward = [], []
    roles = trainer.roles
    policy_forward, reply_values = roles.policy_forward, roles.reply_values

    def recorded_logits(*args, **kwargs):
        logits, values = policy_forward(*args, **kwargs)
        if torch.is_grad_enabled():
            policy_logits.append(weakref.ref(logits))
        return logits, values

    def recorded_values(*args, **kwargs):
        if torch.is_grad_enabled():
            alive_at_value_forward.append([ref() is not None for ref in policy_logits])
        return reply_values(*args, **kwargs)

    roles.policy_forward, roles.reply_values = recorded_logits, recorded_values
    trainer.train_step()
    assert len(policy_logits) == 1 and alive_at_value_forward == [[False]]


@pytest.mark.slow
def test_merged_rollout_samples_the_same_replies_and_restores_the_base(pipeline):
    """Generation with the policy folded into the base gives the unmerged replies, and afterwards every
    base weight is bit-for-bit what it was (the frozen roles share them)."""
    trainer = make_trainer(pipeline, *SINGLE_PASS)
    registry = trainer.registry
    # Make the policy differ from the reference, so merging it changes the weights it folds into.
    with torch.no_grad():
        for param in registry.parameters_of("policy"):
            param.add_(0.05 * torch.randn_like(param))
    base_before = {n: p.detach().clone() for n, p in registry.peft_model.named_parameters() if "lora_" not in n}
    prompts = trainer.sampler.next_batch()
    rollouts = {}
    for merge in (True, False):
        trainer.roles.merge_backup = torch.device("cpu") if merge else None
        torch.manual_seed(3)
        rollouts[merge] = trainer.roles.generate("policy", prompts)
    assert registry.can_merge("policy")
    assert torch.equal(rollouts[True].input_ids, rollouts[False].input_ids)
    base_after = {n: p.detach() for n, p in registry.peft_model.named_parameters() if "lora_" not in n}
    assert base_after.keys() == base_before.keys()
    assert all(torch.equal(base_after[n], base_before[n]) for n in base_before)
    # While merged, the base really holds the policy (so the test above is not vacuous).
    with registry.use("policy"), registry.merged("policy"):
        assert any(not torch.equal(p, base_before[n]) for n, p in registry.peft_model.named_parameters()
                   if n in base_before)


class FakeRegistry:
    def __init__(self, mergeable: bool, backup_bytes: int):
        self.mergeable, self.backup_bytes = mergeable, backup_bytes

    def can_merge(self, name):
        return self.mergeable

    def merge_backup_bytes(self, name):
        return self.backup_bytes


def test_merge_for_generation_auto_merges_only_where_the_backup_fits(monkeypatch):
    """auto: on a GPU the backup goes to host RAM; on a CPU only when it is a small share of RAM;
    never on a quantized base, where an explicit true is refused rather than ignored."""
    import psutil

    import rlhf.ppo.trainer as ppo
    from rlhf.core.errors import UserError

    gib = 2**30
    memory = type("Memory", (), {"total": 24 * gib, "available": 20 * gib})
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory)
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    small, large = FakeRegistry(True, 1 * gib), FakeRegistry(True, 6 * gib)
    assert ppo.merge_backup_device("auto", small, cpu) == cpu
    assert ppo.merge_backup_device("auto", large, cpu) is None  # 6 GiB > 10 % of 24 GiB
    assert ppo.merge_backup_device("auto", large, gpu) == cpu  # host RAM, not the GPU
    assert ppo.merge_backup_device("auto", FakeRegistry(True, 12 * gib), gpu) is None  # > half the free RAM
    assert ppo.merge_backup_device("true", large, cpu) == cpu
    assert ppo.merge_backup_device("false", small, cpu) is None
    quantized = FakeRegistry(False, 1 * gib)
    assert ppo.merge_backup_device("auto", quantized, cpu) is None
    with pytest.raises(UserError, match="merge_for_generation: true needs a LoRA policy on an unquantized base"):
        ppo.merge_backup_device("true", quantized, cpu)
    with pytest.raises(UserError, match="merge_for_generation: expected one of auto, true, false, found 'sometimes'"):
        ppo.PPOArguments(merge_for_generation="sometimes")
    assert ppo.PPOArguments(merge_for_generation=True).merge_for_generation == "true"


# -- 5. sampling settings -------------------------------------------------------------------------


WEIRD_GENERATION_CONFIGS = {
    # Every setting SamplingArguments spells out, contradicted.
    "sampling_settings": {"max_new_tokens": 1, "do_sample": False, "temperature": 0.05, "top_k": 1, "top_p": 0.1,
                          "repetition_penalty": 5.0},
    # A logits processor SamplingArguments does not name (also min_p, typical_p, bad_words_ids...).
    "other_processors": {"no_repeat_ngram_size": 1},
}


@pytest.mark.slow
@pytest.mark.parametrize("weird_config", [
    "sampling_settings",
    "other_processors",
])
def test_sampling_settings_ignore_the_models_generation_config(pipeline, tmp_path, weird_config):
    # The same tiny model, with a generation_config that contradicts our sampling settings. Written
    # as JSON: transformers refuses to save such a GenerationConfig itself, but a checkpoint can ship one.
    weird_model = tmp_path / "weird_model"
    shutil.copytree(pipeline["model"], weird_model)
    (weird_model / "generation_config.json").write_text(json.dumps(WEIRD_GENERATION_CONFIGS[weird_config]))
    weird_sft = tmp_path / "weird_sft"
    shutil.copytree(pipeline["sft"], weird_sft)
    config = json.loads((weird_sft / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(weird_model)
    (weird_sft / "adapter_config.json").write_text(json.dumps(config))

    sampling = ("--max_new_tokens", "12", "--batch_size", "8", "--temperature", "0.7")
    weird = make_trainer(pipeline, *sampling, sft_model=weird_sft)
    # The trap is in the checkpoint; the loader must not carry it into the model it returns.
    from transformers import GenerationConfig

    shipped = GenerationConfig.from_pretrained(weird_model)
    for key, value in WEIRD_GENERATION_CONFIGS[weird_config].items():
        assert getattr(shipped, key) == value, key
        assert getattr(weird.model.generation_config, key) != value, key
    plain = make_trainer(pipeline, *sampling)
    prompts = plain.sampler.next_batch()
    rollouts = {}
    for name, trainer in (("plain", plain), ("weird", weird)):
        for seed in (0, 1):
            torch.manual_seed(seed)
            rollouts[name, seed] = trainer.roles.generate("policy", prompts)
    first = rollouts["weird", 0]
    assert first.input_ids.shape[1] - first.query_width == 12
    assert first.response_mask.sum(1).max() == 12  # a random tiny model rarely says EOS
    # Sampling, not greedy: another seed gives other replies.
    assert not torch.equal(first.input_ids, rollouts["weird", 1].input_ids)
    # Same weights, same seed: exactly the replies of the model without a generation_config.
    for seed in (0, 1):
        assert torch.equal(rollouts["weird", seed].input_ids, rollouts["plain", seed].input_ids)


# -- 6. warnings ----------------------------------------------------------------------------------


def synthetic_stats(step: int, score: float, kl: float, length: float = 8.0) -> dict[str, float]:
    return {"step": step, "score": score, "kl": kl, "response_length": length}


@pytest.mark.slow
def test_negative_kl_and_collapse_warnings(pipeline, caplog):
    trainer = make_trainer(pipeline)
    caplog.set_level(logging.WARNING, logger="rlhf.ppo.trainer")

    # Negative KL: warned once the run of negative estimates reaches the patience (3), once only.
    for step, kl in enumerate([-0.1, 0.2, -0.3, -0.2], start=1):
        trainer._watch(synthetic_stats(step, 1.0, kl))
        trainer.history.append(synthetic_stats(step, 1.0, kl))
    assert not [r for r in caplog.records if "negative" in r.getMessage()]
    trainer._watch(synthetic_stats(5, 1.0, -0.1))
    trainer.history.append(synthetic_stats(5, 1.0, -0.1))
    warned = [r for r in caplog.records if "negative" in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING
    trainer._watch(synthetic_stats(6, 1.0, -0.1))
    assert len([r for r in caplog.records if "negative" in r.getMessage()]) == 1

    # Collapse: the last three scores far below the first three, replies shrinking to nothing.
    collapsing = make_trainer(pipeline)
    caplog.clear()
    for step, score in enumerate([1.0, 1.02, 0.98, 0.5, -2.0, -3.0], start=1):
        stats = synthetic_stats(step, score, 0.5, length=8.0 if step < 5 else 1.0)
        collapsing._watch(stats)
        collapsing.history.append(stats)
    warned = [r for r in caplog.records if "collapsing" in r.getMessage()]
    assert len(warned) == 1 and "short replies" in warned[0].getMessage()
    # A steady reward does not warn.
    steady = make_trainer(pipeline)
    caplog.clear()
    for step in range(1, 9):
        stats = synthetic_stats(step, 1.0 + 0.01 * (step % 2), 0.5)
        steady._watch(stats)
        steady.history.append(stats)
    assert not [r for r in caplog.records if "collapsing" in r.getMessage()]


def seeded_rollout(trainer):
    """The trainer's first rollout batch, sampled with seed 0, and its step-3 scores."""
    torch.manual_seed(0)
    rollout = trainer.roles.generate("policy", trainer.sampler.next_batch())
    return rollout, trainer.roles.score(rollout)


def update_with_saved_bytes(trainer, rollout, scored) -> tuple[int, dict[str, torch.Tensor]]:
    """Run one PPO update (lr 0, so the weights stay put); return the largest number of activation
    bytes held for backward at any moment, and the gradients it left on the policy and value."""
    from torch.autograd.graph import saved_tensors_hooks

    held, peak = [0], [0]

    def pack(tensor):
        # Tensors saved inside a checkpointed layer go to the checkpoint's own hooks, not here.
        held[0] += tensor.numel() * tensor.element_size()
        peak[0] = max(peak[0], held[0])
        return tensor

    mask = rollout.response_mask
    generator = torch.Generator().manual_seed(1)
    advantages = torch.randn(mask.shape, generator=generator) * mask
    returns = torch.randn(mask.shape, generator=generator) * mask
    with saved_tensors_hooks(pack, lambda t: t):
        trainer.update(rollout, scored, advantages, returns)
    grads = {name: p.grad.clone() for name, p in trainer.registry.peft_model.named_parameters() if p.grad is not None}
    grads.update({f"head.{n}": p.grad.clone() for n, p in trainer.registry.heads.named_parameters() if p.grad is not None})
    return peak[0], grads


@pytest.mark.slow
def test_gradient_checkpointing_holds_less_and_gives_the_same_gradients(pipeline):
    """PPO's gradient checkpointing really checkpoints (the update holds fewer activations for
    backward) and recomputes each role under its own adapter: policy and value gradients equal the
    run without it. The model must be in training mode for transformers to checkpoint, and the value
    loss is backpropagated after the registry left the value adapter."""
    results = {}
    for checkpointing in ("false", "true"):
        trainer = make_trainer(pipeline, *SINGLE_PASS, "--learning_rate", "0", "--gradient_checkpointing", checkpointing)
        rollout, scored = seeded_rollout(trainer)
        results[checkpointing] = update_with_saved_bytes(trainer, rollout, scored)
    (plain_peak, plain_grads), (ckpt_peak, ckpt_grads) = results["false"], results["true"]
    assert ckpt_peak < 0.7 * plain_peak, (ckpt_peak, plain_peak)
    assert plain_grads.keys() == ckpt_grads.keys()
    assert any(".value." in k for k in plain_grads) and any(".policy." in k for k in plain_grads)
    for key, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[key], grad, rtol=1e-5, atol=1e-7, msg=key)


@pytest.mark.slow
def test_dropout_is_off_in_the_update_even_in_training_mode(pipeline):
    """The update runs in training mode (for checkpointing) yet two forwards agree exactly, whatever
    dropout the model's config and the SFT adapter asked for."""

    def add_dropout(model):
        for module in model.modules():
            if hasattr(module, "attention_dropout"):
                module.attention_dropout = 0.5
            if isinstance(getattr(module, "lora_dropout", None), torch.nn.ModuleDict):
                for name in module.lora_dropout:
                    module.lora_dropout[name] = torch.nn.Dropout(0.5)

    trainer = make_trainer(pipeline, *SINGLE_PASS, edit_model=add_dropout)
    torch.manual_seed(0)
    rollout = trainer.roles.generate("policy", trainer.sampler.next_batch())
    with trainer._training_mode(), torch.no_grad():
        assert trainer.model.training
        first = trainer.roles.reply_logits("policy", rollout)
        second = trainer.roles.reply_logits("policy", rollout)
    assert not trainer.model.training
    torch.testing.assert_close(first, second, rtol=0, atol=0)


@pytest.mark.slow
def test_adaptive_kl_horizon_is_relative_to_the_run(pipeline):
    """With the default horizon (a fifth of the run's replies) a KL that stays far off target moves the
    coefficient by a factor that matters within the run; a fixed 10,000-reply horizon moved it 0.3 %."""
    from rlhf.core.errors import UserError
    from rlhf.ppo.trainer import parse_ppo

    trainer = make_trainer(pipeline, "--max_steps", "10", "--batch_size", "4", "--mini_batch_size", "4")
    assert trainer.kl_ctl.horizon == 8  # 10 steps x 4 replies / 5
    start = trainer.kl_ctl.value
    for _ in range(10):
        trainer.kl_ctl.update(0.0, 4)  # KL far below target: lower the coefficient
    assert trainer.kl_ctl.value < 0.5 * start
    assert make_trainer(pipeline, "--kl_horizon", "1000").kl_ctl.horizon == 1000
    with pytest.raises(UserError, match="key 'target_kl' was renamed 'kl_target'"):
        parse_ppo(argv=ppo_argv(pipeline, pipeline["root"] / "unused", "--target_kl", "3"))


@pytest.mark.parametrize("setting,value,expected", [
    ("distributed_type", "DEEPSPEED", "PPO runs on one process, plain DDP or FSDP, found DEEPSPEED; to shard the "
                                      "base, launch it with configs/accelerate/ppo_fsdp.yaml (FSDP2)"),
    ("distributed_type", "XLA", "found XLA"),
    ("mixed_precision", "fp16", "mixed_precision fp16 is not applied by PPO"),
    ("mixed_precision", "bf16", "set torch_dtype: bfloat16"),
    ("gradient_accumulation_steps", 2, "gradient_accumulation_steps 2 is not applied by PPO"),
])
def test_launch_settings_ppo_does_not_honour_are_refused(setting, value, expected):
    from accelerate.utils import DistributedType

    from rlhf.core.errors import UserError
    from rlhf.ppo.trainer import check_launch

    launch = {"distributed_type": DistributedType.MULTI_GPU, "mixed_precision": "no", "gradient_accumulation_steps": 1}
    check_launch(type("Launch", (), launch))  # plain DDP passes
    check_launch(type("Launch", (), {**launch, "distributed_type": DistributedType.FSDP}))  # and FSDP
    launch[setting] = DistributedType[value] if setting == "distributed_type" else value
    with pytest.raises(UserError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        check_launch(type("Launch", (), launch))


FSDP_LAUNCH = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
               "FSDP_RESHARD_AFTER_FORWARD": "false", "FSDP_CPU_RAM_EFFICIENT_LOADING": "false"}


@pytest.mark.parametrize("change,expected", [
    ({"FSDP_VERSION": "1"}, "PPO shards with FSDP2, found fsdp_version 1"),
    ({"FSDP_OFFLOAD_PARAMS": "true"}, "fsdp_offload_params is not applied by PPO"),
    ({"FSDP_ACTIVATION_CHECKPOINTING": "true"}, "set it false and gradient_checkpointing: true in the PPO config"),
    ({"FSDP_AUTO_WRAP_POLICY": "SIZE_BASED_WRAP"}, "found fsdp_auto_wrap_policy size_based_auto_wrap_policy"),
    ({"FSDP_CPU_RAM_EFFICIENT_LOADING": "true"}, "fsdp_cpu_ram_efficient_loading is not applied by PPO"),
    ({"peft_method": "qlora-4bit"}, "found peft_method qlora-4bit; use LoRA, or QLoRA under configs/accelerate/ddp.yaml"),
    ({"merge_for_generation": "true"}, "merge_for_generation: true cannot fold the policy into sharded weights"),
    ({"num_processes": 1}, "one process shards nothing"),
])
def test_fsdp_settings_ppo_does_not_honour_are_refused(change, expected, monkeypatch):
    """An FSDP launch, as accelerate's launcher describes it in the environment (on a CPU machine the
    Accelerator itself reports plain multi-CPU): PPO takes the plugin or refuses what it would not apply."""
    from accelerate.utils import DistributedType

    from rlhf.core.errors import UserError
    from rlhf.core.models import ModelArguments
    from rlhf.ppo.trainer import PPOArguments, fsdp_request

    def request(change: dict):
        for key, value in {**FSDP_LAUNCH, **change}.items():
            if key.isupper():
                monkeypatch.setenv(key, value)
        launch = type("Launch", (), {"distributed_type": DistributedType.MULTI_CPU,
                                     "num_processes": change.get("num_processes", 2)})
        return fsdp_request(launch, ModelArguments(peft_method=change.get("peft_method", "lora")),
                            PPOArguments(merge_for_generation=change.get("merge_for_generation", "auto")))

    plugin = request({})
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is False  # the launch's own setting
    with pytest.raises(UserError, match=expected):
        request(change)
    assert request({"ACCELERATE_USE_FSDP": "false"}) is None  # plain data parallelism


@pytest.mark.slow
def test_accelerate_gradient_accumulation_is_refused_before_any_work(pipeline, tmp_path, monkeypatch, capsys):
    from rlhf.app.cli import main

    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4")
    out = tmp_path / "ppo"
    assert main(["ppo", *ppo_argv(pipeline, out)]) == 2
    assert "gradient_accumulation_steps 4 is not applied by PPO" in capsys.readouterr().err
    assert not out.exists() and not out.with_name("ppo.tmp").exists()


@pytest.mark.slow
def test_normalize_reward_scales_scores_by_the_running_moments_then_penalizes(pipeline, tmp_path):
    """normalize_reward: each batch's raw scores join the running moments, the batch is scaled by
    them, clipped by reward_clip, and a cut-off reply then gets the missing-EOS penalty on that scale;
    the moments are part of a checkpoint."""
    trainer = make_trainer(pipeline, "--normalize_reward", "true", "--reward_clip", "1.5",
                           "--missing_eos_penalty", "-2")
    first, second = torch.tensor([1.0, 3.0, 5.0, 7.0]), torch.tensor([20.0, 4.0, 4.0, 4.0])
    ends = torch.tensor([True, True, True, False])
    lengths = torch.tensor([3, 5, 4, 8])
    shaped = trainer._shape_scores(first, ends, lengths)
    # mean 4, sample std sqrt(20/3) = 2.582: (1-4)/2.582 = -1.162, -0.387, 0.387; the last is cut off.
    torch.testing.assert_close(shaped, torch.tensor([-1.1619, -0.3873, 0.3873, -2.0]), rtol=0, atol=1e-4)
    shaped = trainer._shape_scores(second, torch.ones(4, dtype=torch.bool), lengths)
    both = torch.cat([first, second])
    expected = ((second - both.mean()) / both.std()).clamp(-1.5, 1.5)  # 20 is clipped to 1.5
    torch.testing.assert_close(shaped, expected)
    assert float(shaped[0]) == 1.5
    trainer.save_checkpoint(tmp_path / "checkpoint-1")
    again = make_trainer(pipeline, "--normalize_reward", "true", "--reward_clip", "1.5", "--missing_eos_penalty", "-2")
    again.load_checkpoint(tmp_path / "checkpoint-1")
    assert again.reward_moments.state_dict() == trainer.reward_moments.state_dict()
    # Off by default: raw scores, penalty only.
    plain = make_trainer(pipeline)
    torch.testing.assert_close(plain._shape_scores(first, ends, lengths), torch.tensor([1.0, 3.0, 5.0, -1.0]))



@pytest.mark.slow
def test_remove_length_trend_fits_finished_replies_and_comes_before_normalization(pipeline, tmp_path):
    """remove_length_trend: the line of raw score on length is fitted over every finished reply so far
    (a cut-off one only gets the penalty), taken out of the batch, and the rest of the shaping
    (normalize_reward, the penalty) works on what is left; the fit is part of a checkpoint."""
    from rlhf.ppo.math import RunningLengthTrend

    flags = ["--remove_length_trend", "true", "--normalize_reward", "true", "--missing_eos_penalty", "-2"]
    trainer = make_trainer(pipeline, *flags)
    # Finished replies: score = 10 - 0.5 x length exactly; the cut-off reply (length 30) would tilt the fit.
    raw, lengths = torch.tensor([8.0, 6.0, 4.0, -50.0]), torch.tensor([4, 8, 12, 30])
    ends = torch.tensor([True, True, True, False])
    shaped = trainer._shape_scores(raw, ends, lengths)
    assert trainer.length_trend.slope == pytest.approx(-0.5) and trainer.length_trend.count == 3
    # Without the trend every finished reply scores 6 (the mean): no spread left to normalize, and the
    # cut-off reply gets the penalty.
    torch.testing.assert_close(shaped[3], torch.tensor(-2.0))
    assert float(shaped[:3].std()) < 1e-5
    # Off: the same scores keep their trend.
    plain = make_trainer(pipeline, "--missing_eos_penalty", "-2")
    torch.testing.assert_close(plain._shape_scores(raw, ends, lengths), torch.tensor([8.0, 6.0, 4.0, -2.0]))
    trainer.save_checkpoint(tmp_path / "checkpoint-1")
    again = make_trainer(pipeline, *flags)
    again.load_checkpoint(tmp_path / "checkpoint-1")
    assert again.length_trend.state_dict() == trainer.length_trend.state_dict() != RunningLengthTrend().state_dict()


def test_replies_per_prompt_repeats_each_prompt_and_splits_ranks_by_prompt():
    from rlhf.core.errors import UserError
    from rlhf.ppo.rollout import PromptSampler

    prompts = [f"p{i}" for i in range(10)]
    plain = PromptSampler(prompts, 4, seed=3)
    grouped = PromptSampler(prompts, 4, seed=3, replies_per_prompt=2)
    first = plain.next_batch()
    assert grouped.next_batch() == [first[0], first[0], first[1], first[1]]
    assert grouped.next_batch() == [first[2], first[2], first[3], first[3]]  # the same order, half as fast
    # Two ranks: each gets whole groups, and together they cover distinct prompts.
    ranks = [PromptSampler(prompts, 4, seed=3, rank=r, world_size=2, replies_per_prompt=2) for r in range(2)]
    batches = [s.next_batch() for s in ranks]
    assert batches[0][0::2] == batches[0][1::2] and batches[1][0::2] == batches[1][1::2]
    assert len(set(batches[0] + batches[1])) == 4
    with pytest.raises(UserError, match=r"batch_size: expected a multiple of replies_per_prompt \(3\), found 4"):
        PromptSampler(prompts, 4, seed=3, replies_per_prompt=3)


@pytest.mark.slow
def test_replies_per_prompt_samples_different_replies_to_the_same_prompt(pipeline):
    from rlhf.core.errors import UserError
    from rlhf.ppo.trainer import parse_ppo

    trainer = make_trainer(pipeline, "--batch_size", "8", "--mini_batch_size", "4", "--replies_per_prompt", "4",
                           "--max_new_tokens", "8")
    prompts = trainer.sampler.next_batch()
    assert prompts[:4] == [prompts[0]] * 4 and prompts[4:] == [prompts[4]] * 4 and prompts[0] != prompts[4]
    rollout = trainer.roles.generate("policy", prompts)
    s = rollout.query_width
    replies = [tuple(rollout.input_ids[i, s:][rollout.response_mask[i]].tolist()) for i in range(8)]
    assert len(set(replies[:4])) > 1 and len(set(replies[4:])) > 1, "the copies of a prompt got the same reply"
    with pytest.raises(UserError, match=r"replies_per_prompt: expected a divisor of batch_size \(8\), found 3"):
        parse_ppo(argv=ppo_argv(pipeline, pipeline["root"] / "unused", "--batch_size", "8", "--mini_batch_size", "4",
                                "--replies_per_prompt", "3"))
