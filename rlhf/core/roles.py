"""Roles on one shared base as forward passes: sample as an adapter, read reply logits and
log-probabilities under any role, score with the reward adapter. The stages (PPO, the policy methods'
held-out evaluation) build on it; the value model is PPO's own (rlhf/ppo/rollout.py).

Shapes: b = replies, s = prompt width (left-padded), t = reply width, h = hidden size, v = vocabulary.
A reply token at position ``s + j`` is predicted by the hidden state at ``s + j - 1``, so every
per-token quantity of a reply is read from positions ``s - 1 .. s + t - 2``.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, NamedTuple

import torch

from rlhf.core import tensors
from rlhf.core.adapters import AdapterRegistry
from rlhf.core.formatting import encode_prompt
from rlhf.core.generation import SamplingArguments, decode_responses, sample_responses


class Rollout(NamedTuple):
    """One batch of generated replies."""

    input_ids: torch.Tensor  # (b, s + t) prompt + reply; tokens after the first EOS are pad
    attention_mask: torch.Tensor  # (b, s + t) 1 = real token
    response_mask: torch.Tensor  # (b, t) True = reply token up to and including the first EOS
    ends_with_eos: torch.Tensor  # (b,) bool
    query_width: int  # s


def rollout_from_samples(query: torch.Tensor, query_mask: torch.Tensor, response: torch.Tensor,
                         eos_token_id: int, pad_token_id: int) -> Rollout:
    """A :class:`Rollout` from ``sample_responses``' output: everything after a reply's first EOS
    becomes padding, outside the attention and response masks."""
    response_mask, ends_with_eos = tensors.response_mask_after_eos(response, eos_token_id, pad_token_id)
    response = torch.where(response_mask, response, torch.full_like(response, pad_token_id))
    input_ids = torch.cat([query, response], dim=1)  # (b, s + t)
    attention_mask = torch.cat([query_mask, response_mask.long()], dim=1)  # (b, s + t)
    return Rollout(input_ids, attention_mask, response_mask, ends_with_eos, query.shape[1])


Guard = Callable[[torch.Tensor, str], None]


class RoleForwards:
    """Roles on one :class:`AdapterRegistry`, as forward passes over a :class:`Rollout`.

    ``reference``: the reference's adapter name (None = the base with every adapter off);
    ``merge_backup``: where a merged policy keeps its backup while sampling (None = do not merge);
    ``guard(tensor, what)``: called on logits and scores, to stop on NaN/Inf.
    """

    def __init__(self, registry: AdapterRegistry, tokenizer, sampling: SamplingArguments, reference: str | None,
                 merge_backup: torch.device | None = None, guard: Guard = lambda tensor, what: None):
        self.registry, self.tokenizer, self.sampling = registry, tokenizer, sampling
        self.reference, self.merge_backup, self.guard = reference, merge_backup, guard

    @contextlib.contextmanager
    def sampling_model(self, adapter: str | None) -> Iterator[torch.nn.Module]:
        """The model that samples as ``adapter`` (None = the base): the policy LoRA folded into the
        base weights when ``merge_backup`` is set, else the adapter switched on."""
        merge = adapter == "policy" and self.merge_backup is not None
        with self.registry.use(adapter) as model, \
                self.registry.merged(adapter, self.merge_backup) if merge else contextlib.nullcontext():
            yield model

    @torch.no_grad()
    def generate(self, adapter: str | None, prompts: list) -> Rollout:
        """Sample one reply per prompt as ``adapter`` (KV cache, left padding, our sampling settings)."""
        prompt_ids = [encode_prompt(self.tokenizer, p) for p in prompts]
        with self.sampling_model(adapter) as model:
            query, query_mask, response = sample_responses(model, self.tokenizer, prompt_ids, self.sampling,
                                                           synced=self.registry.sharded)
        return rollout_from_samples(query, query_mask, response, self.tokenizer.eos_token_id,
                                    self.tokenizer.pad_token_id)

    def reply_hidden(self, role: str | None, rollout: Rollout, rows: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        """Hidden states that predict each reply token: ``(b, t, h)``."""
        hidden = self.registry.hidden_states(role, rollout.input_ids[rows], rollout.attention_mask[rows])
        return hidden[:, rollout.query_width - 1 : -1]

    def _logits(self, hidden: torch.Tensor, role: str | None) -> torch.Tensor:
        logits = self.registry.lm_head()(hidden)  # (b, t, v): the LM head on reply positions only
        self.guard(logits, f"{role or 'base'} logits")
        return logits

    def reply_logits(self, role: str | None, rollout: Rollout, rows=slice(None)) -> torch.Tensor:
        """Logits ``(b, t, v)`` for the reply tokens under ``role``."""
        return self._logits(self.reply_hidden(role, rollout, rows), role)

    def logprobs(self, logits: torch.Tensor, rollout: Rollout, rows=slice(None)) -> torch.Tensor:
        """Logprobs ``(b, t)`` of the reply tokens under ``logits``."""
        labels = rollout.input_ids[rows][:, rollout.query_width :]
        # Logprobs of the sampling distribution: the same temperature as generation (detail 6).
        return tensors.logprobs_from_logits(logits, labels, temperature=self.sampling.temperature)

    def reward_scores(self, rollout: Rollout) -> torch.Tensor:
        """Reward-model score ``(b,)`` at each sequence's last real token."""
        return self.registry.score("reward", rollout.input_ids, rollout.attention_mask, self.tokenizer.pad_token_id)

    @torch.no_grad()
    def compare_with_reference(self, prompts: list, batch_size: int, seed: int = 1234) -> tuple[dict[str, float], list[dict]]:
        """Reference vs policy on held-out prompts, one seeded sample each: reward-model score, KL to
        the reference, distinct-2 and reply length."""
        results: dict[str, dict[str, list]] = {}
        for role, adapter in (("reference", self.reference), ("policy", "policy")):
            texts, scores, kls, lengths = [], [], [], []
            torch.manual_seed(seed)
            for start in range(0, len(prompts), batch_size):
                rollout = self.generate(adapter, prompts[start : start + batch_size])
                mask = rollout.response_mask
                scores += self.reward_scores(rollout).tolist()
                logprobs = self.logprobs(self.reply_logits(adapter, rollout), rollout)
                ref_logprobs = self.logprobs(self.reply_logits(self.reference, rollout), rollout)
                kls += tensors.masked_sum(logprobs - ref_logprobs, mask, dim=1).tolist()
                lengths += mask.sum(1).tolist()
                texts += decode_responses(self.tokenizer, rollout.input_ids[:, rollout.query_width :])
            results[role] = {"texts": texts, "scores": scores, "kl": kls, "lengths": lengths}
        metrics = {}
        for role, r in results.items():
            metrics[f"eval_{role}_reward_model_score"] = sum(r["scores"]) / len(r["scores"])
            metrics[f"eval_{role}_distinct_2"] = tensors.distinct_n(r["texts"], 2)
            metrics[f"eval_{role}_response_length"] = sum(r["lengths"]) / len(r["lengths"])
        metrics["eval_policy_kl_to_reference"] = sum(results["policy"]["kl"]) / len(results["policy"]["kl"])
        samples = [
            {"prompt": p, "reference": results["reference"]["texts"][i], "policy": results["policy"]["texts"][i],
             "reference_score": results["reference"]["scores"][i], "policy_score": results["policy"]["scores"][i]}
            for i, p in enumerate(prompts)
        ]
        return metrics, samples
