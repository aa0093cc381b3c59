"""Iterated RLHF: after SFT -> label -> reward -> PPO, rounds of new labels on the current policy's replies.

    rlhf pipeline --config configs/pipeline.yaml --rounds 2            # rounds_config: configs/rounds.yaml
    make demo-rounds                                                     # the same, with the demo annotator

A reward model trained on the SFT model's replies grows unreliable on the replies of the policy PPO
makes from it (Llama 2's reward models and policies went through five such rounds; Anthropic's
"online" HH data came from each new policy). Round r (1, 2, ...) takes the policy and reward model of
the round before (round 0 = the pipeline's ppo/ and reward/) and, in ``<root>/round-<r>/``:

    1. samples held-out replies of the policy it starts from (start_samples.jsonl) and of SFT
    2. samples replies to training prompts from that policy, scores every candidate pair with the
       reward model and keeps the ``budget`` pairs it is least sure about plus a random share
       (campaign/, see rlhf/label/select.py)
    3. gets them labeled: ``labeler: annotator`` lets the demo annotator label now;
       ``labeler: campaign`` stops here and says how to label (`rlhf label serve`) and rerun
    4. trains the reward model on all labels so far (the label stage's pairs, or the reward config's
       train_file without one, plus every
       round's labels), from the previous reward adapter or afresh (``reward_init``) -> reward/
    5. measures both reward models on fresh pairs from the policy it started from (rm_eval.json)
    6. continues PPO from that policy against the new reward model; the reference and KL stay SFT -> ppo/
    7. samples the new policy on the held-out prompts: win rate against SFT by the demo annotator
       (end_samples.jsonl), and writes metrics.json (the round is complete) and <root>/rounds.md

Each step writes its output atomically and is skipped when that output exists; the reward and PPO
runs resume from their checkpoints. So a kill anywhere, or a stop for labels, continues on rerun.

The per-round figures (metrics.json, rounds.md):

- ``rm_accuracy_before`` / ``rm_accuracy_after``: the previous and the new reward model on this
  round's labeled RANDOM pairs: fresh replies of the policy the round starts from, drawn without
  regard to the reward model (unbiased), held out of this round's reward training
  (``hold_out_random``; they join the training data of the next round). Before is what rounds exist
  to fix: the reward model's accuracy on the current policy's replies.
- ``rm_annotator_accuracy_before`` / ``_after`` (demo annotator only): the same two models on every
  pair of the start policy's held-out samples, against the noiseless demo annotator: more pairs,
  no label noise, prompts never trained on.
- ``win_rate``: the round's new policy against SFT, by the demo annotator, over every pair of
  ``eval_samples_per_prompt`` samples each per held-out prompt (ties half), with its 95 % bootstrap
  interval over prompts (``rlhf.eval.statistics.win_rate_summary``, as ``rlhf eval`` counts it);
  ``start_win_rate`` is the same for the policy the round started from.
- ``kl``, ``response_length``: the new policy's KL to SFT and reply length on held-out prompts (PPO's
  evaluation), ``final_kl``: the KL of its last training batch.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rlhf.app.stages import run_stage
from rlhf.core.config import build_config, load_yaml
from rlhf.core.data import load_rows, write_jsonl
from rlhf.core.errors import UserError
from rlhf.core.outputs import RunDir, write_json
from rlhf.label.labelers import LabelerArguments, label_or_wait

logger = logging.getLogger(__name__)
REWARD_INITS = ("previous", "fresh")


@dataclass
class RoundsArguments(LabelerArguments):
    """Settings of the labeling rounds after the first PPO (configs/rounds.yaml); who labels each
    round's campaign: LabelerArguments."""

    # -- what is labelled --
    budget: int = 64
    """Pairs to label per round."""
    random_share: float = 0.2
    """Share of the budget drawn at random from all candidate pairs: the unbiased accuracy estimate."""
    samples_per_prompt: int = 3
    """Replies sampled from the policy per labeling prompt; every two make a candidate pair."""
    label_prompts: int | None = 64
    """Training prompts sampled per round (a different seeded slice each round); null = all."""
    hold_out_random: bool = True
    """Keep this round's random pairs out of its reward training, so the new reward model's accuracy on
    them is measured on pairs it never saw; they are trained on from the next round on."""
    # -- training --
    reward_init: str = "previous"
    """previous: the reward model continues from the last round's adapter; fresh: from a new adapter."""
    reward_max_steps: int | None = None
    """Override the reward config's max_steps in the rounds (null = the config's)."""
    ppo_max_steps: int | None = None
    """Override the PPO config's max_steps in the rounds (null = the config's)."""
    continue_kl_coef: bool = True
    """Adaptive KL controller: start each round's PPO at the coefficient the previous PPO ended with."""
    # -- report --
    eval_prompts: int = 32
    """Held-out prompts (the PPO config's test prompts) for the win rate and the annotator accuracy."""
    eval_samples_per_prompt: int = 4
    """Samples per held-out prompt from each policy and from SFT."""
    batch_size: int = 16
    """Sequences per generate or scoring call."""
    seed: int = 0
    """Seeds prompt slices, sampling, pair selection and the annotator."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.reward_init not in REWARD_INITS:
            raise UserError(f"reward_init: expected one of {', '.join(REWARD_INITS)}, found {self.reward_init!r}")
        for name in ("budget", "eval_samples_per_prompt"):
            if getattr(self, name) < 1:
                raise UserError(f"{name}: expected at least 1, found {getattr(self, name)}")
        if self.samples_per_prompt < 2:
            raise UserError(f"samples_per_prompt: expected at least 2 (a pair), found {self.samples_per_prompt}")
        if not 0 <= self.random_share <= 1:
            raise UserError(f"random_share: expected a number from 0 to 1, found {self.random_share}")


# ----------------------------------------------------------------------------------------------
# Small pure helpers
# ----------------------------------------------------------------------------------------------


def pair_accuracy(truth: list[float], predicted: list[float]) -> float | None:
    """Share of pairs whose predicted margin has the sign of the true one (a zero prediction counts half).

    ``truth[i]``, ``predicted[i]``: the true and the predicted score difference of pair i; pairs whose
    true difference is 0 (no right answer) are left out. None without pairs.
    """
    kept = [(t, p) for t, p in zip(truth, predicted) if t != 0]
    if not kept:
        return None
    return sum(0.5 if p == 0 else float((p > 0) == (t > 0)) for t, p in kept) / len(kept)


def prompt_slice(prompts: list, count: int | None, round_index: int, seed: int) -> list:
    """Round r's labeling prompts: the r-th slice of ``count`` from one seeded shuffle, wrapping around."""
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    if count is None or count >= len(prompts):
        return [prompts[i] for i in order]
    start = (round_index - 1) * count
    return [prompts[order[(start + j) % len(order)]] for j in range(count)]


# ----------------------------------------------------------------------------------------------
# Files written atomically
# ----------------------------------------------------------------------------------------------


def _write_rows(path: Path, rows: list[dict]) -> None:
    part = path.with_name(path.name + ".part")
    write_jsonl(part, rows)
    os.replace(part, path)


def _read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------------------------
# Models: sampling, scoring
# ----------------------------------------------------------------------------------------------


def sample_file(path: Path, model_dir: str, prompts: list, sampling, n: int, batch_size: int, seed: int) -> list[dict]:
    """``n`` replies per prompt from ``model_dir`` as ``{"prompt", "replies"}`` rows, kept in ``path``."""
    if not path.exists():
        from rlhf.core.generation import generate_replies, load_for_generation

        model, tokenizer = load_for_generation(model_dir)
        replies = generate_replies(model, tokenizer, prompts, sampling, n=n, batch_size=batch_size, seed=seed)
        _write_rows(path, [{"prompt": p, "replies": r} for p, r in zip(prompts, replies)])
    return _read_rows(path)


def score_texts(reward_dir: str, prompts: list, replies: list[str], batch_size: int) -> list[float]:
    from rlhf.core.runs import load_run
    from rlhf.core.scoring import score_replies

    model, tokenizer = load_run(reward_dir, "seq-cls")
    return score_replies(model, tokenizer, prompts, replies, batch_size)


# ----------------------------------------------------------------------------------------------
# The rounds
# ----------------------------------------------------------------------------------------------


@dataclass
class Context:
    """What every round needs: the settings and the pipeline's stage configs and outputs."""

    args: RoundsArguments
    configs: dict[str, str]
    outputs: dict[str, str]
    root: Path
    model_name_or_path: str | None
    sampling: Any
    train_prompts: list
    eval_prompts: list
    ppo_seed: int
    kl_controller: str

    def round_dir(self, r: int) -> Path:
        return self.root / f"round-{r}"

    def policy(self, r: int) -> str:
        """The policy round r+1 starts from: the pipeline's PPO for r = 0."""
        return self.outputs["ppo"] if r == 0 else str(self.round_dir(r) / "ppo")

    def reward(self, r: int) -> str:
        return self.outputs["reward"] if r == 0 else str(self.round_dir(r) / "reward")


def make_context(rounds_config: str | None, configs: dict[str, str], outputs: dict[str, str],
                 model_name_or_path: str | None = None, values: dict | None = None) -> Context:
    from rlhf.ppo.trainer import parse_ppo

    (args,), _ = build_config([RoundsArguments], values={**({"config": rounds_config} if rounds_config else {}),
                                                          **(values or {})})
    _, data_args, ppo_args, sampling, _ = parse_ppo(
        {"config": configs["ppo"], "sft_model": outputs["sft"], "reward_model": outputs["reward"]})
    splits = data_args.load("prompt")
    held_out = splits["test"] or splits["validation"]
    if not held_out:
        raise UserError(f"{configs['ppo']}: rounds need held-out prompts (test_file or validation_file) for the "
                        "win rate; found none")
    return Context(args, configs, outputs, Path(outputs["ppo"]).parent, model_name_or_path, sampling,
                   [r["prompt"] for r in splits["train"]], [r["prompt"] for r in held_out][: args.eval_prompts],
                   ppo_args.seed, ppo_args.kl_controller)


def run_rounds(count: int, rounds_config: str | None, configs: dict[str, str], outputs: dict[str, str],
               model_name_or_path: str | None = None, values: dict | None = None) -> dict[str, Any]:
    """Run rounds 1..count (skipping finished ones); returns ``{"rounds": [round dirs done],
    "waiting_for_labels": campaign dir or None}``."""
    ctx = make_context(rounds_config, configs, outputs, model_name_or_path, values)
    done = []
    for r in range(1, count + 1):
        if RunDir(ctx.round_dir(r)).is_complete():
            logger.info("round %d: finished in %s, skipping", r, ctx.round_dir(r))
        else:
            waiting = run_round(ctx, r)
            if waiting is not None:
                write_summary(ctx, count)
                return {"rounds": done, "waiting_for_labels": waiting}
        done.append(str(ctx.round_dir(r)))
    print(write_summary(ctx, count))
    return {"rounds": done, "waiting_for_labels": None}


def run_round(ctx: Context, r: int) -> str | None:
    """One round, continuing whatever an earlier call left; returns the campaign dir if it waits for labels."""
    from rlhf.label.ingest import generate_uncertain
    from rlhf.label.store import Campaign

    a, out = ctx.args, ctx.round_dir(r)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    prev_policy, prev_reward, sft = ctx.policy(r - 1), ctx.reward(r - 1), ctx.outputs["sft"]
    seed = a.seed + 1000 * r
    logger.info("round %d: policy %s, reward model %s -> %s", r, prev_policy, prev_reward, out)

    # 1. Held-out samples of the start policy (the last round's end samples) and of SFT (the same each round).
    for name, source, model in (("start_samples.jsonl", ctx.round_dir(r - 1) / "end_samples.jsonl", prev_policy),
                                ("sft_samples.jsonl", ctx.round_dir(r - 1) / "sft_samples.jsonl", sft)):
        if not (out / name).exists() and r > 1 and source.exists():
            shutil.copyfile(source, out / name)
        sample_file(out / name, model, ctx.eval_prompts, ctx.sampling, a.eval_samples_per_prompt, a.batch_size, a.seed)

    # 2. The campaign: on-policy pairs the reward model is least sure about, plus a random share.
    campaign_dir = out / "campaign"
    if not campaign_dir.exists():
        part = out / "campaign.part"
        shutil.rmtree(part, ignore_errors=True)
        prompts_file = out / "label_prompts.jsonl"
        _write_rows(prompts_file, [{"prompt": p} for p in prompt_slice(ctx.train_prompts, a.label_prompts, r, a.seed)])
        campaign = Campaign.create_or_open(part)
        campaign.set_k(a.k)
        result = generate_uncertain([prev_policy], str(prompts_file), campaign, ctx.sampling, prev_reward, a.budget,
                                    n=a.samples_per_prompt, random_share=a.random_share, batch_size=a.batch_size,
                                    seed=seed)
        logger.info("round %d: campaign %s", r, result.summary())
        os.replace(part, campaign_dir)  # the campaign exists whole or not at all
    campaign = Campaign(campaign_dir)

    # 3. Labels.
    message = label_or_wait(campaign, campaign_dir, a, seed, f"round {r}", "this command")
    if message:
        logger.warning(message)
        print(message)
        return str(campaign_dir)

    # 4. The reward model on all labels so far; this round's random pairs held out to measure it.
    train_file, test_file, labels_file = out / "reward_train.jsonl", out / "reward_test.jsonl", out / "labels.jsonl"
    if not train_file.exists():
        from rlhf.label.export import export_rows

        rows, _ = export_rows(campaign)
        _write_rows(labels_file, rows)
        held_out = [row for row in rows if a.hold_out_random and row.get("chosen_as") == "random"]
        earlier = [row for q in range(1, r) for row in _read_rows(ctx.round_dir(q) / "labels.jsonl")]
        # The pairs the first reward model trained on: the label stage's, or the reward config's own.
        label = ctx.outputs.get("label")
        original_file = (str(Path(label) / "train.jsonl") if label
                         else load_yaml(ctx.configs["reward"]).get("train_file"))
        if not original_file:
            raise UserError(f"{ctx.configs['reward']}: rounds train the reward model on its train_file plus the "
                            "rounds' labels: expected a train_file key, found none")
        original = load_rows(original_file, "preference")
        _write_rows(test_file, held_out)
        _write_rows(train_file, original + earlier + [row for row in rows if row not in held_out])
    reward_dir = out / "reward"
    _run_reward(ctx, reward_dir, train_file, test_file, prev_reward)

    # 5. Both reward models on fresh pairs from the policy this round started from.
    if not (out / "rm_eval.json").exists():
        write_json(out / "rm_eval.json", reward_eval(ctx, out, prev_reward, str(reward_dir)))

    # 6. PPO continues from the start policy against the new reward model; reference and KL stay SFT.
    ppo_dir = out / "ppo"
    _run_ppo(ctx, r, ppo_dir, str(reward_dir), prev_policy)

    # 7. The new policy on held-out prompts, and the round's report.
    end = sample_file(out / "end_samples.jsonl", str(ppo_dir), ctx.eval_prompts, ctx.sampling,
                      a.eval_samples_per_prompt, a.batch_size, a.seed)
    metrics = round_metrics(ctx, r, out, campaign, end, started)
    write_json(out / "metrics.json", metrics)  # written last: the round is complete
    logger.info("round %d: done in %.0f s", r, metrics["wall_seconds"])
    return None


def _run_reward(ctx: Context, reward_dir: Path, train_file: Path, test_file: Path, prev_reward: str) -> None:
    run = RunDir(reward_dir)
    if run.is_complete():
        return
    config: dict[str, Any] = {"config": ctx.configs["reward"], "output_dir": str(reward_dir),
                              "train_file": str(train_file), "max_train_samples": None}
    if _read_rows(test_file):
        config["test_file"] = str(test_file)
    label = ctx.outputs.get("label")
    if label and (Path(label) / "validation.jsonl").exists() and _read_rows(Path(label) / "validation.jsonl"):
        # Early stopping on the same kind of pairs as the first reward model: the SFT policy's own replies.
        config["validation_file"] = str(Path(label) / "validation.jsonl")
    if ctx.model_name_or_path:
        config["model_name_or_path"] = ctx.model_name_or_path
    if ctx.args.reward_max_steps:
        config["max_steps"] = ctx.args.reward_max_steps
    if ctx.args.reward_init == "previous":
        config["warm_start"] = prev_reward  # the adapter and head start from the last round's
    if run.last_checkpoint() is not None:
        config["resume"] = True
    logger.info("reward: running %s", config)
    run_stage("reward", config)


def _run_ppo(ctx: Context, r: int, ppo_dir: Path, reward_dir: str, prev_policy: str) -> None:
    run = RunDir(ppo_dir)
    if run.is_complete():
        return
    config: dict[str, Any] = {
        "config": ctx.configs["ppo"], "output_dir": str(ppo_dir), "sft_model": ctx.outputs["sft"],
        "reward_model": reward_dir, "policy_model": prev_policy,
        "seed": ctx.ppo_seed + r,  # a new prompt order each round
        # PPO's own held-out evaluation gives the report's KL to SFT and reply length (the demo's PPO
        # config turns it off, as make demo evaluates with rlhf eval).
        "eval_prompts": ctx.args.eval_prompts}
    if ctx.args.continue_kl_coef and ctx.kl_controller == "adaptive":
        previous = _read_json(Path(prev_policy) / "metrics.json").get("final_kl_coef")
        if previous is not None:
            config["kl_coef"] = float(previous)
    if ctx.args.ppo_max_steps:
        config["max_steps"] = ctx.args.ppo_max_steps
    if run.last_checkpoint() is not None:
        config["resume"] = True
    logger.info("ppo: running %s", config)
    run_stage("ppo", config)


def reward_eval(ctx: Context, out: Path, before: str, after: str) -> dict:
    """The previous and the new reward model on this round's held-out random pairs (by their labels) and,
    with the demo annotator, on every pair of the start policy's held-out samples (by its noiseless score)."""
    from rlhf.label.annotate import last_user_text
    from rlhf.demo.annotator import annotator_score

    a = ctx.args
    held_out = _read_rows(out / "reward_test.jsonl")
    samples = _read_rows(out / "start_samples.jsonl")
    pairs = [(row["prompt"], row["replies"][i], row["replies"][j]) for row in samples
             for i in range(len(row["replies"])) for j in range(i + 1, len(row["replies"]))]
    report: dict[str, Any] = {"rm_accuracy_pairs": len(held_out)}
    if a.labeler == "annotator":
        truth = [annotator_score(last_user_text(p), x) - annotator_score(last_user_text(p), y) for p, x, y in pairs]
        report["rm_annotator_pairs"] = sum(t != 0 for t in truth)
    for when, reward_dir in (("before", before), ("after", after)):
        if held_out:
            prompts = [row["prompt"] for row in held_out] * 2
            texts = [row["chosen"] for row in held_out] + [row["rejected"] for row in held_out]
            scores = score_texts(reward_dir, prompts, texts, a.batch_size)
            n = len(held_out)
            report[f"rm_accuracy_{when}"] = pair_accuracy([1.0] * n, [c - j for c, j in zip(scores[:n], scores[n:])])
        else:
            report[f"rm_accuracy_{when}"] = None
        if a.labeler == "annotator" and pairs:
            prompts = [p for p, _, _ in pairs] * 2
            scores = score_texts(reward_dir, prompts, [x for _, x, _ in pairs] + [y for _, _, y in pairs],
                                 a.batch_size)
            n = len(pairs)
            report[f"rm_annotator_accuracy_{when}"] = pair_accuracy(truth, [x - y for x, y in zip(scores[:n], scores[n:])])
    return report


def annotator_win_rate(samples: list[dict], sft_samples: list[dict]) -> tuple[float, list[float]]:
    """Win rate against SFT by the demo annotator, and its 95 % interval over prompts: ``rlhf eval``'s
    (every pair of policy and SFT sample per prompt, ties half, mean over prompts)."""
    import numpy as np

    from rlhf.label.annotate import last_user_text
    from rlhf.demo.annotator import annotator_score
    from rlhf.eval.statistics import win_rate_summary

    def scores(rows: list[dict]) -> np.ndarray:  # (prompts, samples per prompt)
        return np.array([[annotator_score(last_user_text(row["prompt"]), reply) for reply in row["replies"]]
                         for row in rows])

    summary = win_rate_summary(scores(samples), scores(sft_samples), n_boot=2000)
    return summary["win_rate"], list(summary["win_rate_ci"])


def round_metrics(ctx: Context, r: int, out: Path, campaign, end: list[dict], started: float) -> dict:
    from rlhf.label.stats import campaign_stats

    stats = campaign_stats(campaign)
    sft_samples = _read_rows(out / "sft_samples.jsonl")
    ppo = _read_json(out / "ppo" / "metrics.json")
    reward = _read_json(out / "reward" / "metrics.json")
    pairs = campaign.pairs()
    return {
        "round": r,
        "labeler": ctx.args.labeler,
        "pairs": len(pairs),
        "uncertain_pairs": sum(p["chosen_as"] == "uncertain" for p in pairs),
        "random_pairs": sum(p["chosen_as"] == "random" for p in pairs),
        "labels": stats["labels"],
        "campaign_rm_accuracy": stats["reward_model_accuracy"],
        **_read_json(out / "rm_eval.json"),
        "reward_train_pairs": reward.get("train_pairs"),
        **dict(zip(("start_win_rate", "start_win_rate_ci"),
                   annotator_win_rate(_read_rows(out / "start_samples.jsonl"), sft_samples))),
        **dict(zip(("win_rate", "win_rate_ci"), annotator_win_rate(end, sft_samples))),
        "kl": ppo.get("eval_policy_kl_to_reference"),
        "final_kl": ppo.get("final_kl"),
        "response_length": ppo.get("eval_policy_response_length"),
        "sft_response_length": ppo.get("eval_reference_response_length"),
        "ppo_steps": ppo.get("steps"),
        "settings": asdict(ctx.args),
        "wall_seconds": round(time.time() - started, 1),
    }


def _fmt(x: Any, percent: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{x:.1%}" if percent else f"{x:.3g}"


def write_summary(ctx: Context, count: int) -> str:
    """``<root>/rounds.md``: one row per finished round (round 0 = the pipeline's PPO); returns the text."""
    rows = []
    first = ctx.round_dir(1) / "metrics.json"
    if first.exists():
        m, ppo0 = _read_json(first), _read_json(Path(ctx.policy(0)) / "metrics.json")
        rows.append(f"| 0 (pipeline) | | | | | {_fmt(m['start_win_rate'], True)} "
                    f"({_fmt(m['start_win_rate_ci'][0], True)}-{_fmt(m['start_win_rate_ci'][1], True)}) | "
                    f"{_fmt(ppo0.get('eval_policy_kl_to_reference'))} | {_fmt(ppo0.get('eval_policy_response_length'))} |")
    for r in range(1, count + 1):
        path = ctx.round_dir(r) / "metrics.json"
        if not path.exists():
            break
        m = _read_json(path)
        rows.append(
            f"| {r} | {m['pairs']} ({m['uncertain_pairs']} uncertain, {m['random_pairs']} random) | "
            f"{_fmt(m['rm_accuracy_before'], True)} -> {_fmt(m['rm_accuracy_after'], True)} "
            f"({m['rm_accuracy_pairs']} pairs) | "
            f"{_fmt(m.get('rm_annotator_accuracy_before'), True)} -> {_fmt(m.get('rm_annotator_accuracy_after'), True)}"
            f" ({m.get('rm_annotator_pairs', 0)} pairs) | {m['wall_seconds']:.0f} s | {_fmt(m['win_rate'], True)} "
            f"({_fmt(m['win_rate_ci'][0], True)}-{_fmt(m['win_rate_ci'][1], True)}) | "
            f"{_fmt(m['kl'])} | {_fmt(m['response_length'])} |")
    text = "\n".join([
        f"# Labeling rounds ({ctx.root})",
        "",
        ("Reward-model accuracy on fresh pairs from the policy each round starts from, before -> after the round "
         "retrains it: on the round's labeled random pairs (held out of its training), and against the noiseless "
         "demo annotator on every pair of that policy's held-out samples. Win rate: the round's policy against SFT "
         "by the demo annotator; KL to SFT and reply length (tokens) on held-out prompts."),
        "",
        ("| round | labeled pairs | RM accuracy, labeled random pairs | RM accuracy, annotator | time | "
         "win rate vs SFT (95 % interval) | KL | reply length |"),
        "|---|---|---|---|---|---|---|---|",
        *rows,
    ]) + "\n"
    part = ctx.root / "rounds.md.part"
    part.write_text(text)
    os.replace(part, ctx.root / "rounds.md")
    return text
