"""Screenshot of the labeling page for the README: a small demo campaign, served and shown in headless
Chromium after an annotator has labeled two pairs with the keyboard.

    python scripts/screenshot_label_app.py                 # writes docs/label-app.png
    python scripts/screenshot_label_app.py --out page.png

Needs /usr/bin/chromium (scripts/install_browser.sh).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from playwright.sync_api import sync_playwright

from rlhf.label.app import LOOPBACK_HOSTS, create_app, running_in_thread
from rlhf.label.browser import launch_chromium
from rlhf.label.store import Campaign

DEMO = [
    ("Write a short review of the coffee at Corner Café.",
     ["The espresso was rich and smooth, with a hint of chocolate. The baristas were friendly and the "
      "croissants were still warm. I would happily go back.",
      "Coffee was ok. Place is a cafe. It has coffee and tables."]),
    ("Describe Kyoto in one or two sentences.",
     ["Kyoto is Japan's former imperial capital, known for its wooden temples, quiet gardens and the "
      "lantern-lit lanes of Gion.",
      "Kyoto is a city. <b>Visit</b> it!"]),
    ("Give me an opinion on paper books versus e-readers.",
     ["Paper books are nicer to hold, but an e-reader carries a whole library.",
      "E-readers, obviously: paper is for people who enjoy carrying bricks."]),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/label-app.png")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        campaign = Campaign.create_or_open(Path(tmp) / "demo-campaign")
        campaign.add_responses([(f"demo:{i}", prompt, replies, "demo") for i, (prompt, replies) in enumerate(DEMO)])
        campaign.set_k(2)
        app = create_app(campaign, allowed_hosts=LOOPBACK_HOSTS)
        with sync_playwright() as playwright, running_in_thread(app) as url:
            browser = launch_chromium(playwright)
            page = browser.new_page(viewport={"width": 1200, "height": 470})
            page.goto(url)
            page.fill("#login-input", "alice")
            page.press("#login-input", "Enter")
            for key in ("a", "b"):
                page.wait_for_selector("#task:not([hidden])")
                pair_id = page.get_attribute("body", "data-pair-id")
                page.keyboard.press(key)
                page.wait_for_function("id => document.body.dataset.pairId !== id", arg=pair_id)
            page.keyboard.press("r")
            page.keyboard.type("One of them is specific and answers the question.")
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=args.out, full_page=True)
            browser.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
