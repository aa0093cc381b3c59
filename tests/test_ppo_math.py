"""Tests for rlhf/ppo/math.py.

Each function gets a tiny hand-computed case (the arithmetic is in the comments) and a comparison
on random inputs against a slow plain-Python reference written as directly from the definition as
possible. Masked-out positions are filled with NaN wherever a function promises to ignore them, so
any leak shows up as a NaN.
"""

import math

import pytest
import torch
from torch.testing import assert_close

from rlhf.ppo.math import (
    AdaptiveKLController,
    FixedKLController,
    RunningLengthTrend,
    RunningMoments,
    apply_missing_eos_penalty,
    compute_rewards,
    distinct_n,
    entropy_from_logits,
    gae_advantages,
    kl_penalty,
    last_token_index,
    logprobs_from_logits,
    make_kl_controller,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    normalize_scores,
    ppo_policy_loss,
    ppo_value_loss,
    remove_length_trend,
    response_mask_after_eos,
)

B, T, V = 5, 7, 11  # batch, response tokens, vocab for the random comparisons


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def randn(*shape: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def prefix_mask(lengths: list[int], t: int = T) -> torch.Tensor:
    """(b, t) bool mask with the first lengths[i] positions of row i True."""
    return torch.arange(t).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)


# Rows of every kind: partly padded, full, a single token, and (where allowed) empty.
LENGTHS = [3, T, 1, 5, 2]


def nan_outside(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A copy of values with NaN at masked-out positions."""
    return torch.where(mask, values, torch.full_like(values, torch.nan))


# --------------------------------------------------------------------------------------------------
# logprobs / entropy
# --------------------------------------------------------------------------------------------------


def test_logprobs_hand_computed():
    # logits [0, ln 3] -> softmax [1/4, 3/4]; label 1 -> ln(3/4), label 0 -> ln(1/4).
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])  # (1, 2, 2)
    labels = torch.tensor([[1, 0]])
    expected = torch.tensor([[math.log(0.75), math.log(0.25)]])
    assert_close(logprobs_from_logits(logits, labels), expected)
    # temperature 2: logits [0, ln(3)/2] -> softmax [1, sqrt 3] / (1 + sqrt 3).
    expected = torch.tensor([[math.log(math.sqrt(3.0) / (1.0 + math.sqrt(3.0)))]])
    assert_close(logprobs_from_logits(logits[:, :1], labels[:, :1], temperature=2.0), expected)


def reference_logprobs(logits, labels, temperature):
    out = torch.zeros(labels.shape, dtype=torch.float64)
    for i in range(labels.shape[0]):
        for j in range(labels.shape[1]):
            row = [x / temperature for x in logits[i, j].tolist()]
            out[i, j] = row[labels[i, j]] - math.log(sum(math.exp(x) for x in row))
    return out


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_matches_reference(gen, temperature):
    logits = 3 * randn(B, T, V, gen=gen)
    labels = torch.randint(V, (B, T), generator=gen)
    before = logits.clone()
    got = logprobs_from_logits(logits, labels, temperature=temperature)
    assert_close(got, reference_logprobs(logits, labels, temperature))
    assert torch.equal(logits, before)  # the temperature division made a copy


def test_logprobs_low_precision_input_is_upcast(gen):
    logits = randn(2, 3, V, gen=gen).to(torch.bfloat16)
    labels = torch.randint(V, (2, 3), generator=gen)
    got = logprobs_from_logits(logits, labels)
    assert got.dtype == torch.float32
    assert_close(got, reference_logprobs(logits.double(), labels, 1.0).float())


def test_logprobs_gradient_flows_and_shapes_are_checked(gen):
    logits = randn(2, 3, V, gen=gen).requires_grad_()
    logprobs_from_logits(logits, torch.zeros(2, 3, dtype=torch.long)).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="labels"):
        logprobs_from_logits(logits, torch.zeros(2, 4, dtype=torch.long))


def test_entropy_hand_computed():
    # Uniform over 4 -> ln 4. Logits [0, ln 3] -> p = [1/4, 3/4] -> -(1/4 ln 1/4 + 3/4 ln 3/4).
    assert_close(entropy_from_logits(torch.zeros(1, 1, 4)), torch.tensor([[math.log(4.0)]]))
    two_way = torch.tensor([[[0.0, math.log(3.0)]]])
    expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert_close(entropy_from_logits(two_way), torch.tensor([[expected]]))
    # Temperature -> infinity flattens to uniform: at T = 1e6 the two-way entropy is ~ln 2.
    assert_close(entropy_from_logits(two_way, temperature=1e6), torch.tensor([[math.log(2.0)]]))


def test_entropy_matches_reference(gen):
    logits = 3 * randn(B, T, V, gen=gen)
    before = logits.clone()
    expected = torch.zeros(B, T, dtype=torch.float64)
    for i in range(B):
        for j in range(T):
            exps = [math.exp(x) for x in logits[i, j].tolist()]
            probs = [e / sum(exps) for e in exps]
            expected[i, j] = -sum(p * math.log(p) for p in probs)
    assert_close(entropy_from_logits(logits), expected)
    assert torch.equal(logits, before)


# --------------------------------------------------------------------------------------------------
# Masked reductions
# --------------------------------------------------------------------------------------------------


def test_masked_sum_and_mean_hand_computed():
    values = torch.tensor([[1.0, 2.0, torch.nan], [4.0, torch.nan, torch.nan]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    # sum 1 + 2 + 4 = 7 over 3 kept entries; NaN at masked positions must not leak.
    assert_close(masked_sum(values, mask), torch.tensor(7.0))
    assert_close(masked_mean(values, mask), torch.tensor(7.0 / 3.0))
    # per row: [1 + 2, 4] and [3 / 2, 4 / 1]
    assert_close(masked_sum(values, mask, dim=1), torch.tensor([3.0, 4.0]))
    assert_close(masked_mean(values, mask, dim=1), torch.tensor([1.5, 4.0]))
    # per column: [(1 + 4) / 2, 2 / 1, nothing kept -> 0]
    assert_close(masked_mean(values, mask, dim=0), torch.tensor([2.5, 2.0, 0.0]))
    # a 0/1 float mask means the same as the bool one
    assert_close(masked_mean(values, mask.float()), torch.tensor(7.0 / 3.0))


def test_masked_mean_of_empty_mask_is_zero_not_nan():
    values = torch.tensor([[torch.nan, 1.0]])
    assert_close(masked_mean(values, torch.zeros(1, 2, dtype=torch.bool)), torch.tensor(0.0))


def test_masked_sum_and_mean_match_reference(gen):
    mask = prefix_mask([0, *LENGTHS[1:]])  # includes an empty row
    values = nan_outside(randn(B, T, gen=gen), mask)
    kept_rows = [
        [x for x, keep in zip(row, mask_row) if keep]
        for row, mask_row in zip(values.tolist(), mask.tolist())
    ]
    flat = [x for row in kept_rows for x in row]
    assert_close(masked_sum(values, mask), torch.tensor(sum(flat), dtype=torch.float64))
    expected_mean = torch.tensor(sum(flat) / len(flat), dtype=torch.float64)
    assert_close(masked_mean(values, mask), expected_mean)
    row_means = [sum(row) / len(row) if row else 0.0 for row in kept_rows]
    assert_close(masked_mean(values, mask, dim=1), torch.tensor(row_means, dtype=torch.float64))


def test_masked_var_hand_computed():
    values = torch.tensor([1.0, 2.0, 3.0, 100.0])
    mask = torch.tensor([True, True, True, False])
    # kept [1, 2, 3]: mean 2, squared deviations 1 + 0 + 1 = 2 -> unbiased 2 / 2, biased 2 / 3
    assert_close(masked_var(values, mask), torch.tensor(1.0))
    assert_close(masked_var(values, mask, unbiased=False), torch.tensor(2.0 / 3.0))
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(values, torch.tensor([True, False, False, False]))


def test_masked_var_matches_reference(gen):
    mask = prefix_mask(LENGTHS)
    values = nan_outside(randn(B, T, gen=gen), mask)
    flat = values[mask].tolist()
    mean = sum(flat) / len(flat)
    expected = sum((x - mean) ** 2 for x in flat) / (len(flat) - 1)
    assert_close(masked_var(values, mask), torch.tensor(expected, dtype=torch.float64))


def test_masked_whiten_hand_computed():
    values = torch.tensor([[1.0, 2.0, 3.0, torch.nan]])
    mask = torch.tensor([[True, True, True, False]])
    # kept mean 2, unbiased var 1 -> (x - 2) / 1; masked position -> 0
    assert_close(masked_whiten(values, mask, eps=0.0), torch.tensor([[-1.0, 0.0, 1.0, 0.0]]))
    # shift_mean=False keeps the mean: (x - 2) / 1 + 2
    assert_close(
        masked_whiten(values, mask, shift_mean=False, eps=0.0), torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    )
    # scaling: kept [2, 4, 6], mean 4, var 4 -> [-1, 0, 1] and, without the shift, [3, 4, 5]
    assert_close(masked_whiten(2 * values, mask, eps=0.0), torch.tensor([[-1.0, 0.0, 1.0, 0.0]]))
    assert_close(
        masked_whiten(2 * values, mask, shift_mean=False, eps=0.0),
        torch.tensor([[3.0, 4.0, 5.0, 0.0]]),
    )


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_matches_reference(gen, shift_mean):
    mask = prefix_mask(LENGTHS)
    values = nan_outside(3 + 2 * randn(B, T, gen=gen), mask)
    flat = values[mask].tolist()
    mean = sum(flat) / len(flat)
    std = math.sqrt(sum((x - mean) ** 2 for x in flat) / (len(flat) - 1) + 1e-8)
    expected = torch.zeros(B, T, dtype=torch.float64)
    for i in range(B):
        for j in range(T):
            if mask[i, j]:
                expected[i, j] = (values[i, j] - mean) / std + (0.0 if shift_mean else mean)
    assert_close(masked_whiten(values, mask, shift_mean=shift_mean), expected)


# --------------------------------------------------------------------------------------------------
# Response masks, scores, rewards
# --------------------------------------------------------------------------------------------------


def test_response_mask_pad_equals_eos():
    # SmolLM2: eos == pad == 2. The first 2 is the reply's last token; later 2s are padding.
    ids = torch.tensor(
        [
            [5, 6, 2, 2, 2],  # ends with EOS at index 2
            [5, 6, 7, 8, 9],  # ran out of tokens: all kept, no EOS
            [2, 2, 2, 2, 2],  # immediate EOS: one kept token
            [5, 2, 7, 2, 2],  # tokens after the first EOS are dropped even if not padding
        ]
    )
    mask, ends = response_mask_after_eos(ids, eos_token_id=2, pad_token_id=2)
    assert mask.tolist() == [
        [True, True, True, False, False],
        [True, True, True, True, True],
        [True, False, False, False, False],
        [True, True, False, False, False],
    ]
    assert ends.tolist() == [True, False, True, True]


def test_response_mask_pad_differs_from_eos():
    ids = torch.tensor(
        [
            [5, 2, 0, 0],  # EOS kept, padding dropped
            [5, 6, 0, 0],  # padding without EOS: dropped, and the reply did not end with EOS
            [5, 0, 2, 0],  # an EOS after padding is not part of the reply
            [0, 0, 0, 0],  # nothing generated
        ]
    )
    mask, ends = response_mask_after_eos(ids, eos_token_id=2, pad_token_id=0)
    assert mask.tolist() == [
        [True, True, False, False],
        [True, True, False, False],
        [True, False, False, False],
        [False, False, False, False],
    ]
    assert ends.tolist() == [True, False, False, False]


@pytest.mark.parametrize("eos, pad", [(2, 2), (2, 0)])
def test_response_mask_matches_reference(gen, eos, pad):
    ids = torch.randint(4, (50, T), generator=gen)  # tiny vocab: EOS and pad show up often
    before = ids.clone()
    mask, ends = response_mask_after_eos(ids, eos_token_id=eos, pad_token_id=pad)
    for i, row in enumerate(ids.tolist()):
        expected_mask, expected_end = [], False
        for token in row:
            if token == pad and token != eos:  # padding ends the reply and is not part of it
                break
            expected_mask.append(True)
            if token == eos:
                expected_end = True
                break
        expected_mask += [False] * (T - len(expected_mask))
        assert mask[i].tolist() == expected_mask, row
        assert bool(ends[i]) == expected_end, row
    assert mask.dtype == torch.bool and ends.dtype == torch.bool
    assert torch.equal(ids, before)


def test_last_token_index():
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [1, 0, 1, 0]])
    # last True at 1; none -> -1; 3; and with a hole, still the last True (2)
    assert last_token_index(mask).tolist() == [1, -1, 3, 2]
    assert last_token_index(mask.bool()).tolist() == [1, -1, 3, 2]


def test_last_token_index_matches_reference(gen):
    mask = torch.rand(50, T, generator=gen) < 0.4  # arbitrary masks, holes and empty rows included
    expected = [max((j for j, m in enumerate(row) if m), default=-1) for row in mask.tolist()]
    assert last_token_index(mask).tolist() == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_finite_matches_elementwise_check(dtype):
    from rlhf.core.tensors import all_finite

    base = torch.randn(3, 5, 7).to(dtype)
    assert all_finite(base)
    for bad in (float("nan"), float("inf"), float("-inf")):
        for index in ((0, 0, 0), (2, 4, 6), (1, 2, 3)):
            x = base.clone()
            x[index] = bad
            assert not all_finite(x), (bad, index)
    # Finite values whose sum overflows: still all finite.
    huge = torch.full((4,), torch.finfo(dtype).max, dtype=dtype)
    assert not torch.isfinite(huge.sum()) and all_finite(huge)
    # Infinities of both signs, whose sum is NaN.
    assert not all_finite(torch.tensor([float("inf"), float("-inf"), 1.0], dtype=dtype))
    assert all_finite(torch.empty(0, dtype=dtype))
    assert all_finite(torch.ones(2, requires_grad=True) * 2)


def test_missing_eos_penalty_replaces_the_score():
    scores = torch.tensor([5.0, 5.0, -3.0])
    ends = torch.tensor([True, False, False])
    # replacement, not addition: 5 -> -1 (not 4), -3 -> -1 (not -4)
    assert_close(apply_missing_eos_penalty(scores, ends, -1.0), torch.tensor([5.0, -1.0, -1.0]))
    off = apply_missing_eos_penalty(scores, ends, None)
    assert_close(off, scores)
    assert off is not scores
    assert_close(scores, torch.tensor([5.0, 5.0, -3.0]))  # input untouched


def test_kl_penalty_hand_computed():
    logprobs = torch.tensor([[math.log(0.5)]])
    ref = torch.tensor([[math.log(0.25)]])
    # log_ratio = ln 2: k1 = ln 2, k2 = (ln 2)^2 / 2, k3 = 1/2 - 1 + ln 2
    assert_close(kl_penalty(logprobs, ref, "k1"), torch.tensor([[math.log(2.0)]]))
    assert_close(kl_penalty(logprobs, ref, "k2"), torch.tensor([[0.5 * math.log(2.0) ** 2]]))
    assert_close(kl_penalty(logprobs, ref, "k3"), torch.tensor([[0.5 - 1.0 + math.log(2.0)]]))
    assert_close(kl_penalty(logprobs, ref), kl_penalty(logprobs, ref, "k1"))  # k1 is the default
    with pytest.raises(ValueError, match="k4"):
        kl_penalty(logprobs, ref, "k4")


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_penalty_matches_reference(gen, kind):
    logprobs, ref = -randn(B, T, gen=gen).abs(), -randn(B, T, gen=gen).abs()
    expected = torch.zeros(B, T, dtype=torch.float64)
    for i in range(B):
        for j in range(T):
            log_ratio = float(logprobs[i, j] - ref[i, j])
            ratio_ref_over_policy = math.exp(-log_ratio)
            expected[i, j] = {
                "k1": log_ratio,
                "k2": 0.5 * log_ratio**2,
                "k3": (ratio_ref_over_policy - 1.0) - math.log(ratio_ref_over_policy),
            }[kind]
    assert_close(kl_penalty(logprobs, ref, kind), expected)


@pytest.mark.parametrize("kind", ["k1", "k3"])
def test_kl_estimators_are_unbiased_for_kl_policy_to_reference(gen, kind):
    # Sample tokens from the policy p; the mean estimate must approach KL(p || q), not KL(q || p).
    p = torch.softmax(randn(6, gen=gen), dim=0)
    q = torch.softmax(randn(6, gen=gen), dim=0)
    true_kl = float((p * (p / q).log()).sum())
    reverse_kl = float((q * (q / p).log()).sum())
    tokens = torch.multinomial(p, 200_000, replacement=True, generator=gen)
    estimate = kl_penalty(p.log()[tokens], q.log()[tokens], kind).mean().item()
    assert abs(estimate - true_kl) < 0.01
    assert abs(true_kl - reverse_kl) > 0.05  # the check above can tell the two apart


def test_compute_rewards_hand_computed():
    mask = torch.tensor([[True, True, False], [True, True, True]])
    ref = torch.zeros(2, 3)
    logprobs = torch.tensor([[0.1, 0.2, torch.nan], [0.0, 0.3, 0.1]])  # k1 kl = logprobs - 0
    scores = torch.tensor([1.0, 2.0])
    rewards, kl = compute_rewards(scores, logprobs, ref, mask, kl_coef=0.5)
    # row 0: -0.5 * [0.1, 0.2] and score 1 at index 1; row 1: -0.5 * [0, 0.3, 0.1], score 2 at 2
    assert_close(rewards, torch.tensor([[-0.05, -0.1 + 1.0, 0.0], [0.0, -0.15, -0.05 + 2.0]]))
    assert_close(kl, torch.tensor([[0.1, 0.2, 0.0], [0.0, 0.3, 0.1]]))


def test_compute_rewards_row_without_tokens_gets_nothing():
    mask = torch.tensor([[False, False], [True, False]])
    rewards, kl = compute_rewards(
        torch.tensor([7.0, 3.0]), torch.zeros(2, 2), torch.zeros(2, 2), mask, kl_coef=0.1
    )
    assert_close(rewards, torch.tensor([[0.0, 0.0], [3.0, 0.0]]))


@pytest.mark.parametrize("kind", ["k1", "k3"])
def test_compute_rewards_matches_reference(gen, kind):
    mask = prefix_mask(LENGTHS)
    logprobs = nan_outside(-randn(B, T, gen=gen).abs(), mask)
    ref = nan_outside(-randn(B, T, gen=gen).abs(), mask)
    scores = randn(B, gen=gen)
    rewards, kl = compute_rewards(scores, logprobs, ref, mask, kl_coef=0.05, kl_kind=kind)
    expected_rewards = torch.zeros(B, T, dtype=torch.float64)
    for i in range(B):
        last = max(j for j in range(T) if mask[i, j])
        for j in range(T):
            if mask[i, j]:
                expected_rewards[i, j] = -0.05 * kl_penalty(logprobs[i, j], ref[i, j], kind)
        expected_rewards[i, last] += scores[i]
    assert_close(rewards, expected_rewards)
    assert not kl.isnan().any() and not kl[~mask].any()


# --------------------------------------------------------------------------------------------------
# GAE
# --------------------------------------------------------------------------------------------------


def test_gae_hand_computed():
    rewards = torch.tensor([[1.0, 2.0, torch.nan]])
    values = torch.tensor([[0.5, 1.0, torch.nan]])
    mask = torch.tensor([[True, True, False]])
    advantages, returns = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.8)
    # j=1 is the last real token, V after it is 0: delta_1 = 2 + 0.9 * 0 - 1 = 1, A_1 = 1
    # j=0: delta_0 = 1 + 0.9 * 1.0 - 0.5 = 1.4, A_0 = 1.4 + 0.9 * 0.8 * 1 = 2.12
    assert_close(advantages, torch.tensor([[2.12, 1.0, 0.0]]))
    # returns = A + V = [2.62, 2.0]; 0 at the padding
    assert_close(returns, torch.tensor([[2.62, 2.0, 0.0]]))


def test_gae_gamma_lam_one_is_reward_to_go_minus_value():
    # With gamma = lam = 1, A_j = (sum of rewards from j on) - V_j:
    # rewards [0, 0, 1], V = 0.5 -> [1, 1, 1] - 0.5
    rewards, values = torch.tensor([[0.0, 0.0, 1.0]]), torch.full((1, 3), 0.5)
    advantages, returns = gae_advantages(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    assert_close(advantages, torch.tensor([[0.5, 0.5, 0.5]]))
    assert_close(returns, torch.tensor([[1.0, 1.0, 1.0]]))


def reference_gae(rewards, values, mask, gamma, lam):
    """Per row, run the GAE recursion over the real tokens only, as if padding were deleted."""
    advantages = torch.zeros(rewards.shape, dtype=torch.float64)
    for i in range(rewards.shape[0]):
        real = [j for j in range(rewards.shape[1]) if mask[i, j]]
        next_value, next_advantage = 0.0, 0.0
        for j in reversed(real):
            delta = float(rewards[i, j]) + gamma * next_value - float(values[i, j])
            next_advantage = delta + gamma * lam * next_advantage
            next_value = float(values[i, j])
            advantages[i, j] = next_advantage
    returns = torch.where(mask, advantages + values.nan_to_num(), torch.zeros_like(advantages))
    return advantages, returns


@pytest.mark.parametrize("mask_kind", ["prefix", "holes"])
def test_gae_matches_reference(gen, mask_kind):
    if mask_kind == "prefix":
        mask = prefix_mask([0, *LENGTHS[1:]])
    else:  # left padding, holes, empty rows: padding must act as deleted
        mask = torch.rand(B, T, generator=gen) < 0.6
    rewards = nan_outside(randn(B, T, gen=gen), mask)
    values = nan_outside(randn(B, T, gen=gen), mask)
    advantages, returns = gae_advantages(rewards, values, mask, gamma=0.95, lam=0.9)
    expected_advantages, expected_returns = reference_gae(rewards, values, mask, 0.95, 0.9)
    assert_close(advantages, expected_advantages)
    assert_close(returns, expected_returns)


def test_gae_padding_does_not_change_real_tokens(gen):
    rewards, values = randn(1, 4, gen=gen), randn(1, 4, gen=gen)
    short_adv, short_ret = gae_advantages(rewards, values, torch.ones(1, 4), gamma=1.0, lam=0.95)
    # The same reply followed by padding holding large junk values and rewards.
    padded_mask = torch.tensor([[True] * 4 + [False] * 3])
    junk = torch.full((1, 3), 1e6, dtype=torch.float64)
    padded_rewards, padded_values = torch.cat([rewards, junk], 1), torch.cat([values, junk], 1)
    padded_adv, padded_ret = gae_advantages(
        padded_rewards, padded_values, padded_mask, gamma=1.0, lam=0.95
    )
    assert_close(padded_adv[:, :4], short_adv)
    assert_close(padded_ret[:, :4], short_ret)
    assert not padded_adv[:, 4:].any() and not padded_ret[:, 4:].any()


def test_gae_outputs_are_detached(gen):
    values = randn(2, 3, gen=gen).requires_grad_()
    advantages, returns = gae_advantages(randn(2, 3, gen=gen), values, torch.ones(2, 3), 1.0, 0.95)
    assert not advantages.requires_grad and not returns.requires_grad


# --------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------


def test_policy_loss_hand_computed():
    # Four real tokens covering each side of the clip, one padded token, clip_range 0.2:
    #   ratio 1.5, A=+1: max(-1.5, -1.2) = -1.2 (clipped)
    #   ratio 1.5, A=-1: max( 1.5,  1.2) =  1.5
    #   ratio 0.5, A=+1: max(-0.5, -0.8) = -0.5
    #   ratio 0.5, A=-1: max( 0.5,  0.8) =  0.8 (clipped)
    # loss = (-1.2 + 1.5 - 0.5 + 0.8) / 4 = 0.15
    old = torch.zeros(1, 5)
    logprobs = torch.log(torch.tensor([[1.5, 1.5, 0.5, 0.5, 9.0]])).requires_grad_()
    advantages = torch.tensor([[1.0, -1.0, 1.0, -1.0, 100.0]])
    mask = torch.tensor([[True, True, True, True, False]])
    loss, stats = ppo_policy_loss(logprobs, old, advantages, mask, clip_range=0.2)
    assert_close(loss, torch.tensor(0.15))
    assert_close(stats.clipfrac, torch.tensor(0.5))
    assert_close(stats.ratio_mean, torch.tensor(1.0))  # (1.5 + 1.5 + 0.5 + 0.5) / 4
    # k3 per token: (r - 1) - ln r -> 0.5 - ln 1.5 and -0.5 + ln 2, two of each
    expected_kl = (2 * (0.5 - math.log(1.5)) + 2 * (-0.5 + math.log(2.0))) / 4
    assert_close(stats.approx_kl, torch.tensor(expected_kl))
    # Gradient d/dlogp of -A * ratio is -A * ratio, / 4 tokens; clipped and padded tokens get 0.
    loss.backward()
    assert_close(logprobs.grad, torch.tensor([[0.0, 1.5 / 4, -0.5 / 4, 0.0, 0.0]]))
    assert all(not s.requires_grad for s in stats)


def test_policy_loss_on_policy_is_minus_mean_advantage(gen):
    # First minibatch of an epoch: ratio = 1, nothing clipped, loss = -masked_mean(A).
    mask = prefix_mask(LENGTHS)
    logprobs = -randn(B, T, gen=gen).abs()
    advantages = nan_outside(randn(B, T, gen=gen), mask)
    loss, stats = ppo_policy_loss(logprobs, logprobs.clone(), advantages, mask, clip_range=0.2)
    assert_close(loss, -advantages[mask].mean())
    assert stats.clipfrac == 0 and stats.approx_kl == 0 and stats.ratio_mean == 1


def test_policy_loss_matches_reference(gen):
    mask = prefix_mask(LENGTHS)
    logprobs = nan_outside(-randn(B, T, gen=gen).abs(), mask)
    old = nan_outside(logprobs + 0.3 * randn(B, T, gen=gen), mask)
    advantages = nan_outside(randn(B, T, gen=gen), mask)
    loss, stats = ppo_policy_loss(logprobs, old, advantages, mask, clip_range=0.1)
    losses, clipped, kls, ratios = [], [], [], []
    for i in range(B):
        for j in range(T):
            if not mask[i, j]:
                continue
            ratio = math.exp(float(logprobs[i, j] - old[i, j]))
            a = float(advantages[i, j])
            surrogate = min(a * ratio, a * min(max(ratio, 0.9), 1.1))  # PPO's objective, maximised
            losses.append(-surrogate)
            clipped.append(a * min(max(ratio, 0.9), 1.1) < a * ratio)
            kls.append((ratio - 1) - math.log(ratio))
            ratios.append(ratio)
    n = len(losses)
    assert_close(loss, torch.tensor(sum(losses) / n, dtype=torch.float64))
    assert_close(stats.clipfrac, torch.tensor(sum(clipped) / n))
    assert_close(stats.approx_kl, torch.tensor(sum(kls) / n, dtype=torch.float64))
    assert_close(stats.ratio_mean, torch.tensor(sum(ratios) / n, dtype=torch.float64))


def test_value_loss_hand_computed():
    # old values 0, clip 0.2:
    #   V=0.5,  R=1: unclipped (0.5 - 1)^2 = 0.25; V_clip = 0.2 -> (0.2 - 1)^2 = 0.64
    #                max -> 0.64 (clipped)
    #   V=-0.1, R=0: within the clip, both 0.01 -> 0.01 (not counted as clipped)
    # loss = 0.5 * (0.64 + 0.01) / 2 = 0.1625
    values = torch.tensor([[0.5, -0.1, 3.0]], requires_grad=True)
    old = torch.zeros(1, 3)
    returns = torch.tensor([[1.0, 0.0, torch.nan]])
    mask = torch.tensor([[True, True, False]])
    loss, stats = ppo_value_loss(values, old, returns, mask, clip_range_value=0.2)
    assert_close(loss, torch.tensor(0.1625))
    assert_close(stats.vf_clipfrac, torch.tensor(0.5))
    # returns [1, 0]: var 0.25; residuals [0.5, 0.1]: var 0.04 -> 1 - 0.04 / 0.25 = 0.84
    assert_close(stats.explained_variance, torch.tensor(0.84))
    # The clipped token's gradient is 0; the other: 0.5 * 2 * (V - R) / 2 tokens = -0.05.
    loss.backward()
    assert_close(values.grad, torch.tensor([[0.0, -0.05, 0.0]]))
    assert all(not s.requires_grad for s in stats)


def test_explained_variance_extremes():
    mask = torch.ones(1, 3, dtype=torch.bool)
    returns = torch.tensor([[1.0, 2.0, 4.0]])
    _, perfect = ppo_value_loss(returns, returns, returns, mask, 0.2)
    assert_close(perfect.explained_variance, torch.tensor(1.0))
    _, constant = ppo_value_loss(torch.full((1, 3), 7.0), returns, returns, mask, 0.2)
    assert_close(constant.explained_variance, torch.tensor(0.0))  # a constant explains nothing
    _, flat_returns = ppo_value_loss(returns, returns, torch.ones(1, 3), mask, 0.2)
    assert flat_returns.explained_variance.isnan()


def test_value_loss_matches_reference(gen):
    mask = prefix_mask(LENGTHS)
    old = nan_outside(randn(B, T, gen=gen), mask)
    values = nan_outside(old + 0.5 * randn(B, T, gen=gen), mask)
    returns = nan_outside(randn(B, T, gen=gen), mask)
    loss, stats = ppo_value_loss(values, old, returns, mask, clip_range_value=0.3)
    errors, clipped, kept_returns, residuals = [], [], [], []
    for i in range(B):
        for j in range(T):
            if not mask[i, j]:
                continue
            v, v_old, r = float(values[i, j]), float(old[i, j]), float(returns[i, j])
            v_clip = v_old + min(max(v - v_old, -0.3), 0.3)
            errors.append(max((v - r) ** 2, (v_clip - r) ** 2))
            clipped.append((v_clip - r) ** 2 > (v - r) ** 2)
            kept_returns.append(r)
            residuals.append(r - v)

    def variance(xs):
        mean = sum(xs) / len(xs)
        return sum((x - mean) ** 2 for x in xs) / len(xs)

    assert_close(loss, torch.tensor(0.5 * sum(errors) / len(errors), dtype=torch.float64))
    assert_close(stats.vf_clipfrac, torch.tensor(sum(clipped) / len(clipped)))
    expected_ev = 1 - variance(residuals) / variance(kept_returns)
    assert_close(stats.explained_variance, torch.tensor(expected_ev, dtype=torch.float64))


def test_losses_reject_mismatched_shapes():
    ok = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="mask"):
        ppo_policy_loss(ok, ok, ok, torch.ones(2, 4), 0.2)
    with pytest.raises(ValueError, match="returns"):
        ppo_value_loss(ok, ok, torch.zeros(3, 3), torch.ones(2, 3), 0.2)


# --------------------------------------------------------------------------------------------------
# Across functions: inputs untouched, padding sends no NaN gradient
# --------------------------------------------------------------------------------------------------


def tensor_calls(gen: torch.Generator) -> dict:
    """name -> (function, args) for every tensor function, with NaN in all padding."""
    mask = prefix_mask(LENGTHS)

    def values() -> torch.Tensor:
        return nan_outside(randn(B, T, gen=gen), mask)

    def logprobs() -> torch.Tensor:
        return nan_outside(-randn(B, T, gen=gen).abs(), mask)

    logits, labels = randn(B, T, V, gen=gen), torch.zeros(B, T, dtype=torch.long)
    ids, scores = torch.randint(4, (B, T), generator=gen), randn(B, gen=gen)
    return {
        "logprobs_from_logits": (logprobs_from_logits, (logits, labels, 0.7)),
        "entropy_from_logits": (entropy_from_logits, (logits.clone(), 0.7)),
        "masked_sum": (masked_sum, (values(), mask)),
        "masked_mean": (masked_mean, (values(), mask, 1)),
        "masked_var": (masked_var, (values(), mask)),
        "masked_whiten": (masked_whiten, (values(), mask)),
        "response_mask_after_eos": (response_mask_after_eos, (ids, 2, 2)),
        "last_token_index": (last_token_index, (mask,)),
        "apply_missing_eos_penalty": (apply_missing_eos_penalty, (scores, mask[:, -1], -1.0)),
        "kl_penalty": (kl_penalty, (logprobs(), logprobs(), "k3")),
        "compute_rewards": (
            compute_rewards,
            (scores.clone(), logprobs(), logprobs(), mask, 0.1, "k2"),
        ),
        "gae_advantages": (gae_advantages, (values(), values(), mask, 1.0, 0.95)),
        "ppo_policy_loss": (ppo_policy_loss, (logprobs(), logprobs(), values(), mask, 0.2)),
        "ppo_value_loss": (ppo_value_loss, (values(), values(), values(), mask, 0.2)),
    }


@pytest.mark.parametrize("name", list(tensor_calls(torch.Generator())))
def test_no_function_modifies_its_inputs(gen, name):
    function, args = tensor_calls(gen)[name]
    copies = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    function(*args)
    for original, now in zip(copies, args):
        if isinstance(now, torch.Tensor):
            assert_close(now, original, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize(
    "name, output, differentiable",
    [
        ("masked_whiten", None, [0]),
        ("compute_rewards", 0, [1, 2]),  # logprobs, ref_logprobs
        ("ppo_policy_loss", 0, [0]),  # logprobs
        ("ppo_value_loss", 0, [0]),  # values
    ],
)
def test_nan_padding_sends_no_gradient(gen, name, output, differentiable):
    # The value at a padded position is dropped, but a NaN *gradient* there (0 * NaN in a
    # backward pass) would still flow back into the model's weights.
    function, args = tensor_calls(gen)[name]
    leaves = [args[i].requires_grad_() for i in differentiable]
    result = function(*args)
    (result if output is None else result[output]).sum().backward()
    mask = prefix_mask(LENGTHS)
    for leaf in leaves:
        assert leaf.grad.isfinite().all()
        assert not leaf.grad[~mask].any()
        assert leaf.grad[mask].any()


# --------------------------------------------------------------------------------------------------
# KL controllers
# --------------------------------------------------------------------------------------------------


def test_fixed_kl_controller_never_moves():
    controller = FixedKLController(0.05)
    controller.update(current_kl=100.0, n_steps=64)
    assert controller.value == 0.05


def test_adaptive_kl_controller_direction_and_clip():
    # KL 10% above target: error 0.1 -> value * (1 + 0.1 * 100 / 1000) = 0.1 * 1.01
    controller = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=1000)
    controller.update(current_kl=6.6, n_steps=100)
    assert controller.value == pytest.approx(0.1 * 1.01)
    # KL 10% below: 0.101 * (1 - 0.01)
    controller.update(current_kl=5.4, n_steps=100)
    assert controller.value == pytest.approx(0.1 * 1.01 * 0.99)
    # Far above or far below, the error is clipped to +-0.2: factor 1 +- 0.2 * 100 / 1000
    high = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    high.update(current_kl=600.0, n_steps=100)
    assert high.value == pytest.approx(0.1 * 1.02)
    low = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    low.update(current_kl=0.0, n_steps=100)
    assert low.value == pytest.approx(0.1 * 0.98)
    # On target, nothing moves; a tensor KL (as a trainer might pass) works too.
    steady = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    steady.update(current_kl=torch.tensor(6.0), n_steps=100)
    assert steady.value == pytest.approx(0.1)


def test_kl_controller_state_dict_round_trip():
    controller = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    controller.update(current_kl=9.0, n_steps=500)
    restored = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    restored.load_state_dict(controller.state_dict())
    assert restored.value == controller.value != 0.1
    fixed = FixedKLController(0.2)
    other = FixedKLController(0.0)
    other.load_state_dict(fixed.state_dict())
    assert other.value == 0.2
    with pytest.raises(ValueError, match="adaptive"):
        restored.load_state_dict(fixed.state_dict())


def test_make_kl_controller():
    assert isinstance(make_kl_controller("fixed", kl_coef=0.05), FixedKLController)
    adaptive = make_kl_controller("adaptive", kl_coef=0.1, target=6.0, horizon=1000)
    assert isinstance(adaptive, AdaptiveKLController) and adaptive.value == 0.1
    with pytest.raises(ValueError, match="target"):
        make_kl_controller("adaptive", kl_coef=0.1)
    with pytest.raises(ValueError, match="'pid'"):
        make_kl_controller("pid", kl_coef=0.1)
    with pytest.raises(ValueError, match="kl_coef"):
        FixedKLController(-1.0)


# --------------------------------------------------------------------------------------------------
# distinct-n
# --------------------------------------------------------------------------------------------------


def test_distinct_n():
    # unigrams a b a b: 2 unique / 4; bigrams ab ba ab: 2 unique / 3
    assert distinct_n(["a b a b"], 1) == pytest.approx(0.5)
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    # counted over all texts together: ab, ab -> 1 / 2; n-grams never span two texts
    assert distinct_n(["a b", "a  b\n"], 2) == pytest.approx(0.5)
    assert distinct_n(["a", "b"], 2) == 0.0
    assert distinct_n([], 1) == 0.0
    assert distinct_n(["x y z"], 1) == 1.0
    with pytest.raises(ValueError, match="n >= 1"):
        distinct_n(["a"], 0)


# -- reward normalization ------------------------------------------------------------------------


def test_running_moments_equal_the_statistics_of_everything_seen():
    # Batches of different sizes, added one by one, give exactly the moments of their concatenation.
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, generator=generator) * 3 + 5 for n in (1, 7, 2, 16)]
    moments = RunningMoments()
    assert moments.std == 1.0  # nothing seen yet: no scaling
    for i, batch in enumerate(batches):
        moments.update(batch)
        seen = torch.cat(batches[: i + 1]).double()
        assert moments.count == seen.numel()
        assert moments.mean == pytest.approx(float(seen.mean()), abs=1e-12)
        if seen.numel() > 1:
            assert moments.std == pytest.approx(float(seen.std()), abs=1e-12)  # unbiased, as torch's
    restored = RunningMoments()
    restored.load_state_dict(moments.state_dict())
    assert restored.state_dict() == moments.state_dict()



def test_running_length_trend_is_the_least_squares_line_of_everything_seen():
    # Batches of different sizes, added one by one, give the line fitted to their concatenation: the
    # slope sum((x - mean x)(y - mean y)) / sum((x - mean x)^2), written out in plain Python.
    generator = torch.Generator().manual_seed(0)
    lengths = [torch.randint(1, 40, (n,), generator=generator) for n in (1, 7, 2, 16)]
    scores = [3.0 - 0.2 * x + torch.randn(x.shape, generator=generator) for x in lengths]
    trend = RunningLengthTrend()
    assert trend.slope == 0.0  # nothing seen yet: nothing taken out
    for i, (x, y) in enumerate(zip(lengths, scores)):
        trend.update(x, y)
        xs, ys = torch.cat(lengths[: i + 1]).tolist(), torch.cat(scores[: i + 1]).double().tolist()
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        sxx = sum((a - mx) ** 2 for a in xs)
        expected = sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sxx if sxx > 0 else 0.0
        assert trend.count == len(xs) and trend.mean_length == pytest.approx(mx, abs=1e-12)
        assert trend.slope == pytest.approx(expected, abs=1e-12)
    assert trend.slope == pytest.approx(-0.2, abs=0.05)
    restored = RunningLengthTrend()
    restored.load_state_dict(trend.state_dict())
    assert restored.state_dict() == trend.state_dict()


def test_remove_length_trend_keeps_the_mean_length_score():
    scores, lengths = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([10, 20, 30])
    # slope -0.1 around mean length 20: 1 - (-0.1)(10 - 20) = 0, 2 - 0 = 2, 4 - (-0.1)(30 - 20) = 5.
    assert_close(remove_length_trend(scores, lengths, slope=-0.1, mean_length=20.0), torch.tensor([0.0, 2.0, 5.0]))
    assert torch.equal(scores, torch.tensor([1.0, 2.0, 4.0]))  # input untouched
    with pytest.raises(ValueError, match="same shape"):
        remove_length_trend(scores, lengths[:2], 0.1, 1.0)


def test_normalize_scores_centers_scales_and_clips():
    scores = torch.tensor([1.0, 3.0, 9.0])
    # (1 - 3) / 2 = -1, (3 - 3) / 2 = 0, (9 - 3) / 2 = 3 -> clipped to 2.
    assert_close(normalize_scores(scores, mean=3.0, std=2.0), torch.tensor([-1.0, 0.0, 3.0]))
    assert_close(normalize_scores(scores, mean=3.0, std=2.0, clip=2.0), torch.tensor([-1.0, 0.0, 2.0]))
    assert torch.equal(scores, torch.tensor([1.0, 3.0, 9.0]))  # input untouched
    with pytest.raises(ValueError, match="std > 0"):
        normalize_scores(scores, 0.0, 0.0)
