"""Time per RL iteration split into rollout, reward and update.

The reference workload: velocity-based RL on the small net (4 layers x 128), perov_5 compositions,
4 groups x 8 trajectories, 50 time points, 1 PPO epoch, positions only, a cheap spglib reward.
The reference implementation takes 2.24 s per iteration on this machine (rollout 0.99 s, update 1.23 s).

    python bench/rl.py [--iterations 10] [--threads 2] [--model CKPT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile

import torch

from crystalign.data import load_dataset
from crystalign.distributions import BaseDistribution
from crystalign.generator import Generator, GeneratorConfig
from crystalign.model.cspnet import CSPNetConfig
from crystalign.rewards.symmetry import NonTriclinicReward
from crystalign.rl.config import RLConfig
from crystalign.rl.rollout import Policy
from crystalign.rl.trainer import RLTrainer
from crystalign.settings import tune_allocator

REFERENCE = {"total_s": 2.24, "rollout_s": 0.99, "update_s": 1.23}


def benchmark_trainer(iterations: int, variant: str = "velocity", model: str | None = None) -> RLTrainer:
    """The reference workload (see the module docstring) as an RLTrainer; seeded."""
    torch.manual_seed(0)
    if model:
        gen = Generator.load(model)
    else:
        gen = Generator(GeneratorConfig(net=CSPNetConfig.small()), BaseDistribution.from_preset("perov_5"))
    comps = load_dataset("perov_5").batch.to(dtype=torch.float32)
    cfg = RLConfig(
        variant=variant, fields=["pos"], steps=50, group_size=8, num_groups=4, ppo_epochs=1, iterations=iterations,
        costs={"pos_policy": 1.0, "pos_regularization": 1e-3}, duplicate_check=False, reward="non_triclinic",
    )
    cfg.validation.every = 0
    return RLTrainer(Policy(gen, cfg), NonTriclinicReward(), cfg, comps, progress=False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default=None, help="base checkpoint (default: random small net)")
    ap.add_argument("--variant", default="velocity")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tune_allocator()  # as the crystalign command does
    trainer = benchmark_trainer(args.iterations + 1, args.variant, args.model)
    with tempfile.TemporaryDirectory() as tmp:
        history = trainer.fit(tmp)[1:]  # the first iteration is warm-up
    med = {k: statistics.median(r[f"time_{k}"] for r in history) for k in ("rollout_s", "reward_s", "update_s", "total_s")}
    row = {"variant": args.variant, "threads": args.threads, "iterations": len(history), **{f"median_{k}": v for k, v in med.items()},
           "reference_total_s": REFERENCE["total_s"], "speedup_total": REFERENCE["total_s"] / med["total_s"],
           "speedup_rollout": REFERENCE["rollout_s"] / med["rollout_s"], "speedup_update": REFERENCE["update_s"] / med["update_s"]}
    print(json.dumps(row))


if __name__ == "__main__":
    main()
