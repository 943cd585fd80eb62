"""Energy-only throughput of the MLIP reward backends on 64 real structures.

    python bench/mlip.py [--n 64] [--threads 1] [--dataset mp_20_sample] [--skip-ase] [--mace-model PATH|random-medium]

Backends whose package is missing are skipped (mace-torch lives in its own environment, see `.ci/test-mace`);
``--mace-model random-medium`` times a randomly initialised model of MACE-MP-0 medium's size (no MACE weights
ship offline; speed does not depend on the weights).

Times each backend twice on the same structures and reports the second (warm) pass: the first includes model
load and one-off warm-up. Needs $CRYSTALIGN_DATA_ROOT (or --csv).
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from pathlib import Path


def load(csv: Path, n: int):
    import pandas as pd
    from pymatgen.core import Structure

    frame = pd.read_csv(csv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [Structure.from_str(cif, fmt="cif") for cif in frame["cif"].iloc[:n]]


def timed(backend, atoms) -> tuple[float, float, float]:
    t0 = time.perf_counter()
    backend.energies(atoms)  # cold: load + warm-up
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    c0 = time.process_time()
    backend.energies(atoms)
    return cold, time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dataset", default="mp_20_sample", choices=["mp_20_sample", "perov_5"])
    parser.add_argument("--csv", type=Path, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-ase", action="store_true", help="skip the slow SevenNet ASE-calculator path")
    parser.add_argument("--mace-model", default=None, help="MACE .model file, or random-medium")
    args = parser.parse_args()

    import importlib.util

    if args.mace_model:
        import mace  # noqa: F401  (before torch's e3nn users, see crystalign.rewards.mlip)
    import torch

    from crystalign.crystal import CrystalBatch
    from crystalign.rewards.mlip import CHGNetBackend, MACEBackend, SevenNetBackend

    torch.set_num_threads(args.threads)
    csv = args.csv
    if csv is None:
        root = os.environ.get("CRYSTALIGN_DATA_ROOT")
        if not root:
            raise SystemExit("set CRYSTALIGN_DATA_ROOT or pass --csv")
        csv = Path(root) / {"mp_20_sample": "mp_20_sample/sample.csv", "perov_5": "perov_5/val.csv"}[args.dataset]
    structures = load(csv, args.n)
    atoms = CrystalBatch.from_structures(structures).to_atoms()
    n_atoms = sum(len(a) for a in atoms)
    print(f"{len(atoms)} structures ({n_atoms} atoms) from {csv}; torch {torch.__version__}, {args.threads} thread(s), {args.device}")

    cases = []
    if importlib.util.find_spec("sevenn"):
        cases += [
            ("SevenNet-0 fast, one graph per forward", lambda: SevenNetBackend(device=args.device, batch_size=1)),
            ("SevenNet-0 fast, 16 graphs per forward", lambda: SevenNetBackend(device=args.device, batch_size=16)),
            ("SevenNet-0 fast, float64, batch 16", lambda: SevenNetBackend(device=args.device, dtype="float64", batch_size=16)),
            ("SevenNet-0 via ASE calculator", lambda: SevenNetBackend(device=args.device, mode="ase")),
        ]
    if importlib.util.find_spec("chgnet"):
        cases.append(("CHGNet 0.3.0 predict_graph, batch 16", lambda: CHGNetBackend(device=args.device, batch_size=16)))
    if args.mace_model:
        path = random_mace_medium() if args.mace_model == "random-medium" else args.mace_model
        cases.append(("MACE float64 via ASE calculator", lambda: MACEBackend(path, device=args.device, mode="ase")))
        for bs in (1, 4, 16):
            cases.append((f"MACE float64 fast, {bs} graphs per forward", lambda bs=bs: MACEBackend(path, device=args.device, batch_size=bs)))
    print(f"{'backend':42s} {'cold s':>8s} {'warm s':>8s} {'cpu s':>8s} {'struct/s':>9s}")
    for label, make in cases:
        if args.skip_ase and "ASE" in label:
            continue
        cold, warm, cpu = timed(make(), atoms)
        print(f"{label:42s} {cold:8.2f} {warm:8.2f} {cpu:8.2f} {len(atoms) / warm:9.1f}", flush=True)


def random_mace_medium() -> str:
    """A randomly initialised MACE of MACE-MP-0 medium's size (128x0e+128x1o, 2 interactions, l_max 3, r_max 6 Å)."""
    import tempfile

    import numpy as np
    import torch
    from e3nn import o3
    from mace import modules

    torch.manual_seed(0)
    z_table = list(range(1, 90))
    block = modules.interaction_classes["RealAgnosticResidualInteractionBlock"]
    model = modules.ScaleShiftMACE(
        r_max=6.0, num_bessel=10, num_polynomial_cutoff=5, max_ell=3, interaction_cls=block, interaction_cls_first=block,
        num_interactions=2, num_elements=len(z_table), hidden_irreps=o3.Irreps("128x0e+128x1o"),
        MLP_irreps=o3.Irreps("16x0e"), atomic_energies=np.zeros(len(z_table)), avg_num_neighbors=20.0,
        atomic_numbers=z_table, correlation=3, gate=torch.nn.functional.silu, atomic_inter_scale=1.0, atomic_inter_shift=0.0,
    )
    path = Path(tempfile.mkdtemp()) / "random_medium.model"
    torch.save(model, path)
    return str(path)


if __name__ == "__main__":
    main()
