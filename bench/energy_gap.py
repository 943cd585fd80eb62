"""Energy gap to the known structures: MLIP energy per atom of generated structures minus that of the reference
structure of the same held-out row, before and after energy RL.

For each held-out structure of the model's dev split, one structure is generated for its composition (same x0 for
every sampler); energies come from the reward's potential (SevenNet-0 by default), unrelaxed. Only pairs where both
the generated and the reference structure pass the reward's trust checks (validity, close contacts) count; the
rejected fraction of generated structures is reported beside, with the match rate.

    python bench/energy_gap.py perov_5 --rl runs/rl_perov_energy/best.pt --out bench/results/energy_gap_perov_5.json
    python bench/energy_gap.py perov_5 --models perov_5_energy      # an RL-tuned model, from the same x0
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from crystalign.data.splits import load_training_data
from crystalign.generator import Generator
from crystalign.io import write_json
from crystalign.metrics import csp_metrics


def gap_stats(e_gen: np.ndarray, e_ref: np.ndarray) -> dict:
    both = np.isfinite(e_gen) & np.isfinite(e_ref)
    gap = e_gen[both] - e_ref[both]
    return {
        "pairs": int(both.sum()),
        "gap_mean_ev_per_atom": float(gap.mean()) if gap.size else None,
        "gap_median_ev_per_atom": float(np.median(gap)) if gap.size else None,
        "below_reference_fraction": float((gap < 0).mean()) if gap.size else None,
        "rejected_fraction": float((~np.isfinite(e_gen)).mean()),
    }


def distinct_per_composition(sample, gen, template, k: int, seed: int) -> dict:
    """Mean number of distinct structures among ``k`` samples of each composition of ``template``."""
    from crystalign.matching import make_matcher

    many = template.repeat_interleave(k)
    x0 = gen.base_sample(many.species, many.n_atoms, torch.Generator().manual_seed(seed + 7))
    with torch.no_grad():
        structures = sample(many, x0).to("cpu").to_structures()
    matcher = make_matcher()
    counts = [len(matcher.group_structures(structures[i * k:(i + 1) * k])) for i in range(template.num_structures)]
    return {"k": k, "compositions": len(counts), "mean": float(np.mean(counts)), "min": int(min(counts))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="base model (shipped name or checkpoint)")
    ap.add_argument("--rl", nargs="*", default=[], help="RL checkpoints (energy reward) to compare with the base sampler")
    ap.add_argument("--base-methods", nargs="*", default=[], help="also sample the base model with these integrators (e.g. sde)")
    ap.add_argument("--models", nargs="*", default=[], help="other models (e.g. RL-tuned ones) sampled from the same x0, plain Euler")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--backend", default="sevenn")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--diversity", type=int, default=0, metavar="K",
                    help="also sample K structures for each of the first 32 held-out compositions (own x0, as the sampler "
                    "is used) and count the distinct ones per composition (benchmark StructureMatcher)")
    ap.add_argument("--relax", action="store_true", help="also the gap after relaxing both structures of every pair (FIRE, cell too)")
    ap.add_argument("--relax-steps", type=int, default=200)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from crystalign.rewards import EnergyReward
    from crystalign.rl.checkpoints import load_policy
    from crystalign.rl.rollout import rollout
    from anneal_ablation import model_data_config  # the dev split the model was trained with

    gen = Generator.load(args.model)
    _, hold, _ = load_training_data(model_data_config(args.model))
    if args.limit:
        hold = hold[: args.limit]
    template = hold.to(dtype=torch.float32)
    reward = EnergyReward(args.backend)
    e_ref = reward(hold).info["energy_per_atom_ev"].numpy()
    relaxed_energy = None
    if args.relax:
        from crystalign.relax import relax_batch
        from crystalign.rewards.mlip import get_backend

        backend = get_backend(args.backend)

        def relaxed_energy(batch, trusted: np.ndarray) -> np.ndarray:
            """Energy per atom after relaxation of the trusted structures (NaN: untrusted or not converged)."""
            atoms = batch.to("cpu").to_atoms()
            idx = np.flatnonzero(trusted)
            out = np.full(len(atoms), np.nan)
            for i, a in zip(idx, relax_batch([atoms[i] for i in idx], backend, steps=args.relax_steps, progress=True)):
                if a.info["relax_status"] == "converged":
                    out[i] = a.info["relax_energy_ev"] / len(a)
            return out

        e_ref_relaxed = relaxed_energy(hold, np.isfinite(e_ref))
    x0 = gen.base_sample(template.species, template.n_atoms, torch.Generator().manual_seed(args.seed))
    # each sampler maps (template, x0) to structures, so the diversity check reuses it on other compositions
    samplers = {"base_sampler": lambda t, x: gen.sampler(steps=args.steps, schedule=False).sample(x)}
    for method in args.base_methods:
        g_base = lambda: torch.Generator().manual_seed(args.seed + 1)  # noqa: E731
        samplers[f"base_sampler:{method}"] = lambda t, x, m=method: gen.sampler(steps=args.steps, schedule=False, method=m).sample(x, generator=g_base())
    for name in args.models:
        samplers[name] = lambda t, x, m=Generator.load(name): m.sampler(steps=args.steps, schedule=False).sample(x)
    for path in args.rl:
        policy, _ = load_policy(path)
        g = lambda: torch.Generator().manual_seed(args.seed + 1)  # noqa: E731
        samplers[f"{path}:stochastic"] = lambda t, x, p=policy: rollout(p, t, args.steps, g(), store=False, x0=x).final
        samplers[f"{path}:no_noise"] = lambda t, x, p=policy: rollout(p, t, args.steps, g(), store=False, noise=False, x0=x).final
    runs = {name: (lambda f=f: f(template, x0)) for name, f in samplers.items()}
    rows = [{"sampler": "reference", "energy_per_atom_ev_mean": float(np.nanmean(e_ref)), "rejected_fraction": float(np.isnan(e_ref).mean())}]
    if relaxed_energy is not None:
        rows[0]["relaxed_energy_per_atom_ev_mean"] = float(np.nanmean(e_ref_relaxed))
        rows[0]["relax_not_converged_fraction"] = float(np.isnan(e_ref_relaxed).mean())
    print(json.dumps(rows[0]), flush=True)
    for name, run in runs.items():
        t0 = time.time()
        with torch.no_grad():
            batch = run()
        e_gen = reward(batch).info["energy_per_atom_ev"].numpy()
        m = csp_metrics(batch, hold, n_workers=1, progress=False, timeout=60)
        row = {"sampler": name, **gap_stats(e_gen, e_ref), "match_rate": m.match_rate, "rmse": m.rmse, "valid_rate": m.valid_rate, "seconds": time.time() - t0}
        if relaxed_energy is not None:  # pairs where both relaxations converged
            row["relaxed"] = gap_stats(relaxed_energy(batch, np.isfinite(e_gen)), e_ref_relaxed)
        if args.diversity:
            row["distinct_per_composition"] = distinct_per_composition(samplers[name], gen, template[:32], args.diversity, args.seed)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        write_json(args.out, {"model": args.model, "steps": args.steps, "backend": args.backend, "n": hold.num_structures, "rows": rows})


if __name__ == "__main__":
    main()
