"""The main job: likely low-energy crystal structures of one composition.

Base model samples → optional inference-time RL on this composition → optional MLIP relaxation →
duplicate removal → ranking by energy per atom → CIFs, extxyz, JSON and ``report.html``.
Every stage writes its results before the next starts, so an interrupted run resumes with ``resume=True``.

Example::

    import crystalign
    result = crystalign.predict("SrTiO3", n=16, rl_steps=10, out="predictions/SrTiO3")
    best = result.structures[0]; print(best.composition, result.energies[0])
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from crystalign.crystal import CrystalBatch
from crystalign.generator import Generator, cell_formula, check_seed, composition_batch, parse_composition
from crystalign.io import atomic_path, check_output_dir, remove_stale_parts, write_json

log = logging.getLogger(__name__)

DEFAULT_COMPOSITION = "SrTiO3"
DEFAULT_MODEL = "perov_5"


class PredictWarning(UserWarning):
    """Something the user of ``predict`` should know about the answer (the command prints these)."""


class CoverageWarning(PredictWarning):
    """The composition lies outside what the model saw in training."""


class RLStoppedWarning(PredictWarning):
    """Inference-time RL stopped early (its guard tripped); the answer comes from the base model alone."""


@dataclass
class PredictOptions:
    composition: str = DEFAULT_COMPOSITION
    n: int = 32
    model: str = DEFAULT_MODEL
    backend: str = "sevenn"
    mlip_model: str | None = None
    #: fidelity of a multi-fidelity SevenNet model (e.g. PBE or R2SCAN for 7net-mf-0)
    mlip_modal: str | None = None
    rl_steps: int = 20
    rl_variant: str = "velocity"
    rl_group_size: int = 8
    rl_groups: int = 4
    rl_lr: float = 3e-4
    rl_noise: float = 0.1668100537
    steps: int = 50
    relax: bool = True
    relax_steps: int = 100
    relax_top: int = 16
    fmax: float = 0.05
    seed: int = 0
    out: str = ""
    resume: bool = False
    device: str = "cpu"
    top_k: int = 6
    #: formula units per cell to try: "" = the composition as written (one cell), "1,2,4", or "auto"
    formula_units: str = ""

    def __post_init__(self) -> None:
        # the Python API's natural values, normalised to the plain data a run folder records and compares on resume
        from pymatgen.core import Composition

        if isinstance(self.composition, Composition):
            self.composition = cell_formula(self.composition)
        if isinstance(self.formula_units, (int, np.integer)) and not isinstance(self.formula_units, bool):
            self.formula_units = str(int(self.formula_units))
        elif isinstance(self.formula_units, (list, tuple)):
            self.formula_units = ",".join(str(z) for z in self.formula_units)
        elif not isinstance(self.formula_units, str):
            raise TypeError(f"formula_units must be 'auto', counts such as [1, 2, 4] or '1,2,4', got {self.formula_units!r}")
        self.seed = check_seed(self.seed)

    def validate(self) -> None:
        if self.n <= 0:
            raise ValueError(f"-n must be a positive number of candidates, got {self.n}")
        if self.rl_steps < 0:
            raise ValueError(f"--rl-steps must be >= 0, got {self.rl_steps}")
        if self.steps < 2:
            raise ValueError(f"--steps must be >= 2, got {self.steps}")
        if self.relax_top < 1:
            raise ValueError(f"--relax-top must be >= 1, got {self.relax_top}")
        if self.relax_steps < 0:
            raise ValueError(f"--relax-steps must be >= 0, got {self.relax_steps}")
        from crystalign.rl.loop import RLConfig, check_device

        check_device(self.device, "--device")  # a CUDA request on a CPU-only machine fails here, not mid-run
        if self.rl_steps:  # a bad RL option fails now, not after the base model's candidates are written
            try:
                RLConfig(iterations=self.rl_steps, seed=self.seed, **self.rl_options())
            except (TypeError, ValueError) as err:
                raise ValueError(f"RL options (rl_*): {err}") from None

    def rl_options(self) -> dict[str, Any]:
        """The RLConfig options of predict's inference-time RL (velocity RL of positions toward low energy)."""
        noise = {"kind": "sqrt", "a": self.rl_noise}
        return dict(
            variant=self.rl_variant, fields=["pos"], steps=self.steps, noise={"pos": noise, "cell": dict(noise)},
            group_size=self.rl_group_size, num_groups=self.rl_groups, ppo_epochs=1, lr=self.rl_lr,
            costs={"pos_policy": 1.0, "pos_regularization": 1e-3}, duplicate_check=False,
        )


@dataclass
class PredictResult:
    """Ranked unique candidates (best first) with energies per atom (eV/atom; NaN if invalid)."""

    structures: list
    energies: list[float]
    summary: dict[str, Any]
    out_dir: Path
    candidates: list[dict[str, Any]] = field(default_factory=list)


#: "auto" tries at most this many cell sizes (evenly spread over the training range)
MAX_AUTO_FORMULA_UNITS = 6


def cell_formulas(composition: str, formula_units: str, coverage: dict[str, Any] | None) -> list[str]:
    """The cells to sample: ``composition`` as written, or its reduced formula times each formula-unit count.

    ``formula_units``: "" (as written), a comma list ("1,2,4") or "auto": every count whose cell size lies in
    the model's training range of atoms per cell, at most :data:`MAX_AUTO_FORMULA_UNITS` of them, spread evenly.
    """
    from pymatgen.core import Composition

    spec = formula_units.strip().lower()
    if not spec:
        return [composition]
    reduced = Composition(composition).reduced_composition
    per_unit = int(round(reduced.num_atoms))
    if spec == "auto":
        lo, hi = (coverage or {}).get("n_atoms_min"), (coverage or {}).get("n_atoms_max")
        if lo is None or hi is None:
            raise ValueError("--formula-units auto needs the model's training range of cell sizes, which this model does not record; give counts, e.g. 1,2,4")
        counts = [z for z in range(1, hi // per_unit + 1) if lo <= z * per_unit <= hi]
        if not counts:
            raise ValueError(
                f"--formula-units auto: no multiple of {reduced.reduced_formula} ({per_unit} atoms) has a cell size in the "
                f"model's training range {lo}–{hi} atoms"
            )
        if len(counts) > MAX_AUTO_FORMULA_UNITS:
            picks = np.linspace(0, len(counts) - 1, MAX_AUTO_FORMULA_UNITS).round().astype(int)
            counts = [counts[i] for i in sorted(set(picks.tolist()))]
    else:
        try:
            counts = sorted({int(part) for part in spec.split(",") if part.strip()})
        except ValueError:
            raise ValueError(f"--formula-units must be 'auto' or a comma list of positive integers, got {formula_units!r}") from None
        if not counts or counts[0] < 1:
            raise ValueError(f"--formula-units must be 'auto' or a comma list of positive integers, got {formula_units!r}")
    return [cell_formula(reduced * z) for z in counts]


# ---------------------------------------------------------------------- checks before any work
def coverage_warnings(gen: Generator, species: list[int]) -> list[str]:
    """Human-readable warnings when the composition is outside the model's training coverage."""
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


# ---------------------------------------------------------------------- stages
class _Stages:
    """Persistent record of finished stages in ``OUT/state.json`` (written atomically)."""

    def __init__(self, out: Path, options: PredictOptions, resume: bool):
        self.path = out / "state.json"
        self.state: dict[str, Any] = {"options": asdict(options), "done": {}}
        if resume and self.path.exists():
            prev = json.loads(self.path.read_text())
            keep = {k: v for k, v in asdict(options).items() if k not in ("resume", "out")}
            # an option added after the run was written had its default value there
            old = {**asdict(PredictOptions()), **prev.get("options", {})}
            changed = sorted(k for k in keep if keep[k] != old.get(k))
            if changed:
                raise ValueError(f"--resume: options differ from the interrupted run in {', '.join(changed)}; use a new --out")
            self.state = prev
        elif not resume and self.path.exists():
            raise FileExistsError(f"{out} already holds a prediction; pass --resume (resume=True from Python) to continue it, or choose another --out")

    def done(self, name: str) -> bool:
        return name in self.state["done"]

    def mark(self, name: str, info: Any = True) -> None:
        self.state["done"][name] = info
        write_json(self.path, self.state)


def _write_extxyz(path: Path, batch: CrystalBatch) -> None:
    from ase.io import write as ase_write

    with atomic_path(path) as tmp:
        ase_write(tmp, batch.to_atoms(), format="extxyz")


def _read_extxyz(path: Path) -> CrystalBatch:
    from ase.io import read as ase_read

    return CrystalBatch.from_atoms(ase_read(path, index=":", format="extxyz"))


def relax_structures(
    batch: CrystalBatch, calculator_factory: Callable[[], Any], steps: int, fmax: float, folder: Path, progress: bool = True
) -> tuple[CrystalBatch, list[dict[str, Any]]]:
    """ASE FIRE on positions and cell (Fréchet cell filter) with the MLIP calculator, at most ``steps`` steps.

    Returns the structures and, per structure, what happened: ``status`` (``converged``, ``not_converged``
    after ``steps`` steps, ``failed``: the MLIP raised, the unrelaxed geometry is kept; ``skipped_invalid``),
    ``steps`` and the final largest force ``fmax_ev_per_a``.

    One file per structure, so an interrupted relaxation resumes where it stopped. Invalid structures are
    returned unchanged (an MLIP on overlapping atoms gives meaningless forces).
    """
    from ase.io import read as ase_read
    from ase.io import write as ase_write
    from ase.optimize import FIRE
    from tqdm import tqdm

    folder.mkdir(parents=True, exist_ok=True)
    valid = batch.validity().valid.tolist()
    atoms_list = batch.to_atoms()
    calc = None
    out = []
    for i, atoms in enumerate(tqdm(atoms_list, desc="relaxing", unit="structure", disable=not progress)):
        path = folder / f"{i:05d}.extxyz"
        if path.exists():
            out.append(ase_read(path, format="extxyz"))
            continue
        if valid[i] and steps > 0:
            if calc is None:
                calc = calculator_factory()
            start = atoms.copy()  # FIRE moves atoms in place: a failed run must not leave a half-relaxed cell
            atoms.calc = calc
            try:
                from ase.filters import FrechetCellFilter

                target = FrechetCellFilter(atoms)
            except ImportError:  # older ASE
                target = atoms
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    opt = FIRE(target, logfile=None)
                    converged = bool(opt.run(fmax=fmax, steps=steps))
                    forces = np.asarray(target.get_forces())
                atoms.info.update(
                    relax_status="converged" if converged else "not_converged",
                    relax_steps=int(opt.nsteps),
                    relax_fmax=float(np.sqrt((forces**2).sum(-1).max())) if forces.size else 0.0,
                )
            except Exception as err:  # noqa: BLE001 - an MLIP failure on one structure must not stop the run
                log.warning("relaxation of candidate %d failed (%s); keeping its unrelaxed geometry", i, err)
                atoms = start
                reason = " ".join(f"{type(err).__name__}: {err}".replace('"', "'").split())[:200]
                atoms.info.update(relax_status="failed", relax_error=reason)
            atoms.calc = None
        else:
            atoms.info.update(relax_status="skipped_invalid" if not valid[i] else "not_relaxed")
        with atomic_path(path) as tmp:
            ase_write(tmp, atoms, format="extxyz")
        out.append(ase_read(path, format="extxyz"))  # as a resumed run will see it, to the last digit
    relaxed = CrystalBatch.from_atoms(out).to(dtype=batch.dtype)
    return relaxed, [_relax_record(a.info) for a in out]


def _relax_counts(records: list[dict[str, Any]] | None) -> dict[str, int]:
    if records is None:
        return {}
    count = lambda status: sum(r["status"] == status for r in records)  # noqa: E731
    return {"n_relax_converged": count("converged"), "n_relax_not_converged": count("not_converged"), "n_relax_failed": count("failed")}


def _relax_record(info: Mapping[str, Any]) -> dict[str, Any]:
    """What a candidate's relaxation did, from the info its extxyz file keeps (so resumed runs report it too)."""
    record: dict[str, Any] = {"status": str(info.get("relax_status", "unknown"))}
    if "relax_steps" in info:
        record["steps"] = int(info["relax_steps"])
    if "relax_fmax" in info:
        record["fmax_ev_per_a"] = float(info["relax_fmax"])
    if "relax_error" in info:
        record["error"] = str(info["relax_error"])
    return record


def unique_ranked(structures: list, energies: np.ndarray, valid: np.ndarray) -> list[int]:
    """Indices of unique valid candidates, lowest energy per atom first (benchmark StructureMatcher)."""
    from crystalign.matching import make_matcher

    matcher = make_matcher()
    order = [i for i in np.argsort(np.where(valid, energies, np.inf), kind="stable") if valid[i]]
    kept: list[int] = []
    for i in order:
        if not any(matcher.fit(structures[i], structures[j]) for j in kept):
            kept.append(int(i))
    return kept


def _spacegroup(structure) -> str:
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    try:
        sga = SpacegroupAnalyzer(structure, symprec=0.1)
        return f"{sga.get_space_group_symbol()} ({sga.get_space_group_number()})"
    except Exception:  # noqa: BLE001 - spglib can fail on odd cells; the table shows a dash
        return "—"


# ---------------------------------------------------------------------- the pipeline
def default_out_dir(composition: str) -> Path:
    """Where :func:`predict` writes without ``out``: ``predictions/<reduced formula>``."""
    from pymatgen.core import Composition

    return Path("predictions") / Composition(composition).reduced_formula


def predict(composition: str = DEFAULT_COMPOSITION, progress: bool = True, **options: Any) -> PredictResult:
    """Predict likely low-energy structures of ``composition``; see :class:`PredictOptions` for options."""
    from crystalign.rewards import EnergyReward
    from crystalign.rewards.mlip import get_backend
    from crystalign.provenance import versions

    opts = PredictOptions(composition=composition, **options)
    opts.validate()
    t_start = time.time()
    # cheap checks first: composition, output folder, model, MLIP element support
    parse_composition(opts.composition)
    from pymatgen.core import Composition

    formula = Composition(opts.composition).reduced_formula
    out = Path(opts.out) if opts.out else default_out_dir(opts.composition)
    # the top-most folder this call creates: a refused query removes it again
    created = next((p for p in reversed([out, *out.parents]) if not p.exists()), None)
    check_output_dir(out)
    remove_stale_parts(out, recursive=True)  # temporary files of writes that a kill interrupted (rl/, relax/, ...)
    try:
        stages = _Stages(out, opts, opts.resume)
        gen = Generator.load(opts.model).to(opts.device)
        cells = cell_formulas(opts.composition, opts.formula_units, gen.coverage)
        cell_species = [parse_composition(cell, max_atoms=gen.config.max_atoms) for cell in cells]
        backend = get_backend(opts.backend, model=opts.mlip_model, modal=opts.mlip_modal).load()
        check_supported = getattr(backend, "check_elements", None)
        if check_supported is not None:
            check_supported(cell_species[0])
    except BaseException:
        # a refused query leaves no trace: remove the folders this call created while still empty
        folder = out
        while created is not None and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
            if folder == created:
                break
            folder = folder.parent
        raise
    warns = [f"{cell}: {w}" for cell, sp in zip(cells, cell_species) for w in coverage_warnings(gen, sp)]
    for w in warns:
        warnings.warn(w, CoverageWarning, stacklevel=2)
    reward = EnergyReward(backend)
    template = composition_batch(cells, opts.n, max_atoms=gen.config.max_atoms)
    summary: dict[str, Any] = {
        "composition": opts.composition,
        "formula": formula,
        "cells": cells,
        "model": opts.model,
        "model_hash": gen.model_hash(),
        "reward": f"energy per atom ({opts.backend})",
        "mlip": dict(backend.identity),
        "seed": opts.seed,
        "n": opts.n,
        "steps": opts.steps,
        "rl_steps": opts.rl_steps,
        "relax": opts.relax,
        "coverage_warnings": warns,
        "options": {**{k: v for k, v in asdict(opts).items() if k not in ("composition", "resume")}, "out": str(out)},
        "versions": versions(),
        "command": " ".join(sys.argv) if sys.argv else "",
    }

    # 1. base model samples
    base_path = out / "base.extxyz"
    if not stages.done("base"):
        base = gen.sample(template.to(dtype=torch.float32), seed=opts.seed, steps=opts.steps)
        _write_extxyz(base_path, base)
        stages.mark("base")
    base = _read_extxyz(base_path)
    base_result = reward(base)
    base_energy = base_result.info["energy_per_atom_ev"].numpy()

    # 2. inference-time RL on this composition
    history: list[dict[str, Any]] = []
    candidates = base
    rl_result = None
    rl_stopped = None
    if opts.rl_steps > 0:
        from crystalign.rl.loop import RLDivergedError

        try:
            history = _run_rl(gen, reward, opts, cells, out / "rl", progress)
        except RLDivergedError as err:
            # e.g. a composition the model cannot make valid structures of: the base candidates still get ranked
            rl_stopped = str(err)
            warnings.warn(f"{formula}: inference-time RL stopped ({err}); ranking the base model's candidates only", RLStoppedWarning, stacklevel=2)
    if opts.rl_steps > 0 and rl_stopped is None:
        rl_path = out / "rl_samples.extxyz"
        if not stages.done("rl_samples"):
            from crystalign.steering import SteeredModel

            steered = SteeredModel.load(out / "rl" / "last.pt").to(opts.device)
            # the mean path of the reinforced policy: exploration noise only costs energy at sampling time
            rl_batch = steered.sample_batch(
                template, steps=opts.steps, seed=opts.seed + 1, noise=False, batch_size=template.num_structures, progress=False
            ).to("cpu")
            _write_extxyz(rl_path, rl_batch)
            stages.mark("rl_samples")
        rl_candidates = _read_extxyz(rl_path)
        rl_result = reward(rl_candidates)
        # rank the union: a short per-query RL run can only add better candidates, never lose the base ones
        candidates = CrystalBatch.cat([base, rl_candidates])
    sampled_energy = (rl_result if rl_result is not None else base_result).info["energy_per_atom_ev"].numpy()
    cand_result = reward(candidates) if rl_result is not None else base_result
    summary["rl_stopped"] = rl_stopped

    # 3. relaxation with the same MLIP, of the lowest-energy valid candidates only (relaxation dominates run time)
    relax_records: list[dict[str, Any]] | None = None
    if opts.relax:
        e = cand_result.info["energy_per_atom_ev"].numpy()
        order = [int(i) for i in np.argsort(np.where(np.isfinite(e), e, np.inf), kind="stable") if np.isfinite(e[i])]
        candidates = candidates[torch.tensor(order[: opts.relax_top], dtype=torch.long)] if order else candidates
        numpy_rng = np.random.get_state()  # ASE's optimisers draw from numpy's global RNG: not the caller's business
        try:
            candidates, relax_records = relax_structures(
                candidates, lambda: backend.ase_calculator(), opts.relax_steps, opts.fmax, out / "relax", progress
            )
        finally:
            np.random.set_state(numpy_rng)
        stages.mark("relax")
    final = reward(candidates) if opts.relax else cand_result
    energy = final.info["energy_per_atom_ev"].numpy()
    valid = final.info["valid"].numpy().astype(bool)

    # 4. unique candidates ranked by energy per atom
    structures = candidates.to_structures()
    order = unique_ranked(structures, energy, valid)
    ranked = [structures[i] for i in order]
    best = float(energy[order[0]]) if order else math.nan
    (out / "candidates").mkdir(exist_ok=True)
    rows = []
    for rank, i in enumerate(order, start=1):
        s = structures[i]
        name = f"candidates/{rank:03d}_{s.composition.reduced_formula}.cif"
        with atomic_path(out / name) as tmp:
            tmp.write_text(s.to(fmt="cif"))
        rows.append(
            {
                "rank": rank,
                "id": f"candidate_{i:04d}",
                "formula": s.composition.reduced_formula,
                "spacegroup": _spacegroup(s),
                "energy_per_atom_ev": float(energy[i]),
                "energy_above_best_mev": 1000.0 * (float(energy[i]) - best),
                "valid": True,
                "file": name,
                **({"relax": relax_records[i]} if relax_records is not None else {}),
            }
        )
    if order:
        _write_extxyz(out / "candidates.extxyz", candidates[torch.tensor(order)])
    n_valid = int(valid.sum())
    summary.update(
        {
            "n_valid": n_valid,
            "n_unique": len(order),
            "best_energy_per_atom_ev": best,
            "base_energy_per_atom_ev_mean": _nanmean(base_energy),
            "sampled_energy_per_atom_ev_mean": _nanmean(sampled_energy),
            "n_candidates": cand_result.rewards.numel(),
            "n_relaxed": candidates.num_structures if opts.relax else 0,
            **_relax_counts(relax_records),
            "final_energy_per_atom_ev_mean": _nanmean(energy),
            "base_invalid_fraction": float(np.isnan(base_energy).mean()),
            "wall_time_s": time.time() - t_start,
        }
    )
    write_json(out / "summary.json", {**summary, "candidates": rows, "rl_history": history})
    from crystalign.report import write_report

    write_report(
        out,
        title=f"crystalign predict {formula}",
        summary=summary,
        candidates=rows,
        history=history or None,
        energies_before=[float(e) for e in base_energy if np.isfinite(e)],
        energies_after=[float(e) for e in sampled_energy if np.isfinite(e)] if rl_result is not None else None,
        structures=ranked,
        top_k=opts.top_k,
    )
    stages.mark("report")
    return PredictResult(structures=ranked, energies=[r["energy_per_atom_ev"] for r in rows], summary=summary, out_dir=out, candidates=rows)


def _nanmean(x: np.ndarray) -> float | None:
    x = np.asarray(x, dtype=float)
    return float(np.nanmean(x)) if np.isfinite(x).any() else None


def _run_rl(gen: Generator, reward, opts: PredictOptions, cells: list[str], folder: Path, progress: bool) -> list[dict[str, Any]]:
    """K iterations of inference-time RL with GRPO groups drawn from the query's cells (resumable)."""
    from crystalign.steering import steer

    steered = steer(
        gen, reward, cells, iterations=opts.rl_steps, out=folder, resume=(folder / "last.pt").exists(),
        device=opts.device, seed=opts.seed, progress=progress, **opts.rl_options(),
    )
    return steered.history
