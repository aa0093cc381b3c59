"""The PPO-for-RLHF math as small pure tensor functions.

Every function here imports torch (and the shared tensor functions of rlhf/core/tensors.py) only, does no I/O, never modifies its inputs and holds no trainer
state, so each one is pinned by a test against a slow plain-Python reference
(tests/test_ppo_math.py). The trainer calls them in order: logprobs -> response mask -> scores ->
rewards -> advantages -> losses.

Notation:
    b: batch size (number of responses)
    t: response length in tokens (prompt tokens are never passed in)
    v: vocabulary size
    mask: a ``(b, t)`` bool or 0/1 tensor; True/1 = a real response token (keep), False/0 = padding
        or a token after the first EOS (ignore). Ignored positions may hold any value, NaN included:
        they never reach a result, and every per-token output is 0 there.

Sign conventions:
    - logprobs are natural-log probabilities, so <= 0.
    - kl is "policy minus reference": it grows as the policy drifts, and rewards carry
      ``-kl_coef * kl``.
    - advantages and returns follow the usual RL sign (higher = better); the losses are to be
      minimised.

References:
    - Huang, Liu, von Werra, "The N Implementation Details of RLHF with PPO" (ICLR blog track
      2024), a reproduction of openai/lm-human-preferences: per-token KL penalty with the score at
      the last token, -1 score for replies without EOS, logits divided by the sampling
      temperature, masked whitening, clipped value loss.
    - Schulman et al. 2017, "Proximal Policy Optimization Algorithms": the clipped surrogate.
    - Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences": adaptive KL.
    - Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage
      Estimation": GAE.
    - Schulman, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html: k1/k2/k3.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch

# The shared tensor functions the PPO loop calls through this module too (``pm.masked_whiten``).
from rlhf.core.tensors import (_check_same_shape, _zero_outside, apply_missing_eos_penalty, distinct_n,
                               entropy_from_logits,
                               last_token_index, logprobs_from_logits, masked_mean, masked_sum, masked_var,
                               masked_whiten, response_mask_after_eos)

__all__ = [
    "logprobs_from_logits",
    "entropy_from_logits",
    "masked_sum",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "response_mask_after_eos",
    "last_token_index",
    "apply_missing_eos_penalty",
    "RunningMoments",
    "RunningLengthTrend",
    "remove_length_trend",
    "normalize_scores",
    "kl_penalty",
    "compute_rewards",
    "gae_advantages",
    "PolicyLossStats",
    "ValueLossStats",
    "ppo_policy_loss",
    "ppo_value_loss",
    "KLController",
    "FixedKLController",
    "AdaptiveKLController",
    "make_kl_controller",
    "distinct_n",
    "KL_KINDS",
    "KL_CONTROLLER_KINDS",
]

KL_KINDS = ("k1", "k2", "k3")
KL_CONTROLLER_KINDS = ("fixed", "adaptive")

class RunningMoments:
    """Mean and standard deviation of every score seen so far, updated batch by batch.

    Chan et al.'s parallel update of (count, mean, sum of squared deviations), so adding a batch
    gives exactly the statistics of all values at once, whatever the batch sizes.
    """

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, values: torch.Tensor) -> None:
        """Add a batch of values ``(n,)`` (every process's, when several share the statistics)."""
        values = values.detach().double().flatten()
        n = values.numel()
        if n == 0:
            return
        batch_mean = float(values.mean())
        batch_m2 = float(((values - batch_mean) ** 2).sum())
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta * delta * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        """Sample standard deviation (1.0 until two values were seen)."""
        return (self.m2 / (self.count - 1)) ** 0.5 if self.count > 1 else 1.0

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])


class RunningLengthTrend:
    """Least-squares line of score on reply length over every reply seen so far, batch by batch.

    The same parallel update as :class:`RunningMoments`, for (count, mean length, mean score, sum of
    squared length deviations, sum of length x score co-deviations), so adding a batch gives exactly
    the line fitted to all replies at once.
    """

    def __init__(self) -> None:
        self.count, self.mean_length, self.mean_score, self.m2_length, self.co_m2 = 0, 0.0, 0.0, 0.0, 0.0

    def update(self, lengths: torch.Tensor, scores: torch.Tensor) -> None:
        """Add replies' lengths ``(n,)`` and scores ``(n,)`` (every process's, when several share the fit)."""
        x, y = lengths.detach().double().flatten(), scores.detach().double().flatten()
        _check_same_shape(lengths=x, scores=y)
        n = x.numel()
        if n == 0:
            return
        bx, by = float(x.mean()), float(y.mean())
        b_m2, b_co = float(((x - bx) ** 2).sum()), float(((x - bx) * (y - by)).sum())
        total = self.count + n
        dx, dy = bx - self.mean_length, by - self.mean_score
        self.m2_length += b_m2 + dx * dx * self.count * n / total
        self.co_m2 += b_co + dx * dy * self.count * n / total
        self.mean_length += dx * n / total
        self.mean_score += dy * n / total
        self.count = total

    @property
    def slope(self) -> float:
        """Score per token of length (0.0 until two different lengths were seen)."""
        return self.co_m2 / self.m2_length if self.m2_length > 0 else 0.0

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean_length": self.mean_length, "mean_score": self.mean_score,
                "m2_length": self.m2_length, "co_m2": self.co_m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count = int(state["count"])
        self.mean_length, self.mean_score = float(state["mean_length"]), float(state["mean_score"])
        self.m2_length, self.co_m2 = float(state["m2_length"]), float(state["co_m2"])


def remove_length_trend(scores: torch.Tensor, lengths: torch.Tensor, slope: float, mean_length: float) -> torch.Tensor:
    """``scores - slope * (lengths - mean_length)``: the scores with their linear trend in length taken out.

    A reward model can learn to prefer shorter (or longer) replies than its labels do; with the line
    fitted to the scores of the policy's own replies (:class:`RunningLengthTrend`) a reply of the mean
    length keeps its score and the policy gains nothing by changing length alone.

    Args:
        scores: ``(b,)`` reward-model scores.
        lengths: ``(b,)`` reply lengths in tokens.
        slope, mean_length: the fitted line's slope (score per token) and the mean length it was fitted at.

    Returns:
        ``(b,)`` new tensor.
    """
    _check_same_shape(scores=scores, lengths=lengths)
    return scores - slope * (lengths.to(scores.dtype) - mean_length)


def normalize_scores(scores: torch.Tensor, mean: float, std: float, clip: float | None = None) -> torch.Tensor:
    """``(scores - mean) / std``, clipped to ``[-clip, clip]`` when ``clip`` is given.

    Puts reward-model scores on a known scale (mean 0, std 1 over the run so far), so that the KL
    coefficient and the missing-EOS penalty weigh the same whatever scale the reward model learned.

    Args:
        scores: ``(b,)`` reward-model scores.
        mean, std: the running statistics (:class:`RunningMoments`); std > 0.
        clip: bound on the absolute normalized score, or None.

    Returns:
        ``(b,)`` new tensor.
    """
    if std <= 0:
        raise ValueError(f"expected std > 0, found {std}")
    normalized = (scores - mean) / std
    return normalized if clip is None else normalized.clamp(-clip, clip)


def kl_penalty(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1"
) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from the sampled tokens' logprobs.

    With ``log_ratio = logprobs - ref_logprobs`` (tokens sampled from the policy), following
    Schulman's "Approximating KL Divergence" (http://joschu.net/blog/kl-approx.html):

    - ``"k1"``: ``log_ratio``. Unbiased, can be negative per token; what lm-human-preferences and
      Ziegler et al. 2019 put in the reward.
    - ``"k2"``: ``0.5 * log_ratio**2``. Biased, >= 0, low variance.
    - ``"k3"``: ``exp(-log_ratio) - 1 + log_ratio``, i.e. ``(r - 1) - log r`` with
      ``r = p_ref / p``. Unbiased and >= 0. Not clamped: a huge ``-log_ratio`` gives a huge
      penalty, which is the truth.

    Args:
        logprobs: ``(b, t)`` policy logprobs of the sampled tokens.
        ref_logprobs: ``(b, t)`` reference-model logprobs of the same tokens.
        kind: one of "k1", "k2", "k3".

    Returns:
        ``(b, t)``, unmasked: :func:`compute_rewards` zeroes padding.
    """
    _check_same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs)
    log_ratio = logprobs - ref_logprobs
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio  # expm1 keeps precision when the ratio is ~1
    raise ValueError(f"unknown KL estimator kind={kind!r}; expected one of {KL_KINDS}")


def compute_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    kl_kind: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: a KL penalty on every response token plus the score on the last one.

    ``rewards[i, j] = -kl_coef * kl[i, j] + (scores[i] if j == last real token of row i else 0)``
    (Ziegler et al. 2019; Huang et al. 2024). The reward model judges the whole reply, so its score
    is the reward of the final action; the KL term keeps each token near the reference.

    Args:
        scores: ``(b,)`` sequence scores (after :func:`apply_missing_eos_penalty`).
        logprobs: ``(b, t)`` rollout-time policy logprobs of the response tokens.
        ref_logprobs: ``(b, t)`` reference logprobs of the same tokens.
        mask: ``(b, t)``; True/1 = a real response token.
        kl_coef: the KL coefficient (beta), e.g. ``controller.value``.
        kl_kind: estimator, see :func:`kl_penalty`.

    Returns:
        rewards: ``(b, t)``; 0 at masked-out positions. A row with no real token gets no score.
        kl: ``(b, t)`` the per-token KL estimate; 0 at masked-out positions (log
            ``masked_sum(kl, mask, dim=1).mean()`` as the per-reply KL).
    """
    _check_same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs, mask=mask)
    if scores.shape != (logprobs.shape[0],):
        raise ValueError(
            f"expected scores of shape (b,) = ({logprobs.shape[0]},), found {tuple(scores.shape)}"
        )
    keep = mask.bool()
    kl = kl_penalty(_zero_outside(logprobs, keep), _zero_outside(ref_logprobs, keep), kl_kind)
    kl = _zero_outside(kl, keep)  # (b, t); k2 and k3 of the zeroed padding are 0 anyway
    last = last_token_index(keep).clamp(min=0).unsqueeze(1)  # (b, 1); empty rows are masked below
    score_at_last = torch.zeros_like(kl).scatter(1, last, scores.to(kl.dtype).unsqueeze(1))
    # Plain loop (the test oracle):
    #   for i in range(b): rewards[i, last_token_index(mask)[i]] += scores[i]
    rewards = -kl_coef * kl + score_at_last
    return _zero_outside(rewards, keep), kl


# --------------------------------------------------------------------------------------------------
# Advantages
# --------------------------------------------------------------------------------------------------


def gae_advantages(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation over the response tokens (Schulman et al. 2016).

    ``delta_j = r_j + gamma * V_{j+1} - V_j`` and ``A_j = delta_j + gamma * lam * A_{j+1}``
    (eqs. 11 and 16), where "j+1" is the next *real* token of the row. After the last real token
    the episode is over, so ``V`` and ``A`` there are 0. Masked-out positions are skipped as if
    deleted, not treated as zero-reward steps. The usual mask is a prefix of True (padding after
    EOS), but holes or left padding give the same answer as deleting those positions, and their
    rewards and values (NaN included) never reach a real position.

    Args:
        rewards: ``(b, t)`` per-token rewards, from :func:`compute_rewards`.
        values: ``(b, t)`` rollout-time value estimates of each response token's state.
        mask: ``(b, t)``; True/1 = a real response token.
        gamma: discount; 1.0 is the usual choice for RLHF (episodes are short and undiscounted).
        lam: GAE lambda, trading bias (0) for variance (1); lm-human-preferences uses 0.95 with
            gamma = 1 (Huang et al. 2024).

    Returns:
        advantages: ``(b, t)``; 0 at masked-out positions. Detached: they are targets, not
            functions of the parameters. Whiten them with :func:`masked_whiten` if desired.
        returns: ``(b, t)`` ``advantages + values``, the value-function targets; 0 at masked-out
            positions. Detached.
    """
    _check_same_shape(rewards=rewards, values=values, mask=mask)
    keep = mask.bool()
    rewards, values = rewards.detach(), values.detach()
    next_value = torch.zeros_like(values[:, 0])  # (b,) V of the next real token; 0 = episode ended
    next_advantage = torch.zeros_like(values[:, 0])  # (b,) A of the next real token
    advantages_reversed = []
    for j in reversed(range(rewards.shape[1])):  # vectorised over the batch
        delta = rewards[:, j] + gamma * next_value - values[:, j]  # (b,)
        advantage = delta + gamma * lam * next_advantage  # (b,)
        # At a masked-out position carry the next real token's V and A through unchanged, so the
        # position behaves as if deleted.
        next_value = torch.where(keep[:, j], values[:, j], next_value)
        next_advantage = torch.where(keep[:, j], advantage, next_advantage)
        advantages_reversed.append(_zero_outside(advantage, keep[:, j]))
    advantages = torch.stack(advantages_reversed[::-1], dim=1)  # (b, t)
    returns = _zero_outside(advantages + values, keep)
    return advantages, returns


# --------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------


class PolicyLossStats(NamedTuple):
    """Detached scalar diagnostics of :func:`ppo_policy_loss`, each a token-level masked mean."""

    clipfrac: torch.Tensor
    """Fraction of tokens where the clipped term was the larger loss (its gradient is 0)."""
    approx_kl: torch.Tensor
    """KL(old || new) estimated with k3, ``(ratio - 1) - log(ratio)`` (>= 0, unbiased), not with
    ``0.5 * log(ratio)**2``. Grows as the minibatch updates move the policy away from the rollout
    policy: the usual early-stopping signal."""
    ratio_mean: torch.Tensor
    """Mean of ``exp(logprobs - old_logprobs)``; exactly 1 while the policy has not moved since
    the rollout (first minibatch of the first epoch, if the forward pass has no dropout)."""


class ValueLossStats(NamedTuple):
    """Detached scalar diagnostics of :func:`ppo_value_loss`."""

    vf_clipfrac: torch.Tensor
    """Fraction of tokens where the clipped squared error was the larger (its gradient is 0)."""
    explained_variance: torch.Tensor
    """``1 - Var(returns - values) / Var(returns)`` over kept tokens, with the current ``values``:
    1 = perfect, 0 = no better than a constant, < 0 worse. NaN when the returns are constant."""


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, PolicyLossStats]:
    """PPO's clipped surrogate objective, as a loss (Schulman et al. 2017).

    Per token, with ``ratio = exp(logprobs - old_logprobs)``:
    ``max(-A * ratio, -A * clip(ratio, 1 - clip_range, 1 + clip_range))``, the negation of
    PPO's ``min`` of the two surrogates. The loss is the token-level masked mean over the whole
    minibatch: every real token weighs the same, so long replies count more than short ones.
    Averaging this loss over several micro-batches weighs *micro-batches* equally instead; for
    exact token weighting, scale each micro-batch loss by its share of the tokens.

    Args:
        logprobs: ``(b, t)`` current policy logprobs (differentiable).
        old_logprobs: ``(b, t)`` the policy's logprobs at rollout time (constants).
        advantages: ``(b, t)`` from :func:`gae_advantages`, usually whitened.
        mask: ``(b, t)``; True/1 = a real response token.
        clip_range: epsilon, e.g. 0.2.

    Returns:
        loss: scalar to backpropagate.
        stats: :class:`PolicyLossStats`, detached.
    """
    _check_same_shape(
        logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask
    )
    keep = mask.bool()
    # Zero the padding first: a NaN or inf there would pass a NaN *gradient* through the max and
    # exp below even though the masked mean drops its value, and that NaN reaches the weights.
    logprobs = _zero_outside(logprobs, keep)
    old_logprobs = _zero_outside(old_logprobs.detach(), keep)
    advantages = _zero_outside(advantages.detach(), keep)
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = PolicyLossStats(
            clipfrac=masked_mean((clipped > unclipped).float(), mask),
            approx_kl=masked_mean((ratio - 1.0) - log_ratio, mask),
            ratio_mean=masked_mean(ratio, mask),
        )
    return loss, stats


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: float,
) -> tuple[torch.Tensor, ValueLossStats]:
    """Clipped value loss: ``0.5 * masked_mean(max((V - R)^2, (V_clip - R)^2))``.

    ``V_clip = old_values + clip(values - old_values, -clip_range_value, clip_range_value)``
    keeps the value head from moving far in one batch, as in lm-human-preferences (Huang et al.
    2024). Token-level masked mean over the minibatch, as :func:`ppo_policy_loss`.

    Args:
        values: ``(b, t)`` current value predictions (differentiable).
        old_values: ``(b, t)`` value predictions at rollout time (constants).
        returns: ``(b, t)`` targets from :func:`gae_advantages` (constants).
        mask: ``(b, t)``; True/1 = a real response token.
        clip_range_value: how far a value may move from ``old_values`` before its gradient stops.

    Returns:
        loss: scalar to backpropagate.
        stats: :class:`ValueLossStats`, detached.
    """
    _check_same_shape(values=values, old_values=old_values, returns=returns, mask=mask)
    keep = mask.bool()
    # As in ppo_policy_loss: zero the padding so it cannot send a NaN gradient to the weights.
    values = _zero_outside(values, keep)
    old_values = _zero_outside(old_values.detach(), keep)
    returns = _zero_outside(returns.detach(), keep)
    values_clipped = old_values + torch.clamp(
        values - old_values, -clip_range_value, clip_range_value
    )
    unclipped_error = (values - returns) ** 2
    clipped_error = (values_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    with torch.no_grad():
        returns_var = masked_var(returns, mask, unbiased=False)
        residual_var = masked_var(returns - values, mask, unbiased=False)
        stats = ValueLossStats(
            vf_clipfrac=masked_mean((clipped_error > unclipped_error).float(), mask),
            explained_variance=torch.where(
                returns_var > 0,
                1.0 - residual_var / returns_var,
                torch.full_like(returns_var, torch.nan),
            ),
        )
    return loss, stats


# --------------------------------------------------------------------------------------------------
# KL coefficient controllers
# --------------------------------------------------------------------------------------------------


class KLController(Protocol):
    """What the trainer needs from a KL coefficient controller."""

    value: float
    """The current KL coefficient (beta) for :func:`compute_rewards`."""

    def update(self, current_kl: float, n_steps: int) -> None:
        """Adapt ``value`` after a batch whose mean per-reply KL was ``current_kl``."""

    def state_dict(self) -> dict[str, float | str]:
        """What a checkpoint stores to resume with the same coefficient."""

    def load_state_dict(self, state: dict[str, float | str]) -> None:
        """Restore from :meth:`state_dict`; raises ValueError on another controller's state."""


def _load_kl_state(kind: str, state: dict[str, float | str]) -> float:
    """Check a KL controller's saved state and return its coefficient."""
    if state.get("kind") != kind or "value" not in state:
        raise ValueError(
            f"expected a {kind!r} KL controller state with keys 'kind' and 'value', "
            f"found {state!r}"
        )
    return float(state["value"])


class FixedKLController:
    """A constant KL coefficient; ``update`` does nothing."""

    def __init__(self, kl_coef: float) -> None:
        if kl_coef < 0:
            raise ValueError(f"expected kl_coef >= 0, found {kl_coef}")
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Keep the coefficient; the arguments exist only to share the interface."""

    def state_dict(self) -> dict[str, float | str]:
        return {"kind": "fixed", "value": self.value}

    def load_state_dict(self, state: dict[str, float | str]) -> None:
        self.value = _load_kl_state("fixed", state)


class AdaptiveKLController:
    """Steer the KL coefficient so the measured KL tracks ``target`` (Ziegler et al. 2019, 2.2).

    ``e = clip(current_kl / target - 1, -0.2, 0.2)`` and ``value *= 1 + e * n_steps / horizon``:
    too much KL raises the coefficient, too little lowers it. Clipping the error bounds the change
    per update, so one outlier batch cannot swing it. The paper writes ``1 + K_beta * e`` with
    ``K_beta = 0.1``; ``n_steps / horizon`` is that gain expressed per episode, so the controller
    behaves the same whatever the batch size (the paper's horizon is 10,000 episodes).

    Args:
        init_kl_coef: the starting coefficient, > 0 (a coefficient of 0 could never grow).
        target: the per-reply KL to aim for (sum over tokens, same scale as ``current_kl``), > 0.
        horizon: episodes over which the error is corrected, > 0.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        if init_kl_coef <= 0 or target <= 0 or horizon <= 0:
            raise ValueError(
                "expected init_kl_coef, target and horizon > 0, found "
                f"init_kl_coef={init_kl_coef}, target={target}, horizon={horizon}"
            )
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        """Adapt after a batch of ``n_steps`` episodes (replies) with mean KL ``current_kl``."""
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float | str]:
        # Only the coefficient changes during training; target/horizon come from the config.
        return {"kind": "adaptive", "value": self.value}

    def load_state_dict(self, state: dict[str, float | str]) -> None:
        self.value = _load_kl_state("adaptive", state)


def make_kl_controller(
    kind: str,
    *,
    kl_coef: float,
    target: float | None = None,
    horizon: int | None = None,
) -> KLController:
    """Build a KL controller by name.

    Args:
        kind: "fixed" or "adaptive".
        kl_coef: the coefficient ("fixed") or its initial value ("adaptive").
        target: required for "adaptive", see :class:`AdaptiveKLController`.
        horizon: required for "adaptive", see :class:`AdaptiveKLController`.
    """
    if kind == "fixed":
        return FixedKLController(kl_coef)
    if kind == "adaptive":
        if target is None or horizon is None:
            raise ValueError(
                f"the adaptive KL controller needs target and horizon, found target={target}, "
                f"horizon={horizon}"
            )
        return AdaptiveKLController(kl_coef, target, horizon)
    raise ValueError(f"unknown KL controller kind={kind!r}; expected one of {KL_CONTROLLER_KINDS}")
