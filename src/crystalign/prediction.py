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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from crystalign.coverage import coverage_warnings
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


#: time points of per-query RL's rollouts when --steps is not given (the velocity policy integrates the plain field)
RL_STEPS = 50


@dataclass
class PredictOptions:
    composition: str = DEFAULT_COMPOSITION
    n: int = 32
    model: str = DEFAULT_MODEL
    #: draw the candidates from the shipped RL-tuned model of a shipped base whose card says it found lower relaxed
    #: energies at an equal MLIP budget (carbon_24 -> carbon_24_energy); False: the model as named
    tuned: bool = True
    #: share of the candidates drawn from the base model that the sampled model was RL-tuned from (the rest from the
    #: tuned model): the tuned model's candidates sit lower in energy, the base model's reach more basins. None: the
    #: tuned model's card (``predict_mix_base``), else 0
    mix_base: float | None = None
    backend: str = "sevenn"
    mlip_model: str | None = None
    #: fidelity of a multi-fidelity SevenNet model (e.g. PBE or R2SCAN for 7net-mf-0)
    mlip_modal: str | None = None
    #: iterations of per-query RL; off by default: at an equal number of MLIP energy evaluations, sampling more
    #: candidates from the base model found lower relaxed energies (BENCHMARKS.md, "per-query RL against best-of-N")
    rl_steps: int = 0
    rl_variant: str = "velocity"
    rl_group_size: int = 8
    rl_groups: int = 4
    rl_lr: float = 3e-4
    rl_noise: float = 0.1668100537
    #: rank RL's rollouts with the candidates: the reward already scored every one of them, so best-of-N over them
    #: costs no MLIP evaluation (False: only the base and the final policy's candidates, for ablations)
    rank_rollouts: bool = True
    #: RL reward cost (eV/atom) of a rollout that repeats a structure already found (base candidates or earlier
    #: rollouts; benchmark StructureMatcher): pays the policy for new basins, which the ranking needs. 0: off
    rl_novelty: float = 0.0
    #: MLIP energy evaluations before relaxation for the whole query (None: -n and rl_steps as given). Without RL the
    #: base model samples all of them, split evenly over the cell sizes (it sets n); with RL, n base and n policy
    #: candidates per cell size come first and RL runs as many of its rl_steps iterations as the rest pays for
    budget: int | None = None
    #: integration time points of the base sampler (None: the model's default, its learned schedule's if it has one)
    steps: int | None = None
    #: integrate the base candidates with the model's learned velocity schedule, if it carries one
    schedule: bool = True
    relax: bool = True
    #: FIRE steps per structure at most (None: :func:`default_relax_steps` of the largest cell)
    relax_steps: int | None = None
    relax_top: int = 16
    fmax: float = 0.05
    seed: int = 0
    out: str = ""
    resume: bool = False
    device: str = "cpu"
    top_k: int = 6
    #: formula units per cell to try: "" = the composition as written (one cell; cells outside the model's training
    #: range of atoms per cell switch to "auto"), "1,2,4", or "auto"
    formula_units: str = ""
    #: sample even a composition the model cannot cover (an element it never saw, no cell size in its range)
    force: bool = False

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
        if self.steps is not None and self.steps < 2:
            raise ValueError(f"--steps must be >= 2, got {self.steps}")
        if self.budget is not None and self.budget < 1:
            raise ValueError(f"--budget must be a positive number of MLIP energy evaluations, got {self.budget}")
        if self.rl_novelty < 0:
            raise ValueError(f"--rl-novelty must be >= 0 eV/atom, got {self.rl_novelty}")
        if self.rl_novelty and not self.rank_rollouts:
            raise ValueError("--rl-novelty pays RL for new structures among the ranked rollouts: it needs --rank-rollouts")
        if self.mix_base is not None and not 0 <= self.mix_base < 1:
            raise ValueError(f"--mix-base must be a share in [0, 1), got {self.mix_base}")
        if self.relax_top < 1:
            raise ValueError(f"--relax-top must be >= 1, got {self.relax_top}")
        if self.relax_steps is not None and self.relax_steps < 0:
            raise ValueError(f"--relax-steps must be >= 0, got {self.relax_steps}")
        from crystalign.rl.config import RLConfig, check_device

        check_device(self.device, "--device")  # a CUDA request on a CPU-only machine fails here, not mid-run
        # a bad RL option fails now, not after the base model's candidates are written (and even with RL off:
        # an option given by mistake is still a mistake)
        try:
            RLConfig(iterations=self.rl_steps, seed=self.seed, **self.rl_options())
        except (TypeError, ValueError) as err:
            raise ValueError(f"RL options (rl_*): {err}") from None

    def mlip_evaluations(self, n_cells: int) -> int:
        """MLIP energy evaluations before relaxation: n base candidates per cell size, and with RL its rollouts
        (rl_groups x rl_group_size per iteration) and n policy candidates per cell size."""
        rl = self.rl_steps * self.rl_groups * self.rl_group_size + self.n * n_cells if self.rl_steps else 0
        return self.n * n_cells + rl

    def within_budget(self, n_cells: int) -> PredictOptions:
        """These options with n (no RL) or rl_steps (RL) set so that the query spends at most ``budget`` MLIP
        energy evaluations before relaxation; a budget that cannot pay for one candidate per cell size, or with RL
        for one iteration's groups after the candidates, is refused."""
        if self.budget is None:
            return self
        if not self.rl_steps:
            if self.budget < n_cells:
                raise ValueError(f"--budget {self.budget} is smaller than one candidate per cell size ({n_cells} cell sizes)")
            return replace(self, n=self.budget // n_cells)
        candidates = 2 * self.n * n_cells
        group = self.rl_groups * self.rl_group_size
        if self.budget < candidates + group:
            raise ValueError(
                f"--budget {self.budget} is smaller than one RL iteration's groups after the candidates: {candidates // 2} base + "
                f"{candidates // 2} policy candidates + {self.rl_groups} groups of {self.rl_group_size} = {candidates + group} "
                "MLIP evaluations; raise --budget, lower -n, or drop --rl-steps"
            )
        return replace(self, rl_steps=min(self.rl_steps, (self.budget - candidates) // group))

    def rl_options(self) -> dict[str, Any]:
        """The RLConfig options of predict's inference-time RL (velocity RL of positions toward low energy)."""
        noise = {"kind": "sqrt", "a": self.rl_noise}
        return dict(
            variant=self.rl_variant, fields=["pos"], steps=self.steps or RL_STEPS, noise={"pos": noise, "cell": dict(noise)},
            group_size=self.rl_group_size, num_groups=self.rl_groups, ppo_epochs=1, lr=self.rl_lr,
            costs={"pos_policy": 1.0, "pos_regularization": 1e-3}, duplicate_check=False,
        )


@dataclass
class PredictResult:
    """Ranked unique trusted candidates (best first) with their energies per atom (eV/atom); ``candidates`` holds
    every row of the summary, the untrusted ones (``trusted`` False, ``untrusted_reason``) after the ranked ones."""

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


def _cells_inside_coverage(opts: PredictOptions, coverage: dict[str, Any] | None) -> tuple[list[str], str | None]:
    """The cells to sample and, when the composition as written has a cell size outside the model's training range
    (and the user gave no -z), the note saying that formula units inside the range were picked instead. No cell
    size inside the range at all is refused unless ``force``."""
    from pymatgen.core import Composition

    cov = coverage or {}
    lo, hi = cov.get("n_atoms_min"), cov.get("n_atoms_max")
    n_atoms = int(round(Composition(opts.composition).num_atoms))
    if opts.formula_units.strip() or lo is None or hi is None or lo <= n_atoms <= hi:
        return cell_formulas(opts.composition, opts.formula_units, coverage), None
    try:
        cells = cell_formulas(opts.composition, "auto", coverage)
    except ValueError:
        if opts.force:
            return [opts.composition], None
        raise ValueError(
            f"{opts.composition}: no cell of this composition has a size in model {opts.model}'s training range of {lo}–{hi} "
            "atoms, so it cannot produce this composition; pass --force (force=True) to sample it anyway"
        ) from None
    note = (
        f"{opts.composition} has {n_atoms} atom(s) per cell, outside model {opts.model}'s training range {lo}–{hi}: "
        f"sampling {', '.join(cells)} instead (as -z auto; give -z to choose cell sizes)"
    )
    return cells, note


def _refuse_unseen_elements(opts: PredictOptions, gen: Generator, species: list[int]) -> None:
    from pymatgen.core import Element

    seen = set((gen.coverage or {}).get("elements") or [])
    unseen = sorted({Element.from_Z(int(z)).symbol for z in species} - seen) if seen else []
    if unseen and not opts.force:
        raise ValueError(
            f"{opts.composition}: element(s) {', '.join(unseen)} never appear in model {opts.model}'s training data, so it "
            "cannot produce this composition; pass --force (force=True) to sample it anyway"
        )


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


def _write_extxyz(path: Path, batch: CrystalBatch, **info: list) -> None:
    """``batch`` to ``path`` atomically; each keyword is a per-structure list stored in ``atoms.info``."""
    from ase.io import write as ase_write

    atoms = batch.to("cpu").to_atoms()
    for key, values in info.items():
        for a, v in zip(atoms, values, strict=True):
            a.info[key] = v
    with atomic_path(path) as tmp:
        ase_write(tmp, atoms, format="extxyz")


def _read_extxyz(path: Path) -> CrystalBatch:
    from ase.io import read as ase_read

    return CrystalBatch.from_atoms(ase_read(path, index=":", format="extxyz"))


def relax_structures(
    batch: CrystalBatch, backend: Any, steps: int, fmax: float, folder: Path, progress: bool = True
) -> tuple[CrystalBatch, list[dict[str, Any]]]:
    """FIRE on positions and cell (Fréchet cell filter) with the MLIP, all structures together, at most ``steps``
    steps (:func:`crystalign.relax.relax_batch`: one batched MLIP call per optimiser step, ASE's FIRE per structure).

    Returns the structures and, per structure, what happened: ``status`` (``converged``, ``not_converged``
    after ``steps`` steps, ``failed``: the MLIP raised or the structure diverged, the unrelaxed geometry is kept;
    ``skipped_invalid``), ``steps`` and the final largest force ``fmax_ev_per_a``.

    One file per structure, so a resumed run reads finished structures back and relaxes only the rest. Invalid
    structures are returned unchanged (an MLIP on overlapping atoms gives meaningless forces).
    """
    from ase.io import read as ase_read
    from ase.io import write as ase_write

    from crystalign.relax import relax_batch

    folder.mkdir(parents=True, exist_ok=True)
    valid = batch.validity().valid.tolist()
    atoms_list = batch.to_atoms()
    paths = [folder / f"{i:05d}.extxyz" for i in range(len(atoms_list))]
    todo = [i for i, path in enumerate(paths) if not path.exists()]
    work = [i for i in todo if valid[i] and steps > 0]
    if work:
        numpy_rng = np.random.get_state()  # ASE's optimisers may draw from numpy's global RNG: not the caller's business
        try:
            relaxed = relax_batch([atoms_list[i] for i in work], backend, steps=steps, fmax=fmax, progress=progress)
        finally:
            np.random.set_state(numpy_rng)
        for i, atoms in zip(work, relaxed):
            if atoms.info["relax_status"] == "failed":
                log.warning("relaxation of candidate %d failed (%s); keeping its unrelaxed geometry", i, atoms.info["relax_error"])
            atoms.info.pop("relax_energy_ev", None)
            atoms_list[i] = atoms
    for i in todo:
        atoms = atoms_list[i]
        if i not in work:
            atoms.info.update(relax_status="skipped_invalid" if not valid[i] else "not_relaxed")
        with atomic_path(paths[i]) as tmp:
            ase_write(tmp, atoms, format="extxyz")
    out = [ase_read(path, format="extxyz") for path in paths]  # as a resumed run will see them, to the last digit
    relaxed_batch = CrystalBatch.from_atoms(out).to(dtype=batch.dtype)
    return relaxed_batch, [_relax_record(a.info) for a in out]


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


#: FIRE steps at most per structure for cells of up to 20 atoms; larger cells get RELAX_STEPS_PER_ATOM per atom
RELAX_STEPS_MIN = 400
RELAX_STEPS_PER_ATOM = 20


def default_relax_steps(max_atoms: int) -> int:
    """The relaxation cap when none is given. Small cells do not relax faster: the distinct candidates of 5-atom
    perov_5 queries need 3–372 FIRE steps to reach 0.05 eV/Å with the cell (median about 105), so a cap of 100 left
    half of them unconverged and unranked, and 400 converges 96 %; generated C16 cells need about 300
    (BENCHMARKS.md). Only structures that have not converged use the whole cap."""
    return max(RELAX_STEPS_MIN, RELAX_STEPS_PER_ATOM * int(max_atoms))


def unique_ranked(structures: list, energies: np.ndarray, valid: np.ndarray, limit: int | None = None) -> list[int]:
    """Indices of unique valid candidates, lowest energy per atom first (benchmark StructureMatcher); with ``limit``,
    only the first ``limit`` of them (the scan stops there: each new candidate is compared with every one kept, so
    a full scan of n mostly distinct structures costs n²/2 matches, hours for 700 cells of 16 atoms)."""
    from crystalign.matching import make_matcher

    matcher = make_matcher()
    order = [i for i in np.argsort(np.where(valid, energies, np.inf), kind="stable") if valid[i]]
    kept: list[int] = []
    for i in order:
        if limit is not None and len(kept) >= limit:
            break
        if not any(matcher.fit(structures[i], structures[j]) for j in kept):
            kept.append(int(i))
    return kept


#: a candidate this far (eV/atom) below the lowest converged one is a potential's artefact, not a discovery
IMPLAUSIBLE_GAP_EV = 1.0
#: volume per atom relative to the elements' atomic spheres (pymatgen radii): real crystals span about 0.8-12
#: (perov_5, carbon_24, MP-20 samples); outside this range a cell is collapsed or exploded
VOLUME_RATIO_RANGE = (0.5, 20.0)


def untrusted_reasons(structures: list, energies: np.ndarray, relax_records: list[dict[str, Any]] | None, indices: list[int]) -> dict[int, list[str]]:
    """Why each of ``indices`` must not be ranked as an answer (an empty list: trusted).

    A relaxation that did not converge or failed leaves an energy that is not a minimum's; an energy implausibly
    far below every converged candidate is the potential extrapolating (fused atoms, a collapsed cell); a volume per
    atom far outside what the elements' atomic spheres allow is no crystal.
    """
    from pymatgen.core import Element

    reasons: dict[int, list[str]] = {i: [] for i in indices}
    for i in indices:
        record = relax_records[i] if relax_records is not None else {}
        status = record.get("status")
        if status == "not_converged":
            force = record.get("fmax_ev_per_a")
            reasons[i].append("relaxation did not converge" + (f" (largest force {force:.2f} eV/Å)" if force is not None else ""))
        elif status == "failed":
            reasons[i].append("relaxation failed")
        s = structures[i]
        spheres = sum(4.0 / 3.0 * math.pi * float(Element(str(sp)).atomic_radius or 1.5) ** 3 for sp in s.species)
        ratio = s.volume / spheres
        if not VOLUME_RATIO_RANGE[0] <= ratio <= VOLUME_RATIO_RANGE[1]:
            reasons[i].append(f"volume {s.volume / len(s):.2f} Å³/atom is {ratio:.2f}x its atoms' spheres (expected {VOLUME_RATIO_RANGE[0]}-{VOLUME_RATIO_RANGE[1]:g}x)")
    converged = [float(energies[i]) for i in indices if relax_records is not None and relax_records[i].get("status") == "converged" and not reasons[i]]
    if converged:
        floor = min(converged) - IMPLAUSIBLE_GAP_EV
        for i in indices:
            if float(energies[i]) < floor:
                reasons[i].append(f"{min(converged) - float(energies[i]):.2f} eV/atom below the lowest converged candidate")
    return reasons


# ---------------------------------------------------------------------- the pipeline
def _card(model: str) -> dict[str, Any]:
    """The model card of a shipped model ({} for a checkpoint path or a model without one)."""
    from crystalign.generator import pretrained_dir

    path = pretrained_dir() / f"{model}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def candidate_model(model: str) -> str:
    """The model whose candidates `predict` ranks for ``model``: for a shipped base model, its shipped RL-tuned model
    if that model's card sets ``predict_replaces_base`` (it found lower relaxed energies than its base at an equal MLIP
    budget, BENCHMARKS.md) and was tuned from this very base (same hash); otherwise ``model`` itself."""
    from crystalign.generator import pretrained_dir

    base_card = _card(model)
    if not base_card:  # a checkpoint path, or a shipped model without a card
        return model
    base_hash = base_card.get("model_hash")
    for card_path in sorted(pretrained_dir().glob("*.json")):
        card = json.loads(card_path.read_text())
        tuned_from = card.get("tuned_from") or {}
        if card.get("predict_replaces_base") and tuned_from.get("model") == model and tuned_from.get("hash") == base_hash:
            return card_path.stem
    return model


def mixed_counts(n: int, share: float) -> tuple[int, int]:
    """(from the sampled model, from its base) for ``n`` candidates of one cell, ``share`` of them from the base."""
    n_base = int(round(n * share))
    if share > 0 and n >= 2:
        n_base = min(max(n_base, 1), n - 1)  # a mix asked for is a mix: at least one candidate from each
    return n - n_base, n_base


def default_out_dir(composition: str) -> Path:
    """Where :func:`predict` writes without ``out``: ``predictions/<reduced formula>``."""
    from pymatgen.core import Composition

    return Path("predictions") / Composition(composition).reduced_formula


def predict(composition: str = DEFAULT_COMPOSITION, progress: bool = True, **options: Any) -> PredictResult:
    """Predict likely low-energy structures of ``composition``; see :class:`PredictOptions` for options."""
    from crystalign.rewards import EnergyReward, RewardResult
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
        sampled_model = candidate_model(opts.model) if opts.tuned else opts.model
        gen = Generator.load(sampled_model).to(opts.device)
        gen.check_csp("`predict`")
        mix_base = opts.mix_base if opts.mix_base is not None else float(_card(sampled_model).get("predict_mix_base", 0.0))
        if mix_base > 0 and gen.tuned_from is None:
            raise ValueError(f"--mix-base {mix_base}: model {sampled_model} was not RL-tuned from a base model, so there is no base to mix in")
        cells, size_note = _cells_inside_coverage(opts, gen.coverage)
        opts = opts.within_budget(len(cells))
        cell_species = [parse_composition(cell, max_atoms=gen.config.max_atoms) for cell in cells]
        backend = get_backend(opts.backend, model=opts.mlip_model, modal=opts.mlip_modal).load()
        check_supported = getattr(backend, "check_elements", None)
        if check_supported is not None:
            check_supported(cell_species[0])
        _refuse_unseen_elements(opts, gen, cell_species[0])
    except BaseException:
        # a refused query leaves no trace: remove the folders this call created while still empty
        folder = out
        while created is not None and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
            if folder == created:
                break
            folder = folder.parent
        raise
    warns = ([size_note] if size_note else []) + [f"{cell}: {w}" for cell, sp in zip(cells, cell_species) for w in coverage_warnings(gen, sp)]
    for w in warns:
        warnings.warn(w, CoverageWarning, stacklevel=2)
    reward = EnergyReward(backend)
    n_sampled, n_mixed = mixed_counts(opts.n, mix_base)
    template = composition_batch(cells, n_sampled, max_atoms=gen.config.max_atoms)
    base_sampler = gen.sampler(steps=opts.steps, schedule=opts.schedule)
    relax_steps = opts.relax_steps if opts.relax_steps is not None else default_relax_steps(int(template.n_atoms.max()))
    summary: dict[str, Any] = {
        "composition": opts.composition,
        "formula": formula,
        "cells": cells,
        "model": sampled_model,
        "requested_model": opts.model,
        "model_hash": gen.model_hash(),
        "reward": f"energy per atom ({opts.backend})",
        "mlip": dict(backend.identity),
        "seed": opts.seed,
        "n": opts.n,
        "mix_base": {"share": mix_base, "model": gen.tuned_from["model"], "n_per_cell": n_mixed} if n_mixed else None,
        "steps": base_sampler.config.steps,
        "schedule": base_sampler.schedule.record() if base_sampler.schedule is not None else None,
        "rl_steps": opts.rl_steps,
        "budget": opts.budget,
        "mlip_energy_evaluations": opts.mlip_evaluations(len(cells)),
        "relax": opts.relax,
        "relax_steps": relax_steps,
        "coverage_warnings": warns,
        "options": {**{k: v for k, v in asdict(opts).items() if k not in ("composition", "resume")}, "out": str(out)},
        "versions": versions(),
        "command": " ".join(sys.argv) if sys.argv else "",
        "threads": torch.get_num_threads(),
    }

    seconds: dict[str, float] = {"start": time.time() - t_start}  # where the run's time goes, per stage
    t_stage = time.time()
    # 1. base model samples
    base_path = out / "base.extxyz"
    if not stages.done("base"):
        base = gen.sample(template.to(dtype=torch.float32), seed=opts.seed, steps=base_sampler.config.steps, schedule=opts.schedule)
        if n_mixed:  # the untuned base's share, with the same sampler options
            untuned = Generator.load(gen.tuned_from["model"]).to(opts.device)
            untuned_steps = untuned.sampler(steps=opts.steps, schedule=opts.schedule).config.steps
            mixed = untuned.sample(
                composition_batch(cells, n_mixed, max_atoms=gen.config.max_atoms).to(dtype=torch.float32),
                seed=opts.seed + 1, steps=untuned_steps, schedule=opts.schedule,
            )
            base = CrystalBatch.cat([base.to("cpu"), mixed.to("cpu")])
        _write_extxyz(base_path, base)
        stages.mark("base")
    base = _read_extxyz(base_path)
    base_result = reward(base)
    base_energy = base_result.info["energy_per_atom_ev"].numpy()

    seconds["base"], t_stage = time.time() - t_stage, time.time()
    # 2. inference-time RL on this composition
    history: list[dict[str, Any]] = []
    rl_result = None
    rl_stopped = None
    if opts.rl_steps > 0:
        from crystalign.rl.trainer import RLDivergedError

        try:
            history = _run_rl(gen, reward, opts, cells, out / "rl", progress, seen=(base, base_result.info["energy_per_atom_ev"]))
        except RLDivergedError as err:
            # e.g. a composition the model cannot make valid structures of: the base candidates still get ranked
            rl_stopped = str(err)
            warnings.warn(
                f"{formula}: inference-time RL stopped ({err}); ranking the base model's candidates"
                + (" and the rollouts scored before it stopped" if opts.rank_rollouts else " only"),
                RLStoppedWarning, stacklevel=2,
            )
    seconds["rl"], t_stage = time.time() - t_stage, time.time()
    rollouts = _read_rollouts(out / "rl_rollouts", opts.rl_steps) if opts.rl_steps > 0 and opts.rank_rollouts else []
    # (source, structures, energy per atom, valid) of every scored candidate; the source says where a winner came from
    base_energy_t, base_valid = base_result.info["energy_per_atom_ev"], base_result.info["valid"]
    k = base.num_structures - n_mixed * len(cells)  # the sampled model's candidates come first, the base's after
    parts = [("base", base[torch.arange(k)], base_energy_t[:k], base_valid[:k])]
    if n_mixed:
        parts.append((f"untuned base ({gen.tuned_from['model']})", base[torch.arange(k, base.num_structures)], base_energy_t[k:], base_valid[k:]))
    parts += rollouts
    if opts.rl_steps > 0 and rl_stopped is None:
        rl_path = out / "rl_samples.extxyz"
        if not stages.done("rl_samples"):
            from crystalign.steering import SteeredModel

            steered = SteeredModel.load(out / "rl" / "last.pt").to(opts.device)
            # the mean path of the reinforced policy: exploration noise only costs energy at sampling time
            rl_batch = steered.sample_batch(
                template, steps=opts.steps or RL_STEPS, seed=opts.seed + 1, noise=False, batch_size=template.num_structures, progress=False
            ).to("cpu")
            _write_extxyz(rl_path, rl_batch)
            stages.mark("rl_samples")
        rl_candidates = _read_extxyz(rl_path)
        rl_result = reward(rl_candidates)
        parts.append(("rl policy", rl_candidates, rl_result.info["energy_per_atom_ev"], rl_result.info["valid"]))
    sampled_energy = (rl_result if rl_result is not None else base_result).info["energy_per_atom_ev"].numpy()
    # rank the union: a per-query RL run can only add candidates, never lose the base ones
    candidates = CrystalBatch.cat([p[1] for p in parts]) if len(parts) > 1 else base
    sources = [p[0] for p in parts for _ in range(p[1].num_structures)]
    cand_energy = torch.cat([p[2].double().cpu() for p in parts])
    cand_result = RewardResult(-cand_energy, {"energy_per_atom_ev": cand_energy, "valid": torch.cat([p[3].double().cpu() for p in parts])})
    summary["n_rollout_candidates"] = sum(r[1].num_structures for r in rollouts)
    summary["rl_stopped"] = rl_stopped

    seconds["rl_samples"], t_stage = time.time() - t_stage, time.time()
    # 3. relaxation with the same MLIP, of the lowest-energy DISTINCT valid candidates only: relaxation dominates the
    # run time, and copies of one structure (the benchmark matcher's tolerances) relax into one minimum
    relax_records: list[dict[str, Any]] | None = None
    if opts.relax:
        e = cand_result.info["energy_per_atom_ev"].numpy()
        # only the relax_top lowest distinct ones are relaxed, so the scan for duplicates stops there
        order = unique_ranked(candidates.to_structures(), e, np.isfinite(e), limit=opts.relax_top) if np.isfinite(e).any() else []
        summary["n_distinct_before_relax"] = len(order)
        if order:
            candidates = candidates[torch.tensor(order[: opts.relax_top], dtype=torch.long)]
            sources = [sources[i] for i in order[: opts.relax_top]]
        candidates, relax_records = relax_structures(candidates, backend, relax_steps, opts.fmax, out / "relax", progress)
        stages.mark("relax")
    final = reward(candidates) if opts.relax else cand_result
    energy = final.info["energy_per_atom_ev"].numpy()
    valid = final.info["valid"].numpy().astype(bool)

    seconds["relax"], t_stage = time.time() - t_stage, time.time()
    # 4. unique candidates; only trustworthy ones are ranked, the others are listed apart with the reason
    from crystalign.symmetry import SYMPREC, examine, spacegroup_label

    structures = candidates.to_structures()
    unique = unique_ranked(structures, energy, valid)
    reasons = untrusted_reasons(structures, energy, relax_records, unique)
    order = [i for i in unique if not reasons[i]]
    untrusted = [i for i in unique if reasons[i]]
    checks = {}
    if order:  # space groups at two tolerances and, where they differ, whether the distortion is real
        shown = order[: max(opts.top_k, 1)]
        rows_sym = examine(
            [structures[i] for i in shown], [float(energy[i]) for i in shown], backend,
            steps=relax_steps if opts.relax else 0, fmax=opts.fmax,
        )
        checks = dict(zip(shown, rows_sym))
        # duplicates after symmetrisation: two ranked candidates with one symmetric structure are one answer
        from crystalign.symmetry import unique_after_symmetrization

        sym_structures = [checks[i]["symmetric_structure"] for i in shown]
        keep = set(unique_after_symmetrization(sym_structures, [float(energy[i]) for i in shown], symprec=None))
        order = [i for k, i in enumerate(shown) if k in keep] + order[len(shown):]
    seconds["symmetry"], t_stage = time.time() - t_stage, time.time()
    ranked = [structures[i] for i in order]
    best = float(energy[order[0]]) if order else math.nan
    (out / "candidates").mkdir(exist_ok=True)
    rows = []
    for rank, i in enumerate(order, start=1):
        s = structures[i]
        name = f"candidates/{rank:03d}_{s.composition.reduced_formula}.cif"
        with atomic_path(out / name) as tmp:
            tmp.write_text(s.to(fmt="cif"))
        check = checks.get(i, {})
        extra: dict[str, Any] = {}
        if check:
            conventional = f"candidates/{rank:03d}_{s.composition.reduced_formula}_symmetrized.cif"
            with atomic_path(out / conventional) as tmp:
                tmp.write_text(check["symmetric_structure"].to(fmt="cif"))
            extra = {
                "spacegroups": check["spacegroups"], "symmetry_note": check["symmetry_note"], "conventional_file": conventional,
                "symmetric_energy_above_mev": check["symmetric_energy_above_mev"],
            }
        rows.append(
            {
                "rank": rank,
                "id": f"candidate_{i:04d}",
                "formula": s.composition.reduced_formula,
                "spacegroup": check.get("spacegroup") or spacegroup_label(s, SYMPREC),
                "energy_per_atom_ev": float(energy[i]),
                "energy_above_best_mev": 1000.0 * (float(energy[i]) - best),
                "source": sources[i],
                "valid": True,
                "trusted": True,
                "file": name,
                **extra,
                **({"relax": relax_records[i]} if relax_records is not None else {}),
            }
        )
    for i in untrusted:
        s = structures[i]
        name = f"candidates/untrusted_{i:04d}_{s.composition.reduced_formula}.cif"
        with atomic_path(out / name) as tmp:
            tmp.write_text(s.to(fmt="cif"))
        rows.append(
            {
                "rank": None, "id": f"candidate_{i:04d}", "formula": s.composition.reduced_formula, "source": sources[i],
                "spacegroup": spacegroup_label(s, SYMPREC), "energy_per_atom_ev": float(energy[i]),
                "valid": True, "trusted": False, "untrusted_reason": "; ".join(reasons[i]), "file": name,
                **({"relax": relax_records[i]} if relax_records is not None else {}),
            }
        )
    summary["symprec"] = SYMPREC
    summary["n_untrusted"] = len(untrusted)
    summary["warnings"] = [*summary["coverage_warnings"], *([f"inference-time RL stopped: {rl_stopped}"] if rl_stopped else [])]
    if untrusted:
        summary["warnings"].append(f"{len(untrusted)} candidate(s) not ranked as untrusted (see the table of untrusted candidates)")
    if not order:
        summary["answer"] = "none"
        summary["no_answer_reason"] = (
            f"every one of the {int(cand_result.rewards.numel())} candidates failed the validity check or the potential's trust checks: "
            "this model cannot produce this composition" if not unique else
            f"all {len(unique)} distinct valid candidate(s) are untrusted ({'; '.join(sorted({r for i in untrusted for r in reasons[i]}))})"
        )
    if order:
        _write_extxyz(out / "candidates.extxyz", candidates[torch.tensor(order)])
    n_valid = int(valid.sum())
    summary.update(
        {
            "n_valid": n_valid,
            "n_unique": len(order),
            "n_unique_untrusted": len(untrusted),
            "best_energy_per_atom_ev": best,
            "base_energy_per_atom_ev_mean": _nanmean(base_energy),
            "sampled_energy_per_atom_ev_mean": _nanmean(sampled_energy),
            "n_candidates": cand_result.rewards.numel(),
            "n_relaxed": candidates.num_structures if opts.relax else 0,
            **_relax_counts(relax_records),
            "final_energy_per_atom_ev_mean": _nanmean(energy),
            "base_invalid_fraction": float(np.isnan(base_energy).mean()),
            "wall_time_s": time.time() - t_start,
            "stage_seconds": {k: round(v, 2) for k, v in seconds.items()},
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
        structures=ranked + [structures[i] for i in untrusted],
        top_k=opts.top_k,
    )
    stages.mark("report")
    return PredictResult(structures=ranked, energies=[r["energy_per_atom_ev"] for r in rows if r["trusted"]], summary=summary, out_dir=out, candidates=rows)


def _nanmean(x: np.ndarray) -> float | None:
    x = np.asarray(x, dtype=float)
    return float(np.nanmean(x)) if np.isfinite(x).any() else None


def _run_rl(
    gen: Generator, reward, opts: PredictOptions, cells: list[str], folder: Path, progress: bool,
    seen: tuple[CrystalBatch, torch.Tensor] | None = None,
) -> list[dict[str, Any]]:
    """K iterations of inference-time RL with GRPO groups drawn from the query's cells (resumable); each
    iteration's scored rollouts go to ``rl_rollouts/`` beside the run folder when they are ranked. With
    ``rl_novelty`` the reward pays for structures not among ``seen`` (the base candidates) or earlier rollouts."""
    from crystalign.steering import steer

    rollouts = folder.parent / "rl_rollouts"

    def keep(iteration: int, structures: CrystalBatch, result: RewardResult) -> None:
        rollouts.mkdir(exist_ok=True)
        _write_extxyz(
            rollouts / f"{iteration:04d}.extxyz", structures,
            energy_per_atom_ev=[float(e) for e in result.info["energy_per_atom_ev"].tolist()],
            valid=[bool(ok) for ok in result.info["valid"].tolist()],
        )

    resume = (folder / "last.pt").exists()
    rl_reward = reward
    if opts.rl_novelty:
        from crystalign.model.checkpoint import read_checkpoint_file
        from crystalign.rewards.novelty import NoveltyReward

        rl_reward = NoveltyReward(reward, opts.rl_novelty)
        if seen is not None:
            rl_reward.add(*seen)
        # a resumed run's archive: the same structures, added in the same order, as the run had seen
        done = int(read_checkpoint_file(folder / "last.pt", what="RL checkpoint")["iteration"]) if resume else 0
        for _, batch, energy, _ in _read_rollouts(rollouts, done):
            rl_reward.add(batch, energy)
    steered = steer(
        gen, rl_reward, cells, iterations=opts.rl_steps, out=folder, resume=resume,
        device=opts.device, seed=opts.seed, progress=progress, on_rollout=keep if opts.rank_rollouts else None,
        **opts.rl_options(),
    )
    return steered.history


def _read_rollouts(folder: Path, iterations: int) -> list[tuple[str, CrystalBatch, torch.Tensor, torch.Tensor]]:
    """The scored rollouts of RL iterations 1..``iterations`` that exist (fewer where RL stopped early), each as
    ("rl rollout K", structures, energy per atom, valid), in iteration order."""
    from ase.io import read as ase_read

    parts = []
    for it in range(1, iterations + 1):
        path = folder / f"{it:04d}.extxyz"
        if not path.exists():
            continue
        atoms = ase_read(path, index=":", format="extxyz")
        energy = torch.tensor([float(a.info["energy_per_atom_ev"]) for a in atoms], dtype=torch.float64)
        valid = torch.tensor([float(bool(a.info["valid"])) for a in atoms], dtype=torch.float64)
        parts.append((f"rl rollout {it}", CrystalBatch.from_atoms(atoms), energy, valid))
    return parts
