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
