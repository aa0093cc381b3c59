"""``rlhf label``: collect human preference labels for the reward model (docs/labeling.md).

    rlhf label import candidates.jsonl --out runs/label/demo
    rlhf label generate --model runs/sft --prompts data/demo/prompts.jsonl --n 2 --out runs/label/demo
    rlhf label generate --model runs/sft --model runs/ppo --prompts data/demo/prompts.jsonl --n 2 \
        --select uncertain --reward_model runs/reward --budget 64 --out runs/label/round1
    rlhf label serve runs/label/demo --k 2                      # open http://127.0.0.1:8000/
    rlhf label serve runs/label/demo --host 0.0.0.0 --tokens tokens.txt
    rlhf label stats runs/label/demo                            # also writes runs/label/demo/stats.png
    rlhf label export runs/label/demo --out data/labeled_pairs.jsonl
    rlhf label annotate runs/label/demo --noise 0.25             # the demo annotator labels (no people)

``python -m rlhf.label ...`` runs the same commands.
"""

from __future__ import annotations

import argparse
import json
import sys

from rlhf.core.data import write_jsonl
from rlhf.core.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf label", description="Collect human preference labels.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("import", help="add prompts with 2+ candidate replies from a file to a campaign")
    p.add_argument("file", help="JSONL/JSON/CSV/Parquet rows: prompt + responses (list) or response_a/response_b")
    p.add_argument("--out", required=True, help="campaign directory (created if missing, else added to)")
    _add_pairing_args(p)
    p.set_defaults(run=_import)

    p = commands.add_parser("generate", help="sample candidate replies from a model into a campaign")
    p.add_argument("--model", required=True, action="append",
                   help="any stage's output directory, a model directory or hub id; repeat to sample from several")
    p.add_argument("--prompts", required=True, help="rows with a 'prompt' (string or chat messages)")
    p.add_argument("--out", required=True, help="campaign directory (created if missing, else added to)")
    p.add_argument("--n", type=int, default=2, help="replies sampled per prompt from each model (default 2)")
    p.add_argument("--select", choices=("all", "uncertain"), default="all",
                   help="all: every pair of new replies; uncertain: the --budget pairs the --reward_model is least "
                        "sure about (smallest |score margin|) plus a random share (default all)")
    p.add_argument("--reward_model", help="with --select uncertain: the reward stage output that scores the pairs")
    p.add_argument("--budget", type=int, help="with --select uncertain: how many pairs to keep")
    p.add_argument("--random_share", type=float, default=0.2,
                   help="with --select uncertain: share of the budget drawn at random from all candidate pairs, "
                        "for an unbiased accuracy estimate (default 0.2)")
    p.add_argument("--batch_size", type=int, default=8, help="sequences per generate call (default 8)")
    # None = the value of rlhf.core.generation.SamplingArguments, imported only when generating.
    p.add_argument("--max_new_tokens", type=int, help="longest reply in tokens (default: the toolkit's)")
    p.add_argument("--temperature", type=float, help="softmax temperature (default: the toolkit's)")
    p.add_argument("--top_k", type=int, help="keep the k most likely tokens, 0 = off (default: the toolkit's)")
    p.add_argument("--top_p", type=float, help="nucleus sampling mass, 1.0 = off (default: the toolkit's)")
    _add_pairing_args(p)
    p.set_defaults(run=_generate)

    p = commands.add_parser("serve", help="run the labeling web app")
    p.add_argument("campaign")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1); any non-loopback address requires --tokens")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--k", type=int, help="different annotators per pair; stored in the campaign (default: stored, 1)")
    p.add_argument("--tokens", help="file of 'name:token' lines: annotators sign in with their token")
    p.set_defaults(run=_serve)

    p = commands.add_parser("annotate", help="let the demo annotator (rlhf/demo/annotator.py) label a campaign")
    p.add_argument("campaign")
    p.add_argument("--noise", type=float, default=0.25,
                   help="Bradley-Terry temperature of its choices, 0 = always the higher score (default 0.25)")
    p.add_argument("--k", type=int, help="labels wanted per pair (default: the campaign's)")
    p.add_argument("--seed", type=int, default=0, help="seed of its choices (default 0)")
    p.set_defaults(run=_annotate)

    p = commands.add_parser("stats", help="counts, time per label, agreement, position bias, and a PNG")
    p.add_argument("campaign")
    p.add_argument("--png", help="where to save the plot (default CAMPAIGN/stats.png)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(run=_stats)

    p = commands.add_parser("export", help="write majority-vote prompt/chosen/rejected rows for `rlhf reward`")
    p.add_argument("campaign")
    p.add_argument("--out", required=True, help="JSONL file to write")
    p.add_argument("--min_votes", type=int, default=1, help="leave out pairs with fewer labels (default 1)")
    p.set_defaults(run=_export)
    return parser


def _add_pairing_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max_pairs_per_prompt", type=int,
                   help="with 3+ replies, keep this many of a prompt's new pairs, sampled (default: all pairs)")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling replies, pairs and their order (default 0)")


def _import(args) -> int:
    from rlhf.label.ingest import import_responses
    from rlhf.label.store import Campaign

    _check_max_pairs(args.max_pairs_per_prompt)
    campaign = Campaign.create_or_open(args.out)
    result = import_responses(args.file, campaign, args.max_pairs_per_prompt, args.seed)
    print(f"{campaign.path}: {result.summary()}")
    return 0


def _generate(args) -> int:
    from rlhf.label.ingest import generate_responses
    from rlhf.label.store import Campaign
    from rlhf.core.generation import SamplingArguments

    _check_max_pairs(args.max_pairs_per_prompt)
    uncertain = args.select == "uncertain"
    for flag in ("reward_model", "budget"):
        if uncertain and getattr(args, flag) is None:
            raise UserError(f"--select uncertain: expected --{flag}, found none")
        if not uncertain and getattr(args, flag) is not None:
            raise UserError(f"--{flag}: only used with --select uncertain, found --select {args.select}")
    if uncertain and args.max_pairs_per_prompt is not None:
        raise UserError("--max_pairs_per_prompt: not used with --select uncertain (--budget limits the pairs)")
    given = {name: getattr(args, name) for name in ("max_new_tokens", "temperature", "top_k", "top_p")}
    sampling = SamplingArguments(**{name: value for name, value in given.items() if value is not None})
    if uncertain:
        from rlhf.label.ingest import check_reward_model, generate_uncertain

        # Checked before the campaign is created, so a bad flag leaves nothing behind.
        if args.budget < 1 or not 0 <= args.random_share <= 1:
            raise UserError(f"--budget/--random_share: expected at least 1 pair and a share from 0 to 1, found "
                            f"{args.budget} and {args.random_share}")
        check_reward_model(args.reward_model)
        campaign = Campaign.create_or_open(args.out)
        result = generate_uncertain(args.model, args.prompts, campaign, sampling, args.reward_model, args.budget,
                                    n=args.n, random_share=args.random_share, batch_size=args.batch_size,
                                    seed=args.seed)
    else:
        campaign = Campaign.create_or_open(args.out)
        result = generate_responses(args.model, args.prompts, campaign, sampling, n=args.n,
                                    batch_size=args.batch_size, seed=args.seed,
                                    max_pairs_per_prompt=args.max_pairs_per_prompt)
    print(f"{campaign.path}: {result.summary()}")
    return 0


def _check_max_pairs(value: int | None) -> None:
    if value is not None and value < 1:
        raise UserError(f"--max_pairs_per_prompt: expected at least 1, found {value}")


def _serve(args) -> int:
    from rlhf.label.app import serve
    from rlhf.label.store import Campaign

    serve(Campaign(args.campaign), args.host, args.port, args.k, args.tokens)
    return 0


def _annotate(args) -> int:
    from rlhf.label.annotate import ANNOTATOR, annotate_campaign
    from rlhf.label.store import Campaign

    if args.noise < 0:
        raise UserError(f"--noise: expected a number >= 0, found {args.noise}")
    if args.k is not None and args.k < 1:
        raise UserError(f"--k: expected at least 1, found {args.k}")
    campaign = Campaign(args.campaign)
    stored = annotate_campaign(campaign, args.noise, args.seed, k=args.k)
    print(f"{campaign.path}: {ANNOTATOR} stored {stored} label(s)")
    return 0


def _stats(args) -> int:
    from rlhf.label.stats import campaign_stats, format_stats, plot_stats
    from rlhf.label.store import Campaign

    campaign = Campaign(args.campaign)
    report = campaign_stats(campaign)
    png = args.png or str(campaign.path / "stats.png")
    plot_stats(report, png)
    print(json.dumps(report, indent=2) if args.json else format_stats(report) + f"\nplot: {png}")
    return 0


def _export(args) -> int:
    from rlhf.label.export import export_rows
    from rlhf.label.store import Campaign

    campaign = Campaign(args.campaign)
    rows, left_out = export_rows(campaign, args.min_votes)
    if not rows:
        raise UserError(f"{campaign.path}: expected at least one pair whose majority prefers one reply, found none "
                        f"({len(campaign.labels())} labels; left out: {dict(left_out) or 'nothing'})")
    write_jsonl(args.out, rows)
    dropped = ", ".join(f"{n} {reason}" for reason, n in sorted(left_out.items())) or "none"
    print(f"wrote {len(rows)} preference rows to {args.out}; labeled pairs left out: {dropped}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
