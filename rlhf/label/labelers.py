"""Who labels a campaign: the demo annotator at once, or people, for whom the stage stops.

The label stage (rlhf/label/stage.py) and the labeling rounds (rlhf/app/rounds.py) share these
settings and this step, so ``labeler: campaign`` stops and continues the same way in both.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rlhf.core.errors import UserError
from rlhf.label.store import Campaign

LABELERS = ("annotator", "campaign")


@dataclass
class LabelerArguments:
    """Who labels, how many labels a pair needs, and how many labelled pairs let the work go on."""

    labeler: str = "annotator"
    """annotator: the demo annotator (rlhf/demo/annotator.py) labels every pair at once (demos, tests);
    campaign: stop until people have labelled the campaign (rlhf label serve), and continue when the
    same command is run again."""
    annotator_noise: float = 0.25
    """labeler annotator: Bradley-Terry temperature of its choices (0 = always the higher score; 0.25 =
    as noisy as the demo's templated pairs)."""
    k: int = 1
    """Labels wanted per pair; the majority vote is exported."""
    min_labeled_share: float = 1.0
    """labeler campaign: share of the campaign's pairs that need k labels before the work goes on."""

    def __post_init__(self) -> None:
        if self.labeler not in LABELERS:
            raise UserError(f"labeler: expected one of {', '.join(LABELERS)}, found {self.labeler!r}")
        if self.annotator_noise < 0:
            raise UserError(f"annotator_noise: expected a number >= 0, found {self.annotator_noise}")
        if self.k < 1:
            raise UserError(f"k: expected at least 1, found {self.k}")
        # The annotator labels a pair once; with k > 1 the work would wait for labels it never gives.
        if self.labeler == "annotator" and self.k != 1:
            raise UserError(f"k: the demo annotator gives each pair one label; expected 1 with labeler annotator, "
                            f"found {self.k}")
        if not 0 <= self.min_labeled_share <= 1:
            raise UserError(f"min_labeled_share: expected a number from 0 to 1, found {self.min_labeled_share}")


def label_or_wait(campaign: Campaign, campaign_dir: Path | str, settings: LabelerArguments, seed: int,
                  waiting: str, rerun: str) -> str | None:
    """Label ``campaign`` with the demo annotator (``labeler: annotator``), then check that enough of its
    pairs have k labels. Returns None when the work can go on, else the message that says what to
    label and how to continue (``waiting``: what waits, e.g. "round 2"; ``rerun``: what to run again).
    """
    from rlhf.label.annotate import annotate_campaign

    if settings.labeler == "annotator":
        annotate_campaign(campaign, settings.annotator_noise, seed, k=settings.k)
    progress = campaign.progress(settings.k)
    if progress["pairs_done"] >= settings.min_labeled_share * progress["pairs"]:
        return None
    return (f"{waiting} waits for labels: {progress['pairs_done']} of the {progress['pairs']} pairs in "
            f"{campaign_dir} have {settings.k} label(s), {settings.min_labeled_share:.0%} needed. Label them "
            f"(`rlhf label serve {campaign_dir} --k {settings.k}`, then open http://127.0.0.1:8000/) and rerun "
            f"{rerun}: it continues where it stopped.")
