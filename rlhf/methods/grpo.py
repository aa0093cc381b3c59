"""GRPO: TRL's GRPOTrainer with the reward adapter + score head as its reward, on one base (rlhf/methods/online.py).

    rlhf grpo --config configs/grpo.yaml [--resume]
    accelerate launch scripts/grpo.py --config configs/grpo.yaml
"""

from __future__ import annotations

from typing import Any

from rlhf.methods.online import run_online


def run(argv: list[str] | None = None, values: dict[str, Any] | None = None, callbacks: list | None = None) -> dict:
    """Run the GRPO stage; returns its metrics. ``callbacks`` are extra TrainerCallbacks."""
    return run_online("grpo", argv, values, callbacks)
