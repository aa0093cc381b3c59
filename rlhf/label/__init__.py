"""Collect human preference labels for the reward model: ``rlhf label generate|import|serve|stats|export``.

A campaign is a directory holding ``campaign.sqlite``: prompts, candidate replies, the pairs made
from them, and the labels annotators give in the web app. See docs/labeling.md.

Modules: ``store`` (the SQLite campaign), ``ingest`` (import files and sampled replies into it),
``app`` (the FastAPI server and the page in ``static/``), ``stats`` (agreement, position bias, plot),
``export`` (majority-vote preference rows for ``rlhf reward``), ``cli`` (the command line).
Imports point one way: this package uses the shared core ``rlhf.*`` and no other stage.
"""
