"""How far above its own hull the known crystals sit: the E-hull of every compound entry of a hull file.

A generator whose species are fixed (CSP, or de novo RL with species integrated passively by the base model) can
only move positions and lattice; if the known crystals of the same chemistry already sit well above the hull, no
such policy halves the mean E-hull without finding structures better than the known ones. This prints the
distribution of the reference crystals' own E-hull, the yardstick for the de novo numbers.

    python bench/hull_floor.py perov_5_hull.json --out bench/results/hull_floor_perov_5.json
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from pymatgen.core import Composition

from crystalign.io import write_json
from crystalign.rewards.hull import ReferenceHull


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("hull", help="hull file written by `crystalign hull build`")
    ap.add_argument("--stable", type=float, default=0.0, help="E-hull (eV/atom) at or below which a crystal is stable")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    hull = ReferenceHull.load(args.hull)
    t0 = time.perf_counter()
    # (reduced formula, E-hull) of every compound the hull covers
    scored = [
        (Composition(e.composition).reduced_formula, hull.e_above_hull(e.composition, e.energy_ev))
        for e in hull.entries
        if len(e.elements) > 1
    ]
    scored = [(formula, value) for formula, value in scored if np.isfinite(value)]
    e_hull = np.array([value for _, value in scored])
    # a composition's best polymorph is what a perfect structure search could reach for it
    best: dict[str, float] = {}
    for formula, value in scored:
        best[formula] = min(best.get(formula, np.inf), value)
    per_comp = np.array(list(best.values()))

    def summary(x: np.ndarray) -> dict:
        return {
            "n": int(x.size),
            "mean": float(x.mean()),
            "median": float(np.median(x)),
            "stable_rate": float((x <= args.stable + 1e-8).mean()),
            "below_0.1_rate": float((x < 0.1).mean()),
            "percentiles_10_25_75_90": [float(v) for v in np.percentile(x, [10, 25, 75, 90])],
        }

    out = {
        "hull": str(args.hull),
        "backend": hull.backend,
        "stable_threshold": args.stable,
        "entries": summary(e_hull),
        "best_polymorph_per_composition": summary(per_comp),
        "seconds": time.perf_counter() - t0,
    }
    for key in ("entries", "best_polymorph_per_composition"):
        s = out[key]
        print(f"{key}: n={s['n']} mean {s['mean']:.3f} median {s['median']:.3f} eV/atom, stable {100 * s['stable_rate']:.1f} %")
    if args.out:
        write_json(args.out, out)


if __name__ == "__main__":
    main()
