"""Stage 3: PPO against the reward model, with policy, reference, reward and value on ONE base model.

    rlhf ppo --config configs/ppo.yaml [--learning_rate 5e-5 ...] [--resume]
    accelerate launch scripts/ppo.py --config configs/ppo.yaml

Roles (rlhf.adapters.AdapterRegistry):
    policy     trainable LoRA adapter, initialised from the SFT adapter
    reference  the SFT adapter again, frozen (or the base with adapters off when SFT was merged)
    reward     the reward stage's adapter + score head, frozen
    value      trainable LoRA adapter + scalar head, initialised from the reward model

Each PPO step reads as the algorithm (Ouyang et al. 2022; Huang et al. 2024 for the details):
    1. sample a batch of prompts
    2. generate replies with the policy (KV cache, left padding, fixed sampling settings)
    3. score: reward at the last real token, policy/reference logprobs, values (no grad)
    4. per-token rewards: -kl_coef * KL, plus the score at the last real token
    5. GAE advantages over response tokens, whitened over real tokens
    6. PPO epochs over minibatches with gradient accumulation (clipped ratio, clipped value loss)
    7. KL controller update, logging, guards, checkpoint
The math of steps 3-6 lives in rlhf/ppo_math.py as pure functions.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from tqdm.auto import tqdm

from rlhf import ppo_math as pm
from rlhf.adapters import HEAD_FILE, AdapterRegistry, adapter_base_model
from rlhf.allocator import keep_freed_memory
from rlhf.config import build_config, save_resolved_config
from rlhf.data import DataArguments, write_jsonl
from rlhf.errors import UserError
from rlhf.formatting import encode_prompt
from rlhf.generation import SamplingArguments, decode_responses, left_pad, sample_responses
from rlhf.models import ModelArguments, build_peft_config, disable_dropout, load_base_model, load_tokenizer
from rlhf.outputs import RunDir, plot_curves, write_json

logger = logging.getLogger(__name__)
STATE_FILE = "trainer_state.pt"
MERGE_SETTINGS = ("auto", "true", "false")
CPU_MERGE_RAM_SHARE = 0.10  # merge_for_generation auto on a CPU: the largest backup, as a share of RAM


@dataclass
class PPOArguments:
    """Settings of the PPO stage. Sizes are per process."""

    # -- inputs and outputs --
    sft_model: str = "runs/demo/sft"
    """SFT stage output: the policy starts from it and the reference is it, frozen."""
    reward_model: str = "runs/demo/reward"
    """Reward stage output: an adapter + score head on the same base model."""
    output_dir: str = "runs/demo/ppo"
    """Where the policy adapter (at the root), value adapter, metrics and curves go."""
    seed: int = 42
    """Seeds prompt order, sampling and minibatch order."""
    # -- schedule --
    max_steps: int = 20
    """PPO steps; each is one rollout batch and its update."""
    batch_size: int = 8
    """Prompts (and replies) per rollout."""
    mini_batch_size: int = 8
    """Replies per optimizer step."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per minibatch (micro size = mini_batch_size / this)."""
    ppo_epochs: int = 1
    """Passes over each rollout batch."""
    learning_rate: float = 5e-5
    """AdamW learning rate for the policy and value adapters."""
    lr_scheduler_type: str = "linear"
    """transformers scheduler name (linear, cosine, constant...)."""
    max_grad_norm: float = 1.0
    """Gradient clipping over policy + value parameters."""
    # -- PPO --
    gamma: float = 1.0
    """Discount; 1.0 as in RLHF, since the episode is one short reply."""
    lam: float = 0.95
    """GAE lambda."""
    clip_range: float = 0.2
    """Policy ratio clip epsilon."""
    clip_range_value: float = 0.2
    """Value clip around the rollout-time values."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    whiten_rewards: bool = False
    """Whiten per-token rewards (without shifting the mean) before GAE."""
    # -- KL --
    kl_controller: str = "adaptive"
    """fixed or adaptive (Ziegler et al. 2019)."""
    kl_coef: float = 0.05
    """(Initial) KL penalty coefficient beta."""
    kl_target: float = 4.0
    """Adaptive controller: the KL per reply (nats, summed over tokens) it steers towards. Not an
    early-stopping threshold (TRL's and CleanRL's target_kl)."""
    kl_horizon: int | None = None
    """Adaptive controller horizon, in replies; null = a fifth of the run's replies, so a KL that stays
    off target can move the coefficient by up to e (2.7x) either way over the run."""
    kl_estimator: str = "k1"
    """Per-token KL estimate in the reward: k1, k2 or k3."""
    missing_eos_penalty: float | None = -1.0
    """Score given to replies that end without EOS (null = no penalty)."""
    # -- bookkeeping --
    save_steps: int = 10
    """Checkpoint every N steps (and at the end)."""
    logging_steps: int = 1
    """Log statistics every N steps."""
    report_to: str = "none"
    """Tracker through accelerate: none, tensorboard, wandb (offline without WANDB_API_KEY)."""
    eval_prompts: int = 32
    """Held-out prompts scored at the end (reference vs policy)."""
    eval_batch_size: int = 16
    """Batch size of the final evaluation."""
    negative_kl_patience: int = 3
    """Warn when the KL estimate stays negative this many steps in a row."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about 30 % more compute."""
    merge_for_generation: str = "auto"
    """Fold the policy LoRA into the base weights while sampling (about 15 % faster rollouts, logits equal
    up to rounding), keeping a copy of the wrapped base weights meanwhile: true, false, or auto = merge
    when that copy fits where it costs the step nothing (host RAM when the model is on a GPU) or, on a
    CPU, when it is under 10 % of the machine's RAM; never on a quantized base or a non-LoRA policy."""

    def __post_init__(self) -> None:
        self.merge_for_generation = str(self.merge_for_generation).lower()
        if self.merge_for_generation not in MERGE_SETTINGS:
            raise UserError(f"merge_for_generation: expected one of {', '.join(MERGE_SETTINGS)}, "
                            f"found {self.merge_for_generation!r}")
        if self.mini_batch_size > self.batch_size or self.batch_size % self.mini_batch_size:
            raise UserError(f"mini_batch_size: expected a divisor of batch_size ({self.batch_size}), "
                            f"found {self.mini_batch_size}")
        if self.mini_batch_size % self.gradient_accumulation_steps:
            raise UserError(f"gradient_accumulation_steps: expected a divisor of mini_batch_size "
                            f"({self.mini_batch_size}), found {self.gradient_accumulation_steps}")
        if self.kl_controller not in pm.KL_CONTROLLER_KINDS:
            raise UserError(f"kl_controller: expected one of {pm.KL_CONTROLLER_KINDS}, found {self.kl_controller!r}")
        if self.kl_estimator not in pm.KL_KINDS:
            raise UserError(f"kl_estimator: expected one of {pm.KL_KINDS}, found {self.kl_estimator!r}")
        for name in ("max_steps", "batch_size", "ppo_epochs", "save_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise UserError(f"{name}: expected at least 1, found {getattr(self, name)}")

    @property
    def micro_batch_size(self) -> int:
        return self.mini_batch_size // self.gradient_accumulation_steps


class Rollout(NamedTuple):
    """One batch of generated replies.

    Shapes: b = replies, s = prompt width (left-padded), t = reply width.
    """

    input_ids: torch.Tensor  # (b, s + t) prompt + reply; tokens after the first EOS are pad
    attention_mask: torch.Tensor  # (b, s + t) 1 = real token
    response_mask: torch.Tensor  # (b, t) True = reply token up to and including the first EOS
    ends_with_eos: torch.Tensor  # (b,) bool
    query_width: int  # s


class Scored(NamedTuple):
    """What step 3 computes for a rollout, all without gradients, shapes (b, t) unless noted."""

    scores: torch.Tensor  # (b,) reward-model score after the missing-EOS penalty
    raw_scores: torch.Tensor  # (b,) reward-model score as given
    logprobs: torch.Tensor  # policy logprobs at rollout time (see PPOTrainer.single_pass)
    ref_logprobs: torch.Tensor  # reference logprobs
    values: torch.Tensor  # value estimates


class NonFiniteError(UserError):
    """A NaN/Inf in a loss or the logits; the run stops and keeps its last good checkpoint."""

    exit_code = 1


class PromptSampler:
    """Prompts in a seeded order, epoch after epoch; its position is part of a checkpoint."""

    def __init__(self, prompts: list, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.prompts, self.batch_size, self.seed = prompts, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position = 0, 0

    def _order(self) -> list[int]:
        order = list(range(len(self.prompts)))
        random.Random(self.seed + self.epoch).shuffle(order)
        return order

    def next_batch(self) -> list:
        """This rank's share of the next global batch (world_size * batch_size prompts)."""
        global_size = self.batch_size * self.world_size
        order, chosen = self._order(), []
        while len(chosen) < global_size:
            if self.position >= len(order):
                self.epoch, self.position = self.epoch + 1, 0
                order = self._order()
            chosen.append(order[self.position])
            self.position += 1
        mine = chosen[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return [self.prompts[i] for i in mine]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]


def build_roles(model_args: ModelArguments, args: PPOArguments, device: torch.device) -> tuple[AdapterRegistry, str | None]:
    """Load the base once and put the four roles on it; returns (registry, reference adapter name)."""
    from rlhf.runs import check_shared_base

    sft_dir, reward_dir = Path(args.sft_model), Path(args.reward_model)
    # Refuses, before loading anything, SFT/reward outputs whose roles cannot share one base.
    sft, _, base_args = check_shared_base(sft_dir, reward_dir, model_args)
    sft_is_adapter = sft.is_adapter
    base = load_base_model(base_args, "causal-lm")
    base.to(device)
    registry = AdapterRegistry(base)
    if args.gradient_checkpointing:
        registry.enable_gradient_checkpointing()
    if sft_is_adapter:
        registry.load("policy", sft_dir, trainable=True)
        registry.load("reference", sft_dir, trainable=False)
        reference = "reference"
    else:
        # A merged/full SFT model is the base itself: reference = every adapter off.
        registry.add("policy", build_peft_config(base_args, base), trainable=True)
        reference = None
    registry.load("reward", reward_dir, trainable=False)
    registry.load("value", reward_dir, trainable=True)
    if "reward" not in registry.heads:
        raise UserError(f"{reward_dir}: expected a score head in the reward adapter, found none")
    registry.heads.to(device)
    return registry, reference


def check_launch(accelerator) -> None:
    """Refuse launch settings this loop does not honour, before any work is done.

    The loop calls ``accelerator.backward`` on a model it never hands to ``accelerator.prepare``
    (it syncs gradients itself, see ``_sync_gradients``): under DeepSpeed that dereferences an
    engine that does not exist, under FSDP nothing is sharded, fp16's loss scale would never be
    unscaled before clipping, bf16 autocast would never be entered, and accelerate's gradient
    accumulation would silently divide every loss.
    """
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind not in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        raise UserError(f"accelerate launch: PPO runs on one process or plain DDP (multi-GPU or multi-CPU), found "
                        f"{kind.value}; launch it with configs/accelerate/ddp.yaml (use QLoRA or "
                        "gradient_checkpointing to fit memory instead of sharding)")
    if accelerator.mixed_precision != "no":
        raise UserError(f"accelerate launch: mixed_precision {accelerator.mixed_precision} is not applied by PPO; "
                        "launch with mixed_precision 'no' and set torch_dtype: bfloat16 (or a QLoRA "
                        "peft_method) in the PPO config instead")
    if accelerator.gradient_accumulation_steps != 1:
        raise UserError(f"accelerate launch: gradient_accumulation_steps {accelerator.gradient_accumulation_steps} is "
                        "not applied by PPO; launch with 1 and set the PPO config's gradient_accumulation_steps")


def merge_backup_device(setting: str, registry: AdapterRegistry, device: torch.device) -> torch.device | None:
    """Where the policy's merge keeps its backup of the wrapped base weights; None = do not merge.

    The backup is what makes the merge exact (see AdapterRegistry.merged) and it is as large as the
    weights the LoRA wraps: several GB at 7B. On a GPU it goes to host memory, so it costs no GPU
    memory; on a CPU it adds to the step's RAM, so ``auto`` merges only where it is small.
    """
    import psutil

    if setting == "false":
        return None
    if not registry.can_merge("policy"):
        if setting == "true":
            raise UserError("merge_for_generation: true needs a LoRA policy on an unquantized base; this base is "
                            "quantized or the policy is not LoRA (set merge_for_generation: auto or false)")
        logger.info("merge_for_generation auto: not merging (quantized base or non-LoRA policy)")
        return None
    backup = registry.merge_backup_bytes("policy")
    ram = psutil.virtual_memory()
    host = torch.device("cpu")
    if setting == "true":
        return host
    if device.type != "cpu":
        fits = backup < 0.5 * ram.available
        where = "host RAM (no GPU memory)"
    else:
        fits = backup <= CPU_MERGE_RAM_SHARE * ram.total
        where = f"RAM (at most {CPU_MERGE_RAM_SHARE:.0%} of {ram.total / 2**30:.0f} GiB)"
    logger.info("merge_for_generation auto: %s; the backup of the wrapped weights is %.0f MB in %s",
                "merging" if fits else "not merging", backup / 2**20, where)
    return host if fits else None


class PPOTrainer:
    """The PPO loop on an :class:`AdapterRegistry`; see the module docstring for the steps."""

    def __init__(self, args: PPOArguments, sampling: SamplingArguments, registry: AdapterRegistry,
                 tokenizer, prompts: list, reference: str | None, accelerator=None, run_dir: RunDir | None = None):
        from accelerate import Accelerator
        from transformers import get_scheduler

        self.args, self.sampling, self.registry, self.tokenizer = args, sampling, registry, tokenizer
        self.reference = reference
        self.accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
        self.device = self.accelerator.device
        self.run_dir = run_dir
        self.work_dir = run_dir.work if run_dir else None
        self.model = registry.peft_model
        # No dropout anywhere in PPO (ratios must be 1 before the first update), yet training mode
        # for the update's forward passes, where gradient checkpointing needs it.
        disable_dropout(self.model)
        self.model.eval()
        self.merge_backup = merge_backup_device(args.merge_for_generation, registry, self.device)
        self.sampler = PromptSampler(prompts, args.batch_size, args.seed,
                                     self.accelerator.process_index, self.accelerator.num_processes)
        self.params = registry.parameters_of("policy") + registry.parameters_of("value")
        # Adam eps 1e-5 as in the reference implementation (Huang et al. 2024, detail 10).
        self.optimizer = torch.optim.AdamW(self.params, lr=args.learning_rate, eps=1e-5, weight_decay=0.0)
        self.scheduler = get_scheduler(args.lr_scheduler_type, self.optimizer, num_warmup_steps=0,
                                       num_training_steps=args.max_steps)
        run_replies = args.max_steps * args.batch_size * self.accelerator.num_processes
        self.kl_ctl = pm.make_kl_controller(args.kl_controller, kl_coef=args.kl_coef, target=args.kl_target,
                                            horizon=args.kl_horizon or max(1, round(run_replies / 5)))
        self.step = 0
        self.history: list[dict[str, float]] = []
        self._negative_kl_run = 0
        self._warned: set[str] = set()
        self._in_step = False  # inside train_step every process runs the same guards (see _guard_finite)
        self._nonfinite: str | None = None

    @contextlib.contextmanager
    def _training_mode(self):
        """Forward passes that will be backpropagated: training mode (dropout is off, see __init__)."""
        self.model.train()
        try:
            yield
        finally:
            self.model.eval()

    # -- step 2 -------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompts: list) -> Rollout:
        """Sample one reply per prompt with the policy adapter."""
        prompt_ids = [encode_prompt(self.tokenizer, p) for p in prompts]
        with self._sampling_model("policy") as model:
            query, query_mask, response = sample_responses(model, self.tokenizer, prompt_ids, self.sampling)
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        response_mask, ends_with_eos = pm.response_mask_after_eos(response, eos, pad)
        response = torch.where(response_mask, response, torch.full_like(response, pad))
        input_ids = torch.cat([query, response], dim=1)  # (b, s + t)
        attention_mask = torch.cat([query_mask, response_mask.long()], dim=1)  # (b, s + t)
        return Rollout(input_ids, attention_mask, response_mask, ends_with_eos, query.shape[1])

    @contextlib.contextmanager
    def _sampling_model(self, adapter: str | None):
        """The model that samples as ``adapter`` (None = the base): the LoRA folded into the base
        weights where it can be (``merge_for_generation``), else the adapter switched on."""
        merge = adapter == "policy" and self.merge_backup is not None
        with self.registry.use(adapter) as model, \
                self.registry.merged(adapter, self.merge_backup) if merge else contextlib.nullcontext():
            yield model

    # -- forward passes over reply positions ---------------------------------------------------

    def _reply_hidden(self, role: str | None, rollout: Rollout, rows: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        """Hidden states that predict each reply token: ``(b, t, h)``."""
        hidden = self.registry.hidden_states(role, rollout.input_ids[rows], rollout.attention_mask[rows])
        return hidden[:, rollout.query_width - 1 : -1]

    def reply_logits(self, role: str | None, rollout: Rollout, rows=slice(None)) -> torch.Tensor:
        """Logits ``(b, t, v)`` for the reply tokens; the LM head runs on reply positions only."""
        logits = self.registry.lm_head()(self._reply_hidden(role, rollout, rows))
        self._guard_finite(logits, f"{role or 'base'} logits")
        return logits

    def reply_values(self, rollout: Rollout, rows=slice(None)) -> torch.Tensor:
        """Value estimates ``(b, t)`` of the states before each reply token."""
        hidden = self._reply_hidden("value", rollout, rows)
        head = self.registry.heads["value"]
        return head(hidden.to(head.weight.dtype)).squeeze(-1)

    def _logprobs(self, logits: torch.Tensor, rollout: Rollout, rows=slice(None)) -> torch.Tensor:
        labels = rollout.input_ids[rows][:, rollout.query_width :]
        # Logprobs of the sampling distribution: the same temperature as generation (detail 6).
        return pm.logprobs_from_logits(logits, labels, temperature=self.sampling.temperature)

    # -- step 3 -------------------------------------------------------------------------------

    @torch.no_grad()
    def score(self, rollout: Rollout, with_policy: bool = True) -> Scored:
        """Step 3. ``with_policy=False`` leaves the policy logprobs empty, for :meth:`single_pass`."""
        raw = self.registry.score("reward", rollout.input_ids, rollout.attention_mask, self.tokenizer.pad_token_id)
        # Checked before the missing-EOS penalty, which would overwrite a NaN score of a cut-off reply.
        self._guard_finite(raw, "reward-model scores")
        scores = pm.apply_missing_eos_penalty(raw, rollout.ends_with_eos, self.args.missing_eos_penalty)
        logprobs = self._logprobs(self.reply_logits("policy", rollout), rollout) if with_policy else None
        ref_logprobs = self._logprobs(self.reply_logits(self.reference, rollout), rollout)
        values = self.reply_values(rollout)
        return Scored(scores, raw, logprobs, ref_logprobs, values)

    def single_pass(self) -> bool:
        """Whether the update is one forward + backward over the whole batch (one epoch, one minibatch,
        one micro-batch). Then that forward sees exactly the rollout-time policy, so it also gives step
        3's policy logprobs: one forward pass fewer per step, the same numbers."""
        a = self.args
        return a.ppo_epochs == 1 and a.mini_batch_size == a.batch_size and a.gradient_accumulation_steps == 1

    # -- step 6 -------------------------------------------------------------------------------

    def update(self, rollout: Rollout, scored: Scored, advantages: torch.Tensor, returns: torch.Tensor,
               first_logits: list[torch.Tensor] | None = None) -> dict[str, float]:
        """PPO epochs over shuffled minibatches; returns token-weighted mean statistics.

        ``first_logits``: a list holding one tensor, the policy's reply logits ``(b, t, v)`` with
        their graph, from the forward that gave step 3's logprobs; used as the forward of a
        :meth:`single_pass` update. The update takes the tensor out of the list, so that nothing else
        keeps it (and the graph's saved tensors) alive while the value forward runs.
        """
        args, mask = self.args, rollout.response_mask
        if first_logits is not None and not self.single_pass():
            raise ValueError("first_logits: only for a single-pass update (one epoch, minibatch and micro-batch)")
        sums: dict[str, float] = {}
        weight_total = 0.0
        generator = torch.Generator().manual_seed(args.seed * 100003 + self.step)
        with self._training_mode():
            for _ in range(args.ppo_epochs):
                order = torch.randperm(mask.shape[0], generator=generator)
                for start in range(0, len(order), args.mini_batch_size):
                    minibatch = order[start : start + args.mini_batch_size]
                    # Loss = sum over every process's real tokens / their total, so N processes with
                    # b/N replies each take the same step as one process with b replies.
                    mb_tokens = max(self._sum(mask[minibatch].sum().float()), 1.0)
                    self.optimizer.zero_grad(set_to_none=True)
                    for micro_start in range(0, len(minibatch), args.micro_batch_size):
                        rows = minibatch[micro_start : micro_start + args.micro_batch_size]
                        weight_total += self._micro_step(rollout, scored, advantages, returns, rows, mb_tokens,
                                                         sums, first_logits)
                    self._sync_gradients()
                    self._agree_finite()
                    grad_norm = torch.nn.utils.clip_grad_norm_(self.params, args.max_grad_norm)
                    self._guard_finite(grad_norm, "gradient norm")
                    self.optimizer.step()
        self.scheduler.step()
        total = max(self._sum(torch.tensor(weight_total)), 1.0)
        return {k: self._sum(torch.tensor(v)) / total for k, v in sums.items()}

    def _micro_step(self, rollout: Rollout, scored: Scored, advantages: torch.Tensor, returns: torch.Tensor,
                    rows: torch.Tensor, mb_tokens: float, sums: dict[str, float],
                    first_logits: list[torch.Tensor] | None = None) -> float:
        """Policy and value losses of one micro-batch, backpropagated with weight (its real tokens /
        the minibatch's), their statistics added to ``sums``; returns its real-token count.
        ``first_logits``: see :meth:`update`; when it holds the single-pass forward's logits over every
        row, they are taken out of it and ``rows`` is ignored."""
        args = self.args
        logits = first_logits.pop() if first_logits else None
        if logits is not None:
            # One minibatch of every row: their order only changes summation order.
            rows = slice(None)
        m = rollout.response_mask[rows]
        # Token-weighted accumulation: equal to one pass over the whole minibatch.
        share = m.sum().item() / mb_tokens
        if logits is None:
            logits = self.reply_logits("policy", rollout, rows)  # (micro, t, v)
        logprobs = self._logprobs(logits, rollout, rows)
        pg_loss, pg_stats = pm.ppo_policy_loss(logprobs, scored.logprobs[rows], advantages[rows], m, args.clip_range)
        self._guard_finite(pg_loss, "policy loss")
        with torch.no_grad():
            entropy = pm.masked_mean(pm.entropy_from_logits(logits, self.sampling.temperature), m)
        # The two roles share no trainable parameter, so backpropagating each loss as soon as it
        # exists gives the same gradients as one backward of their sum, while only one role's
        # activations are alive at a time (half the peak memory).
        self.accelerator.backward(pg_loss * share)
        del logits, logprobs
        values = self.reply_values(rollout, rows)
        vf_loss, vf_stats = pm.ppo_value_loss(values, scored.values[rows], returns[rows], m, args.clip_range_value)
        self._guard_finite(vf_loss, "value loss")
        self.accelerator.backward(args.vf_coef * vf_loss * share)
        w = float(m.sum())
        for name, value in (("policy_loss", pg_loss), ("value_loss", vf_loss), ("entropy", entropy),
                            ("clipfrac", pg_stats.clipfrac), ("approx_kl", pg_stats.approx_kl),
                            ("ratio", pg_stats.ratio_mean), ("value_clipfrac", vf_stats.vf_clipfrac)):
            sums[name] = sums.get(name, 0.0) + float(value.detach()) * w
        return w

    # -- one whole step -----------------------------------------------------------------------

    def train_step(self) -> dict[str, float]:
        self._in_step = True
        try:
            return self._train_step()
        finally:
            self._in_step = False

    def _train_step(self) -> dict[str, float]:
        args = self.args
        t0 = time.time()
        prompts = self.sampler.next_batch()  # 1. prompts
        rollout = self.generate(prompts)  # 2. replies
        t_generate = time.time() - t0
        scored = self.score(rollout, with_policy=not self.single_pass())  # 3. scores, logprobs, values
        first_logits: list[torch.Tensor] = []  # handed to the update, which empties it
        if self.single_pass():
            with self._training_mode():
                logits = self.reply_logits("policy", rollout)  # with its graph: the update's forward
            with torch.no_grad():
                scored = scored._replace(logprobs=self._logprobs(logits, rollout))
            first_logits.append(logits)
            del logits
        self._agree_finite()
        mask = rollout.response_mask
        rewards, kl = pm.compute_rewards(scored.scores, scored.logprobs, scored.ref_logprobs, mask,
                                         self.kl_ctl.value, args.kl_estimator)  # 4. per-token rewards
        if args.whiten_rewards:
            rewards = self._whiten(rewards, mask, shift_mean=False)
        advantages, returns = pm.gae_advantages(rewards, scored.values, mask, args.gamma, args.lam)  # 5.
        advantages = self._whiten(advantages, mask, shift_mean=True)
        stats = self.update(rollout, scored, advantages, returns, first_logits or None)  # 6. PPO epochs
        kl_per_reply = self._mean(pm.masked_sum(kl, mask, dim=1))
        # 1 - Var[returns - values] / Var[returns], over every process's real tokens.
        explained = 1.0 - self._var(returns - scored.values, mask) / max(self._var(returns, mask), 1e-12)
        stats.update(
            score=self._mean(scored.raw_scores),
            score_after_eos_penalty=self._mean(scored.scores),
            non_score_reward=-self.kl_ctl.value * kl_per_reply,
            kl=kl_per_reply,
            kl_coef=self.kl_ctl.value,
            response_length=self._mean(mask.sum(1).float()),
            eos_fraction=self._mean(rollout.ends_with_eos.float()),
            explained_variance=float(explained),
            learning_rate=self.scheduler.get_last_lr()[0],
            rollout_tokens_per_second=float(mask.sum()) * self.accelerator.num_processes / max(t_generate, 1e-9),
            step_seconds=time.time() - t0,
        )
        self.kl_ctl.update(kl_per_reply, args.batch_size * self.accelerator.num_processes)  # 7.
        self.step += 1
        stats["step"] = self.step
        self._watch(stats)
        return stats

    def _whiten(self, values: torch.Tensor, mask: torch.Tensor, shift_mean: bool) -> torch.Tensor:
        """Masked whitening with mean/variance over every process's real tokens."""
        if self.accelerator.num_processes == 1:
            return pm.masked_whiten(values, mask, shift_mean=shift_mean)
        m = mask.to(values.dtype)
        totals = torch.stack([(values * m).sum(), (values * values * m).sum(), m.sum()])
        totals = self.accelerator.reduce(totals.to(self.device), reduction="sum").to(values.device)
        mean = totals[0] / totals[2]
        var = (totals[1] / totals[2] - mean**2) * totals[2] / (totals[2] - 1).clamp(min=1)
        whitened = (values - mean) * torch.rsqrt(var + 1e-8)
        if not shift_mean:
            whitened = whitened + mean
        return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))

    def _var(self, values: torch.Tensor, mask: torch.Tensor) -> float:
        """Variance of the masked-in entries over every process."""
        m = mask.to(values.dtype)
        n = self._sum(m.sum())
        mean = self._sum((values * m).sum()) / max(n, 1.0)
        return self._sum((((values - mean) * m) ** 2).sum()) / max(n - 1, 1.0)

    def _sum(self, value: torch.Tensor) -> float:
        """Sum of a scalar over every process."""
        if self.accelerator.num_processes == 1:
            return float(value)
        return float(self.accelerator.reduce(value.reshape(1).to(self.device), reduction="sum"))

    def _sync_gradients(self) -> None:
        """Sum gradients over processes in one flat all-reduce.

        We do this by hand rather than wrapping the model in DDP: each micro-batch runs two forward
        passes (policy and value adapters) before one backward, and the frozen roles' adapters get
        no gradient at all, both of which DDP's bucketed hooks reject. Missing gradients count as
        zeros, so every process reduces the same flat buffer.
        """
        if self.accelerator.num_processes == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1) for g in grads]).to(self.device)
        flat = self.accelerator.reduce(flat, reduction="sum")
        offset = 0
        for p, g in zip(self.params, grads):
            n = g.numel()
            p.grad = flat[offset : offset + n].view_as(p).to(p.device)
            offset += n

    def _mean(self, values: torch.Tensor) -> float:
        """Mean over every process's rows."""
        if self.accelerator.num_processes == 1:
            return float(values.float().mean())
        gathered = self.accelerator.gather(values.float().to(self.device))
        return float(gathered.mean())

    # -- guards -------------------------------------------------------------------------------

    def _guard_finite(self, tensor: torch.Tensor, what: str) -> None:
        """Stop on a NaN/Inf. Inside a training step of several processes the finding is only noted
        here and acted on at the next :meth:`_agree_finite`, which every process reaches: one process
        raising alone would leave the others waiting in the next all-reduce until the timeout."""
        if torch.isfinite(tensor).all():
            return
        if self.accelerator.num_processes > 1 and self._in_step:
            self._nonfinite = self._nonfinite or what
            return
        self._raise_nonfinite(what)

    def _agree_finite(self) -> None:
        """Every process learns whether any found a NaN/Inf since the last agreement; all stop together."""
        if self.accelerator.num_processes == 1:
            return
        found = torch.zeros(self.accelerator.num_processes, device=self.device)
        found[self.accelerator.process_index] = float(self._nonfinite is not None)
        found = self.accelerator.reduce(found, reduction="sum")
        if found.any():
            ranks = ", ".join(str(i) for i in found.nonzero().flatten().tolist())
            self._raise_nonfinite(f"{self._nonfinite or 'values'} (found by process {ranks})")

    def _raise_nonfinite(self, what: str) -> None:
        last = self._last_checkpoint()
        where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        raise NonFiniteError(
            f"step {self.step + 1}: non-finite values (NaN/Inf) in the {what}; stopped before writing anything "
            f"from this step; {where}. Lower learning_rate (or check the reward model) and rerun with --resume"
        )

    def _watch(self, stats: dict[str, float]) -> None:
        """Warn about a persistently negative KL estimate and a collapsing reward."""
        self._negative_kl_run = self._negative_kl_run + 1 if stats["kl"] < 0 else 0
        if self._negative_kl_run >= self.args.negative_kl_patience and "kl" not in self._warned:
            self._warned.add("kl")
            logger.warning("the KL estimate has been negative for %d steps (%.3f): the policy samples tokens the "
                           "reference finds likelier, which usually means sampling settings differ between "
                           "generation and scoring", self._negative_kl_run, stats["kl"])
        scores = [h["score"] for h in self.history] + [stats["score"]]
        if len(scores) >= 6 and "collapse" not in self._warned:
            first, last = scores[:3], scores[-3:]
            spread = max(first) - min(first) + 1e-6
            if sum(last) / 3 < sum(first) / 3 - 3 * spread:
                self._warned.add("collapse")
                short = " with very short replies" if stats["response_length"] < 2 else ""
                logger.warning("the reward is collapsing (%.3f -> %.3f)%s: lower learning_rate or raise kl_coef",
                               sum(first) / 3, sum(last) / 3, short)

    # -- checkpoints --------------------------------------------------------------------------

    def _last_checkpoint(self) -> Path | None:
        return self.run_dir.last_checkpoint() if self.run_dir else None

    def save_checkpoint(self, directory: Path) -> None:
        """Adapters, heads, optimizer, scheduler, KL controller, RNG states and data position; atomic."""
        part = directory.with_name(directory.name + ".part")
        if self.accelerator.is_main_process:
            shutil.rmtree(part, ignore_errors=True)
            part.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        # Every process keeps its own sampling RNG; only the main process writes the rest.
        torch.save(self._rng_state(), part / f"rng_{self.accelerator.process_index}.pt")
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            self.accelerator.wait_for_everyone()
            return
        self.registry.save("policy", part / "policy")
        self.registry.save("value", part / "value")
        torch.save({
            "step": self.step,
            "num_processes": self.accelerator.num_processes,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "kl_controller": self.kl_ctl.state_dict(),
            "sampler": self.sampler.state_dict(),
            "history": self.history,
            "warned": sorted(self._warned),
            "negative_kl_run": self._negative_kl_run,
        }, part / STATE_FILE)
        os.replace(part, directory)
        self.accelerator.wait_for_everyone()

    @staticmethod
    def _rng_state() -> dict:
        return {"torch": torch.get_rng_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}

    def load_checkpoint(self, directory: Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        for role in ("policy", "value"):
            weights = load_file(str(directory / role / "adapter_model.safetensors"))
            set_peft_model_state_dict(self.model, weights, adapter_name=role)
        self.registry.heads["value"].weight.data.copy_(load_file(str(directory / "value" / HEAD_FILE))["weight"])
        state = torch.load(directory / STATE_FILE, weights_only=False)
        if state.get("num_processes", 1) != self.accelerator.num_processes:
            raise UserError(f"{directory}: written by {state.get('num_processes', 1)} process(es); resume with the "
                            f"same number, found {self.accelerator.num_processes}")
        self.step = state["step"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.sampler.load_state_dict(state["sampler"])
        self.history = state["history"]
        rng_file = directory / f"rng_{self.accelerator.process_index}.pt"
        if not rng_file.exists():
            raise UserError(f"{directory}: expected {rng_file.name}; resume with the same number of processes "
                            "that wrote the checkpoint")
        rng = torch.load(rng_file, weights_only=False)
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self._warned = set(state["warned"])
        self._negative_kl_run = state["negative_kl_run"]

    # -- the loop -----------------------------------------------------------------------------

    def train(self, checkpoint_every: int | None = None, on_checkpoint=None) -> list[dict[str, float]]:
        args = self.args
        bar = tqdm(total=args.max_steps, initial=self.step, desc="PPO", disable=not self.accelerator.is_main_process)
        while self.step < args.max_steps:
            stats = self.train_step()
            self.history.append(stats)
            bar.update(1)
            bar.set_postfix(score=f"{stats['score']:.3f}", kl=f"{stats['kl']:.2f}", len=f"{stats['response_length']:.0f}")
            if self.step % args.logging_steps == 0:
                self.accelerator.log({f"ppo/{k}": v for k, v in stats.items() if k != "step"}, step=self.step)
            if self.work_dir is not None and (self.step % args.save_steps == 0 or self.step == args.max_steps):
                self.save_checkpoint(self.work_dir / f"checkpoint-{self.step}")
                if on_checkpoint:
                    on_checkpoint(self.step)
        bar.close()
        return self.history

    # -- evaluation ---------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, prompts: list, seed: int = 1234) -> tuple[dict[str, float], list[dict]]:
        """Reference vs policy on held-out prompts: reward-model score, KL to the reference, distinct-2."""
        results: dict[str, dict[str, list]] = {}
        for role in ("reference", "policy"):
            adapter = self.reference if role == "reference" else "policy"
            texts, scores, kls, lengths = [], [], [], []
            torch.manual_seed(seed)
            for start in range(0, len(prompts), self.args.eval_batch_size):
                batch = prompts[start : start + self.args.eval_batch_size]
                prompt_ids = [encode_prompt(self.tokenizer, p) for p in batch]
                with self._sampling_model(adapter) as model:
                    query, query_mask, response = sample_responses(model, self.tokenizer, prompt_ids, self.sampling)
                pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
                mask, ends = pm.response_mask_after_eos(response, eos, pad)
                response = torch.where(mask, response, torch.full_like(response, pad))
                rollout = Rollout(torch.cat([query, response], 1), torch.cat([query_mask, mask.long()], 1), mask,
                                  ends, query.shape[1])
                scores += self.registry.score("reward", rollout.input_ids, rollout.attention_mask, pad).tolist()
                policy_lp = self._logprobs(self.reply_logits(adapter, rollout), rollout)
                ref_lp = self._logprobs(self.reply_logits(self.reference, rollout), rollout)
                kls += pm.masked_sum(policy_lp - ref_lp, mask, dim=1).tolist()
                lengths += mask.sum(1).tolist()
                texts += decode_responses(self.tokenizer, response)
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


def parse_ppo(argv: list[str] | None = None, values: dict[str, Any] | None = None):
    (model_args, data_args, args, sampling), given = build_config(
        [ModelArguments, DataArguments, PPOArguments, SamplingArguments], argv, values=values,
        extra_keys=("resume", "overwrite_output_dir"),
        defaults={"train_file": "data/demo/prompts_train.jsonl", "test_file": "data/demo/prompts_test.jsonl",
                  "validation_size": 0, "test_size": 0},
    )
    return model_args, data_args, args, sampling, given


def run(argv: list[str] | None = None, values: dict[str, Any] | None = None, on_checkpoint=None) -> dict:
    """Run the PPO stage; returns its metrics. ``on_checkpoint(step)`` is called after each checkpoint."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    model_args, data_args, args, sampling, given = parse_ppo(argv, values)
    keep_freed_memory()
    splits = data_args.load("prompt")
    prompts = [r["prompt"] for r in splits["train"]]
    eval_prompts = [r["prompt"] for r in (splits["test"] or splits["validation"])][: args.eval_prompts]
    run_dir = RunDir(args.output_dir)
    started = time.time()
    log_with = None if args.report_to in ("none", "", None) else args.report_to
    if log_with == "wandb" and not os.environ.get("WANDB_API_KEY"):
        os.environ.setdefault("WANDB_MODE", "offline")
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), log_with=log_with,
                              project_dir=str(run_dir.work))
    check_launch(accelerator)
    checkpoint = run_dir.prepare(bool(given.get("resume")), bool(given.get("overwrite_output_dir"))) \
        if accelerator.is_main_process else None
    accelerator.wait_for_everyone()
    if checkpoint is None and given.get("resume"):
        checkpoint = run_dir.last_checkpoint()
    set_seed(args.seed + accelerator.process_index)
    tokenizer = load_tokenizer(args.sft_model if (Path(args.sft_model) / "tokenizer_config.json").exists()
                               else model_args.model_name_or_path)
    registry, reference = build_roles(model_args, args, accelerator.device)
    trainer = PPOTrainer(args, sampling, registry, tokenizer, prompts, reference, accelerator, run_dir)
    if checkpoint is not None:
        logger.info("resuming from %s", checkpoint)
        trainer.load_checkpoint(Path(checkpoint))
    if log_with:
        accelerator.init_trackers("rlhf-ppo", config={k: v for k, v in {**asdict(args), **asdict(sampling)}.items()
                                                      if isinstance(v, (int, float, str, bool))})
    history = trainer.train(on_checkpoint=on_checkpoint)
    metrics: dict[str, Any] = {}
    samples: list[dict] = []
    if eval_prompts and accelerator.is_main_process:
        metrics, samples = trainer.evaluate(eval_prompts)
    accelerator.end_training()
    if not accelerator.is_main_process:
        return metrics
    final = {k: v for k, v in history[-1].items() if k not in ("step_seconds", "rollout_tokens_per_second")}
    metrics.update({f"final_{k}": v for k, v in final.items() if k != "step"})
    metrics.update(steps=trainer.step, replies_seen=trainer.step * args.batch_size * accelerator.num_processes)
    work = run_dir.work
    registry.save("policy", work)
    registry.save("value", work / "value")
    tokenizer.save_pretrained(str(work))
    save_resolved_config(work / "config.yaml", [model_args, data_args, args, sampling], given)
    write_jsonl(work / "eval_samples.jsonl", samples)
    write_json(work / "log_history.json", history)
    series = {k: [(h["step"], h[k]) for h in history] for k in ("score", "kl", "response_length", "entropy")}
    plot_curves(work / "curves.png", series, "PPO", panels=[["score"], ["kl"], ["response_length"], ["entropy"]])
    metrics["wall_seconds"] = round(time.time() - started, 1)
    write_json(work / "metrics.json", metrics)
    run_dir.finalize()
    return metrics
