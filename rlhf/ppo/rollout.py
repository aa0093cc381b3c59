"""Steps 2 and 3 of PPO: rollouts, and each role's forward pass over them, with the value model.

Shapes: b = replies, s = prompt width (left-padded), t = reply width, h = hidden size, v = vocabulary.
The forward passes every role shares (sampling, reply logits, reference log-probabilities, reward
scores) are :class:`rlhf.core.roles.RoleForwards`; PPO adds the value model, chosen once
(``value_model``) as one of two objects:

- :class:`CriticValue` (``critic``): a LoRA adapter + scalar head of its own, initialised from the
  reward model (TRL >= 0.12, OpenRLHF, DeepSpeed-Chat): its forward and backward passes are separate
  from the policy's.
- :class:`PolicyHeadValue` (``policy_head``): a scalar head on the policy's own hidden states (TRL 0.9,
  LLaMA-Factory): one forward gives logits and values, and the value loss trains the policy's LoRA too.
"""

from __future__ import annotations

import random
from typing import Callable, NamedTuple

import torch

from rlhf.core.adapters import AdapterRegistry
from rlhf.core.errors import UserError
from rlhf.core.generation import SamplingArguments
from rlhf.core.roles import Guard, RoleForwards, Rollout, rollout_from_samples

__all__ = ["Scored", "PromptSampler", "ValueModel", "CriticValue", "PolicyHeadValue", "VALUE_MODELS",
           "make_value_model", "Roles", "Rollout", "rollout_from_samples"]


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


Backward = Callable[[torch.Tensor], None]


class ValueModel:
    """What PPO's value estimates come from; one of :data:`VALUE_MODELS`, chosen once per run."""

    name: str
    adapters: tuple[str, ...]
    """The trainable adapters a checkpoint holds (the value head is always saved beside them)."""

    def attach(self, registry: AdapterRegistry, reward_dir: str) -> None:
        """Add the value model's trainable parts to ``registry``, initialised from the reward model."""
        raise NotImplementedError

    def policy_values(self, roles: "Roles", hidden: torch.Tensor) -> torch.Tensor | None:
        """Values ``(b, t)`` read off the policy's hidden states ``(b, t, h)``, or None."""
        raise NotImplementedError

    def reply_values(self, roles: "Roles", rollout: Rollout, rows=slice(None)) -> torch.Tensor:
        """Value estimates ``(b, t)`` of the states before each reply token, a forward pass of their own."""
        raise NotImplementedError

    def scored_values(self, roles: "Roles", rollout: Rollout, policy_values: torch.Tensor | None) -> torch.Tensor | None:
        """Step 3's values, given what the policy's forward gave (None: the single-pass update fills them in)."""
        raise NotImplementedError

    def update_values(self, roles: "Roles", rollout: Rollout, rows, policy_values: torch.Tensor | None,
                      policy_loss: torch.Tensor, backward: Backward) -> torch.Tensor:
        """The values to fit in the update, after the policy loss of the same rows; may backpropagate
        ``policy_loss`` (already weighted) through ``backward`` when it shares nothing with the values."""
        raise NotImplementedError

    def final_backward(self, policy_loss: torch.Tensor, value_loss: torch.Tensor, backward: Backward) -> None:
        """Backpropagate what :meth:`update_values` left (both already weighted)."""
        raise NotImplementedError


class CriticValue(ValueModel):
    name, adapters = "critic", ("policy", "value")

    def attach(self, registry: AdapterRegistry, reward_dir: str) -> None:
        registry.load("value", reward_dir, trainable=True)

    def policy_values(self, roles: "Roles", hidden: torch.Tensor) -> None:
        return None

    def reply_values(self, roles: "Roles", rollout: Rollout, rows=slice(None)) -> torch.Tensor:
        return roles.head_values(roles.reply_hidden("value", rollout, rows))

    def scored_values(self, roles: "Roles", rollout: Rollout, policy_values: torch.Tensor | None) -> torch.Tensor:
        return roles.reply_values(rollout)

    def update_values(self, roles: "Roles", rollout: Rollout, rows, policy_values: torch.Tensor | None,
                      policy_loss: torch.Tensor, backward: Backward) -> torch.Tensor:
        # A separate critic shares no trainable parameter with the policy, so backpropagating each
        # loss as soon as it exists gives the same gradients as one backward of their sum, while
        # only one role's activations are alive at a time (half the peak memory).
        backward(policy_loss)
        return roles.reply_values(rollout, rows)

    def final_backward(self, policy_loss: torch.Tensor, value_loss: torch.Tensor, backward: Backward) -> None:
        backward(value_loss)


class PolicyHeadValue(ValueModel):
    name, adapters = "policy_head", ("policy",)

    def attach(self, registry: AdapterRegistry, reward_dir: str) -> None:
        # The reward head was trained on the reward adapter's hidden states, not the policy's: it is a
        # start of the right scale and sign, not a trained value function; the first updates fit it.
        registry.add_head("value", registry.heads["reward"].weight.detach().clone(), trainable=True)

    def policy_values(self, roles: "Roles", hidden: torch.Tensor) -> torch.Tensor:
        return roles.head_values(hidden)

    def reply_values(self, roles: "Roles", rollout: Rollout, rows=slice(None)) -> torch.Tensor:
        return roles.head_values(roles.reply_hidden("policy", rollout, rows))

    def scored_values(self, roles: "Roles", rollout: Rollout, policy_values: torch.Tensor | None) -> torch.Tensor | None:
        return policy_values

    def update_values(self, roles: "Roles", rollout: Rollout, rows, policy_values: torch.Tensor | None,
                      policy_loss: torch.Tensor, backward: Backward) -> torch.Tensor:
        return policy_values

    def final_backward(self, policy_loss: torch.Tensor, value_loss: torch.Tensor, backward: Backward) -> None:
        # One trunk: one backward of the summed loss (the value loss trains the policy's LoRA too).
        backward(policy_loss + value_loss)


_VALUE_MODELS = {cls.name: cls for cls in (CriticValue, PolicyHeadValue)}
VALUE_MODELS = tuple(_VALUE_MODELS)


def make_value_model(name: str) -> ValueModel:
    """The value model called ``name`` (one of :data:`VALUE_MODELS`)."""
    if name not in _VALUE_MODELS:
        raise ValueError(f"value_model: expected one of {VALUE_MODELS}, found {name!r}")
    return _VALUE_MODELS[name]()


class Roles(RoleForwards):
    """PPO's roles: :class:`RoleForwards` plus the value model."""

    def __init__(self, registry: AdapterRegistry, tokenizer, sampling: SamplingArguments, reference: str | None,
                 value: ValueModel, merge_backup: torch.device | None, guard: Guard):
        super().__init__(registry, tokenizer, sampling, reference, merge_backup, guard)
        self.value = value

    def head_values(self, hidden: torch.Tensor) -> torch.Tensor:
        """The value head on hidden states ``(b, t, h)``: ``(b, t)``."""
        head = self.registry.heads["value"]
        return head(hidden.to(head.weight.dtype)).squeeze(-1)  # (b, t)

    def policy_forward(self, rollout: Rollout, rows=slice(None)) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The policy's reply logits ``(b, t, v)`` and, where the value model reads the policy's
        hidden states, the values ``(b, t)`` of the same forward pass (else None)."""
        hidden = self.reply_hidden("policy", rollout, rows)
        return self._logits(hidden, "policy"), self.value.policy_values(self, hidden)

    def reply_values(self, rollout: Rollout, rows=slice(None)) -> torch.Tensor:
        """Value estimates ``(b, t)`` of the states before each reply token."""
        return self.value.reply_values(self, rollout, rows)

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
        values = self.value.scored_values(self, rollout, values)
        return Scored(raw, raw, logprobs, ref_logprobs, values)
