"""De novo generation (DNG) metrics, as CDVAE, DiffCSP and MatterGen report them.

:func:`dng_metrics` judges a set of generated structures against a reference set (the dataset's test or val
split) and, optionally, the training set and energies above a convex hull. Every rate is a fraction in [0, 1].

Definitions (``n`` = number of generated structures; ``None`` entries, unreadable or failed generations, count
in ``n`` and fail every test):

* **Validity** (CDVAE, Xie et al. 2022, arXiv:2110.06197):

  - ``struct_valid``: fraction passing the package's shared structural check
    (:func:`crystalign.metrics.structure_validity`: the same test as the CSP metrics, i.e. minimum interatomic
    distance, cell volume and shape).
  - ``comp_valid``: fraction whose composition is charge neutral with the anions more electronegative than the
    cations for some assignment of oxidation states (:func:`smact_validity`, CDVAE's SMACT test: single
    elements and all-metal alloys are valid).
  - ``valid``: structurally and compositionally valid.

* **Coverage** (CDVAE's ``compute_cov``, also used by DiffCSP/FlowMM/OMatG): every structure gets a structure
  fingerprint (the mean over sites of matminer's ``CrystalNNFingerprint.from_preset("ops")``) and a composition
  fingerprint (matminer's ``ElementProperty.from_preset("magpie")``, standardised per feature; NaN features
  become 0 after scaling). Distances are Euclidean. With cutoffs (δ_struct, δ_comp):

  - ``cov_recall`` (COV-R): fraction of references whose nearest generated structure in structure-fingerprint
    space is within δ_struct AND whose nearest generated structure in composition space is within δ_comp.
    As in CDVAE the two nearest neighbours are taken separately (they may be different structures).
  - ``cov_precision`` (COV-P): number of generated structures within δ_struct of some reference AND within
    δ_comp of some reference, divided by ``n``.
  - As in CDVAE, every generated structure whose fingerprints can be computed takes part (CDVAE passes its whole
    generated set to ``compute_cov``, not only the valid ones); one whose fingerprint fails is dropped but still
    counts in COV-P's denominator.
  - ``cov_recall_valid`` / ``cov_precision_valid``: a stricter variant over valid generated structures only,
    where ONE generated structure must lie within both cutoffs of a reference (and vice versa); COV-P's
    denominator is then the number of valid generated structures.
  - ``cov_precision_struct`` / ``cov_precision_comp`` (and ``cov_recall_struct`` / ``cov_recall_comp``): the
    same fractions with one cutoff alone, so a shortfall of COV-P or COV-R says which fingerprint limits it.
  - ``amsd_*`` / ``amcd_*``: CDVAE's mean nearest-neighbour structure / composition distances.
  - Cutoffs: ``thresholds`` or the CDVAE value of ``dataset`` (:data:`CDVAE_COV_CUTOFFS`: perov_5 and carbon_24
    (0.2, 4), mp_20 (0.4, 10)).
  - Composition scaling: as in CDVAE, by fixed constants over a broad chemistry, not by the reference set: the
    default ``comp_scaler="broad"`` is the per-feature mean and standard deviation over the genuine MP-20 rows
    of ``mp_20_sample`` (81 elements; ``crystalign/data/magpie_scaler.json``, made by
    ``scripts/make_comp_scaler.py``). CDVAE's own constants (``CompScalerMeans``/``CompScalerStds``) can be
    passed as ``comp_scaler=(means, stds)``. ``comp_scaler="reference"`` scales by the reference set itself: on a
    set with little compositional spread (perov_5) its standard deviations are small, composition distances
    grow, and COV falls far below the published figures (the comp cutoffs 4 and 10 were tuned on CDVAE's scale).

* **Wasserstein distances** (``scipy.stats.wasserstein_distance``) between valid generated and all reference
  structures: ``wdist_density`` (g/cm^3), ``wdist_num_atoms`` (atoms per cell) and ``wdist_num_elems``
  (distinct elements per structure; CDVAE's ``wdist_num_elems``).

* **Uniqueness and novelty** (StructureMatcher with the benchmark tolerances stol 0.5, ltol 0.3, angle_tol 10,
  :data:`crystalign.matching.BENCHMARK_TOLERANCES`; only structures of equal reduced composition are compared):

  - ``uniqueness``: fraction of valid generated structures not matched by an earlier valid generated structure
    (the first of each group of duplicates is the unique one).
  - ``novelty``: fraction of the unique valid structures not matched by any training structure (only when
    ``training`` is given; otherwise ``None``).

* **Stability and S.U.N.** (MatterGen, Zeni et al. 2025), only when ``e_above_hull`` (eV/atom, one value per
  generated structure, ``None`` where not computed) is given:

  - ``stable_rate`` / ``metastable_rate``: fraction of ALL generated structures with e_hull <= ``stable_threshold``
    (default 0.0) / <= 0.1 eV/atom; a missing e_hull is neither.
  - ``e_above_hull_mean`` / ``e_above_hull_median``: over the computed values.
  - ``sun_rate`` (S.U.N.): fraction of ALL generated structures that are valid, stable, unique and novel;
    ``msun_rate`` the same with metastable. ``None`` without ``training``.

JSON keys of :meth:`DNGMetrics.to_dict` (in this order): ``n_generated``, ``n_reference``, ``n_training``,
``struct_valid``, ``comp_valid``, ``valid``, ``n_valid``, ``cov_recall``, ``cov_precision``,
``cov_recall_valid``, ``cov_precision_valid``, ``cov_recall_struct``, ``cov_recall_comp``,
``cov_precision_struct``, ``cov_precision_comp``, ``amsd_recall``, ``amsd_precision``, ``amcd_recall``,
``amcd_precision``, ``cov_thresholds`` (``{"struct": .., "comp": ..}`` or null), ``n_reference_coverage``
(references fingerprinted), ``n_fingerprint_failed`` (generated structures whose fingerprints failed),
``coverage_note`` (why coverage is null or may be meaningless, else null), ``wdist_density``,
``wdist_num_atoms``, ``wdist_num_elems``, ``uniqueness``, ``n_unique``, ``novelty``, ``n_novel``,
``stable_threshold``, ``n_e_above_hull`` (values given), ``stable_rate``, ``metastable_rate``,
``e_above_hull_mean``, ``e_above_hull_median``, ``sun_rate``, ``msun_rate``, ``n_sun``, ``n_msun``,
``tolerances``. A metric that cannot be computed is ``null``. ``to_dict(details=True)`` adds ``structures``:
one record per generated structure (``index``, ``struct_valid``, ``comp_valid``, ``unique``, ``novel``,
``e_above_hull``, ``sun``).

Example::

    from crystalign.dng_metrics import dng_metrics
    result = dng_metrics(generated, test_structures, train_structures, dataset="perov_5")
    print(result.summary()); json_dict = result.to_dict()

    # with stability: energies against a hull built with the same MLIP (crystalign hull build)
    from crystalign.dng_metrics import energies_above_hull
    e_hull = energies_above_hull(generated, "hull.json")
    result = dng_metrics(generated, test_structures, train_structures, dataset="perov_5", e_above_hull=e_hull)
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from crystalign.matching import BENCHMARK_TOLERANCES, make_matcher
from crystalign.metrics import _as_structures

if TYPE_CHECKING:  # pragma: no cover
    from pymatgen.core import Composition, Structure

    from crystalign.rewards.hull import ReferenceHull

#: CDVAE's coverage cutoffs (struct, comp) per dataset (``COV_Cutoffs`` in its ``compute_metrics.py``).
CDVAE_COV_CUTOFFS: dict[str, tuple[float, float]] = {
    "perov_5": (0.2, 4.0),
    "carbon_24": (0.2, 4.0),
    "mp_20": (0.4, 10.0),
}
# CDVAE's own names for the same datasets
_DATASET_ALIASES = {"perovskite": "perov_5", "perov": "perov_5", "carbon": "carbon_24", "mp20": "mp_20"}

#: e_hull (eV/atom) at or below which a structure is metastable (MatterGen's MSUN).
METASTABLE_THRESHOLD = 0.1

#: Oxidation-state sets :func:`smact_validity` can use.
OXIDATION_STATE_SETS = ("cdvae", "icsd24")


@dataclass
class DNGMetrics:
    """DNG metrics of a generated set (definitions in the module docstring); per-structure lists have one entry
    per generated structure."""

    n_generated: int
    n_reference: int
    n_training: int | None
    struct_valid: float
    comp_valid: float
    valid: float
    n_valid: int
    cov_recall: float | None
    cov_precision: float | None
    cov_recall_valid: float | None
    cov_precision_valid: float | None
    cov_recall_struct: float | None
    cov_recall_comp: float | None
    cov_precision_struct: float | None
    cov_precision_comp: float | None
    amsd_recall: float | None
    amsd_precision: float | None
    amcd_recall: float | None
    amcd_precision: float | None
    cov_thresholds: tuple[float, float] | None
    n_reference_coverage: int
    n_fingerprint_failed: int
    coverage_note: str | None
    wdist_density: float | None
    wdist_num_atoms: float | None
    wdist_num_elems: float | None
    uniqueness: float | None
    n_unique: int
    novelty: float | None
    n_novel: int | None
    stable_threshold: float
    n_e_above_hull: int | None
    stable_rate: float | None
    metastable_rate: float | None
    e_above_hull_mean: float | None
    e_above_hull_median: float | None
    sun_rate: float | None
    msun_rate: float | None
    n_sun: int | None
    n_msun: int | None
    tolerances: dict[str, float]
    # per generated structure
    struct_valid_flags: list[bool] = field(repr=False)
    comp_valid_flags: list[bool] = field(repr=False)
    unique_flags: list[bool] = field(repr=False)  # valid and the first of its duplicates
    novel_flags: list[bool | None] = field(repr=False)  # None: not unique-valid, or no training set
    e_above_hull: list[float | None] | None = field(repr=False)
    sun_flags: list[bool] | None = field(repr=False)

    _KEYS = (
        "n_generated", "n_reference", "n_training", "struct_valid", "comp_valid", "valid", "n_valid",
        "cov_recall", "cov_precision", "cov_recall_valid", "cov_precision_valid",
        "cov_recall_struct", "cov_recall_comp", "cov_precision_struct", "cov_precision_comp", "amsd_recall", "amsd_precision",
        "amcd_recall", "amcd_precision", "cov_thresholds", "n_reference_coverage", "n_fingerprint_failed",
        "coverage_note", "wdist_density", "wdist_num_atoms", "wdist_num_elems", "uniqueness", "n_unique", "novelty",
        "n_novel", "stable_threshold", "n_e_above_hull", "stable_rate", "metastable_rate", "e_above_hull_mean",
        "e_above_hull_median", "sun_rate", "msun_rate", "n_sun", "n_msun", "tolerances",
    )

    def to_dict(self, details: bool = False) -> dict[str, Any]:
        """JSON-ready metrics (keys listed in the module docstring); ``details`` adds one record per structure."""
        out: dict[str, Any] = {}
        for key in self._KEYS:
            value = getattr(self, key)
            if key == "cov_thresholds" and value is not None:
                value = {"struct": float(value[0]), "comp": float(value[1])}
            elif key == "tolerances":
                value = dict(value)
            out[key] = value
        if details:
            out["structures"] = [
                {
                    "index": i,
                    "struct_valid": self.struct_valid_flags[i],
                    "comp_valid": self.comp_valid_flags[i],
                    "unique": self.unique_flags[i],
                    "novel": self.novel_flags[i],
                    "e_above_hull": None if self.e_above_hull is None else self.e_above_hull[i],
                    "sun": None if self.sun_flags is None else self.sun_flags[i],
                }
                for i in range(self.n_generated)
            ]
        return out

    def summary(self) -> str:
        """A short human-readable report."""

        def pct(x: float | None, why: str = "n/a") -> str:
            return why if x is None else f"{100 * x:6.2f} %"

        def num(x: float | None, why: str = "n/a") -> str:
            return why if x is None else f"{x:.4f}"

        n = self.n_generated
        lines = [
            f"{n} generated vs {self.n_reference} reference structures"
            + ("" if self.n_training is None else f" ({self.n_training} training)"),
            f"  validity      {pct(self.valid)}  ({self.n_valid}/{n}; structural {pct(self.struct_valid).strip()}, "
            f"compositional {pct(self.comp_valid).strip()})",
        ]
        if self.cov_thresholds is not None and self.cov_recall is not None:
            s, c = self.cov_thresholds
            lines += [
                f"  COV-R         {pct(self.cov_recall)}  (cutoffs struct {s:g}, comp {c:g}; "
                f"{self.n_reference_coverage} references)",
                f"  COV-P         {pct(self.cov_precision)}",
                f"  by cutoff     struct R/P {pct(self.cov_recall_struct).strip()} / {pct(self.cov_precision_struct).strip()}, "
                f"comp R/P {pct(self.cov_recall_comp).strip()} / {pct(self.cov_precision_comp).strip()}",
                f"  COV-R/P valid {pct(self.cov_recall_valid).strip()} / {pct(self.cov_precision_valid).strip()}  "
                "(valid structures only, one structure within both cutoffs)",
            ]
        else:
            lines.append("  coverage      not computed")
        if self.coverage_note:
            lines.append(f"  note: {self.coverage_note}")
        lines += [
            f"  W1 density    {num(self.wdist_density)}  (g/cm^3)",
            f"  W1 #atoms     {num(self.wdist_num_atoms)}",
            f"  W1 #elements  {num(self.wdist_num_elems)}",
            f"  uniqueness    {pct(self.uniqueness)}  ({self.n_unique}/{self.n_valid} valid)",
        ]
        if self.novelty is not None:
            lines.append(f"  novelty       {pct(self.novelty)}  ({self.n_novel}/{self.n_unique} unique)")
        else:
            lines.append("  novelty       not computed (no training set)")
        if self.n_e_above_hull is not None:
            lines += [
                f"  stable        {pct(self.stable_rate)}  (e_hull <= {self.stable_threshold:g} eV/atom; "
                f"{self.n_e_above_hull}/{n} e_hull computed)",
                f"  metastable    {pct(self.metastable_rate)}  (e_hull <= {METASTABLE_THRESHOLD:g} eV/atom)",
                f"  e_hull        mean {num(self.e_above_hull_mean)}, median {num(self.e_above_hull_median)} eV/atom",
                f"  S.U.N.        {pct(self.sun_rate, 'n/a (needs a training set)')}"
                + ("" if self.n_sun is None else f"  ({self.n_sun}/{n})"),
                f"  M.S.U.N.      {pct(self.msun_rate, 'n/a (needs a training set)')}"
                + ("" if self.n_msun is None else f"  ({self.n_msun}/{n})"),
            ]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- API


def dng_metrics(
    generated: "Sequence[Structure | None]",
    reference: "Sequence[Structure]",
    training: "Sequence[Structure] | None" = None,
    *,
    thresholds: tuple[float, float] | None = None,
    dataset: str | None = None,
    e_above_hull: Sequence[float | None] | None = None,
    stable_threshold: float = 0.0,
    progress: bool = False,
    max_reference: int | None = None,
    comp_scaler: "str | tuple[Sequence[float], Sequence[float]]" = "broad",
    fingerprint_cache: str | os.PathLike | None = None,
    oxidation_states: str = "cdvae",
    seed: int = 0,
) -> DNGMetrics:
    """Validity, coverage, Wasserstein distances, uniqueness, novelty and S.U.N. of ``generated``.

    Args:
        generated: the generated structures; ``None`` (unreadable, failed) counts as invalid.
        reference: the reference set for coverage and the Wasserstein distances (e.g. the test split).
        training: the training set for novelty (and S.U.N.); ``None`` leaves them out.
        thresholds: coverage cutoffs (struct, comp); default: the CDVAE cutoffs of ``dataset``. With neither,
            coverage is ``None`` (``coverage_note`` says why).
        dataset: ``perov_5``, ``carbon_24`` or ``mp_20`` (CDVAE's names perovskite, carbon, mp20 too).
        e_above_hull: eV/atom per generated structure (``None`` where not computed), e.g. from
            :func:`energies_above_hull`; enables the stability and S.U.N. metrics.
        stable_threshold: e_hull (eV/atom) at or below which a structure is stable.
        progress: progress bars (on a terminal) while fingerprinting and matching.
        max_reference: fingerprint at most this many references for coverage (a seeded random subset, recorded
            in ``n_reference_coverage``): CrystalNN costs ~15 ms per site.
        comp_scaler: ``"broad"`` (the shipped scaler over MP-20 chemistry, as CDVAE's fixed constants),
            ``"reference"`` (the reference set's own statistics) or (means, stds) of the 132 magpie features.
        fingerprint_cache: an ``.npz`` file holding the reference fingerprints; reused when it was made for the
            same references (sha256 of the structures), written otherwise.
        oxidation_states: ``"cdvae"`` (smact's default oxidation states, as CDVAE used) or ``"icsd24"`` (smact's own
            ``smact_validity`` with the ICSD-24 states, smact >= 3's default, as OMatG uses).
        seed: for the ``max_reference`` subset.
    """
    gen = _as_structures(generated, "generated")
    ref = _as_structures(reference, "reference")
    train = None if training is None else _as_structures(training, "training")
    if not gen:
        raise ValueError("no generated structures given")
    if not ref:
        raise ValueError("no reference structures given")
    if any(s is None for s in ref):
        raise ValueError("reference structures must all be readable (None found)")
    if e_above_hull is not None and len(e_above_hull) != len(gen):
        raise ValueError(f"{len(e_above_hull)} e_above_hull values for {len(gen)} generated structures: give one per structure (None where not computed)")
    if oxidation_states not in OXIDATION_STATE_SETS:
        raise ValueError(f"oxidation_states must be one of {OXIDATION_STATE_SETS}, got {oxidation_states!r}")
    if max_reference is not None and max_reference < 1:
        raise ValueError(f"max_reference must be a positive number of structures, got {max_reference}")
    cutoffs = _cutoffs(thresholds, dataset)
    n = len(gen)

    # --- validity
    from crystalign.metrics import structure_validity

    s_valid = structure_validity(gen)
    c_valid = [s is not None and _composition_valid(s, oxidation_states) for s in gen]
    valid = [a and b for a, b in zip(s_valid, c_valid)]
    valid_idx = [i for i in range(n) if valid[i]]

    # --- coverage
    cov = _coverage(gen, ref, valid, cutoffs, progress, max_reference, comp_scaler, fingerprint_cache, seed)

    # --- Wasserstein distances: valid generated vs all references (CDVAE)
    wd: dict[str, float | None] = {"density": None, "num_atoms": None, "num_elems": None}
    if valid_idx:
        from scipy.stats import wasserstein_distance

        g_props = _properties([gen[i] for i in valid_idx])
        r_props = _properties(ref)
        wd = {k: float(wasserstein_distance(g_props[k], r_props[k])) for k in wd}

    # --- uniqueness and novelty
    unique = _unique_flags(gen, valid, progress)
    n_unique = sum(unique)
    novel: list[bool | None] = [None] * n
    if train is not None:
        for i, flag in _novel_flags(gen, unique, train, progress).items():
            novel[i] = flag
    n_novel = None if train is None else sum(bool(x) for x in novel)

    # --- stability and S.U.N.
    stab = _stability(e_above_hull, valid, unique, novel, train is not None, stable_threshold)

    return DNGMetrics(
        n_generated=n,
        n_reference=len(ref),
        n_training=None if train is None else len(train),
        struct_valid=sum(s_valid) / n,
        comp_valid=sum(c_valid) / n,
        valid=len(valid_idx) / n,
        n_valid=len(valid_idx),
        **cov,
        wdist_density=wd["density"],
        wdist_num_atoms=wd["num_atoms"],
        wdist_num_elems=wd["num_elems"],
        uniqueness=n_unique / len(valid_idx) if valid_idx else None,
        n_unique=n_unique,
        novelty=None if train is None or not n_unique else n_novel / n_unique,
        n_novel=n_novel,
        stable_threshold=float(stable_threshold),
        **stab,
        tolerances={k: float(v) for k, v in BENCHMARK_TOLERANCES.items()},
        struct_valid_flags=list(s_valid),
        comp_valid_flags=c_valid,
        unique_flags=unique,
        novel_flags=novel,
        e_above_hull=None if e_above_hull is None else [_finite_or_none(e) for e in e_above_hull],
    )


def smact_validity(composition: "Composition | Mapping[str, float] | str", *, use_pauling_test: bool = True,
                   include_alloys: bool = True, oxidation_states: str = "cdvae") -> bool:
    """CDVAE's compositional validity (its ``smact_validity``) of a composition.

    Valid when some assignment of oxidation states (smact's per-element lists) makes the gcd-reduced composition
    charge neutral (``smact.neutral_ratios``) and passes the Pauling electronegativity test (cations less
    electronegative than anions; a missing electronegativity passes, as it did in CDVAE, where the comparison
    with ``None`` raised a TypeError that CDVAE caught). A single element, and with ``include_alloys`` a
    composition of metals only, is always valid. Non-integer amounts (disorder) are invalid.

    ``oxidation_states="cdvae"`` re-implements CDVAE's function on smact's default ``Element.oxidation_states``
    (smact 4's own ``smact.screening.smact_validity`` differs: it reads the ICSD-24 states and fails a missing
    electronegativity); ``"icsd24"`` calls smact's function (OMatG's choice).
    """
    from pymatgen.core import Composition

    comp = composition if isinstance(composition, Composition) else Composition(composition)
    amounts = comp.get_el_amt_dict()
    counts = []
    for el, amt in amounts.items():
        if amt <= 0 or abs(amt - round(amt)) > 1e-6:
            return False
        counts.append(int(round(amt)))
    if not counts:
        return False
    gcd = math.gcd(*counts)
    key = tuple(sorted(zip(amounts, (c // gcd for c in counts))))
    return _smact_valid_cached(key, use_pauling_test, include_alloys, oxidation_states)


def energies_above_hull(
    structures: "Sequence[Structure | None]",
    hull: "str | os.PathLike | ReferenceHull",
    *,
    backend: Any = None,
    batch_size: int = 64,
    progress: bool = False,
) -> list[float | None]:
    """e_hull (eV/atom) of each structure against a hull built with the same MLIP, ``None`` where it cannot be had.

    This is :class:`crystalign.rewards.hull.EnergyAboveHullReward`'s ``e_above_hull_ev_per_atom`` (the raw value,
    not the capped reward): structures are screened as the reward screens them (validity, contact check, density,
    energy bounds), and a structure that fails the screening, an MLIP failure or a chemical system the hull does not
    cover (an element without an elemental reference; warned once per system) gives ``None``. ``backend``: as the
    reward's (default: rebuilt from the hull file). The MLIP runs in batches of ``batch_size``.
    """
    from crystalign.rewards.hull import EnergyAboveHullReward

    reward = EnergyAboveHullReward(hull, backend=backend)
    out: list[float | None] = [None] * len(structures)
    present = [i for i, s in enumerate(structures) if s is not None and len(s) > 0]
    bar = _bar(len(present), progress, "energies", "structure")
    try:
        for start in range(0, len(present), batch_size):
            idx = present[start : start + batch_size]
            info = reward([structures[i] for i in idx]).info["e_above_hull_ev_per_atom"]
            for i, value in zip(idx, np.asarray(info.detach().cpu() if hasattr(info, "detach") else info, dtype=float)):
                out[i] = _finite_or_none(value)
            bar.update(len(idx))
    finally:
        bar.close()
    return out


def cdvae_cutoffs(dataset: str) -> tuple[float, float]:
    """CDVAE's (struct, comp) coverage cutoffs of a dataset name (``perov_5``, ``carbon_24``, ``mp_20`` or CDVAE's
    perovskite, carbon, mp20); a ``NAME:SPLIT`` suffix is ignored."""
    name = dataset.split(":", 1)[0].strip().lower()
    name = _DATASET_ALIASES.get(name, name)
    if name not in CDVAE_COV_CUTOFFS:
        raise ValueError(
            f"no CDVAE coverage cutoffs for dataset {dataset!r} (known: {', '.join(CDVAE_COV_CUTOFFS)}); "
            "pass thresholds=(struct, comp)"
        )
    return CDVAE_COV_CUTOFFS[name]


# ---------------------------------------------------------------------------------------------- internals


def _cutoffs(thresholds, dataset) -> tuple[float, float] | None:
    if thresholds is not None:
        try:
            s, c = (float(x) for x in thresholds)
        except (TypeError, ValueError):
            raise ValueError(f"thresholds must be (struct, comp) cutoffs, got {thresholds!r}") from None
        if not (s > 0 and c > 0 and math.isfinite(s) and math.isfinite(c)):
            raise ValueError(f"coverage cutoffs must be positive and finite, got {thresholds!r}")
        return s, c
    if dataset is not None:
        return cdvae_cutoffs(dataset)
    return None


def _finite_or_none(value) -> float | None:
    if value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _bar(total: int, enabled: bool, desc: str, unit: str):
    from tqdm.auto import tqdm

    # disable=None: only on a terminal, so logs and --json pipes stay clean
    return tqdm(total=total, desc=desc, unit=unit, disable=None if enabled else True, leave=False)


# --- compositional validity


def _composition_valid(s: "Structure", oxidation_states: str) -> bool:
    try:
        return smact_validity(s.composition, oxidation_states=oxidation_states)
    except Exception:  # exotic species (dummy atoms, Z beyond smact's table): not a valid composition
        return False


@lru_cache(maxsize=65536)
def _smact_valid_cached(key: tuple[tuple[str, int], ...], use_pauling_test: bool, include_alloys: bool,
                        oxidation_states: str) -> bool:
    """Cached per gcd-reduced composition: generated sets repeat compositions a lot."""
    import smact

    symbols = tuple(el for el, _ in key)
    counts = tuple(c for _, c in key)
    if len(symbols) == 1:
        return True
    if include_alloys and all(el in smact.metals for el in symbols):
        return True
    if oxidation_states == "icsd24":
        from smact.screening import smact_validity as smact_own

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return bool(smact_own("".join(f"{el}{c}" for el, c in key), use_pauling_test=use_pauling_test,
                                  include_alloys=include_alloys))
    space = smact.element_dictionary(symbols)
    elements = [space[el] for el in symbols]
    enegs = [e.pauling_eneg for e in elements]
    ox_combos = [list(e.oxidation_states or []) for e in elements]
    if any(not ox for ox in ox_combos):  # an element without oxidation states cannot be balanced
        return False
    stoichs = [(c,) for c in counts]
    threshold = max(counts)
    for ox_states in itertools.product(*ox_combos):
        if not smact.neutral_ratios(ox_states, stoichs=stoichs, threshold=threshold):
            continue
        if not use_pauling_test or _pauling_ok(ox_states, enegs):
            return True
    return False


def _pauling_ok(ox_states, enegs) -> bool:
    """smact 2's ``eneg_states_test`` as CDVAE ran it: pairs are checked in order, and the first comparison that
    meets a missing electronegativity raised a TypeError that CDVAE took as a pass."""
    for (ox1, e1), (ox2, e2) in itertools.combinations(list(zip(ox_states, enegs)), 2):
        if ox1 > 0 and ox2 < 0:
            if e1 is None or e2 is None:
                return True
            if e1 >= e2:
                return False
        elif ox1 < 0 and ox2 > 0:
            if e1 is None or e2 is None:
                return True
            if e1 <= e2:
                return False
    return True


# --- coverage


@lru_cache(maxsize=1)
def _featurizers():
    from matminer.featurizers.composition.composite import ElementProperty
    from matminer.featurizers.site.fingerprint import CrystalNNFingerprint

    return CrystalNNFingerprint.from_preset("ops"), ElementProperty.from_preset("magpie")


def _fingerprints(structures, progress: bool, desc: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(struct fps, comp fps, ok) as CDVAE's ``Crystal.get_fingerprints``: a structure whose fingerprint raises
    (or is not finite) is not ok; rows of structures that are not ok are NaN."""
    crystal_nn, magpie = _featurizers()
    n = len(structures)
    struct_fp = np.full((n, 61), np.nan)
    comp_fp = np.full((n, 132), np.nan)
    ok = np.zeros(n, dtype=bool)
    bar = _bar(n, progress, desc, "structure")
    try:
        with warnings.catch_warnings():  # matminer warns about missing elemental data and CrystalNN fallbacks
            warnings.simplefilter("ignore")
            for i, s in enumerate(structures):
                bar.update(1)
                if s is None or len(s) == 0:
                    continue
                try:
                    c = np.asarray(magpie.featurize(s.composition), dtype=float)
                    sites = np.asarray([crystal_nn.featurize(s, j) for j in range(len(s))], dtype=float)
                    f = sites.mean(axis=0)
                except Exception:  # CDVAE: a crystal whose fingerprint cannot be constructed is left out
                    continue
                if f.shape != (struct_fp.shape[1],) or c.shape != (comp_fp.shape[1],) or not np.all(np.isfinite(f)):
                    continue
                struct_fp[i], comp_fp[i], ok[i] = f, c, True
    finally:
        bar.close()
    return struct_fp, comp_fp, ok


def _structures_sha256(structures) -> str:
    digest = hashlib.sha256()
    for s in structures:
        digest.update(repr([site.species_string for site in s]).encode())
        digest.update(np.ascontiguousarray(s.lattice.matrix, dtype=np.float64).tobytes())
        digest.update(np.ascontiguousarray(s.frac_coords, dtype=np.float64).reshape(-1, 3).tobytes())
    return digest.hexdigest()


def _reference_fingerprints(ref, progress: bool, cache) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if cache is None:
        return _fingerprints(ref, progress, "reference fingerprints")
    path = Path(cache)
    sha = _structures_sha256(ref)
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as data:
                if str(data["sha256"]) == sha:
                    return data["struct"], data["comp"], data["ok"].astype(bool)
        except (OSError, ValueError, KeyError):  # a damaged or foreign file: recompute and replace it
            pass
    fps = _fingerprints(ref, progress, "reference fingerprints")
    from crystalign.io import atomic_path

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:  # a file object: np.savez would append .npz to a bare temporary name
            np.savez(fh, sha256=np.array(sha), struct=fps[0], comp=fps[1], ok=fps[2])
    return fps


def _coverage(gen, ref, valid, cutoffs, progress, max_reference, comp_scaler, cache, seed) -> dict[str, Any]:
    out: dict[str, Any] = {
        "cov_recall": None, "cov_precision": None, "cov_recall_valid": None, "cov_precision_valid": None,
        "cov_recall_struct": None, "cov_recall_comp": None, "cov_precision_struct": None, "cov_precision_comp": None,
        "amsd_recall": None, "amsd_precision": None, "amcd_recall": None, "amcd_precision": None,
        "cov_thresholds": cutoffs, "n_reference_coverage": 0, "n_fingerprint_failed": 0, "coverage_note": None,
    }
    if cutoffs is None:
        out["coverage_note"] = "coverage not computed: no cutoffs (pass thresholds=(struct, comp) or a dataset name)"
        return out
    notes = []
    if max_reference is not None and len(ref) > max_reference:
        rng = np.random.default_rng(seed)
        ref = [ref[i] for i in sorted(rng.choice(len(ref), max_reference, replace=False).tolist())]
        cache = None  # the cache holds the fingerprints of a whole reference set
    r_struct, r_comp, r_ok = _reference_fingerprints(ref, progress, cache)
    if not r_ok.any():
        out["coverage_note"] = "coverage not computed: no reference fingerprint could be computed"
        return out
    if not r_ok.all():
        notes.append(f"{int((~r_ok).sum())} reference fingerprint(s) failed and were left out")
    r_struct, r_comp = r_struct[r_ok], r_comp[r_ok]
    out["n_reference_coverage"] = int(r_ok.sum())
    if not any(valid):
        out["coverage_note"] = "coverage not computed: no valid generated structure"
        return out
    g_struct, g_comp, g_ok = _fingerprints(gen, progress, "generated fingerprints")
    out["n_fingerprint_failed"] = int(sum(s is not None for s in gen) - g_ok.sum())
    if not g_ok.any():
        out["coverage_note"] = "coverage not computed: no generated fingerprint could be computed"
        return out
    means, stds = _comp_scaler(comp_scaler, r_comp)
    g_comp = np.nan_to_num((g_comp - means) / stds, nan=0.0)  # CDVAE's StandardScaler(replace_nan_token=0)
    r_comp = np.nan_to_num((r_comp - means) / stds, nan=0.0)

    from scipy.spatial.distance import cdist

    s_cut, c_cut = cutoffs
    # every generated structure with fingerprints (CDVAE), and the valid ones among them (strict variant)
    g_idx = np.flatnonzero(g_ok)
    struct_d = cdist(g_struct[g_idx], r_struct)
    comp_d = cdist(g_comp[g_idx], r_comp)
    s_rec, s_prec = struct_d.min(axis=0), struct_d.min(axis=1)
    c_rec, c_prec = comp_d.min(axis=0), comp_d.min(axis=1)
    out["cov_recall"] = float(np.mean((s_rec <= s_cut) & (c_rec <= c_cut)))
    out["cov_precision"] = float(np.sum((s_prec <= s_cut) & (c_prec <= c_cut)) / len(gen))
    out["cov_recall_struct"], out["cov_recall_comp"] = float(np.mean(s_rec <= s_cut)), float(np.mean(c_rec <= c_cut))
    out["cov_precision_struct"] = float(np.sum(s_prec <= s_cut) / len(gen))
    out["cov_precision_comp"] = float(np.sum(c_prec <= c_cut) / len(gen))
    out["amsd_recall"], out["amsd_precision"] = float(s_rec.mean()), float(s_prec.mean())
    out["amcd_recall"], out["amcd_precision"] = float(c_rec.mean()), float(c_prec.mean())
    is_valid = np.asarray([valid[i] for i in g_idx], dtype=bool)
    if is_valid.any():
        close = (struct_d[is_valid] <= s_cut) & (comp_d[is_valid] <= c_cut)  # (valid generated, reference)
        out["cov_recall_valid"] = float(close.any(axis=0).mean())
        out["cov_precision_valid"] = float(close.any(axis=1).sum() / sum(valid))
    else:
        notes.append("no valid generated structure has fingerprints: the valid-only coverage is null")
    # elements the references never contain: their composition distances rest on features the references do not
    # span, so coverage says little about them
    g_elements = {el.symbol for i in g_idx for el in gen[i].composition.elements}
    r_elements = {el.symbol for s in ref for el in s.composition.elements}
    if not g_elements & r_elements:
        notes.append(
            "no reference structure contains any element of the generated set, so coverage is not meaningful "
            "(is the reference set the right dataset?)"
        )
    elif g_elements - r_elements:
        missing = sorted(g_elements - r_elements)
        notes.append(f"element(s) {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''} of the generated set "
                     "appear in no reference structure")
    out["coverage_note"] = "; ".join(notes) or None
    return out


def broad_comp_scaler() -> tuple[list[float], list[float]]:
    """(means, stds) of the magpie features over MP-20 chemistry, shipped with the package (see the module doc)."""
    import json

    data = json.loads((Path(__file__).parent / "data" / "magpie_scaler.json").read_text())
    return data["means"], data["stds"]


def _comp_scaler(comp_scaler, r_comp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(comp_scaler, str):
        if comp_scaler not in ("broad", "reference"):
            raise ValueError(f"comp_scaler must be 'broad', 'reference' or (means, stds), got {comp_scaler!r}")
        comp_scaler = broad_comp_scaler() if comp_scaler == "broad" else None
    if comp_scaler is not None:
        means, stds = (np.asarray(x, dtype=float).reshape(-1) for x in comp_scaler)
        if means.shape != (r_comp.shape[1],) or stds.shape != (r_comp.shape[1],):
            raise ValueError(f"comp_scaler needs {r_comp.shape[1]} means and stds (magpie features), got "
                             f"{means.shape[0]} and {stds.shape[0]}")
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN feature columns
            means, stds = np.nanmean(r_comp, axis=0), np.nanstd(r_comp, axis=0)
    # a feature the references never vary (or never have) is left unscaled rather than divided by 0
    stds = np.where(np.isfinite(stds) & (stds > 0), stds, 1.0)
    means = np.where(np.isfinite(means), means, 0.0)
    return means, stds


# --- distributions


def _properties(structures) -> dict[str, list[float]]:
    return {
        "density": [float(s.density) for s in structures],
        "num_atoms": [float(len(s)) for s in structures],
        "num_elems": [float(len(s.composition.elements)) for s in structures],
    }


# --- uniqueness and novelty


def _reduced_key(s: "Structure"):
    from crystalign.metrics import _reduced_composition

    return _reduced_composition(s)


def _fits(matcher, a, b) -> bool:
    try:
        return bool(matcher.fit(a, b))
    except Exception:  # the matcher fails on some degenerate cells: count it as "not the same structure"
        return False


def _unique_flags(gen, valid, progress: bool) -> list[bool]:
    """True for each valid structure not matched by an earlier valid one (compared within equal reduced
    composition, against the unique representatives found so far)."""
    matcher = make_matcher()
    unique = [False] * len(gen)
    seen: dict[Any, list[int]] = {}
    bar = _bar(sum(valid), progress, "uniqueness", "structure")
    try:
        for i, s in enumerate(gen):
            if not valid[i]:
                continue
            bar.update(1)
            reps = seen.setdefault(_reduced_key(s), [])
            if not any(_fits(matcher, s, gen[j]) for j in reps):
                unique[i] = True
                reps.append(i)
    finally:
        bar.close()
    return unique


def _novel_flags(gen, unique, train, progress: bool) -> dict[int, bool]:
    """For each unique valid structure: not matched by any training structure of the same reduced composition."""
    matcher = make_matcher()
    wanted = {_reduced_key(gen[i]) for i, u in enumerate(unique) if u}
    by_comp: dict[Any, list] = {}
    for t in train:
        if t is None:
            continue
        key = _reduced_key(t)
        if key in wanted:
            by_comp.setdefault(key, []).append(t)
    out = {}
    idx = [i for i, u in enumerate(unique) if u]
    bar = _bar(len(idx), progress, "novelty", "structure")
    try:
        for i in idx:
            out[i] = not any(_fits(matcher, gen[i], t) for t in by_comp.get(_reduced_key(gen[i]), []))
            bar.update(1)
    finally:
        bar.close()
    return out


# --- stability


def _stability(e_above_hull, valid, unique, novel, has_training: bool, threshold: float) -> dict[str, Any]:
    keys = ("n_e_above_hull", "stable_rate", "metastable_rate", "e_above_hull_mean", "e_above_hull_median",
            "sun_rate", "msun_rate", "n_sun", "n_msun", "sun_flags")
    out: dict[str, Any] = dict.fromkeys(keys)
    if e_above_hull is None:
        return out
    n = len(valid)
    e = [_finite_or_none(x) for x in e_above_hull]
    known = [x for x in e if x is not None]
    stable = [x is not None and x <= threshold for x in e]
    metastable = [x is not None and x <= METASTABLE_THRESHOLD for x in e]
    out.update(
        n_e_above_hull=len(known),
        stable_rate=sum(stable) / n,
        metastable_rate=sum(metastable) / n,
        e_above_hull_mean=float(np.mean(known)) if known else None,
        e_above_hull_median=float(np.median(known)) if known else None,
    )
    if has_training:
        # unique implies valid; novel is None for anything that is not unique and valid
        sun = [bool(stable[i] and unique[i] and novel[i]) for i in range(n)]
        msun = [bool(metastable[i] and unique[i] and novel[i]) for i in range(n)]
        out.update(sun_rate=sum(sun) / n, msun_rate=sum(msun) / n, n_sun=sum(sun), n_msun=sum(msun), sun_flags=sun)
    return out
