"""rlhf data scan: planted private data of each kind is found (masked in the report) and scrubbed."""

from __future__ import annotations

import csv
import json
import logging

import pytest

from rlhf.app.cli import main
from rlhf.core.data import read_records, write_jsonl
from rlhf.eval.privacy import find_pii, mask

# One planted item of each kind, with the placeholder a scrubbed copy must hold instead.
PLANTED = {
    "EMAIL_ADDRESS": ("jane.roe@example.org", "<EMAIL>"),
    "PHONE_NUMBER": ("+1 415-555-0132", "<PHONE>"),
    "CREDIT_CARD": ("4539 1488 0343 6467", "<CREDIT_CARD>"),  # passes the Luhn check
    "IP_ADDRESS": ("203.0.113.42", "<IP_ADDRESS>"),
    "API_KEY": ("sk-proj-Q7x2LmP9rT4vW8yZ1aB3cD5eF", "<API_KEY>"),
}
NOT_A_CARD = "4539 1488 0343 6468"  # the card above with its last digit changed: fails the Luhn check


def planted_rows() -> list[dict]:
    return [
        {"prompt": "write a short review of the tea", "completion": "the tea is good and i like it ."},
        {"prompt": f"email me at {PLANTED['EMAIL_ADDRESS'][0]} please", "completion": "sure ."},
        {"prompt": "what is your number ?", "completion": f"call {PLANTED['PHONE_NUMBER'][0]} after five ."},
        {"prompt": "pay for the pizza", "completion": f"my card is {PLANTED['CREDIT_CARD'][0]} thanks"},
        {"messages": [{"role": "user", "content": f"the server {PLANTED['IP_ADDRESS'][0]} is down"},
                      {"role": "assistant", "content": "restart it ."}]},
        {"prompt": "here is my key", "completion": f"OPENAI_API_KEY={PLANTED['API_KEY'][0]}"},
        {"prompt": f"order {NOT_A_CARD} arrived", "completion": "the order number is not a card ."},
    ]


def test_each_planted_kind_is_found_at_its_line_and_masked(tmp_path, capsys, caplog):
    path = tmp_path / "train.jsonl"
    write_jsonl(path, planted_rows())
    with caplog.at_level(logging.WARNING):
        assert main(["data", "scan", str(path)]) == 1  # found, not scrubbed
    out = capsys.readouterr()
    lines = out.out.strip().splitlines()
    expected = {
        "EMAIL_ADDRESS": f"{path}:2: prompt:", "PHONE_NUMBER": f"{path}:3: completion:",
        "CREDIT_CARD": f"{path}:4: completion:", "IP_ADDRESS": f"{path}:5: messages[0].content:",
        "API_KEY": f"{path}:6: completion:",
    }
    for entity, where in expected.items():
        assert any(line.startswith(f"{where} {entity} ") for line in lines), (entity, lines)
    assert len(lines) == len(expected)  # nothing else: not the clean row, not the non-Luhn number
    for value, _ in PLANTED.values():  # a report never shows an item whole
        assert value not in out.out and value not in out.err
    assert "found 1 API_KEY, 1 CREDIT_CARD, 1 EMAIL_ADDRESS, 1 IP_ADDRESS, 1 PHONE_NUMBER" in out.err
    # Offline: the suffix list comes from tldextract's bundled copy, without a failed download's traceback.
    assert not [r for r in caplog.records if r.name.startswith("tldextract")]


def test_scrub_replaces_each_item_with_its_placeholder(tmp_path, capsys):
    path, clean = tmp_path / "train.jsonl", tmp_path / "clean.jsonl"
    write_jsonl(path, planted_rows())
    assert main(["data", "scan", str(path), "--scrub", "--out", str(clean)]) == 0
    text = clean.read_text()
    for value, placeholder in PLANTED.values():
        assert value not in text and placeholder in text
    rows = [r.row for r in read_records(clean)]
    assert rows[0] == planted_rows()[0]  # clean rows untouched
    assert rows[2]["completion"] == "call <PHONE> after five ."
    assert rows[4]["messages"][0]["content"] == "the server <IP_ADDRESS> is down"
    assert rows[5]["completion"] == "OPENAI_API_KEY=<API_KEY>"
    assert rows[6]["prompt"] == f"order {NOT_A_CARD} arrived"  # not a card: left alone
    capsys.readouterr()
    assert main(["data", "scan", str(clean)]) == 0  # the scrubbed copy scans clean
    assert "found nothing" in capsys.readouterr().out


def test_luhn_decides_what_is_a_card():
    assert [e for e, _, _ in find_pii(f"card {PLANTED['CREDIT_CARD'][0]}")] == ["CREDIT_CARD"]
    assert [e for e, _, _ in find_pii(f"card {NOT_A_CARD}")] == []
    assert [e for e, _, _ in find_pii("4539148803436468")] == []


@pytest.mark.parametrize("text, entity", [
    ("AKIAIOSFODNN7EXAMPLE", "API_KEY"),
    ("ghp_0123456789abcdefghijklmnopqrstuvwxyzAB", "API_KEY"),
    ("hf_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456", "API_KEY"),
    ('{"client_secret": "9f8e7d6c5b4a39281706f5e4"}', "API_KEY"),
    ("-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA7\n-----END RSA PRIVATE KEY-----", "API_KEY"),
    ("2001:db8:85a3::8a2e:370:7334", "IP_ADDRESS"),
])
def test_more_shapes(text, entity):
    assert entity in [e for e, _, _ in find_pii(text)]


@pytest.mark.parametrize("text", [
    "the tea is good and i like it .",
    "version 1.2.3 of the book has 365 pages",
    "a_very_long_identifier_name_without_digits = something_else_entirely",
    "the password is short",
])
def test_ordinary_text_is_clean(text):
    assert find_pii(text) == []


def test_every_format_of_the_data_loader_and_csv_out(tmp_path, capsys):
    rows = planted_rows()[:4]
    source = tmp_path / "train.json"
    source.write_text(json.dumps(rows, indent=1))
    clean = tmp_path / "clean.csv"
    assert main(["data", "scan", str(source), "--scrub", "--out", str(clean)]) == 0
    assert f"{source}:" in capsys.readouterr().out  # the JSON array's rows are named by line
    with open(clean, newline="") as f:
        cells = " ".join(v for row in csv.DictReader(f) for v in row.values() if v)
    assert "<EMAIL>" in cells and "<CREDIT_CARD>" in cells and PLANTED["EMAIL_ADDRESS"][0] not in cells
    assert [r.row["prompt"] for r in read_records(clean)][0] == rows[0]["prompt"]


def test_mask_never_shows_more_than_four_characters():
    for value in ("a@b.co", "jane.roe@example.org", "4539 1488 0343 6467", "12345"):
        shown = mask(value)
        assert len(shown) == len(value) and sum(c != "*" for c in shown) <= 4 and shown != value


@pytest.mark.parametrize("argv, message", [
    (["--scrub"], "--scrub: expected --out <file>"),
    (["--out", "x.jsonl"], "--out: only with --scrub"),
])
def test_user_errors(argv, message, tmp_path, capsys):
    path = tmp_path / "train.jsonl"
    write_jsonl(path, planted_rows()[:1])
    assert main(["data", "scan", str(path), *argv]) == 2
    assert message in capsys.readouterr().err
    assert main(["data", "scan", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl: no such file or directory" in capsys.readouterr().err
    assert main(["data", "clean", str(path)]) == 2
    assert "expected an action (scan), found 'clean'" in capsys.readouterr().err


def test_scrub_and_canaries_write_one_copy_without_the_items_and_with_the_canaries(tmp_path, capsys):
    from rlhf.eval.canaries import sidecar_path

    path, out = tmp_path / "train.jsonl", tmp_path / "clean.jsonl"
    write_jsonl(path, planted_rows())
    assert main(["data", "scan", str(path), "--scrub", "--canaries", "2", "--out", str(out)]) == 0
    text = out.read_text()
    for value, placeholder in PLANTED.values():
        assert value not in text and placeholder in text
    sidecar = json.loads(sidecar_path(out).read_text())
    planted = [c for c in sidecar["canaries"] if c["planted"]]
    assert len(planted) == 2 and all(c["text"] in text and c["text"].startswith("my secret code is ") for c in planted)
    assert len(read_records(out)) == len(planted_rows()) + 2
    # The canaries are not private data: a scan of the copy reports nothing.
    capsys.readouterr()
    assert main(["data", "scan", str(out)]) == 0
