"""Screenshot of an ``rlhf eval`` report.html for the README, taken in headless Chromium.

    python scripts/screenshot_eval_report.py --report runs/m1/eval/report.html        # an existing report
    python scripts/screenshot_eval_report.py --runs smollm2-135m-instruct runs/demo/sft runs/demo/ppo \\
        --prompts data/demo/prompts_heldout.jsonl                                     # makes one first (k = 2)
    # writes docs/img/eval_report.png (--out), the top --height pixels of the page

Needs /usr/bin/chromium (scripts/install_browser.sh). The report is self-contained (its PNGs are
embedded), so it is opened as a file: no server.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from playwright.sync_api import sync_playwright

from rlhf.label.browser import launch_chromium


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", help="an rlhf eval report.html to show")
    parser.add_argument("--runs", nargs="+", help="without --report: runs to evaluate first (rlhf eval --runs)")
    parser.add_argument("--prompts", default="data/demo/prompts_heldout.jsonl", help="with --runs: held-out prompts")
    parser.add_argument("--eval_args", default="--k 2 --judges annotator,lexicon",
                        help="with --runs: more rlhf eval options, one string")
    parser.add_argument("--out", default="docs/img/eval_report.png")
    parser.add_argument("--width", type=int, default=1100, help="viewport width in CSS pixels")
    parser.add_argument("--height", type=int, default=1500, help="the screenshot's height: the top of the page")
    args = parser.parse_args()
    if bool(args.report) == bool(args.runs):
        parser.error("give either --report or --runs")
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(args.report) if args.report else None
        if report is None:
            from rlhf.app.cli import main as rlhf

            code = rlhf(["eval", "--runs", *args.runs, "--prompts", args.prompts, "--out", tmp, *args.eval_args.split()])
            if code:
                raise SystemExit(code)
            report = Path(tmp) / "report.html"
        with sync_playwright() as playwright:
            browser = launch_chromium(playwright)
            page = browser.new_page(viewport={"width": args.width, "height": args.height})
            page.goto(report.resolve().as_uri())
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=args.out, full_page=False)
            browser.close()
    print(f"wrote {args.out} ({Path(args.out).stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
