"""Before/after RL on held-out compositions: energy per atom (valid structures only), invalid fraction, match rate.

"Before" is the base sampler (deterministic Euler, the model's usual sampling) and, for reference, the untrained
stochastic policy; "after" is the reinforced policy sampled as trained (stochastic) and with --no-noise.
Energies come from the same MLIP as the reward.

    python bench/rl_eval.py runs/rl/best.pt --limit 128 --steps 50 [20 ...] --out rl_eval.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from crystalign.io import write_json
from crystalign.metrics import csp_metrics
from crystalign.rewards import EnergyReward
from crystalign.rl.checkpoints import load_policy
from crystalign.rl.rollout import Policy, rollout
from crystalign.data.splits import load_training_data


def energy_stats(batch, reward) -> dict:
    res = reward(batch)
    e = res.info["energy_per_atom_ev"].numpy()
    return {"energy_per_atom_ev_mean": float(np.nanmean(e)) if np.isfinite(e).any() else None, "invalid_fraction": float(np.isnan(e).mean())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--steps", nargs="+", type=int, default=None, help="time points (default: as trained)")
    ap.add_argument("--backend", default="sevenn")
    ap.add_argument("--no-energy", action="store_true", help="match rates only (e.g. for a cRMSE-trained policy)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    policy, state = load_policy(args.checkpoint)
    cfg = policy.config
    _, hold, _ = load_training_data(cfg.data)
    if args.limit:
        hold = hold[: args.limit]
    template = hold.to(dtype=torch.float32)
    reward = None if args.no_energy else EnergyReward(args.backend)
    untrained = Policy(policy.reference, cfg, scale_model=None) if cfg.variant != "scaled_velocity" else None
    results = []
    for steps in args.steps or [cfg.steps]:
        x0 = policy.reference.base_sample(template.species, template.n_atoms, torch.Generator().manual_seed(args.seed))
        runs = {
            "base_sampler": lambda: policy.reference.sampler(steps=steps).sample(x0),
            "rl_policy_stochastic": lambda: rollout(policy, template, steps, torch.Generator().manual_seed(args.seed + 1), store=False, x0=x0).final,
            "rl_policy_no_noise": lambda: rollout(policy, template, steps, torch.Generator().manual_seed(args.seed + 1), store=False, noise=False, x0=x0).final,
        }
        if untrained is not None:
            runs["untrained_policy_stochastic"] = lambda: rollout(untrained, template, steps, torch.Generator().manual_seed(args.seed + 1), store=False, x0=x0).final
        for name, run in runs.items():
            t0 = time.time()
            with torch.no_grad():
                batch = run()
            wall = time.time() - t0
            m = csp_metrics(batch, hold, n_workers=2, progress=False, timeout=60).to_dict()
            row = {"sampler": name, "steps": steps, "match_rate": m["match_rate"], "rmse": m["rmse"], "valid_rate": m["valid_rate"], "n": m["n"], "timeouts": m["timeouts"], "sample_s": wall}
            if reward is not None:
                row.update(energy_stats(batch, reward))
            results.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        write_json(args.out, {"checkpoint": args.checkpoint, "iteration": state["iteration"], "variant": cfg.variant, "results": results})


if __name__ == "__main__":
    main()
