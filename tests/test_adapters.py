"""The adapter registry: policy, reward and value adapters on ONE base, checked against separate models."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel
from torch.testing import assert_close

from rlhf.core.adapters import (AdapterRegistry, attention_mask_for, last_non_pad_index, position_ids_from_mask,
                                read_score_head)
from rlhf.core.data import write_jsonl
from rlhf.core.formatting import encode_prompt_reply
from rlhf.core.generation import pad_ids
from rlhf.core.models import ModelArguments, load_base_model, load_tokenizer
from reward.score import load_reward_model
from rlhf.core.scoring import score_replies

WORDS = ["coffee", "tea", "pizza", "bread", "cheese", "apple", "mango", "pasta"]
PAIRS = [("write a short review of the tea", "the tea is lovely ."),
         ("what do you think of the city ?", "i love the city and the river and the park ."),
         ("hi", "no")]


def reply_logits(registry, name, ids, mask):
    """LM logits ``(b, s, v)`` under adapter ``name`` (None = the base)."""
    return registry.lm_head()(registry.hidden_states(name, ids, mask))


def token_values(registry, name, ids, mask):
    """Per-token scalar values ``(b, s)`` from adapter ``name`` and its head."""
    head = registry.heads[name]
    return head(registry.hidden_states(name, ids, mask).to(head.weight.dtype)).squeeze(-1)


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """An SFT adapter and a reward adapter (with its score head), trained a few steps on the tiny model."""
    from reward.train import run as reward_run
    from sft.train import run as sft_run

    root = tmp_path_factory.mktemp("adapters")
    write_jsonl(root / "sft.jsonl", [{"prompt": f"write a short review of the {w}", "completion": f"the {w} is good ."}
                                     for w in WORDS])
    write_jsonl(root / "prefs.jsonl", [{"prompt": f"write a short review of the {w}", "chosen": f"the {w} is lovely .",
                                        "rejected": f"the {w} is awful ."} for w in WORDS])
    common = ["--model_name_or_path", str(tiny_model_dir), "--validation_size", "0", "--test_size", "0",
              "--max_steps", "2", "--warmup_steps", "0", "--learning_rate", "2e-2", "--lora_r", "4",
              "--lora_alpha", "8", "--per_device_train_batch_size", "4"]
    sft_run(argv=common + ["--train_file", str(root / "sft.jsonl"), "--output_dir", str(root / "sft")])
    reward_run(argv=common + ["--train_file", str(root / "prefs.jsonl"), "--output_dir", str(root / "reward")])
    return root / "sft", root / "reward"


def fresh_base(model_dir):
    return load_base_model(ModelArguments(model_name_or_path=str(model_dir), peft_method="full"))


@pytest.fixture
def registry(runs, tiny_model_dir):
    sft_dir, reward_dir = runs
    reg = AdapterRegistry(fresh_base(tiny_model_dir))
    reg.load("policy", sft_dir, trainable=True)
    reg.load("reward", reward_dir, trainable=False)
    reg.add("value", LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    reg.add_head("value")
    reg.peft_model.eval()
    return reg


@pytest.fixture
def batch(tiny_model_dir):
    """Left-padded prompt+reply sequences of three different lengths: ``(ids (b, s), mask (b, s))``."""
    tokenizer = load_tokenizer(str(tiny_model_dir))
    seqs = [encode_prompt_reply(tokenizer, p, r)[0] for p, r in PAIRS]
    assert len({len(s) for s in seqs}) == 3
    return pad_ids(seqs, tokenizer.pad_token_id)


def test_policy_logits_match_a_separately_loaded_peft_model(registry, runs, tiny_model_dir, batch):
    ids, mask = batch
    separate = PeftModel.from_pretrained(fresh_base(tiny_model_dir), str(runs[0])).eval()
    with torch.no_grad():
        expected = separate(input_ids=ids, attention_mask=mask).logits
        found = reply_logits(registry, "policy", ids, mask)
        base = reply_logits(registry, None, ids, mask)
    assert_close(found, expected, rtol=1e-5, atol=1e-5)
    assert (found - base).abs().max() > 1e-3  # the adapter does something


def test_sdpa_mask_gives_every_left_pad_query_a_key_and_keeps_real_rows(batch):
    """Fully masked query rows make SDPA's GPU backward NaN; each such pad query attends to itself."""
    ids, mask = batch
    assert not mask.all()  # left padding present
    found = attention_mask_for(mask, "sdpa")
    b, s = mask.shape
    assert found.shape == (b, 1, s, s) and found.dtype == torch.bool
    assert found.any(-1).all()  # no query without a key
    expected = torch.ones(s, s, dtype=torch.bool).tril() & mask.bool()[:, None, :]
    real = mask.bool()
    assert torch.equal(found[:, 0][real], expected[real])  # real queries: causal over real keys, as before
    pads = (~real).nonzero().tolist()
    assert pads and all(found[i, 0, q].nonzero().flatten().tolist() == [q] for i, q in pads)
    assert attention_mask_for(mask, "eager") is mask  # finite fill values: nothing to fix
    unpadded = torch.ones_like(mask)
    assert attention_mask_for(unpadded, "sdpa") is unpadded  # no padding: the causal fast path stays


def test_registry_forward_equals_the_model_with_its_own_padding_mask(registry, batch):
    ids, mask = batch
    body = registry.peft_model.get_base_model().base_model
    assert registry.base_model.config._attn_implementation == "sdpa"
    with torch.no_grad(), registry.use("policy"):
        expected = body(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).last_hidden_state
    with torch.no_grad():
        found = registry.hidden_states("policy", ids, mask)
    assert torch.equal(found[mask.bool()], expected[mask.bool()])


def test_no_adapter_is_the_plain_base_model(registry, tiny_model_dir, batch):
    ids, mask = batch
    with torch.no_grad():
        expected = fresh_base(tiny_model_dir).eval()(input_ids=ids, attention_mask=mask).logits
        assert_close(reply_logits(registry, None, ids, mask), expected, rtol=1e-5, atol=1e-5)


def test_reward_score_matches_the_stand_alone_reward_model(registry, runs, tiny_model_dir, batch):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model, reward_tokenizer = load_reward_model(str(runs[1]))
    expected = torch.tensor(score_replies(model, reward_tokenizer, [p for p, _ in PAIRS], [r for _, r in PAIRS]))
    ids, mask = batch  # left-padded, unlike score_replies' right padding
    with torch.no_grad():
        found = registry.score("reward", ids, mask, tokenizer.pad_token_id)
        # one row at a time, no padding at all
        single = torch.cat([registry.score("reward", ids[i : i + 1, -int(mask[i].sum()):],
                                           mask[i : i + 1, -int(mask[i].sum()):], tokenizer.pad_token_id)
                            for i in range(len(PAIRS))])
    assert_close(found, expected, rtol=0, atol=1e-5)
    assert_close(single, expected, rtol=0, atol=1e-5)
    assert expected.std() > 1e-4  # three different scores
    assert_close(registry.heads["reward"].weight.detach(), read_score_head(runs[1]))


def test_last_non_pad_index():
    # pad = 0: rows "x x 0 0" (right padded), "0 0 x x" (left padded), "0 x 0 x"
    ids = torch.tensor([[5, 6, 0, 0], [0, 0, 7, 8], [0, 9, 0, 9], [0, 0, 0, 0]])
    assert last_non_pad_index(ids, 0).tolist() == [1, 3, 3, 0]


def test_use_restores_the_previous_adapter_even_on_error(registry):
    model = registry.peft_model
    model.set_adapter("policy")
    with registry.use("reward"):
        assert model.active_adapter == "reward"
    assert model.active_adapter == "policy"
    with pytest.raises(RuntimeError, match="boom"):
        with registry.use("value"):
            assert model.active_adapter == "value"
            raise RuntimeError("boom")
    assert model.active_adapter == "policy"
    with pytest.raises(RuntimeError, match="boom"):
        with registry.use(None):
            raise RuntimeError("boom")
    assert model.active_adapter == "policy"
    with pytest.raises(KeyError):
        with registry.use("critic"):
            pass


def _adapter_params(registry, name):
    return [p for n, p in registry.peft_model.named_parameters() if f".{name}." in n]


def test_each_adapter_keeps_its_own_requires_grad(registry):
    for name in (None, "reward", "value", "policy", "reward"):
        with registry.use(name):
            pass
        policy, value, reward = (_adapter_params(registry, n) for n in ("policy", "value", "reward"))
        assert policy and value and reward
        assert all(p.requires_grad for p in policy + value), name
        assert not any(p.requires_grad for p in reward), name
        assert registry.heads["value"].weight.requires_grad and not registry.heads["reward"].weight.requires_grad
        base = [p for n, p in registry.peft_model.named_parameters() if "lora_" not in n]
        assert base and not any(p.requires_grad for p in base)
    assert {id(p) for p in registry.parameters_of("value")} == \
        {id(p) for p in value} | {id(registry.heads["value"].weight)}


def test_gradients_reach_policy_and_value_in_one_step(registry, batch, tiny_model_dir):
    ids, mask = batch
    logits = reply_logits(registry, "policy", ids, mask)
    with torch.no_grad():  # the reference pass between the two, in PPO's order
        reply_logits(registry, None, ids, mask)
        registry.score("reward", ids, mask, 2)
    values = token_values(registry, "value", ids, mask)
    (logits.mean() + values.mean()).backward()
    for name in ("policy", "value"):
        grads = [p.grad for p in registry.parameters_of(name)]
        assert grads and all(g is not None for g in grads), name
        assert any(g.abs().sum() > 0 for g in grads), name
    assert all(p.grad is None for p in _adapter_params(registry, "reward"))


def test_save_and_load_an_adapter_with_its_head(registry, tiny_model_dir, batch, tmp_path):
    ids, mask = batch
    torch.manual_seed(1)
    with torch.no_grad():  # a fresh LoRA B is zero: give it weights so the round trip has something to carry
        for n, p in registry.peft_model.named_parameters():
            if ".value." in n and "lora_B" in n:
                p.normal_(std=0.1)
        registry.heads["value"].weight.normal_()
        before = token_values(registry, "value", ids, mask)
    registry.save("value", tmp_path / "value")
    assert (tmp_path / "value" / "adapter_config.json").exists()
    assert_close(read_score_head(tmp_path / "value"), registry.heads["value"].weight.detach())

    other = AdapterRegistry(fresh_base(tiny_model_dir))
    other.load("value", tmp_path / "value", trainable=True)
    other.peft_model.eval()
    with torch.no_grad():
        after = token_values(other, "value", ids, mask)
        plain = other.hidden_states(None, ids, mask) @ other.heads["value"].weight.T
    assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert (after - plain.squeeze(-1)).abs().max() > 1e-4  # the adapter was loaded, not only the head
    assert all(p.requires_grad for p in other.parameters_of("value"))
