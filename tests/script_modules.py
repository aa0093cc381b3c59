"""Scripts outside the package (bench/, experiments/, rlhf/demo/ run as files) imported for their tests."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType


@contextlib.contextmanager
def script_module(path: Path, name: str) -> Iterator[ModuleType]:
    """The script at ``path`` run as module ``name``, in sys.modules while it is in use (dataclasses
    look their module up there) and gone afterwards."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)
