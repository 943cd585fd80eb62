"""Where data and caches live. Environment variables override the defaults; CLI options override both."""

from __future__ import annotations

import os
from pathlib import Path

DATA_ROOT_ENV = "CRYSTALIGN_DATA_ROOT"
CACHE_ENV = "CRYSTALIGN_CACHE"


def data_root(override: str | os.PathLike | None = None) -> Path | None:
    """The local data root searched first for named datasets (``--data-root`` or $CRYSTALIGN_DATA_ROOT)."""
    value = override if override is not None else os.environ.get(DATA_ROOT_ENV)
    return Path(value).expanduser() if value else None


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """Download cache ($CRYSTALIGN_CACHE, else $XDG_CACHE_HOME/crystalign, else ~/.cache/crystalign)."""
    if override is not None:
        return Path(override).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "crystalign"


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_allocator(mmap_threshold: int = 32 << 20, trim_threshold: int = 512 << 20) -> bool:
    """Keep freed tensor buffers of up to ``mmap_threshold`` bytes in the heap (Linux/glibc only).

    By default glibc serves large blocks with fresh ``mmap`` pages and returns them on free, so every new
    (edges x hidden) activation pays a page fault per 4 KiB on first touch; how often depends on the heap's
    history (glibc adapts its threshold), which made CPU sampling speed drift by 20 % from run to run. Fixed
    thresholds make it both faster and steady; the price is that up to ``trim_threshold`` bytes of freed heap stay
    with the process. The ``crystalign`` command calls this; library users may. Returns whether it was applied;
    set ``CRYSTALIGN_NO_MALLOC_TUNING=1`` to leave the allocator alone.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux") or os.environ.get("CRYSTALIGN_NO_MALLOC_TUNING"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold))) and bool(mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)))
