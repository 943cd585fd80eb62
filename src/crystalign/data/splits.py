"""The development split protocol: a named dataset (or file) and a fixed, seeded held-out fraction.

Example::

    train, holdout, sha256 = load_training_data(DataConfig(dataset="perov_5", holdout_fraction=0.1))
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from crystalign.crystal import CrystalBatch


@dataclass
class DataConfig:
    """Which structures to train on. ``holdout_fraction`` of them (seeded) is kept for validation."""

    dataset: str = "perov_5"
    split: str = "val"
    holdout_fraction: float = 0.1
    split_seed: int = 0
    niggli: bool = True
    primitive: bool = False
    max_structures: int | None = None
    #: leave out unreadable or invalid structures (with a warning naming them) instead of stopping
    skip_bad: bool = False


def load_training_data(cfg: DataConfig, data_root: str | None = None) -> tuple[CrystalBatch, CrystalBatch, str]:
    """(train, holdout, sha256 of the source file) for a dataset name or path."""
    from crystalign.data import load_dataset

    ds = load_dataset(
        cfg.dataset, split=cfg.split, data_root=data_root, niggli=cfg.niggli, primitive=cfg.primitive, skip_bad=cfg.skip_bad
    )
    if ds.skipped:
        shown = "; ".join(f"{sid}: {why}" for sid, why in ds.skipped[:5])
        more = f" (and {len(ds.skipped) - 5} more)" if len(ds.skipped) > 5 else ""
        warnings.warn(f"data.skip_bad: left out {len(ds.skipped)} structure(s) of {cfg.dataset}: {shown}{more}", stacklevel=2)
    source = ds.source
    if cfg.max_structures:
        ds = ds.subset(np.arange(min(cfg.max_structures, len(ds))))
    if cfg.holdout_fraction > 0:
        train_ds, hold_ds = ds.random_split(cfg.holdout_fraction, seed=cfg.split_seed)
    else:
        train_ds, hold_ds = ds, ds.subset(np.arange(0))
    digest = _source_digest(source)
    return train_ds.batch, hold_ds.batch, digest


def _source_digest(source: str | Path | None) -> str:
    """sha256 of the data a run trains on: the file, or every file of a folder (names and bytes, in name order),
    so that ``--resume`` notices a changed dataset either way."""
    from crystalign.data.download import sha256_file

    if source is None:
        return ""
    path = Path(source)
    if path.is_file():
        return sha256_file(path)
    if not path.is_dir():
        return ""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
        digest.update(f"{file.relative_to(path).as_posix()}:{sha256_file(file)};".encode())
    return digest.hexdigest()
