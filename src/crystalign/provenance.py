"""What every output records about the software that made it."""

from __future__ import annotations

import importlib.metadata as md
import platform


def versions() -> dict[str, str]:
    """Python and key package versions, for checkpoints, sample records and reports."""
    out = {"python": platform.python_version()}
    for pkg in ("crystalign", "torch", "lightning", "pymatgen", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out
