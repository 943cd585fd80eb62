"""Forward-pass throughput of CSPNet on synthetic batches (no_grad, edges built once and reused).

    python bench/forward.py                       # small + paper, batch 1/64/512, perov-like + carbon-like
    python bench/forward.py --sizes paper --batches 64 --reference   # also time the literal reference
    python bench/forward.py --threads 8 --device cuda --min-time 3

Prints structures/s per forward (one forward = all heads) and process CPU time per forward;
``--reference`` adds the literal reference and the CPU-time speed-up. Default run: about 1-2
minutes on 2 free cores.
"""

from __future__ import annotations

import argparse
import time

import torch

from crystalign.model import CSPNet, CSPNetConfig, build_edges
from crystalign.model.reference import reference_forward
from crystalign.settings import tune_allocator

SIZES = {"small": CSPNetConfig.small(), "paper": CSPNetConfig.paper()}
# carbon_24-like atom counts: 6..24, mean 12.8
CARBON_COUNTS = (6, 8, 8, 10, 12, 12, 14, 16, 18, 24)


def synthetic_batch(kind: str, batch_size: int, device: torch.device, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if kind == "perov":
        n_atoms = torch.full((batch_size,), 5, dtype=torch.long)
    elif kind == "carbon":
        choice = torch.randint(len(CARBON_COUNTS), (batch_size,), generator=g)
        n_atoms = torch.tensor(CARBON_COUNTS)[choice]
    else:
        raise ValueError(f"unknown dataset kind {kind!r}")
    n = int(n_atoms.sum())
    species = torch.randint(1, 101, (n,), generator=g)
    frac = torch.rand(n, 3, generator=g)
    lattice = 4.0 * torch.eye(3) + 0.3 * torch.randn(batch_size, 3, 3, generator=g)
    t = torch.rand(batch_size, generator=g)
    to = dict(device=device, dtype=dtype)
    return t.to(**to), species.to(device), frac.to(**to), lattice.to(**to), n_atoms.to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device: torch.device, min_time: float, max_repeats: int) -> tuple[float, float, int]:
    """Median wall seconds and median process CPU seconds per call over repeats (at least one),
    stopping after ``min_time`` seconds. CPU time is the steadier figure on a shared machine."""
    walls: list[float] = []
    cpus: list[float] = []
    start = time.perf_counter()
    while len(walls) < max_repeats and (not walls or time.perf_counter() - start < min_time):
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        _sync(device)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    walls.sort()
    cpus.sort()
    return walls[len(walls) // 2], cpus[len(cpus) // 2], len(walls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="small,paper", help=f"comma list of {', '.join(SIZES)}")
    parser.add_argument("--batches", default="1,64,512", help="comma list of batch sizes (structures)")
    parser.add_argument("--datasets", default="perov,carbon", help="comma list of perov, carbon")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds of repeats per case (>= 1 call)")
    parser.add_argument("--max-repeats", type=int, default=50)
    parser.add_argument("--reference", action="store_true", help="also time the literal reference (dense edges, concatenated Linear)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    tune_allocator()  # as the crystalign command does
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    print(f"torch {torch.__version__}, device {device}, {args.dtype}, {torch.get_num_threads()} threads")
    header = (
        f"{'size':<6} {'data':<7} {'batch':>5} {'atoms':>6} {'edges':>8} {'ms/fwd':>10} {'struct/s':>10} "
        f"{'cpu ms':>10} {'reps':>4}"
    )
    if args.reference:
        header += f" {'ref ms':>10} {'ref cpu':>10} {'speedup':>7}"
    print(header)
    for size in args.sizes.split(","):
        torch.manual_seed(0)
        net = CSPNet(SIZES[size]).to(device=device, dtype=dtype).eval()
        with torch.inference_mode():  # warm-up on a small batch, so large cases need a single call
            net(*synthetic_batch("carbon", 4, device, dtype))
        for kind in args.datasets.split(","):
            for batch_size in (int(b) for b in args.batches.split(",")):
                t, species, frac, lattice, n_atoms = synthetic_batch(kind, batch_size, device, dtype)
                edges = build_edges(n_atoms)
                with torch.inference_mode():
                    sec, cpu, reps = time_call(
                        lambda: net(t, species, frac, lattice, n_atoms, edges), device, args.min_time, args.max_repeats
                    )
                    line = (
                        f"{size:<6} {kind:<7} {batch_size:>5} {frac.shape[0]:>6} {edges.num_edges:>8} "
                        f"{1e3 * sec:>10.2f} {batch_size / sec:>10.1f} {1e3 * cpu:>10.1f} {reps:>4}"
                    )
                    if args.reference:
                        ref, ref_cpu, _ = time_call(
                            lambda: reference_forward(net, t, species, frac, lattice, n_atoms), device, args.min_time, 3
                        )
                        line += f" {1e3 * ref:>10.2f} {1e3 * ref_cpu:>10.1f} {ref_cpu / cpu:>7.2f}"
                print(line, flush=True)


if __name__ == "__main__":
    main()
