"""The SFT stage's own settings (the rest are ModelArguments, DataArguments and TRL's SFTConfig)."""

from __future__ import annotations

from dataclasses import dataclass

from rlhf.errors import UserError


@dataclass
class SFTStageArguments:
    """Settings of the SFT stage that TRL's SFTConfig does not have."""

    early_stopping_patience: int | None = 3
    """Stop after this many evaluations without a better validation loss (None = never)."""

    def __post_init__(self) -> None:
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            raise UserError(f"early_stopping_patience: expected >= 1 or null, found {self.early_stopping_patience}")
