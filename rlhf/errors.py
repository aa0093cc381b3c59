"""Errors a user can cause: reported as one line, exit code 2, no traceback."""

from __future__ import annotations


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
