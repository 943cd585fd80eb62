"""The development split protocol: a named dataset (or file) and a fixed, seeded held-out fraction.

Example::

    train, holdout, sha256 = load_training_data(DataConfig(dataset="perov_5", holdout_fraction=0.1))
"""

from __future__ import annotations

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


def load_training_data(cfg: DataConfig, data_root: str | None = None) -> tuple[CrystalBatch, CrystalBatch, str]:
    """(train, holdout, sha256 of the source file) for a dataset name or path."""
    from crystalign.data import load_dataset

    ds = load_dataset(cfg.dataset, split=cfg.split, data_root=data_root, niggli=cfg.niggli, primitive=cfg.primitive)
    source = ds.source
    if cfg.max_structures:
        ds = ds.subset(np.arange(min(cfg.max_structures, len(ds))))
    if cfg.holdout_fraction > 0:
        train_ds, hold_ds = ds.random_split(cfg.holdout_fraction, seed=cfg.split_seed)
    else:
        train_ds, hold_ds = ds, ds.subset(np.arange(0))
    from crystalign.data.download import sha256_file

    digest = sha256_file(source) if source is not None and Path(source).is_file() else ""
    return train_ds.batch, hold_ds.batch, digest
