"""DPO: TRL DPOTrainer on the reward stage's preference files, from the SFT adapter, on one base.

    rlhf dpo --config configs/dpo.yaml [--beta 0.1 --loss_type ipo ...] [--resume]
    accelerate launch scripts/dpo.py --config configs/dpo.yaml

The policy is the SFT LoRA adapter (``sft_model``), trained; the reference is a frozen copy of it
that TRL's DPOTrainer adds to the same model as adapter "ref" (no second model in memory, checked
before training). Loss variants by TRL's own names: ``loss_type: sigmoid`` (DPO, Rafailov et al.
2023), ``ipo``, ``hinge``, ``robust``, ``exo_pair``, ``nca_pair``, ``bco_pair``, ``sppo_hard``,
``aot``, ``apo_zero``, ``apo_down``, ``discopop``, ``sft``...; ``beta``, ``label_smoothing``.
"""

from __future__ import annotations

import logging
from typing import Any

from rlhf.methods.common import (MethodArguments, build_policy, check_reference_is_shared, held_out_prompts,
                            parse_method, policy_outputs, shared_base_args)
from rlhf.core.formatting import encode_prompt, encode_reply
from rlhf.core.hooks import StageHooks
from rlhf.core.models import load_tokenizer
from rlhf.core.stage import StageRun, evaluate_split, finish_stage, make_trainer, train_with_resume

logger = logging.getLogger(__name__)


def tokenize_preferences(tokenizer, rows: list[dict]) -> dict[str, list]:
    """``prompt_ids``/``chosen_ids``/``rejected_ids`` in the layout every stage shares (rlhf.core.formatting):
    the prompt through the chat template, each reply followed by EOS."""
    return {
        "prompt_ids": [encode_prompt(tokenizer, r["prompt"]) for r in rows],
        "chosen_ids": [encode_reply(tokenizer, r["chosen"]) for r in rows],
        "rejected_ids": [encode_reply(tokenizer, r["rejected"]) for r in rows],
    }


def dpo_trainer_class():
    from trl import DPOTrainer

    class SharedLayoutDPOTrainer(DPOTrainer):
        """TRL's DPOTrainer on rows tokenised by :func:`tokenize_preferences`.

        TRL would tokenise prompt + reply as one string, which can merge tokens across the boundary
        and renders chat replies with the template's own ending: not the sequence SFT trained on,
        the reward model scores and generation produces. Only its dataset preparation is replaced.
        """

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if "prompt_ids" not in dataset.column_names:
                return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
            if args.max_length is not None and args.truncation_mode == "keep_start":
                # As TRL does: a prompt that fills max_length leaves no completion token to learn from.
                dataset = dataset.filter(lambda row: len(row["prompt_ids"]) < args.max_length)
            return dataset

    return SharedLayoutDPOTrainer


def run(config: dict[str, Any] | None = None, hooks: StageHooks | None = None, *,
        argv: list[str] | None = None) -> dict:
    """Run the DPO stage; returns its metrics (``config``, ``hooks``, ``argv``: as sft.train.run)."""
    from datasets import Dataset
    from trl import DPOConfig

    stage: StageRun = parse_method(
        MethodArguments, DPOConfig, config, argv,
        defaults={"learning_rate": 5e-5, "loss_type": ["sigmoid"], "output_dir": "runs/demo/dpo"},
        prog="rlhf dpo", description="DPO: TRL DPOTrainer on preference pairs, from the SFT adapter, on one base.",
    )
    splits = stage.data_args.load("preference")  # validates every row before anything is written
    tokenizer = load_tokenizer(stage.stage_args.sft_model, stage.model_args.trust_remote_code)
    data = {name: Dataset.from_dict(tokenize_preferences(tokenizer, rows)) for name, rows in splits.items() if rows}
    eval_prompts = held_out_prompts(splits, stage.stage_args.eval_prompts)
    base_args = shared_base_args(stage)  # refuses SFT/reward runs that cannot share a base, before any output
    with stage.run.removed_on_error():
        checkpoint = stage.prepare()
        registry = build_policy(stage, base_args)
        trainer = make_trainer(stage, dpo_trainer_class(), registry.peft_model, tokenizer, data, hooks)
        reference = check_reference_is_shared(trainer)
        metrics: dict[str, Any] = train_with_resume(trainer, checkpoint)
        metrics.update(stage.parameter_counts, train_pairs=len(splits["train"]), reference=reference,
                       loss_type=",".join(stage.training_args.loss_type), beta=stage.training_args.beta)
        if "validation" in data:
            metrics.update(evaluate_split(trainer, data["validation"], "validation"))

        return finish_stage(stage, trainer, tokenizer, metrics, "DPO",
                            [["loss", "eval_loss"], ["rewards/margins", "eval_rewards/margins"],
                             ["rewards/accuracies", "eval_rewards/accuracies"]], extra=policy_outputs(stage, registry, tokenizer, metrics, eval_prompts))
