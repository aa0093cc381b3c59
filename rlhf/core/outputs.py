"""Run directories: written atomically, resumable, with metrics and plots.

A run works in ``<output_dir>.tmp`` (checkpoints, logs) and only when it finishes is that directory
renamed to ``<output_dir>``: a directory at ``output_dir`` is always a complete run, and an
interrupted run leaves its checkpoints in ``<output_dir>.tmp`` for ``--resume``. A run that fails
before its first checkpoint leaves nothing (:meth:`RunDir.removed_on_error`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

from rlhf.core.config import save_resolved_config
from rlhf.core.errors import UserError

logger = logging.getLogger(__name__)
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
CHECKPOINT_MARKERS = ("trainer_state.json", "trainer_state.pt")


class RunDir:
    """The output directory of one stage run."""

    def __init__(self, output_dir: str | os.PathLike):
        self.final = Path(output_dir)
        self.work = self.final.with_name(self.final.name + ".tmp")
        self.created = False  # prepare() made the work dir in this process: only this one may remove it

    def is_complete(self) -> bool:
        return (self.final / "metrics.json").exists()

    def checkpoints(self) -> list[Path]:
        found = [p for p in self.work.glob("checkpoint-*") if CHECKPOINT_PATTERN.match(p.name) and p.is_dir()]
        return sorted(found, key=lambda p: int(CHECKPOINT_PATTERN.match(p.name).group(1)))

    def last_checkpoint(self) -> Path | None:
        # A checkpoint without its completion marker was cut off while being written: the Trainer
        # writes trainer_state.json last, after the weights, optimizer and RNG states; PPO renames a
        # finished checkpoint (with its trainer_state.pt) into place.
        done = [p for p in self.checkpoints() if any((p / m).exists() for m in CHECKPOINT_MARKERS)]
        return done[-1] if done else None

    def prepare(self, resume: bool, overwrite: bool = False) -> Path | None:
        """Make the work directory; return the checkpoint to resume from, if any."""
        if self.final.exists():
            if not overwrite:
                raise UserError(
                    f"{self.final}: expected a new output_dir, found a finished run there; "
                    "pass --overwrite_output_dir true or choose another output_dir"
                )
        checkpoint = self.last_checkpoint() if resume else None
        if resume and checkpoint is None:
            logger.warning("--resume: no checkpoint in %s, starting from scratch", self.work)
        if self.work.exists() and checkpoint is None:
            if not resume and self.checkpoints():
                logger.warning("discarding the interrupted run in %s (pass --resume to continue it)", self.work)
            shutil.rmtree(self.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.created = True
        return checkpoint

    def prepare_on_main(self, resume: bool, overwrite: bool, state) -> Path | None:
        """:meth:`prepare` on the main process of ``state`` (an accelerate ``PartialState`` or
        ``Accelerator``) while the others wait; every process gets the checkpoint to resume from."""
        checkpoint = self.prepare(resume, overwrite) if state.is_main_process else None
        state.wait_for_everyone()
        if not state.is_main_process and resume:
            checkpoint = self.last_checkpoint()
        return checkpoint

    @contextlib.contextmanager
    def removed_on_error(self) -> Iterator[RunDir]:
        """Remove the work directory when an exception leaves the block before a checkpoint exists.

        Wrap everything from :meth:`prepare` to :meth:`finalize` in it: a run that fails (bad input
        found after the directory was made, a crash, Ctrl-C) before its first finished checkpoint
        has nothing to resume, so it leaves nothing behind; one that has a checkpoint keeps the
        directory for ``--resume``. Only the process whose :meth:`prepare` made the directory removes
        it, so every process of a distributed run may use the block. The exception propagates.
        """
        try:
            yield self
        except BaseException:
            if self.created and self.work.exists() and self.last_checkpoint() is None:
                shutil.rmtree(self.work, ignore_errors=True)
                logger.info("removed %s: the run stopped before its first checkpoint", self.work)
            raise

    def finalize(self, keep_checkpoints: bool = False) -> Path:
        """Drop checkpoints and rename the work directory into place."""
        if not keep_checkpoints:
            for ckpt in self.checkpoints():
                shutil.rmtree(ckpt)
        if self.final.exists():
            shutil.rmtree(self.final)
        os.replace(self.work, self.final)
        return self.final


def wandb_offline_without_key() -> None:
    """wandb logs offline (into the run directory) unless the user gave an API key: no network here."""
    if not os.environ.get("WANDB_API_KEY"):
        os.environ.setdefault("WANDB_MODE", "offline")


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write JSON atomically (temp file, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(clean_numbers(data), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def clean_numbers(data: Any) -> Any:
    """NaN/Inf are not JSON: write them as null."""
    if isinstance(data, dict):
        return {k: clean_numbers(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [clean_numbers(v) for v in data]
    if isinstance(data, float) and not math.isfinite(data):
        return None
    return data


def plot_curves(
    path: str | os.PathLike,
    series: dict[str, Iterable[tuple[float, float]]],
    title: str,
    xlabel: str = "step",
    panels: list[list[str]] | None = None,
) -> None:
    """Save a PNG of named (x, y) series; ``panels`` groups series into side-by-side plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {k: list(v) for k, v in series.items() if list(v)}
    panels = [[k for k in p if k in series] for p in (panels or [list(series)])]
    panels = [p for p in panels if p] or [[]]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, names in zip(axes[0], panels):
        for name in names:
            xs, ys = zip(*series[name])
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=name)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if names:
            ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def history_series(log_history: list[dict], keys: Iterable[str]) -> dict[str, list[tuple[float, float]]]:
    """(step, value) series for ``keys`` from a Trainer's ``state.log_history``."""
    out: dict[str, list[tuple[float, float]]] = {k: [] for k in keys}
    for entry in log_history:
        for k in out:
            if k in entry and entry[k] is not None:
                out[k].append((entry.get("step", 0), float(entry[k])))
    return out


def write_run_outputs(run: RunDir, tokenizer, configs: list, given: dict[str, Any], metrics: dict[str, Any],
                      history: list[dict], title: str, curve_keys: list[list[str]], started: float) -> dict[str, Any]:
    """What every stage writes beside its weights: tokenizer, resolved config.yaml, curves.png,
    log_history.json and metrics.json (with ``wall_seconds``); then the run is renamed into place.
    Returns the metrics as written."""
    work = run.work
    tokenizer.save_pretrained(str(work))
    save_resolved_config(work / "config.yaml", configs, given)
    keys = [k for panel in curve_keys for k in panel]
    plot_curves(work / "curves.png", history_series(history, keys), title, panels=curve_keys)
    metrics = {**metrics, "wall_seconds": round(time.time() - started, 1)}
    write_json(work / "metrics.json", metrics)
    write_json(work / "log_history.json", history)
    logger.info("wrote %s", run.finalize())
    return metrics
