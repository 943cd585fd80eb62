"""Where a sampler's RMSE comes from: the spread of the matched structures' RMSE on a dev split, and whether the
lattice or a missing symmetry snap is behind it.

For each ``MODEL:STEPS`` (one sample per held-out structure, seed --seed, the model's default sampler at STEPS
time points), the benchmark StructureMatcher is run on three versions of the same samples:

  * ``generated``: as sampled;
  * ``oracle_cell``: the generated fractional positions in the reference's lattice, so what is left is the positions';
  * ``symmetrized``: each sample snapped to its own space group at --symprec Å (ASE ``refine_symmetry``, the cell
    kept), to see whether small noise around a symmetric arrangement is what loosens the matches.

Reported: match rate, mean RMSE, quantiles of the matched pairs' RMSE, the fractions of matches that are tight
(RMSE < 0.05), close (< 0.1) and loose (> 0.3), and, for the generated samples, how many matched pairs share the
reference's space group (spglib at --symprec) and the mean RMSE of those that do and those that do not.

    python bench/rmse_anatomy.py perov_5:50 perov_5_sde:20 perov_5_annealed:20 --out bench/results/rmse_anatomy_perov_5.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from anneal_ablation import model_data_config  # noqa: E402

from crystalign.data.splits import load_training_data  # noqa: E402
from crystalign.generator import Generator  # noqa: E402
from crystalign.io import write_json  # noqa: E402
from crystalign.metrics import csp_metrics  # noqa: E402
from crystalign.symmetry import spacegroup  # noqa: E402


def symmetrized(structures: list, symprec: float) -> list:
    """Each structure snapped to its own space group at ``symprec`` (cell kept); one spglib cannot handle stays as is."""
    from ase.spacegroup.symmetrize import refine_symmetry
    from pymatgen.io.ase import AseAtomsAdaptor

    out = []
    for s in structures:
        if s is None:
            out.append(s)
            continue
        atoms = AseAtomsAdaptor.get_atoms(s)
        try:
            refine_symmetry(atoms, symprec=symprec)
        except Exception:  # noqa: BLE001 - spglib finds no cell (e.g. overlapping atoms): keep the sample
            out.append(s)
            continue
        out.append(AseAtomsAdaptor.get_structure(atoms))
    return out


def anatomy(metrics, same_group: list[bool] | None = None) -> dict:
    pairs = [(x, k) for k, (x, ok) in enumerate(zip(metrics.rms, metrics.matched)) if ok and x is not None]
    r = np.array([x for x, _ in pairs], dtype=float)
    row = {"match_rate": metrics.match_rate, "rmse": metrics.rmse, "valid_rate": metrics.valid_rate, "n_matched": int(r.size)}
    if same_group is not None and r.size:
        same = np.array([same_group[k] for _, k in pairs])
        row.update(
            same_spacegroup_fraction=float(same.mean()),
            rmse_same_spacegroup=float(r[same].mean()) if same.any() else None,
            rmse_other_spacegroup=float(r[~same].mean()) if (~same).any() else None,
        )
    if r.size:
        q = np.quantile(r, [0.1, 0.25, 0.5, 0.75, 0.9])
        row.update(
            rmse_quantiles={k: float(v) for k, v in zip(("p10", "p25", "p50", "p75", "p90"), q)},
            tight_fraction=float((r < 0.05).mean()), close_fraction=float((r < 0.1).mean()), loose_fraction=float((r > 0.3).mean()),
        )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", metavar="MODEL:STEPS", help="shipped model name or checkpoint, and its time points")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--symprec", type=float, default=0.1)
    ap.add_argument("--limit", type=int, default=None, help="only the first LIMIT held-out structures")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    for spec in args.runs:
        model, _, steps = spec.rpartition(":")
        if not model or not steps.isdigit():
            ap.error(f"{spec!r}: give MODEL:STEPS, e.g. perov_5:50")
        gen = Generator.load(model)
        _, hold, _ = load_training_data(model_data_config(model))
        if args.limit:
            hold = hold[: args.limit]
        sample = gen.sample(hold.to(dtype=torch.float32), seed=args.seed, steps=int(steps))
        versions = {
            "generated": sample,
            "oracle_cell": sample.replace(lattice=hold.lattice.to(sample.lattice.dtype)),
            "symmetrized": symmetrized(sample.to_structures(), args.symprec),
        }
        refs = hold.to_structures()
        groups = [(spacegroup(s, args.symprec) if s is not None else None, spacegroup(ref, args.symprec)) for s, ref in zip(sample.to_structures(), refs)]
        same = [g is not None and g == r for g, r in groups]
        for label, generated in versions.items():
            m = csp_metrics(generated, hold, n_workers=0, progress=False, timeout=60)
            row = {"model": model, "steps": int(steps), "seed": args.seed, "version": label, **anatomy(m, same if label == "generated" else None)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        write_json(Path(args.out), {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
