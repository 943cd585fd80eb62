"""Training coverage: do compositions lie inside what a base model saw in training?

One check (elements seen in training, atoms per cell within the training range), shown three ways:
:func:`coverage_warnings` for one composition (``crystalign predict``), :func:`composition_coverage_warnings`
once per distinct composition of a batch (``sample``, ``rl sample``) and :func:`coverage_summary` as one
counted line (``rl fit``). It lives apart from the main job and the RL trainer so that both use it without
importing each other.

Example::

    for w in composition_coverage_warnings(Generator.load("perov_5"), composition_batch(["NaCl"], 4)):
        print(w)    # NaCl: element(s) Cl never appear in this model's training data; ...
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from crystalign.crystal import CrystalBatch
    from crystalign.generator import Generator


def coverage_warnings(gen: "Generator", species: Sequence[int]) -> list[str]:
    """Human-readable warnings when one composition (atomic numbers of one cell) is outside the model's
    training coverage; none when the model records no coverage."""
    from pymatgen.core import Element

    cov = gen.coverage or {}
    out = []
    seen = set(cov.get("elements") or [])
    if seen:
        unseen = sorted({Element.from_Z(z).symbol for z in species} - seen)
        if unseen:
            out.append(f"element(s) {', '.join(unseen)} never appear in this model's training data; expect poor structures")
    lo, hi = cov.get("n_atoms_min"), cov.get("n_atoms_max")
    if lo is not None and hi is not None and not lo <= len(species) <= hi:
        out.append(f"{len(species)} atoms per cell lies outside the training range {lo}–{hi}")
    return out


def distinct_compositions(batch: "CrystalBatch") -> Counter[tuple[int, ...]]:
    """How many structures of ``batch`` hold each composition (sorted atomic numbers of a cell), in order of
    first appearance."""
    per_structure = batch.species.cpu().split(batch.n_atoms.cpu().tolist())
    return Counter(tuple(sorted(s.tolist())) for s in per_structure)


def composition_coverage_warnings(gen: "Generator", batch: "CrystalBatch") -> list[str]:
    """:func:`coverage_warnings` once per distinct composition of ``batch``, each prefixed by its formula."""
    from pymatgen.core import Composition, Element

    from crystalign.generator import cell_formula

    out = []
    for species in distinct_compositions(batch):
        # pymatgen's formula orders elements by electronegativity (SrTiO3, not O3SrTi)
        formula = cell_formula(Composition(Composition({Element.from_Z(z).symbol: species.count(z) for z in set(species)}).formula))
        out += [f"{formula}: {w}" for w in coverage_warnings(gen, species)]
    return out


def coverage_summary(gen: "Generator", batch: "CrystalBatch", limit: int = 3) -> str | None:
    """One summarised warning (or None) when compositions of ``batch`` (the training compositions of an RL
    run) lie outside the model's training coverage: the ``limit`` most frequent problems with their counts."""
    problems: Counter[str] = Counter()
    outside = 0
    for species, count in distinct_compositions(batch).items():
        found = coverage_warnings(gen, species)
        outside += count if found else 0
        for w in found:
            problems[w] += count
    if not problems:
        return None
    shown = "; ".join(f"{w} ({c}x)" for w, c in problems.most_common(limit))
    more = f"; and {len(problems) - limit} other problem(s)" if len(problems) > limit else ""
    return f"{outside} of {batch.num_structures} training compositions lie outside the base model's training coverage: {shown}{more}"
