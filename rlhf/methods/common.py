"""What DPO, GRPO and RLOO share: the policy on one base, the reward adapter as a reward function,
and the held-out evaluation against the SFT reference.

Roles on ONE base model (rlhf.core.adapters.AdapterRegistry), as in PPO:

    default    the SFT LoRA adapter, trained (TRL's trainers expect the adapter they train under this name)
    ref        a frozen copy of it, added by TRL's trainer itself (DPO, RLOO, GRPO with beta > 0)
    reward     the reward stage's adapter + score head, frozen (GRPO/RLOO's reward; every method's evaluation)

A fully fine-tuned SFT model becomes the base and ``default`` a fresh LoRA on it (zero update at
the start, so TRL's ``ref`` copy of it is the SFT model exactly).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from rlhf.core.adapters import AdapterRegistry
from rlhf.core.errors import UserError
from rlhf.core.formatting import encode_prompt
from rlhf.core.generation import SamplingArguments, pad_ids
from rlhf.core.models import ModelArguments, build_peft_config, load_base_model
from rlhf.core.runs import LORA_METHODS, check_shared_base, read_run
from rlhf.core.stage import StageRun, TrainerStageArguments, parse_stage
from rlhf.core.tensors import apply_missing_eos_penalty

logger = logging.getLogger(__name__)
POLICY = "default"  # the adapter name TRL's DPO/GRPO/RLOO trainers train and copy into "ref"
TRL_REFERENCE = "ref"


@dataclass
class MethodArguments(TrainerStageArguments):
    """Settings DPO, GRPO and RLOO have beyond TRL's config: where they start from, how they are judged."""

    sft_model: str = "runs/demo/sft"
    """SFT stage output: the policy starts from it and the reference is a frozen copy of it."""
    reward_model: str | None = "runs/demo/reward"
    """Reward stage output (a LoRA adapter + score head on the same base): GRPO/RLOO's reward; for DPO
    only the held-out evaluation (null = no reward-model figures)."""
    eval_prompts: int = 32
    """Held-out prompts (test split, else validation) sampled at the end, policy vs reference."""
    eval_batch_size: int = 16
    """Batch size of that evaluation."""
    eval_max_new_tokens: int = 32
    """Longest reply in the evaluation (the same for every method, so their figures compare)."""
    eval_temperature: float = 0.7
    """Sampling temperature of the evaluation (also the temperature of its KL logprobs)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("eval_batch_size", "eval_max_new_tokens"):
            if getattr(self, name) < 1:
                raise UserError(f"{name}: expected at least 1, found {getattr(self, name)}")
        if self.eval_prompts < 0:
            raise UserError(f"eval_prompts: expected 0 or more, found {self.eval_prompts}")

    def sampling(self) -> SamplingArguments:
        return SamplingArguments(max_new_tokens=self.eval_max_new_tokens, temperature=self.eval_temperature)


def parse_method(stage_class: type, training_class: type, config: dict[str, Any] | None, argv: list[str] | None,
                 defaults: dict[str, Any], prog: str, description: str) -> StageRun:
    """Parse a method's config; the base model and its quantisation come from the SFT run."""
    stage = parse_stage(stage_class, training_class, config, argv=argv, defaults=defaults, prog=prog,
                        description=description)
    sft_dir = Path(stage.stage_args.sft_model)
    if not sft_dir.exists():
        raise UserError(f"sft_model: expected the output directory of the sft stage, found no {sft_dir} "
                        "(run that stage first)")
    sft = read_run(sft_dir)
    if "peft_method" not in stage.given and sft.is_adapter and sft.peft_method:
        stage.model_args.peft_method = sft.peft_method  # the base loads as the SFT adapter was trained on it
    if stage.model_args.peft_method not in LORA_METHODS:
        raise UserError(f"peft_method: these methods train a LoRA adapter on the shared base: expected one of "
                        f"{', '.join(LORA_METHODS)}, found {stage.model_args.peft_method!r}")
    return stage


def shared_base_args(stage: StageRun) -> ModelArguments:
    """How to load the one base, after refusing SFT/reward outputs that cannot share it (before any loading)."""
    args = stage.stage_args
    sft_dir = Path(args.sft_model)
    if args.reward_model:
        return check_shared_base(sft_dir, args.reward_model, stage.model_args).base_args
    sft = read_run(sft_dir)
    if sft.has_score_head or (sft.is_adapter and sft.peft_type != "LORA"):
        raise UserError(f"sft_model: expected a LoRA SFT adapter or a fully fine-tuned SFT model in {sft_dir}, "
                        f"found {sft.describe()}")
    from dataclasses import asdict

    return ModelArguments(**{**asdict(stage.model_args), "model_name_or_path": sft.base_model if sft.is_adapter
                             else str(sft_dir)})


def build_policy(stage: StageRun, base_args: ModelArguments) -> AdapterRegistry:
    """The base loaded once (``base_args``: :func:`shared_base_args`), the SFT adapter on it as ``default``
    (trainable), the reward adapter as ``reward``."""
    args = stage.stage_args
    stage.model_args.model_name_or_path = base_args.model_name_or_path  # config.yaml records the real base
    base = load_base_model(base_args, "causal-lm", stage.training_args.gradient_checkpointing)
    registry = AdapterRegistry(base)
    if read_run(args.sft_model).is_adapter:
        registry.load(POLICY, args.sft_model, trainable=True)
    else:
        registry.add(POLICY, build_peft_config(base_args, base), trainable=True)
    if args.reward_model:
        registry.load("reward", args.reward_model, trainable=False)
    stage.parameter_counts = {"trainable_parameters": sum(p.numel() for p in registry.parameters_of(POLICY)),
                              "total_parameters": sum(p.numel() for p in base.parameters()),
                              "peft_method": stage.model_args.peft_method}
    return registry


def check_reference_is_shared(trainer) -> str:
    """TRL must compute the reference under its frozen ``ref`` adapter on our model, never a second copy.

    TRL 1.16 does so for a PeftModel whose adapter is already trained (it copies ``default`` into a
    new ``ref`` adapter); a TRL that loads a separate reference model instead would double the
    weights in memory, so it stops the run here rather than silently.
    """
    model = trainer.accelerator.unwrap_model(trainer.model)
    if getattr(trainer, "ref_model", None) is not None:
        raise RuntimeError("TRL loaded a separate reference model; expected its frozen 'ref' adapter on the policy's "
                           "base (check the TRL version: 1.16 adds it for a PeftModel with a trained adapter)")
    if getattr(trainer, "beta", getattr(trainer.args, "beta", 0.0)) == 0.0:
        return "none (beta = 0)"
    if TRL_REFERENCE not in model.peft_config:
        raise RuntimeError("TRL added no 'ref' adapter: its reference would be the base with adapters off, not the "
                           "SFT policy")
    return f"frozen adapter '{TRL_REFERENCE}' on the shared base"


def adapter_reward(registry: AdapterRegistry, tokenizer, missing_eos_penalty: float | None = None
                   ) -> Callable[..., list[float]]:
    """The reward adapter + score head as a TRL reward function, scored on the policy's own base.

    TRL calls it with the prompts (chat messages) and each completion's token ids (up to and with
    its EOS); the sequence is laid out as the reward stage trained on it (rlhf.core.formatting: the
    prompt through the chat template, then the reply) and scored at its last real token under the
    ``reward`` adapter, switched on and back off through the registry. Eval mode for the forward:
    the reward is the frozen model's, LoRA dropout must not sample it. A completion cut off at the
    length limit (no EOS) scores ``missing_eos_penalty`` instead, as PPO scores it (None = its score).
    """
    pad = tokenizer.pad_token_id

    @torch.no_grad()
    def reward_model(prompts: list, completions: list, completion_ids: list[list[int]], **_: Any) -> list[float]:
        model = registry.peft_model
        device = next(model.parameters()).device
        registry.heads.to(device)
        ids, mask = pad_ids([encode_prompt(tokenizer, p) + list(c) for p, c in zip(prompts, completion_ids)],
                            pad, side="right")  # (b, s)
        was_training = model.training
        model.eval()
        try:
            scores = registry.score("reward", ids.to(device), mask.to(device), pad)  # (b,)
        finally:
            model.train(was_training)
        ends_with_eos = torch.tensor([len(c) > 0 and c[-1] == tokenizer.eos_token_id for c in completion_ids])
        return apply_missing_eos_penalty(scores.float().cpu(), ends_with_eos, missing_eos_penalty).tolist()

    return reward_model


def drop_extra_adapters(work: Path) -> None:
    """peft saves every adapter of the model; the run's adapter is ``default``, at the root."""
    for name in (TRL_REFERENCE, "reward"):
        if (work / name / "adapter_config.json").exists():
            shutil.rmtree(work / name)


def evaluate_policy(stage: StageRun, registry: AdapterRegistry, tokenizer, work: Path,
                    prompts: list) -> tuple[dict[str, float], list[dict]]:
    """The trained adapter (as saved) vs the SFT reference on held-out prompts, as PPO reports it:
    reward-model score, KL to the reference (nats per reply), distinct-2, reply length."""
    from rlhf.core.roles import RoleForwards

    args = stage.stage_args
    if not prompts or not args.reward_model:
        return {}, []
    registry.load("policy", work, trainable=False)  # what was written, not what is in memory
    reference = None
    if read_run(args.sft_model).is_adapter:
        registry.load("reference", args.sft_model, trainable=False)
        reference = "reference"
    registry.heads.to(next(registry.peft_model.parameters()).device)
    registry.peft_model.eval()
    roles = RoleForwards(registry, tokenizer, args.sampling(), reference)
    return roles.compare_with_reference(prompts, args.eval_batch_size, seed=1234)


def policy_outputs(stage: StageRun, registry: AdapterRegistry, tokenizer, metrics: dict[str, Any],
                   prompts: list) -> Callable[[Path], None]:
    """What a policy method writes beside TRL's outputs (finish_stage's ``extra``): only its own adapter
    at the root, the held-out evaluation into ``metrics`` and ``eval_samples.jsonl``."""

    def write(work: Path) -> None:
        from rlhf.core.data import write_jsonl

        drop_extra_adapters(work)
        found, samples = evaluate_policy(stage, registry, tokenizer, work, prompts)
        metrics.update(found)
        if samples:
            write_jsonl(work / "eval_samples.jsonl", samples)

    return write


def held_out_prompts(splits: dict[str, list[dict]], count: int) -> list:
    rows = splits.get("test") or splits.get("validation") or []
    seen, prompts = set(), []
    for row in rows:  # preference files repeat a prompt once per pair
        key = str(row["prompt"])
        if key not in seen:
            seen.add(key)
            prompts.append(row["prompt"])
    return prompts[:count]
