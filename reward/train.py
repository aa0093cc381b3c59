"""Reward model: TRL RewardTrainer, a LoRA adapter plus a scalar score head on the shared base.

    rlhf reward --config configs/reward.yaml [--learning_rate 5e-4 ...] [--resume]
    accelerate launch scripts/reward.py --config configs/reward.yaml

The adapter is saved with its score head so PPO can load it as one more adapter on the same base.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from rlhf.core.adapters import HEAD_FILE, read_score_head
from rlhf.core.errors import UserError
from rlhf.core.formatting import encode_prompt_reply
from rlhf.core.hooks import StageHooks
from rlhf.core.models import load_tokenizer
from rlhf.core.stage import StageRun, build_stage_model, finish_stage, make_trainer, parse_stage, train_with_resume
from reward.config import RewardStageArguments
from reward.score import pair_metrics, plot_calibration
from rlhf.core.scoring import score_replies

logger = logging.getLogger(__name__)
DESCRIPTION = "Reward model: TRL RewardTrainer, a LoRA adapter plus a scalar score head on the shared base."


def tokenize_pairs(tokenizer, rows: list[dict]) -> dict[str, list]:
    """Pre-tokenised ``chosen_ids``/``rejected_ids`` in the layout PPO scores (rlhf.core.formatting)."""
    return {
        "chosen_ids": [encode_prompt_reply(tokenizer, r["prompt"], r["chosen"])[0] for r in rows],
        "rejected_ids": [encode_prompt_reply(tokenizer, r["prompt"], r["rejected"])[0] for r in rows],
    }


def load_adapter_weights(model, adapter_dir: str | os.PathLike) -> None:
    """Copy a saved peft adapter's weights (LoRA and, for a reward model, its score head) into ``model``,
    a peft model built with the same settings (``warm_start``)."""
    from peft import PeftModel, set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(adapter_dir) / "adapter_model.safetensors"
    if not isinstance(model, PeftModel) or not path.exists():
        raise UserError(f"warm_start: expected a reward adapter (adapter_model.safetensors) in {adapter_dir} for a "
                        f"peft_method with an adapter, found {'no such file' if not path.exists() else 'a full model'}")
    result = set_peft_model_state_dict(model, load_file(str(path)))
    missing = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k or "score" in k]
    if missing:
        raise UserError(f"warm_start: {adapter_dir} does not fit this config's adapter (e.g. {missing[0]}); start "
                        "fresh (labeling rounds: reward_init: fresh) or use the same lora_r and target modules")


def run(config: dict[str, Any] | None = None, hooks: StageHooks | None = None, *,
        argv: list[str] | None = None) -> dict:
    """Run the reward stage; returns its metrics (``config``, ``hooks``, ``argv``: as sft.train.run)."""
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    stage: StageRun = parse_stage(
        RewardStageArguments, RewardConfig, config, argv=argv, prog="rlhf reward", description=DESCRIPTION,
        commands={"score": "score prompt/response rows with a reward stage output (rlhf reward score --help)"},
        defaults={"learning_rate": 5e-4, "metric_for_best_model": "eval_accuracy", "greater_is_better": True,
                  "max_length": None},
    )
    splits = stage.data_args.load("preference")
    tokenizer = load_tokenizer(stage.model_args.model_name_or_path, stage.model_args.trust_remote_code)
    data = {name: Dataset.from_dict(tokenize_pairs(tokenizer, rows)) for name, rows in splits.items() if rows}
    # Nothing is left on disk when the run fails before its first checkpoint (bad input found late, a crash).
    with stage.run.removed_on_error():
        checkpoint = stage.prepare()

        model, peft_config = build_stage_model(stage, "seq-cls")
        model.config.pad_token_id = tokenizer.pad_token_id
        if stage.stage_args.warm_start and checkpoint is None:  # a resumed run has its checkpoint's weights
            load_adapter_weights(model, stage.stage_args.warm_start)
            logger.info("reward model starts from %s", stage.stage_args.warm_start)
        trainer = make_trainer(stage, RewardTrainer, model, tokenizer, data, hooks)
        metrics: dict[str, Any] = train_with_resume(trainer, checkpoint)
        metrics.update(stage.parameter_counts, train_pairs=len(splits["train"]),
                       validation_pairs=len(splits["validation"]))

        held_out = {}
        # The trainer's evaluations already give validation accuracy (eval_accuracy); the held-out
        # figures and the calibration plot come from the test split, or validation when there is none.
        for name in ("test",) if splits["test"] else ("validation",):
            rows = splits[name]
            if not rows:
                continue
            prompts = [r["prompt"] for r in rows]
            chosen = score_replies(trainer.model, tokenizer, prompts, [r["chosen"] for r in rows], progress=True)
            rejected = score_replies(trainer.model, tokenizer, prompts, [r["rejected"] for r in rows], progress=True)
            held_out[name] = pair_metrics(chosen, rejected, stage.stage_args.calibration_bins)
            metrics.update({f"{name}_{k}": v for k, v in held_out[name].items() if k != "calibration"})

        def write_extras(work) -> None:
            if held_out:
                name = "test" if "test" in held_out else "validation"
                plot_calibration(work / "calibration.png", held_out[name]["calibration"],
                                 f"reward model calibration ({name}, acc {held_out[name]['accuracy']:.0%})")
                metrics["calibration"] = {k: v["calibration"] for k, v in held_out.items()}
            if not (work / HEAD_FILE).exists() and read_score_head(work) is None and peft_config is not None:
                logger.warning("the saved reward adapter has no score head; PPO could not load it")

        return finish_stage(stage, trainer, tokenizer, metrics, "reward model",
                            [["loss", "eval_loss"], ["accuracy", "eval_accuracy"]], extra=write_extras)
