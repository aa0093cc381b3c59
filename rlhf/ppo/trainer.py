"""Stage 4: PPO against the reward model, with policy, reference, reward and value on ONE base model.

    rlhf ppo --config configs/ppo.yaml [--learning_rate 5e-5 ...] [--resume]
    accelerate launch scripts/ppo.py --config configs/ppo.yaml

Roles (rlhf.core.adapters.AdapterRegistry):
    policy     trainable LoRA adapter, initialised from the SFT adapter
    reference  the SFT adapter again, frozen (or the base with adapters off when SFT was merged)
    reward     the reward stage's adapter + score head, frozen
    value      value_model critic: trainable LoRA adapter + scalar head, initialised from the reward
               model; policy_head: a scalar head on the policy's own hidden states

Each PPO step reads as the algorithm (Ouyang et al. 2022; Huang et al. 2024 for the details):
    1. sample a batch of prompts
    2. generate replies with the policy (KV cache, left padding, fixed sampling settings)
    3. score: reward at the last real token, policy/reference logprobs, values (no grad)
    4. per-token rewards: -kl_coef * KL, plus the score (normalized, clipped, missing-EOS penalty)
    5. GAE advantages over response tokens, whitened over real tokens
    6. PPO epochs over minibatches with gradient accumulation (clipped ratio, clipped value loss)
    7. KL controller update, logging, guards, checkpoint
Steps 2-3 are rlhf/ppo/rollout.py (Roles); the math of steps 3-6 lives in rlhf/ppo/math.py as pure
functions; sums over processes in rlhf/ppo/processes.py.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from rlhf.ppo import math as pm
from rlhf.core.adapters import HEAD_FILE, AdapterRegistry
from rlhf.core.allocator import keep_freed_memory
from rlhf.core.config import build_config
from rlhf.core.data import DataArguments, write_jsonl
from rlhf.core.errors import UserError
from rlhf.core.generation import SamplingArguments
from rlhf.core.hooks import StageHooks, StopTraining
from rlhf.core.models import ModelArguments, build_peft_config, disable_dropout, load_base_model, load_tokenizer
from rlhf.core.outputs import RunDir, wandb_offline_without_key, write_run_outputs
from rlhf.ppo.processes import Processes
from rlhf.ppo.rollout import VALUE_MODELS, PromptSampler, Roles, Rollout, Scored, make_value_model
from rlhf.core.runs import SharedBase, check_shared_base, read_run
from rlhf.core.tensors import all_finite

logger = logging.getLogger(__name__)
DESCRIPTION = "PPO against the reward model, with policy, reference, reward and value on one base model."
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
    policy_model: str | None = None
    """Start the policy from this earlier PPO output's policy adapter instead of the SFT one (a later
    round of rlhf pipeline --rounds); the reference and the KL stay the SFT model. null = from SFT."""
    output_dir: str = "runs/demo/ppo"
    """Where the policy adapter (at the root), value adapter, metrics and curves go."""
    seed: int = 42
    """Seeds prompt order, sampling and minibatch order."""
    # -- schedule --
    max_steps: int = 20
    """PPO steps; each is one rollout batch and its update."""
    batch_size: int = 8
    """Replies per rollout."""
    replies_per_prompt: int = 1
    """Replies sampled for each prompt of a rollout (batch_size / this distinct prompts): the critic and
    the whitened advantages then compare several outcomes of the same prompt."""
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
    entropy_coef: float = 0.0
    """Weight of an entropy bonus: the policy loss minus entropy_coef x the mean entropy of the
    sampled distribution over reply tokens, which keeps replies varied. 0 = none, as in the published
    RLHF PPO implementations (the KL penalty alone holds the policy near the reference); above 0 the
    update keeps two float32 copies more of the micro-batch's reply logits for the backward pass."""
    value_model: str = "critic"
    """critic: a LoRA adapter + head of its own, initialised from the reward model (more stable);
    policy_head: a head on the policy's own LoRA trunk, also initialised from the reward head (saves
    the critic's forward and backward passes each step; the value loss trains the policy trunk too)."""
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
    """Score given to replies that end without EOS (null = no penalty), after normalization."""
    normalize_reward: bool = False
    """Scale reward-model scores by their running mean and std over the run so far, so kl_coef and
    missing_eos_penalty act on a known scale (mean 0, std 1) whatever scale the reward model learned."""
    reward_clip: float | None = None
    """Clip the (normalized, when normalize_reward) score to [-reward_clip, reward_clip]; null = no clip."""
    remove_length_trend: bool = False
    """Take the reward model's linear trend in reply length out of its scores: the least-squares line of
    score on length (tokens), fitted over every reply that ended with EOS so far, before normalization.
    For a reward model that learned to prefer shorter (or longer) replies than its labels do."""
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
    bf16_forwards: str = "auto"
    """Run the scoring and training forward passes under bf16 autocast, the LoRA adapters reading each
    layer's own bf16 input instead of saving a float32 copy of it for backward (peft keeps adapters in
    float32): less activation memory, results within bf16 rounding (docs/memory.md). The adapters'
    weights, gradients and optimizer state, the logprobs, values and losses stay float32. true, false,
    or auto = on when the weights the adapters wrap are bfloat16 (torch_dtype: bfloat16 without
    QLoRA); true on any other base is refused."""

    def __post_init__(self) -> None:
        for name in ("merge_for_generation", "bf16_forwards"):  # YAML true/false arrive as booleans
            setattr(self, name, str(getattr(self, name)).lower())
            if getattr(self, name) not in MERGE_SETTINGS:
                raise UserError(f"{name}: expected one of {', '.join(MERGE_SETTINGS)}, found {getattr(self, name)!r}")
        if self.mini_batch_size > self.batch_size or self.batch_size % self.mini_batch_size:
            raise UserError(f"mini_batch_size: expected a divisor of batch_size ({self.batch_size}), "
                            f"found {self.mini_batch_size}")
        if self.mini_batch_size % self.gradient_accumulation_steps:
            raise UserError(f"gradient_accumulation_steps: expected a divisor of mini_batch_size "
                            f"({self.mini_batch_size}), found {self.gradient_accumulation_steps}")
        if self.value_model not in VALUE_MODELS:
            raise UserError(f"value_model: expected one of {', '.join(VALUE_MODELS)}, found {self.value_model!r}")
        if self.kl_controller not in pm.KL_CONTROLLER_KINDS:
            raise UserError(f"kl_controller: expected one of {pm.KL_CONTROLLER_KINDS}, found {self.kl_controller!r}")
        if self.kl_estimator not in pm.KL_KINDS:
            raise UserError(f"kl_estimator: expected one of {pm.KL_KINDS}, found {self.kl_estimator!r}")
        if self.replies_per_prompt < 1 or self.batch_size % self.replies_per_prompt:
            raise UserError(f"replies_per_prompt: expected a divisor of batch_size ({self.batch_size}), "
                            f"found {self.replies_per_prompt}")
        if self.entropy_coef < 0:
            raise UserError(f"entropy_coef: expected at least 0 (a bonus for entropy), found {self.entropy_coef}")
        for name in ("max_steps", "batch_size", "ppo_epochs", "save_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise UserError(f"{name}: expected at least 1, found {getattr(self, name)}")

    @property
    def micro_batch_size(self) -> int:
        return self.mini_batch_size // self.gradient_accumulation_steps


class NonFiniteError(UserError):
    """A NaN/Inf in a loss or the logits; the run stops and keeps its last good checkpoint."""

    exit_code = 1


def build_roles(model_args: ModelArguments, args: PPOArguments, device: torch.device,
                shared: SharedBase | None = None, fsdp=None) -> tuple[AdapterRegistry, str | None]:
    """Load the base once and put the roles on it; returns (registry, reference adapter name).

    ``shared``: :func:`rlhf.core.runs.check_shared_base`'s verdict on the SFT and reward outputs, if the
    caller already has it (it refuses, before anything is loaded, outputs that cannot share a base).
    ``fsdp``: :func:`fsdp_request`'s plugin: the roles are built in host memory, the base is sharded
    over every process, and only then is the model moved to ``device``.
    """
    sft_dir, reward_dir = Path(args.sft_model), Path(args.reward_model)
    sft, _, base_args = shared or check_shared_base(sft_dir, reward_dir, model_args)
    base = load_base_model(base_args, "causal-lm")
    base.to(torch.device("cpu") if fsdp is not None else device)
    registry = AdapterRegistry(base)
    if args.gradient_checkpointing:
        registry.enable_gradient_checkpointing()
    if args.policy_model:  # continue an earlier PPO policy; the reference stays SFT
        registry.load("policy", args.policy_model, trainable=True)
        reference = "reference" if sft.is_adapter else None
        if sft.is_adapter:
            registry.load("reference", sft_dir, trainable=False)
    elif sft.is_adapter:
        registry.load("policy", sft_dir, trainable=True)
        registry.load("reference", sft_dir, trainable=False)
        reference = "reference"
    else:
        # A merged/full SFT model is the base itself: reference = every adapter off.
        registry.add("policy", build_peft_config(base_args, base), trainable=True)
        reference = None
    registry.load("reward", reward_dir, trainable=False)
    make_value_model(args.value_model).attach(registry, reward_dir)
    if fsdp is not None:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
        registry.shard(mesh, reshard_after_forward=fsdp.reshard_after_forward,
                       layer_classes=fsdp.transformer_cls_names_to_wrap)
        registry.peft_model.to(device)
        logger.info("FSDP: the base's decoder layers are sharded over %d processes", mesh.size())
    registry.heads.to(device)
    return registry, reference


def check_policy_model(path: str, shared: SharedBase) -> None:
    """Refuse a ``policy_model`` that is not a LoRA policy adapter on PPO's shared base."""
    from rlhf.core.runs import same_model

    if not Path(path).exists():
        raise UserError(f"policy_model: expected an earlier PPO output, found no {path}")
    info = read_run(path)
    if not info.is_adapter or info.peft_type != "LORA" or info.has_score_head:
        raise UserError(f"policy_model: expected a LoRA policy adapter (a PPO stage output), found {info.describe()} "
                        f"in {path}")
    if not same_model(info.base_model, shared.base_args.model_name_or_path):
        raise UserError(f"policy_model: the policy adapter in {path} was trained on {info.base_model}, but PPO's base "
                        f"is {shared.base_args.model_name_or_path} (from sft_model); continue from a PPO run "
                        "of the same SFT model")


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
    if kind not in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU, DistributedType.FSDP):
        raise UserError(f"accelerate launch: PPO runs on one process, plain DDP or FSDP, found {kind.value}; to "
                        f"shard the base, launch it with {PPO_FSDP_CONFIG} (FSDP2), else with "
                        "configs/accelerate/ddp.yaml")
    if accelerator.mixed_precision != "no":
        raise UserError(f"accelerate launch: mixed_precision {accelerator.mixed_precision} is not applied by PPO; "
                        "launch with mixed_precision 'no' and set torch_dtype: bfloat16 (or a QLoRA "
                        "peft_method) in the PPO config instead")
    if accelerator.gradient_accumulation_steps != 1:
        raise UserError(f"accelerate launch: gradient_accumulation_steps {accelerator.gradient_accumulation_steps} is "
                        "not applied by PPO; launch with 1 and set the PPO config's gradient_accumulation_steps")


PPO_FSDP_CONFIG = "configs/accelerate/ppo_fsdp.yaml"


def fsdp_request(accelerator, model_args: ModelArguments, args: "PPOArguments"):
    """accelerate's FSDP plugin when the run was launched with FSDP (else None), refused before any work
    where PPO would not honour one of its settings.

    PPO shards only the frozen base itself (:meth:`AdapterRegistry.shard`, FSDP2), with the plugin's
    ``reshard_after_forward`` and layer classes; the adapters stay whole, so the state-dict type and
    module-state syncing have nothing to act on. On a CPU machine accelerate runs a FSDP launch as plain
    multi-CPU data parallelism; its launcher still says FSDP in the environment, read here.
    """
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, parse_flag_from_env
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    if accelerator.distributed_type == DistributedType.FSDP:
        plugin = accelerator.state.fsdp_plugin
    elif parse_flag_from_env("ACCELERATE_USE_FSDP"):
        plugin = FullyShardedDataParallelPlugin()
    else:
        return None
    where = f"accelerate launch with FSDP (see {PPO_FSDP_CONFIG})"
    if accelerator.num_processes < 2:
        raise UserError(f"{where}: one process shards nothing; launch with --num_processes 2 or more, or without FSDP")
    if plugin.fsdp_version != 2:
        raise UserError(f"{where}: PPO shards with FSDP2, found fsdp_version {plugin.fsdp_version}; set fsdp_version: 2")
    offload = plugin.cpu_offload
    if type(offload).__name__ == "CPUOffloadPolicy" or getattr(offload, "offload_params", False):
        raise UserError(f"{where}: fsdp_offload_params is not applied by PPO; set it false (QLoRA or "
                        "gradient_checkpointing save memory instead)")
    if plugin.activation_checkpointing:
        raise UserError(f"{where}: fsdp_activation_checkpointing is not applied by PPO; set it false and "
                        "gradient_checkpointing: true in the PPO config")
    policy = plugin.auto_wrap_policy  # the plugin turns the config's name into torch's function (NO_WRAP: None)
    if policy not in (None, transformer_auto_wrap_policy):
        raise UserError(f"{where}: PPO shards each decoder layer (TRANSFORMER_BASED_WRAP), found "
                        f"fsdp_auto_wrap_policy {getattr(policy, '__name__', policy)}; set it to TRANSFORMER_BASED_WRAP")
    if plugin.ignored_modules:
        raise UserError(f"{where}: fsdp_ignored_modules is not applied by PPO (it keeps every adapter, the "
                        "embeddings and the LM head whole itself); remove it")
    if parse_flag_from_env("FSDP_CPU_RAM_EFFICIENT_LOADING"):
        raise UserError(f"{where}: fsdp_cpu_ram_efficient_loading is not applied by PPO (every process loads "
                        "the base, then shards it); set it false")
    if model_args.peft_method != "lora":
        raise UserError(f"{where}: PPO shards a LoRA policy's unquantized base, found peft_method "
                        f"{model_args.peft_method}; use LoRA, or QLoRA under configs/accelerate/ddp.yaml")
    if args.merge_for_generation == "true":
        raise UserError(f"{where}: merge_for_generation: true cannot fold the policy into sharded weights; set it "
                        "auto or false")
    return plugin


def forward_dtype(setting: str, registry: AdapterRegistry) -> torch.dtype | None:
    """What PPO's forward passes compute in (``bf16_forwards``): bfloat16, or None = each layer's own dtype."""
    wrapped = registry.wrapped_dtypes("policy")
    if setting == "false":
        return None
    if wrapped == {torch.bfloat16}:
        return torch.bfloat16
    if setting == "true":
        found = ", ".join(sorted(str(d).removeprefix("torch.") for d in wrapped)) or "no LoRA layers"
        raise UserError(f"bf16_forwards: true needs a bfloat16 base (torch_dtype: bfloat16, peft_method: lora), "
                        f"found policy LoRA layers wrapping {found} weights; set bf16_forwards: auto or false")
    return None


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
        logger.info("merge_for_generation auto: not merging (quantized or sharded base, or non-LoRA policy)")
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
        self.accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
        self.processes = Processes(self.accelerator)
        self.run_dir = run_dir
        self.model = registry.peft_model
        # No dropout anywhere in PPO (ratios must be 1 before the first update), yet training mode
        # for the update's forward passes, where gradient checkpointing needs it.
        disable_dropout(self.model)
        self.model.eval()
        merge_backup = merge_backup_device(args.merge_for_generation, registry, self.accelerator.device)
        # Every role's forward through the registry (scoring, update, evaluation); sampling is not
        # backpropagated and keeps the layers' own dtypes.
        registry.compute_dtype = forward_dtype(args.bf16_forwards, registry)
        logger.info("bf16_forwards %s: forward passes compute in %s", args.bf16_forwards,
                    "bfloat16 (autocast)" if registry.compute_dtype else "each layer's own dtype")
        self.value_model = make_value_model(args.value_model)
        self.roles = Roles(registry, tokenizer, sampling, reference, self.value_model, merge_backup, self._guard_finite)
        self.sampler = PromptSampler(prompts, args.batch_size, args.seed, self.processes.index, self.processes.count,
                                     args.replies_per_prompt)
        self.params = registry.parameters_of("policy") + registry.parameters_of("value")
        # Adam eps 1e-5 as in the reference implementation (Huang et al. 2024, detail 10).
        self.optimizer = torch.optim.AdamW(self.params, lr=args.learning_rate, eps=1e-5, weight_decay=0.0)
        self.scheduler = get_scheduler(args.lr_scheduler_type, self.optimizer, num_warmup_steps=0,
                                       num_training_steps=args.max_steps)
        run_replies = args.max_steps * args.batch_size * self.processes.count
        self.kl_ctl = pm.make_kl_controller(args.kl_controller, kl_coef=args.kl_coef, target=args.kl_target,
                                            horizon=args.kl_horizon or max(1, round(run_replies / 5)))
        self.reward_moments = pm.RunningMoments()  # of raw reward-model scores, for normalize_reward
        self.length_trend = pm.RunningLengthTrend()  # of raw scores on reply length, for remove_length_trend
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

    def single_pass(self) -> bool:
        """Whether the update is one forward + backward over the whole batch (one epoch, one minibatch,
        one micro-batch). Then that forward sees exactly the rollout-time policy, so it also gives step
        3's policy logprobs (and values, with ``policy_head``): one forward pass fewer per step."""
        a = self.args
        return a.ppo_epochs == 1 and a.mini_batch_size == a.batch_size and a.gradient_accumulation_steps == 1

    # -- one whole step -----------------------------------------------------------------------

    def train_step(self) -> dict[str, float]:
        self._in_step = True
        try:
            return self._train_step()
        finally:
            self._in_step = False

    def _train_step(self) -> dict[str, float]:
        args, roles = self.args, self.roles
        t0 = time.time()
        prompts = self.sampler.next_batch()  # 1. prompts
        rollout = roles.generate("policy", prompts)  # 2. replies
        t_generated = time.time()
        scored = roles.score(rollout, with_policy=not self.single_pass())  # 3. scores, logprobs, values
        first_forward: list = []  # the single-pass update's forward, handed over (and emptied) by update()
        if self.single_pass():
            with self._training_mode():
                logits, values = roles.policy_forward(rollout)  # with their graph
            with torch.no_grad():
                scored = scored._replace(logprobs=roles.logprobs(logits, rollout))
                if values is not None:
                    scored = scored._replace(values=values.detach())
            first_forward.append((logits, values))
            del logits, values
        self._agree_finite()
        t_scored = time.time()
        scored = scored._replace(scores=self._shape_scores(scored.raw_scores, rollout.ends_with_eos,
                                                           rollout.response_mask.sum(1)))
        mask = rollout.response_mask
        rewards, kl = pm.compute_rewards(scored.scores, scored.logprobs, scored.ref_logprobs, mask,
                                         self.kl_ctl.value, args.kl_estimator)  # 4. per-token rewards
        if args.whiten_rewards:
            rewards = self.processes.whiten(rewards, mask, shift_mean=False)
        advantages, returns = pm.gae_advantages(rewards, scored.values, mask, args.gamma, args.lam)  # 5.
        advantages = self.processes.whiten(advantages, mask, shift_mean=True)
        stats = self.update(rollout, scored, advantages, returns, first_forward or None)  # 6. PPO epochs
        kl_per_reply = self.processes.mean(pm.masked_sum(kl, mask, dim=1))
        stats.update(self._rollout_stats(rollout, scored, returns, kl_per_reply))
        now = time.time()
        stats.update(rollout_tokens_per_second=float(mask.sum()) * self.processes.count / max(t_generated - t0, 1e-9),
                     generate_seconds=t_generated - t0, score_seconds=t_scored - t_generated,
                     update_seconds=now - t_scored, step_seconds=now - t0)
        self.kl_ctl.update(kl_per_reply, args.batch_size * self.processes.count)  # 7. KL controller
        self.step += 1
        stats["step"] = self.step
        self._watch(stats)
        return stats

    def _shape_scores(self, raw: torch.Tensor, ends_with_eos: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The score each reply's reward gets: without its length trend, normalized by the running
        moments (each running statistic first takes in every process's batch), clipped, then the
        missing-EOS penalty on the same scale."""
        args = self.args
        scores = raw
        if args.remove_length_trend:
            # Fitted on finished replies only: a cut-off reply's score is replaced by the penalty anyway.
            lengths = lengths.to(raw.dtype)
            finished = self.processes.gather(ends_with_eos.float()).bool()  # gathered whole: same shape on each
            self.length_trend.update(self.processes.gather(lengths)[finished], self.processes.gather(raw)[finished])
            scores = pm.remove_length_trend(raw, lengths, self.length_trend.slope, self.length_trend.mean_length)
        if args.normalize_reward:
            self.reward_moments.update(self.processes.gather(scores))
            scores = pm.normalize_scores(scores, self.reward_moments.mean, self.reward_moments.std, args.reward_clip)
        elif args.reward_clip is not None:
            scores = scores.clamp(-args.reward_clip, args.reward_clip)
        return pm.apply_missing_eos_penalty(scores, ends_with_eos, args.missing_eos_penalty)

    def _rollout_stats(self, rollout: Rollout, scored: Scored, returns: torch.Tensor, kl_per_reply: float) -> dict:
        mask, p = rollout.response_mask, self.processes
        # 1 - Var[returns - values] / Var[returns], over every process's real tokens.
        explained = 1.0 - p.var(returns - scored.values, mask) / max(p.var(returns, mask), 1e-12)
        return dict(
            score=p.mean(scored.raw_scores),
            score_after_eos_penalty=p.mean(scored.scores),
            non_score_reward=-self.kl_ctl.value * kl_per_reply,
            kl=kl_per_reply,
            kl_coef=self.kl_ctl.value,
            response_length=p.mean(mask.sum(1).float()),
            eos_fraction=p.mean(rollout.ends_with_eos.float()),
            explained_variance=float(explained),
            learning_rate=self.scheduler.get_last_lr()[0],
            **({"length_slope": self.length_trend.slope} if self.args.remove_length_trend else {}),
        )

    # -- step 6 -------------------------------------------------------------------------------

    def update(self, rollout: Rollout, scored: Scored, advantages: torch.Tensor, returns: torch.Tensor,
               first_forward: list | None = None) -> dict[str, float]:
        """PPO epochs over shuffled minibatches; returns token-weighted mean statistics.

        ``first_forward``: a list holding one ``(logits (b, t, v), values (b, t) or None)`` pair with
        their graph, from the policy forward that gave step 3's logprobs; used as the forward of a
        :meth:`single_pass` update. The update takes the pair out of the list, so that nothing else
        keeps it (and the graph's saved tensors) alive while the critic's forward runs.
        """
        args, mask = self.args, rollout.response_mask
        if first_forward is not None and not self.single_pass():
            raise ValueError("first_forward: only for a single-pass update (one epoch, minibatch and micro-batch)")
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
                    mb_tokens = max(self.processes.sum(mask[minibatch].sum().float()), 1.0)
                    self.optimizer.zero_grad(set_to_none=True)
                    for micro_start in range(0, len(minibatch), args.micro_batch_size):
                        rows = minibatch[micro_start : micro_start + args.micro_batch_size]
                        weight_total += self._micro_step(rollout, scored, advantages, returns, rows, mb_tokens,
                                                         sums, first_forward)
                    self.processes.sync_gradients(self.params)
                    self._agree_finite()
                    grad_norm = torch.nn.utils.clip_grad_norm_(self.params, args.max_grad_norm)
                    self._guard_finite(grad_norm, "gradient norm")
                    self.optimizer.step()
        self.scheduler.step()
        total = max(self.processes.sum(torch.tensor(weight_total)), 1.0)
        return {k: self.processes.sum(torch.tensor(v)) / total for k, v in sums.items()}

    def _micro_step(self, rollout: Rollout, scored: Scored, advantages: torch.Tensor, returns: torch.Tensor,
                    rows: torch.Tensor, mb_tokens: float, sums: dict[str, float],
                    first_forward: list | None = None) -> float:
        """Policy and value losses of one micro-batch, backpropagated with weight (its real tokens /
        the minibatch's), their statistics added to ``sums``; returns its real-token count.
        ``first_forward``: see :meth:`update`; when it holds the single-pass forward over every row,
        that is taken out of it and ``rows`` is ignored."""
        args = self.args
        if first_forward:
            # One minibatch of every row: their order only changes summation order.
            rows = slice(None)
            logits, values = first_forward.pop()
        else:
            logits, values = self.roles.policy_forward(rollout, rows)  # (micro, t, v), (micro, t) or None
        m = rollout.response_mask[rows]
        # Token-weighted accumulation: equal to one pass over the whole minibatch.
        share = m.sum().item() / mb_tokens
        logprobs = self.roles.logprobs(logits, rollout, rows)
        pg_loss, pg_stats = pm.ppo_policy_loss(logprobs, scored.logprobs[rows], advantages[rows], m, args.clip_range)
        self._guard_finite(pg_loss, "policy loss")
        with torch.set_grad_enabled(args.entropy_coef > 0):
            entropy = pm.masked_mean(pm.entropy_from_logits(logits, self.sampling.temperature), m)
        policy_loss = pg_loss - args.entropy_coef * entropy if args.entropy_coef > 0 else pg_loss
        del logits, logprobs
        backward = self.accelerator.backward
        values = self.value_model.update_values(self.roles, rollout, rows, values, policy_loss * share, backward)
        vf_loss, vf_stats = pm.ppo_value_loss(values, scored.values[rows], returns[rows], m, args.clip_range_value)
        self._guard_finite(vf_loss, "value loss")
        self.value_model.final_backward(policy_loss * share, args.vf_coef * vf_loss * share, backward)
        w = float(m.sum())
        for name, value in (("policy_loss", pg_loss), ("value_loss", vf_loss), ("entropy", entropy),
                            ("clipfrac", pg_stats.clipfrac), ("approx_kl", pg_stats.approx_kl),
                            ("ratio", pg_stats.ratio_mean), ("value_clipfrac", vf_stats.vf_clipfrac)):
            sums[name] = sums.get(name, 0.0) + float(value.detach()) * w
        return w

    # -- guards -------------------------------------------------------------------------------

    def _guard_finite(self, tensor: torch.Tensor, what: str) -> None:
        """Stop on a NaN/Inf. Inside a training step of several processes the finding is only noted
        here and acted on at the next :meth:`_agree_finite`, which every process reaches: one process
        raising alone would leave the others waiting in the next all-reduce until the timeout."""
        if all_finite(tensor):
            return
        if self.processes.count > 1 and self._in_step:
            self._nonfinite = self._nonfinite or what
            return
        self._raise_nonfinite(what)

    def _agree_finite(self) -> None:
        """Every process learns whether any found a NaN/Inf since the last agreement; all stop together."""
        if self.processes.count == 1:
            return
        found = self.processes.which(self._nonfinite is not None)
        if found:
            self._raise_nonfinite(f"{self._nonfinite or 'values'} (found by process {', '.join(map(str, found))})")

    def _raise_nonfinite(self, what: str) -> None:
        last = self.run_dir.last_checkpoint() if self.run_dir else None
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

    def save_checkpoint(self, directory: Path) -> None:
        """Adapters, heads, optimizer, scheduler, KL controller, RNG states and data position; atomic."""
        part = directory.with_name(directory.name + ".part")
        if self.accelerator.is_main_process:
            shutil.rmtree(part, ignore_errors=True)
            part.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        # Every process keeps its own sampling RNG; only the main process writes the rest.
        torch.save(self._rng_state(), part / f"rng_{self.processes.index}.pt")
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            self.accelerator.wait_for_everyone()
            return
        self.registry.save("policy", part / "policy")
        self.registry.save("value", part / "value")
        torch.save({
            "step": self.step,
            "num_processes": self.processes.count,
            "value_model": self.value_model.name,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "kl_controller": self.kl_ctl.state_dict(),
            "reward_moments": self.reward_moments.state_dict(),
            "length_trend": self.length_trend.state_dict(),
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

        state = torch.load(directory / STATE_FILE, weights_only=False)
        if state.get("num_processes", 1) != self.processes.count:
            raise UserError(f"{directory}: written by {state.get('num_processes', 1)} process(es); resume with the "
                            f"same number, found {self.processes.count}")
        written_with = state.get("value_model", "critic")
        if written_with != self.value_model.name:
            raise UserError(f"{directory}: written with value_model {written_with}; resume with the same, found "
                            f"{self.value_model.name}")
        for role in self.value_model.adapters:
            weights = load_file(str(directory / role / "adapter_model.safetensors"))
            set_peft_model_state_dict(self.model, weights, adapter_name=role)
        self.registry.heads["value"].weight.data.copy_(load_file(str(directory / "value" / HEAD_FILE))["weight"])
        self.step = state["step"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.reward_moments.load_state_dict(state.get("reward_moments", pm.RunningMoments().state_dict()))
        self.length_trend.load_state_dict(state.get("length_trend", pm.RunningLengthTrend().state_dict()))
        self.sampler.load_state_dict(state["sampler"])
        self.history = state["history"]
        rng_file = directory / f"rng_{self.processes.index}.pt"
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

    def train(self, hooks: StageHooks | None = None) -> list[dict[str, float]]:
        """Steps until ``max_steps``, checkpointing every ``save_steps``; ``hooks`` hear each log and checkpoint.

        A hook's :class:`~rlhf.core.hooks.StopTraining` ends the loop at this step, after a checkpoint
        of it (the run then finishes as after its last step); any other exception leaves the run.
        """
        args = self.args
        hooks = hooks or StageHooks()
        bar = tqdm(total=args.max_steps, initial=self.step, desc="PPO", disable=not self.accelerator.is_main_process)
        while self.step < args.max_steps:
            stats = self.train_step()
            self.history.append(stats)
            bar.update(1)
            bar.set_postfix(score=f"{stats['score']:.3f}", kl=f"{stats['kl']:.2f}", len=f"{stats['response_length']:.0f}")
            stop = False
            if self.step % args.logging_steps == 0:
                self.accelerator.log({f"ppo/{k}": v for k, v in stats.items() if k != "step"}, step=self.step)
                stop = _stops(hooks.on_log, self.step, dict(stats))
            if self.run_dir is not None and (stop or self.step % args.save_steps == 0 or self.step == args.max_steps):
                directory = self.run_dir.work / f"checkpoint-{self.step}"
                self.save_checkpoint(directory)
                stop = _stops(hooks.on_checkpoint, self.step, directory) or stop
            if stop:
                logger.info("a hook stopped training at step %d of %d", self.step, args.max_steps)
                break
        bar.close()
        return self.history

    def evaluate(self, prompts: list, seed: int = 1234) -> tuple[dict[str, float], list[dict]]:
        """Reference vs policy on held-out prompts: reward-model score, KL to the reference, distinct-2."""
        return self.roles.compare_with_reference(prompts, self.args.eval_batch_size, seed)


def _stops(hook, *args) -> bool:
    """Call ``hook``; True when it raised StopTraining."""
    try:
        hook(*args)
    except StopTraining:
        return True
    return False


def parse_ppo(config: dict[str, Any] | None = None, *, argv: list[str] | None = None):
    (model_args, data_args, args, sampling), given = build_config(
        [ModelArguments, DataArguments, PPOArguments, SamplingArguments], argv, values=config,
        extra_keys=("resume", "overwrite_output_dir"), prog="rlhf ppo", description=DESCRIPTION,
        defaults={"train_file": "data/demo/prompts_train.jsonl", "test_file": "data/demo/prompts_test.jsonl",
                  "validation_size": 0, "test_size": 0},
    )
    if "peft_method" not in given and (Path(args.sft_model) / "adapter_config.json").exists():
        # The base is loaded as the SFT adapter was trained on it (quantised for a QLoRA SFT run).
        sft_method = read_run(args.sft_model).peft_method
        if sft_method:
            model_args.peft_method = sft_method
    return model_args, data_args, args, sampling, given


def run(config: dict[str, Any] | None = None, hooks: StageHooks | None = None, *,
        argv: list[str] | None = None) -> dict:
    """Run the PPO stage; returns its metrics.

    ``config``: keys as in the YAML (``{"config": "configs/ppo.yaml", "kl_coef": 0.1}``); ``argv``:
    command-line tokens, which win. ``hooks`` hear every log and checkpoint of the loop and the final
    held-out evaluation (on the main process).
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    hooks = hooks or StageHooks()
    if hooks.trainer_callbacks():
        raise TypeError("PPO runs its own loop, not a transformers Trainer: it takes no trainer_callbacks; use the "
                        "StageHooks events")
    model_args, data_args, args, sampling, given = parse_ppo(config, argv=argv)
    keep_freed_memory()
    splits = data_args.load("prompt")
    prompts = [r["prompt"] for r in splits["train"]]
    eval_prompts = [r["prompt"] for r in (splits["test"] or splits["validation"])][: args.eval_prompts]
    shared = check_shared_base(args.sft_model, args.reward_model, model_args)
    if args.policy_model:
        check_policy_model(args.policy_model, shared)
    run_dir = RunDir(args.output_dir)
    started = time.time()
    log_with = None if args.report_to in ("none", "", None) else args.report_to
    wandb_offline_without_key()
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), log_with=log_with, project_dir=str(run_dir.work))
    check_launch(accelerator)
    fsdp = fsdp_request(accelerator, model_args, args)
    with run_dir.removed_on_error():
        checkpoint = run_dir.prepare_on_main(bool(given.get("resume")), bool(given.get("overwrite_output_dir")),
                                             accelerator)
        set_seed(args.seed + accelerator.process_index)
        tokenizer = load_tokenizer(args.sft_model if (Path(args.sft_model) / "tokenizer_config.json").exists()
                                   else model_args.model_name_or_path)
        registry, reference = build_roles(model_args, args, accelerator.device, shared, fsdp)
        trainer = PPOTrainer(args, sampling, registry, tokenizer, prompts, reference, accelerator, run_dir)
        if checkpoint is not None:
            logger.info("resuming from %s", checkpoint)
            trainer.load_checkpoint(Path(checkpoint))
        if log_with:
            accelerator.init_trackers("rlhf-ppo", config={k: v for k, v in {**asdict(args), **asdict(sampling)}.items()
                                                          if isinstance(v, (int, float, str, bool))})
        history = trainer.train(hooks)
        metrics: dict[str, Any] = {}
        samples: list[dict] = []
        if eval_prompts and (accelerator.is_main_process or registry.sharded):  # a sharded forward needs all
            metrics, samples = trainer.evaluate(eval_prompts)
            if accelerator.is_main_process:
                _stops(hooks.on_evaluate, trainer.step, dict(metrics))  # the run ends here anyway
        if accelerator.is_main_process:
            timing = ("step_seconds", "rollout_tokens_per_second", "generate_seconds", "score_seconds",
                      "update_seconds")
            final = {k: v for k, v in history[-1].items() if k not in timing and k != "step"}
            metrics.update({f"final_{k}": v for k, v in final.items()})
            metrics.update(steps=trainer.step, replies_seen=trainer.step * args.batch_size * accelerator.num_processes)
            registry.save("policy", run_dir.work)
            registry.save("value", run_dir.work / "value")
            write_jsonl(run_dir.work / "eval_samples.jsonl", samples)
            metrics = write_run_outputs(run_dir, tokenizer, [model_args, data_args, args, sampling], given, metrics,
                                        history, "PPO", [["score"], ["kl"], ["response_length"], ["entropy"]],
                                        started)
        # Every process shuts the process group down together, and before Python exits: a gloo
        # process that leaves it to the interpreter's exit, or shuts it while a peer still works,
        # can abort (SIGABRT) after a finished run.
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return metrics
