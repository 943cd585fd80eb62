"""Energy-per-atom reward from a pretrained MLIP: R = −scale · E/atom.

Broken geometries give exploitable energies (SevenNet: −1e9 eV/atom for atoms 0.1 Å apart, −8e20 for a flat
cell), and RL finds them. So structures failing the shared validity check never reach the MLIP and get
``invalid_penalty``; energies that are non-finite or outside [min_energy, max_energy] eV/atom are treated the
same way.

Example::

    reward = EnergyReward("sevenn")                 # or "chgnet", "mace", {"name": "sevenn", "dtype": "float64"}
    result = reward(batch)
    result.info["energy_per_atom_ev"]               # NaN where invalid
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import torch

from crystalign.geometry import ValidityThresholds
from crystalign.rewards.base import RewardResult, as_tensor, coerce_thresholds
from crystalign.rewards.mlip import (
    ASECalculatorBackend,
    CHGNetBackend,
    MACEBackend,
    MLIPBackend,
    SevenNetBackend,
    get_backend,
)

if TYPE_CHECKING:  # pragma: no cover
    from crystalign.crystal import CrystalBatch

__all__ = [
    "ASECalculatorBackend",
    "CHGNetBackend",
    "EnergyReward",
    "MACEBackend",
    "MLIPBackend",
    "ScreenedEnergies",
    "SevenNetBackend",
    "get_backend",
    "screened_energies",
]

#: below this an MLIP has blown up (the most bound real solids are around −10 eV/atom)
MIN_ENERGY_PER_ATOM = -20.0
#: above this the number is meaningless rather than merely high
MAX_ENERGY_PER_ATOM = 20.0
#: atoms/Å^3; the densest solids are ~0.18 (diamond). Denser cells pass the validity check but blow up MLIP
#: neighbour lists (CHGNet took a minute on 8 atoms at 2/Å^3) and give garbage, so they are not evaluated.
MAX_NUMBER_DENSITY = 0.5


@dataclass
class ScreenedEnergies:
    """Per-structure results of :func:`screened_energies` (numpy, length B)."""

    energy_per_atom: np.ndarray  # eV/atom, NaN unless ``valid``
    total_energy: np.ndarray  # eV, NaN unless ``valid``
    geometry_ok: np.ndarray  # passed the shared validity check
    energy_ok: np.ndarray  # MLIP energy finite and within bounds (False where not evaluated)

    @property
    def valid(self) -> np.ndarray:
        return self.geometry_ok & self.energy_ok


def screened_energies(
    batch: "CrystalBatch",
    backend: MLIPBackend,
    thresholds: ValidityThresholds = ValidityThresholds(),
    min_energy_per_atom: float = MIN_ENERGY_PER_ATOM,
    max_energy_per_atom: float = MAX_ENERGY_PER_ATOM,
    max_number_density: float = MAX_NUMBER_DENSITY,
) -> ScreenedEnergies:
    """Validity check, then the MLIP on the valid structures only, then the absurd-energy guard.

    Structures denser than ``max_number_density`` atoms/Å^3 pass the validity check but are not evaluated
    (``energy_ok`` False): their neighbour lists explode and their energies are meaningless.
    """
    report = batch.validity(thresholds)
    geometry_ok = report.valid.cpu().numpy().astype(bool)
    b = batch.num_structures
    n = batch.n_atoms.cpu().numpy().astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        dense = n / report.volume.detach().cpu().double().numpy() > max_number_density
    total = np.full(b, np.nan)
    idx = np.flatnonzero(geometry_ok & ~dense)
    if idx.size:
        sub = batch[torch.as_tensor(idx, device=batch.device)]
        energies = np.asarray(backend.energies(sub.to_atoms()), dtype=np.float64).reshape(-1)
        if energies.shape[0] != idx.size:
            raise RuntimeError(f"{backend!r} returned {energies.shape[0]} energies for {idx.size} structures")
        total[idx] = energies
    per_atom = total / n
    with np.errstate(invalid="ignore"):
        energy_ok = np.isfinite(per_atom) & (per_atom >= min_energy_per_atom) & (per_atom <= max_energy_per_atom)
    valid = geometry_ok & energy_ok
    return ScreenedEnergies(
        energy_per_atom=np.where(valid, per_atom, np.nan),
        total_energy=np.where(valid, total, np.nan),
        geometry_ok=geometry_ok,
        energy_ok=energy_ok,
    )


class EnergyReward:
    """R = −scale · E/atom from an MLIP; invalid structures get E/atom = ``invalid_penalty``.

    Args:
        backend: ``"sevenn"`` (default, SevenNet-0), ``"chgnet"``, ``"mace"``, a backend mapping
            (``{"name": "sevenn", "dtype": "float64", "device": "cuda"}``) or an :class:`MLIPBackend`.
        invalid_penalty: E/atom (eV) given to invalid structures (3.0 in the paper configs).
        scale: reward scale.
        clip_std: if set, valid energies are clipped to the batch mean ± clip_std · std (of valid energies).
        thresholds: the shared validity thresholds (mapping or :class:`ValidityThresholds`).
        min_energy_per_atom, max_energy_per_atom: energies outside count as invalid (MLIP blow-ups).
        max_number_density: denser structures (atoms/Å^3) are not evaluated and count as invalid.

    Info keys: ``energy_per_atom_ev`` (NaN where invalid, so means are over valid structures),
    ``valid``, ``invalid_geometry``, ``invalid_energy`` (0/1 flags).
    """

    name = "energy"

    def __init__(
        self,
        backend: str | Mapping[str, Any] | MLIPBackend = "sevenn",
        invalid_penalty: float = 3.0,
        scale: float = 1.0,
        clip_std: float | None = None,
        thresholds: ValidityThresholds | Mapping[str, float] | None = None,
        min_energy_per_atom: float = MIN_ENERGY_PER_ATOM,
        max_energy_per_atom: float = MAX_ENERGY_PER_ATOM,
        max_number_density: float = MAX_NUMBER_DENSITY,
    ) -> None:
        if clip_std is not None and clip_std <= 0:
            raise ValueError(f"clip_std must be positive or None, got {clip_std}")
        if not min_energy_per_atom < max_energy_per_atom:
            raise ValueError("min_energy_per_atom must be below max_energy_per_atom")
        self.backend = get_backend(backend)
        self.invalid_penalty = float(invalid_penalty)
        self.scale = float(scale)
        self.clip_std = clip_std
        self.thresholds = coerce_thresholds(thresholds)
        self.min_energy_per_atom = float(min_energy_per_atom)
        self.max_energy_per_atom = float(max_energy_per_atom)
        self.max_number_density = float(max_number_density)

    def __call__(self, batch: "CrystalBatch") -> RewardResult:
        s = screened_energies(
            batch, self.backend, self.thresholds, self.min_energy_per_atom, self.max_energy_per_atom, self.max_number_density
        )
        energy = s.energy_per_atom.copy()
        valid = s.valid
        if self.clip_std is not None and valid.sum() > 1:
            mean, std = energy[valid].mean(), energy[valid].std()
            energy[valid] = np.clip(energy[valid], mean - self.clip_std * std, mean + self.clip_std * std)
        penalised = np.where(valid, energy, self.invalid_penalty)
        info = {
            "energy_per_atom_ev": as_tensor(s.energy_per_atom, batch),
            "valid": as_tensor(valid, batch),
            "invalid_geometry": as_tensor(~s.geometry_ok, batch),
            "invalid_energy": as_tensor(s.geometry_ok & ~s.energy_ok, batch),
        }
        return RewardResult(as_tensor(-self.scale * penalised, batch), info)

    def __repr__(self) -> str:
        return f"EnergyReward({self.backend!r}, invalid_penalty={self.invalid_penalty}, scale={self.scale})"
