"""PPO's ``bf16_forwards``: the forward passes under bf16 autocast on a bf16 base.

peft keeps LoRA adapters in float32, so on a bf16 base each adapted layer casts its input up and
saves that float32 copy for backward. With ``bf16_forwards`` the registry's forwards run under
``torch.autocast(bfloat16)`` with peft's input cast off (``AdapterRegistry.computing_in``). Pinned
on a tiny random Llama loaded in bf16, with random SFT and reward adapters:

- one PPO step (two minibatches, so the policy loss is not zero by construction) on the same rollout
  gives the rollout and reference logprobs, values, scores, advantages, returns, the update's
  logprobs and values, the losses, the gradient and the parameter update of the step with the
  adapters' own float32 compute, within bf16 tolerance (see ``BF16_FACTOR`` for what that is);
- the option changes what is saved for backward: every LoRA layer reads a bf16 input (float32
  without), and the forward saves fewer bytes, at least half the float32 copies' worth less;
- gradient checkpointing recomputes each layer in bf16 too, and gives the same step;
- a float32 base: ``auto`` leaves it alone, ``true`` is refused.

About 10 s on one core.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from rlhf.core.adapters import HEAD_FILE
from rlhf.core.errors import UserError
from rlhf.demo.tiny_model import make_tiny_model_dir
from rlhf.ppo import math as pm

pytestmark = [pytest.mark.usefixtures("one_thread")]  # tests/conftest.py

# What "within bf16 tolerance" means here. How far a bf16 rounding carries depends on the model (on
# this random one the values and the gradient move by 1-3 % when the base goes from float32 to
# bf16, the logprobs by 0.05 %), so the yardstick is measured on the same step: how far the
# float32-adapter step on the bf16 base lies from the same step on a float32 base. The option adds
# roundings of the same size on the LoRA path only (its weights and rank-r intermediate in bf16;
# each layer's output is rounded to bf16 in both runs), so it may move a quantity by a small multiple
# of that yardstick: we allow BF16_FACTOR times it, root mean square over the real tokens. Measured:
# 0.7-3.1x over five seeds, adapter sizes and layouts, 1.1-1.5x on this step; for scale, the policy's
# logprobs lie 37x the yardstick from the reference's, the base's (adapters off) 170x.
BF16_FACTOR = 4.0
LORA_SCALE = 0.1  # random LoRA entries: the update B A is about twice the base weights (std 0.02)
BATCH = 8
PROMPTS = ["give a short opinion on the coffee", "describe the city", "pizza",
           "what do you think about the tea ? reply in one sentence", "write a short review of the book please",
           "describe the river and the forest", "what is your opinion", "why would you recommend this novel ?"]


def model_args(base: Path, dtype: str):
    from rlhf.core.models import ModelArguments

    return ModelArguments(model_name_or_path=str(base), lora_r=4, lora_alpha=8, torch_dtype=dtype)


def save_random_lora(base: Path, out: Path, seed: int, head: bool = False) -> Path:
    """A LoRA adapter with random (non-zero) A and B, as a stage saves it; ``head``: plus a score head."""
    from peft import get_peft_model
    from transformers import LlamaForCausalLM

    from rlhf.core.models import build_peft_config

    model = LlamaForCausalLM.from_pretrained(base)
    model = get_peft_model(model, build_peft_config(model_args(base, "float32"), model))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(LORA_SCALE * torch.randn(param.shape, generator=generator))
    model.save_pretrained(out)
    if head:
        save_file({"weight": torch.randn(1, model.config.hidden_size, generator=generator)}, str(out / HEAD_FILE))
    return out


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ppo_bf16")
    base = make_tiny_model_dir(root / "llama")
    return {"base": base, "sft": save_random_lora(base, root / "sft", seed=1),
            "reward": save_random_lora(base, root / "reward", seed=2, head=True)}


def make_trainer(dirs: dict[str, Path], dtype: str = "bfloat16", **overrides):
    """A PPOTrainer on the tiny base loaded in ``dtype``; ``overrides``: PPOArguments."""
    from rlhf.core.generation import SamplingArguments
    from rlhf.core.models import load_tokenizer
    from rlhf.ppo.trainer import PPOArguments, PPOTrainer, build_roles

    args = PPOArguments(**{"sft_model": str(dirs["sft"]), "reward_model": str(dirs["reward"]), "output_dir": "unused",
                           "batch_size": BATCH, "mini_batch_size": BATCH // 2, "max_steps": 2, "learning_rate": 1e-2,
                           "seed": 0, **overrides})
    registry, reference = build_roles(model_args(dirs["base"], dtype), args, torch.device("cpu"))
    trainer = PPOTrainer(args, SamplingArguments(max_new_tokens=8, temperature=0.7), registry,
                         load_tokenizer(str(dirs["base"])), PROMPTS, reference)
    # Policy != reference and value != reward, so the KL, the ratio and the value loss are not trivial.
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for param in trainer.params:
            param.add_(0.1 * LORA_SCALE * torch.randn(param.shape, generator=generator))
    return trainer


def lora_a_modules(trainer) -> list[torch.nn.Module]:
    from peft.tuners.lora import LoraLayer

    return [m.lora_A[name] for m in trainer.model.modules() if isinstance(m, LoraLayer) for name in m.lora_A]


def run_step(trainer, monkeypatch, rollout=None) -> dict:
    """One train_step (on ``rollout`` instead of sampling, if given): what it fed the PPO math, the
    gradient of its last optimizer step, the parameters' update and the logged losses. Per-token
    quantities are kept on real reply tokens only, flattened, in update order."""
    seen: dict = {"policy_inputs": [], "value_inputs": []}
    compute_rewards, gae_advantages = pm.compute_rewards, pm.gae_advantages
    policy_loss, value_loss = pm.ppo_policy_loss, pm.ppo_value_loss
    shape_scores, update = trainer._shape_scores, trainer.update

    def rewards_spy(scores, logprobs, ref_logprobs, mask, *args, **kwargs):
        seen.update(logprobs=logprobs.detach()[mask], ref_logprobs=ref_logprobs[mask])
        return compute_rewards(scores, logprobs, ref_logprobs, mask, *args, **kwargs)

    def gae_spy(rewards, values, mask, *args, **kwargs):
        seen["values"] = values.detach()[mask]
        return gae_advantages(rewards, values, mask, *args, **kwargs)

    def policy_loss_spy(logprobs, old_logprobs, advantages, mask, *args, **kwargs):
        seen["policy_inputs"].append([x.detach()[mask] for x in (logprobs, old_logprobs, advantages)])
        return policy_loss(logprobs, old_logprobs, advantages, mask, *args, **kwargs)

    def value_loss_spy(values, old_values, returns, mask, *args, **kwargs):
        seen["value_inputs"].append([x.detach()[mask] for x in (values, old_values, returns)])
        return value_loss(values, old_values, returns, mask, *args, **kwargs)

    def scores_spy(raw, *args):
        seen["scores"] = raw.clone()
        return shape_scores(raw, *args)

    def update_spy(rollout, *args, **kwargs):
        seen["rollout"] = rollout
        return update(rollout, *args, **kwargs)

    def gradient(optimizer, args, kwargs):
        seen["gradient"] = torch.cat([p.grad.flatten() for p in trainer.params])

    before = torch.cat([p.detach().flatten() for p in trainer.params])
    hook = trainer.optimizer.register_step_pre_hook(gradient)
    with monkeypatch.context() as patch:
        for name, spy in (("compute_rewards", rewards_spy), ("gae_advantages", gae_spy),
                          ("ppo_policy_loss", policy_loss_spy), ("ppo_value_loss", value_loss_spy)):
            patch.setattr(pm, name, spy)
        patch.setattr(trainer, "_shape_scores", scores_spy)
        patch.setattr(trainer, "update", update_spy)
        if rollout is not None:
            patch.setattr(trainer.roles, "generate", lambda adapter, prompts: rollout)
        torch.manual_seed(0)
        stats = trainer.train_step()
    hook.remove()
    seen["update"] = torch.cat([p.detach().flatten() for p in trainer.params]) - before
    for kind, names in (("policy_inputs", ("new_logprobs", "old_logprobs", "advantages")),
                        ("value_inputs", ("new_values", "old_values", "returns"))):
        for name, parts in zip(names, zip(*seen.pop(kind))):
            seen[name] = torch.cat(parts)
    seen.update(policy_loss=stats["policy_loss"], value_loss=stats["value_loss"])
    return seen


def rms(x: torch.Tensor) -> float:
    return x.double().pow(2).mean().sqrt().item()


def test_a_step_stays_within_bf16_tolerance_of_the_float32_adapter_step(dirs, monkeypatch):
    off = make_trainer(dirs, bf16_forwards="false")
    want = run_step(off, monkeypatch)
    on = make_trainer(dirs, bf16_forwards="auto")  # auto: on, since the base is bf16
    exact = make_trainer(dirs, dtype="float32")  # the yardstick: the same step on a float32 base
    assert (on.registry.compute_dtype, off.registry.compute_dtype, exact.registry.compute_dtype) == \
        (torch.bfloat16, None, None)
    got, truth = run_step(on, monkeypatch, want["rollout"]), run_step(exact, monkeypatch, want["rollout"])
    # The adapters, their gradients and what the PPO math sees stay float32.
    assert {p.dtype for p in on.params} == {torch.float32} and got["gradient"].dtype == torch.float32
    for name in ("logprobs", "ref_logprobs", "values", "scores", "advantages", "returns", "new_logprobs",
                 "new_values", "gradient", "update"):
        assert got[name].dtype == torch.float32, name
        moved, yardstick = rms(got[name] - want[name]), rms(want[name] - truth[name])
        assert moved <= BF16_FACTOR * yardstick, \
            f"{name}: bf16_forwards moved it by {moved:.3g} (rms), bf16 itself by {yardstick:.3g}"
    # The option did change the computation (else the comparison above could not tell it was ignored).
    assert not torch.equal(got["new_logprobs"], want["new_logprobs"])

    # The losses are float32 means over the inputs checked above; one number each, their own bf16
    # error is a single draw, so they are held to what their inputs' differences allow instead
    # (first order, by Cauchy-Schwarz; doubled for the clipping's max of two such terms):
    # value loss 1/2 mean((v - R)^2): |d| <= rms(v - R) rms(d(v - R)) + 1/2 rms(d(v - R))^2
    error, d_error = want["new_values"] - want["returns"], (got["new_values"] - got["returns"]) - \
        (want["new_values"] - want["returns"])
    bound = rms(error) * rms(d_error) + 0.5 * rms(d_error) ** 2
    assert abs(got["value_loss"] - want["value_loss"]) <= 2 * bound + 1e-6
    # policy loss -mean(A r), r = exp(logprob - old logprob): |d| <= rms(dA) rms(r) + rms(A) rms(dr)
    ratio = {k: (r["new_logprobs"] - r["old_logprobs"]).exp() for k, r in (("got", got), ("want", want))}
    bound = (rms(got["advantages"] - want["advantages"]) * rms(ratio["got"])
             + rms(want["advantages"]) * rms(ratio["got"] - ratio["want"]))
    assert abs(got["policy_loss"] - want["policy_loss"]) <= 2 * bound + 1e-6
    assert want["policy_loss"] != 0.0  # two minibatches: not -mean(whitened advantages) = 0


def saved_for_backward(trainer, rollout) -> tuple[set[torch.dtype], int, int]:
    """One training-mode policy forward: (dtypes of every LoRA layer's input, bytes of the activations
    it saves for backward (parameters left out), bytes of the LoRA layers' inputs)."""
    inputs: list[torch.Tensor] = []
    hooks = [m.register_forward_pre_hook(lambda module, args: inputs.append(args[0])) for m in lora_a_modules(trainer)]
    parameters = {p.untyped_storage().data_ptr() for p in trainer.model.parameters()}
    saved: dict[int, torch.Tensor] = {}

    def pack(tensor):
        saved[tensor.untyped_storage().data_ptr()] = tensor  # kept alive: no address is reused
        return tensor

    try:
        with trainer._training_mode(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            trainer.roles.policy_forward(rollout)
    finally:
        for hook in hooks:
            hook.remove()
    activations = sum(t.untyped_storage().nbytes() for ptr, t in saved.items() if ptr not in parameters)
    return {x.dtype for x in inputs}, activations, sum(x.numel() * x.element_size() for x in inputs)


def test_the_option_changes_what_the_forward_saves_for_backward(dirs):
    on, off = make_trainer(dirs, bf16_forwards="true"), make_trainer(dirs, bf16_forwards="false")
    torch.manual_seed(0)
    rollout = off.roles.generate("policy", PROMPTS)
    on_dtypes, on_bytes, _ = saved_for_backward(on, rollout)
    off_dtypes, off_bytes, copies = saved_for_backward(off, rollout)
    assert on_dtypes == {torch.bfloat16}  # the layer's own input
    assert off_dtypes == {torch.float32}  # peft's float32 copy of it, one per adapted layer
    # Without the option each adapted layer saves its float32 copy (``copies`` bytes in all); with
    # it, lora_A saves the bf16 input itself, at most half that (q, k and v share one), plus bf16
    # copies of the small LoRA weights.
    assert off_bytes - on_bytes >= copies / 2, (off_bytes, on_bytes, copies)


def test_checkpointed_layers_are_recomputed_in_bf16(dirs, monkeypatch):
    layout = dict(bf16_forwards="true", gradient_accumulation_steps=2)
    plain = make_trainer(dirs, **layout)
    want = run_step(plain, monkeypatch)
    checkpointed = make_trainer(dirs, gradient_checkpointing=True, **layout)
    dtypes: list[tuple[bool, torch.dtype]] = []  # (in a backward pass, input dtype) of each LoRA layer call
    hooks = [m.register_forward_pre_hook(lambda module, args: dtypes.append((torch._C._current_graph_task_id() != -1,
                                                                            args[0].dtype)))
             for m in lora_a_modules(checkpointed)]
    try:
        got = run_step(checkpointed, monkeypatch, want["rollout"])
    finally:
        for hook in hooks:
            hook.remove()
    recomputed = {dtype for in_backward, dtype in dtypes if in_backward}
    assert recomputed == {torch.bfloat16}  # recomputation re-enters the forward's compute dtype
    for name in ("new_logprobs", "new_values", "gradient", "update"):
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)


def test_a_float32_base_is_left_alone_by_auto_and_refused_by_true(dirs):
    from rlhf.ppo.trainer import PPOArguments

    with pytest.raises(UserError, match="bf16_forwards: true needs a bfloat16 base .* float32 weights"):
        make_trainer(dirs, dtype="float32", bf16_forwards="true")
    # auto on a float32 base: the first test's yardstick run (compute_dtype None).
    with pytest.raises(UserError, match="bf16_forwards: expected one of auto, true, false, found 'sometimes'"):
        PPOArguments(bf16_forwards="sometimes")
    assert PPOArguments(bf16_forwards=False).bf16_forwards == "false"  # a YAML boolean
