"""Find (and scrub) private data in training files before training: ``rlhf data scan``.

    rlhf data scan data/sft_train.jsonl                      # report file:line, field, kind, item (masked), score
    rlhf data scan data/sft_train.jsonl --scrub --out data/sft_train.clean.jsonl
    rlhf data scan data/sft_train.jsonl --threshold 0.6      # only the surer findings
    rlhf data scan data/sft_train.jsonl --spacy_model en_core_web_sm     # + person names and places
    rlhf data scan data/sft_train.jsonl --canaries 4 --out data/sft_train.canary.jsonl   # + canaries.json sidecar
    rlhf data scan --config scan.yaml                        # the same keys in a YAML file
    # exit code 0: nothing found (or scrubbed into --out); 1: found, not scrubbed; 2: bad input

The settings are :class:`ScanArguments` (``--key value`` or ``--config file.yaml``, ``--help`` lists
them); the file to scan is ``--file``, or the first word after ``rlhf data scan`` as above.
``--canaries N`` plants N random canaries in the ``--out`` copy, for ``rlhf eval canaries`` to check
whether a model trained on it reproduces them (:mod:`rlhf.eval.canaries`).

What is found, by presidio-analyzer's recognizers (no hand-written PII regexes but the API keys'):

- EMAIL_ADDRESS (1.0 on a public suffix, 0.5 on another domain such as ``company.internal``),
  PHONE_NUMBER (Google's libphonenumber), CREDIT_CARD (Luhn-checked), IBAN_CODE (checksum),
  CRYPTO (bitcoin address checksum), IP_ADDRESS (v4 and v6), US_SSN, US_ITIN, US_PASSPORT,
  US_BANK_NUMBER, MEDICAL_LICENSE (weak patterns: most are found only when a context word such as
  "ssn" or "passport" stands within five words before them, or names the field). Left out of
  presidio's English set: DATE_TIME and URL (not private by themselves, and everywhere),
  US_DRIVER_LICENSE (its 0.3 pattern takes "O2" and "A100") and UK_NHS (a 10-digit checksum that
  one number in eleven passes, timestamps included, at score 1);
- API_KEY: one more presidio ``PatternRecognizer`` for credentials with a known shape (OpenAI,
  GitHub, AWS, Google, Slack, Hugging Face, Stripe keys, JWTs, private-key blocks) and for long
  letter-and-digit tokens assigned to a key/secret/token/password name;
- PERSON and LOCATION, only with ``--spacy_model``: an installed spaCy pipeline with NER. Without
  one the report says that names and places were not checked.

Each finding has presidio's score, 0..1 (a checksum-validated item scores 1, a bare pattern less, a
context word nearby adds 0.35); ``--threshold`` (0.3) drops what scores lower. Two scores are ours:
an unformatted digit run (``Order 1234567890``) scores 0.2 as a phone number unless a phone word
stands before it, and a dotted quad after a version word (``version 1.2.3.4``) 0.1 as an IP address.

It runs offline: without ``--spacy_model`` presidio gets a blank spaCy pipeline (a tokenizer, no
model to download; its lemmas are the lower-cased words, so context words work), and the email check
reads tldextract's bundled suffix list instead of fetching one. Every string and number of every
row is scanned (a number as its text; chat messages included), whatever the file format the
toolkit's data loader reads. Reports never print a found item whole: it is masked (``jo******om``).
``--scrub`` writes a copy with each item replaced by a placeholder (``<EMAIL>``, ``<PHONE>``, ...).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

from rlhf.core.config import build_config, check_ranges
from rlhf.core.errors import UserError
from rlhf.eval.canaries import DEFAULT_ALPHABET, DEFAULT_FORMAT, CanaryFormat, plant_canaries, sidecar_path

PLACEHOLDERS = {
    "EMAIL_ADDRESS": "<EMAIL>",
    "PHONE_NUMBER": "<PHONE>",
    "CREDIT_CARD": "<CREDIT_CARD>",
    "IBAN_CODE": "<IBAN>",
    "CRYPTO": "<CRYPTO_WALLET>",
    "IP_ADDRESS": "<IP_ADDRESS>",
    "US_SSN": "<US_SSN>",
    "US_ITIN": "<US_ITIN>",
    "US_PASSPORT": "<PASSPORT>",
    "US_BANK_NUMBER": "<BANK_NUMBER>",
    "MEDICAL_LICENSE": "<MEDICAL_LICENSE>",
    "API_KEY": "<API_KEY>",
    "PERSON": "<PERSON>",
    "LOCATION": "<LOCATION>",
}
NER_ENTITIES = ("PERSON", "LOCATION")
"""Found only with a spaCy NER pipeline (``--spacy_model``)."""
PATTERN_ENTITIES = tuple(e for e in PLACEHOLDERS if e not in NER_ENTITIES)
FOUND_EXIT_CODE = 1
# presidio scores pattern matches 0..1; a validated one (Luhn, IBAN or bitcoin checksum, public
# suffix) scores 1. Phone numbers found by libphonenumber score 0.4, unvalidated IPv4 patterns 0.6,
# an email on a non-public domain 0.5: 0.3 keeps them all, and drops the very weak patterns (US_SSN
# and the like at 0.05, a bare digit run as a phone at 0.2) unless a context word adds 0.35.
SCORE_THRESHOLD = 0.3
BARE_DIGITS_PHONE_SCORE = 0.2
"""A phone match that is only digits (no +, space, dash, dot or bracket): an order, invoice or
account number as often as a phone; a phone word before it ("call", "phone", "mobile"; not
"number") or a field named so adds presidio's 0.35."""
VERSION_IP_SCORE = 0.1
"""A dotted quad right after "version", "v", "release", "build": a version number, not an address."""
_VERSION_BEFORE = re.compile(r"(?:\b(?:version|ver|v|release|build|revision|rev|firmware|fw)\.?\s*[:=]?\s*)$",
                             re.IGNORECASE)
_FIELD_WORDS = re.compile(r"[A-Za-z]+")

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
    It also refuses every domain without a public suffix, so ``a.b@company.internal`` passed.
    """
    import tldextract
    from presidio_analyzer.predefined_recognizers import EmailRecognizer

    extractor = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None, fallback_to_snapshot=True)

    class OfflineEmailRecognizer(EmailRecognizer):
        def validate_result(self, pattern_text: str) -> bool | None:
            """True (score 1) on a public suffix; None (the pattern's 0.5) on a domain whose last label is
            letters (an internal one: company.internal, corp.local); False on a numeric one (pkg@1.2.3)."""
            if extractor(pattern_text).fqdn != "":
                return True
            return None if re.fullmatch(r"[^\W\d_]{2,}", pattern_text.rsplit(".", 1)[-1]) else False

    return OfflineEmailRecognizer()


def _phone_recognizer():
    from presidio_analyzer.predefined_recognizers import PhoneRecognizer

    class DigitRunAwarePhoneRecognizer(PhoneRecognizer):
        """libphonenumber's matches, an unformatted digit run scoring BARE_DIGITS_PHONE_SCORE."""

        # presidio's context words less "number", which an order, invoice or account number has too
        CONTEXT = ["phone", "telephone", "tel", "cell", "cellphone", "mobile", "call", "fax", "whatsapp", "dial"]

        def analyze(self, text, entities, nlp_artifacts=None):
            results = super().analyze(text, entities, nlp_artifacts)
            for r in results:
                if text[r.start:r.end].isdigit():
                    r.score = BARE_DIGITS_PHONE_SCORE
            return results

    return DigitRunAwarePhoneRecognizer()


def _ip_recognizer():
    from presidio_analyzer.predefined_recognizers import IpRecognizer

    class VersionAwareIpRecognizer(IpRecognizer):
        """presidio's IPv4/IPv6 patterns; an IPv4 right after a version word scores VERSION_IP_SCORE."""

        def analyze(self, text, entities, nlp_artifacts=None, regex_flags=None):
            results = super().analyze(text, entities, nlp_artifacts, regex_flags)
            for r in results:
                if ":" not in text[r.start:r.end] and _VERSION_BEFORE.search(text, 0, r.start):
                    r.score = min(r.score, VERSION_IP_SCORE)
            return results

    return VersionAwareIpRecognizer()


def _lowercase_lemmas(doc):
    """A blank pipeline has no lemmatizer: each word's lemma is the word lower-cased, so presidio's
    context words ("call" before a phone number, "ssn" before a social security number) are found."""
    for token in doc:
        if not token.lemma_:
            token.lemma_ = token.lower_
    return doc


def check_spacy_model(name: str) -> None:
    """Refuse a pipeline that is not installed, before any work: presidio would try to download it."""
    import spacy

    if not (spacy.util.is_package(name) or Path(name).is_dir()):
        raise UserError(f"spacy_model: expected an installed spaCy pipeline (a package such as en_core_web_sm, "
                        f"installed with `python -m spacy download en_core_web_sm`, or a pipeline directory), "
                        f"found {name!r}: no such package or directory")


def _load_spacy(name: str | None):
    import spacy
    from spacy.language import Language

    if name is None:
        nlp = spacy.blank("en")
    else:
        check_spacy_model(name)
        try:
            nlp = spacy.load(name)
        except (OSError, ValueError) as e:
            raise UserError(f"spacy_model {name}: expected a spaCy pipeline, found one spaCy cannot load "
                            f"({str(e).splitlines()[0]})") from None
        factories = {nlp.get_pipe_meta(pipe).factory for pipe in nlp.pipe_names}
        if not factories & {"ner", "beam_ner", "entity_ruler"}:
            raise UserError(f"spacy_model {name}: expected a pipeline with an NER component (ner or entity_ruler), "
                            f"found the components {', '.join(nlp.pipe_names) or 'none'}")
    if not Language.has_factory("rlhf_lowercase_lemmas"):
        Language.component("rlhf_lowercase_lemmas", func=_lowercase_lemmas)
    nlp.add_pipe("rlhf_lowercase_lemmas", last=True)
    return nlp


@lru_cache(maxsize=2)
def build_analyzer(spacy_model: str | None = None):
    """A presidio AnalyzerEngine with the recognizers for PLACEHOLDERS' kinds.

    Without ``spacy_model``, a blank spaCy pipeline (tokenizer only: nothing to download) and no NER;
    with one, that installed pipeline, whose entities give PERSON and LOCATION.
    """
    logging.getLogger("presidio-analyzer").setLevel(logging.ERROR)  # before its import logs the device
    from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
    from presidio_analyzer.context_aware_enhancers import LemmaContextAwareEnhancer
    from presidio_analyzer.nlp_engine import SpacyNlpEngine
    from presidio_analyzer.predefined_recognizers import (CreditCardRecognizer, CryptoRecognizer, IbanRecognizer,
                                                          MedicalLicenseRecognizer, SpacyRecognizer, UsBankRecognizer,
                                                          UsItinRecognizer, UsPassportRecognizer, UsSsnRecognizer)

    nlp = _load_spacy(spacy_model)

    class LoadedSpacyEngine(SpacyNlpEngine):
        """The pipeline loaded above (presidio's own load() would download a missing model)."""

        def load(self) -> None:
            self.nlp = {"en": nlp}

    engine = LoadedSpacyEngine(models=[{"lang_code": "en", "model_name": spacy_model or "blank"}])
    registry = RecognizerRegistry(supported_languages=["en"])
    for recognizer in (_offline_email_recognizer(), _phone_recognizer(), CreditCardRecognizer(), IbanRecognizer(),
                       CryptoRecognizer(), _ip_recognizer(), UsSsnRecognizer(), UsItinRecognizer(),
                       UsPassportRecognizer(), UsBankRecognizer(), MedicalLicenseRecognizer(), _api_key_recognizer()):
        registry.add_recognizer(recognizer)
    if spacy_model:
        registry.add_recognizer(SpacyRecognizer(supported_entities=list(NER_ENTITIES)))
    # presidio skips stop words when it looks for context, and spaCy's English stop words include
    # "call": a context word is never a stop word here.
    for recognizer in registry.recognizers:
        for word in recognizer.context or []:
            nlp.vocab[word.lower()].is_stop = False
    # Whole words: in presidio's default substring mode the IP context word "ip" matches "description".
    enhancer = LemmaContextAwareEnhancer(context_matching_mode="whole_word")
    return AnalyzerEngine(registry=registry, nlp_engine=engine, supported_languages=["en"],
                          context_aware_enhancer=enhancer)


class Item(NamedTuple):
    """One item found in a text: its kind, where (``text[start:end]``) and presidio's score (0..1)."""

    entity: str
    start: int
    end: int
    score: float


@dataclass(frozen=True)
class Finding:
    """One item found: where, which field, what kind, the item masked, and its score."""

    location: str
    """``path:line`` (or ``path: row i``) as the data loader names the row."""
    field: str
    """The field inside the row, e.g. ``prompt`` or ``messages[1].content``."""
    entity: str
    start: int
    end: int
    masked: str
    score: float
    """presidio's score, 0..1 (see the module docstring); ``--threshold`` drops lower ones."""

    def __str__(self) -> str:
        return f"{self.location}: {self.field}: {self.entity} {self.masked} (score {self.score:.2f})"


def mask(value: str) -> str:
    """Enough to recognise an item, never the item: at most 2 characters at each end, the rest starred."""
    keep = 2 if len(value) >= 10 else 1 if len(value) >= 5 else 0
    return value[:keep] + "*" * (len(value) - 2 * keep) + (value[-keep:] if keep else "")


def field_context(field: str) -> list[str]:
    """The words of a field's name (``user_phone`` -> user, phone): context words for presidio, so that
    ``{"phone": 4155550132}`` scores as a phone number although no phone word stands in the value."""
    return [w.lower() for w in _FIELD_WORDS.findall(field)]


def find_pii(text: str, threshold: float = SCORE_THRESHOLD, context: list[str] | None = None,
             spacy_model: str | None = None) -> list[Item]:
    """Non-overlapping items in ``text`` scoring at least ``threshold``, in order.

    Where recognizers overlap (a card number is also digits a phone matcher may take), the
    higher-scoring, then longer, match wins. ``context``: more context words (a field's name).
    """
    if not text or not any(c.isalnum() for c in text):
        return []
    entities = list(PATTERN_ENTITIES) + (list(NER_ENTITIES) if spacy_model else [])
    results = build_analyzer(spacy_model).analyze(text=text, language="en", entities=entities,
                                                  score_threshold=threshold, context=context or None)
    chosen: list[Item] = []
    for r in sorted(results, key=lambda r: (-r.score, -(r.end - r.start), r.start)):
        start = r.start
        if r.entity_type == "API_KEY" and not text.startswith("-----BEGIN", start):
            # "api_key = 'abc...'": the item is the value; the name stays readable in a scrubbed copy.
            assigned = _ASSIGNMENT.match(text, start, r.end)
            start = assigned.end() if assigned else start
        if all(r.end <= c.start or start >= c.end for c in chosen):
            chosen.append(Item(r.entity_type, start, r.end, round(float(r.score), 4)))
    return sorted(chosen, key=lambda item: item.start)


def scrub_text(text: str, found: list[Item]) -> str:
    for item in sorted(found, key=lambda item: -item.start):
        text = text[:item.start] + PLACEHOLDERS[item.entity] + text[item.end:]
    return text


def _walk(value: Any, field: str, location: str, findings: list[Finding], args: ScanArguments) -> Any:
    """Scan every string and number inside a row value (nested lists/dicts: chat messages); return it
    scrubbed if asked. A number is scanned as its text (``4111111111111111``: a card); a scrubbed one
    becomes its placeholder string."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        text = str(value)
    elif isinstance(value, str):
        text = value
    elif isinstance(value, list):
        return [_walk(v, f"{field}[{i}]", location, findings, args) for i, v in enumerate(value)]
    elif isinstance(value, dict):
        return {k: _walk(v, f"{field}.{k}" if field else str(k), location, findings, args) for k, v in value.items()}
    else:
        return value
    found = find_pii(text, args.threshold, field_context(field), args.spacy_model)
    findings.extend(Finding(location, field, e, s, t, mask(text[s:t]), score) for e, s, t, score in found)
    return scrub_text(text, found) if args.scrub and found else value


def scan_file(path: str | os.PathLike, args: ScanArguments | None = None) -> tuple[list[Finding], list[dict]]:
    """Every item found in ``path`` (any format the data loader reads) and the rows, scrubbed when asked."""
    from rlhf.core.data import read_records

    args = args or ScanArguments(file=str(path))
    findings: list[Finding] = []
    rows = [_walk(rec.row, "", rec.location, findings, args) for rec in read_records(path)]
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


@dataclass
class ScanArguments:
    """``rlhf data scan``: what to scan, what counts as found, and the copy to write."""

    # --- what to scan ---
    file: str | None = None
    """The data file to scan (.jsonl/.json/.csv/.parquet) or a datasets save_to_disk directory; on the command
    line it may also be the first word after `rlhf data scan`."""
    threshold: float = SCORE_THRESHOLD
    """Report (and scrub) only items whose score (0..1) is at least this: 1 = checksum-validated (cards, IBANs,
    emails on a public domain), 0.4-0.6 = a pattern (phones, IPs, internal emails), +0.35 with a context word."""
    spacy_model: str | None = None
    """An installed spaCy pipeline with NER (a package such as en_core_web_sm, or a pipeline directory) to find
    person names (PERSON) and places (LOCATION). Without one, names and places are not checked."""
    # --- the copy ---
    scrub: bool = False
    """Write a copy (--out) with each item replaced by a placeholder."""
    out: str | None = None
    """With scrub and/or canaries: the copy to write (.jsonl/.json/.csv/.parquet)."""
    # --- canaries (a memorization check, rlhf/eval/canaries.py; measure with rlhf eval canaries) ---
    canaries: int = 0
    """Plant this many random canaries in the --out copy; recorded in <out stem>.canaries.json."""
    canary_format: str = DEFAULT_FORMAT
    """Canary text, one {} per secret symbol."""
    canary_alphabet: str = DEFAULT_ALPHABET
    """The symbols: comma-separated words, or (no comma) the characters of the string."""
    canary_repeats: int = 1
    """Training rows per canary."""
    canary_unseen: int | None = None
    """Control canaries planted nowhere (default: canaries)."""
    canary_seed: int = 0
    """Seed of the canaries and of the rows they go to."""

    def __post_init__(self) -> None:
        check_ranges(self)
        if not self.file:
            raise UserError("rlhf data scan: expected a data file (rlhf data scan <file>, or --file), found none")
        if not Path(self.file).exists():
            raise UserError(f"{self.file}: no such file or directory")
        if not 0.0 <= self.threshold <= 1.0:
            raise UserError(f"threshold: expected a score between 0 and 1, found {self.threshold:g}")
        for key in ("canaries", "canary_repeats", "canary_unseen"):
            value = getattr(self, key)
            if value is not None and value < (1 if key == "canary_repeats" else 0):
                raise UserError(f"{key}: expected an integer >= {1 if key == 'canary_repeats' else 0}, found {value}")
        if self.scrub and not self.out:
            raise UserError("--scrub: expected --out <file> for the cleaned copy, found none")
        if self.canaries and not self.out:
            raise UserError("--canaries: expected --out <file> for the copy with the canaries, found none")
        if self.out and not (self.scrub or self.canaries):
            raise UserError("--out: only with --scrub or --canaries (a scan alone writes nothing)")
        if self.out and Path(self.out).resolve() == Path(self.file).resolve():
            raise UserError(f"--out {self.out}: expected a new file, found the input itself (keep the original)")
        if self.spacy_model:
            check_spacy_model(self.spacy_model)


NAMES_NOT_CHECKED = ("person names and places were not checked (they need an installed spaCy NER pipeline: "
                     "--spacy_model NAME; docs/privacy.md)")


def scan_command(argv: list[str]) -> int:
    """``rlhf data scan <file> [--key value ...]`` (keys: :class:`ScanArguments`)."""
    if argv and not argv[0].startswith("-"):
        argv = ["--file", argv[0], *argv[1:]]  # the file as its first word, as before the keys
    (args,), _ = build_config([ScanArguments], argv)
    fmt = CanaryFormat(args.canary_format, args.canary_alphabet) if args.canaries else None
    build_analyzer(args.spacy_model)  # a pipeline that fails to load fails here, before the file is read
    findings, rows = scan_file(args.file, args)
    for finding in findings:
        print(finding)
    counts: dict[str, int] = {}
    for finding in findings:
        counts[finding.entity] = counts.get(finding.entity, 0) + 1
    summary = ", ".join(f"{n} {e}" for e, n in sorted(counts.items())) or "nothing"
    summary += f" scoring >= {args.threshold:g}"
    note = "" if args.spacy_model else f"\n{NAMES_NOT_CHECKED}"
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
        print(f"found {summary} in {args.file}; scrubbed copy -> {args.out}{note}")
        return 0
    print(f"found {summary} in {args.file}" + ("; --scrub --out <file> writes a copy without them" if findings else "")
          + note, file=sys.stderr if findings else sys.stdout)
    return FOUND_EXIT_CODE if findings else 0


def data_command(argv: list[str]) -> int:
    """``rlhf data <action>``: ``scan`` (private data in a training file)."""
    if argv[:1] != ["scan"]:
        found = argv[0] if argv else "nothing"
        raise UserError(f"rlhf data: expected an action (scan), found {found!r}")
    return scan_command(argv[1:])
