"""Find (and scrub) private data in training files before training: ``rlhf data scan``.

    rlhf data scan data/sft_train.jsonl                              # report file:line, field, kind (masked)
    rlhf data scan data/sft_train.jsonl --scrub --out data/sft_train.clean.jsonl
    rlhf data scan data/sft_train.jsonl --canaries 4 --out data/sft_train.canary.jsonl   # + canaries.json sidecar
    # exit code 0: nothing found (or scrubbed into --out); 1: found, not scrubbed; 2: bad input

``--canaries N`` plants N random canaries in the ``--out`` copy, for ``rlhf eval canaries`` to check
whether a model trained on it reproduces them (:mod:`rlhf.eval.canaries`).

What is found, by presidio-analyzer's pattern recognizers (no hand-written PII regexes):

- EMAIL_ADDRESS (domain checked against the public suffix list), PHONE_NUMBER (Google's
  libphonenumber), CREDIT_CARD (Luhn-checked: a 16-digit number that fails the checksum is not a
  card), IP_ADDRESS (v4 and v6);
- API_KEY: one more presidio ``PatternRecognizer`` for credentials with a known shape (OpenAI,
  GitHub, AWS, Google, Slack, Hugging Face, Stripe keys, JWTs, private-key blocks) and for long
  letter-and-digit tokens assigned to a key/secret/token/password name.

It runs offline: presidio gets a blank spaCy pipeline (a tokenizer, no model to download; the
pattern recognizers need nothing more), and the email check reads tldextract's bundled suffix list
instead of fetching one. Every string of every row is scanned (chat messages included), whatever
the file format the toolkit's data loader reads. Reports never print a found item whole: it is
masked (``jo******om``). ``--scrub`` writes a copy with each item replaced by a placeholder
(``<EMAIL>``, ``<PHONE>``, ``<CREDIT_CARD>``, ``<IP_ADDRESS>``, ``<API_KEY>``).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import re
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from rlhf.eval.canaries import DEFAULT_ALPHABET, DEFAULT_FORMAT, CanaryFormat, plant_canaries, sidecar_path
from rlhf.core.errors import UserError

PLACEHOLDERS = {
    "EMAIL_ADDRESS": "<EMAIL>",
    "PHONE_NUMBER": "<PHONE>",
    "CREDIT_CARD": "<CREDIT_CARD>",
    "IP_ADDRESS": "<IP_ADDRESS>",
    "API_KEY": "<API_KEY>",
}
ENTITIES = tuple(PLACEHOLDERS)
FOUND_EXIT_CODE = 1
# presidio scores pattern matches 0..1; a validated one (Luhn, suffix list) scores 1. Phone numbers
# found by libphonenumber score 0.4 and unvalidated IPv4 patterns 0.6: 0.3 keeps all five kinds.
SCORE_THRESHOLD = 0.3

# (name, regex, score): credentials with a known shape first, then the generic "key = value" form.
API_KEY_PATTERNS = [
    ("openai key", r"\bsk-(?:proj-|svcacct-)?[A-Za-z0-9_-]{20,}", 0.9),
    ("github token", r"\b(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,})", 0.9),
    ("aws access key id", r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b", 0.9),
    ("google api key", r"\bAIza[0-9A-Za-z_-]{35}", 0.9),
    ("slack token", r"\bxox[abprs]-[A-Za-z0-9-]{10,}", 0.9),
    ("hugging face token", r"\bhf_[A-Za-z0-9]{30,}", 0.9),
    ("stripe key", r"\b[rs]k_(?:live|test)_[A-Za-z0-9]{16,}", 0.9),
    ("json web token", r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}", 0.9),
    ("private key block", r"-----BEGIN (?:RSA |EC |DSA |OPENSSH |PGP )?PRIVATE KEY(?: BLOCK)?-----"
                          r"(?:[\s\S]*?-----END [A-Z ]*PRIVATE KEY(?: BLOCK)?-----)?", 1.0),
    ("assigned secret", r"(?<=[\s\"'{(,;]|^)(?:[A-Za-z0-9_]*(?:api[_-]?key|secret|token|passw(?:or)?d|access[_-]?key))"
                        r"[\"']?\s*[:=]\s*[\"']?[A-Za-z0-9_\-+/=.]{16,}", 0.6),
]

_ASSIGNMENT = re.compile(r"[A-Za-z0-9_\-\"']*\s*[:=]\s*[\"']?")


def _api_key_recognizer():
    from presidio_analyzer import Pattern, PatternRecognizer

    class ApiKeyRecognizer(PatternRecognizer):
        """API-key-like strings; a match must mix letters and digits (so long words and numbers are not keys)."""

        def validate_result(self, pattern_text: str) -> bool | None:
            if pattern_text.startswith("-----BEGIN"):
                return True
            value = pattern_text.split("=", 1)[-1].split(":", 1)[-1] if any(c in pattern_text for c in "=:") else pattern_text
            return any(c.isdigit() for c in value) and any(c.isalpha() for c in value)

    return ApiKeyRecognizer(supported_entity="API_KEY", name="ApiKeyRecognizer",
                            patterns=[Pattern(name, regex, score) for name, regex, score in API_KEY_PATTERNS],
                            context=["key", "token", "secret", "password", "api"])


def _offline_email_recognizer():
    """presidio's EmailRecognizer, checking domains against tldextract's bundled suffix list.

    The stock one calls ``tldextract.extract``, whose module-level extractor first tries to download
    the public suffix list: offline that logs a traceback before it falls back to the bundled copy.
    """
    import tldextract
    from presidio_analyzer.predefined_recognizers import EmailRecognizer

    extractor = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None, fallback_to_snapshot=True)

    class OfflineEmailRecognizer(EmailRecognizer):
        def validate_result(self, pattern_text: str) -> bool:
            return extractor(pattern_text).fqdn != ""

    return OfflineEmailRecognizer()


@lru_cache(maxsize=1)
def build_analyzer():
    """A presidio AnalyzerEngine with a blank spaCy pipeline and only the recognizers for ENTITIES."""
    logging.getLogger("presidio-analyzer").setLevel(logging.ERROR)  # before its import logs the device
    import spacy
    from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
    from presidio_analyzer.nlp_engine import SpacyNlpEngine
    from presidio_analyzer.predefined_recognizers import CreditCardRecognizer, IpRecognizer, PhoneRecognizer

    class BlankSpacyEngine(SpacyNlpEngine):
        """spaCy's tokenizer only: no trained pipeline to download; the pattern recognizers need no NER."""

        def load(self) -> None:
            self.nlp = {"en": spacy.blank("en")}

    engine = BlankSpacyEngine(models=[{"lang_code": "en", "model_name": "blank"}])
    registry = RecognizerRegistry(supported_languages=["en"])
    for recognizer in (_offline_email_recognizer(), PhoneRecognizer(), CreditCardRecognizer(), IpRecognizer(),
                       _api_key_recognizer()):
        registry.add_recognizer(recognizer)
    return AnalyzerEngine(registry=registry, nlp_engine=engine, supported_languages=["en"])


@dataclass(frozen=True)
class Finding:
    """One item found: where, which field, what kind, and the item masked."""

    location: str
    """``path:line`` (or ``path: row i``) as the data loader names the row."""
    field: str
    """The field inside the row, e.g. ``prompt`` or ``messages[1].content``."""
    entity: str
    start: int
    end: int
    masked: str

    def __str__(self) -> str:
        return f"{self.location}: {self.field}: {self.entity} {self.masked}"


def mask(value: str) -> str:
    """Enough to recognise an item, never the item: at most 2 characters at each end, the rest starred."""
    keep = 2 if len(value) >= 10 else 1 if len(value) >= 5 else 0
    return value[:keep] + "*" * (len(value) - 2 * keep) + (value[-keep:] if keep else "")


def find_pii(text: str) -> list[tuple[str, int, int]]:
    """Non-overlapping ``(entity, start, end)`` items in ``text``, in order.

    Where recognizers overlap (a card number is also digits a phone matcher may take), the
    higher-scoring, then longer, match wins.
    """
    if not text or not any(c.isalnum() for c in text):
        return []
    results = build_analyzer().analyze(text=text, language="en", entities=list(ENTITIES),
                                       score_threshold=SCORE_THRESHOLD)
    chosen: list[tuple[str, int, int]] = []
    for r in sorted(results, key=lambda r: (-r.score, -(r.end - r.start), r.start)):
        start = r.start
        if r.entity_type == "API_KEY" and not text.startswith("-----BEGIN", start):
            # "api_key = 'abc...'": the item is the value; the name stays readable in a scrubbed copy.
            assigned = _ASSIGNMENT.match(text, start, r.end)
            start = assigned.end() if assigned else start
        if all(r.end <= s or start >= e for _, s, e in chosen):
            chosen.append((r.entity_type, start, r.end))
    return sorted(chosen, key=lambda t: t[1])


def scrub_text(text: str, found: list[tuple[str, int, int]]) -> str:
    for entity, start, end in sorted(found, key=lambda t: -t[1]):
        text = text[:start] + PLACEHOLDERS[entity] + text[end:]
    return text


def _walk(value: Any, field: str, location: str, findings: list[Finding], scrub: bool) -> Any:
    """Scan every string inside a row value (nested lists/dicts: chat messages); return it scrubbed if asked."""
    if isinstance(value, str):
        found = find_pii(value)
        findings.extend(Finding(location, field, e, s, t, mask(value[s:t])) for e, s, t in found)
        return scrub_text(value, found) if scrub and found else value
    if isinstance(value, list):
        return [_walk(v, f"{field}[{i}]", location, findings, scrub) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: _walk(v, f"{field}.{k}" if field else str(k), location, findings, scrub) for k, v in value.items()}
    return value


def scan_file(path: str | os.PathLike, scrub: bool = False) -> tuple[list[Finding], list[dict]]:
    """Every item found in ``path`` (any format the data loader reads) and the rows, scrubbed when asked."""
    from rlhf.core.data import read_records

    findings: list[Finding] = []
    rows = [_walk(rec.row, "", rec.location, findings, scrub) for rec in read_records(path)]
    return findings, rows


def write_rows(path: str | os.PathLike, rows: list[dict]) -> None:
    """Write rows in the format ``path``'s suffix names (.jsonl, .json, .csv, .parquet), atomically."""
    from rlhf.core.data import write_jsonl

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".ndjson", ".json", ".csv", ".parquet"):
        raise UserError(f"--out {path}: expected a .jsonl, .json, .csv or .parquet file name, found '{suffix}'")
    tmp = path.with_name(path.name + ".tmp")
    try:
        if suffix in (".jsonl", ".ndjson"):
            write_jsonl(tmp, rows)
        elif suffix == ".json":
            tmp.write_text(json.dumps(rows, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        elif suffix == ".csv":
            names = list(dict.fromkeys(k for row in rows for k in row))
            with open(tmp, "w", encoding="utf-8", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=names)
                writer.writeheader()
                for row in rows:  # chat messages as JSON, which the data loader reads back from a CSV cell
                    writer.writerow({k: json.dumps(v, ensure_ascii=False) if isinstance(v, (list, dict)) else v
                                     for k, v in row.items()})
        else:
            import datasets

            datasets.Dataset.from_list(rows).to_parquet(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def scan_command(argv: list[str]) -> int:
    """``rlhf data scan <file> [--scrub] [--canaries N] [--out <file>]``."""
    parser = argparse.ArgumentParser(prog="rlhf data scan", description=__doc__.split("\n\n")[0])
    parser.add_argument("file", help="a data file (.jsonl/.json/.csv/.parquet) or a datasets save_to_disk directory")
    parser.add_argument("--scrub", action="store_true", help="write a copy with each item replaced by a placeholder")
    parser.add_argument("--out", help="with --scrub and/or --canaries: the copy to write (.jsonl/.json/.csv/.parquet)")
    canary = parser.add_argument_group("canaries (a memorization check, rlhf/eval/canaries.py; measure with rlhf eval canaries)")
    canary.add_argument("--canaries", type=int, default=0,
                        help="plant this many random canaries in the --out copy; recorded in <out stem>.canaries.json")
    canary.add_argument("--canary_format", default=DEFAULT_FORMAT, help="canary text, one {} per secret symbol")
    canary.add_argument("--canary_alphabet", default=DEFAULT_ALPHABET,
                        help="the symbols: comma-separated words, or (no comma) the characters of the string")
    canary.add_argument("--canary_repeats", type=int, default=1, help="training rows per canary")
    canary.add_argument("--canary_unseen", type=int, help="control canaries planted nowhere (default: --canaries)")
    canary.add_argument("--canary_seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.scrub and not args.out:
        raise UserError("--scrub: expected --out <file> for the cleaned copy, found none")
    if args.canaries and not args.out:
        raise UserError("--canaries: expected --out <file> for the copy with the canaries, found none")
    if args.out and not (args.scrub or args.canaries):
        raise UserError("--out: only with --scrub or --canaries (a scan alone writes nothing)")
    fmt = CanaryFormat(args.canary_format, args.canary_alphabet) if args.canaries else None
    if args.out and Path(args.out).resolve() == Path(args.file).resolve():
        raise UserError(f"--out {args.out}: expected a new file, found the input itself (keep the original)")
    findings, rows = scan_file(args.file, scrub=args.scrub)
    for finding in findings:
        print(finding)
    counts: dict[str, int] = {}
    for finding in findings:
        counts[finding.entity] = counts.get(finding.entity, 0) + 1
    summary = ", ".join(f"{n} {e}" for e, n in sorted(counts.items())) or "nothing"
    if args.canaries:
        rows, sidecar = plant_canaries(rows, args.canaries, fmt, args.canary_seed, args.canary_repeats,
                                       args.canary_unseen, source=args.file)
        write_rows(args.out, rows)
        sidecar_file = sidecar_path(args.out)
        sidecar_file.write_text(json.dumps({"data": str(args.out), **sidecar}, ensure_ascii=False, indent=1) + "\n",
                                encoding="utf-8")
        print(f"planted {args.canaries} canaries x {args.canary_repeats} rows in {args.out} "
              f"({fmt.space_log2:.1f}-bit candidate space); canaries -> {sidecar_file}")
    if args.scrub:
        if not args.canaries:
            write_rows(args.out, rows)
        print(f"found {summary} in {args.file}; scrubbed copy -> {args.out}")
        return 0
    print(f"found {summary} in {args.file}" + ("; --scrub --out <file> writes a copy without them" if findings else ""),
          file=sys.stderr if findings else sys.stdout)
    return FOUND_EXIT_CODE if findings else 0


def data_command(argv: list[str]) -> int:
    """``rlhf data <action>``: ``scan`` (private data in a training file)."""
    if argv[:1] != ["scan"]:
        found = argv[0] if argv else "nothing"
        raise UserError(f"rlhf data: expected an action (scan), found {found!r}")
    return scan_command(argv[1:])
