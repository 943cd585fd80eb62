"""Sampling throughput: structures/s at 50 time points (49 Euler steps), and the share of time in the network.

Compositions are real (perov_5 / carbon_24 val rows through the data root); weights are random, as in the
reference figures (small net 4x128, paper net 6x512; 2 threads). Reference implementation on this machine
(structures/s): perov_5 b64 small 32.0, paper 6.5; carbon_24 b64 small 7.0, paper 1.35; perov_5 b512 small 21.5,
paper 5.4.

    python bench/sample.py [--sizes small paper] [--batches 1 64 512] [--threads 2] [--datasets perov_5 carbon_24]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from crystalign.data import load_dataset
from crystalign.distributions import BaseDistribution
from crystalign.generator import Generator, GeneratorConfig
from crystalign.model.cspnet import CSPNetConfig
from crystalign.settings import tune_allocator

REFERENCE = {("perov_5", "small", 64): 32.0, ("perov_5", "paper", 64): 6.5, ("carbon_24", "small", 64): 7.0,
             ("carbon_24", "paper", 64): 1.35, ("perov_5", "small", 512): 21.5, ("perov_5", "paper", 512): 5.4}
SIZES = {"small": CSPNetConfig.small(), "paper": CSPNetConfig.paper()}


class TimedNet(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net
        self.seconds = 0.0
        self.calls = 0

    def forward(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = self.net(*args, **kwargs)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", nargs="+", default=["small", "paper"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 64, 512])
    ap.add_argument("--datasets", nargs="+", default=["perov_5", "carbon_24"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--min-time", type=float, default=3.0, help="repeat a case until this many seconds")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tune_allocator()  # as the crystalign command does
    rows = []
    for ds_name in args.datasets:
        data = load_dataset(ds_name).batch.to(dtype=torch.float32)
        for size in args.sizes:
            torch.manual_seed(0)
            gen = Generator(GeneratorConfig(net=SIZES[size]), BaseDistribution.from_preset(ds_name)).to(args.device)
            timed = TimedNet(gen.net)
            gen.net = timed
            for bs in args.batches:
                template = data[torch.arange(bs) % data.num_structures].to(args.device)
                gen.sample(template, seed=0, steps=3)  # warm-up
                timed.seconds, n_done, t0 = 0.0, 0, time.perf_counter()
                while True:
                    gen.sample(template, seed=n_done, steps=args.steps)
                    n_done += bs
                    if time.perf_counter() - t0 > args.min_time:
                        break
                wall = time.perf_counter() - t0
                row = {"dataset": ds_name, "size": size, "batch": bs, "structures_per_s": n_done / wall, "network_share": timed.seconds / wall, "threads": args.threads, "steps": args.steps}
                ref = REFERENCE.get((ds_name, size, bs))
                if ref:
                    row["reference_structures_per_s"] = ref
                    row["speedup"] = row["structures_per_s"] / ref
                rows.append(row)
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
