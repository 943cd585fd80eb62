"""Batched relaxation: ASE's FIRE on positions and cell for many structures at once.

Every optimiser step asks the potential for the energies, forces and stresses of all structures still relaxing in
ONE call (:meth:`MLIPBackend.energy_forces_stress`: a batched forward for SevenNet and CHGNet), then advances each
structure's own ASE ``FIRE`` over its ``FrechetCellFilter`` by one step. The optimiser arithmetic is ASE's, step for
step (the loop below is ``Optimizer.irun``'s), so a structure relaxes exactly as ``FIRE(FrechetCellFilter(atoms)).run``
would with the same forces; only the force evaluations are shared. Constraints on the Atoms (e.g. ASE's
``FixSymmetry``) are honoured, because the filter applies them to the forces and stress.

Each structure ends with ``relax_status`` in its ``info``: ``converged``, ``not_converged`` (step limit reached),
``failed`` (the potential could not evaluate it, or it diverged: non-finite or absurd energy or forces; the starting
geometry is kept), plus ``relax_steps``, ``relax_fmax`` (largest remaining generalised force, eV/Å) and
``relax_energy_ev``. A failing structure never stops the others.

Example::

    from crystalign.relax import relax_batch
    from crystalign.rewards.mlip import get_backend
    relaxed = relax_batch(batch.to_atoms(), get_backend("sevenn"), steps=100, fmax=0.05)
    [a.info["relax_status"] for a in relaxed]
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from ase import Atoms

    from crystalign.rewards.mlip import MLIPBackend

#: an energy below this many eV per atom is no chemistry (the most bound solids sit near -10 eV/atom): the
#: potential was pushed where it extrapolates (fused atoms, collapsed cell), so the candidate has diverged
DIVERGED_ENERGY_PER_ATOM = -50.0
#: likewise a generalised force above this (eV/Å)
DIVERGED_FORCE = 1e4


@dataclass
class _Relaxation:
    index: int
    atoms: "Atoms"
    start: "Atoms"
    optimizer: Any = None
    status: str = ""
    error: str = ""
    fmax: float = math.nan
    energy: float = math.nan


def relax_batch(
    atoms_list: Sequence["Atoms"],
    backend: "MLIPBackend",
    steps: int = 100,
    fmax: float = 0.05,
    cell: bool = True,
    prepare: Callable[["Atoms"], None] | None = None,
    progress: bool = False,
    desc: str = "relaxing",
) -> list["Atoms"]:
    """Relax copies of ``atoms_list`` together; returns them in order with the outcome in ``info`` (see module doc).

    ``cell``: relax the cell too (Fréchet cell filter), else positions only. ``prepare``: called on each copy before
    its optimiser is built, e.g. to add a constraint (``atoms.set_constraint(FixSymmetry(atoms))``). ``steps`` = 0
    evaluates once and reports whether the structures are already converged.
    """
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.optimize import FIRE
    from tqdm import tqdm

    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if not fmax > 0:
        raise ValueError(f"fmax must be > 0, got {fmax}")
    jobs = []
    for i, atoms in enumerate(atoms_list):
        atoms = atoms.copy()
        atoms.calc = None
        if prepare is not None:
            prepare(atoms)
        job = _Relaxation(index=i, atoms=atoms, start=atoms.copy())
        target = _cell_filter(atoms) if cell else atoms
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            job.optimizer = FIRE(target, logfile=None)
        job.optimizer.fmax = fmax
        jobs.append(job)

    active = list(jobs)
    bar = tqdm(total=len(jobs), desc=desc, unit="structure", disable=not progress)
    while active:
        results = backend.energy_forces_stress([job.atoms for job in active])
        still = []
        for job, res in zip(active, results):
            opt = job.optimizer
            if isinstance(res, BaseException):
                _fail(job, " ".join(f"{type(res).__name__}: {res}".replace('"', "'").split())[:200])
            elif not _sane(res, len(job.atoms)):
                _fail(job, f"diverged (energy {res.energy / max(len(job.atoms), 1):.4g} eV/atom)")
            else:
                job.atoms.calc = SinglePointCalculator(
                    job.atoms, energy=res.energy, free_energy=res.energy, forces=res.forces, stress=res.stress
                )
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    gradient = opt.optimizable.get_gradient()
                job.fmax = float(opt.optimizable.gradient_norm(gradient))
                job.energy = float(res.energy)
                if not math.isfinite(job.fmax) or job.fmax > DIVERGED_FORCE:
                    _fail(job, f"diverged (largest force {job.fmax:.4g} eV/Å)")
                elif opt.gradient_converged(gradient):
                    job.status = "converged"
                elif opt.nsteps >= steps:
                    job.status = "not_converged"
                else:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        opt.step()
                    opt.nsteps += 1
                    still.append(job)
                    continue
            bar.update(1)
        active = still
    bar.close()

    out = []
    for job in jobs:
        atoms = job.atoms if job.status != "failed" else job.start
        atoms.calc = None
        atoms.set_constraint()  # a symmetry constraint is the optimiser's business, not part of the structure
        atoms.info.update(relax_status=job.status, relax_steps=int(job.optimizer.nsteps))
        if job.status == "failed":
            atoms.info["relax_error"] = job.error
        else:
            atoms.info.update(relax_fmax=job.fmax, relax_energy_ev=job.energy)
        out.append(atoms)
    return out


def _cell_filter(atoms: "Atoms") -> Any:
    try:
        from ase.filters import FrechetCellFilter
    except ImportError:  # older ASE
        from ase.constraints import ExpCellFilter as FrechetCellFilter
    return FrechetCellFilter(atoms)


def _sane(res: Any, n_atoms: int) -> bool:
    return (
        math.isfinite(res.energy)
        and res.energy / max(n_atoms, 1) > DIVERGED_ENERGY_PER_ATOM
        and bool(np.isfinite(res.forces).all())
        and bool(np.isfinite(res.stress).all())
    )


def _fail(job: _Relaxation, reason: str) -> None:
    job.status, job.error = "failed", reason
