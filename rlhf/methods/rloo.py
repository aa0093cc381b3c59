"""RLOO: TRL's RLOOTrainer with the reward adapter + score head as its reward, on one base (rlhf/methods/online.py).

    rlhf rloo --config configs/rloo.yaml [--resume]
    accelerate launch scripts/rloo.py --config configs/rloo.yaml
"""

from __future__ import annotations

from typing import Any

from rlhf.core.hooks import StageHooks
from rlhf.methods.online import run_online


def run(config: dict[str, Any] | None = None, hooks: StageHooks | None = None, *,
        argv: list[str] | None = None) -> dict:
    """Run the RLOO stage; returns its metrics (``config``, ``hooks``, ``argv``: as sft.train.run)."""
    return run_online("rloo", config, hooks, argv)
