"""CrystalBatch: a batch of periodic crystals as flat tensors.

Layout (PyG-style, but plain torch):

* ``species``  (N,)    atomic numbers, N = total atoms in the batch
* ``frac``     (N, 3)  fractional coordinates in [0, 1)
* ``lattice``  (B, 3, 3) cell matrices, rows are lattice vectors
* ``n_atoms``  (B,)    atoms per structure; atoms of a structure are contiguous
* ``batch``    (N,)    structure index of every atom (derived)
* ``ids``      optional list of B identifiers (material ids, file/row names)

Example::

    batch = CrystalBatch.from_structures([Structure.from_file("SrTiO3.cif")])
    group = batch.repeat_interleave(8)        # 8 copies per structure, contiguous (RL groups)
    structures = group.to_structures()
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np
import torch

from crystalign.geometry import ValidityReport, ValidityThresholds, check_validity, wrap

if TYPE_CHECKING:  # pragma: no cover
    from ase import Atoms
    from pymatgen.core import Structure

MAX_ATOMIC_NUMBER = 100


@dataclass
class CrystalBatch:
    species: torch.Tensor
    frac: torch.Tensor
    lattice: torch.Tensor
    n_atoms: torch.Tensor
    ids: list[str] | None = None
    batch: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.species = torch.as_tensor(self.species, dtype=torch.long)
        self.n_atoms = torch.as_tensor(self.n_atoms, dtype=torch.long, device=self.species.device)
        if self.frac.dim() != 2 or self.frac.shape[-1] != 3:
            raise ValueError(f"frac must have shape (N, 3), got {tuple(self.frac.shape)}")
        if self.lattice.dim() != 3 or self.lattice.shape[-2:] != (3, 3):
            raise ValueError(f"lattice must have shape (B, 3, 3), got {tuple(self.lattice.shape)}")
        if self.n_atoms.numel() != self.lattice.shape[0]:
            raise ValueError(f"{self.n_atoms.numel()} atom counts for {self.lattice.shape[0]} lattices")
        if int(self.n_atoms.sum()) != self.species.numel() or self.species.numel() != self.frac.shape[0]:
            raise ValueError(
                f"atom counts disagree: sum(n_atoms)={int(self.n_atoms.sum())}, species={self.species.numel()}, "
                f"frac={self.frac.shape[0]}"
            )
        if self.ids is not None and len(self.ids) != self.num_structures:
            raise ValueError(f"{len(self.ids)} ids for {self.num_structures} structures")
        self.batch = torch.repeat_interleave(torch.arange(self.num_structures, device=self.species.device), self.n_atoms)

    # ------------------------------------------------------------------ basic properties
    @property
    def num_structures(self) -> int:
        return int(self.n_atoms.numel())

    def __len__(self) -> int:
        return self.num_structures

    @property
    def num_atoms(self) -> int:
        return int(self.species.numel())

    @property
    def ptr(self) -> torch.Tensor:
        """(B+1,) offsets: atoms of structure i are ``ptr[i]:ptr[i+1]``."""
        return torch.cat([self.n_atoms.new_zeros(1), torch.cumsum(self.n_atoms, 0)])

    @property
    def device(self) -> torch.device:
        return self.frac.device

    @property
    def dtype(self) -> torch.dtype:
        return self.frac.dtype

    def cartesian(self) -> torch.Tensor:
        """(N, 3) Cartesian positions in Å."""
        return torch.einsum("ni,nij->nj", self.frac, self.lattice[self.batch])

    def replace(self, **changes) -> "CrystalBatch":
        """A copy with some fields replaced (``batch`` is re-derived)."""
        fields = dict(species=self.species, frac=self.frac, lattice=self.lattice, n_atoms=self.n_atoms, ids=self.ids)
        fields.update(changes)
        return CrystalBatch(**fields)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "CrystalBatch":
        """Move to a device and/or cast the floating fields (frac, lattice) to ``dtype``."""
        return self.replace(
            species=self.species.to(device),
            frac=self.frac.to(device=device, dtype=dtype),
            lattice=self.lattice.to(device=device, dtype=dtype),
            n_atoms=self.n_atoms.to(device),
        )

    def wrapped(self) -> "CrystalBatch":
        return self.replace(frac=wrap(self.frac))

    # ------------------------------------------------------------------ combining / selecting
    @staticmethod
    def cat(batches: Sequence["CrystalBatch"]) -> "CrystalBatch":
        if not batches:
            raise ValueError("cannot concatenate an empty list of batches")
        ids = None
        if all(b.ids is not None for b in batches):
            ids = [i for b in batches for i in b.ids]  # type: ignore[union-attr]
        return CrystalBatch(
            species=torch.cat([b.species for b in batches]),
            frac=torch.cat([b.frac for b in batches]),
            lattice=torch.cat([b.lattice for b in batches]),
            n_atoms=torch.cat([b.n_atoms for b in batches]),
            ids=ids,
        )

    def atom_mask(self, structure_index: torch.Tensor) -> torch.Tensor:
        """Boolean (N,) mask of the atoms belonging to the selected structures (bool mask or indices)."""
        sel = torch.zeros(self.num_structures, dtype=torch.bool, device=self.species.device)
        sel[structure_index] = True
        return sel[self.batch]

    def __getitem__(self, index) -> "CrystalBatch":
        """Select structures by int, slice, list, index tensor or boolean mask (order is kept as given)."""
        idx = torch.arange(self.num_structures, device=self.species.device)[index]
        if idx.dim() == 0:
            idx = idx.unsqueeze(0)
        atom_idx = _atom_indices(self.ptr, self.n_atoms, idx)
        return CrystalBatch(
            species=self.species[atom_idx],
            frac=self.frac[atom_idx],
            lattice=self.lattice[idx],
            n_atoms=self.n_atoms[idx],
            ids=None if self.ids is None else [self.ids[i] for i in idx.tolist()],
        )

    def repeat_interleave(self, repeats: int) -> "CrystalBatch":
        """Each structure ``repeats`` times, copies contiguous (s0,s0,...,s1,s1,...): GRPO groups."""
        idx = torch.repeat_interleave(torch.arange(self.num_structures, device=self.species.device), repeats)
        return self[idx]

    def split(self, size: int) -> Iterable["CrystalBatch"]:
        for start in range(0, self.num_structures, size):
            yield self[start : start + size]

    # ------------------------------------------------------------------ validity
    def validity(self, thresholds: ValidityThresholds = ValidityThresholds()) -> ValidityReport:
        """The shared validity check (volume, min PBC distance, polar sine) for every structure."""
        return check_validity(self.frac, self.lattice, self.n_atoms, thresholds)

    # ------------------------------------------------------------------ compositions
    def compositions(self) -> list[dict[int, int]]:
        """Per-structure {atomic number: count}."""
        out = []
        for z in torch.split(self.species.cpu(), self.n_atoms.cpu().tolist()):
            values, counts = torch.unique(z, return_counts=True)
            out.append(dict(zip(values.tolist(), counts.tolist())))
        return out

    def formulas(self) -> list[str]:
        from pymatgen.core import Composition, Element

        return [
            Composition({Element.from_Z(z): n for z, n in comp.items()}).formula.replace(" ", "")
            for comp in self.compositions()
        ]

    # ------------------------------------------------------------------ pymatgen / ASE
    @classmethod
    def from_structures(cls, structures: Sequence["Structure"], ids: Sequence[str] | None = None, dtype=torch.float64) -> "CrystalBatch":
        """Exact conversion from pymatgen Structures (ordered sites only)."""
        species, frac, lattice, n_atoms = [], [], [], []
        for k, s in enumerate(structures):
            if not s.is_ordered:
                name = ids[k] if ids is not None else f"structure {k}"
                raise ValueError(f"{name}: partial occupancy / disordered sites are not supported ({s.composition})")
            species.append(np.array([site.specie.Z for site in s], dtype=np.int64))
            frac.append(np.asarray(s.frac_coords, dtype=np.float64))
            lattice.append(np.asarray(s.lattice.matrix, dtype=np.float64))
            n_atoms.append(len(s))
        return cls._from_numpy(species, frac, lattice, n_atoms, ids, dtype)

    def to_structures(self) -> list["Structure"]:
        """pymatgen Structures (coordinates are given fractional, lattice rows as vectors)."""
        from pymatgen.core import Lattice, Structure

        out = []
        for z, f, lat in self._per_structure_numpy():
            out.append(Structure(Lattice(lat), z.tolist(), f, coords_are_cartesian=False))
        return out

    @classmethod
    def from_atoms(cls, atoms_list: Sequence["Atoms"], ids: Sequence[str] | None = None, dtype=torch.float64) -> "CrystalBatch":
        """Exact conversion from ASE Atoms (scaled positions are wrapped to [0, 1))."""
        species, frac, lattice, n_atoms = [], [], [], []
        for k, atoms in enumerate(atoms_list):
            if not all(atoms.pbc):
                name = ids[k] if ids is not None else f"structure {k}"
                raise ValueError(f"{name}: only fully periodic structures are supported (pbc={atoms.pbc.tolist()})")
            species.append(np.asarray(atoms.numbers, dtype=np.int64))
            frac.append(np.asarray(atoms.get_scaled_positions(wrap=False), dtype=np.float64))
            lattice.append(np.asarray(atoms.cell.array, dtype=np.float64))
            n_atoms.append(len(atoms))
        return cls._from_numpy(species, frac, lattice, n_atoms, ids, dtype)

    def to_atoms(self) -> list["Atoms"]:
        from ase import Atoms

        return [Atoms(numbers=z, scaled_positions=f, cell=lat, pbc=True) for z, f, lat in self._per_structure_numpy()]

    # ------------------------------------------------------------------ internals
    def _per_structure_numpy(self):
        counts = self.n_atoms.cpu().tolist()
        z_all = self.species.cpu().numpy()
        f_all = self.frac.detach().cpu().to(torch.float64).numpy()
        lat_all = self.lattice.detach().cpu().to(torch.float64).numpy()
        start = 0
        for i, n in enumerate(counts):
            yield z_all[start : start + n], f_all[start : start + n], lat_all[i]
            start += n

    @classmethod
    def _from_numpy(cls, species, frac, lattice, n_atoms, ids, dtype) -> "CrystalBatch":
        if not n_atoms:
            raise ValueError("no structures given")
        z = np.concatenate(species)
        bad = (z < 1) | (z > MAX_ATOMIC_NUMBER)
        if bad.any():
            raise ValueError(f"atomic numbers must lie in 1..{MAX_ATOMIC_NUMBER}, got {sorted(set(z[bad].tolist()))}")
        lat = np.stack(lattice)
        f = np.concatenate(frac)
        if not np.isfinite(lat).all() or not np.isfinite(f).all():
            raise ValueError("non-finite lattice or coordinates")
        f = np.mod(f, 1.0)
        f[f >= 1.0] -= 1.0
        return cls(
            species=torch.from_numpy(z),
            frac=torch.from_numpy(f).to(dtype),
            lattice=torch.from_numpy(lat).to(dtype),
            n_atoms=torch.tensor(n_atoms, dtype=torch.long),
            ids=list(ids) if ids is not None else None,
        )


def _atom_indices(ptr: torch.Tensor, n_atoms: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    counts = n_atoms[idx]
    starts = ptr[:-1][idx]
    offsets = torch.arange(int(counts.sum()), device=idx.device) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    return torch.repeat_interleave(starts, counts) + offsets
