"""The label stage: preference pairs of the SFT policy's own replies, labelled by whoever labels.

    rlhf label run --config configs/label.yaml --sft_model runs/demo/sft --output_dir runs/demo/label
    rlhf pipeline --config configs/pipeline.yaml          # runs it between SFT and the reward model

The reward model learns from comparisons of the policy's own samples (the protocol of Ziegler et al.
2019 and InstructGPT): replies like the ones PPO will ask it to score, not replies written from
templates. In ``output_dir``:

1. ``campaign/``: ``samples_per_prompt`` replies of ``sft_model`` to each prompt of ``prompts_file``
   (sampled with the same settings PPO samples with), every pair of different replies to one prompt
   (or ``max_pairs_per_prompt`` of them). Written whole or not at all, seeded: a rerun after a kill
   samples the same replies.
2. Labels. ``labeler: annotator``: the demo annotator (rlhf/demo/annotator.py) labels every pair now,
   with its noisy choice (``annotator_noise``); each label is its own transaction drawn from a
   generator seeded by the pair, so a kill and rerun stores the same labels, none twice.
   ``labeler: campaign``: the stage stops until people have labelled ``min_labeled_share`` of the pairs
   (``rlhf label serve <output_dir>/campaign``); rerun the same command to continue.
3. ``train.jsonl``, ``validation.jsonl``, ``test.jsonl``: the labelled pairs (majority vote), split by
   PROMPT (``validation_share``, ``test_share``), so the reward model is tested on replies to prompts
   it never trained on. With the demo annotator the test pairs carry its noiseless choice (the
   preference the noisy labels stand for; pairs it scores equal are left out): the reward stage's
   test accuracy is then its agreement with the labeler on held-out policy-reply pairs.
4. ``metrics.json`` (written last: the stage is complete): pair counts, and with the annotator how
   often its noisy labels agree with its noiseless choice.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf.core.config import build_config, load_yaml, save_resolved_config, to_plain
from rlhf.core.data import load_rows, write_jsonl
from rlhf.core.errors import UserError
from rlhf.core.generation import SamplingArguments
from rlhf.core.hooks import StageHooks
from rlhf.core.outputs import write_json
from rlhf.label.labelers import LabelerArguments, label_or_wait

logger = logging.getLogger(__name__)


@dataclass
class LabelStageArguments(LabelerArguments):
    """What to sample, who labels it (LabelerArguments), and how the labelled pairs are split."""

    sft_model: str = ""
    """The policy whose replies are compared: an SFT stage output (the pipeline sets it)."""
    prompts_file: str = "data/demo/prompts_train.jsonl"
    """Rows with a 'prompt' (string or chat messages): the prompts the replies answer."""
    output_dir: str = "runs/demo/label"
    """Where the campaign, the labelled pairs and metrics.json go."""
    max_prompts: int | None = None
    """Label replies to the first this many prompts of prompts_file only (None = all)."""
    samples_per_prompt: int = 4
    """Replies sampled per prompt (K); every pair of different replies to a prompt is a candidate."""
    max_pairs_per_prompt: int | None = None
    """Keep this many of a prompt's K(K-1)/2 pairs, drawn with the seed (None = all)."""
    validation_share: float = 0.1
    """Share of the prompts whose pairs go to validation.jsonl (the reward model's early stopping)."""
    test_share: float = 0.1
    """Share of the prompts whose pairs go to test.jsonl (held-out prompts)."""
    batch_size: int = 32
    """Sequences per generate call."""
    seed: int = 42
    """Seed of the sampling, the pairs kept, the labels and the split."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_prompts is not None and self.max_prompts < 1:
            raise UserError(f"max_prompts: expected at least 1 or null, found {self.max_prompts}")
        if self.samples_per_prompt < 2:
            raise UserError(f"samples_per_prompt: expected at least 2 (a pair), found {self.samples_per_prompt}")
        if self.max_pairs_per_prompt is not None and self.max_pairs_per_prompt < 1:
            raise UserError(f"max_pairs_per_prompt: expected at least 1 or null, found {self.max_pairs_per_prompt}")
        for name in ("validation_share", "test_share"):
            if not 0 <= getattr(self, name) < 1:
                raise UserError(f"{name}: expected a number from 0 to below 1, found {getattr(self, name)}")
        if self.validation_share + self.test_share >= 1:
            raise UserError("validation_share + test_share: expected below 1 (some prompts must stay for training), "
                            f"found {self.validation_share + self.test_share}")
        if self.batch_size < 1:
            raise UserError(f"batch_size: expected at least 1, found {self.batch_size}")


def split_prompts(prompts: list[str], validation_share: float, test_share: float, seed: int) -> dict[str, str]:
    """Each prompt's split (train, validation or test), by a seeded shuffle of the distinct prompts."""
    distinct = sorted(set(prompts))
    random.Random(seed).shuffle(distinct)
    n_test = round(test_share * len(distinct))
    n_validation = round(validation_share * len(distinct))
    split = {}
    for i, prompt in enumerate(distinct):
        split[prompt] = "test" if i < n_test else "validation" if i < n_test + n_validation else "train"
    return split


def noiseless_rows(rows: list[dict]) -> list[dict]:
    """The same pairs with the demo annotator's noiseless choice; pairs it scores equal are left out."""
    from rlhf.demo.annotator import annotator_score
    from rlhf.label.annotate import last_user_text

    out = []
    for row in rows:
        text = last_user_text(row["prompt"])
        gap = annotator_score(text, row["chosen"]) - annotator_score(text, row["rejected"])
        if gap == 0:
            continue
        chosen, rejected = (row["chosen"], row["rejected"]) if gap > 0 else (row["rejected"], row["chosen"])
        out.append({**row, "chosen": chosen, "rejected": rejected, "label": "noiseless annotator"})
    return out


def _sample_campaign(args: LabelStageArguments, sampling: SamplingArguments, campaign_dir: Path) -> None:
    """Step 1, atomically: the campaign exists whole or not at all."""
    from rlhf.label.ingest import generate_responses
    from rlhf.label.store import Campaign

    part = campaign_dir.with_name(campaign_dir.name + ".part")
    shutil.rmtree(part, ignore_errors=True)
    campaign = Campaign.create_or_open(part)
    campaign.set_k(args.k)
    prompts_file = args.prompts_file
    if args.max_prompts is not None:
        rows = [r for r in load_rows(args.prompts_file, "prompt")][: args.max_prompts]
        prompts_file = str(campaign_dir.with_name("prompts.jsonl"))
        write_jsonl(prompts_file, [{"prompt": r["prompt"]} for r in rows])
    result = generate_responses(args.sft_model, prompts_file, campaign, sampling, n=args.samples_per_prompt,
                                batch_size=args.batch_size, seed=args.seed,
                                max_pairs_per_prompt=args.max_pairs_per_prompt)
    logger.info("label: campaign %s", result.summary())
    del campaign
    os.replace(part, campaign_dir)


def run(config: dict[str, Any] | None = None, hooks: StageHooks | None = None, *,
        argv: list[str] | None = None) -> dict:
    """Run the label stage (see the module docstring); returns its metrics, or
    ``{"waiting_for_labels": <campaign dir>}`` when a campaign still needs people's labels."""
    from rlhf.label.export import export_rows
    from rlhf.label.store import Campaign

    (args, sampling), given = build_config([LabelStageArguments, SamplingArguments], argv, values=config,
                                           extra_keys=("overwrite_output_dir",), prog="rlhf label run",
                                           description="The label stage: the SFT policy's own replies, labelled, "
                                                       "split by prompt (rlhf/label/stage.py).")
    if not args.sft_model:
        raise UserError("sft_model: expected the SFT stage output whose replies are labelled, found none")
    if not Path(args.sft_model).exists():
        raise UserError(f"sft_model: expected an SFT stage output, found no {args.sft_model}")
    if not Path(args.prompts_file).exists():
        raise UserError(f"prompts_file: no such file {args.prompts_file}")
    out = Path(args.output_dir)
    if given.get("overwrite_output_dir"):
        shutil.rmtree(out, ignore_errors=True)
    elif (out / "metrics.json").exists():
        raise UserError(f"{out}: expected a new output_dir, found a finished label stage there; pass "
                        "--overwrite_output_dir true or choose another output_dir")
    # An interrupted stage continues only with the settings its campaign was sampled with.
    settings = {**to_plain(args), **to_plain(sampling)}
    earlier = out / "config.yaml"
    if (out / "campaign").exists() and earlier.exists():
        before = load_yaml(earlier)
        changed = sorted(k for k in settings if before.get(k) != settings[k])
        if changed:
            raise UserError(f"{out}: an interrupted label stage made with other settings ({', '.join(changed)}); "
                            "rerun with its settings, or pass --overwrite_output_dir true to start again")
    out.mkdir(parents=True, exist_ok=True)
    save_resolved_config(out / "config.yaml", [args, sampling], given)
    started = time.time()

    campaign_dir = out / "campaign"
    if not campaign_dir.exists():
        _sample_campaign(args, sampling, campaign_dir)
    campaign = Campaign(campaign_dir)
    message = label_or_wait(campaign, campaign_dir, args, args.seed, "label stage", "the same command")
    if message:
        logger.warning(message)
        print(message)
        return {"waiting_for_labels": str(campaign_dir)}

    rows, left_out = export_rows(campaign)
    split = split_prompts([str(r["prompt"]) for r in rows], args.validation_share, args.test_share, args.seed)
    parts: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    for row in rows:
        parts[split[str(row["prompt"])]].append(row)
    metrics: dict[str, Any] = {"labeler": args.labeler, "pairs_labelled": len(rows),
                               "pairs_left_out": sum(left_out.values()),
                               "replies_per_prompt": args.samples_per_prompt}
    if args.labeler == "annotator":
        clean = noiseless_rows(rows)
        by_pair = {r["pair_id"]: r["chosen"] for r in clean}
        agree = [by_pair[r["pair_id"]] == r["chosen"] for r in rows if r["pair_id"] in by_pair]
        metrics["label_agreement_with_noiseless"] = sum(agree) / len(agree) if agree else None
        parts["test"] = noiseless_rows(parts["test"])
    for name, part in parts.items():
        write_jsonl(out / f"{name}.jsonl", part)  # rewritten whole on a rerun; metrics.json marks completion
        metrics[f"{name}_pairs"] = len(part)
    if not parts["train"]:
        raise UserError(f"{out}: no labelled pair left for training (of {len(rows)}); label more pairs or lower "
                        "validation_share/test_share")
    metrics["wall_seconds"] = time.time() - started
    write_json(out / "metrics.json", metrics)  # written last: the stage is complete
    if hooks is not None:
        hooks.on_evaluate(0, metrics)
    logger.info("label: %d train, %d validation, %d test pairs -> %s", metrics["train_pairs"],
                metrics["validation_pairs"], metrics["test_pairs"], out)
    return metrics
