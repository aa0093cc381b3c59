"""Pure tensor functions every stage shares: log-probabilities from logits, masked reductions,
reply masks after EOS, distinct-n. Imports torch only; no I/O; never modifies its inputs.

Notation: b = batch (replies), t = reply tokens, v = vocabulary. A mask is ``(b, t)`` bool or 0/1,
True/1 = a real reply token (keep); ignored positions may hold any value, NaN included, and every
per-token output is 0 there. Pinned by tests/test_ppo_math.py against plain-Python references.
"""

from __future__ import annotations

import torch

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
    "distinct_n",
    "all_finite",
]


def _check_same_shape(**tensors: torch.Tensor) -> None:
    """Raise ValueError naming each argument's shape unless all shapes are equal."""
    shapes = {name: tuple(tensor.shape) for name, tensor in tensors.items()}
    if len(set(shapes.values())) > 1:
        found = ", ".join(f"{name}{shape}" for name, shape in shapes.items())
        raise ValueError(f"expected arguments of the same shape, found {found}")


def _zero_outside(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``values`` with 0 at masked-out positions; where(), not a product, so NaN cannot leak."""
    return torch.where(keep, values, torch.zeros_like(values))


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every element of ``tensor`` (any shape) is finite (no NaN, +inf or -inf).

    A NaN or an infinity makes the sum NaN or infinite, so a finite sum proves every element finite
    with one reduction; only a non-finite sum (a NaN/Inf, or finite values whose sum overflows) takes
    the element-wise check. On a (8, 48, 49152) float32 tensor the sum is 20-50x faster than
    ``isfinite(tensor).all()``, which builds a boolean copy of the whole tensor.
    """
    tensor = tensor.detach()
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


# --------------------------------------------------------------------------------------------------
# Logits -> per-token quantities
# --------------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # bf16/fp16 log-softmax loses ~2-3 significant digits, which is the size of a PPO ratio's
    # interesting part, so the math runs in at least float32.
    return torch.promote_types(dtype, torch.float32)


def logprobs_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Log-probability of each label under ``softmax(logits / temperature)``.

    Args:
        logits: ``(b, t, v)``; ``logits[:, j]`` must be the distribution that produced
            ``labels[:, j]`` (for a causal LM: the logits one position *before* each response
            token). Not modified.
        labels: ``(b, t)`` token ids, all valid ids (padding positions still get gathered, so
            use the pad id there, not -100).
        temperature: the temperature the rollout sampled with. The implementation details
            (Huang et al. 2024) note that the training pass must divide by the same temperature,
            else the "old" and "new" logprobs describe different distributions and the KL and the
            ratio are off from the first step.

    Returns:
        ``(b, t)`` float32 (or float64 for float64 logits) log-probabilities, <= 0, differentiable.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"expected logits (b, t, v) and labels (b, t), found logits{tuple(logits.shape)}, "
            f"labels{tuple(labels.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"expected temperature > 0, found {temperature}")
    rows = []
    # One batch row at a time: the upcast/temperature copy and logsumexp's temporary are (t, v),
    # not (b, t, v), which matters with a 49k vocabulary.
    for row_logits, row_labels in zip(logits, labels):
        scaled = row_logits.to(_compute_dtype(logits.dtype)) / temperature  # (t, v), a new tensor
        label_logits = scaled.gather(-1, row_labels.unsqueeze(-1)).squeeze(-1)  # (t,)
        # log_softmax(x)[y] = x[y] - logsumexp(x), without materialising the full log_softmax.
        rows.append(label_logits - torch.logsumexp(scaled, dim=-1))
    return torch.stack(rows)  # (b, t)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy (nats) of ``softmax(logits / temperature)`` at each position.

    Args:
        logits: ``(b, t, v)``, finite (a -inf logit gives NaN). Not modified.
        temperature: as in :func:`logprobs_from_logits`, so the entropy is that of the
            distribution actually sampled from.

    Returns:
        ``(b, t)`` entropies, >= 0. Mask them with :func:`masked_mean` before logging.
    """
    if temperature <= 0:
        raise ValueError(f"expected temperature > 0, found {temperature}")
    rows = []
    for row_logits in logits:  # (t, v) temporaries only, as in logprobs_from_logits
        scaled = row_logits.to(_compute_dtype(logits.dtype)) / temperature  # (t, v)
        logp = torch.log_softmax(scaled, dim=-1)  # (t, v)
        rows.append(-(logp.exp() * logp).sum(dim=-1))  # H = -sum_v p log p
    return torch.stack(rows)  # (b, t)


# --------------------------------------------------------------------------------------------------
# Masked reductions
# --------------------------------------------------------------------------------------------------


def masked_sum(
    values: torch.Tensor, mask: torch.Tensor, dim: int | None = None
) -> torch.Tensor:
    """Sum of ``values`` where ``mask`` is True.

    Args:
        values: any shape, e.g. ``(b, t)``. Values at masked-out positions are ignored, even NaN.
        mask: same shape as ``values``; True/1 = include.
        dim: reduce over this dimension only; None reduces everything to a scalar.

    Returns:
        A scalar, or ``values`` with ``dim`` removed.
    """
    _check_same_shape(values=values, mask=mask)
    kept = _zero_outside(values, mask.bool())  # not values * mask: NaN * 0 is NaN
    return kept.sum() if dim is None else kept.sum(dim=dim)


def masked_mean(
    values: torch.Tensor, mask: torch.Tensor, dim: int | None = None
) -> torch.Tensor:
    """Mean of ``values`` over the positions where ``mask`` is True.

    Args:
        values: any shape, e.g. ``(b, t)``. Values at masked-out positions are ignored, even NaN.
        mask: same shape as ``values``; True/1 = include.
        dim: average over this dimension only (e.g. ``dim=1`` gives one mean per response, shape
            ``(b,)``); None averages over every kept entry: a token-level mean.

    Returns:
        A scalar, or ``values`` with ``dim`` removed. Where nothing is kept the mean is 0, not
        NaN, so an all-padding row cannot poison a loss.
    """
    total = masked_sum(values, mask, dim)
    count = mask.bool().sum() if dim is None else mask.bool().sum(dim=dim)
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the entries of ``values`` where ``mask`` is True (all dimensions together).

    Args:
        values: any shape, e.g. ``(b, t)``. Values at masked-out positions are ignored, even NaN.
        mask: same shape as ``values``; True/1 = include.
        unbiased: divide by ``n - 1`` (Bessel's correction) instead of ``n``.

    Returns:
        A scalar.

    Raises:
        ValueError: fewer than 2 kept entries (``unbiased``) or none (biased): the variance is
            undefined and silently returning NaN or inf would only surface steps later.
    """
    keep = mask.bool()
    values = _zero_outside(values, keep)  # NaN padding would otherwise give NaN gradients
    centered = _zero_outside(values - masked_mean(values, keep), keep)
    count = int(keep.sum())  # one host sync per call; called a few times per PPO batch
    denominator = count - 1 if unbiased else count
    if denominator <= 0:
        raise ValueError(
            f"masked_var needs at least {2 if unbiased else 1} kept entries, found {count}"
        )
    return (centered**2).sum() / denominator


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Scale ``values`` to unit variance (and zero mean) using only the kept entries' statistics.

    Advantages are whitened with ``shift_mean=True``. Per-token rewards, when whitened, use
    ``shift_mean=False`` (Huang et al. 2024): subtracting their mean would add the same bonus or
    penalty to every token, i.e. reward or punish length itself.

    Args:
        values: any shape, e.g. ``(b, t)``. Values at masked-out positions are ignored, even NaN.
        mask: same shape as ``values``; True/1 = include.
        shift_mean: True gives zero mean; False keeps the original mean and only rescales the
            deviations from it.
        eps: added to the variance before the square root.

    Returns:
        Same shape as ``values``; 0 at masked-out positions.
    """
    keep = mask.bool()
    values = _zero_outside(values, keep)  # NaN padding would otherwise give NaN gradients
    mean = masked_mean(values, keep)
    whitened = (values - mean) * torch.rsqrt(masked_var(values, keep) + eps)
    if not shift_mean:
        whitened = whitened + mean
    return _zero_outside(whitened, keep)


# --------------------------------------------------------------------------------------------------
# Response masks, scores, rewards
# --------------------------------------------------------------------------------------------------


def response_mask_after_eos(
    response_ids: torch.Tensor, eos_token_id: int, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask each response after its first EOS.

    A response ends at its first EOS, which is kept (the policy chose it, so it is an action that
    earns credit), or at its first pad token that is not an EOS, which is not kept. The rule is
    "up to and including the first EOS", not "not pad": SmolLM2 has pad == eos == 2, and the first
    of those is a real token. The resulting mask is always a prefix of True per row, which
    :func:`last_token_index` and :func:`gae_advantages` rely on.

    Args:
        response_ids: ``(b, t)`` generated token ids, prompt excluded.
        eos_token_id: the id that ends a reply.
        pad_token_id: the id that fills rows after they ended (may equal ``eos_token_id``).

    Returns:
        mask: ``(b, t)`` bool; True = a real response token (EOS included).
        ends_with_eos: ``(b,)`` bool; True where the kept part ends with EOS, False where the reply
            was cut off (ran out of tokens) — see :func:`apply_missing_eos_penalty`.
    """
    is_eos = response_ids == eos_token_id  # (b, t)
    is_pad = (response_ids == pad_token_id) & ~is_eos  # (b, t); empty when pad == eos
    eos_before = (is_eos.cumsum(dim=1) - is_eos.long()) > 0  # an EOS strictly earlier in the row
    pad_so_far = is_pad.cumsum(dim=1) > 0  # a pad here or earlier
    mask = ~eos_before & ~pad_so_far  # (b, t)
    ends_with_eos = (mask & is_eos).any(dim=1)  # (b,)
    return mask, ends_with_eos


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last True in each row, where the sequence-level score is credited.

    Args:
        mask: ``(b, t)``; True/1 = a real response token.

    Returns:
        ``(b,)`` long; -1 for a row with no True.
    """
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)  # (b, t)
    return torch.where(mask.bool(), positions, torch.full_like(positions, -1)).max(dim=1).values


def apply_missing_eos_penalty(
    scores: torch.Tensor, ends_with_eos: torch.Tensor, penalty: float | None
) -> torch.Tensor:
    """Replace the score of every reply that did not end with EOS by ``penalty``.

    Replacement, not addition: openai/lm-human-preferences sets such replies' reward to a constant
    (-1, ``penalty_reward_value``) (Huang et al. 2024), so a reply truncated at the length limit
    gets the same bad score however good its text looks, and the policy learns to finish. Note
    that TRL's ``missing_eos_penalty`` subtracts instead.

    Args:
        scores: ``(b,)`` reward-model scores.
        ends_with_eos: ``(b,)`` bool, from :func:`response_mask_after_eos`; True = keep the score.
        penalty: the replacement score; None turns the rule off.

    Returns:
        ``(b,)`` new tensor.
    """
    _check_same_shape(scores=scores, ends_with_eos=ends_with_eos)
    if penalty is None:
        return scores.clone()
    return torch.where(ends_with_eos.bool(), scores, torch.full_like(scores, penalty))


# --------------------------------------------------------------------------------------------------
# Diagnostics
# --------------------------------------------------------------------------------------------------


def distinct_n(texts: list[str], n: int) -> float:
    """Unique n-grams / total n-grams over all ``texts`` (whitespace tokens).

    Falls toward 0 when the policy collapses into repeating itself, a common reward hack.

    Returns:
        A float in [0, 1]; 0.0 when no text has ``n`` tokens.
    """
    if n < 1:
        raise ValueError(f"expected n >= 1, found {n}")
    ngrams = []
    for text in texts:
        tokens = text.split()
        ngrams.extend(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    return len(set(ngrams)) / len(ngrams) if ngrams else 0.0
