"""``rlhf label``: collect human preference labels for the reward model (docs/labeling.md).

    rlhf label import candidates.jsonl --out runs/label/demo     # FILE first: short for --file FILE
    rlhf label generate --model runs/sft --prompts data/demo/prompts.jsonl --n 2 --out runs/label/demo
    rlhf label generate --model runs/sft runs/ppo --prompts data/demo/prompts.jsonl --n 2 \
        --select uncertain --reward_model runs/reward --budget 64 --out runs/label/round1
    rlhf label serve runs/label/demo --k 2                      # open http://127.0.0.1:8000/
    rlhf label serve runs/label/demo --host 0.0.0.0 --tokens tokens.txt
    rlhf label stats runs/label/demo                            # also writes runs/label/demo/stats.png
    rlhf label export runs/label/demo --out data/labeled_pairs.jsonl
    rlhf label annotate runs/label/demo --noise 0.25             # the demo annotator labels (no people)
    rlhf label run --config configs/label.yaml --sft_model runs/demo/sft   # the label stage of the pipeline

Every subcommand takes ``--key value`` and ``--config file.yaml``, and ``--help`` lists its keys; the
campaign directory may come first without its key (``rlhf label serve DIR`` = ``--campaign DIR``).
``python -m rlhf.label ...`` runs the same commands.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

from rlhf.core.config import build_config, run_command
from rlhf.core.data import write_jsonl
from rlhf.core.errors import UserError

DESCRIPTION = "Collect human preference labels for the reward model (docs/labeling.md)."


@dataclass
class PairingArguments:
    """How new replies become pairs (import, generate)."""

    max_pairs_per_prompt: int | None = None
    """With 3+ replies, keep this many of a prompt's new pairs, sampled (null = all pairs)."""
    seed: int = 0
    """Seed for sampling replies, pairs and their order."""


@dataclass
class ImportArguments:
    """Settings of ``rlhf label import``."""

    file: str
    """JSONL/JSON/CSV/Parquet rows: prompt + responses (a list) or response_a/response_b."""
    out: str
    """Campaign directory (created if missing, else added to)."""


@dataclass
class GenerateArguments:
    """Settings of ``rlhf label generate`` besides sampling and pairing."""

    model: list[str]
    """Any stage's output directory, a model directory or hub id; several to sample from each (--model a b)."""
    prompts: str
    """Rows with a 'prompt' (a string or chat messages)."""
    out: str
    """Campaign directory (created if missing, else added to)."""
    n: int = 2
    """Replies sampled per prompt from each model."""
    select: str = "all"
    """all: every pair of new replies; uncertain: the budget pairs the reward_model is least sure about
    (smallest |score margin|) plus a random share."""
    reward_model: str | None = None
    """With select uncertain: the reward stage output that scores the pairs."""
    budget: int | None = None
    """With select uncertain: how many pairs to keep."""
    random_share: float = 0.2
    """With select uncertain: share of the budget drawn at random from all candidate pairs, for an unbiased
    accuracy estimate."""
    batch_size: int = 8
    """Sequences per generate call."""


@dataclass
class CampaignArguments:
    """The campaign a command works on."""

    campaign: str
    """A campaign directory (rlhf label import/generate made it)."""


@dataclass
class ServeArguments:
    """Settings of ``rlhf label serve``."""

    host: str = "127.0.0.1"
    """Address to bind; any non-loopback address requires tokens."""
    port: int = 8000
    """Port."""
    k: int | None = None
    """Different annotators per pair; stored in the campaign (null = the stored value, else 1)."""
    tokens: str | None = None
    """File of 'name:token' lines: annotators sign in with their token."""


@dataclass
class AnnotateArguments:
    """Settings of ``rlhf label annotate``."""

    noise: float = 0.25
    """Bradley-Terry temperature of the demo annotator's choices, 0 = always the higher score."""
    k: int | None = None
    """Labels wanted per pair (null = the campaign's)."""
    seed: int = 0
    """Seed of its choices."""


@dataclass
class StatsArguments:
    """Settings of ``rlhf label stats``."""

    png: str | None = None
    """Where to save the plot (null = CAMPAIGN/stats.png)."""
    json: bool = False
    """Print the report as JSON."""


@dataclass
class ExportArguments:
    """Settings of ``rlhf label export``."""

    out: str
    """JSONL file to write."""
    min_votes: int = 1
    """Leave out pairs with fewer labels."""


def _parse(name: str, classes: list[type], argv: list[str], description: str,
           positional: tuple[str, ...] = ()) -> list:
    instances, _ = build_config(classes, argv, prog=f"rlhf label {name}", description=description,
                                positional=positional)
    return instances


def _import(argv: list[str]) -> int:
    from rlhf.label.ingest import import_responses
    from rlhf.label.store import Campaign

    args, pairing = _parse("import", [ImportArguments, PairingArguments], argv, COMMANDS["import"][1],
                           positional=("file",))
    _check_max_pairs(pairing.max_pairs_per_prompt)
    campaign = Campaign.create_or_open(args.out)
    result = import_responses(args.file, campaign, pairing.max_pairs_per_prompt, pairing.seed)
    print(f"{campaign.path}: {result.summary()}")
    return 0


def _generate(argv: list[str]) -> int:
    from rlhf.core.generation import SamplingArguments
    from rlhf.label.ingest import generate_responses
    from rlhf.label.store import Campaign

    args, sampling, pairing = _parse("generate", [GenerateArguments, SamplingArguments, PairingArguments], argv,
                                     COMMANDS["generate"][1])
    _check_max_pairs(pairing.max_pairs_per_prompt)
    if args.select not in ("all", "uncertain"):
        raise UserError(f"--select: expected all or uncertain, found {args.select!r}")
    uncertain = args.select == "uncertain"
    for flag in ("reward_model", "budget"):
        if uncertain and getattr(args, flag) is None:
            raise UserError(f"--select uncertain: expected --{flag}, found none")
        if not uncertain and getattr(args, flag) is not None:
            raise UserError(f"--{flag}: only used with --select uncertain, found --select {args.select}")
    if uncertain and pairing.max_pairs_per_prompt is not None:
        raise UserError("--max_pairs_per_prompt: not used with --select uncertain (--budget limits the pairs)")
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
                                    seed=pairing.seed)
    else:
        campaign = Campaign.create_or_open(args.out)
        result = generate_responses(args.model, args.prompts, campaign, sampling, n=args.n,
                                    batch_size=args.batch_size, seed=pairing.seed,
                                    max_pairs_per_prompt=pairing.max_pairs_per_prompt)
    print(f"{campaign.path}: {result.summary()}")
    return 0


def _check_max_pairs(value: int | None) -> None:
    if value is not None and value < 1:
        raise UserError(f"--max_pairs_per_prompt: expected at least 1, found {value}")


def _serve(argv: list[str]) -> int:
    from rlhf.label.app import serve
    from rlhf.label.store import Campaign

    where, args = _parse("serve", [CampaignArguments, ServeArguments], argv, COMMANDS["serve"][1],
                         positional=("campaign",))
    serve(Campaign(where.campaign), args.host, args.port, args.k, args.tokens)
    return 0


def _annotate(argv: list[str]) -> int:
    from rlhf.label.annotate import ANNOTATOR, annotate_campaign
    from rlhf.label.store import Campaign

    where, args = _parse("annotate", [CampaignArguments, AnnotateArguments], argv, COMMANDS["annotate"][1],
                         positional=("campaign",))
    if args.noise < 0:
        raise UserError(f"--noise: expected a number >= 0, found {args.noise}")
    if args.k is not None and args.k < 1:
        raise UserError(f"--k: expected at least 1, found {args.k}")
    campaign = Campaign(where.campaign)
    stored = annotate_campaign(campaign, args.noise, args.seed, k=args.k)
    print(f"{campaign.path}: {ANNOTATOR} stored {stored} label(s)")
    return 0


def _stats(argv: list[str]) -> int:
    from rlhf.label.stats import campaign_stats, format_stats, plot_stats
    from rlhf.label.store import Campaign

    where, args = _parse("stats", [CampaignArguments, StatsArguments], argv, COMMANDS["stats"][1],
                         positional=("campaign",))
    campaign = Campaign(where.campaign)
    report = campaign_stats(campaign)
    png = args.png or str(campaign.path / "stats.png")
    plot_stats(report, png)
    print(json.dumps(report, indent=2) if args.json else format_stats(report) + f"\nplot: {png}")
    return 0


def _export(argv: list[str]) -> int:
    from rlhf.label.export import export_rows
    from rlhf.label.store import Campaign

    where, args = _parse("export", [CampaignArguments, ExportArguments], argv, COMMANDS["export"][1],
                         positional=("campaign",))
    campaign = Campaign(where.campaign)
    rows, left_out = export_rows(campaign, args.min_votes)
    if not rows:
        raise UserError(f"{campaign.path}: expected at least one pair whose majority prefers one reply, found none "
                        f"({len(campaign.labels())} labels; left out: {dict(left_out) or 'nothing'})")
    write_jsonl(args.out, rows)
    dropped = ", ".join(f"{n} {reason}" for reason, n in sorted(left_out.items())) or "none"
    print(f"wrote {len(rows)} preference rows to {args.out}; labeled pairs left out: {dropped}")
    return 0


def _run_stage(argv: list[str]) -> int:
    from rlhf.label.stage import run

    metrics = run(argv=argv)
    if "waiting_for_labels" not in metrics:
        print(json.dumps(metrics, indent=2, default=str))
    return 0


COMMANDS = {
    "run": (_run_stage, "the label stage: sample the SFT policy, label its pairs, split them (configs/label.yaml)"),
    "import": (_import, "add prompts with 2+ candidate replies from a file to a campaign"),
    "generate": (_generate, "sample candidate replies from one or more models into a campaign"),
    "serve": (_serve, "run the labeling web app"),
    "annotate": (_annotate, "let the demo annotator (rlhf/demo/annotator.py) label a campaign"),
    "stats": (_stats, "counts, time per label, agreement, position bias, and a PNG"),
    "export": (_export, "write majority-vote prompt/chosen/rejected rows for `rlhf reward`"),
}


def label_command(argv: list[str]) -> int:
    """``rlhf label COMMAND [--key value ...]``; errors are raised (the ``rlhf`` command prints them)."""
    return run_command("rlhf label", COMMANDS, argv, DESCRIPTION)


def main(argv: list[str] | None = None) -> int:
    """``python -m rlhf.label``: :func:`label_command`, printing an error as one line (exit status 2)."""
    try:
        return label_command(list(sys.argv[1:] if argv is None else argv))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
