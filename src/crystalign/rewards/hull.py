"""Energy above the convex hull, against a reference hull computed with the SAME MLIP.

Energies from different potentials are not comparable, so the hull file records the backend identity that made
it (:attr:`MLIPBackend.identity`: name, model and every option that changes the energy scale, e.g. SevenNet's
``modal``: 7net-mf-0's PBE and R2SCAN energies differ by ~3.5 eV/atom) plus the dtype, and the reward refuses a
backend with a different identity. Without a backend the reward rebuilds the recorded one from all recorded keys.

Hull files written before ``modal`` was recorded lack the key; a missing identity key means the option was unset
(the backend default), so such a file matches a backend without a modal (7net-0, CHGNet, MACE: unaffected) and is
refused for a backend with one (a 7net-mf-0 hull from then cannot say which modal built it: rebuild it).

The hull is built from reference structures (e.g. a training set) plus elemental references; elements the
references lack can be added automatically (see :func:`elemental_candidates`).

Example::

    hull = build_hull(structures, backend="sevenn", out="hull.json")     # or: crystalign hull build refs.csv
    reward = EnergyAboveHullReward("hull.json")
    reward(batch).info["e_above_hull_ev_per_atom"]
"""

from __future__ import annotations

import dataclasses

import json
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import torch

from crystalign.geometry import ValidityThresholds
from crystalign.rewards.base import RewardResult, as_batch, as_tensor, coerce_thresholds
from crystalign.rewards.energy import (
    MAX_ENERGY_PER_ATOM,
    MAX_NUMBER_DENSITY,
    MIN_ENERGY_PER_ATOM,
    MIN_RADIUS_RATIO,
    _check_ratio,
    screened_energies,
)
from crystalign.rewards.mlip import MLIPBackend, get_backend

if TYPE_CHECKING:  # pragma: no cover
    from pymatgen.analysis.phase_diagram import PhaseDiagram
    from pymatgen.core import Structure

    from crystalign.crystal import CrystalBatch

HULL_FORMAT = "crystalign-hull"
HULL_VERSION = 1

# diatomic molecular elements: a dimer in a box (bond lengths in Å) stands in for the molecular crystal
_DIMER_BONDS = {"H": 0.74, "N": 1.10, "O": 1.21, "F": 1.42, "Cl": 1.99, "Br": 2.28, "I": 2.67}
_DIMER_BOX = 10.0
#: keys of a hull file's ``backend`` that are recorded (and passed when rebuilding the backend) but are not part of
#: the energy-scale identity compared on load
NON_IDENTITY_KEYS = frozenset({"dtype"})

# nearest-neighbour distance = scale * 2 * covalent radius, for elements ASE has no crystal reference for
_PROTOTYPE_SCALES = (0.9, 1.0, 1.1, 1.2)


@dataclass
class HullEntry:
    """One reference phase: composition (element -> amount) and its total MLIP energy in eV."""

    composition: dict[str, float]
    energy_ev: float
    id: str = ""

    @property
    def elements(self) -> frozenset[str]:
        return frozenset(el for el, amt in self.composition.items() if amt > 0)

    @property
    def energy_per_atom_ev(self) -> float:
        return self.energy_ev / sum(self.composition.values())


@dataclass
class ReferenceHull:
    """Reference entries plus the backend identity that produced them; phase diagrams are cached per system."""

    entries: list[HullEntry]
    backend: dict[str, str]
    meta: dict[str, Any] = field(default_factory=dict)
    max_cached_systems: int = 4096

    def __post_init__(self) -> None:
        self._pd_cache: OrderedDict[frozenset[str], "PhaseDiagram | None"] = OrderedDict()
        self._elemental = frozenset(next(iter(e.elements)) for e in self.entries if len(e.elements) == 1)

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": HULL_FORMAT,
            "version": HULL_VERSION,
            "backend": dict(self.backend),
            "meta": self.meta,
            "entries": [{"id": e.id, "composition": e.composition, "energy_ev": e.energy_ev} for e in self.entries],
        }

    def save(self, path: str | Path) -> Path:
        from crystalign.io import write_json

        write_json(path, self.to_dict())
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "ReferenceHull":
        path = Path(path).expanduser()
        try:
            data = json.loads(path.read_text(errors="replace"))
        except FileNotFoundError:
            raise FileNotFoundError(f"hull file not found: {path} (build one with `crystalign hull build`)") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err}); the hull file is damaged or truncated, rebuild it") from None
        if not isinstance(data, dict) or data.get("format") != HULL_FORMAT:
            raise ValueError(f"{path}: not a crystalign hull file (missing \"format\": \"{HULL_FORMAT}\")")
        if data.get("version") != HULL_VERSION:
            raise ValueError(f"{path}: hull file version {data.get('version')} is not supported (expected {HULL_VERSION})")
        for key in ("backend", "entries"):
            if key not in data:
                raise ValueError(f"{path}: hull file lacks the {key!r} key")
        if not isinstance(data["entries"], list) or not isinstance(data["backend"], dict):
            raise ValueError(f"{path}: 'entries' must be a list and 'backend' an object")
        entries = [_parse_entry(e, i, path) for i, e in enumerate(data["entries"])]
        return cls(entries, {str(k): str(v) for k, v in data["backend"].items()}, data.get("meta", {}))

    # ------------------------------------------------------------------ queries
    @property
    def identity(self) -> dict[str, str]:
        """The recorded backend identity compared with :attr:`MLIPBackend.identity` (``backend`` less
        :data:`NON_IDENTITY_KEYS`); keys a file lacks mean the option was unset (see the module docstring)."""
        return {k: v for k, v in self.backend.items() if k not in NON_IDENTITY_KEYS}

    @property
    def elements(self) -> frozenset[str]:
        """Elements that have an elemental reference, i.e. that the hull covers."""
        return self._elemental

    def phase_diagram(self, elements: frozenset[str]) -> "PhaseDiagram | None":
        """The PhaseDiagram of the entries whose elements are a subset of ``elements``; None if an element has
        no elemental reference."""
        elements = frozenset(elements)
        if elements in self._pd_cache:
            self._pd_cache.move_to_end(elements)
            return self._pd_cache[elements]
        pd = None
        if elements <= self._elemental:
            from pymatgen.analysis.phase_diagram import PDEntry, PhaseDiagram
            from pymatgen.core import Composition, Element

            entries = [PDEntry(Composition(e.composition), e.energy_ev, name=e.id) for e in self.entries if e.elements <= elements]
            pd = PhaseDiagram(entries, elements=[Element(el) for el in sorted(elements)])
        self._pd_cache[elements] = pd
        if len(self._pd_cache) > self.max_cached_systems:
            self._pd_cache.popitem(last=False)
        return pd

    def e_above_hull(self, composition: Mapping[str, float], energy_ev: float) -> float:
        """eV/atom above the hull (negative below it); NaN if the system is not covered."""
        from pymatgen.analysis.phase_diagram import PDEntry
        from pymatgen.core import Composition

        comp = Composition(dict(composition))
        pd = self.phase_diagram(frozenset(el.symbol for el in comp.elements))
        if pd is None:
            return float("nan")
        return float(pd.get_e_above_hull(PDEntry(comp, energy_ev), allow_negative=True))


def _parse_entry(entry: Any, index: int, path: Path) -> HullEntry:
    """One ``entries`` item of a hull file; errors name the file and the entry (index and id)."""
    from pymatgen.core import Element

    where = f"{path}: entry {index}" + (f" (id {entry['id']!r})" if isinstance(entry, dict) and "id" in entry else "")
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected an object with 'composition' and 'energy_ev', got {type(entry).__name__}")
    for key in ("composition", "energy_ev"):
        if key not in entry:
            raise ValueError(f"{where}: lacks the {key!r} key")
    comp = entry["composition"]
    if not isinstance(comp, dict) or not comp:
        raise ValueError(f"{where}: 'composition' must be a non-empty object of element -> amount, got {comp!r}")
    try:
        composition = {str(el): float(amt) for el, amt in comp.items()}
        energy = float(entry["energy_ev"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: amounts and 'energy_ev' must be numbers ({err})") from None
    unknown = [el for el in composition if not Element.is_valid_symbol(el)]
    if unknown:
        raise ValueError(f"{where}: unknown element(s) {', '.join(unknown)} in 'composition'")
    if not np.isfinite(energy) or not all(np.isfinite(a) and a >= 0 for a in composition.values()) or not sum(composition.values()) > 0:
        raise ValueError(f"{where}: non-finite energy or non-positive amounts ({composition}, {energy})")
    return HullEntry(composition, energy, str(entry.get("id", "")))


# ---------------------------------------------------------------------------------------------- building


def elemental_candidates(symbol: str) -> list[tuple[str, "Structure"]]:
    """Unrelaxed stand-ins for an element's ground state, (label, structure) pairs; the lowest MLIP energy is kept.

    ASE's reference crystal where it has one (experimental lattice constants), a dimer in a box for the diatomic
    molecular elements, else simple fcc/bcc/sc/diamond prototypes over a few volumes. These are upper bounds on the
    true elemental energy: supply relaxed elemental structures in the references when accuracy matters.
    """
    from ase import Atoms
    from ase.build import bulk
    from ase.data import atomic_numbers, covalent_radii
    from pymatgen.io.ase import AseAtomsAdaptor

    if symbol in _DIMER_BONDS:
        d = _DIMER_BONDS[symbol]
        atoms = Atoms(symbol * 2, positions=[[0, 0, 0], [0, 0, d]], cell=[_DIMER_BOX] * 3, pbc=True)
        return [(f"{symbol}2-dimer", AseAtomsAdaptor.get_structure(atoms))]
    try:
        return [(f"{symbol}-ase-reference", AseAtomsAdaptor.get_structure(bulk(symbol)))]
    except (ValueError, RuntimeError, KeyError):
        pass
    d0 = 2.0 * covalent_radii[atomic_numbers[symbol]]
    out = []
    for scale in _PROTOTYPE_SCALES:
        d = scale * d0
        for kind, a in (("fcc", d * 2**0.5), ("bcc", 2 * d / 3**0.5), ("sc", d), ("diamond", 4 * d / 3**0.5)):
            out.append((f"{symbol}-{kind}-{scale:g}", AseAtomsAdaptor.get_structure(bulk(symbol, kind, a=a))))
    return out


def partial_path(out: str | Path) -> Path:
    """Where ``build_hull(out=...)`` keeps finished batches of reference energies until the hull file is written."""
    return Path(out).with_name(f".{Path(out).name}.partial.json")


def check_partial(out: str | Path, resume: bool) -> None:
    """A new build into ``out`` must not silently delete the saved batches of an interrupted one."""
    partial = partial_path(out)
    if partial.exists() and not resume:
        raise FileExistsError(
            f"{partial} holds the finished batches of an interrupted build of {out}; rerun with --resume "
            "(resume=True) to continue it, or delete that file to start over"
        )


def build_hull(
    structures: Sequence["Structure"],
    backend: str | Mapping[str, Any] | MLIPBackend = "sevenn",
    ids: Sequence[str] | None = None,
    add_elements: bool = True,
    out: str | Path | None = None,
    thresholds: ValidityThresholds | Mapping[str, float] | None = None,
    batch_size: int = 256,
    progress: bool = False,
    provenance: Mapping[str, Any] | None = None,
    min_radius_ratio: float | None = MIN_RADIUS_RATIO,
    resume: bool = False,
) -> ReferenceHull:
    """MLIP energies of the reference structures (invalid ones and MLIP failures are skipped with a warning),
    plus elemental references for elements that lack one (``add_elements``). Saved to ``out`` if given.

    References are screened like the rewards screen generated structures (validity, the contact trust check
    with ``min_radius_ratio``, density, energy bounds). The file records ``backend.identity`` (with e.g. SevenNet's
    ``modal``) and the dtype.

    ``progress``: a progress bar on stderr (on a terminal) over the reference energies. The hull's ``meta``
    records the software versions (with the MLIP package's) and any ``provenance`` given (e.g. the command).

    With ``out``, every finished batch of energies is kept in ``.<out name>.partial.json`` beside it, and
    ``resume=True`` continues an interrupted build with the same references and backend from there.
    """
    import hashlib

    from crystalign.io import remove_stale_parts, write_json

    from tqdm.auto import tqdm

    from crystalign.crystal import CrystalBatch
    from crystalign.provenance import versions

    mlip = get_backend(backend)
    thresholds = coerce_thresholds(thresholds)
    if ids is None:
        ids = [f"ref-{i}" for i in range(len(structures))]
    if len(ids) != len(structures):
        raise ValueError(f"{len(ids)} ids for {len(structures)} structures")
    entries: list[HullEntry] = []
    skipped: list[str] = []
    # finished reference batches, so an interrupted build over many references loses at most one batch
    partial_file = None if out is None else partial_path(out)
    run = {
        "backend": {**mlip.identity, "dtype": str(mlip.dtype).replace("torch.", "")},
        "references_sha256": hashlib.sha256(repr([(i, s.composition.formula, s.lattice.abc) for i, s in zip(ids, structures)]).encode()).hexdigest(),
        "thresholds": dataclasses.asdict(thresholds), "min_radius_ratio": min_radius_ratio, "batch_size": batch_size,
    }
    done: dict[str, Any] = {}
    if partial_file is not None and resume and partial_file.exists():
        saved = json.loads(partial_file.read_text())
        if saved.get("run") != run:
            raise ValueError(f"--resume: {partial_file} was made with other references or backend settings; rerun with the original "
                             f"references and settings, or delete {partial_file} to start over")
        done = saved["batches"]

    def evaluate(structs: Sequence["Structure"], names: Sequence[str], bar=None, keep: bool = False) -> list[HullEntry]:
        got = []
        for start in range(0, len(structs), batch_size):
            if keep and str(start) in done:  # finished before the interruption
                got += [HullEntry(dict(e["composition"]), float(e["energy_ev"]), str(e["id"])) for e in done[str(start)]["entries"]]
                skipped.extend(done[str(start)]["skipped"])
                if bar is not None:
                    bar.update(min(batch_size, len(structs) - start))
                continue
            n_got, n_skipped = len(got), len(skipped)
            chunk = list(structs[start : start + batch_size])
            batch = CrystalBatch.from_structures(chunk)
            s = screened_energies(batch, mlip, thresholds, min_radius_ratio=min_radius_ratio)
            for k, ok in enumerate(s.valid):
                name = names[start + k]
                if not ok:
                    skipped.append(name)
                    continue
                comp = chunk[k].composition
                got.append(HullEntry({el.symbol: float(a) for el, a in comp.element_composition.items()}, float(s.total_energy[k]), name))
            if keep and partial_file is not None:
                done[str(start)] = {"entries": [dataclasses.asdict(e) for e in got[n_got:]], "skipped": skipped[n_skipped:]}
                write_json(partial_file, {"run": run, "batches": done})
            if bar is not None:
                bar.update(len(chunk))
        return got

    if out is not None:
        check_partial(out, resume)
        # temporary files of the hull and batch-file writes that a kill interrupted
        remove_stale_parts(Path(out).parent, names=[Path(out).name, partial_file.name])
    # disable=None: the bar shows on a terminal only, so logs stay clean
    with tqdm(total=len(structures), desc="MLIP energies", unit="structure", disable=None if progress else True) as bar:
        entries += evaluate(structures, ids, bar, keep=True)
    if skipped:
        warnings.warn(f"hull: skipped {len(skipped)} invalid reference(s) or MLIP failure(s): {', '.join(skipped[:10])}", stacklevel=2)
    added: list[str] = []
    if add_elements:
        present = {next(iter(e.elements)) for e in entries if len(e.elements) == 1}
        needed = sorted({el for e in entries for el in e.elements} - present)
        for symbol in needed:
            skipped.clear()
            labelled = elemental_candidates(symbol)
            cands = evaluate([s for _, s in labelled], [f"auto:{label}" for label, _ in labelled])
            if not cands:
                warnings.warn(f"hull: no elemental reference for {symbol}: systems containing it are not covered", stacklevel=2)
                continue
            entries.append(min(cands, key=lambda e: e.energy_per_atom_ev))
            added.append(entries[-1].id)
    n_used = sum(not e.id.startswith("auto:") for e in entries)
    meta: dict[str, Any] = {"n_references": len(structures), "n_skipped": len(structures) - n_used}
    meta["versions"] = {**versions(), **_package_version(mlip.name)}
    meta.update(provenance or {})
    if added:
        meta["auto_elemental_references"] = added
    hull = ReferenceHull(entries, {**mlip.identity, "dtype": str(mlip.dtype).replace("torch.", "")}, meta)
    if out is not None:
        hull.save(out)
        partial_file.unlink(missing_ok=True)
    return hull


def _package_version(backend_name: str) -> dict[str, str]:
    """The version of the MLIP's own package (energies change between releases), where it is installed."""
    import importlib.metadata as md

    dist = {"sevenn": "sevenn", "chgnet": "chgnet", "mace": "mace-torch"}.get(backend_name)
    try:
        return {dist: md.version(dist)} if dist else {}
    except md.PackageNotFoundError:
        return {}


# ---------------------------------------------------------------------------------------------- reward


class EnergyAboveHullReward:
    """R = −scale · min(e_hull, invalid_penalty) (eV/atom) against a :class:`ReferenceHull` built with the same MLIP.

    The penalty is a floor on the reward: a valid structure with e_hull above ``invalid_penalty`` scores like an
    invalid one, never below it, so breaking a structure further cannot raise its reward (the raw e_hull stays in
    the info). Structures are screened as in :class:`~crystalign.rewards.energy.EnergyReward`, including the
    contact trust check (``min_radius_ratio``).

    Args:
        hull: a hull file path or a :class:`ReferenceHull`.
        backend: None rebuilds the backend recorded in the hull from all its recorded keys (name, model, modal,
            dtype, ...); a backend whose identity (name, model, modal, ...: :attr:`ReferenceHull.identity`)
            differs is refused. A hull file without ``modal`` reads as built without one.
        invalid_penalty: e_hull (eV/atom) for invalid structures and MLIP failures, and the cap on the e_hull of
            valid ones in the reward value.
        uncovered_penalty: e_hull for structures with an element the hull has no elemental reference for
            (default: ``invalid_penalty``); a warning names each such chemical system once.
        max_energy_above_hull: optional further cap on e_hull in the reward value.
        min_radius_ratio: the contact trust check (see ``EnergyReward``); default 0.5, None or 0 switches it off.

    Info keys: ``e_above_hull_ev_per_atom`` (raw, NaN where invalid or uncovered), ``energy_per_atom_ev``,
    ``contact_ratio``, 0/1 flags ``valid``, ``hull_covered``, ``invalid_geometry``, ``invalid_energy``,
    ``invalid_contact``, ``penalty_capped`` (the flags are NaN for uncovered structures, which are not screened).
    """

    name = "e_above_hull"

    def __init__(
        self,
        hull: str | Path | ReferenceHull,
        backend: str | Mapping[str, Any] | MLIPBackend | None = None,
        invalid_penalty: float = 3.0,
        uncovered_penalty: float | None = None,
        max_energy_above_hull: float | None = None,
        scale: float = 1.0,
        thresholds: ValidityThresholds | Mapping[str, float] | None = None,
        min_energy_per_atom: float = MIN_ENERGY_PER_ATOM,
        max_energy_per_atom: float = MAX_ENERGY_PER_ATOM,
        max_number_density: float = MAX_NUMBER_DENSITY,
        min_radius_ratio: float | None = MIN_RADIUS_RATIO,
    ) -> None:
        self.hull = hull if isinstance(hull, ReferenceHull) else ReferenceHull.load(hull)
        recorded = self.hull.identity
        if backend is None:
            if "name" not in self.hull.backend:
                raise ValueError("the hull records no backend name: pass backend= explicitly")
            try:  # every recorded key, dtype included, so the energies are made the way the hull's were
                backend = get_backend(dict(self.hull.backend))
            except (ValueError, TypeError) as err:
                raise ValueError(
                    f"cannot rebuild the backend recorded in the hull ({self.hull.backend}): {err}; pass backend= explicitly"
                ) from err
        self.backend = get_backend(backend)
        if recorded and self.backend.identity != recorded:
            hint = ""
            if "modal" in self.backend.identity and "modal" not in recorded:
                hint = (
                    " (the hull file records no 'modal': it was built without one, or before crystalign recorded it, "
                    "so it cannot say which modal made its energies)"
                )
            raise ValueError(
                f"hull was built with {recorded} but the reward uses {self.backend.identity}{hint}: energies from "
                "different potentials or modals are not comparable; rebuild the hull with this backend"
            )
        if not np.isfinite(invalid_penalty):
            raise ValueError(f"invalid_penalty must be finite, got {invalid_penalty}")
        self.min_radius_ratio = _check_ratio(min_radius_ratio)
        self.invalid_penalty = float(invalid_penalty)
        self.uncovered_penalty = self.invalid_penalty if uncovered_penalty is None else float(uncovered_penalty)
        self.max_energy_above_hull = max_energy_above_hull
        self.scale = float(scale)
        self.thresholds = coerce_thresholds(thresholds)
        self.min_energy_per_atom, self.max_energy_per_atom = float(min_energy_per_atom), float(max_energy_per_atom)
        self.max_number_density = float(max_number_density)
        self._warned: set[frozenset[str]] = set()

    def __call__(self, batch: "CrystalBatch | Sequence[Structure]") -> RewardResult:
        batch = as_batch(batch)
        from pymatgen.core import Element

        b = batch.num_structures
        comps = [{Element.from_Z(z).symbol: float(n) for z, n in comp.items()} for comp in batch.compositions()]
        covered = np.array([frozenset(c) <= self.hull.elements for c in comps], dtype=bool)
        for c, ok in zip(comps, covered):
            system = frozenset(c)
            if not ok and system not in self._warned:
                self._warned.add(system)
                missing = ", ".join(sorted(system - self.hull.elements))
                warnings.warn(
                    f"hull has no elemental reference for {missing}: {'-'.join(sorted(system))} gets the uncovered penalty",
                    stacklevel=2,
                )
        # uncovered structures cannot be scored, so they never cost an MLIP call
        valid = np.zeros(b, dtype=bool)
        energy_pa = np.full(b, np.nan)
        e_hull = np.full(b, np.nan)
        ratio = np.full(b, np.nan)
        flags = {key: np.full(b, np.nan) for key in ("invalid_geometry", "invalid_energy", "invalid_contact")}
        idx = np.flatnonzero(covered)
        if idx.size:
            s = screened_energies(
                batch[torch.as_tensor(idx, device=batch.device)], self.backend, self.thresholds,
                self.min_energy_per_atom, self.max_energy_per_atom, self.max_number_density, self.min_radius_ratio,
            )
            valid[idx], energy_pa[idx], ratio[idx] = s.valid, s.energy_per_atom, s.radius_ratio
            flags["invalid_geometry"][idx] = ~s.geometry_ok
            flags["invalid_energy"][idx] = s.invalid_energy
            flags["invalid_contact"][idx] = s.invalid_contact
            for k, i in enumerate(idx):
                if s.valid[k]:
                    e_hull[i] = self.hull.e_above_hull(comps[i], float(s.total_energy[k]))
            valid &= np.isfinite(e_hull)  # a hull failure scores like an invalid structure
        # the penalty is a floor on the reward: valid e_hull counts as at most the penalty (and the optional cap)
        cap = self.invalid_penalty if self.max_energy_above_hull is None else min(self.invalid_penalty, self.max_energy_above_hull)
        with np.errstate(invalid="ignore"):
            capped = np.where(covered, valid & (e_hull > self.invalid_penalty), np.nan)
        scored = np.minimum(e_hull, cap)
        penalised = np.where(~covered, self.uncovered_penalty, np.where(valid, scored, self.invalid_penalty))
        info = {
            "e_above_hull_ev_per_atom": as_tensor(e_hull, batch),
            "energy_per_atom_ev": as_tensor(energy_pa, batch),
            "contact_ratio": as_tensor(ratio, batch),
            "valid": as_tensor(valid, batch),
            "hull_covered": as_tensor(covered, batch),
            **{key: as_tensor(value, batch) for key, value in flags.items()},
            "penalty_capped": as_tensor(capped, batch),
        }
        return RewardResult(as_tensor(-self.scale * penalised, batch), info)
