"""``rlhf eval``: one report comparing stage outputs on the same held-out prompts, with the risk checks.

    rlhf eval --runs runs/demo/sft runs/demo/ppo --prompts data/demo/prompts_test.jsonl --out eval/demo \\
        --judges reward:runs/demo/reward,annotator,lexicon --k 4
    rlhf eval forgetting --runs smollm2-135m-instruct runs/demo/ppo --out eval/forgetting
    rlhf eval factual    --runs smollm2-135m-instruct runs/demo/sft runs/demo/ppo --out eval/factual
    rlhf eval bias       --runs runs/demo/sft runs/demo/ppo --judges reward:runs/demo/reward,lexicon --out eval/bias

What it measures (docs/evaluate.md has the details and the reasons):

1. Samples: ``k`` replies per prompt from every run, seeded (the same seed and batch layout for every
   run), with the same sampling settings for all (not each run's own).
2. Win rates against ``--baseline`` per judge: for each prompt, every one of the k x k pairs (run
   sample, baseline sample) is a win, tie (|difference| <= ``--tie_tolerance``) or loss; the prompt's
   win rate is (wins + ties / 2) / k^2, the run's win rate the mean over prompts, with a 95 % percentile
   bootstrap interval over PROMPTS (:func:`bootstrap_ci`). Also the share of prompts won (a prompt whose
   win rate is above 1/2 is won, exactly 1/2 counts half), with its own interval.
3. Per run: judge score distributions, mean KL to ``--reference`` (summed per-token log-ratio of the
   run's own samples, at the sampling temperature), reply length, distinct-1/2, repetition rate, share
   of replies ending with EOS, on-topic rate, held-out perplexity on ``--perplexity_file``.
4. Reward-hacking flags, a side-by-side table of the replies runs disagree on most, and the risk
   checks of :mod:`rlhf.eval.risks` (forgetting, factual drift, bias).

Outputs in ``--out``: report.html (self-contained: PNGs embedded), report.json (every figure),
samples.jsonl (every reply with its scores) and the PNGs.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rlhf.core.config import build_config
from rlhf.core.errors import UserError
from rlhf.core.generation import SamplingArguments
from rlhf.eval.sampling import (Samples, free_memory, perplexity, reference_logprobs, reply_logprobs, run_names,
                                sample_replies, split_prompt_reply, start_token)
from rlhf.eval.statistics import (hacking_flags, judge_agreement, mean_std, text_stats,
                                  widest_disagreement, win_rate_summary)

logger = logging.getLogger(__name__)

SECTIONS = ("quality", "forgetting", "factual", "bias")
SUBCOMMANDS = {"forgetting": ("forgetting",), "factual": ("factual",), "bias": ("bias",)}

__all__ = ["kept_report", "evaluate", "eval_command", "EvalArguments"]


def kept_report(out: Path, names: list[str], k: int) -> dict | None:
    """``out``/report.json when it already evaluated every run in ``names`` with ``k`` samples, else None:
    scripts that rerun (compare_methods, ppo_levers) keep an evaluation that still covers their runs."""
    path = Path(out) / "report.json"
    if not path.exists():
        return None
    report = json.loads(path.read_text())
    return report if set(names) <= set(report["runs"]) and report["settings"]["k"] == k else None


def _reward_stage_metrics(run_dir: str) -> dict | None:
    path = Path(run_dir) / "metrics.json"
    if not path.exists():
        return None
    metrics = json.loads(path.read_text())
    out = {}
    for split in ("test", "validation", "eval"):
        if f"{split}_accuracy" in metrics:
            out = {"split": split, **{k: metrics.get(f"{split}_{k}") for k in
                                      ("accuracy", "mean_margin", "expected_calibration_error", "pairs")}}
            break
    out["calibration_png"] = str(Path(run_dir) / "calibration.png") if (Path(run_dir) / "calibration.png").exists() else None
    return out


def kl_budget(run_dir: str, given: float | None, reference_path: str, sampling) -> tuple[float | None, str | None]:
    """The KL budget a run's measured KL is held against, and why none applies where none does.

    ``--kl_budget`` applies as given. Else a PPO run's own ``kl_target`` (its config.yaml), but only
    where the evaluation measures what PPO's controller held: the KL to the same reference (its
    ``sft_model``), over replies sampled with the same ``max_new_tokens``, temperature and do_sample (KL
    per reply grows with reply length, the log-ratio is taken at the sampling temperature, and greedy
    replies are not the samples PPO's KL was taken over). A fixed KL
    coefficient has no target. Returns ``(budget, note)``: the budget or None, and where a target
    exists but does not compare, a note saying why.
    """
    if given is not None:
        return given, None
    config = Path(run_dir) / "config.yaml"
    if not config.exists():
        return None, None
    from rlhf.core.config import load_yaml

    run = load_yaml(config)
    target = run.get("kl_target")
    if not isinstance(target, (int, float)) or isinstance(target, bool):
        return None, None
    if run.get("kl_controller", "adaptive") == "fixed":
        return None, "kl_controller fixed: the run holds a KL coefficient, not a KL target; nothing to compare"
    sft = run.get("sft_model")
    if not sft or Path(sft).resolve() != Path(reference_path).resolve():
        return None, (f"kl_target {target:g} is the KL to {sft}, this evaluation measures the KL to "
                      f"{reference_path}: not compared (pass --reference {sft})")
    for key in ("max_new_tokens", "temperature", "do_sample"):
        if key in run and float(run[key]) != float(getattr(sampling, key)):
            return None, (f"kl_target {target:g} holds for replies sampled with {key} {run[key]}, this evaluation "
                          f"samples with {getattr(sampling, key)}: not compared (pass --{key} {run[key]})")
    return float(target), None


def _resolve_data(path: str | None, default: Path) -> Path | None:
    """A data file given or the shipped default; a given path that does not exist is an error."""
    if path is None:
        return default if default.exists() else None
    if not Path(path).exists():
        raise UserError(f"{path}: no such file")
    return Path(path)


def evaluate(args: EvalArguments, sampling: SamplingArguments, sections: tuple[str, ...] = SECTIONS) -> dict:
    """Run the evaluation described by the parsed command line; write the outputs; return report.json's dict.

    ``sampling``: how every run's replies are sampled (the same for all); its temperature is also the
    temperature of the KL's log-probabilities."""
    from rlhf.core.data import load_rows
    from rlhf.core.formatting import encode_prompt, encode_prompt_reply, prompt_text
    from rlhf.core.generation import load_for_generation
    from rlhf.eval.judges import lexicon_sentiment, parse_judges
    from rlhf.eval.risks import (BIAS_PAIRS, GENERAL_TEXT, QA_FILE, factual_drift, forgetting_status,
                            qa_answers, read_bias_pairs, read_qa)

    started = time.time()
    if args.k < 1:
        raise UserError(f"--k: expected at least 1, found {args.k}")
    paths = list(args.runs)
    names = run_names(paths)
    baseline_path = args.baseline or paths[0]
    if baseline_path not in paths:
        paths.append(baseline_path)
        names = run_names(paths)
    baseline = names[paths.index(baseline_path)]
    reference_path = args.reference or baseline_path
    from rlhf.core.runs import read_run

    infos = {name: read_run(path) for name, path in zip(names, paths)}  # one-line errors before any loading
    for name, info in infos.items():
        if info.task == "seq-cls":
            raise UserError(f"--runs: expected causal LMs (base, SFT, PPO, ... outputs), found {info.describe()} "
                            f"in {info.path}; give a reward run with --judges reward:{info.path}")

    quality = "quality" in sections
    prompts = [r["prompt"] for r in load_rows(args.prompts, "prompt")] if quality else []
    if quality and not prompts:
        raise UserError(f"{args.prompts}: expected prompt rows, found none")
    device = args.device or ("cuda" if torch.cuda.is_available() else None)
    judges = parse_judges(args.judges, args.batch_size, device) if quality or "bias" in sections else []
    perplexity_file = _resolve_data(args.perplexity_file, Path("data/demo/sft_test.jsonl")) if quality else None
    ppl_rows = load_rows(perplexity_file, "sft") if perplexity_file else []
    need_qa = "forgetting" in sections or "factual" in sections
    general_rows = load_rows(_resolve_data(args.general_text, GENERAL_TEXT), "sft") if "forgetting" in sections else []
    qa = read_qa(_resolve_data(args.qa_file, QA_FILE)) if need_qa else []
    pairs = read_bias_pairs(_resolve_data(args.bias_pairs, BIAS_PAIRS)) if "bias" in sections else []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # 1. Each run, one at a time (one model in memory): samples, own logprobs, perplexities, QA, bias replies.
    # The reference goes last, so its pass can also score every other run's samples (no second load).
    order = sorted(range(len(paths)), key=lambda i: paths[i] == reference_path)
    samples: dict[str, Samples] = {}
    bias_samples: dict[str, tuple[Samples, Samples]] = {}
    per_run: dict[str, dict] = {name: {"path": paths[names.index(name)], "what": infos[name].describe()} for name in names}
    qa_choice_scores: dict[str, list[list[float]]] = {}
    reference_loaded = False
    for i in order:
        name, path = names[i], paths[i]
        logger.info("evaluating %s (%s)", name, path)
        model, tokenizer = load_for_generation(path, device)
        pad = tokenizer.pad_token_id
        row = per_run[name]
        if quality:
            s = sample_replies(model, tokenizer, prompts, sampling, args.k, args.generation_batch_size, args.seed,
                               desc=f"generating {name}")
            if path == reference_path:
                # The reference's own samples (or a copy's: same weights, same forward): the KL is 0
                # by definition, so neither log-probability pass is run.
                s.logprobs, s.reference_logprobs = np.zeros((len(prompts), args.k)), np.zeros((len(prompts), args.k))
            else:
                seqs = [(s.prompt_ids[p], ids) for p in range(len(prompts)) for ids in s.reply_ids[p]]
                lp = reply_logprobs(model, pad, seqs, sampling.temperature, args.batch_size, desc=f"logprobs {name}")
                s.logprobs = np.array([v for v, _ in lp]).reshape(len(prompts), args.k)
            samples[name] = s
            if ppl_rows:
                pairs_ppl = [tuple(split_prompt_reply(encode_prompt_reply(tokenizer, r["prompt"], r["completion"])))
                             for r in ppl_rows]
                row["heldout_perplexity"] = perplexity(reply_logprobs(model, pad, pairs_ppl, 1.0, args.batch_size))
                row["heldout_perplexity_file"] = str(perplexity_file)
        if "forgetting" in sections:
            seqs = [(start_token(tokenizer), tokenizer(r["text"], add_special_tokens=False)["input_ids"][: args.max_length])
                    for r in general_rows]
            row["general_perplexity"] = perplexity(reply_logprobs(model, pad, seqs, 1.0, args.batch_size,
                                                                   desc=f"general text {name}"))
        if need_qa:
            seqs = [(encode_prompt(tokenizer, q["question"]), tokenizer(c, add_special_tokens=False)["input_ids"])
                    for q in qa for c in q["choices"]]
            lp = iter(reply_logprobs(model, pad, seqs, 1.0, args.batch_size, desc=f"QA {name}"))
            # Mean logprob per token: summed logprobs would favour the shortest choice.
            qa_choice_scores[name] = [[(lambda v: v[0] / max(v[1], 1))(next(lp)) for _ in q["choices"]] for q in qa]
            answers = qa_answers(qa_choice_scores[name])
            row["qa_accuracy"] = float(np.mean([a == q["answer"] for a, q in zip(answers, qa)]))
        if "bias" in sections:
            a = sample_replies(model, tokenizer, [p["a"] for p in pairs], sampling, args.bias_k,
                               args.generation_batch_size, args.seed, desc=f"bias replies (a) {name}")
            b = sample_replies(model, tokenizer, [p["b"] for p in pairs], sampling, args.bias_k,
                               args.generation_batch_size, args.seed, desc=f"bias replies (b) {name}")
            bias_samples[name] = (a, b)
        if quality and path == reference_path and i == order[-1]:  # its last pass, once every sample exists
            reference_loaded = True
            reference_logprobs(model, pad, samples, sampling.temperature, args.batch_size)
        del model
        free_memory()
    if quality and not reference_loaded:
        model, tokenizer = load_for_generation(reference_path, device)
        reference_logprobs(model, tokenizer.pad_token_id, samples, sampling.temperature, args.batch_size)
        del model
        free_memory()

    # 2. Judges: every run's samples (and bias replies) in one call per judge, one judge in memory at a time.
    for judge in judges:
        rows_p, rows_r, slots = [], [], []
        for name, s in samples.items():
            for p in range(len(prompts)):
                rows_p += [prompts[p]] * args.k
                rows_r += s.texts[p]
            slots.append((s, len(prompts), args.k))
        for name, (a, b) in bias_samples.items():
            for side, s in (("a", a), ("b", b)):
                for p, pair in enumerate(pairs):
                    rows_p += [pair[side]] * args.bias_k
                    rows_r += s.texts[p]
                slots.append((s, len(pairs), args.bias_k))
        scores = iter(judge.score(rows_p, rows_r, progress=True))
        for s, n, k in slots:
            s.scores[judge.name] = np.array([next(scores) for _ in range(n * k)]).reshape(n, k)
        judge.close()

    # 3. Figures.
    report: dict = {"runs": per_run, "baseline": baseline, "reference": names[paths.index(reference_path)]
                    if reference_path in paths else reference_path,
                    "settings": {"k": args.k, "seed": args.seed, "prompts_file": args.prompts if quality else None,
                                 "prompts": len(prompts), "judges": [j.name for j in judges],
                                 "sampling": vars(sampling), "tie_tolerance": args.tie_tolerance,
                                 "bootstrap": args.bootstrap, "sections": list(sections),
                                 "comparison": "all k x k sample pairs per prompt"},
                    "status": {}}
    if quality:
        _quality_figures(report, args, names, baseline, prompts, samples, judges, reference_path, sampling)
        for judge in judges:
            if judge.kind == "reward" and judge.run_dir:
                report.setdefault("reward_stage", {})[judge.name] = _reward_stage_metrics(judge.run_dir)
    if "forgetting" in sections:
        checks = {name: forgetting_status(per_run[baseline], per_run[name], args.perplexity_threshold,
                                          args.accuracy_threshold) for name in names if name != baseline}
        report["forgetting"] = {"baseline": baseline, "perplexity_threshold": args.perplexity_threshold,
                                "accuracy_threshold": args.accuracy_threshold, "general_text": len(general_rows),
                                "questions": len(qa), "runs": checks}
        report["status"]["forgetting"] = "red" if any(c["status"] == "red" for c in checks.values()) else "green"
    if "factual" in sections:
        report["factual"] = factual_drift(qa, {n: qa_answers(qa_choice_scores[n]) for n in names}, baseline)
        report["factual"]["accuracy"] = {n: per_run[n]["qa_accuracy"] for n in names}
    if "bias" in sections:
        report["bias"] = _bias_figures(args, names, pairs, bias_samples, judges, lexicon_sentiment)
        report["status"]["bias"] = "red" if any(m["significant"] for r in report["bias"]["runs"].values()
                                                for m in r.values()) else "green"
    statuses = report["status"].values()
    report["status"]["overall"] = ("red" if "red" in statuses else "amber" if "amber" in statuses else "green")
    report["wall_seconds"] = time.time() - started

    from rlhf.eval.report import write_report

    write_report(out, report, samples, prompts, prompt_text)
    return report


def _quality_figures(report: dict, args, names: list[str], baseline: str, prompts: list, samples: dict[str, Samples],
                     judges: list, reference_path: str, sampling) -> None:
    from rlhf.core.formatting import prompt_text

    texts = [prompt_text(p) for p in prompts]
    runs = report["runs"]
    for name in names:
        s = samples[name]
        runs[name].update(text_stats(texts, s.texts, s.ended_with_eos))
        kl = s.logprobs - s.reference_logprobs  # (n, k) k1 estimate of KL(run || reference) per reply, nats
        runs[name]["kl_to_reference"] = float(kl.mean())
        runs[name]["kl_to_reference_std"] = float(kl.std())
        runs[name]["scores"] = {j.name: mean_std(s.scores[j.name]) for j in judges}
    report["win_rates"] = {name: {j.name: win_rate_summary(samples[name].scores[j.name], samples[baseline].scores[j.name],
                                                           args.tie_tolerance, args.bootstrap, args.seed)
                                  for j in judges}
                           for name in names if name != baseline}
    reward_judges = [j.name for j in judges if j.kind == "reward"]
    independent = [j.name for j in judges if j.kind in ("lexicon", "function")] or \
                  [j.name for j in judges if j.kind == "annotator"]
    flags = {}
    for name in names:
        if name == baseline:
            continue
        budget, note = kl_budget(runs[name]["path"], args.kl_budget, reference_path, sampling)
        runs[name]["kl_budget"] = budget
        if note:
            runs[name]["kl_budget_note"] = note
        flags[name] = hacking_flags(runs[name], runs[baseline], report["win_rates"][name], reward_judges, independent,
                                    budget, args.length_tolerance)
    report["hacking_flags"] = flags
    report["status"]["reward_hacking"] = "amber" if any(flags.values()) else "green"
    # Over every run's replies to each prompt: do the judges order them alike (a reward model's
    # accuracy on the policies' own replies, against each other judge)?
    pooled = {j.name: np.concatenate([samples[n].scores[j.name] for n in names], axis=1) for j in judges}
    ordered = list(itertools.combinations(sorted(judges, key=lambda j: j.kind != "reward"), 2))
    report["judge_agreement"] = [
        {"judge": a.name, "other": b.name, **judge_agreement(pooled[a.name], pooled[b.name], args.tie_tolerance)}
        for a, b in ordered]
    # The same per run: a reward model may order SFT's replies like the labeler and drift on PPO's.
    report["judge_agreement_by_run"] = {
        name: [{"judge": a.name, "other": b.name,
                **judge_agreement(samples[name].scores[a.name], samples[name].scores[b.name], args.tie_tolerance)}
               for a, b in ordered]
        for name in names}
    # Side by side: the prompts on which the first judge's per-run mean scores differ most.
    primary = judges[0].name
    chosen = widest_disagreement({n: samples[n].scores[primary].mean(axis=1) for n in names}, args.examples)
    report["examples"] = {"judge": primary, "rows": [
        {"prompt": texts[p], "replies": {n: {"text": samples[n].texts[p][0],
                                             "scores": {j.name: float(samples[n].scores[j.name][p, 0]) for j in judges},
                                             "mean_score": float(samples[n].scores[primary][p].mean())}
                                         for n in names}} for p in chosen]}


def _bias_figures(args, names: list[str], pairs: list[dict], bias_samples: dict, judges: list, sentiment) -> dict:
    from rlhf.eval.risks import bias_gaps

    metrics = [j.name for j in judges] + ["sentiment", "reply_length"]
    result = {"pairs": len(pairs), "k": args.bias_k, "alpha": 0.05, "metrics": metrics,
              "test": "Wilcoxon signed-rank over pairs (scipy, zero_method=zsplit), Bonferroni over metrics",
              "runs": {}}
    for name in names:
        a, b = bias_samples[name]
        values = {}
        for j in judges:
            values[j.name] = (a.scores[j.name], b.scores[j.name])
        values["sentiment"] = tuple(np.array([[sentiment(r) for r in rs] for rs in s.texts]) for s in (a, b))
        values["reply_length"] = tuple(np.array([[len(r.split()) for r in rs] for rs in s.texts], float) for s in (a, b))
        result["runs"][name] = {m: bias_gaps(va, vb, pairs, args.examples, 0.05, len(metrics))
                                for m, (va, vb) in values.items()}
    return result


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


@dataclass
class EvalArguments:
    """Settings of ``rlhf eval`` and of its single checks (``rlhf eval forgetting|factual|bias``)."""

    runs: list[str]
    """Stage outputs to compare (a base model dir or name, SFT, PPO, ... run dirs): --runs a b c."""
    out: str
    """Output directory (report.html, report.json, samples.jsonl, PNGs)."""
    prompts: str | None = None
    """Held-out prompts (rows with a 'prompt' field); needed by the full report, not by the single checks."""
    baseline: str | None = None
    """The run every other run is compared with (null = the first of runs)."""
    judges: str = "annotator,lexicon"
    """Comma-separated: reward:<run dir> (or a bare reward run dir), annotator, lexicon, module:function
    (function(prompt: str, reply: str) -> float)."""
    k: int = 4
    """Samples per prompt."""
    seed: int = 0
    """Sampling seed (the same for every run) and bootstrap seed."""
    reference: str | None = None
    """The run the KL is measured against (null = the baseline)."""
    kl_budget: float | None = None
    """Flag runs whose mean KL (nats per reply) exceeds this (null = a PPO run's own kl_target, where it
    was measured the same way)."""
    length_tolerance: float = 0.25
    """Flag replies longer than (1 + this) x the baseline's."""
    tie_tolerance: float = 1e-6
    """Score differences up to this are ties."""
    bootstrap: int = 10_000
    """Bootstrap resamples (over prompts)."""
    examples: int = 6
    """Rows in the side-by-side table and largest bias gaps listed."""
    perplexity_file: str | None = None
    """Held-out SFT rows for perplexity (null = data/demo/sft_test.jsonl if present)."""
    general_text: str | None = None
    """General text for the forgetting check (null = the shipped data/eval file)."""
    qa_file: str | None = None
    """Multiple-choice QA for forgetting and factual drift (null = the shipped data/eval file)."""
    bias_pairs: str | None = None
    """Counterfactual prompt pairs (null = the shipped data/eval/bias_pairs.jsonl)."""
    bias_k: int = 2
    """Samples per side of each bias pair."""
    perplexity_threshold: float = 0.10
    """Forgetting turns red when general-text perplexity rises by more than this share (0.10 = +10 %)."""
    accuracy_threshold: float = 0.10
    """Forgetting turns red when QA accuracy falls by more than this (0.10 = 10 points)."""
    skip: str = ""
    """Comma-separated checks to leave out of the full report: forgetting, factual, bias."""
    batch_size: int = 16
    """Sequences per forward pass of the log-probability and scoring passes."""
    generation_batch_size: int = 64
    """Replies sampled per generate call. Decoding a small batch is bound by each step's fixed cost,
    not by arithmetic: on a 2-core CPU 64 a call took 0.65x the time per token of 16 a call
    (bench/bench_generation.py). The seeded samples depend on it (every run is sampled with the same
    value)."""
    max_length: int = 512
    """General-text documents are cut to this many tokens."""
    device: str | None = None
    """Where the models run (null = cuda when available, else the CPU)."""
    strict: bool = False
    """Exit with status 3 when the overall status is red."""


def eval_command(argv: list[str], commands: dict[str, str] | None = None) -> int:
    """``rlhf eval [forgetting|factual|bias] --runs ... --out ...``; ``commands``: the other subcommands
    ``rlhf eval`` dispatches (canaries), listed in the help."""
    sections = SECTIONS
    prog = "rlhf eval"
    if argv[:1] and argv[0] in SUBCOMMANDS:
        sections, prog = SUBCOMMANDS[argv[0]], f"rlhf eval {argv[0]}"
        argv = argv[1:]
    listed = None if prog != "rlhf eval" else {**{name: f"the {name} check alone" for name in SUBCOMMANDS},
                                                **(commands or {})}
    (args, sampling), _ = build_config([EvalArguments, SamplingArguments], argv, prog=prog, commands=listed,
                              description="One report comparing stage outputs on the same held-out prompts, with "
                                          "the risk checks; docs/evaluate.md explains every figure.")
    if sections == SECTIONS and not args.prompts:
        raise UserError("prompts: expected a file of held-out prompts (--prompts FILE), found none")
    if sections == SECTIONS and args.skip:
        skip = {s.strip() for s in args.skip.split(",") if s.strip()}
        unknown = skip - set(SECTIONS[1:])
        if unknown:
            raise UserError(f"--skip: expected some of forgetting, factual, bias, found {', '.join(sorted(unknown))}")
        sections = tuple(s for s in SECTIONS if s not in skip)
    report = evaluate(args, sampling, sections)
    _print_summary(report)
    print(f"report -> {Path(args.out) / 'report.html'}")
    return 3 if args.strict and report["status"]["overall"] == "red" else 0


def _print_summary(report: dict) -> None:
    for name, judges in report.get("win_rates", {}).items():
        for judge, w in judges.items():
            lo, hi = w["win_rate_ci"]
            print(f"{name} vs {report['baseline']} ({judge}): win rate {w['win_rate']:.3f} [{lo:.3f}, {hi:.3f}], "
                  f"ties {w['ties']:.3f}, prompts won {w['prompt_win_rate']:.3f}")
    for name, flags in report.get("hacking_flags", {}).items():
        for f in flags:
            print(f"flag {name}: {f['flag']}: {f['detail']}")
    for name, run in report.get("runs", {}).items():
        if run.get("kl_budget_note"):
            print(f"KL of {name}: {run['kl_budget_note']}")
    for a in report.get("judge_agreement", []):
        if a["agreement"] is not None:
            print(f"{a['judge']} orders same-prompt replies as {a['other']} does on {a['agreement']:.1%} of "
                  f"{a['pairs']} pairs")
    for section, status in report["status"].items():
        print(f"status {section}: {status}")
