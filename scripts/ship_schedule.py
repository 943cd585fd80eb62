"""Ship a shipped model with a learned velocity schedule attached, under a new name, with its model card.

    python scripts/ship_schedule.py runs/rl_scale/best.pt perov_5 --as perov_5_annealed \\
        --eval bench/results/anneal_ablation_perov_5.json \\
        --command "crystalign rl fit rl_perov_5_scale_crmse_cpu --base-checkpoint perov_5 --out runs/rl_scale"

The network weights (and so the model hash) are the base model's: `--no-schedule` samples it as the base.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from crystalign.generator import Generator, pretrained_dir
from crystalign.io import save_torch, write_json
from crystalign.model.checkpoint import read_checkpoint_file
from crystalign.schedule import VelocitySchedule


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rl_checkpoint", help="RL checkpoint of variant scale (best.pt)")
    ap.add_argument("name", help="shipped base model the schedule was learned for, e.g. perov_5")
    ap.add_argument("--as", dest="new_name", required=True, help="name of the shipped model with the schedule")
    ap.add_argument("--eval", default=None, help="JSON written by bench/anneal_ablation.py with the schedule's rows")
    ap.add_argument("--command", default="", help="the rl fit command that learned the schedule")
    args = ap.parse_args()
    source = pretrained_dir() / f"{args.name}.pt"
    dest = pretrained_dir() / f"{args.new_name}.pt"
    ckpt = read_checkpoint_file(source)
    gen = Generator.from_checkpoint_dict(ckpt, where=str(source))
    schedule = VelocitySchedule.from_rl_checkpoint(args.rl_checkpoint).checked_for(gen, where=args.rl_checkpoint)
    ckpt["schedule"] = schedule.to_dict()
    Generator.from_checkpoint_dict(ckpt, where=str(dest))  # loads back with its schedule before it is written
    card_path = dest.with_suffix(".json")
    card = json.loads(source.with_suffix(".json").read_text())
    card["name"] = args.new_name
    card["description"] = f"{args.name} with a learned velocity-annealing schedule s(t) (same network weights). " + card.get("description", "")
    card["schedule"] = {
        **schedule.record(),
        "command": args.command,
        "what": "default sampler: Euler with the velocity scaled by 1 + s(t) at the schedule's step count; --no-schedule samples without it",
    }
    if args.eval:
        rows = json.loads(Path(args.eval).read_text())["rows"]
        card["schedule"]["dev_results"] = [
            {k: r[k] for k in ("sampler", "steps", "match_rate", "rmse", "crmse", "valid_rate")} for r in rows
        ]
    save_torch(dest, ckpt)
    write_json(card_path, card)
    print(f"attached the s(t) of {args.rl_checkpoint} ({schedule.steps} time points) to {dest}")


if __name__ == "__main__":
    main()
