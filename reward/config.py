"""The reward stage's own settings (the rest are ModelArguments, DataArguments and TRL's RewardConfig)."""

from __future__ import annotations

from dataclasses import dataclass

from rlhf.core.errors import UserError
from rlhf.core.stage import TrainerStageArguments


@dataclass
class RewardStageArguments(TrainerStageArguments):
    """Settings of the reward stage that TRL's RewardConfig does not have."""

    calibration_bins: int = 10
    """Bins of the calibration plot (predicted P(chosen) against observed frequency)."""
    warm_start: str | None = None
    """An earlier reward stage output with the same base and adapter settings: this run's adapter and
    score head start from its weights instead of fresh ones (labeling rounds retrain the reward model
    so); a resumed run continues from its checkpoint instead. null = a fresh adapter."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.calibration_bins < 2:
            raise UserError(f"calibration_bins: expected at least 2, found {self.calibration_bins}")
