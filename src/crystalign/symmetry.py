"""Space groups of relaxed structures, and whether a small distortion is real or where the optimiser stopped.

spglib labels the same relaxed SrTiO3 minimum P1, Cm, P4mm or Pm-3m depending on its tolerance, so a bare label
cannot tell a real polar distortion from FIRE stopping a few mÅ short of the symmetric point. This module states
ONE tolerance, :data:`SYMPREC` (0.1 Å), for every label in the CLI, API and report, and :func:`examine` settles the
question with the potential itself: wherever the group at :data:`SYMPREC` is not the group at
:data:`TIGHT_SYMPREC` (0.01 Å), a copy is symmetrised to the higher group and relaxed under ASE's ``FixSymmetry``
(all such copies in one batched :func:`~crystalign.relax.relax_batch`); if the symmetric minimum is no more than
:data:`NOISE_MEV` above the unconstrained one (or below it), the distortion is noise.

spglib's default angle tolerance is used throughout (as ASE's ``refine_symmetry``/``FixSymmetry`` and the symmetry
rewards do), so a label, the symmetrised cell and the constrained relaxation always agree on the group.

Example::

    from pymatgen.io.ase import AseAtomsAdaptor
    from crystalign.relax import relax_batch
    from crystalign.rewards.mlip import get_backend
    from crystalign.symmetry import examine, spacegroup_label, unique_after_symmetrization

    backend = get_backend("sevenn")
    relaxed = relax_batch(atoms_list, backend, steps=100, fmax=0.05)          # unconstrained
    structures = [AseAtomsAdaptor.get_structure(a) for a in relaxed]
    energies = [a.info["relax_energy_ev"] / len(a) for a in relaxed]
    rows = examine(structures, energies, backend)
    rows[0]["spacegroups"]     # {"0.01": "P4mm (99)", "0.1": "Pm-3m (221)"}
    rows[0]["symmetry_note"]   # "Pm-3m (221) is 0.3 meV/atom BELOW the unconstrained result: the distortion is noise"
    keep = unique_after_symmetrization([r["symmetric_structure"] for r in rows], energies)
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from ase import Atoms
    from pymatgen.core import Structure

    from crystalign.rewards.mlip import MLIPBackend

#: THE tolerance (Å) of every space-group label crystalign prints, writes or returns
SYMPREC = 0.1
#: the tight tolerance (Å): a structure with the same group here and at :data:`SYMPREC` is "symmetric to 0.01 Å"
TIGHT_SYMPREC = 0.01
#: a symmetric minimum at most this far (meV/atom) above the distorted one means the distortion is noise
NOISE_MEV = 1.0
#: what a label reads when spglib finds no group
NO_LABEL = "—"


def _as_structure(structure: "Structure | Atoms") -> "Structure":
    if hasattr(structure, "get_scaled_positions"):  # ASE Atoms
        from pymatgen.io.ase import AseAtomsAdaptor

        return AseAtomsAdaptor.get_structure(structure)
    return structure


def _spglib_cell(structure: "Structure | Atoms") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if hasattr(structure, "get_scaled_positions"):  # ASE Atoms
        return np.asarray(structure.cell[:]), structure.get_scaled_positions(wrap=False), np.asarray(structure.numbers)
    if not structure.is_ordered:
        raise ValueError("spglib needs an ordered structure")
    return structure.lattice.matrix, structure.frac_coords, np.array([site.specie.Z for site in structure])


def spacegroup(structure: "Structure | Atoms", symprec: float = SYMPREC) -> tuple[str, int] | None:
    """(international symbol, number) of the space group at ``symprec`` Å, or None where spglib fails."""
    import spglib

    try:
        cell = _spglib_cell(structure)
        with warnings.catch_warnings():
            # spglib 2.5+ warns about its legacy None-on-error mode; both modes are handled here
            warnings.simplefilter("ignore", DeprecationWarning)
            data = spglib.get_symmetry_dataset(cell, symprec=symprec)
    except Exception:  # raised on degenerate input by newer spglib (or a disordered structure)
        return None
    if data is None:
        return None
    # spglib < 2.5 returns a dict, newer versions a dataclass
    if isinstance(data, dict):
        return str(data["international"]), int(data["number"])
    return str(data.international), int(data.number)


def spacegroup_label(structure: "Structure | Atoms", symprec: float = SYMPREC) -> str:
    """The space group at ``symprec`` Å as ``"Cm (8)"``; ``"—"`` where spglib fails. pymatgen Structure or ASE Atoms."""
    group = spacegroup(structure, symprec)
    return NO_LABEL if group is None else f"{group[0]} ({group[1]})"


def symmetrized_conventional(structure: "Structure | Atoms", symprec: float = SYMPREC) -> "Structure":
    """The symmetrised conventional standard cell of the group found at ``symprec`` Å (pymatgen Structure).

    Raises ValueError where spglib finds no group.
    """
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    # get_refined_structure (spglib's refine_cell) rather than get_symmetrized_structure: the latter only groups the
    # sites into orbits and leaves them where they were, while the refined cell is the conventional standard cell
    # with the lattice and every atom moved exactly onto the group's positions — a structure that is exactly in the
    # group, fit to write as a CIF and to compare after symmetrisation. (get_conventional_standard_structure is the
    # same cell in pymatgen's orientation convention, computed on top of this one.)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # spglib 2.5+ on its legacy error mode
        sga = SpacegroupAnalyzer(_as_structure(structure), symprec=symprec, angle_tolerance=-1.0)
        return sga.get_refined_structure()


def _mev(x: float) -> str:
    x = abs(x)
    return f"{x:.1f}" if x >= 0.1 else f"{x:.2g}"


def distortion_note(symmetric_label: str, distorted_label: str, above_mev: float, noise_mev: float = NOISE_MEV) -> str:
    """The verdict sentence for a symmetric minimum ``above_mev`` meV/atom above (negative: below) the distorted one."""
    if above_mev < 0:
        return f"{symmetric_label} is {_mev(above_mev)} meV/atom BELOW the unconstrained result: the distortion is noise"
    if above_mev <= noise_mev:
        return (
            f"the distortion is noise: {symmetric_label} is within {noise_mev:g} meV/atom "
            f"({_mev(above_mev)} meV/atom above)"
        )
    return f"{symmetric_label} is {_mev(above_mev)} meV/atom above the distorted {distorted_label}: the distortion is real"


def examine(
    structures: Sequence["Structure"],
    energies_per_atom: Sequence[float],
    backend: "MLIPBackend",
    steps: int = 100,
    fmax: float = 0.05,
    symprec: float = SYMPREC,
    tight: float = TIGHT_SYMPREC,
) -> list[dict[str, Any]]:
    """Space groups at ``tight`` and ``symprec`` Å of relaxed structures, and whether their distortion is real.

    ``energies_per_atom``: each structure's unconstrained relaxed energy (eV/atom, from ``backend``). Where the two
    groups differ, a copy symmetrised to the ``symprec`` group (ASE ``refine_symmetry``) is relaxed under
    ``FixSymmetry`` — all such copies in ONE :func:`~crystalign.relax.relax_batch` call, ``steps``/``fmax`` as there —
    and its energy compared with the unconstrained one (``steps=0``: unrelaxed structures, labels only). One dict per structure, in order:

    - ``spacegroups``: ``{"0.01": label, "0.1": label}`` (keys are the tolerances); ``spacegroup``: the label at
      ``symprec``, the one to print
    - ``symmetric_spacegroup``: the label of the symmetric group (the one at ``symprec``)
    - ``symmetric_energy_per_atom_ev``, ``symmetric_energy_above_mev`` (symmetric minus unconstrained, meV/atom):
      None unless a constrained relaxation ran and converged
    - ``symmetric_relax_status``: None (none ran), ``converged``, ``not_converged`` or ``failed``
    - ``symmetry_note``: one plain sentence with the verdict (:func:`distortion_note`), ``"symmetric to 0.01 Å"``
      where the groups agree, or why there is no verdict
    - ``symmetric_structure``: the constrained-relaxed structure where it converged, else the symmetrised
      conventional cell at ``symprec`` (the structure itself where spglib finds no group)
    """
    from ase.constraints import FixSymmetry
    from ase.spacegroup.symmetrize import refine_symmetry
    from pymatgen.io.ase import AseAtomsAdaptor

    from crystalign.relax import relax_batch

    if len(structures) != len(energies_per_atom):
        raise ValueError(f"{len(structures)} structures but {len(energies_per_atom)} energies")
    tight_key, loose_key = f"{tight:g}", f"{symprec:g}"
    rows: list[dict[str, Any]] = []
    to_relax: list[tuple[int, Atoms]] = []
    for i, (structure, energy) in enumerate(zip(structures, energies_per_atom)):
        structure = _as_structure(structure)
        g_tight, g_loose = spacegroup(structure, tight), spacegroup(structure, symprec)
        label_tight, label_loose = spacegroup_label(structure, tight), spacegroup_label(structure, symprec)
        row: dict[str, Any] = {
            "spacegroups": {tight_key: label_tight, loose_key: label_loose},
            "spacegroup": label_loose,
            "symmetric_spacegroup": label_loose,
            "energy_per_atom_ev": float(energy),
            "symmetric_energy_per_atom_ev": None,
            "symmetric_energy_above_mev": None,
            "symmetric_relax_status": None,
            "symmetry_note": "",
            "symmetric_structure": structure.copy(),
        }
        rows.append(row)
        if g_loose is None:
            row["symmetric_spacegroup"] = None
            row["symmetry_note"] = f"spglib found no space group at {symprec:g} Å"
            continue
        row["symmetric_structure"] = symmetrized_conventional(structure, symprec)
        if g_tight is not None and g_tight[1] == g_loose[1]:
            row["symmetry_note"] = f"symmetric to {tight:g} Å"
            continue
        atoms = AseAtomsAdaptor.get_atoms(structure)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                refine_symmetry(atoms, symprec=symprec)
        except Exception as err:  # spglib disagreeing with itself between iterations
            row["symmetry_note"] = f"could not be symmetrised to {label_loose}: {type(err).__name__}: {err}; no verdict"
            continue
        to_relax.append((i, atoms))

    if to_relax and steps == 0:  # nothing relaxed, nothing to compare: the labels alone
        for i, _ in to_relax:
            rows[i]["symmetry_note"] = f"{rows[i]['spacegroups'][tight_key]} at {tight:g} Å; not relaxed, so no verdict on the distortion"
    elif to_relax:

        def constrain(atoms: "Atoms") -> None:
            atoms.set_constraint(FixSymmetry(atoms, symprec=symprec))

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # FixSymmetry reports its group on stdout only when verbose
            relaxed = relax_batch([a for _, a in to_relax], backend, steps=steps, fmax=fmax, prepare=constrain)
        for (i, _), atoms in zip(to_relax, relaxed):
            _verdict(rows[i], atoms, steps, fmax, tight, tight_key)
    return rows


def _verdict(row: dict[str, Any], atoms: "Atoms", steps: int, fmax: float, tight: float, tight_key: str) -> None:
    from pymatgen.io.ase import AseAtomsAdaptor

    status = atoms.info["relax_status"]
    label = row["symmetric_spacegroup"]
    row["symmetric_relax_status"] = status
    if status == "failed":
        row["symmetry_note"] = f"the {label} relaxation failed ({atoms.info.get('relax_error', '')}): no verdict"
        return
    if status != "converged":
        row["symmetry_note"] = (
            f"the {label} relaxation did not converge in {steps} steps "
            f"(largest force {atoms.info['relax_fmax']:.3f} eV/Å > {fmax:g}): no verdict"
        )
        return
    relaxed = AseAtomsAdaptor.get_structure(atoms)
    kept = spacegroup_label(relaxed, tight)
    if kept != label:  # FixSymmetry keeps the group, so this is only a guard
        row["symmetry_note"] = f"the {label} relaxation ended in {kept} at {tight_key} Å: no verdict"
        return
    e_sym = float(atoms.info["relax_energy_ev"]) / len(atoms)
    row["symmetric_energy_per_atom_ev"] = e_sym
    row["symmetric_structure"] = relaxed
    if not math.isfinite(row["energy_per_atom_ev"]):
        row["symmetry_note"] = f"{label} relaxed to {e_sym:.4f} eV/atom; no unconstrained energy to compare with"
        return
    above = 1000.0 * (e_sym - row["energy_per_atom_ev"])
    row["symmetric_energy_above_mev"] = above
    row["symmetry_note"] = distortion_note(label, row["spacegroups"][tight_key], above)


def unique_after_symmetrization(
    structures: Sequence["Structure"],
    energies: Sequence[float],
    matcher: Any = None,
    symprec: float | None = SYMPREC,
) -> list[int]:
    """Indices of the structures left once duplicates are removed after symmetrisation, lowest energy first.

    Each structure is replaced by its symmetrised conventional cell at ``symprec`` Å (None: compared as given, e.g.
    :func:`examine`'s ``symmetric_structure``; where spglib finds no group, as given), then walked in order of
    ``energies`` (NaN last) and kept unless ``matcher`` (default: the benchmark
    :func:`~crystalign.matching.make_matcher`) matches it to one kept already.
    """
    from crystalign.matching import make_matcher

    if len(structures) != len(energies):
        raise ValueError(f"{len(structures)} structures but {len(energies)} energies")
    matcher = matcher if matcher is not None else make_matcher()
    prepared = []
    for s in structures:
        s = _as_structure(s)
        if symprec is not None:
            try:
                s = symmetrized_conventional(s, symprec)
            except ValueError:
                pass
        prepared.append(s)
    e = np.asarray(energies, dtype=float)
    order = sorted(range(len(prepared)), key=lambda i: (math.isnan(e[i]), e[i] if not math.isnan(e[i]) else 0.0, i))
    kept: list[int] = []
    for i in order:
        duplicate = False
        for j in kept:
            try:
                duplicate = bool(matcher.fit(prepared[j], prepared[i]))
            except Exception:  # a pair the matcher cannot handle is no evidence of a duplicate
                duplicate = False
            if duplicate:
                break
        if not duplicate:
            kept.append(i)
    return kept
