"""rlhf data scan: planted private data of each kind is found (masked, with its score) and scrubbed."""

from __future__ import annotations

import csv
import json
import logging

import pytest

from rlhf.app.cli import main
from rlhf.core.data import read_records, write_jsonl
from rlhf.eval.privacy import NAMES_NOT_CHECKED, find_pii, mask

# One planted item of each kind, with the placeholder a scrubbed copy must hold instead.
PLANTED = {
    "EMAIL_ADDRESS": ("jane.roe@example.org", "<EMAIL>"),
    "PHONE_NUMBER": ("+1 415-555-0132", "<PHONE>"),
    "CREDIT_CARD": ("4539 1488 0343 6467", "<CREDIT_CARD>"),  # passes the Luhn check
    "IP_ADDRESS": ("203.0.113.42", "<IP_ADDRESS>"),
    "API_KEY": ("sk-proj-Q7x2LmP9rT4vW8yZ1aB3cD5eF", "<API_KEY>"),
}
NOT_A_CARD = "4539 1488 0343 6468"  # the card above with its last digit changed: fails the Luhn check


def entities(text: str, **kwargs) -> list[str]:
    return [item[0] for item in find_pii(text, **kwargs)]


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
    assert entities(f"card {PLANTED['CREDIT_CARD'][0]}") == ["CREDIT_CARD"]
    assert entities(f"card {NOT_A_CARD}") == []
    assert entities("4539148803436468") == []


@pytest.mark.parametrize("text, entity", [
    ("AKIAIOSFODNN7EXAMPLE", "API_KEY"),
    ("ghp_0123456789abcdefghijklmnopqrstuvwxyzAB", "API_KEY"),
    ("hf_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456", "API_KEY"),
    ('{"client_secret": "9f8e7d6c5b4a39281706f5e4"}', "API_KEY"),
    ("-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA7\n-----END RSA PRIVATE KEY-----", "API_KEY"),
    ("2001:db8:85a3::8a2e:370:7334", "IP_ADDRESS"),
    ("1BvBMSEYstWetqTFn5Au4m4GFg7xJaNVN2", "CRYPTO"),  # a bitcoin address (checksum)
    ("my ssn is 078-05-1121", "US_SSN"),
])
def test_more_shapes(text, entity):
    assert entity in entities(text)


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
    err = capsys.readouterr().err
    assert "'clean'" in err and "scan" in err  # not an action of rlhf data; scan is


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


# ----------------------------------------------------------------------------------------------
# Issue 24 item 5: numbers, IBANs, internal emails, version numbers, order numbers, scores,
# the threshold, --spacy_model, the ScanArguments config.
# ----------------------------------------------------------------------------------------------


def test_a_number_is_scanned_as_its_text_and_scrubbed_to_its_placeholder(tmp_path, capsys):
    path, clean = tmp_path / "train.jsonl", tmp_path / "clean.jsonl"
    write_jsonl(path, [{"prompt": "pay", "completion": "done .", "card": 4111111111111111, "count": 3, "ok": True},
                       {"prompt": "ring me", "completion": "sure .", "phone": 4155550132}])
    assert main(["data", "scan", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"{path}:1: card: CREDIT_CARD 41************11 (score 1.00)" in out
    # A bare digit run is a phone only with a phone word nearby: here the field's name.
    assert f"{path}:2: phone: PHONE_NUMBER 41******32 (score 0.55)" in out
    assert main(["data", "scan", str(path), "--scrub", "--out", str(clean)]) == 0
    rows = [r.row for r in read_records(clean)]
    assert rows[0] == {"prompt": "pay", "completion": "done .", "card": "<CREDIT_CARD>", "count": 3, "ok": True}
    assert rows[1]["phone"] == "<PHONE>"


def test_an_iban_is_found():
    assert entities("pay to IBAN GB82 WEST 1234 5698 7654 32 please") == ["IBAN_CODE"]
    assert entities("DE89370400440532013000") == ["IBAN_CODE"]
    assert entities("GB82 WEST 1234 5698 7654 33") == []  # the checksum fails


def test_an_email_on_an_internal_domain_is_found():
    assert entities("write to a.b@company.internal today") == ["EMAIL_ADDRESS"]
    assert entities("pip install pkg@1.2.3") == []  # a numeric "domain" is no email
    # A public suffix validates the address (score 1); an internal domain is a pattern only (0.5).
    assert [item[3] for item in find_pii("jane.roe@example.org and a.b@company.internal")] == [1.0, 0.5]


def test_a_version_number_is_not_an_ip_address():
    assert entities("version 1.2.3.4") == []
    assert entities("upgrade to v. 10.0.0.1 or release 2.1.0.3 now") == []
    assert entities("the server 1.2.3.4 is down") == ["IP_ADDRESS"]


def test_an_order_number_is_not_a_phone_number():
    assert entities("Order 1234567890") == []
    assert entities("the order number is 1234567890") == []  # "number" is not a phone word
    assert entities("call me on 4155550132") == ["PHONE_NUMBER"]  # a phone word: 0.2 + 0.35
    assert entities("Order +1 415-555-0132") == ["PHONE_NUMBER"]  # formatted as a phone: 0.4


def test_each_finding_has_its_score_and_the_threshold_is_honoured(tmp_path, capsys):
    path = tmp_path / "train.jsonl"
    write_jsonl(path, [{"prompt": "Order 1234567890 shipped", "completion": f"card {PLANTED['CREDIT_CARD'][0]}"},
                       {"prompt": "the server 203.0.113.42 is down", "completion": "restart it ."}])
    assert main(["data", "scan", str(path)]) == 1
    out = capsys.readouterr()
    assert out.out.splitlines() == [f"{path}:1: completion: CREDIT_CARD 45***************67 (score 1.00)",
                                    f"{path}:2: prompt: IP_ADDRESS 20********42 (score 0.60)"]
    assert "found 1 CREDIT_CARD, 1 IP_ADDRESS scoring >= 0.3 in" in out.err
    # Lower: the order number shows, as the weak phone match it is.
    assert main(["data", "scan", str(path), "--threshold", "0.2"]) == 1
    assert f"{path}:1: prompt: PHONE_NUMBER 12******90 (score 0.20)" in capsys.readouterr().out
    # Higher: only the Luhn-checked card is left.
    assert main(["data", "scan", str(path), "--threshold", "0.9"]) == 1
    assert capsys.readouterr().out.splitlines() == [f"{path}:1: completion: CREDIT_CARD 45***************67 (score 1.00)"]
    assert main(["data", "scan", str(path), "--threshold", "1.5"]) == 2
    assert "threshold: expected a score between 0 and 1, found 1.5" in capsys.readouterr().err


def test_the_report_says_names_are_not_checked_without_a_spacy_model(tmp_path, capsys):
    path = tmp_path / "train.jsonl"
    write_jsonl(path, [{"prompt": "Jane Roe lives in Springfield", "completion": "nice ."}])
    assert main(["data", "scan", str(path)]) == 0
    assert NAMES_NOT_CHECKED in capsys.readouterr().out
    assert NAMES_NOT_CHECKED.startswith("person names and places were not checked")


def test_a_missing_spacy_model_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    import rlhf.core.data

    path = tmp_path / "train.jsonl"
    write_jsonl(path, planted_rows())
    monkeypatch.setattr(rlhf.core.data, "read_records", lambda *a, **k: pytest.fail("the file was read"))
    assert main(["data", "scan", str(path), "--spacy_model", "xx_no_such_pipeline_sm"]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert ("spacy_model: expected an installed spaCy pipeline (a package such as en_core_web_sm, installed with "
            "`python -m spacy download en_core_web_sm`, or a pipeline directory), found 'xx_no_such_pipeline_sm'"
            in out.err)
    blank = tmp_path / "blank_pipeline"
    import spacy

    spacy.blank("en").to_disk(blank)
    assert main(["data", "scan", str(path), "--spacy_model", str(blank)]) == 2
    assert "expected a pipeline with an NER component (ner or entity_ruler), found the components none" in \
        capsys.readouterr().err


def test_a_spacy_ner_pipeline_finds_person_names_and_places(tmp_path, capsys):
    import spacy

    # A stand-in for a trained pipeline such as en_core_web_sm: rules that tag one name and one place.
    nlp = spacy.blank("en")
    nlp.add_pipe("entity_ruler").add_patterns([{"label": "PERSON", "pattern": "Jane Roe"},
                                               {"label": "GPE", "pattern": "Springfield"}])
    nlp.to_disk(tmp_path / "ner_pipeline")
    path, clean = tmp_path / "train.jsonl", tmp_path / "clean.jsonl"
    write_jsonl(path, [{"prompt": "Jane Roe lives in Springfield", "completion": "call +1 415-555-0132 ."}])
    assert main(["data", "scan", str(path), "--spacy_model", str(tmp_path / "ner_pipeline")]) == 1
    out = capsys.readouterr()
    assert f"{path}:1: prompt: PERSON J******e (score 0.85)" in out.out
    assert f"{path}:1: prompt: LOCATION Sp*******ld (score 0.85)" in out.out
    assert "PHONE_NUMBER" in out.out and NAMES_NOT_CHECKED not in out.out + out.err
    assert main(["data", "scan", str(path), "--spacy_model", str(tmp_path / "ner_pipeline"),
                 "--scrub", "--out", str(clean)]) == 0
    assert read_records(clean)[0].row["prompt"] == "<PERSON> lives in <LOCATION>"


def test_scan_settings_come_from_a_yaml_file_or_keys_and_the_file_from_its_first_word(tmp_path, capsys):
    path, clean = tmp_path / "train.jsonl", tmp_path / "clean.jsonl"
    write_jsonl(path, planted_rows())
    config = tmp_path / "scan.yaml"
    config.write_text(f"file: {path}\nthreshold: 0.9\nscrub: true\nout: {clean}\n")
    assert main(["data", "scan", "--config", str(config)]) == 0
    assert "found 1 API_KEY, 1 CREDIT_CARD, 1 EMAIL_ADDRESS scoring >= 0.9" in capsys.readouterr().out
    assert PLANTED["PHONE_NUMBER"][0] in clean.read_text()  # 0.75 < 0.9: kept
    # The command line wins over the file; --file and the first word are the same key.
    assert main(["data", "scan", "--config", str(config), "--threshold", "0.3"]) == 0
    assert "found 1 API_KEY, 1 CREDIT_CARD, 1 EMAIL_ADDRESS, 1 IP_ADDRESS, 1 PHONE_NUMBER" in capsys.readouterr().out
    assert main(["data", "scan", "--file", str(path)]) == main(["data", "scan", str(path)]) == 1
    capsys.readouterr()
    assert main(["data", "scan", str(path), "--treshold", "0.5"]) == 2
    assert "unknown key 'treshold'; did you mean threshold?" in capsys.readouterr().err
    assert main(["data", "scan"]) == 2
    assert "expected a data file (rlhf data scan <file>, or --file), found none" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "scan", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert "--threshold (float, default: 0.3)" in help_text and "Report (and scrub) only items" in help_text
    assert "--spacy_model (str, default: None)" in help_text
