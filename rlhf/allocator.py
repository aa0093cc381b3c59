"""Keep freed memory in the process on CPU machines (glibc malloc settings).

Training on CPU allocates and frees the same large activation buffers every step. glibc's defaults
serve blocks above a (dynamic) threshold with ``mmap`` and trim the heap top back to the OS, so the
next step faults every page in again and the kernel zeroes it: on 2 cores that page-fault work
took a third of the CPU time of an SFT LoRA step (``scripts/bench_sft.py``: 141 tokens/s with the
defaults, 224 with the settings below, the same run otherwise). We turn ``mmap`` off for
allocations and stop trimming, so a step reuses the pages the previous one touched. The price is a
higher peak resident size, as freed blocks stay in a fragmenting heap: +6-10 % for that SFT run
(7.6-7.7 -> 8.2-8.3 GB in two paired runs), more for PPO, whose policy and value graphs do not fit in each other's holes
(``rlhf estimate-memory`` includes it; docs/memory.md). Memory is not handed back until the process
ends.

Set ``RLHF_KEEP_FREED_MEMORY=0`` to keep glibc's defaults. Nothing happens when the environment
already sets glibc's malloc tunables (``MALLOC_*_`` or ``GLIBC_TUNABLES``: whoever set them chose),
on CUDA machines (the caching allocator already reuses its blocks), on other C libraries, or off Linux.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

logger = logging.getLogger(__name__)

# From glibc's malloc.h.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
_applied = False


def keep_freed_memory() -> bool:
    """Apply the settings once per process when training on CPU; True if they are in force."""
    global _applied
    if _applied:
        return True
    if os.environ.get("RLHF_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    if "GLIBC_TUNABLES" in os.environ or any(k.startswith("MALLOC_") and k.endswith("_") for k in os.environ):
        return False
    import torch

    if torch.cuda.is_available():
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    # mallopt returns 1 on success. glibc converts the trim threshold to size_t, so -1 means never
    # trim; the heap grows in 512 MiB steps (untouched pages cost nothing).
    ok = all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1), (_M_TOP_PAD, 512 * 2**20)))
    _applied = ok
    if ok:
        logger.debug("glibc malloc: mmap off, no trimming (RLHF_KEEP_FREED_MEMORY=0 to undo)")
    return ok
