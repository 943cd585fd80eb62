"""Torus and lattice helpers, and THE validity check shared by rewards, metrics and sampling.

Conventions: lattice rows are lattice vectors (ASE/pymatgen), Cartesian = frac @ lattice,
fractional coordinates live in [0, 1).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from crystalign.ops import scatter_max, scatter_min, scatter_sum

#: Benchmark validity thresholds (CDVAE/DiffCSP/OMatG convention).
MIN_VOLUME = 0.1  # Å^3
MIN_DISTANCE = 0.5  # Å
MIN_POLAR_SINE = 1e-3

_SHIFTS = torch.tensor(list(itertools.product((-1, 0, 1), repeat=3)), dtype=torch.float64)


def wrap(x: torch.Tensor) -> torch.Tensor:
    """Map fractional coordinates onto [0, 1)."""
    x = torch.remainder(x, 1.0)
    # remainder can return exactly 1.0 for tiny negative inputs in float32
    return torch.where(x >= 1.0, x - 1.0, x)


def min_image(dx: torch.Tensor) -> torch.Tensor:
    """Per-coordinate minimum image of a fractional displacement, in [-1/2, 1/2)."""
    return torch.remainder(dx + 0.5, 1.0) - 0.5


def unwrap(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """The periodic image of ``x1`` nearest to ``x0`` (per coordinate, fractional space)."""
    return x0 + min_image(x1 - x0)


def volume(lattice: torch.Tensor) -> torch.Tensor:
    """Absolute cell volume, (B,3,3) -> (B,)."""
    return torch.linalg.det(lattice).abs()


def polar_sine(lattice: torch.Tensor) -> torch.Tensor:
    """V / (a b c): 1 for orthogonal cells, 0 for flat ones."""
    lengths = lattice.norm(dim=-1)
    return volume(lattice) / lengths.prod(dim=-1).clamp_min(1e-30)


def lattice_params(lattice: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Lengths (B,3) in Å and angles (B,3) alpha, beta, gamma in degrees."""
    a, b, c = lattice.unbind(-2)
    lengths = lattice.norm(dim=-1)

    def angle(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        cos = (u * v).sum(-1) / (u.norm(dim=-1) * v.norm(dim=-1)).clamp_min(1e-30)
        return torch.rad2deg(torch.arccos(cos.clamp(-1.0, 1.0)))

    return lengths, torch.stack([angle(b, c), angle(a, c), angle(a, b)], dim=-1)


def lattice_from_params(lengths: torch.Tensor, angles_deg: torch.Tensor) -> torch.Tensor:
    """Cell matrix from (a,b,c) and (alpha,beta,gamma) in degrees; ASE ``cellpar_to_cell`` orientation
    (a along x, b in the xy plane)."""
    al, be, ga = torch.deg2rad(angles_deg).unbind(-1)
    a, b, c = lengths.unbind(-1)
    cos_al, cos_be, cos_ga = torch.cos(al), torch.cos(be), torch.cos(ga)
    sin_ga = torch.sin(ga)
    zeros = torch.zeros_like(a)
    va = torch.stack([a, zeros, zeros], -1)
    vb = torch.stack([b * cos_ga, b * sin_ga, zeros], -1)
    cx = cos_be
    cy = (cos_al - cos_be * cos_ga) / sin_ga
    cz = torch.sqrt((1.0 - cx**2 - cy**2).clamp_min(0.0))
    vc = c.unsqueeze(-1) * torch.stack([cx, cy, cz], -1)
    return torch.stack([va, vb, vc], dim=-2)


def min_pbc_distance(
    frac: torch.Tensor, lattice: torch.Tensor, n_atoms: torch.Tensor, chunk_pairs: int = 1 << 18
) -> torch.Tensor:
    """Shortest interatomic distance (Å) of every structure under periodic boundary conditions.

    Includes an atom's distance to its own periodic images (the shortest lattice vector), so a
    collapsed cell is caught even for one-atom structures. Pairs are taken minimum-image in
    fractional space and checked against the 27 neighbouring images; the result is then proven
    exhaustive per structure from the interplanar spacings, and skewed cells where it is not (their
    shortest image can lie many cells away) are LLL-reduced and searched again. Exact for every
    cell with a positive volume.
    """
    best = _min_pbc_search(frac, lattice, n_atoms, None, chunk_pairs)
    return best.to(frac.dtype) if frac.is_floating_point() else best


def covalent_radius(species: torch.Tensor) -> torch.Tensor:
    """Covalent radii (Å, float64) of atomic numbers, from ASE's table (Cordero et al. 2008; 0.2 Å where the
    table has no value, Z > 96, which makes the contact check below lenient for those elements)."""
    from ase.data import covalent_radii

    table = torch.as_tensor(covalent_radii, dtype=torch.float64, device=species.device)
    z = species.long()
    if z.numel() and (int(z.min()) < 1 or int(z.max()) >= table.numel()):
        raise ValueError(f"atomic numbers must lie in 1..{table.numel() - 1}, got {int(z.min())}..{int(z.max())}")
    return table[z]


def min_pbc_radius_ratio(
    frac: torch.Tensor,
    lattice: torch.Tensor,
    n_atoms: torch.Tensor,
    radii: torch.Tensor,
    chunk_pairs: int = 1 << 18,
) -> torch.Tensor:
    """Per structure, the minimum over atom pairs of d_ij / (r_i + r_j) under periodic boundary conditions (B,)
    float64, with ``radii`` (N,) positive per-atom radii (e.g. :func:`covalent_radius`).

    Same search as :func:`min_pbc_distance` (all pairs including an atom and its own images, exact in any cell
    basis: skewed cells are LLL-reduced and searched again), so ~0.5 flags two atoms fused far beyond any real
    bond (real crystals sit at >= ~0.7) even where their distance passes the absolute 0.5 Å benchmark check.
    Only meaningful for geometry-valid structures (finite, positive volume): check those first.
    """
    radii = torch.as_tensor(radii, dtype=torch.float64, device=frac.device).reshape(-1)
    if radii.numel() != frac.shape[0]:
        raise ValueError(f"radii has {radii.numel()} entries for {frac.shape[0]} atoms")
    if radii.numel() and not bool((radii > 0).all() & torch.isfinite(radii).all()):
        raise ValueError("radii must be positive and finite")
    return _min_pbc_search(frac, lattice, n_atoms, radii, chunk_pairs)


def _min_pbc_search(
    frac: torch.Tensor, lattice: torch.Tensor, n_atoms: torch.Tensor, radii: torch.Tensor | None, chunk_pairs: int
) -> torch.Tensor:
    """(B,) float64 minimum pair distance (``radii`` None) or minimum d_ij / (r_i + r_j), exact in any basis.

    The 27-image search from the minimum-image displacement is exhaustive for a structure when every image that
    could beat the current best lies within one cell (``_image_reach``). For distances that radius is the best
    distance itself; for ratios an image pair with ratio below ``best`` has d < best * (r_i + r_j) <= best *
    max(r_i + r_j), so the radius is best * 2 max(r). Other structures are LLL-reduced and searched again.
    """
    lat64 = lattice.to(torch.float64)
    frac64 = frac.to(torch.float64)
    best = _nearest_image_search(frac64, lat64, n_atoms, _SHIFTS.to(frac.device), chunk_pairs, radii)
    if radii is None:
        reach_radius = best
    else:
        atom_batch = torch.repeat_interleave(torch.arange(n_atoms.numel(), device=frac.device), n_atoms.long())
        reach_radius = best * 2.0 * scatter_max(radii, atom_batch, n_atoms.numel(), fill=0.0)
    redo = (_image_reach(lat64, reach_radius) > 1).any(-1) & (volume(lat64) > 0) & torch.isfinite(best)
    if redo.any():
        idx = redo.nonzero().squeeze(1)
        sub_frac, sub_lat = _lll_reduce(frac64, lat64, n_atoms, idx)
        sub_radii = None
        if radii is not None:  # the atoms of the structures idx, in order (_lll_reduce keeps the site order)
            sub_radii = radii[redo[atom_batch]]
        reach = int(_image_reach(sub_lat, reach_radius[idx]).max().clamp(1, _MAX_REACH))
        axis = range(-reach, reach + 1)
        shifts = torch.tensor(list(itertools.product(axis, axis, axis)), dtype=torch.float64, device=frac.device)
        best[idx] = torch.minimum(
            best[idx], _nearest_image_search(sub_frac, sub_lat, n_atoms[idx], shifts, chunk_pairs, sub_radii)
        )
    return best


# An LLL-reduced cell needs at most a couple of neighbouring cells per axis; this caps the search
# for pathological inputs (the structure is then invalid by its polar sine anyway).
_MAX_REACH = 4


def _image_reach(lattice: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """(B,3): how many cells along each axis an image closer than ``radius`` can lie from the
    minimum-image displacement. A vector v has fractional component |f_a| <= |v| / h_a, with h_a the
    spacing of the lattice planes a; a minimum-image start adds 1/2."""
    a, b, c = lattice.unbind(-2)
    cross = torch.stack([torch.cross(b, c, dim=-1), torch.cross(c, a, dim=-1), torch.cross(a, b, dim=-1)], dim=-2)
    spacing = volume(lattice).unsqueeze(-1) / cross.norm(dim=-1).clamp_min(1e-300)
    return torch.floor(radius.unsqueeze(-1) / spacing.clamp_min(1e-300) + 0.5)


def _lll_reduce(
    frac: torch.Tensor, lattice: torch.Tensor, n_atoms: torch.Tensor, idx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fractional coordinates and LLL-reduced lattices of the structures ``idx`` (same Cartesian sites)."""
    from pymatgen.core import Lattice

    offsets = (torch.cumsum(n_atoms, 0) - n_atoms).tolist()
    counts = n_atoms.tolist()
    fracs, lats = [], []
    for i in idx.tolist():
        lat = Lattice(lattice[i].cpu().numpy())
        fracs.append(torch.from_numpy(lat.get_lll_frac_coords(frac[offsets[i] : offsets[i] + counts[i]].cpu().numpy())))
        lats.append(torch.from_numpy(lat.lll_matrix))
    return torch.cat(fracs).to(frac), torch.stack(lats).to(lattice)


def _nearest_image_search(
    frac: torch.Tensor,
    lattice: torch.Tensor,
    n_atoms: torch.Tensor,
    shifts: torch.Tensor,
    chunk_pairs: int,
    radii: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per structure, the shortest distance over all pairs (self included) and the given image shifts; with
    per-atom ``radii``, the smallest distance / (r_i + r_j) instead."""
    b = n_atoms.numel()
    src, dst, pair_batch = all_pairs(n_atoms, include_self=True)
    best = torch.full((b,), float("inf"), dtype=torch.float64, device=frac.device)
    chunk = max(1, chunk_pairs * 27 // shifts.shape[0])
    for start in range(0, src.numel(), chunk):
        s, d, pb = src[start : start + chunk], dst[start : start + chunk], pair_batch[start : start + chunk]
        df = min_image(frac[d] - frac[s])  # (P,3)
        cand = df.unsqueeze(1) + shifts.unsqueeze(0)  # (P,S,3)
        dist = torch.einsum("pkj,pjl->pkl", cand, lattice[pb]).norm(dim=-1)
        # a self pair at zero shift is the atom itself, not an image
        self_zero = (s == d).unsqueeze(1) & (cand.abs().sum(-1) < 1e-12)
        dist = dist.masked_fill(self_zero, float("inf")).min(dim=1).values
        if radii is not None:  # the radius sum is the same for every image of a pair
            dist = dist / (radii[s] + radii[d])
        best = torch.minimum(best, scatter_min(dist, pb, b, fill=float("inf")))
    return best


def all_pairs(n_atoms: torch.Tensor, include_self: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fully connected intra-crystal pairs (src, dst, structure index), built per structure.

    With ``include_self`` every ordered pair (i, j) including i == j; otherwise i != j.
    Cost is sum(n_i^2), never (sum n_i)^2.
    """
    device = n_atoms.device
    n_atoms = n_atoms.long()
    offsets = torch.cumsum(n_atoms, 0) - n_atoms
    n_pairs = n_atoms * n_atoms
    pair_batch = torch.repeat_interleave(torch.arange(n_atoms.numel(), device=device), n_pairs)
    local = torch.arange(int(n_pairs.sum()), device=device) - torch.repeat_interleave(torch.cumsum(n_pairs, 0) - n_pairs, n_pairs)
    n_rep = n_atoms[pair_batch]
    i = local // n_rep
    j = local % n_rep
    src = offsets[pair_batch] + i
    dst = offsets[pair_batch] + j
    if not include_self:
        keep = i != j
        src, dst, pair_batch = src[keep], dst[keep], pair_batch[keep]
    return src, dst, pair_batch


@dataclass(frozen=True)
class ValidityThresholds:
    min_volume: float = MIN_VOLUME
    min_distance: float = MIN_DISTANCE
    min_polar_sine: float = MIN_POLAR_SINE


@dataclass
class ValidityReport:
    """Per-structure validity with the reason for every failure."""

    valid: torch.Tensor  # (B,) bool
    volume: torch.Tensor  # (B,) Å^3
    min_distance: torch.Tensor  # (B,) Å
    polar_sine: torch.Tensor  # (B,)

    def reasons(self, thresholds: ValidityThresholds = ValidityThresholds()) -> list[str]:
        out = []
        for v, d, p, ok in zip(self.volume.tolist(), self.min_distance.tolist(), self.polar_sine.tolist(), self.valid.tolist()):
            if ok:
                out.append("")
                continue
            why = []
            if not (v >= thresholds.min_volume):
                why.append(f"volume {v:.3g} Å^3 < {thresholds.min_volume}")
            if not (d >= thresholds.min_distance):
                why.append(f"min distance {d:.3g} Å < {thresholds.min_distance}")
            if not (p >= thresholds.min_polar_sine):
                why.append(f"polar sine {p:.3g} < {thresholds.min_polar_sine}")
            out.append("; ".join(why) or "non-finite geometry")
        return out


def check_validity(
    frac: torch.Tensor,
    lattice: torch.Tensor,
    n_atoms: torch.Tensor,
    thresholds: ValidityThresholds = ValidityThresholds(),
) -> ValidityReport:
    """The single validity check: volume, minimum PBC distance and polar sine, vectorised.

    Non-finite coordinates or lattices are invalid. Never raises on degenerate geometry.
    """
    finite_lat = torch.isfinite(lattice).flatten(1).all(-1)
    batch = torch.repeat_interleave(torch.arange(n_atoms.numel(), device=frac.device), n_atoms.long())
    bad_atoms = (~torch.isfinite(frac).all(-1)).to(torch.long)
    finite_pos = scatter_sum(bad_atoms, batch, n_atoms.numel()) == 0
    safe_lat = torch.where(finite_lat[:, None, None], lattice, torch.zeros_like(lattice))
    safe_frac = torch.where(torch.isfinite(frac), frac, torch.zeros_like(frac))
    vol = volume(safe_lat)
    ps = polar_sine(safe_lat)
    md = min_pbc_distance(safe_frac, safe_lat, n_atoms)
    valid = (
        finite_lat
        & finite_pos
        & (vol >= thresholds.min_volume)
        & (ps >= thresholds.min_polar_sine)
        & (md >= thresholds.min_distance)
    )
    return ValidityReport(valid=valid, volume=vol, min_distance=md, polar_sine=ps)
