"""Reader throughput: rows/s loading perov_5/val.csv (3 repeats; best and mean).

Usage::

    CRYSTALIGN_DATA_ROOT=/path/to/data python bench/load.py [--validate] [--repeats 3] [--file perov_5/val.csv]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from crystalign.data import read_structures
from crystalign.settings import data_root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file", default="perov_5/val.csv", help="path, or relative to the data root")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--validate", action="store_true", help="also run the full shared validity check")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--pymatgen", action="store_true", help="also time pymatgen's CIF parser on 300 rows, for reference")
    args = parser.parse_args()

    torch.set_num_threads(2)
    path = Path(args.file)
    if not path.exists():
        root = data_root(args.data_root)
        if root is None:
            raise SystemExit("set CRYSTALIGN_DATA_ROOT or --data-root (or give --file as a path)")
        path = root / args.file
    read_structures(path)  # warm-up: imports and element tables are not part of the rate
    rates = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        ds = read_structures(path, validate=args.validate)
        rates.append(len(ds) / (time.perf_counter() - start))
    print(
        f"load {args.file}: {len(ds)} rows, best {max(rates):.0f} rows/s, mean {statistics.mean(rates):.0f} rows/s "
        f"over {args.repeats} repeats (validate={args.validate}, threads=2)"
    )
    if args.pymatgen:
        _pymatgen_reference(path)


def _pymatgen_reference(path: Path, n: int = 300) -> None:
    import csv
    import warnings

    from pymatgen.core import Structure

    with open(path, newline="") as fh:
        texts = [row["cif"] for _, row in zip(range(n), csv.DictReader(fh))]
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for text in texts:
            Structure.from_str(text, fmt="cif")
    print(f"reference: pymatgen Structure.from_str {len(texts) / (time.perf_counter() - start):.0f} rows/s (CIF parsing only)")


if __name__ == "__main__":
    main()
