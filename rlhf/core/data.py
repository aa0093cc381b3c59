"""One data loader for every stage: read, validate, normalise and split rows.

Files: JSONL, JSON (an array of objects), CSV, Parquet, or a ``datasets`` ``save_to_disk`` directory;
text files are UTF-8 (a byte that is not is an error naming its line and byte offset).
Every row is validated before any training starts; a bad row is a :class:`~rlhf.core.errors.DataError`
naming ``file:line``, the field, what was expected and what was found.

Row kinds
---------
- ``sft``: ``prompt`` + ``completion``, or chat ``messages`` (the last one from the assistant), or ``text``.
- ``preference``: ``prompt`` + ``chosen`` + ``rejected``; each a string or a list of chat messages.
- ``prompt``: ``prompt`` only (PPO rollouts, generation, labeling campaigns).

Normalised rows always carry ``prompt`` (a string or a list of messages) and, by kind, ``completion``
(a string), ``chosen``/``rejected`` (strings) or ``text``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from rlhf.core.config import check_ranges
from rlhf.core.errors import DataError, UserError, read_utf8

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
ROW_KINDS = ("sft", "preference", "prompt")


@dataclass(frozen=True)
class Record:
    """One raw row and where it came from (``path:line`` or ``path: row i``)."""

    location: str
    row: dict


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


def read_records(path: str | os.PathLike) -> list[Record]:
    """Read every row of a data file (or ``save_to_disk`` directory) with its location."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or directory")
    if path.is_dir():
        return _read_saved_dataset(path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return _read_jsonl(path)
    if suffix == ".json":
        return _read_json_array(path)
    if suffix == ".csv":
        return _read_csv(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    raise UserError(
        f"{path}: unknown data format '{suffix}'; expected .jsonl, .json, .csv, .parquet "
        "or a datasets save_to_disk directory"
    )


def _read_jsonl(path: Path) -> list[Record]:
    records = []
    for line_no, line in enumerate(io.StringIO(read_utf8(path)), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{line_no}", None, "a JSON object", f"<invalid JSON ({e.msg})>")
        if not isinstance(row, dict):
            raise DataError(f"{path}:{line_no}", None, "a JSON object", f"<a JSON {type(row).__name__}>")
        records.append(Record(f"{path}:{line_no}", row))
    if not records:
        raise UserError(f"{path}: expected at least one row, found an empty file")
    return records


def _read_json_array(path: Path) -> list[Record]:
    text = read_utf8(path)
    decoder = json.JSONDecoder()

    def line_of(pos: int) -> int:
        return text.count("\n", 0, pos) + 1

    pos = _skip_ws(text, 0)
    if pos >= len(text) or text[pos] != "[":
        if pos < len(text) and text[pos] == "{":
            # A JSON-lines file named .json is common; accept it.
            return _read_jsonl(path)
        raise DataError(f"{path}:{line_of(pos)}", None, "a JSON array of objects", "<something else>")
    pos = _skip_ws(text, pos + 1)
    records = []
    while pos < len(text) and text[pos] != "]":
        try:
            row, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{line_of(e.pos)}", None, "a JSON object", f"<invalid JSON ({e.msg})>")
        if not isinstance(row, dict):
            raise DataError(f"{path}:{line_of(pos)}", None, "a JSON object", f"<a JSON {type(row).__name__}>")
        records.append(Record(f"{path}:{line_of(pos)}", row))
        pos = _skip_ws(text, end)
        if pos < len(text) and text[pos] == ",":
            pos = _skip_ws(text, pos + 1)
    if not records:
        raise UserError(f"{path}: expected at least one row, found an empty array")
    return records


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _read_csv(path: Path) -> list[Record]:
    records = []
    reader = csv.DictReader(io.StringIO(read_utf8(path), newline=""))
    if reader.fieldnames is None:
        raise UserError(f"{path}: expected a CSV header row, found an empty file")
    start = reader.line_num
    for row in reader:
        # JSON-encoded chat messages are allowed in CSV cells.
        parsed = {k: _maybe_json_list(v) for k, v in row.items() if k is not None}
        records.append(Record(f"{path}:{start + 1}", parsed))
        start = reader.line_num
    if not records:
        raise UserError(f"{path}: expected at least one row, found only a header")
    return records


def _maybe_json_list(value: Any) -> Any:
    if isinstance(value, str) and value.startswith("[") and value.endswith("]"):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _read_parquet(path: Path) -> list[Record]:
    import datasets

    ds = datasets.Dataset.from_parquet(str(path))
    return [Record(f"{path}: row {i + 1}", dict(row)) for i, row in enumerate(ds)]


def _read_saved_dataset(path: Path) -> list[Record]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"{path}: expected a datasets save_to_disk directory ({e})")
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise UserError(f"{path}: expected a 'train' split in the DatasetDict, found {list(ds)}")
        ds = ds["train"]
    return [Record(f"{path}: row {i + 1}", dict(row)) for i, row in enumerate(ds)]


# ----------------------------------------------------------------------------------------------
# Validation and normalisation
# ----------------------------------------------------------------------------------------------


def _check_text(rec: Record, field: str, allow_messages: bool) -> str | list[dict]:
    if field not in rec.row or rec.row[field] is None:
        found = "<missing>" if field not in rec.row else None
        raise DataError(rec.location, field, _expected_text(allow_messages), found)
    value = rec.row[field]
    if isinstance(value, str):
        if not value.strip():
            raise DataError(rec.location, field, _expected_text(allow_messages), "<an empty string>")
        return value
    if allow_messages and isinstance(value, list):
        return _check_messages(rec, field, value)
    raise DataError(rec.location, field, _expected_text(allow_messages), value)


def _expected_text(allow_messages: bool) -> str:
    return "a non-empty string or a list of chat messages" if allow_messages else "a non-empty string"


def _check_messages(rec: Record, field: str, messages: list) -> list[dict]:
    if not messages:
        raise DataError(rec.location, field, "a non-empty list of chat messages", "<an empty list>")
    out = []
    for i, m in enumerate(messages):
        where = f"{field}[{i}]"
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(rec.location, where, "a message {'role': ..., 'content': ...}", m)
        if m["role"] not in ROLES:
            raise DataError(rec.location, f"{where}.role", f"one of {', '.join(ROLES)}", m["role"])
        if not isinstance(m["content"], str):
            raise DataError(rec.location, f"{where}.content", "a string", m["content"])
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _reply_text(rec: Record, field: str, value: str | list[dict]) -> str:
    """A reply given as messages must be one assistant message; we keep its text."""
    if isinstance(value, str):
        return value
    if len(value) != 1 or value[0]["role"] != "assistant":
        raise DataError(rec.location, field, "a string or a single assistant message", value)
    return value[0]["content"]


def normalize_row(rec: Record, kind: str) -> dict:
    """Validate one raw row of the given kind and return its normalised form."""
    row = rec.row
    if kind == "sft":
        if "messages" in row:
            messages = _check_messages(rec, "messages", row["messages"] or [])
            if messages[-1]["role"] != "assistant":
                raise DataError(
                    rec.location, "messages", "the last message to be from the assistant", messages[-1]["role"]
                )
            if len(messages) < 2:
                raise DataError(rec.location, "messages", "at least one message before the assistant reply", "1 message")
            return {"prompt": messages[:-1], "completion": messages[-1]["content"]}
        if "prompt" in row or "completion" in row:
            prompt = _check_text(rec, "prompt", allow_messages=True)
            completion = _reply_text(rec, "completion", _check_text(rec, "completion", allow_messages=True))
            return {"prompt": prompt, "completion": completion}
        if "text" in row:
            return {"prompt": "", "text": _check_text(rec, "text", allow_messages=False)}
        raise DataError(
            rec.location, None, "an SFT row with 'prompt'+'completion', 'messages' or 'text'", f"<fields {sorted(row)}>"
        )
    if kind == "preference":
        prompt = _check_text(rec, "prompt", allow_messages=True)
        chosen = _reply_text(rec, "chosen", _check_text(rec, "chosen", allow_messages=True))
        rejected = _reply_text(rec, "rejected", _check_text(rec, "rejected", allow_messages=True))
        if chosen == rejected:
            raise DataError(rec.location, "rejected", "a reply different from 'chosen'", "<the same text>")
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if kind == "prompt":
        return {"prompt": _check_text(rec, "prompt", allow_messages=True)}
    raise ValueError(f"unknown row kind {kind!r}; expected one of {ROW_KINDS}")


def load_rows(path: str | os.PathLike, kind: str) -> list[dict]:
    """Read and validate every row of ``path`` as ``kind``; raises on the first bad row."""
    rows = [normalize_row(rec, kind) for rec in read_records(path)]
    if kind == "sft":
        kinds = {"text" if "text" in r else "prompt/completion" for r in rows}
        if len(kinds) > 1:
            raise UserError(f"{path}: expected one SFT row format per file, found both {' and '.join(sorted(kinds))}")
    return rows


# ----------------------------------------------------------------------------------------------
# Splitting
# ----------------------------------------------------------------------------------------------


def _split_count(size: float, n: int, name: str) -> int:
    if size < 0:
        raise UserError(f"{name}: expected a fraction in [0, 1) or a row count >= 1, found {size}")
    return int(round(size * n)) if size < 1 else int(size)


def split_rows(
    rows: list[dict], validation_size: float, test_size: float, seed: int
) -> dict[str, list[dict]]:
    """Deterministic train/validation/test split: shuffle with ``seed``, then cut.

    Sizes below 1 are fractions of the rows, sizes of 1 or more are row counts.
    """
    n = len(rows)
    n_val = _split_count(validation_size, n, "validation_size")
    n_test = _split_count(test_size, n, "test_size")
    if n_val + n_test >= n:
        raise UserError(
            f"validation_size + test_size: expected fewer than the {n} rows, found {n_val} + {n_test}"
        )
    order = list(range(n))
    random.Random(seed).shuffle(order)
    shuffled = [rows[i] for i in order]
    return {
        "train": shuffled[n_val + n_test :],
        "validation": shuffled[:n_val],
        "test": shuffled[n_val : n_val + n_test],
    }


def prompt_key(prompt: str | list[dict]) -> str:
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


def warn_prompt_overlap(splits: dict[str, list[dict]]) -> list[str]:
    """Warn (and return the messages) when the same prompt lands in two splits."""
    seen: dict[str, set[str]] = {}
    for name, rows in splits.items():
        for r in rows:
            if r.get("prompt"):
                seen.setdefault(prompt_key(r["prompt"]), set()).add(name)
    messages = []
    shared: dict[tuple[str, ...], int] = {}
    for names in seen.values():
        if len(names) > 1:
            key = tuple(sorted(names))
            shared[key] = shared.get(key, 0) + 1
    for names, count in sorted(shared.items()):
        msg = f"{count} prompt(s) appear in more than one split ({' and '.join(names)}): held-out figures may be optimistic"
        logger.warning(msg)
        messages.append(msg)
    return messages


def load_splits(
    train_file: str,
    kind: str,
    *,
    validation_file: str | None = None,
    test_file: str | None = None,
    validation_size: float = 0.1,
    test_size: float = 0.1,
    seed: int = 42,
    max_train_samples: int | None = None,
) -> dict[str, list[dict]]:
    """Load train rows and, from files or by a seeded split, validation and test rows."""
    train = load_rows(train_file, kind)
    validation = load_rows(validation_file, kind) if validation_file else None
    test = load_rows(test_file, kind) if test_file else None
    if validation is None or test is None:
        split = split_rows(
            train,
            validation_size if validation is None else 0,
            test_size if test is None else 0,
            seed,
        )
        train = split["train"]
        validation = validation if validation is not None else split["validation"]
        test = test if test is not None else split["test"]
    if max_train_samples is not None:
        train = train[:max_train_samples]
    splits = {"train": train, "validation": validation, "test": test}
    warn_prompt_overlap(splits)
    return splits


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Write rows as JSON lines (UTF-8, one object per line)."""
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


@dataclass
class DataArguments:
    """Where a stage's rows come from and how they are split (shared by every stage)."""

    train_file: str = ""
    """Training rows: .jsonl, .json, .csv, .parquet or a datasets save_to_disk directory."""
    validation_file: str | None = None
    """Validation rows; None splits them off train_file (validation_size)."""
    test_file: str | None = None
    """Held-out test rows; None splits them off train_file (test_size)."""
    validation_size: float = 0.1
    """Fraction (< 1) or count (>= 1) of train_file rows held out for validation when no file is given."""
    test_size: float = 0.1
    """Fraction (< 1) or count (>= 1) of train_file rows held out for testing when no file is given."""
    split_seed: int = 42
    """Seed of the deterministic train/validation/test split."""
    max_train_samples: int | None = None
    """Keep only the first N training rows (after the split), for quick runs."""

    def __post_init__(self) -> None:
        check_ranges(self)  # also when built in code rather than by build_config

    def load(self, kind: str) -> dict[str, list[dict]]:
        if not self.train_file:
            raise UserError("train_file: expected a data file path, found none (set it in the config or --train_file)")
        return load_splits(
            self.train_file,
            kind,
            validation_file=self.validation_file,
            test_file=self.test_file,
            validation_size=self.validation_size,
            test_size=self.test_size,
            seed=self.split_seed,
            max_train_samples=self.max_train_samples,
        )
