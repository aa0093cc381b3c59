"""rlhf.core.allocator: freed memory stays in the process on CPU, unless the user chose otherwise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Each test starts a process that allocates and frees hundreds of MiB.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]

# Frees a 256 MiB tensor (block_mib) and reports how much of it the process still holds.
_CHILD = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from rlhf.core.allocator import keep_freed_memory
applied = keep_freed_memory()
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * 4096
before = rss()
t = torch.ones(64 * 2**20)
del t
print(applied, (rss() - before) / 2**20)
"""


def _run(env_extra: dict[str, str], block_mib: int = 256) -> tuple[bool, float]:
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith("MALLOC_") or k in ("GLIBC_TUNABLES", "RLHF_KEEP_FREED_MEMORY"))}
    env.update(env_extra)
    child = _CHILD.replace("64 * 2**20", f"{block_mib // 4} * 2**20")  # float32: 4 bytes an element
    out = subprocess.run([sys.executable, "-c", child, str(REPO)], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0] == "True", float(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings are Linux-only")
@pytest.mark.parametrize("env", [{}, {"RLHF_KEEP_FREED_MEMORY": "1"}, {"RLHF_KEEP_FREED_MEMORY": "keep"}])
def test_freed_memory_stays_in_the_process(env):
    applied, kept_mib = _run(env, block_mib=32)
    assert applied
    assert kept_mib > 24  # the 32 MiB block went back to the heap (the default and keep alike)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings are Linux-only")
def test_keep_keeps_even_the_largest_blocks():
    applied, kept_mib = _run({"RLHF_KEEP_FREED_MEMORY": "keep"})
    assert applied
    assert kept_mib > 200  # the 256 MiB block was freed to the heap, not unmapped


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings are Linux-only")
@pytest.mark.parametrize("env", [{"RLHF_KEEP_FREED_MEMORY": "0"}, {"MALLOC_MMAP_THRESHOLD_": "65536"}])
def test_opting_out_keeps_glibc_defaults(env):
    applied, kept_mib = _run(env)
    assert not applied
    assert kept_mib < 50  # glibc served the block with mmap and returned it at once


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings are Linux-only")
def test_bounded_default_returns_the_largest_blocks():
    applied, kept_mib = _run({})
    assert applied
    assert kept_mib < 50  # 256 MiB is above the 64 MiB mmap threshold: unmapped when freed
