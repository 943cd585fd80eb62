"""De novo generation on the dev split: generate N crystals with a DNG model and score them as papers do.

The reference set (coverage, Wasserstein distances) is the model's own held-out part of its dev split; novelty is
against the part it was trained on. With ``--hull`` (``crystalign hull build`` with the same MLIP), stability,
E-hull and the S.U.N. rate are added; ``--relax`` relaxes each valid crystal with that MLIP first (as MatterGen does
before E-hull). Also reported: composition diversity (distinct reduced formulas, most common elements), so a model
that collapses onto a few easy chemistries is visible.

    python bench/dng_eval.py runs/perov_5_dng/model.pt -n 1000 --hull hull.json --out bench/results/dng_perov_5.json
    python bench/dng_eval.py perov_5_dng --rl runs/rl_dng/best.pt -n 1000 --hull hull.json   # the RL policy

With ``--rl`` the crystals come from a de novo RL run on the model (its policy's mean path, or with ``--rl-noise``
its exploration noise too), from the same crystal sizes and seed as the base model's.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from anneal_ablation import model_data_config  # noqa: E402  (the dev split the model was trained with)

from crystalign.crystal import CrystalBatch  # noqa: E402
from crystalign.data.splits import load_training_data  # noqa: E402
from crystalign.dng_metrics import dng_metrics, energies_above_hull  # noqa: E402
from crystalign.generator import Generator  # noqa: E402
from crystalign.io import write_json  # noqa: E402
from crystalign.provenance import versions  # noqa: E402


def diversity(structures) -> dict:
    """Distinct reduced formulas and element frequencies of a set of crystals (reward hacking shows here)."""
    formulas = Counter(s.composition.reduced_formula for s in structures)
    elements = Counter(el.symbol for s in structures for el in s.composition.elements)
    return {
        "distinct_formulas": len(formulas),
        "distinct_elements": len(elements),
        "top_formulas": formulas.most_common(5),
        "top_elements": elements.most_common(10),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="DNG model: shipped name or checkpoint")
    ap.add_argument("-n", type=int, default=1000, help="crystals to generate")
    ap.add_argument("--steps", type=int, default=None, help="integration time points (default: the model's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--anneal-pos", type=float, default=None, help="velocity annealing s of the positions, (1 + s t) b")
    ap.add_argument("--anneal-cell", type=float, default=None, help="velocity annealing s of the lattice")
    ap.add_argument("--anneal-cap", type=float, default=None, help="cap c of an annealed step, c (1 - t)/dt (default: the model's)")
    ap.add_argument("--species-noise", type=float, default=None, help="re-masking rate η while sampling (default: the model's)")
    ap.add_argument("--hull", default=None, help="hull file (crystalign hull build) for E-hull and S.U.N.")
    ap.add_argument("--relax", action="store_true", help="relax valid crystals with the hull's MLIP before E-hull")
    ap.add_argument("--max-reference", type=int, default=None, help="fingerprint at most this many references")
    ap.add_argument(
        "--reference", choices=("holdout", "all"), default="holdout",
        help="coverage reference: the held-out part of the dev split (strict), or the whole dev file (as many "
        "structures as the official test split, but including the trained part: optimistic)",
    )
    ap.add_argument("--fingerprint-cache", default=None, help=".npz file caching the reference fingerprints")
    ap.add_argument("--rl", default=None, help="RL checkpoint of a de novo run on this model: evaluate its policy")
    ap.add_argument("--rl-noise", action="store_true", help="sample the policy with its exploration noise")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    gen = Generator.load(args.model)
    if args.species_noise is not None:  # a sampling-time setting: the network is the same
        gen.interpolants.species.noise = args.species_noise
    data_cfg = model_data_config(args.model)
    train, hold, _ = load_training_data(data_cfg)
    t0 = time.perf_counter()
    if args.rl:
        from crystalign.generator import cpu_generator
        from crystalign.rl.checkpoints import load_policy
        from crystalign.rl.rollout import rollout

        policy, _ = load_policy(args.rl)
        if policy.reference.model_hash() != gen.model_hash():
            raise SystemExit(f"{args.rl} was not trained on {args.model}")
        template = gen.dng_template(args.n, seed=args.seed)
        g = cpu_generator(args.seed)
        steps = args.steps or policy.config.steps
        parts = [rollout(policy, part, steps, g, store=False, noise=args.rl_noise).final for part in template.split(256)]
        batch = CrystalBatch.cat(parts)
    else:
        batch = gen.generate(args.n, seed=args.seed, steps=args.steps, anneal_pos=args.anneal_pos, anneal_cell=args.anneal_cell,
                             anneal_cap=args.anneal_cap)
    gen_s = time.perf_counter() - t0
    structures = batch.to_structures()
    valid = batch.validity().valid.tolist()

    e_hull, relax_s = None, None
    if args.hull:
        from crystalign.rewards.hull import EnergyAboveHullReward

        backend = EnergyAboveHullReward(args.hull).backend  # the potential the hull was built with
        if args.relax:
            from pymatgen.io.ase import AseAtomsAdaptor

            from crystalign.relax import relax_batch

            t1 = time.perf_counter()
            idx = [i for i, ok in enumerate(valid) if ok]
            atoms = [AseAtomsAdaptor.get_atoms(structures[i]) for i in idx]
            for i, a in zip(idx, relax_batch(atoms, backend.load(), steps=100, fmax=0.05, progress=True)):
                structures[i] = AseAtomsAdaptor.get_structure(a)
            relax_s = time.perf_counter() - t1
        e_hull = energies_above_hull(structures, args.hull, backend=backend, progress=True)

    t2 = time.perf_counter()
    reference = hold if args.reference == "holdout" else CrystalBatch.cat([train, hold])
    metrics = dng_metrics(
        structures, reference.to_structures(), train.to_structures(), dataset=data_cfg.dataset, e_above_hull=e_hull,
        progress=True, max_reference=args.max_reference, fingerprint_cache=args.fingerprint_cache,
    )
    eval_s = time.perf_counter() - t2
    result = {
        "model": args.model,
        "model_hash": gen.model_hash(),
        "rl": args.rl,
        "rl_noise": bool(args.rl_noise),
        "n": args.n,
        "steps": args.steps or gen.sampler().config.steps,
        "seed": args.seed,
        "species_noise": gen.interpolants.species.noise,
        "anneal_pos": args.anneal_pos,
        "anneal_cell": args.anneal_cell,
        "anneal_cap": args.anneal_cap,
        "sampler": vars(gen.sampler(steps=args.steps, anneal_pos=args.anneal_pos, anneal_cell=args.anneal_cell, anneal_cap=args.anneal_cap).config),
        "hull": args.hull,
        "relaxed": bool(args.relax),
        "generate_s": gen_s,
        "relax_s": relax_s,
        "evaluate_s": eval_s,
        "data": {"dataset": data_cfg.dataset, "split": data_cfg.split, "n_train": train.num_structures,
                 "reference": args.reference, "n_reference": reference.num_structures},
        "metrics": metrics.to_dict(),
        "diversity": diversity([s for s, ok in zip(structures, valid) if ok]),
        "versions": versions(),
        "command": " ".join(sys.argv),
    }
    print(metrics.summary())
    m = metrics.to_dict()
    print({k: m[k] for k in ("amsd_recall", "amsd_precision", "amcd_recall", "amcd_precision")})
    print(result["diversity"])
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
