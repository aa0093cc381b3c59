"""Errors a user can cause: reported as one line, exit code 2, no traceback."""

from __future__ import annotations

import codecs
import os
from pathlib import Path


class UserError(Exception):
    """Bad input from the user (file, key, value). The CLI prints ``error: <message>`` and exits 2.

    Messages name the file and line (or the key), what was expected and what was found.
    """

    exit_code = 2


class DataError(UserError):
    """A row of a data file is malformed: ``path:line: field 'x': expected ..., found ...``."""

    def __init__(self, location: str, field: str | None, expected: str, found: object):
        what = f"field '{field}': " if field else ""
        found_text = _describe(found)
        super().__init__(f"{location}: {what}expected {expected}, found {found_text}")
        self.location = location
        self.field = field


def _describe(value: object) -> str:
    if isinstance(value, str) and value.startswith("<") and value.endswith(">"):
        return value[1:-1]  # already a description, e.g. "<missing>"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def read_utf8(path: str | os.PathLike) -> str:
    """A data or config file's text, decoded as UTF-8 (a leading byte-order mark, as Excel writes, is dropped).

    A byte that is not UTF-8 (a Latin-1 or Windows-1252 export, say) is a :class:`DataError` naming
    the line and the byte offset in the file, so the user can find it in an editor or with ``xxd``.
    """
    raw = Path(path).read_bytes()
    start = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return raw[start:].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = start + e.start  # in the file, counting from 0
        line = raw.count(b"\n", 0, offset) + 1
        raise DataError(f"{path}:{line}", None, "UTF-8 text",
                        f"<byte 0x{raw[offset]:02x} at byte offset {offset}; save the file as UTF-8>") from None
