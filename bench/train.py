"""Training throughput (structures/s) of the base-model loss + backward + AdamW step on real data.

Reference implementation on this machine (perov_5, linear ODE CSP, batch 256): small net 600 structures/s,
paper net 101 structures/s (it calls the network twice per step).

    python bench/train.py [--sizes small paper preset] [--datasets perov_5 carbon_24] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from crystalign.config import load_config
from crystalign.data import load_dataset
from crystalign.distributions import BaseDistribution
from crystalign.generator import Generator, GeneratorConfig
from crystalign.model.cspnet import CSPNetConfig
from crystalign.training import TrainConfig, interpolant_losses
from crystalign.settings import tune_allocator

REFERENCE = {("perov_5", "small"): 600.0, ("perov_5", "paper"): 101.0}


def net_config(size: str, dataset: str) -> CSPNetConfig:
    if size == "small":
        return CSPNetConfig.small()
    if size == "paper":
        return CSPNetConfig.paper()
    from importlib.resources import files

    cfg = load_config(files("crystalign") / "configs" / f"{dataset}_cpu.yaml", TrainConfig)
    return cfg.generator.net


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", nargs="+", default=["small", "paper", "preset"])
    ap.add_argument("--datasets", nargs="+", default=["perov_5", "carbon_24"])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-time", type=float, default=10.0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tune_allocator()  # as the crystalign command does
    for ds_name in args.datasets:
        data = load_dataset(ds_name, niggli=True).batch.to(dtype=torch.float32)
        for size in args.sizes:
            torch.manual_seed(0)
            gen = Generator(GeneratorConfig(net=net_config(size, ds_name)), BaseDistribution.from_preset(ds_name))
            opt = torch.optim.AdamW([p for p in gen.net.parameters() if p.requires_grad], lr=1e-4)
            g = torch.Generator().manual_seed(0)

            def step():
                idx = torch.randint(data.num_structures, (args.batch,), generator=g)
                losses = interpolant_losses(gen, data[idx], generator=g)
                loss = gen.interpolants.total_loss(losses)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(gen.net.parameters(), 0.5)
                opt.step()

            step()  # warm-up
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < args.min_time:
                step()
                n += args.batch
            rate = n / (time.perf_counter() - t0)
            row = {"dataset": ds_name, "size": size, "params": sum(p.numel() for p in gen.net.parameters()), "batch": args.batch, "threads": args.threads, "structures_per_s": rate}
            if (ds_name, size) in REFERENCE:
                row["reference_structures_per_s"] = REFERENCE[(ds_name, size)]
                row["speedup"] = rate / REFERENCE[(ds_name, size)]
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
