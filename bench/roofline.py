"""Roofline of the speed targets: how fast could the benchmark workloads run if every matrix multiply ran at
this machine's peak and everything else were free?

Counts the matrix-multiply FLOPs that the workloads of ``bench/sample.py`` and ``bench/rl.py`` actually execute
(``torch.utils.flop_counter``, forward and backward), measures the peak GEMM throughput at the same thread count,
and reports the best attainable time, the measured time, and the GEMM throughput a speed target would need. A
target that needs more than the peak cannot be reached by any implementation that computes the same function
with the same FLOPs.

    python bench/roofline.py [--threads 2] [--skip-rl] [--skip-sample]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from crystalign.data import load_dataset
from crystalign.distributions import BaseDistribution
from crystalign.generator import Generator, GeneratorConfig
from crystalign.settings import tune_allocator

# the sibling benchmark scripts (run as `python bench/roofline.py`, so bench/ is on sys.path): same workloads
from rl import REFERENCE as RL_REFERENCE, benchmark_trainer  # noqa: E402
from sample import REFERENCE as SAMPLE_REFERENCE, SIZES  # noqa: E402

# the reference implementation's figures on this machine (bench/sample.py, bench/rl.py) and the >= 3x target
SAMPLE_CASES = [("perov_5", "small", 64), ("perov_5", "paper", 64), ("carbon_24", "small", 64), ("carbon_24", "paper", 64),
                ("perov_5", "paper", 512)]
RL_REFERENCE_S = RL_REFERENCE["total_s"]
TARGET_SPEEDUP = 3.0


def peak_gemm_gflops(repeats: int = 10) -> float:
    """Best float32 GEMM throughput over square and network-shaped products (GFLOP/s)."""
    best = 0.0
    for m, k, n in [(2048, 2048, 2048), (4096, 512, 512), (1600, 512, 512), (640, 768, 512), (800, 128, 128)]:
        a, b = torch.randn(m, k), torch.randn(k, n)
        for _ in range(3):
            a @ b
        t0 = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = max(best, 2 * m * k * n * repeats / (time.perf_counter() - t0) / 1e9)
    return best


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def sample_rows(peak: float) -> list[dict]:
    rows = []
    for ds_name, size, bs in SAMPLE_CASES:
        ref = SAMPLE_REFERENCE[(ds_name, size, bs)]
        data = load_dataset(ds_name).batch.to(dtype=torch.float32)
        torch.manual_seed(0)
        gen = Generator(GeneratorConfig(net=SIZES[size]), BaseDistribution.from_preset(ds_name))
        template = data[torch.arange(bs) % data.num_structures]
        flops = count_flops(lambda: gen.sample(template, seed=0, steps=50)) / bs
        gen.sample(template, seed=0, steps=3)  # warm-up
        t0 = time.perf_counter()
        gen.sample(template, seed=1, steps=50)
        measured = bs / (time.perf_counter() - t0)
        target = TARGET_SPEEDUP * ref
        rows.append({
            "workload": "sample", "dataset": ds_name, "size": size, "batch": bs,
            "gflop_per_structure": flops / 1e9,
            "best_possible_structures_per_s": peak * 1e9 / flops,
            "measured_structures_per_s": measured,
            "reference_structures_per_s": ref, "target_structures_per_s": target,
            "gflops_needed_for_target": target * flops / 1e9,
            "target_within_peak": target * flops / 1e9 <= peak,
        })
        print(json.dumps(rows[-1]), flush=True)
    return rows


def rl_row(peak: float) -> dict:
    trainer = benchmark_trainer(iterations=10**6)
    trainer.step()  # warm-up
    flops = count_flops(trainer.step)
    t0 = time.perf_counter()
    trainer.step()
    measured = time.perf_counter() - t0
    target = RL_REFERENCE_S / TARGET_SPEEDUP
    row = {
        "workload": "rl_iteration", "gflop_per_iteration": flops / 1e9,
        "best_possible_s": flops / (peak * 1e9), "measured_s": measured,
        "reference_s": RL_REFERENCE_S, "target_s": target,
        "gflops_needed_for_target": flops / target / 1e9, "target_within_peak": flops / target / 1e9 <= peak,
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-rl", action="store_true")
    ap.add_argument("--skip-sample", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tune_allocator()  # as the crystalign command does
    peak = peak_gemm_gflops()
    print(json.dumps({"threads": args.threads, "peak_gemm_gflops": peak}), flush=True)
    if not args.skip_rl:
        rl_row(peak)
    if not args.skip_sample:
        sample_rows(peak)


if __name__ == "__main__":
    main()
