"""RLOO: TRL's RLOOTrainer with the reward adapter + score head as its reward, on one base (rlhf/methods/online.py).

    rlhf rloo --config configs/rloo.yaml [--resume]
    accelerate launch scripts/rloo.py --config configs/rloo.yaml
"""

from __future__ import annotations

from typing import Any

from rlhf.methods.online import run_online


def run(argv: list[str] | None = None, values: dict[str, Any] | None = None, callbacks: list | None = None) -> dict:
    """Run the RLOO stage; returns its metrics. ``callbacks`` are extra TrainerCallbacks."""
    return run_online("rloo", argv, values, callbacks)
