"""Headless Chromium for checking the labeling page (browser test, screenshot script).

Debian's ``chromium`` package driven by Playwright; Playwright's own browser download needs network
access our machines don't have. ``scripts/install_browser.sh`` installs the package.
"""

from __future__ import annotations

from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def launch_chromium(playwright):
    """A headless Chromium browser from ``playwright.sync_api.sync_playwright()``."""
    return playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
