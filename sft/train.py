"""Supervised fine-tuning: TRL SFTTrainer, loss on completion tokens only, early stopping.

    rlhf sft --config configs/sft.yaml [--learning_rate 1e-4 ...] [--resume]
    accelerate launch scripts/sft.py --config configs/sft.yaml
"""

from __future__ import annotations

import logging
import math
from typing import Any

from rlhf.core.formatting import encode_prompt_reply
from rlhf.core.hooks import StageHooks
from rlhf.core.models import load_tokenizer
from rlhf.core.stage import (StageRun, TrainerStageArguments, build_stage_model, evaluate_split, finish_stage,
                             make_trainer, parse_stage, train_with_resume)

logger = logging.getLogger(__name__)
DESCRIPTION = "Supervised fine-tuning: TRL SFTTrainer, loss on completion tokens only, early stopping."


def tokenize_sft_rows(tokenizer, rows: list[dict]) -> dict[str, list]:
    """Pre-tokenised columns TRL trains on directly: ``input_ids`` and ``completion_mask`` (1 = loss).

    We tokenise here rather than in TRL so that SFT, the reward model and PPO share one layout
    (rlhf.core.formatting): chat template for the prompt, the reply, then EOS.
    """
    input_ids, completion_mask = [], []
    for row in rows:
        if "text" in row:
            ids, n_prompt = encode_prompt_reply(tokenizer, "", row["text"])
        else:
            ids, n_prompt = encode_prompt_reply(tokenizer, row["prompt"], row["completion"])
        input_ids.append(ids)
        completion_mask.append([0] * n_prompt + [1] * (len(ids) - n_prompt))
    return {"input_ids": input_ids, "completion_mask": completion_mask}


def run(config: dict[str, Any] | None = None, hooks: StageHooks | None = None, *,
        argv: list[str] | None = None) -> dict:
    """Run the SFT stage; returns its metrics.

    ``config``: keys as in the YAML (``{"config": "configs/sft.yaml", "learning_rate": 1e-4}``);
    ``argv``: command-line tokens, which win; ``hooks`` hear evaluations and checkpoints.
    """
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    stage: StageRun = parse_stage(TrainerStageArguments, SFTConfig, config, argv=argv, prog="rlhf sft",
                                  description=DESCRIPTION,
                                  defaults={"completion_only_loss": True, "learning_rate": 2e-4})
    splits = stage.data_args.load("sft")  # validates every row before anything is written
    tokenizer = load_tokenizer(stage.model_args.model_name_or_path, stage.model_args.trust_remote_code)
    data = {name: Dataset.from_dict(tokenize_sft_rows(tokenizer, rows)) for name, rows in splits.items() if rows}
    # Nothing is left on disk when the run fails before its first checkpoint (bad input found late, a crash).
    with stage.run.removed_on_error():
        checkpoint = stage.prepare()

        model, _ = build_stage_model(stage, "causal-lm")
        trainer = make_trainer(stage, SFTTrainer, model, tokenizer, data, hooks)
        metrics: dict[str, Any] = train_with_resume(trainer, checkpoint)
        metrics.update(stage.parameter_counts, train_rows=len(splits["train"]))
        for name in ("validation", "test"):
            if name in data:
                metrics.update(evaluate_split(trainer, data[name], name))
        if "test" in data:
            metrics["test_perplexity"] = math.exp(min(metrics["test_loss"], 50.0))
        return finish_stage(stage, trainer, tokenizer, metrics, "SFT loss",
                            [["loss", "eval_loss"]])
