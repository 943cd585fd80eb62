"""What every output records about the software that made it."""

from __future__ import annotations

import functools
import importlib.metadata as md
import platform


def versions() -> dict[str, str]:
    """Python and key package versions, for checkpoints, sample records and reports."""
    return dict(_versions())  # a copy: callers may add to it


@functools.cache  # installed versions do not change within a process; every RL checkpoint records them
def _versions() -> tuple[tuple[str, str], ...]:
    out = {"python": platform.python_version()}
    # the MLIP packages and ASE compute every energy and relaxation: their versions are part of the result
    for pkg in ("crystalign", "torch", "lightning", "pymatgen", "numpy", "ase", "spglib", "sevenn", "chgnet", "mace-torch"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return tuple(out.items())
