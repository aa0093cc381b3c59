"""The PPO trainer's own numbers against a direct forward pass of each role.

tests/test_ppo_math.py pins the pure functions; this file pins what the trainer feeds them. A full
``PPOTrainer.train_step`` runs on a tiny GPT-2 whose config and LoRA adapters all carry dropout
(0.1), and we capture the inputs of ``compute_rewards`` (scores, policy and reference logprobs),
``gae_advantages`` (values) and ``ppo_policy_loss`` (the update's logprobs). An oracle then rebuilds
each role outside the registry (its own copy of the base, peft's own loading, eval mode) and, row
by row, strips the padding and runs the plain unpadded sequence with default position ids:

    logprobs[i, j] = log_softmax(logits[q + j - 1] / temperature)[reply token j]   (q = prompt length)
    values[i, j]   = value_head(hidden[q + j - 1])          (the state before reply token j)
    score[i]       = reward_head(hidden[last scored token])

GPT-2's absolute position embeddings make a wrong position id, an off-by-one slice or dropout left on
change every number, so each of those fails here. The rollouts mix left padding (prompts of several
lengths), replies that stop at EOS (an LM-head bias while sampling) and replies cut at the length
limit. Three update layouts: the single-pass one (one epoch, minibatch and micro-batch: the update's
forward gives the rollout logprobs), two minibatches, and two minibatches of two micro-batches with
gradient checkpointing; two reference kinds: a frozen SFT adapter, and an SFT model merged into the
base (reference = adapters off). Each trainer takes two steps, so the second step also checks that
the first update left no training state behind (train mode, dropout). Last, a checkpointed step
equals the same step without checkpointing (each layer recomputed under its own role).

Every model here runs on one thread (see tests/test_ppo.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from rlhf.demo.tiny_model import make_tiny_gpt2_dir

from rlhf.ppo import math as pm
from rlhf.core.adapters import HEAD_FILE, read_score_head

DROPOUT = 0.1  # in the GPT-2 config (resid, embd, attn) and in every LoRA adapter
TEMPERATURE = 0.7  # not 1, so a logprob that forgets the temperature is caught
EOS_BIAS = 2.5  # added to the EOS logit while sampling, so some replies stop early
BATCH = 8
PROMPTS = [  # several lengths, so every rollout batch is left-padded
    "give a short opinion on the coffee",
    "what do you think about the tea ? reply in one sentence",
    "describe the city",
    "write a short review of the book please",
    "pizza",
    "why would you recommend this novel to people who like a good poem ?",
    "describe the river and the forest",
    "what is your opinion",
]
LAYOUTS = {
    # name: (mini_batch_size, gradient_accumulation_steps, gradient_checkpointing); one PPO epoch each
    "single_pass": (BATCH, 1, False),
    "two_minibatches": (BATCH // 2, 1, False),
    # Training-mode forwards, checkpointed layers re-entering their role in the backward pass.
    "micro_batches_checkpointed": (BATCH // 2, 2, True),
}


pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # tests/conftest.py


# -- tiny roles on a tiny GPT-2 -------------------------------------------------------------------


def model_args(base: Path):
    from rlhf.core.models import ModelArguments

    return ModelArguments(model_name_or_path=str(base), lora_r=4, lora_alpha=8, lora_dropout=DROPOUT)


def save_random_lora(base: Path, out: Path, seed: int, head: bool = False) -> Path:
    """A LoRA adapter on ``base`` with random (non-zero) A and B, saved as a stage would save it;
    ``head``: plus a random score head in HEAD_FILE, as the reward stage leaves it."""
    from peft import get_peft_model
    from transformers import GPT2LMHeadModel

    from rlhf.core.models import build_peft_config

    model = GPT2LMHeadModel.from_pretrained(base)
    model = get_peft_model(model, build_peft_config(model_args(base), model))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(out)
    if head:
        hidden = model.config.n_embd
        save_file({"weight": torch.randn(1, hidden, generator=generator)}, str(out / HEAD_FILE))
    return out


@pytest.fixture(scope="module")
def roles(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """For each reference kind: {base, sft, reward} directories.

    ``adapter``: the SFT stage's LoRA adapter and the reward adapter on the tiny GPT-2.
    ``merged``: the SFT adapter merged into a full model, with the reward adapter trained on that
    model (PPO puts every role on the SFT model's weights, so the reward adapter must match them).
    """
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    from rlhf.core.models import load_tokenizer

    root = tmp_path_factory.mktemp("ppo_trainer")
    gpt2 = make_tiny_gpt2_dir(root / "gpt2", dropout=DROPOUT)
    sft = save_random_lora(gpt2, root / "sft", seed=1)
    merged = root / "sft_merged"
    sft_model = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(gpt2), str(sft))
    sft_model.merge_and_unload().save_pretrained(merged)
    load_tokenizer(str(gpt2)).save_pretrained(merged)
    return {
        "adapter": {"base": gpt2, "sft": sft, "reward": save_random_lora(gpt2, root / "reward", seed=2, head=True)},
        "merged": {"base": merged, "sft": merged,
                   "reward": save_random_lora(merged, root / "reward_on_merged", seed=3, head=True)},
    }


def make_trainer(dirs: dict[str, Path], layout: str, **overrides):
    """A PPOTrainer on ``dirs`` with update ``layout``; ``overrides``: other PPOArguments."""
    from rlhf.core.generation import SamplingArguments
    from rlhf.core.models import load_tokenizer
    from rlhf.ppo.trainer import PPOArguments, PPOTrainer, build_roles

    mini_batch_size, accumulation, checkpointing = LAYOUTS[layout]
    args = PPOArguments(sft_model=str(dirs["sft"]), reward_model=str(dirs["reward"]), output_dir="unused",
                        batch_size=BATCH, mini_batch_size=mini_batch_size, gradient_accumulation_steps=accumulation,
                        ppo_epochs=1, max_steps=2, learning_rate=1e-2, seed=0,
                        **{"gradient_checkpointing": checkpointing, **overrides})
    sampling = SamplingArguments(max_new_tokens=8, temperature=TEMPERATURE)
    registry, reference = build_roles(model_args(dirs["base"]), args, torch.device("cpu"))
    # A merged SFT model is the base: the reference is every adapter off.
    assert reference == (None if dirs["sft"] == dirs["base"] else "reference")
    trainer = PPOTrainer(args, sampling, registry, load_tokenizer(str(dirs["base"])), PROMPTS, reference)
    assert trainer.single_pass() == (layout == "single_pass")
    # Policy != reference and value != reward from the start, so a swapped role is caught too.
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for param in registry.parameters_of("policy") + registry.parameters_of("value"):
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return trainer


# -- capture what a step computes ----------------------------------------------------------------


def capture_step(trainer, monkeypatch) -> dict:
    """Run one train_step and return the rollout and the inputs of the core calls it made."""
    seen: dict = {"policy_loss": [], "optimizer_steps": 0}
    eos = trainer.tokenizer.eos_token_id

    def bias(module, args, kwargs, output):
        # Only sampling runs the whole LM, with the KV cache; scoring runs the body without it.
        if kwargs.get("use_cache"):
            output.logits = output.logits.clone()
            output.logits[..., eos] += EOS_BIAS
        return output

    update = trainer.update

    def update_spy(rollout, *args, **kwargs):
        seen["rollout"] = rollout
        return update(rollout, *args, **kwargs)

    compute_rewards, gae_advantages, ppo_policy_loss = pm.compute_rewards, pm.gae_advantages, pm.ppo_policy_loss

    def rewards_spy(scores, logprobs, ref_logprobs, mask, *args, **kwargs):
        seen.update(scores=scores.clone(), logprobs=logprobs.detach().clone(),
                    ref_logprobs=ref_logprobs.detach().clone(), mask=mask.clone())
        return compute_rewards(scores, logprobs, ref_logprobs, mask, *args, **kwargs)

    def gae_spy(rewards, values, *args, **kwargs):
        seen["values"] = values.detach().clone()
        return gae_advantages(rewards, values, *args, **kwargs)

    def policy_loss_spy(logprobs, old_logprobs, advantages, mask, *args, **kwargs):
        seen["policy_loss"].append((seen["optimizer_steps"], logprobs.detach().clone(), old_logprobs.clone(),
                                    mask.clone()))
        return ppo_policy_loss(logprobs, old_logprobs, advantages, mask, *args, **kwargs)

    def count_optimizer_step(optimizer, args, kwargs):
        seen["optimizer_steps"] += 1

    with monkeypatch.context() as patch:
        patch.setattr(trainer, "update", update_spy)
        patch.setattr(pm, "compute_rewards", rewards_spy)
        patch.setattr(pm, "gae_advantages", gae_spy)
        patch.setattr(pm, "ppo_policy_loss", policy_loss_spy)
        hooks = [trainer.optimizer.register_step_post_hook(count_optimizer_step),
                 trainer.registry.base_model.register_forward_hook(bias, with_kwargs=True)]
        try:
            seen["stats"] = trainer.train_step()
        finally:
            for hook in hooks:
                hook.remove()
    args = trainer.args
    assert seen["optimizer_steps"] == args.batch_size // args.mini_batch_size
    assert len(seen["policy_loss"]) == args.batch_size // args.micro_batch_size
    return seen


# -- the oracle -----------------------------------------------------------------------------------


def standalone(base: Path, adapter: Path | None = None):
    """A role rebuilt outside the trainer: a fresh copy of the base, peft's own loading, eval mode."""
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(base)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    return model.eval()


@torch.no_grad()
def forward_unpadded(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (n, v), final hidden states (n, h)) of one unpadded sequence ``(n,)``, default positions."""
    out = model(input_ids=ids[None], output_hidden_states=True)
    logits, hidden = out.logits[0], out.hidden_states[-1][0]
    # hidden_states[-1] is after GPT-2's final layer norm: the LM head reads exactly it.
    torch.testing.assert_close(model.get_output_embeddings()(hidden), logits)
    return logits, hidden


def rows_of(rollout):
    """Per row: (unpadded ids, prompt length q, reply length r)."""
    s = rollout.query_width
    for i in range(rollout.input_ids.shape[0]):
        real = rollout.attention_mask[i].bool()
        q, r = int(real[:s].sum()), int(rollout.response_mask[i].sum())
        ids = rollout.input_ids[i][real]  # left pads and pads after EOS dropped: (q + r,)
        assert len(ids) == q + r and torch.equal(real[s:], rollout.response_mask[i])
        yield i, ids, q, r


def expected_reply_logprobs(model, rollout) -> list[torch.Tensor]:
    """Per row: ``(r,)`` logprobs of the reply tokens at the sampling temperature."""
    found = []
    for _, ids, q, r in rows_of(rollout):
        logits, _ = forward_unpadded(model, ids)
        # logits[k] predicts token k + 1, so reply token j (at q + j) is predicted at q + j - 1.
        logprobs = torch.log_softmax(logits[q - 1 : q + r - 1] / TEMPERATURE, dim=-1)
        found.append(logprobs.gather(-1, ids[q:, None]).squeeze(-1))
    return found


def expected_values(model, head: torch.Tensor, rollout) -> list[torch.Tensor]:
    """Per row: ``(r,)`` value of the state before each reply token."""
    found = []
    for _, ids, q, r in rows_of(rollout):
        _, hidden = forward_unpadded(model, ids)
        found.append(hidden[q - 1 : q + r - 1] @ head.reshape(-1))
    return found


def expected_scores(model, head: torch.Tensor, rollout) -> torch.Tensor:
    """``(b,)`` reward-model score of each whole sequence.

    The score sits on the last token that is not the pad token, the rule transformers'
    sequence-classification heads (and so the reward stage's training) use. Here pad == EOS, so for a
    reply that stopped that is the token before its EOS; for a reply cut at the length limit it is
    the reply's last token.
    """
    scores = []
    for i, ids, _, _ in rows_of(rollout):
        _, hidden = forward_unpadded(model, ids)
        last = len(ids) - 1 - int(bool(rollout.ends_with_eos[i]))
        scores.append(hidden[last] @ head.reshape(-1))
    return torch.stack(scores)


def assert_rows_close(found: torch.Tensor, expected: list[torch.Tensor], mask: torch.Tensor, what: str) -> None:
    """Row i of ``found (b, t)`` equals ``expected[i]`` on its reply tokens (the rest is masked)."""
    for i, row in enumerate(expected):
        r = len(row)
        assert mask[i].tolist() == [True] * r + [False] * (mask.shape[1] - r), what
        torch.testing.assert_close(found[i, :r], row, rtol=1e-5, atol=1e-5, msg=lambda m, i=i: f"{what}, row {i}: {m}")


# -- the tests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("value_model", ["critic", "policy_head"])
@pytest.mark.parametrize("reference_kind", ["adapter", "merged"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_step_quantities_equal_a_direct_forward_of_each_role(roles, tmp_path, monkeypatch, layout, reference_kind,
                                                             value_model):
    """Scores, policy/reference logprobs and values that enter a step's rewards and advantages are
    each role's plain forward over the unpadded sequence, in eval mode; twice, across an update.
    With ``policy_head`` the values are the value head on the policy's own hidden states."""
    dirs = roles[reference_kind]
    trainer = make_trainer(dirs, layout, value_model=value_model)
    penalty = trainer.args.missing_eos_penalty
    reward_head = read_score_head(dirs["reward"])
    early_stops = cut_offs = padded = 0
    for step in range(2):
        # The trainable roles as they are now (the update will move them): saved, then reloaded
        # outside the registry.
        for role in ("policy", "value"):
            trainer.registry.save(role, tmp_path / f"{role}_{step}")
        seen = capture_step(trainer, monkeypatch)
        rollout, mask = seen["rollout"], seen["mask"]
        assert torch.equal(mask, rollout.response_mask)
        ends = rollout.ends_with_eos
        early_stops += int(ends.sum())
        cut_offs += int((~ends).sum())
        padded += int((rollout.attention_mask[:, 0] == 0).sum())

        policy = standalone(dirs["base"], tmp_path / f"policy_{step}")
        reference = standalone(dirs["base"], None if reference_kind == "merged" else dirs["sft"])
        assert_rows_close(seen["logprobs"], expected_reply_logprobs(policy, rollout), mask,
                          f"step {step}: policy logprobs")
        assert_rows_close(seen["ref_logprobs"], expected_reply_logprobs(reference, rollout), mask,
                          f"step {step}: reference logprobs")

        value_head = read_score_head(tmp_path / f"value_{step}")
        value = policy if value_model == "policy_head" else standalone(dirs["base"], tmp_path / f"value_{step}")
        assert_rows_close(seen["values"], expected_values(value, value_head, rollout), mask, f"step {step}: values")

        raw = expected_scores(standalone(dirs["base"], dirs["reward"]), reward_head, rollout)
        # A reply cut at the length limit gets the missing-EOS penalty instead of its score.
        expected = torch.where(ends, raw, torch.full_like(raw, penalty))
        torch.testing.assert_close(seen["scores"], expected, rtol=1e-5, atol=1e-5)
        assert seen["stats"]["score"] == pytest.approx(float(raw.mean()), abs=1e-5)  # logged before the penalty
    # The rollouts exercised what this test is about.
    assert early_stops and cut_offs and padded, (early_stops, cut_offs, padded)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_first_minibatch_ratio_is_exactly_one(roles, monkeypatch, layout):
    """Before the first optimizer step of an update the policy is the one that produced the rollout
    logprobs, so the ratio is 1: no dropout, same positions, same slice. In the single-pass layout
    both come from one forward (bit for bit); otherwise the first minibatch is recomputed on a subset
    of rows (equal up to float rounding), and the next one, after an optimizer step, moves."""
    trainer = make_trainer(roles["adapter"], layout)
    for _ in range(2):
        calls = capture_step(trainer, monkeypatch)["policy_loss"]
        first = [call for call in calls if call[0] == 0]  # micro-batches before the first optimizer step
        assert len(first) == trainer.args.gradient_accumulation_steps
        for _, logprobs, old_logprobs, mask in first:
            if layout == "single_pass":
                assert torch.equal(logprobs, old_logprobs)
            else:
                torch.testing.assert_close(logprobs[mask], old_logprobs[mask], rtol=0, atol=1e-5)
        # After an optimizer step (learning rate 1e-2) the ratio is no longer 1: the capture sees the
        # update's own forward, not a copy of the rollout logprobs.
        for _, logprobs, old_logprobs, mask in calls[len(first):]:
            assert (logprobs[mask] - old_logprobs[mask]).abs().max() > 1e-3
        assert len(calls) > len(first) or layout == "single_pass"


def test_gradient_checkpointing_takes_the_same_step(roles, monkeypatch):
    """Checkpointed layers are recomputed in the backward pass, after the registry has switched roles
    (the value loss is backpropagated while the policy was entered last); each must be recomputed
    under its own adapter, so the step equals the one without checkpointing."""
    from peft import get_peft_model_state_dict

    after = {}
    for checkpointing in (False, True):
        trainer = make_trainer(roles["adapter"], "micro_batches_checkpointed", gradient_checkpointing=checkpointing)
        torch.manual_seed(0)
        capture_step(trainer, monkeypatch)
        after[checkpointing] = {f"{role}.{k}": v.detach().clone() for role in ("policy", "value")
                                for k, v in get_peft_model_state_dict(trainer.model, adapter_name=role).items()}
        after[checkpointing]["value_head"] = trainer.registry.heads["value"].weight.detach().clone()
    assert after[True].keys() == after[False].keys()
    for key, expected in after[False].items():
        torch.testing.assert_close(after[True][key], expected, rtol=1e-5, atol=1e-6,
                                   msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.parametrize("entropy_coef", [0.0, 1.0])
def test_an_entropy_bonus_alone_raises_the_policy_entropy(roles, monkeypatch, entropy_coef):
    """With the clipped surrogate's gradient taken away (its loss times 0), the entropy bonus is the
    only force on the policy: a step raises the entropy of the sampled distribution over the same
    replies, and without the bonus the policy does not move."""
    trainer = make_trainer(roles["adapter"], "two_minibatches", entropy_coef=entropy_coef)
    policy = trainer.registry.parameters_of("policy")
    before = [p.detach().clone() for p in policy]
    surrogate = pm.ppo_policy_loss

    def no_surrogate_gradient(*args, **kwargs):
        loss, stats = surrogate(*args, **kwargs)
        return loss * 0.0, stats

    monkeypatch.setattr(pm, "ppo_policy_loss", no_surrogate_gradient)
    rollout = capture_step(trainer, monkeypatch)["rollout"]

    def policy_entropy() -> float:
        with torch.no_grad():
            logits, _ = trainer.roles.policy_forward(rollout)
            return float(pm.masked_mean(pm.entropy_from_logits(logits, TEMPERATURE), rollout.response_mask))

    after_step = policy_entropy()
    moved = max(float((p - b).abs().max()) for p, b in zip(policy, before))
    with torch.no_grad():
        for p, b in zip(policy, before):
            p.copy_(b)
    if entropy_coef:
        assert after_step > policy_entropy() + 1e-3
    else:
        assert moved == 0.0


def test_a_negative_entropy_coef_is_refused():
    from rlhf.core.errors import UserError
    from rlhf.ppo.trainer import PPOArguments

    with pytest.raises(UserError, match="entropy_coef"):
        PPOArguments(entropy_coef=-0.01)
