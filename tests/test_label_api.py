"""`rlhf label`: campaign files, the HTTP API (FastAPI TestClient), XSS safety, export, generate."""

import json
import sqlite3
import uuid
from contextlib import closing
from pathlib import Path
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient

from rlhf.label.app import LOOPBACK_HOSTS, STATIC_DIR, create_app, read_tokens
from rlhf.label.cli import main
from rlhf.label.export import export_rows
from rlhf.label.ingest import import_responses
from rlhf.label.store import Campaign
from rlhf.core.data import load_rows
from rlhf.core.errors import UserError

XSS_REPLIES = [
    "<script>window.__xss = 1</script>",
    '<img src=x onerror="window.__xss = 2">',
    "**bold** <b onmouseover=\"window.__xss = 3\">hover</b> [link](javascript:window.__xss=4)",
]
ROWS = [
    {"prompt": "Write a short review of pizza.", "responses": ["Pizza is great.", "Pizza is awful.", "Pizza."]},
    {"prompt": [{"role": "user", "content": "Say hi"}], "response_a": "Hello!", "response_b": "Hey."},
    {"prompt": "Describe <i>tea</i>.", "responses": XSS_REPLIES[:2]},
    {"prompt": "Markdown & HTML?", "responses": [XSS_REPLIES[2], "plain"]},
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def make_campaign(tmp_path: Path, rows=ROWS, k: int = 1) -> Campaign:
    campaign = Campaign.create_or_open(tmp_path / "campaign")
    import_responses(str(write_jsonl(tmp_path / "candidates.jsonl", rows)), campaign)
    campaign.set_k(k)
    return campaign


def client_for(campaign: Campaign, **kwargs) -> TestClient:
    return TestClient(create_app(campaign, **kwargs))


def who(name: str) -> dict:
    return {"X-Annotator": name}


def label_body(item: dict, choice: str = "left", **extra) -> dict:
    picked = {"left": item["left"]["side"], "right": item["right"]["side"]}.get(choice, choice)
    body = {"client_id": str(uuid.uuid4()), "pair_id": item["pair_id"], "choice": picked,
            "left_side": item["left"]["side"], "elapsed_ms": 1500}
    body.update(extra)
    return body


def hand_out(campaign: Campaign, name: str, pair_id: int, left_side: str = "a") -> None:
    """Make ``pair_id`` the annotator's open item, shown with ``left_side`` on the left, as
    ``next_item`` would: the store takes labels and skips only for it."""
    with closing(sqlite3.connect(campaign.db_path)) as conn, conn:
        conn.execute("INSERT OR REPLACE INTO assignments (annotator, pair_id, left_side, assigned_at) "
                     "VALUES (?, ?, ?, 0)", (name, pair_id, left_side))


def label_everything(client: TestClient, name: str, choice: str = "left") -> list[dict]:
    """Label until the server says nothing is left; returns the items seen."""
    seen = []
    while (item := client.get("/api/next", headers=who(name)).json()["item"]) is not None:
        response = client.post("/api/labels", headers=who(name), json=label_body(item, choice))
        assert response.status_code == 200, response.text
        seen.append(item)
    return seen


# ----------------------------------------------------------------------------------------------
# Campaign files
# ----------------------------------------------------------------------------------------------


def test_import_makes_all_pairs_and_appends_idempotently(tmp_path):
    campaign = make_campaign(tmp_path)
    # 3 replies -> 3 pairs, then 1 + 1 + 1.
    assert len(campaign.pairs()) == 6
    again = import_responses(str(tmp_path / "candidates.jsonl"), campaign)
    assert (again.prompts, again.responses, again.pairs, again.duplicate_responses) == (0, 0, 0, 9)
    # A later reply to a known prompt is paired with every earlier one.
    more = import_responses(str(write_jsonl(tmp_path / "more.jsonl", [
        {"prompt": "Write a short review of pizza.", "responses": ["Pizza is great.", "Pizza is fine."]}])), campaign)
    assert (more.responses, more.pairs, more.duplicate_responses) == (1, 3, 1)


def test_import_max_pairs_per_prompt_samples(tmp_path):
    campaign = Campaign.create_or_open(tmp_path / "c")
    rows = [{"prompt": "p", "responses": [f"reply {i}" for i in range(5)]}]  # 10 possible pairs
    result = import_responses(str(write_jsonl(tmp_path / "r.jsonl", rows)), campaign, max_pairs_per_prompt=4)
    assert result.pairs == 4 and len(campaign.pairs()) == 4


@pytest.mark.parametrize("bad_row, message", [
    ('{"prompt": "x", "responses": ["only one"]}', "field 'responses': expected a list of 2 or more replies"),
    ('{"prompt": "x", "responses": "a, b"}', "field 'responses': expected a list of 2 or more replies"),
    ('{"prompt": "x", "responses": ["a", ""]}', "field 'responses[1]': expected a non-empty string"),
    ('{"prompt": "x", "responses": ["a", 3]}', "field 'responses[1]': expected a non-empty string, found 3"),
    ('{"prompt": "x", "responses": ["same", " same "]}', "expected a reply different from the others"),
    ('{"prompt": "x", "response_a": "a"}', "field 'response_b': expected a non-empty string, found missing"),
    ('{"prompt": "x", "chosen": "a"}', "expected a row with 'responses'"),
    ('{"prompt": "", "responses": ["a", "b"]}', "field 'prompt'"),
    ('{"prompt": "x", "responses": ["a", "b"]', "expected a JSON object, found invalid JSON"),
])
def test_bad_import_rows_name_file_and_line(tmp_path, capsys, bad_row, message):
    path = write_jsonl(tmp_path / "in.jsonl", ['{"prompt": "fine", "responses": ["a", "b"]}', bad_row])
    assert main(["import", str(path), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}:2: ") and message in err and "Traceback" not in err
    # The first bad row stops the import before anything is stored.
    assert Campaign(tmp_path / "c").pairs() == []


def test_not_a_campaign_is_a_clear_error(tmp_path, capsys):
    assert main(["stats", str(tmp_path / "missing")]) == 2
    assert "expected a labeling campaign" in capsys.readouterr().err
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "campaign.sqlite").write_text("not sqlite")
    with pytest.raises(UserError, match="expected a labeling campaign database"):
        Campaign(tmp_path / "junk")


# ----------------------------------------------------------------------------------------------
# Labeling API
# ----------------------------------------------------------------------------------------------


def test_label_flow_k2_never_twice_to_one_person(tmp_path):
    campaign = make_campaign(tmp_path, k=2)
    client = client_for(campaign)
    assert client.get("/api/config").json() == {"campaign": "campaign", "auth": "name", "k": 2}
    seen = {name: label_everything(client, name) for name in ("ann", "bob", "cy")}
    pair_ids = {name: [item["pair_id"] for item in items] for name, items in seen.items()}
    for ids in pair_ids.values():
        assert len(ids) == len(set(ids))  # never the same pair twice to one person
    # 6 pairs x k=2 = 12 labels: the first two annotators take them all, the third finds nothing.
    assert len(pair_ids["ann"]) == len(pair_ids["bob"]) == 6 and pair_ids["cy"] == []
    progress = client.get("/api/next", headers=who("cy")).json()["progress"]
    assert progress == {"pairs": 6, "k": 2, "labeled": 12, "target": 12, "pairs_done": 6, "mine": 0}


def test_open_item_survives_reload_and_order_is_random(tmp_path):
    rows = [{"prompt": "p", "responses": [f"reply {i}" for i in range(7)]}]  # 21 pairs
    client = client_for(make_campaign(tmp_path, rows))
    first = client.get("/api/next", headers=who("ann")).json()["item"]
    assert client.get("/api/next", headers=who("ann")).json()["item"] == first  # same item, same order
    # A random side per item: both orders occur (chance of failing: 2 / 2**21).
    items = [first] + label_everything(client, "ann")
    assert {item["left"]["side"] for item in items} == {"a", "b"}


def test_submit_is_idempotent_by_client_id(tmp_path):
    campaign = make_campaign(tmp_path)
    client = client_for(campaign)
    item = client.get("/api/next", headers=who("ann")).json()["item"]
    body = label_body(item, "right", rationale="  shorter  ")
    first = client.post("/api/labels", headers=who("ann"), json=body)
    retry = client.post("/api/labels", headers=who("ann"), json=body)
    assert first.status_code == retry.status_code == 200
    assert (first.json()["status"], retry.json()["status"]) == ("stored", "duplicate")
    assert first.json()["label"] == retry.json()["label"]
    [stored] = campaign.labels()
    assert stored["client_id"] == body["client_id"] and stored["choice"] == item["right"]["side"]
    assert stored["left_side"] == item["left"]["side"] and stored["rationale"] == "shorter"
    # A second label for the same pair, or the client id reused elsewhere: 409, nothing stored.
    assert client.post("/api/labels", headers=who("ann"), json=label_body(item)).status_code == 409
    other = client.get("/api/next", headers=who("ann")).json()["item"]
    reused = dict(label_body(other), client_id=body["client_id"])
    assert client.post("/api/labels", headers=who("ann"), json=reused).status_code == 409
    assert len(campaign.labels()) == 1


@pytest.mark.parametrize("change, status", [
    ({"choice": "left"}, 422),           # screen sides are the page's business, not the API's
    ({"left_side": "c"}, 422),
    ({"client_id": "not-a-uuid"}, 422),
    ({"elapsed_ms": -1}, 422),
    ({"surprise": 1}, 422),
    ({"pair_id": 999}, 404),
])
def test_bad_submissions_are_refused(tmp_path, change, status):
    campaign = make_campaign(tmp_path)
    client = client_for(campaign)
    item = client.get("/api/next", headers=who("ann")).json()["item"]
    assert client.post("/api/labels", headers=who("ann"), json={**label_body(item), **change}).status_code == status
    assert campaign.labels() == []


def test_only_the_open_item_can_be_labeled_or_skipped(tmp_path):
    # The server takes only what it handed out: no pair pushed past k by a client it was never
    # shown to, no left side other than the one shown (which would skew the position-bias figures).
    campaign = make_campaign(tmp_path)  # k = 1
    client = client_for(campaign)
    item = client.get("/api/next", headers=who("ann")).json()["item"]
    other = next(p["pair_id"] for p in campaign.pairs() if p["pair_id"] != item["pair_id"])
    shown_left = item["left"]["side"]
    refused = [
        ("bob", "/api/labels", label_body(item)),                  # bob was handed nothing
        ("ann", "/api/labels", label_body(item, pair_id=other)),   # ann was handed another pair
        ("ann", "/api/skips", {"client_id": str(uuid.uuid4()), "pair_id": other}),
        ("ann", "/api/labels", label_body(item, left_side="b" if shown_left == "a" else "a")),
    ]
    for name, path, body in refused:
        response = client.post(path, headers=who(name), json=body)
        assert response.status_code == 409, (name, body)
    assert "not bob's open item" in client.post("/api/labels", headers=who("bob"), json=label_body(item)).text
    assert response.json()["detail"].startswith(f"left_side: expected '{shown_left}', the reply shown on the left")
    assert campaign.labels() == [] and campaign.skips() == []

    body = label_body(item)
    assert client.post("/api/labels", headers=who("ann"), json=body).json()["status"] == "stored"
    # Committed, so the open item is gone; a retry of the same label is still answered as a duplicate.
    assert client.post("/api/labels", headers=who("ann"), json=body).json()["status"] == "duplicate"
    # The pair now has its k = 1 label; bob, never handed it, can't add a second one.
    assert client.post("/api/labels", headers=who("bob"), json=label_body(item)).status_code == 409
    assert [label["annotator"] for label in campaign.labels()] == ["ann"]


@pytest.mark.parametrize("path, field, value, found", [
    ("/api/labels", "pair_id", 2**64, "an integer of 20 digits"),
    ("/api/skips", "pair_id", 2**64, "an integer of 20 digits"),
    ("/api/labels", "pair_id", 0, "0"),
    ("/api/labels", "elapsed_ms", 2**63, "an integer of 19 digits"),
])
def test_integers_are_bounded(tmp_path, path, field, value, found):
    # SQLite integers are 64-bit: 2**64 in a query overflowed (HTTP 500).
    campaign = make_campaign(tmp_path)
    client = client_for(campaign)
    item = client.get("/api/next", headers=who("ann")).json()["item"]
    body = label_body(item) if path == "/api/labels" else {"client_id": str(uuid.uuid4()), "pair_id": item["pair_id"]}
    response = client.post(path, headers=who("ann"), json={**body, field: value})
    assert response.status_code == 422
    expected = {"pair_id": "the open item's pair id, an integer from 1 to 9223372036854775807",
                "elapsed_ms": "null or milliseconds, an integer from 0 to 9223372036854775807"}[field]
    assert response.json() == {"detail": f"field '{field}': expected {expected}, found {found}"}
    # The largest SQLite integer is a well-formed id; there is just no such pair.
    assert client.post(path, headers=who("ann"), json={**body, "pair_id": 2**63 - 1}).status_code == 404
    assert campaign.labels() == [] and campaign.skips() == []


@pytest.mark.parametrize("change, detail", [
    ({"rationale": "\ud800"}, "field 'rationale': expected null or text of at most 10000 characters, "
                              "found a string with a lone surrogate (not valid Unicode)"),
    ({"rationale": "x" * 200_000}, "field 'rationale': expected null or text of at most 10000 characters, "
                                   "found a string of 200000 characters"),
    ({"client_id": "\udfff" * 1000}, "field 'client_id': expected a UUID made by the page, one per "
                                     "submission, found a string with a lone surrogate (not valid Unicode)"),
    ({"choice": "left"}, "field 'choice': expected 'a', 'b', 'tie' or 'both_bad' (the pair's own reply, "
                         "not a screen side), found a string of 4 characters"),
    ({"y" * 100_000: 1}, "request body: expected only the fields client_id, pair_id, choice, left_side, "
                         "rationale, elapsed_ms, found another one"),
    ({"\ud800": 1}, "request body: expected only the fields client_id, pair_id, choice, left_side, "
                    "rationale, elapsed_ms, found another one"),
])
def test_refused_bodies_are_answered_without_echoing_them(tmp_path, change, detail):
    # FastAPI's default 422 answer repeats the input: in full (200 KB back), or not at all when it
    # can't be encoded (a lone surrogate: HTTP 500, which the page retries forever).
    campaign = make_campaign(tmp_path)
    client = client_for(campaign)
    item = client.get("/api/next", headers=who("ann")).json()["item"]
    content = json.dumps({**label_body(item), **change})  # ASCII, lone surrogates as \ud800 escapes
    response = client.post("/api/labels", headers={**who("ann"), "Content-Type": "application/json"},
                           content=content)
    assert response.status_code == 422 and response.json() == {"detail": detail}
    assert campaign.labels() == []


def test_annotator_header_is_ascii_and_names_may_hold_format_characters(tmp_path):
    client = client_for(make_campaign(tmp_path))
    # Header bytes are read as Latin-1, so raw UTF-8 "José" became "JosÃ©"; "李" (e6 9d 8e) was refused
    # only because 0x9d reads as a control character.
    for name in ("José", "Zoë", "李"):
        response = client.get("/api/whoami", headers=[(b"X-Annotator", name.encode())])
        assert response.status_code == 401
        assert response.json()["detail"] == (
            "X-Annotator header: expected ASCII, the name percent-encoded as UTF-8 (as the page sends it: "
            "José is Jos%C3%A9), found a raw non-ASCII byte")
    # Format characters are allowed: the zero-width joiner holds the emoji together.
    for name in ("👩\u200d💻", "Zoë 👨\u200d👩\u200d👧"):
        assert client.get("/api/whoami", headers=who(quote(name))).json() == {"annotator": name}
    # Not those that reorder the text around the name, nor a name with nothing visible.
    for name, message in [("ann\u202e", "found U+202E"), ("\u200d\u200d", "with a visible character")]:
        response = client.get("/api/whoami", headers=who(quote(name)))
        assert response.status_code == 401 and message in response.json()["detail"]


def test_annotator_names(tmp_path):
    client = client_for(make_campaign(tmp_path))
    assert client.get("/api/next").status_code == 401
    assert client.get("/api/next", headers=who("   ")).status_code == 401
    assert client.get("/api/next", headers=who("x" * 65)).status_code == 401
    assert client.get("/api/whoami", headers=who("ev%0Ail")).status_code == 401  # control character
    # Names are percent-encoded UTF-8, so any script works.
    assert client.get("/api/whoami", headers=who("Zo%C3%AB%20%E6%9D%8E")).json() == {"annotator": "Zoë 李"}


def test_skip_is_recorded_and_not_shown_again(tmp_path):
    campaign = make_campaign(tmp_path)
    client = client_for(campaign)
    item = client.get("/api/next", headers=who("ann")).json()["item"]
    body = {"client_id": str(uuid.uuid4()), "pair_id": item["pair_id"]}
    assert client.post("/api/skips", headers=who("ann"), json=body).json()["status"] == "stored"
    assert client.post("/api/skips", headers=who("ann"), json=body).json()["status"] == "duplicate"
    rest = label_everything(client, "ann")
    assert item["pair_id"] not in {i["pair_id"] for i in rest} and len(rest) == 5
    assert [s["pair_id"] for s in campaign.skips()] == [item["pair_id"]]
    # Someone else still gets the skipped pair.
    assert client.get("/api/next", headers=who("bob")).json()["item"]["pair_id"] == item["pair_id"]


def test_tokens_sign_annotators_in(tmp_path):
    client = client_for(make_campaign(tmp_path), tokens={"t" * 20: "ann", "u" * 20: "bob"})
    assert client.get("/api/config").json()["auth"] == "token"
    assert client.get("/api/whoami", headers=who("ann")).status_code == 401  # names don't work
    assert client.get("/api/whoami", headers={"Authorization": "Bearer " + "x" * 20}).status_code == 401
    assert client.get("/api/whoami", headers={"Authorization": "Bearer tÿ".encode("latin-1")}).status_code == 401
    bob = {"Authorization": "Bearer " + "u" * 20}
    assert client.get("/api/whoami", headers=bob).json() == {"annotator": "bob"}
    item = client.get("/api/next", headers=bob).json()["item"]
    assert client.post("/api/labels", headers=bob, json=label_body(item)).json()["label"]["annotator"] == "bob"


def test_tokens_file_errors(tmp_path):
    path = tmp_path / "tokens.txt"
    path.write_text("# team\nann:" + "a" * 20 + "\n\nbob:lab:" + "b" * 20 + "\n")
    assert read_tokens(str(path)) == {"a" * 20: "ann", "b" * 20: "bob:lab"}
    for text, message in [
        ("ann " + "a" * 20, ":1: expected a 'name:token' line"),
        ("ann:short", ":1: field 'token': expected at least 16 characters"),
        ("ann:" + "a" * 20 + "\nbob:" + "a" * 20, ":2: field 'token': expected a token no other annotator has"),
        ("ann:" + "a" * 20 + "\nann:" + "b" * 20, ":2: field 'name': expected each annotator once"),
        (":" + "a" * 20, ":1: field 'name': expected a name of 1 to 64 characters"),
    ]:
        path.write_text(text)
        with pytest.raises(UserError, match=message) as e:
            read_tokens(str(path))
        assert "a" * 20 not in str(e.value) and "short" not in str(e.value)  # never echo a token
    path.write_bytes(b"ann:" + b"a" * 20 + b"\nJos\xe9:" + b"b" * 20 + b"\n")  # Latin-1, not UTF-8
    with pytest.raises(UserError, match=r"tokens.txt:2: expected UTF-8 text, found byte 0xe9 at byte offset 28"):
        read_tokens(str(path))


def test_serve_refuses_open_address_without_tokens(tmp_path, capsys):
    campaign = make_campaign(tmp_path)
    assert main(["serve", str(campaign.path), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "error: --host 0.0.0.0: expected a loopback address" in err and "--tokens" in err


def test_loopback_server_refuses_foreign_host_header(tmp_path):
    app = create_app(make_campaign(tmp_path), allowed_hosts=LOOPBACK_HOSTS)
    assert TestClient(app, base_url="http://127.0.0.1:8000").get("/api/config").status_code == 200
    # DNS rebinding: a page on evil.example resolving to 127.0.0.1 sends its own Host header.
    assert TestClient(app, base_url="http://evil.example:8000").get("/api/config").status_code == 400


# ----------------------------------------------------------------------------------------------
# Model text is data, never markup
# ----------------------------------------------------------------------------------------------


def test_model_text_is_sent_as_json_data_only(tmp_path):
    client = client_for(make_campaign(tmp_path))
    texts = set()
    for item in label_everything(client, "ann"):
        texts |= {item["left"]["text"], item["right"]["text"]}
    assert set(XSS_REPLIES) <= texts  # verbatim, not escaped or stripped: the page shows it literally
    response = client.get("/api/next", headers=who("bob"))
    assert response.headers["content-type"] == "application/json"
    # The page is static: no model text is ever templated into HTML.
    page = client.get("/")
    assert page.headers["content-type"].startswith("text/html") and "window.__xss" not in page.text
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert page.headers["x-content-type-options"] == "nosniff"


def test_page_script_never_parses_html():
    source = (STATIC_DIR / "app.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function",
                 "DOMParser", "createContextualFragment"):
        assert sink not in source, sink
    assert "textContent" in source
    assert "<script>" not in (STATIC_DIR / "index.html").read_text()  # scripts only from /static/


# ----------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------


def vote(campaign: Campaign, pair_id: int, choices: dict[str, str]) -> None:
    for name, choice in choices.items():
        hand_out(campaign, name, pair_id)
        campaign.submit_label(str(uuid.uuid4()), name, pair_id, choice, "a")


def test_export_majority_vote_is_read_by_the_reward_stage(tmp_path, capsys):
    campaign = make_campaign(tmp_path, k=3)
    p1, p2, p3, p4, p5, _ = [p["pair_id"] for p in campaign.pairs()]  # p4: the chat-message prompt
    vote(campaign, p1, {"x": "b", "y": "b", "z": "tie"})   # b wins 2 of 3
    vote(campaign, p2, {"x": "tie", "y": "tie", "z": "a"})  # majority tie: left out
    vote(campaign, p3, {"x": "a", "y": "b"})              # no majority: left out
    vote(campaign, p4, {"x": "a"})                        # a single vote is a majority
    vote(campaign, p5, {"x": "both_bad", "y": "a", "z": "both_bad"})  # majority both bad: left out
    rows, left_out = export_rows(campaign)
    assert left_out == {"no majority": 1, "majority tie": 1, "majority both_bad": 1}
    pairs = {p["pair_id"]: p for p in campaign.pairs()}
    assert rows[0] == {"prompt": pairs[p1]["prompt"], "chosen": pairs[p1]["b"], "rejected": pairs[p1]["a"],
                       "pair_id": p1, "votes": {"chosen": 2, "rejected": 0, "tie": 1, "both_bad": 0},
                       "agreement": 0.6667}
    assert rows[1]["prompt"] == [{"role": "user", "content": "Say hi"}]
    assert (rows[1]["chosen"], rows[1]["rejected"], rows[1]["votes"]["chosen"]) == ("Hello!", "Hey.", 1)

    out = tmp_path / "pairs.jsonl"
    assert main(["export", str(campaign.path), "--out", str(out)]) == 0
    assert "wrote 2 preference rows" in capsys.readouterr().out
    loaded = load_rows(out, "preference")
    assert loaded == [{key: r[key] for key in ("prompt", "chosen", "rejected")} for r in rows]
    assert main(["export", str(campaign.path), "--out", str(out), "--min_votes", "2"]) == 0
    assert len(load_rows(out, "preference")) == 1


def test_export_with_nothing_to_export_is_a_clear_error(tmp_path, capsys):
    campaign = make_campaign(tmp_path)
    assert main(["export", str(campaign.path), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "expected at least one pair whose majority prefers one reply" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


# ----------------------------------------------------------------------------------------------
# Generate
# ----------------------------------------------------------------------------------------------


def test_generate_from_a_model_dir(tmp_path, tiny_model_dir, capsys):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Write a short review of tea."},
                                                      {"prompt": "Describe a park."}])
    out = tmp_path / "gen"
    argv = ["generate", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--out", str(out),
            "--n", "3", "--max_new_tokens", "6", "--temperature", "1.0"]
    assert main(argv) == 0
    summary = capsys.readouterr().out
    assert "added 2 prompt(s)" in summary
    campaign = Campaign(out)
    for pair in campaign.pairs():
        assert pair["a"].strip() and pair["a"].strip() != pair["b"].strip()
    assert all(r.startswith("generate ") for r in _origins(campaign))
    assert main(argv[:-6] + ["--n", "1"]) == 2
    assert "--n: expected at least 2 replies" in capsys.readouterr().err


def _origins(campaign: Campaign) -> list[str]:
    with sqlite3.connect(campaign.db_path) as conn:
        return [row[0] for row in conn.execute("SELECT origin FROM responses")]


def test_duplicate_replies_are_skipped_and_counted(tmp_path):
    campaign = Campaign.create_or_open(tmp_path / "c")
    result = campaign.add_responses([
        ("f:1", "p", ["same", "same ", "other"], "generate m"),
        ("f:2", "q", ["only", "only"], "generate m"),
    ])
    assert (result.pairs, result.duplicate_responses) == (1, 2)
    assert "skipped 2 duplicate response(s)" in result.summary()
    assert "skipped 1 prompt(s) with fewer than 2 distinct replies" in result.summary()
