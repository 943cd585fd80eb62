"""Match rate / RMSE of a trained base model on its held-out split, at several step counts.

Uses the same seeded split as training (the model's provenance records it), one sample per held-out
structure, same-index pairing, StructureMatcher(stol 0.5, ltol 0.3, angle_tol 10).

    python bench/csp_eval.py runs/perov_5/model.pt --steps 50 500 [--anneal 0 10] [--limit N] --out eval.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from crystalign.config import from_dict
from crystalign.generator import Generator, resolve_model
from crystalign.model.checkpoint import read_checkpoint_file
from crystalign.io import write_json
from crystalign.metrics import csp_metrics
from crystalign.data.splits import DataConfig, load_training_data


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--steps", nargs="+", type=int, default=[50, 500])
    ap.add_argument("--anneal", nargs="+", type=float, default=[0.0])
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ckpt = read_checkpoint_file(resolve_model(args.model))  # a shipped name or a file
    prov = (ckpt.get("generator", ckpt)).get("provenance", {})
    data_cfg = from_dict(DataConfig, prov["config"]["data"]) if prov else DataConfig()
    gen = Generator.load(args.model)
    _, hold, _ = load_training_data(data_cfg)
    if args.limit:
        hold = hold[: args.limit]
    results = []
    for steps in args.steps:
        for anneal in args.anneal:
            t0 = time.time()
            samples = gen.sample(hold.to(dtype=torch.float32), seed=args.seed, steps=steps, anneal_pos=anneal)
            t_sample = time.time() - t0
            m = csp_metrics(samples, hold, n_workers=args.workers, progress=False, timeout=60)
            row = {"steps": steps, "anneal_pos": anneal, **m.to_dict(), "sample_s": t_sample, "n_holdout": hold.num_structures}
            results.append(row)
            print(json.dumps({k: row[k] for k in ("steps", "anneal_pos", "match_rate", "rmse", "crmse", "valid_rate", "n", "timeouts", "sample_s")}), flush=True)
    if args.out:
        write_json(args.out, {"model": args.model, "data": prov.get("config", {}).get("data"), "results": results})


if __name__ == "__main__":
    main()
