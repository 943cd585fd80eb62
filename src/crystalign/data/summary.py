"""Dataset statistics: sizes, elements, space groups, lattice statistics and the log-normal fit of the
lattice lengths that the base distribution uses.

Example::

    ds = load_dataset("perov_5", split="val")
    mu, s = fit_lognormal_lengths(ds.batch)      # ln a ~ N(mu[0], s[0]^2), ...
    print(format_summary(summarize(ds)))
"""

from __future__ import annotations

import math
import os
import warnings
from collections import Counter
from typing import Any, Sequence

import numpy as np
import torch

from crystalign.crystal import CrystalBatch
from crystalign.geometry import lattice_params, volume

#: symmetry tolerances of the CSP literature (pymatgen SpacegroupAnalyzer defaults with symprec 0.1)
SYMPREC = 0.1
ANGLE_TOLERANCE = 5.0


def fit_lognormal_lengths(batch: CrystalBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-axis log-normal fit of the lattice lengths a, b, c (as stored, after the reader's options).

    Returns ``(mu, s)``, each (3,) float64: ``mu = mean(ln a)``, ``s = std(ln a)`` (maximum
    likelihood, i.e. population std), likewise for b and c.
    """
    lengths, _ = lattice_params(batch.lattice.detach().to(torch.float64))
    logs = lengths.log()
    return logs.mean(0), logs.std(0, unbiased=False) if logs.shape[0] > 1 else torch.zeros(3, dtype=torch.float64)


def _spacegroup_one(cell: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[int, str] | None:
    import spglib

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # spglib's deprecation notices
        try:
            ds = spglib.get_symmetry_dataset(cell, symprec=SYMPREC, angle_tolerance=ANGLE_TOLERANCE)
        except Exception:
            return None
    if ds is None:
        return None
    number = ds.number if hasattr(ds, "number") else ds["number"]
    symbol = ds.international if hasattr(ds, "international") else ds["international"]
    return int(number), str(symbol)


def _spacegroup_chunk(cells: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> list[tuple[int, str] | None]:
    return [_spacegroup_one(c) for c in cells]


def space_groups(
    batch: CrystalBatch, workers: int | None = 1, progress: bool = False
) -> list[tuple[int, str] | None]:
    """(number, Hermann-Mauguin symbol) of every structure via spglib (symprec 0.1 Å, angle 5°); None
    where spglib finds none. spglib needs milliseconds per high-symmetry cell, so ``workers`` > 1
    spreads large batches over processes (``None``: all cores)."""
    # spglib prints a line to stderr for every cell it cannot refine; the result already says so
    os.environ.setdefault("SPGLIB_WARNING", "OFF")
    counts = batch.n_atoms.cpu().tolist()
    lattices = batch.lattice.detach().cpu().to(torch.float64).numpy()
    fracs = np.split(batch.frac.detach().cpu().to(torch.float64).numpy(), np.cumsum(counts)[:-1])
    numbers = np.split(batch.species.cpu().numpy(), np.cumsum(counts)[:-1])
    cells = list(zip(lattices, fracs, numbers))
    n_workers = (os.cpu_count() or 1) if workers is None else max(1, workers)
    if n_workers == 1 or len(cells) < 200:
        if progress:
            from tqdm.auto import tqdm

            return [_spacegroup_one(c) for c in tqdm(cells, desc="space groups", leave=False, disable=None)]
        return _spacegroup_chunk(cells)
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    # fork: the children need only numpy and spglib, and start instantly
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
    size = max(16, math.ceil(len(cells) / (n_workers * 8)))
    chunks = [cells[i : i + size] for i in range(0, len(cells), size)]
    with ProcessPoolExecutor(max_workers=n_workers, mp_context=ctx) as pool:
        results = list(pool.map(_spacegroup_chunk, chunks))
    return [r for chunk in results for r in chunk]


def _stats(x: torch.Tensor) -> dict[str, float]:
    x = x.to(torch.float64)
    return {
        "mean": float(x.mean()),
        "std": float(x.std(unbiased=False)) if x.numel() > 1 else 0.0,
        "min": float(x.min()),
        "max": float(x.max()),
    }


def summarize(
    dataset: Any,
    *,
    spacegroups: bool = True,
    validity: bool = True,
    workers: int | None = 1,
    progress: bool = False,
    top: int | None = None,
) -> dict[str, Any]:
    """A JSON-ready summary of a :class:`~crystalign.data.readers.Dataset` (or a bare CrystalBatch)."""
    from pymatgen.core.periodic_table import Element

    from crystalign.data.readers import chunked_validity

    batch: CrystalBatch = dataset.batch if hasattr(dataset, "batch") else dataset
    batch = batch.to(dtype=torch.float64)
    n = batch.n_atoms
    counts = Counter(n.tolist())
    out: dict[str, Any] = {}
    if hasattr(dataset, "batch"):
        out["name"] = dataset.name
        out["split"] = dataset.split
        out["source"] = str(dataset.source) if dataset.source else None
        out["skipped"] = len(dataset.skipped)
        out["properties"] = list(dataset.properties)
    out["rows"] = batch.num_structures
    out["atoms"] = {
        "total": batch.num_atoms,
        "min": int(n.min()),
        "mean": float(n.double().mean()),
        "max": int(n.max()),
        "histogram": {int(k): v for k, v in sorted(counts.items())},
    }

    z_atoms = Counter(batch.species.tolist())
    z_structs: Counter[int] = Counter()
    for comp in batch.compositions():
        z_structs.update(comp.keys())
    elements = sorted(z_atoms, key=lambda z: (-z_structs[z], z))
    if top is not None:
        elements = elements[:top]
    out["n_elements"] = len(z_atoms)
    out["elements"] = {Element.from_Z(z).symbol: {"structures": z_structs[z], "atoms": z_atoms[z]} for z in elements}

    if spacegroups:
        sgs = space_groups(batch, workers=workers, progress=progress)
        sg_counts = Counter(f"{sym} ({num})" for num, sym in (s for s in sgs if s is not None))
        numbers = Counter(s[0] for s in sgs if s is not None)
        ordered = sorted(sg_counts.items(), key=lambda kv: (-kv[1], int(kv[0].rsplit("(", 1)[1][:-1])))
        out["space_groups"] = {
            "symprec": SYMPREC,
            "angle_tolerance": ANGLE_TOLERANCE,
            "distinct": len(numbers),
            "failed": sum(s is None for s in sgs),
            "counts": dict(ordered[:top] if top is not None else ordered),
        }

    lengths, angles = lattice_params(batch.lattice)
    vpa = volume(batch.lattice) / n.to(torch.float64)
    mu, s = fit_lognormal_lengths(batch)
    out["lattice"] = {
        "lengths_mean": lengths.mean(0).tolist(),
        "lengths_std": lengths.std(0, unbiased=False).tolist(),
        "angles_mean": angles.mean(0).tolist(),
        "angles_std": angles.std(0, unbiased=False).tolist(),
        "volume_per_atom": _stats(vpa),
    }
    out["lognormal_lengths"] = {"mu": mu.tolist(), "s": s.tolist()}
    if validity:
        out["valid"] = int(chunked_validity(batch.frac, batch.lattice, batch.n_atoms).valid.sum())
    return out


def format_summary(summary: dict[str, Any], top: int = 15) -> str:
    """Plain-text tables of a :func:`summarize` result."""
    lines: list[str] = []
    title = summary.get("name") or summary.get("source") or "dataset"
    if summary.get("split"):
        title += f" / {summary['split']}"
    lines.append(title)
    if summary.get("source") and summary.get("name"):
        lines.append(f"  source: {summary['source']}")
    a = summary["atoms"]
    rows = [
        ("structures", f"{summary['rows']}"),
        ("atoms per cell", f"min {a['min']}  mean {a['mean']:.2f}  max {a['max']}  (total {a['total']})"),
        ("elements", f"{summary['n_elements']}"),
    ]
    if "valid" in summary:
        rows.append(("valid (shared check)", f"{summary['valid']} / {summary['rows']}"))
    if summary.get("skipped"):
        rows.append(("skipped bad rows", f"{summary['skipped']}"))
    if summary.get("properties"):
        rows.append(("properties", ", ".join(summary["properties"])))
    width = max(len(k) for k, _ in rows)
    lines += [f"  {k.ljust(width)}  {v}" for k, v in rows]

    lat = summary["lattice"]
    mu, s = summary["lognormal_lengths"]["mu"], summary["lognormal_lengths"]["s"]
    lines.append("")
    lines.append("lattice")
    lines += _table(
        ["", "a", "b", "c"],
        [
            ("length mean (Å)", *(f"{v:.4f}" for v in lat["lengths_mean"])),
            ("length std (Å)", *(f"{v:.4f}" for v in lat["lengths_std"])),
            ("log-normal mu", *(f"{v:.4f}" for v in mu)),
            ("log-normal s", *(f"{v:.4f}" for v in s)),
        ],
    )
    lines += _table(
        ["", "alpha", "beta", "gamma"],
        [
            ("angle mean (°)", *(f"{v:.3f}" for v in lat["angles_mean"])),
            ("angle std (°)", *(f"{v:.3f}" for v in lat["angles_std"])),
        ],
    )
    v = lat["volume_per_atom"]
    lines.append(f"  volume per atom (Å^3): mean {v['mean']:.3f}  std {v['std']:.3f}  min {v['min']:.3f}  max {v['max']:.3f}")

    lines.append("")
    els = list(summary["elements"].items())
    lines.append(f"elements (top {min(top, len(els))} of {summary['n_elements']} by structures)")
    lines += _table(["element", "structures", "atoms"], [(k, str(e["structures"]), str(e["atoms"])) for k, e in els[:top]])

    if "space_groups" in summary:
        sg = summary["space_groups"]
        items = list(sg["counts"].items())
        lines.append("")
        lines.append(
            f"space groups (spglib symprec {sg['symprec']}, angle {sg['angle_tolerance']}°): {sg['distinct']} distinct"
            + (f", {sg['failed']} undetermined" if sg["failed"] else "")
        )
        lines += _table(["space group", "structures"], [(k, str(c)) for k, c in items[:top]])
    return "\n".join(lines)


def _table(columns: Sequence[str], rows: Sequence[Sequence[str]], header: bool = True) -> list[str]:
    """Aligned plain-text rows: the first column left-aligned, the others right-aligned."""
    all_rows = [tuple(columns)] + [tuple(r) for r in rows]
    widths = [max(len(str(r[i])) for r in all_rows) for i in range(len(columns))]

    def fmt(r: Sequence[str]) -> str:
        cells = [str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths))]
        return ("  " + "  ".join(cells)).rstrip()

    return ([fmt(columns)] if header else []) + [fmt(r) for r in rows]
