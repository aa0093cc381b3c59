"""glibc malloc settings for training on CPU machines: how much freed memory stays in the process.

Training on CPU allocates and frees the same large activation buffers every step. glibc's defaults
serve blocks above a sliding threshold (at most 32 MiB) with ``mmap`` and trim the heap top back to
the OS, so the next step faults those pages in again and the kernel zeroes them: on 2 cores that
page-fault work took a third of the CPU time of an SFT LoRA step. Keeping freed memory in the
process avoids it, at the price of a higher peak resident size: freed blocks stay in a heap that
fragments, most for PPO, whose policy and value graphs do not fit in each other's holes. The
settings, chosen with ``RLHF_KEEP_FREED_MEMORY`` (figures: docs/memory.md, "The allocator"):

    bounded  (default) mmap only for blocks of 64 MiB and more (a fixed threshold instead of glibc's
             sliding one, which starts at 128 KiB), heap trimmed only when 256 MiB are free at its
             top: the step's many mid-sized buffers are reused, the few huge ones (vocabulary
             logits, the fused LM head's tiles) go back to the OS and leave no holes
    keep     mmap off, heap never trimmed, grown in 512 MiB steps: every freed block is reused by
             the next step, and the heap fragments
    0        glibc's defaults

Nothing happens when the environment already sets glibc's malloc tunables (``MALLOC_*_`` or
``GLIBC_TUNABLES``: whoever set them chose), on CUDA machines (the caching allocator already
reuses its blocks), on other C libraries, or off Linux. ``rlhf estimate-memory`` assumes the default.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

logger = logging.getLogger(__name__)

# From glibc's malloc.h.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -2, -3, -4
MiB = 2**20
# mallopt (parameter, value) pairs per setting. glibc converts the trim threshold to size_t, so -1
# means never trim; untouched pages of the 512 MiB top pad cost nothing.
SETTINGS = {
    "keep": ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1), (_M_TOP_PAD, 512 * MiB)),
    "bounded": ((_M_MMAP_THRESHOLD, 64 * MiB), (_M_TRIM_THRESHOLD, 256 * MiB)),
}
DEFAULT = "bounded"
_ALIASES = {"1": DEFAULT, "": DEFAULT, "keep": "keep", "bounded": "bounded"}
_applied: str | None = None


def setting() -> str | None:
    """The setting ``RLHF_KEEP_FREED_MEMORY`` asks for: bounded (1, the default), keep, or None (0: glibc's)."""
    value = os.environ.get("RLHF_KEEP_FREED_MEMORY", "1").strip().lower()
    if value in ("0", "false", "no", "glibc"):
        return None
    if value not in _ALIASES:
        logger.warning("RLHF_KEEP_FREED_MEMORY=%s: expected 1, bounded, keep or 0; using %s", value, DEFAULT)
        return DEFAULT
    return _ALIASES[value]


def keep_freed_memory() -> bool:
    """Apply the chosen setting once per process when training on CPU; True if one is in force."""
    global _applied
    if _applied:
        return True
    chosen = setting()
    if chosen is None or not sys.platform.startswith("linux"):
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
    ok = all(mallopt(param, value) == 1 for param, value in SETTINGS[chosen])  # 1 = success
    if ok:
        _applied = chosen
        logger.debug("glibc malloc: %s (RLHF_KEEP_FREED_MEMORY=0 for glibc's defaults)", chosen)
    return ok
