"""GRPO and RLOO: TRL's online trainers, with our reward adapter + score head as the reward function.

    rlhf grpo --config configs/grpo.yaml [--num_generations 4 --beta 0.04 ...] [--resume]
    rlhf rloo --config configs/rloo.yaml
    accelerate launch scripts/grpo.py --config configs/grpo.yaml

Everything lives on ONE base model: the policy is the SFT LoRA adapter (``default``, trained), the
reference is TRL's frozen copy of it (``ref``, RLOO always, GRPO when ``beta > 0``), and the reward is
the reward stage's adapter + score head (``reward``), switched on inside the reward function through
rlhf.core.adapters.AdapterRegistry. TRL takes a plain callable in ``reward_funcs``, so no second copy of
the base is ever loaded (a reward *model* passed to TRL would be one).

Each step (TRL): sample ``num_generations`` replies per prompt with the policy, score them with the
reward function, advantages relative to the prompt's group (GRPO: minus the group mean, divided by
its std; RLOO: minus the mean of the other replies, Ahmadian et al. 2024), then a clipped policy
update with the KL to the reference (GRPO in the loss, RLOO in the reward).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

from rlhf.methods.common import (MethodArguments, adapter_reward, build_policy, check_reference_is_shared,
                            held_out_prompts, parse_method, policy_outputs, shared_base_args)
from rlhf.core.errors import UserError
from rlhf.core.formatting import as_messages
from rlhf.core.hooks import StageHooks
from rlhf.core.models import load_tokenizer
from rlhf.core.stage import StageRun, finish_stage, make_trainer, train_with_resume

logger = logging.getLogger(__name__)


@dataclass
class OnlineMethodArguments(MethodArguments):
    """GRPO's and RLOO's own settings beyond every method's."""

    missing_eos_penalty: float | None = -1.0
    """Score given to a reply cut off at max_completion_length (no EOS) instead of the reward model's,
    as PPO scores it, so every method compares like with like (null = the reward model's score)."""


CURVES = [["reward"], ["kl"], ["completions/mean_length"], ["entropy"]]


DESCRIPTIONS = {
    "grpo": "GRPO: TRL's GRPOTrainer with the reward adapter + score head as its reward, on one base.",
    "rloo": "RLOO: TRL's RLOOTrainer with the reward adapter + score head as its reward, on one base.",
}


def run_online(method: str, config: dict[str, Any] | None, hooks: StageHooks | None, argv: list[str] | None) -> dict:
    """Run GRPO or RLOO (``method``); returns the metrics."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    config_class, trainer_class = {"grpo": (GRPOConfig, GRPOTrainer), "rloo": (RLOOConfig, RLOOTrainer)}[method]
    stage: StageRun = parse_method(
        OnlineMethodArguments, config_class, config, argv, prog=f"rlhf {method}", description=DESCRIPTIONS[method],
        defaults={"learning_rate": 1e-5, "output_dir": f"runs/demo/{method}", "validation_size": 0, "max_completion_length": 32, "temperature": 0.7, "num_generations": 4,
                  # No validation loss to select a checkpoint by: the held-out evaluation runs at the end.
                  "eval_strategy": "no", "load_best_model_at_end": False},
    )
    if not stage.stage_args.reward_model:
        raise UserError(f"reward_model: {method} scores its replies with a reward stage output; expected a "
                        "directory, found none")
    splits = stage.data_args.load("prompt")
    tokenizer = load_tokenizer(stage.stage_args.sft_model, stage.model_args.trust_remote_code)
    # Chat messages, so TRL renders each prompt through the chat template as every stage does (rlhf.core.formatting).
    data = {"train": Dataset.from_dict({"prompt": [as_messages(r["prompt"]) for r in splits["train"]]})}
    eval_prompts = held_out_prompts(splits, stage.stage_args.eval_prompts)
    base_args = shared_base_args(stage)  # refuses SFT/reward runs that cannot share a base, before any output
    with stage.run.removed_on_error():
        checkpoint = stage.prepare()
        registry = build_policy(stage, base_args)
        trainer_class = functools.partial(trainer_class, reward_funcs=[adapter_reward(
            registry, tokenizer, stage.stage_args.missing_eos_penalty)])
        trainer = make_trainer(stage, trainer_class, registry.peft_model, tokenizer, data, hooks)
        reference = check_reference_is_shared(trainer)
        metrics: dict[str, Any] = train_with_resume(trainer, checkpoint)
        last = {}
        for entry in trainer.state.log_history:  # the last logged value of each training statistic
            last.update({k: v for k, v in entry.items() if isinstance(v, (int, float)) and k != "step"})
        metrics.update({f"final_{k}": last[k] for k in ("reward", "reward_std", "kl", "entropy",
                                                        "completions/mean_length") if k in last})
        metrics.update(stage.parameter_counts, train_prompts=len(splits["train"]), reference=reference,
                       beta=stage.training_args.beta, num_generations=stage.training_args.num_generations)

        return finish_stage(stage, trainer, tokenizer, metrics, method.upper(), CURVES, extra=policy_outputs(stage, registry, tokenizer, metrics, eval_prompts))
