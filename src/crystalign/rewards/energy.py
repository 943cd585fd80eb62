"""Energy-per-atom reward from a pretrained MLIP: R = −scale · E/atom.

Broken geometries give exploitable energies (SevenNet: −1e9 eV/atom for atoms 0.1 Å apart, −8e20 for a flat
cell), and RL finds them. So structures failing the shared validity check never reach the MLIP and get
``invalid_penalty``; energies that are non-finite or outside [min_energy, max_energy] eV/atom are treated the
same way.

The benchmark validity check (min distance 0.5 Å) is not enough to trust an MLIP energy: SevenNet scores an NaCl
cell with one Cl moved to 0.60 Å from a Na at −11.6 eV/atom (the real crystal: −3.4), inside the energy window.
So a second, reward-only *trust check* (:func:`contact_ratio`) makes a structure energy-invalid when any pair
(periodic images included) is closer than ``min_radius_ratio`` × (r_cov,i + r_cov,j); real crystals sit at
>= ~0.7 (perov_5, mp_20), the default is 0.5. Benchmark validity (metrics) is unchanged.

The penalty is a floor: a valid structure's E/atom counts as at most ``invalid_penalty`` in the reward (the raw
energy stays in the info), so breaking a structure further can never raise its reward.

Example::

    reward = EnergyReward("sevenn")                 # or "chgnet", "mace", {"name": "sevenn", "dtype": "float64"}
    result = reward(batch)
    result.info["energy_per_atom_ev"]               # NaN where invalid
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import torch

from crystalign.geometry import ValidityReport, ValidityThresholds, covalent_radius, min_pbc_radius_ratio
from crystalign.rewards.base import RewardResult, as_batch, as_tensor, coerce_thresholds
from crystalign.rewards.mlip import (
    ASECalculatorBackend,
    CHGNetBackend,
    MACEBackend,
    MLIPBackend,
    SevenNetBackend,
    get_backend,
)

if TYPE_CHECKING:  # pragma: no cover
    from pymatgen.core import Structure

    from crystalign.crystal import CrystalBatch

__all__ = [
    "ASECalculatorBackend",
    "CHGNetBackend",
    "EnergyReward",
    "MACEBackend",
    "MLIPBackend",
    "ScreenedEnergies",
    "SevenNetBackend",
    "contact_ratio",
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
#: atoms/Å^3; the sparsest solids are ~0.01, the 10 Å boxes of hull dimers 0.002, a molecule in a 40 Å box 3e-5.
#: Sparser cells (an exploded structure, two atoms thousands of Å apart) make neighbour searches sized by the
#: cell explode (CHGNet asked for 126 GB), so they are not evaluated either.
MIN_NUMBER_DENSITY = 1e-5
#: min over pairs of d_ij / (r_cov,i + r_cov,j) below which an MLIP energy is not trusted. Measured smallest real
#: values: 0.69 (perov_5), 0.76 (mp_20 sample); a Cl moved to 0.60 Å from a Na in NaCl gives 0.36.
MIN_RADIUS_RATIO = 0.5


def contact_ratio(batch: "CrystalBatch") -> np.ndarray:
    """(B,) min over atom pairs (periodic images included, exact in any cell basis) of d_ij / (r_i + r_j), with
    ASE's covalent radii; for geometry-valid structures (see :func:`crystalign.geometry.min_pbc_radius_ratio`)."""
    radii = covalent_radius(batch.species)
    ratio = min_pbc_radius_ratio(batch.frac, batch.lattice, batch.n_atoms, radii)
    return ratio.detach().cpu().numpy().astype(np.float64)


@dataclass
class ScreenedEnergies:
    """Per-structure results of :func:`screened_energies` (numpy, length B).

    A structure is ``valid`` when it passes, in order: the shared validity check (``geometry_ok``), the contact
    trust check (``contact_ok``), the density limits (``dense`` and ``dilute`` False) and the energy guard (``energy_ok``);
    :meth:`reasons` says which failed and by how much.
    """

    energy_per_atom: np.ndarray  # eV/atom, NaN unless ``valid``
    total_energy: np.ndarray  # eV, NaN unless ``valid``
    geometry_ok: np.ndarray  # passed the shared validity check
    energy_ok: np.ndarray  # MLIP energy finite and within bounds (False where not evaluated, e.g. close contact)
    contact_ok: np.ndarray  # passed the contact trust check (min d_ij / (r_i + r_j) >= min_radius_ratio)
    radius_ratio: np.ndarray  # min d_ij / (r_cov,i + r_cov,j); NaN where not computed (geometry-invalid)
    dense: np.ndarray  # denser than max_number_density atoms/Å^3, so not evaluated
    dilute: np.ndarray  # sparser than MIN_NUMBER_DENSITY atoms/Å^3, so not evaluated
    raw_energy_per_atom: np.ndarray  # E/atom as the MLIP returned it (NaN where not evaluated)
    report: ValidityReport
    thresholds: ValidityThresholds
    limits: dict[str, float | None]

    @property
    def valid(self) -> np.ndarray:
        return self.geometry_ok & self.contact_ok & self.energy_ok

    @property
    def invalid_contact(self) -> np.ndarray:
        """Geometry-valid but failed the contact trust check."""
        return self.geometry_ok & ~self.contact_ok

    @property
    def invalid_energy(self) -> np.ndarray:
        """Geometry-valid but the energy is not trusted: close contact, too dense, or energy non-finite / out of
        bounds. With ``~geometry_ok`` this partitions the invalid structures; ``invalid_contact`` is a subset."""
        return self.geometry_ok & ~self.energy_ok

    def reasons(self) -> list[str]:
        """Why each structure is invalid ("" where valid), e.g. ``"close contact: min d_ij/(r_cov,i+r_cov,j)
        0.357 < 0.5"``."""
        geometry = self.report.reasons(self.thresholds)
        limits = self.limits
        out = []
        for i in range(self.geometry_ok.shape[0]):
            if self.valid[i]:
                out.append("")
            elif not self.geometry_ok[i]:
                out.append("geometry: " + geometry[i])
            elif not self.contact_ok[i]:
                out.append(
                    f"close contact: min d_ij/(r_cov,i+r_cov,j) {self.radius_ratio[i]:.3g} < {limits.get('min_radius_ratio')}"
                )
            elif self.dense[i]:
                out.append(f"too dense: more than {limits.get('max_number_density')} atoms/Å^3, not evaluated")
            elif self.dilute[i]:
                out.append(f"too dilute: fewer than {limits.get('min_number_density')} atoms/Å^3, not evaluated")
            elif not np.isfinite(self.raw_energy_per_atom[i]):
                out.append("energy: the MLIP could not evaluate it (non-finite energy)")
            else:
                out.append(
                    f"energy: {self.raw_energy_per_atom[i]:.4g} eV/atom outside "
                    f"[{limits.get('min_energy_per_atom')}, {limits.get('max_energy_per_atom')}]"
                )
        return out


def screened_energies(
    batch: "CrystalBatch",
    backend: MLIPBackend,
    thresholds: ValidityThresholds = ValidityThresholds(),
    min_energy_per_atom: float = MIN_ENERGY_PER_ATOM,
    max_energy_per_atom: float = MAX_ENERGY_PER_ATOM,
    max_number_density: float = MAX_NUMBER_DENSITY,
    min_radius_ratio: float | None = MIN_RADIUS_RATIO,
) -> ScreenedEnergies:
    """Validity check, then the contact trust check, then the MLIP on the structures passing both, then the
    absurd-energy guard.

    ``min_radius_ratio``: a geometry-valid structure with any pair (periodic images included) closer than
    ``min_radius_ratio`` × (r_cov,i + r_cov,j) is not evaluated and is invalid (``contact_ok`` False); None or 0
    switches the trust check off. Structures denser than ``max_number_density`` atoms/Å^3 pass the validity
    check but are not evaluated (``energy_ok`` False): their neighbour lists explode and their energies are
    meaningless; so are structures sparser than :data:`MIN_NUMBER_DENSITY`.
    """
    min_radius_ratio = _check_ratio(min_radius_ratio)
    report = batch.validity(thresholds)
    geometry_ok = report.valid.cpu().numpy().astype(bool)
    b = batch.num_structures
    n = batch.n_atoms.cpu().numpy().astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        density = n / report.volume.detach().cpu().double().numpy()
    dense, dilute = density > max_number_density, density < MIN_NUMBER_DENSITY
    ratio = np.full(b, np.nan)
    contact_ok = geometry_ok.copy()
    g_idx = np.flatnonzero(geometry_ok)
    if g_idx.size:  # the check is only defined for finite, positive-volume cells; cheap next to the MLIP
        ratio[g_idx] = contact_ratio(batch[torch.as_tensor(g_idx, device=batch.device)])
        if min_radius_ratio:
            contact_ok[g_idx] = ratio[g_idx] >= min_radius_ratio
    total = np.full(b, np.nan)
    idx = np.flatnonzero(contact_ok & ~dense & ~dilute)
    if idx.size:
        sub = batch[torch.as_tensor(idx, device=batch.device)]
        energies = np.asarray(backend.energies(sub.to_atoms()), dtype=np.float64).reshape(-1)
        if energies.shape[0] != idx.size:
            raise RuntimeError(f"{backend!r} returned {energies.shape[0]} energies for {idx.size} structures")
        total[idx] = energies
    per_atom = total / n
    with np.errstate(invalid="ignore"):
        energy_ok = np.isfinite(per_atom) & (per_atom >= min_energy_per_atom) & (per_atom <= max_energy_per_atom)
    valid = contact_ok & energy_ok
    return ScreenedEnergies(
        energy_per_atom=np.where(valid, per_atom, np.nan),
        total_energy=np.where(valid, total, np.nan),
        geometry_ok=geometry_ok,
        energy_ok=energy_ok,
        contact_ok=contact_ok,
        radius_ratio=ratio,
        dense=geometry_ok & dense,
        dilute=geometry_ok & dilute,
        raw_energy_per_atom=per_atom,
        report=report,
        thresholds=thresholds,
        limits={
            "min_radius_ratio": min_radius_ratio,
            "max_number_density": max_number_density,
            "min_number_density": MIN_NUMBER_DENSITY,
            "min_energy_per_atom": min_energy_per_atom,
            "max_energy_per_atom": max_energy_per_atom,
        },
    )


class EnergyReward:
    """R = −scale · min(E/atom, invalid_penalty) from an MLIP; invalid structures get E/atom = ``invalid_penalty``.

    The penalty is a floor on the reward: a valid structure whose energy is above ``invalid_penalty`` scores
    exactly like an invalid one, never below it (otherwise breaking a high-energy structure further, into the
    invalid region, would raise its reward). The raw energy stays in ``energy_per_atom_ev``.

    Args:
        backend: ``"sevenn"`` (default, SevenNet-0), ``"chgnet"``, ``"mace"``, a backend mapping
            (``{"name": "sevenn", "dtype": "float64", "device": "cuda"}``) or an :class:`MLIPBackend`.
        invalid_penalty: E/atom (eV) given to invalid structures (3.0 in the paper configs), and the cap on the
            E/atom of valid ones in the reward value.
        scale: reward scale (positive).
        clip_std: if set, valid energies are clipped to the batch mean ± clip_std · std (of valid energies),
            before the penalty cap.
        thresholds: the shared validity thresholds (mapping or :class:`ValidityThresholds`).
        min_energy_per_atom, max_energy_per_atom: energies outside count as invalid (MLIP blow-ups).
        max_number_density: denser structures (atoms/Å^3) are not evaluated and count as invalid.
        min_radius_ratio: the contact trust check: a structure with any pair (periodic images included) closer
            than ``min_radius_ratio`` × (r_cov,i + r_cov,j) is not evaluated and counts as invalid, because MLIPs
            give such fused atoms absurdly low energies within the energy window (default 0.5; real crystals
            sit at >= ~0.7). None or 0 switches it off.

    Info keys: ``energy_per_atom_ev`` (raw MLIP E/atom, NaN where invalid, so means are over valid
    structures), ``contact_ratio`` (min d_ij/(r_cov,i + r_cov,j), NaN where geometry-invalid), and 0/1 flags
    ``valid``, ``invalid_geometry`` (failed the shared check), ``invalid_energy`` (geometry-valid but the energy
    is not trusted: close contact, too dense, or non-finite / out of bounds), ``invalid_contact`` (the subset
    that failed the contact trust check), ``penalty_capped`` (valid, energy above the penalty). :func:`screened_energies` ``(...).reasons()`` gives the reasons as text.
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
        min_radius_ratio: float | None = MIN_RADIUS_RATIO,
    ) -> None:
        if clip_std is not None and clip_std <= 0:
            raise ValueError(f"clip_std must be positive or None, got {clip_std}")
        if not min_energy_per_atom < max_energy_per_atom:
            raise ValueError("min_energy_per_atom must be below max_energy_per_atom")
        if not np.isfinite(invalid_penalty):
            raise ValueError(f"invalid_penalty must be finite, got {invalid_penalty}")
        self.min_radius_ratio = _check_ratio(min_radius_ratio)
        self.backend = get_backend(backend)
        self.invalid_penalty = float(invalid_penalty)
        self.scale = float(scale)
        self.clip_std = clip_std
        self.thresholds = coerce_thresholds(thresholds)
        self.min_energy_per_atom = float(min_energy_per_atom)
        self.max_energy_per_atom = float(max_energy_per_atom)
        self.max_number_density = float(max_number_density)

    def __call__(self, batch: "CrystalBatch | Sequence[Structure]") -> RewardResult:
        batch = as_batch(batch)
        s = self.screen(batch)
        energy = s.energy_per_atom.copy()
        valid = s.valid
        if self.clip_std is not None and valid.sum() > 1:
            mean, std = energy[valid].mean(), energy[valid].std()
            energy[valid] = np.clip(energy[valid], mean - self.clip_std * std, mean + self.clip_std * std)
        with np.errstate(invalid="ignore"):
            capped = valid & (energy > self.invalid_penalty)
        # the penalty is a floor on the reward: valid energies count as at most the penalty
        penalised = np.where(valid, np.minimum(energy, self.invalid_penalty), self.invalid_penalty)
        info = {
            "energy_per_atom_ev": as_tensor(s.energy_per_atom, batch),
            "contact_ratio": as_tensor(s.radius_ratio, batch),
            "valid": as_tensor(valid, batch),
            "invalid_geometry": as_tensor(~s.geometry_ok, batch),
            "invalid_contact": as_tensor(s.invalid_contact, batch),
            "invalid_energy": as_tensor(s.invalid_energy, batch),
            "penalty_capped": as_tensor(capped, batch),
        }
        return RewardResult(as_tensor(-self.scale * penalised, batch), info)

    def screen(self, batch: "CrystalBatch") -> ScreenedEnergies:
        """The screened energies this reward uses (``.reasons()`` explains every invalid structure)."""
        return screened_energies(
            batch, self.backend, self.thresholds, self.min_energy_per_atom, self.max_energy_per_atom,
            self.max_number_density, self.min_radius_ratio,
        )

    def __repr__(self) -> str:
        return (
            f"EnergyReward({self.backend!r}, invalid_penalty={self.invalid_penalty}, scale={self.scale}, "
            f"min_radius_ratio={self.min_radius_ratio})"
        )


def _check_ratio(value: float | None) -> float | None:
    if value is None:
        return None
    value = float(value)
    if not (np.isfinite(value) and 0 <= value < 1):
        raise ValueError(f"min_radius_ratio must be in [0, 1) or None, got {value}")
    return value
