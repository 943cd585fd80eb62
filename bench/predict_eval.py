"""Out-of-the-box quality of `crystalign predict` on held-out perov_5 compositions.

For each of the first K held-out structures of the dev split (seeded 90/10 of perov_5/val.csv), runs
predict with and without inference-time RL and records: whether the known structure is among the ranked
candidates (benchmark StructureMatcher) and at which rank, the best energy per atom, and wall time.

    python bench/predict_eval.py --count 20 --rl-steps 10 -n 8 --no-relax --out predict_eval.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings

import numpy as np

from crystalign.io import write_json
from crystalign.matching import make_matcher
from crystalign.prediction import predict
from crystalign.data.splits import DataConfig, load_training_data


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=20)
    ap.add_argument("-n", type=int, default=8)
    ap.add_argument("--rl-steps", type=int, default=10)
    ap.add_argument("--relax", action="store_true")
    ap.add_argument("--no-relax", dest="relax", action="store_false")
    ap.add_argument("--model", default="perov_5")
    ap.add_argument("--out", default=None)
    ap.set_defaults(relax=False)
    args = ap.parse_args()
    _, hold, _ = load_training_data(DataConfig(dataset="perov_5", niggli=True))
    refs = hold[: args.count].to_structures()
    matcher = make_matcher()
    rows = []
    for i, ref in enumerate(refs):
        formula = ref.composition.formula.replace(" ", "")
        for rl_steps in (0, args.rl_steps):
            with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t0 = time.time()
                res = predict(formula, n=args.n, rl_steps=rl_steps, relax=args.relax, out=tmp, progress=False, model=args.model, seed=i)
                wall = time.time() - t0
            ranks = [k + 1 for k, s in enumerate(res.structures) if matcher.fit(s, ref)]
            row = {
                "formula": formula,
                "rl_steps": rl_steps,
                "matched": bool(ranks),
                "match_rank": ranks[0] if ranks else None,
                "best_energy_per_atom_ev": res.energies[0] if res.energies else None,
                "mean_sampled_energy_per_atom_ev": res.summary["sampled_energy_per_atom_ev_mean"],
                "n_unique": len(res.structures),
                "wall_s": wall,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary = {}
    for rl_steps in (0, args.rl_steps):
        sel = [r for r in rows if r["rl_steps"] == rl_steps]
        summary[f"rl_steps={rl_steps}"] = {
            "match_fraction": float(np.mean([r["matched"] for r in sel])),
            "top1_match_fraction": float(np.mean([r["match_rank"] == 1 for r in sel])),
            "mean_best_energy_per_atom_ev": float(np.nanmean([r["best_energy_per_atom_ev"] or np.nan for r in sel])),
            "mean_sampled_energy_per_atom_ev": float(np.nanmean([r["mean_sampled_energy_per_atom_ev"] or np.nan for r in sel])),
            "mean_wall_s": float(np.mean([r["wall_s"] for r in sel])),
        }
    print(json.dumps(summary, indent=2))
    if args.out:
        write_json(args.out, {"args": vars(args), "summary": summary, "rows": rows})


if __name__ == "__main__":
    main()
