"""The real page in headless Chromium: sign in, label with the keyboard, survive a server outage,
show hostile model text literally, and export what was stored."""

import socket

import pytest

from rlhf.label.app import LOOPBACK_HOSTS, create_app, running_in_thread
from rlhf.label.browser import CHROMIUM, launch_chromium
from rlhf.label.cli import main
from rlhf.core.data import load_rows
from test_label_api import XSS_REPLIES, make_campaign

pytestmark = [pytest.mark.browser, pytest.mark.slow]

# Each step: the keys pressed and what they mean ("left"/"right" are screen sides).
STEPS = [
    (["a"], "left"),
    (["ArrowRight"], "right"),
    (["t"], "tie"),
    (["x"], "both_bad"),
    (["s"], "skip"),
    (["r", *"too long", "Escape", "b"], "right"),
]


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: run scripts/install_browser.sh (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        yield browser
        browser.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_label_with_the_keyboard(tmp_path, browser):
    campaign = make_campaign(tmp_path)
    app = create_app(campaign, allowed_hosts=LOOPBACK_HOSTS)
    page = browser.new_page(viewport={"width": 1200, "height": 800})
    dialogs, errors = [], []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.on("pageerror", lambda e: errors.append(str(e)))

    with running_in_thread(app) as url:
        page.goto(url)
        page.fill("#login-input", "ann")
        page.press("#login-input", "Enter")
        page.wait_for_selector("#task:not([hidden])")
        assert "0 / 6 labels" in page.text_content("#progress")
        shown, texts = [], set()
        for keys, action in STEPS:
            pair_id = page.get_attribute("body", "data-pair-id")
            left, right = page.text_content("#left-text"), page.text_content("#right-text")
            texts |= {left, right, page.text_content("#prompt")}
            # Model text stays text: no element was made from it.
            assert page.locator(".text *:not(div):not(span)").count() == 0
            shown.append((int(pair_id), action, left, right))
            for key in keys:
                page.keyboard.press(key)
            page.wait_for_function("id => document.body.dataset.pairId !== id", arg=pair_id)
        page.wait_for_selector("#done:not([hidden])")
        # 5 labels; the pair ann skipped waits for someone else.
        assert page.text_content("#progress") == "Campaign: 5 / 6 labels (6 pairs × k=1) · You: 5"

    # Shown literally, and nothing ran: no dialog, no global set by an injected handler.
    assert set(XSS_REPLIES) <= texts
    assert "user: Say hi" in texts and "Describe <i>tea</i>." in texts
    assert page.evaluate("window.__xss") is None and dialogs == [] and errors == []

    labels = {lab["pair_id"]: lab for lab in campaign.labels()}
    pairs = {p["pair_id"]: p for p in campaign.pairs()}
    for pair_id, action, left, right in shown:
        if action == "skip":
            assert pair_id not in labels and [s["pair_id"] for s in campaign.skips()] == [pair_id]
            continue
        label = labels[pair_id]
        assert pairs[pair_id][label["left_side"]] == left  # the stored side is the one shown left
        side = {"left": label["left_side"], "right": "b" if label["left_side"] == "a" else "a"}
        assert label["choice"] == side.get(action, action)
        assert label["annotator"] == "ann" and label["elapsed_ms"] > 0
    assert labels[shown[-1][0]]["rationale"] == "too long"

    out = tmp_path / "pairs.jsonl"
    assert main(["export", str(campaign.path), "--out", str(out)]) == 0
    rows = load_rows(out, "preference")
    assert len(rows) == 3  # left, right and the last right; tie and both bad are not preferences
    chosen = {(action, left if action == "left" else right) for _, action, left, right in shown}
    assert {r["chosen"] for r in rows} == {text for action, text in chosen if action in ("left", "right")}


def test_a_label_sent_while_the_server_is_down_is_stored_once(tmp_path, browser):
    campaign = make_campaign(tmp_path)
    app = create_app(campaign, allowed_hosts=LOOPBACK_HOSTS)
    port = free_port()
    page = browser.new_page()
    with running_in_thread(app, port=port) as url:
        page.goto(url)
        page.fill("#login-input", "ann")
        page.press("#login-input", "Enter")
        page.wait_for_selector("#task:not([hidden])")
        pair_id, left = page.get_attribute("body", "data-pair-id"), page.text_content("#left-text")
        page.reload()  # still signed in, and the same open item in the same order
        page.wait_for_selector("#task:not([hidden])")
        assert (page.get_attribute("body", "data-pair-id"), page.text_content("#left-text")) == (pair_id, left)
    page.keyboard.press("a")  # the server is gone
    page.wait_for_function("document.getElementById('status').textContent.includes('not answering')")
    with running_in_thread(app, port=port):
        page.wait_for_function("id => document.body.dataset.pairId !== id", arg=pair_id)
    [label] = campaign.labels()
    assert label["pair_id"] == int(pair_id) and label["annotator"] == "ann"
