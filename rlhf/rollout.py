"""Steps 2 and 3 of PPO: rollouts, and each role's forward pass over them.

Shapes: b = replies, s = prompt width (left-padded), t = reply width, h = hidden size, v = vocabulary.
A reply token at position ``s + j`` is predicted by the hidden state at ``s + j - 1``, so every
per-token quantity of a reply is read from positions ``s - 1 .. s + t - 2``.

The value model is a choice (``value_model``):

- ``critic``: a LoRA adapter + scalar head of its own, initialised from the reward model (TRL >= 0.12,
  OpenRLHF, DeepSpeed-Chat): its forward and backward passes are separate from the policy's.
- ``policy_head``: a scalar head on the policy's own hidden states (TRL 0.9, LLaMA-Factory): one
  forward gives logits and values, and the value loss trains the policy's LoRA too.
"""

from __future__ import annotations

import contextlib
import random
from typing import Callable, Iterator, NamedTuple

import torch

from rlhf import ppo_math as pm
from rlhf.adapters import AdapterRegistry
from rlhf.errors import UserError
from rlhf.formatting import encode_prompt
from rlhf.generation import SamplingArguments, decode_responses, sample_responses

VALUE_MODELS = ("critic", "policy_head")


class Rollout(NamedTuple):
    """One batch of generated replies."""

    input_ids: torch.Tensor  # (b, s + t) prompt + reply; tokens after the first EOS are pad
    attention_mask: torch.Tensor  # (b, s + t) 1 = real token
    response_mask: torch.Tensor  # (b, t) True = reply token up to and including the first EOS
    ends_with_eos: torch.Tensor  # (b,) bool
    query_width: int  # s


class Scored(NamedTuple):
    """What step 3 computes for a rollout, all without gradients, shapes (b, t) unless noted."""

    scores: torch.Tensor  # (b,) the score the reward uses: raw_scores shaped by the trainer (normalization,
    # clipping, missing-EOS penalty); raw_scores until then
    raw_scores: torch.Tensor  # (b,) reward-model score as given
    logprobs: torch.Tensor | None  # policy logprobs at rollout time (None: the single-pass forward gives them)
    ref_logprobs: torch.Tensor  # reference logprobs
    values: torch.Tensor | None  # value estimates (None: policy_head's single-pass forward gives them)


class PromptSampler:
    """Prompts in a seeded order, epoch after epoch; its position is part of a checkpoint."""

    def __init__(self, prompts: list, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 replies_per_prompt: int = 1):
        if batch_size % replies_per_prompt:
            raise UserError(f"batch_size: expected a multiple of replies_per_prompt ({replies_per_prompt}), "
                            f"found {batch_size}")
        self.prompts, self.batch_size, self.seed = prompts, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.replies_per_prompt = replies_per_prompt
        self.epoch, self.position = 0, 0

    def _order(self) -> list[int]:
        order = list(range(len(self.prompts)))
        random.Random(self.seed + self.epoch).shuffle(order)
        return order

    def next_batch(self) -> list:
        """This rank's share of the next global batch (world_size * batch_size replies): batch_size /
        replies_per_prompt distinct prompts, each repeated replies_per_prompt times in a row."""
        global_size = self.batch_size // self.replies_per_prompt * self.world_size
        order, chosen = self._order(), []
        while len(chosen) < global_size:
            if self.position >= len(order):
                self.epoch, self.position = self.epoch + 1, 0
                order = self._order()
            chosen.append(order[self.position])
            self.position += 1
        per_rank = self.batch_size // self.replies_per_prompt
        mine = chosen[self.rank * per_rank : (self.rank + 1) * per_rank]
        return [self.prompts[i] for i in mine for _ in range(self.replies_per_prompt)]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]


def rollout_from_samples(query: torch.Tensor, query_mask: torch.Tensor, response: torch.Tensor,
                         eos_token_id: int, pad_token_id: int) -> Rollout:
    """A :class:`Rollout` from ``sample_responses``' output: everything after a reply's first EOS
    becomes padding, outside the attention and response masks."""
    response_mask, ends_with_eos = pm.response_mask_after_eos(response, eos_token_id, pad_token_id)
    response = torch.where(response_mask, response, torch.full_like(response, pad_token_id))
    input_ids = torch.cat([query, response], dim=1)  # (b, s + t)
    attention_mask = torch.cat([query_mask, response_mask.long()], dim=1)  # (b, s + t)
    return Rollout(input_ids, attention_mask, response_mask, ends_with_eos, query.shape[1])


Guard = Callable[[torch.Tensor, str], None]


class Roles:
    """PPO's roles on one :class:`AdapterRegistry`, as forward passes over a :class:`Rollout`.

    ``reference``: the reference's adapter name (None = the base with every adapter off);
    ``merge_backup``: where a merged policy keeps its backup while sampling (None = do not merge);
    ``guard(tensor, what)``: called on logits and scores, to stop on NaN/Inf.
    """

    def __init__(self, registry: AdapterRegistry, tokenizer, sampling: SamplingArguments, reference: str | None,
                 value_model: str, merge_backup: torch.device | None, guard: Guard):
        if value_model not in VALUE_MODELS:
            raise ValueError(f"value_model: expected one of {VALUE_MODELS}, found {value_model!r}")
        self.registry, self.tokenizer, self.sampling = registry, tokenizer, sampling
        self.reference, self.value_model, self.merge_backup, self.guard = reference, value_model, merge_backup, guard

    # -- step 2 -------------------------------------------------------------------------------

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
            query, query_mask, response = sample_responses(model, self.tokenizer, prompt_ids, self.sampling)
        return rollout_from_samples(query, query_mask, response, self.tokenizer.eos_token_id,
                                    self.tokenizer.pad_token_id)

    # -- forward passes over reply positions ---------------------------------------------------

    def reply_hidden(self, role: str | None, rollout: Rollout, rows: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        """Hidden states that predict each reply token: ``(b, t, h)``."""
        hidden = self.registry.hidden_states(role, rollout.input_ids[rows], rollout.attention_mask[rows])
        return hidden[:, rollout.query_width - 1 : -1]

    def _logits(self, hidden: torch.Tensor, role: str | None) -> torch.Tensor:
        logits = self.registry.lm_head()(hidden)  # (b, t, v): the LM head on reply positions only
        self.guard(logits, f"{role or 'base'} logits")
        return logits

    def _head_values(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.registry.heads["value"]
        return head(hidden.to(head.weight.dtype)).squeeze(-1)  # (b, t)

    def reply_logits(self, role: str | None, rollout: Rollout, rows=slice(None)) -> torch.Tensor:
        """Logits ``(b, t, v)`` for the reply tokens under ``role``."""
        return self._logits(self.reply_hidden(role, rollout, rows), role)

    def policy_forward(self, rollout: Rollout, rows=slice(None)) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The policy's reply logits ``(b, t, v)`` and, with ``policy_head``, the values ``(b, t)``
        of the same forward pass (else None)."""
        hidden = self.reply_hidden("policy", rollout, rows)
        values = self._head_values(hidden) if self.value_model == "policy_head" else None
        return self._logits(hidden, "policy"), values

    def reply_values(self, rollout: Rollout, rows=slice(None)) -> torch.Tensor:
        """Value estimates ``(b, t)`` of the states before each reply token."""
        if self.value_model == "policy_head":
            return self._head_values(self.reply_hidden("policy", rollout, rows))
        return self._head_values(self.reply_hidden("value", rollout, rows))

    def logprobs(self, logits: torch.Tensor, rollout: Rollout, rows=slice(None)) -> torch.Tensor:
        """Logprobs ``(b, t)`` of the reply tokens under ``logits``."""
        labels = rollout.input_ids[rows][:, rollout.query_width :]
        # Logprobs of the sampling distribution: the same temperature as generation (detail 6).
        return pm.logprobs_from_logits(logits, labels, temperature=self.sampling.temperature)

    def reward_scores(self, rollout: Rollout) -> torch.Tensor:
        """Reward-model score ``(b,)`` at each sequence's last real token."""
        return self.registry.score("reward", rollout.input_ids, rollout.attention_mask, self.tokenizer.pad_token_id)

    # -- step 3 -------------------------------------------------------------------------------

    @torch.no_grad()
    def score(self, rollout: Rollout, with_policy: bool = True) -> Scored:
        """Step 3. ``with_policy=False`` leaves what the policy's forward gives (logprobs, and the
        values with ``policy_head``) as None, for the single-pass update's own forward to fill in."""
        raw = self.reward_scores(rollout)
        # Checked here, before the missing-EOS penalty could overwrite a NaN score of a cut-off reply.
        self.guard(raw, "reward-model scores")
        logprobs = values = None
        if with_policy:
            logits, values = self.policy_forward(rollout)
            logprobs = self.logprobs(logits, rollout)
            del logits
        ref_logprobs = self.logprobs(self.reply_logits(self.reference, rollout), rollout)
        if self.value_model == "critic":
            values = self.reply_values(rollout)
        return Scored(raw, raw, logprobs, ref_logprobs, values)

    # -- evaluation ---------------------------------------------------------------------------

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
                kls += pm.masked_sum(logprobs - ref_logprobs, mask, dim=1).tolist()
                lengths += mask.sum(1).tolist()
                texts += decode_responses(self.tokenizer, rollout.input_ids[:, rollout.query_width :])
            results[role] = {"texts": texts, "scores": scores, "kl": kls, "lengths": lengths}
        metrics = {}
        for role, r in results.items():
            metrics[f"eval_{role}_reward_model_score"] = sum(r["scores"]) / len(r["scores"])
            metrics[f"eval_{role}_distinct_2"] = pm.distinct_n(r["texts"], 2)
            metrics[f"eval_{role}_response_length"] = sum(r["lengths"]) / len(r["lengths"])
        metrics["eval_policy_kl_to_reference"] = sum(results["policy"]["kl"]) / len(results["policy"]["kl"])
        samples = [
            {"prompt": p, "reference": results["reference"]["texts"][i], "policy": results["policy"]["texts"][i],
             "reference_score": results["reference"]["scores"][i], "policy_score": results["policy"]["scores"][i]}
            for i, p in enumerate(prompts)
        ]
        return metrics, samples
