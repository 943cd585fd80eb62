"""Copy a trained base model into the package with its model card.

    python scripts/ship_model.py runs/perov_5/model.pt perov_5 --eval eval.json --command "crystalign train perov_5_cpu ..."

The card records the training command, data checksum, seed, versions, held-out metrics and coverage.
"""

from __future__ import annotations

import argparse

import yaml
import json
from pathlib import Path

from crystalign.generator import Generator, pretrained_dir
from crystalign.model.checkpoint import read_checkpoint_file
from crystalign.io import save_torch, write_json


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("name")
    ap.add_argument("--eval", default=None, help="JSON written by bench/csp_eval.py (CSP models)")
    ap.add_argument("--dng-eval", default=None, help="JSON written by bench/dng_eval.py (de novo models)")
    ap.add_argument("--gap-eval", default=None, help="JSON written by bench/energy_gap.py (RL-tuned models)")
    ap.add_argument("--gap-row", default=None, help="the row of --gap-eval that is this model (its 'sampler' name)")
    ap.add_argument(
        "--predict-replaces-base", default=None, metavar="EVIDENCE",
        help="an RL-tuned model that `predict` should sample instead of its base (it found lower relaxed energies at "
        "an equal MLIP budget): the evidence, e.g. the BENCHMARKS.md section",
    )
    ap.add_argument("--command", default="")
    ap.add_argument("--description", default="")
    ap.add_argument(
        "--sampling", nargs="*", default=[], metavar="KEY=VALUE",
        help="default sampler settings to ship with the model (e.g. anneal_pos=2), chosen on the dev split",
    )
    args = ap.parse_args()
    ckpt = read_checkpoint_file(args.model)
    ckpt = ckpt.get("generator", ckpt)
    for item in args.sampling:
        key, _, value = item.partition("=")
        ckpt["config"]["sampling"][key] = yaml.safe_load(value)  # typed as in a config file: 100, 2.0, euler
    gen = Generator.from_checkpoint_dict(ckpt, where=args.model)  # validates before shipping
    prov = ckpt.get("provenance", {})
    card = {
        "name": args.name,
        "description": args.description,
        "training_command": args.command,
        "config": prov.get("config"),
        "data_sha256": prov.get("data_sha256"),
        "seed": prov.get("seed"),
        "versions": prov.get("versions"),
        "n_train": prov.get("n_train"),
        "n_holdout": prov.get("n_holdout"),
        "coverage": gen.coverage,
        "parameters": sum(p.numel() for p in gen.net.parameters()),
        "model_hash": gen.model_hash(),
        "sampling": ckpt["config"]["sampling"],
    }
    if args.eval:
        ev = json.loads(Path(args.eval).read_text())
        card["validation"] = {
            "protocol": "one sample per held-out structure, StructureMatcher(stol 0.5, ltol 0.3, angle_tol 10)",
            "data": ev.get("data"),
            **{f"match_rate_{r['steps']}_steps" + (f"_anneal_{r['anneal_pos']:g}" if r["anneal_pos"] else ""): r["match_rate"] for r in ev["results"]},
            "results": ev["results"],
        }
    if args.dng_eval:
        ev = json.loads(Path(args.dng_eval).read_text())
        card["dng_validation"] = {
            "protocol": f"{ev['n']} crystals generated ({ev['steps']} time points, seed {ev['seed']}); coverage and "
            "Wasserstein distances against the held-out part of the dev split, novelty against the trained part "
            "(crystalign.dng_metrics)" + (f"; E-hull against {ev['hull']}" if ev.get("hull") else ""),
            "data": ev.get("data"),
            "metrics": ev["metrics"],
            "diversity": ev.get("diversity"),
            "command": ev.get("command"),
        }
    if gen.tuned_from is not None:
        card["tuned_from"] = gen.tuned_from
        card["rl"] = {k: v for k, v in prov.get("rl", {}).items() if k != "checkpoint"}
    if args.gap_eval:
        ev = json.loads(Path(args.gap_eval).read_text())
        rows = {r["sampler"]: r for r in ev["rows"]}
        if args.gap_row not in rows:
            raise SystemExit(f"--gap-row {args.gap_row!r} is not a row of {args.gap_eval} ({', '.join(rows)})")
        card["energy_gap_validation"] = {
            "protocol": f"one structure per held-out structure of the dev split ({ev['n']}), {ev['steps']} time points, "
            f"same x0 for every sampler; {ev['backend']} energy per atom, unrelaxed, generated minus reference over pairs "
            "both trusted by the reward's checks (bench/energy_gap.py)",
            "base_sampler": rows.get("base_sampler"),
            "this_model": rows[args.gap_row],
            "reference": rows.get("reference"),
        }
    if args.predict_replaces_base:
        if "tuned_from" not in card:
            raise SystemExit("--predict-replaces-base is for an RL-tuned model (this checkpoint has no base model)")
        card["predict_replaces_base"] = True
        card["predict_evidence"] = args.predict_replaces_base
    dest = pretrained_dir() / f"{args.name}.pt"
    save_torch(dest, ckpt)
    write_json(dest.with_suffix(".json"), card)
    print(f"shipped {dest} ({dest.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
