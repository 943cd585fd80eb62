"""Symmetry rewards from spglib (symprec 0.1 Å): 1 when the structure has the property, else 0; invalid → 0.

Each reward has its own flag key (``non_triclinic``, ``non_centrosymmetric``) so both can sit in one composite.

Example::

    NonTriclinicReward()(batch).info["space_group_number"]
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from crystalign.geometry import ValidityThresholds
from crystalign.rewards.base import RewardResult, as_batch, as_tensor, coerce_thresholds

if TYPE_CHECKING:  # pragma: no cover
    from pymatgen.core import Structure

    from crystalign.crystal import CrystalBatch


def symmetry_data(batch: "CrystalBatch", symprec: float = 0.1, valid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Space-group numbers (0 where skipped or spglib fails) and whether the group contains the inversion −I."""
    import spglib

    b = batch.num_structures
    numbers = np.zeros(b, dtype=np.int64)
    inversion = np.zeros(b, dtype=bool)
    minus_identity = -np.eye(3, dtype=np.int64)
    for i, (z, frac, lattice) in enumerate(batch._per_structure_numpy()):
        if valid is not None and not valid[i]:
            continue
        try:
            with warnings.catch_warnings():
                # spglib 2.5+ warns about its legacy None-on-error mode; both modes are handled here
                warnings.simplefilter("ignore", DeprecationWarning)
                data = spglib.get_symmetry_dataset((lattice, frac, z), symprec=symprec)
        except Exception:  # raised on degenerate input by newer spglib
            data = None
        if data is None:
            continue
        # spglib < 2.5 returns a dict, newer versions a dataclass
        number, rotations = (data["number"], data["rotations"]) if isinstance(data, dict) else (data.number, data.rotations)
        numbers[i] = int(number)
        inversion[i] = any(np.array_equal(np.asarray(r), minus_identity) for r in rotations)
    return numbers, inversion


class _SymmetryReward:
    name = ""
    flag = ""

    def __init__(
        self,
        symprec: float = 0.1,
        scale: float = 1.0,
        thresholds: ValidityThresholds | Mapping[str, float] | None = None,
    ) -> None:
        self.symprec = float(symprec)
        self.scale = float(scale)
        self.thresholds = coerce_thresholds(thresholds)

    def _has_property(self, numbers: np.ndarray, inversion: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, batch: "CrystalBatch | Sequence[Structure]") -> RewardResult:
        batch = as_batch(batch)
        valid = batch.validity(self.thresholds).valid.cpu().numpy().astype(bool)
        numbers, inversion = symmetry_data(batch, self.symprec, valid)
        hit = valid & self._has_property(numbers, inversion)
        info = {
            self.flag: as_tensor(hit, batch),
            "space_group_number": as_tensor(np.where(numbers > 0, numbers, np.nan), batch),
            "valid": as_tensor(valid, batch),
        }
        return RewardResult(as_tensor(self.scale * hit, batch), info)


class NonTriclinicReward(_SymmetryReward):
    """1 if the spglib space group number is > 2 (not P1 or P-1), else 0. Info: ``non_triclinic``."""

    name = "non_triclinic"
    flag = "non_triclinic"

    def _has_property(self, numbers: np.ndarray, inversion: np.ndarray) -> np.ndarray:
        return numbers > 2


class NonCentrosymmetricReward(_SymmetryReward):
    """1 if the space group number is > 2 and has no inversion (−I) operation, else 0. Info: ``non_centrosymmetric``."""

    name = "non_centrosymmetric"
    flag = "non_centrosymmetric"

    def _has_property(self, numbers: np.ndarray, inversion: np.ndarray) -> np.ndarray:
        return (numbers > 2) & ~inversion
