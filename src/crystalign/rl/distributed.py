"""What the RL trainer and its checkpoints need from ``torch.distributed``: this process's rank and the
number of processes, and one log row for the whole batch from every rank's row."""

from __future__ import annotations

import math
from typing import Any

import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """(rank, number of processes); (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def merge_rank_rows(row: dict[str, Any], world: int, weight: float = 1.0) -> dict[str, Any]:
    """One log row for the whole batch from every rank's row (ranks hold equal shards of the GRPO groups):
    ``*_min``/``*_max`` take the extreme, other numbers the mean over ranks weighted by ``weight`` (each rank's
    number of structures: exact for means and fractions over all structures; for means over valid structures
    only, and for ``*_std``, the weighted mean of the ranks' values).
    Keys a rank lacks (e.g. no valid structure there) are merged over the ranks that have them; timings stay
    each rank's own."""
    rows: list[Any] = [None] * world
    dist.all_gather_object(rows, {**row, "__weight": weight})
    merged = dict(row)
    for key in dict.fromkeys(k for r in rows for k in r if k != "__weight"):  # every rank's keys, in order
        value = next(r[key] for r in rows if key in r)
        if key.startswith("time_") or key == "iteration" or isinstance(value, bool) or not isinstance(value, (int, float)):
            merged.setdefault(key, value)
            continue
        pairs = [(float(r[key]), float(r["__weight"])) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(float(r[key]))]
        if not pairs or sum(w for _, w in pairs) <= 0:
            merged[key] = float("nan")  # the same keys on every rank
            continue
        values = [v for v, _ in pairs]
        mean = sum(v * w for v, w in pairs) / sum(w for _, w in pairs)
        merged[key] = min(values) if key.endswith("_min") else max(values) if key.endswith("_max") else mean
    return merged
