"""Batched relaxation against ASE's own FIRE, one structure at a time through the potential's ASE calculator.

Relaxes the same structures both ways (FIRE, Fréchet cell filter, same fmax and step limit) and reports the wall
time of each, the force calls, and the largest difference of the final energies per atom (meV/atom)::

    python bench/relax.py --count 16 --backend sevenn --json bench/results/relax.json

Structures: the first ``--count`` of perov_5's validation split (through the data root) with positions displaced by
``--kick`` Å, so that each needs tens of FIRE steps, as sampled candidates do.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings
from pathlib import Path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="perov_5", help="named dataset (data root) or file")
    parser.add_argument("--split", default="val")
    parser.add_argument("--count", type=int, default=16, help="structures to relax")
    parser.add_argument("--kick", type=float, default=0.1, help="random displacement of every atom, Å (std)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--fmax", type=float, default=0.05)
    parser.add_argument("--backend", default="sevenn", help="sevenn or chgnet")
    parser.add_argument("--threads", type=int, default=None, help="threads per process (default: crystalign's choice)")
    parser.add_argument("--skip-ase", action="store_true", help="time the batched path only")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)

    from crystalign.settings import configure_threads

    threads = configure_threads(args.threads)
    import numpy as np
    from ase.filters import FrechetCellFilter
    from ase.optimize import FIRE

    from crystalign.data import load_dataset
    from crystalign.relax import relax_batch
    from crystalign.rewards.mlip import get_backend

    warnings.simplefilter("ignore")
    atoms = load_dataset(args.dataset, split=args.split).batch[: args.count].to_atoms()
    rng = np.random.default_rng(0)
    for a in atoms:
        a.positions += rng.normal(0.0, args.kick, a.positions.shape)
    backend = get_backend(args.backend).load()
    backend.energy_forces_stress(atoms[:1])  # build the force model outside the timing

    calls = []
    inner = backend.energy_forces_stress

    def counted(chunk):
        calls.append(len(chunk))
        return inner(chunk)

    backend.energy_forces_stress = counted
    t0 = time.perf_counter()
    batched = relax_batch(atoms, backend, steps=args.steps, fmax=args.fmax)
    t_batched = time.perf_counter() - t0
    del backend.energy_forces_stress
    result = {
        "command": "python bench/relax.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
        "backend": dict(backend.identity), "structures": len(atoms), "atoms": int(sum(len(a) for a in atoms)),
        "threads": threads, "steps_limit": args.steps, "fmax": args.fmax,
        "batched_s": round(t_batched, 2), "batched_calls": len(calls), "structure_steps": int(sum(calls)),
        "converged": sum(a.info["relax_status"] == "converged" for a in batched),
        "machine": f"{platform.machine()} {platform.processor()}".strip(), "date": time.strftime("%Y-%m-%d"),
    }
    if not args.skip_ase:
        calc = backend.ase_calculator()
        t0 = time.perf_counter()
        gaps, step_diffs = [], []
        for a, ours in zip(atoms, batched):
            ref = a.copy()
            ref.calc = calc
            opt = FIRE(FrechetCellFilter(ref), logfile=None)
            opt.run(fmax=args.fmax, steps=args.steps)
            gaps.append(abs(ours.info.get("relax_energy_ev", np.nan) - ref.get_potential_energy()) / len(a) * 1000.0)
            step_diffs.append(abs(ours.info["relax_steps"] - opt.nsteps))
        result.update(
            ase_sequential_s=round(time.perf_counter() - t0, 2),
            max_energy_difference_mev_per_atom=float(np.nanmax(gaps)),
            max_step_count_difference=int(max(step_diffs)),
        )
        result["speedup"] = round(result["ase_sequential_s"] / result["batched_s"], 2)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
