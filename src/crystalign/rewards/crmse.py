"""cRMSE reward: how close a structure is to the nearest reference of the same reduced composition.

cRMSE = min over references with the same reduced formula of the StructureMatcher RMS distance (normalised by
(V/N)^(1/3), benchmark tolerances); non-matches, missing references and invalid structures count as ``stol``.
R = scale · (stol − cRMSE), so 0 means "no match" and ``stol · scale`` a perfect one.

Example::

    reward = CRMSEReward("data/perov_5/train.csv")       # or a list of Structures
    reward(batch).info["crmse"]
"""

from __future__ import annotations

import math

import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import torch

from crystalign.geometry import ValidityThresholds
from crystalign.matching import BENCHMARK_TOLERANCES, make_matcher
from crystalign.rewards.base import RewardResult, as_batch, as_tensor, coerce_thresholds

if TYPE_CHECKING:  # pragma: no cover
    from pymatgen.core import Structure

    from crystalign.crystal import CrystalBatch

# set in each worker process once, so references are pickled once per pool rather than once per task
_WORKER_INDEX: dict[str, list["Structure"]] | None = None
_WORKER_MATCHER: Any = None


def _init_worker(index: dict[str, list["Structure"]], matcher_kwargs: dict[str, Any]) -> None:
    global _WORKER_INDEX, _WORKER_MATCHER
    _WORKER_INDEX = index
    _WORKER_MATCHER = make_matcher(**matcher_kwargs)


def _min_rms_in_worker(structure: "Structure") -> float:
    assert _WORKER_INDEX is not None
    return min_rms(structure, _WORKER_INDEX.get(structure.composition.reduced_formula, []), _WORKER_MATCHER)


def min_rms(structure: "Structure", references: Sequence["Structure"], matcher: Any) -> float:
    """Smallest normalised RMS distance to any matching reference; NaN if none matches."""
    best = float("inf")
    for ref in references:
        result = matcher.get_rms_dist(structure, ref)
        if result is not None:
            best = min(best, float(result[0]))
    return best if best < float("inf") else float("nan")


class CRMSEReward:
    """R = scale · (stol − cRMSE + match_bonus · matched) against references indexed once by reduced formula.

    Args:
        references: Structures, a CrystalBatch, or a path (CSV with a ``cif`` column, CIF file/folder, extxyz; see
            :func:`crystalign.rewards.references.load_structures`).
        scale: reward scale.
        n_jobs: worker processes for matching (1 = in process). The pool is created on first use and reused.
        matcher: StructureMatcher overrides of the benchmark tolerances (``stol`` also sets the non-match value).
        match_bonus: added (times ``scale``) for every matched structure. With 0 a match at RMS 0.3 counts as
            much as tightening a match from 0.3 to 0.1, so precision can be bought with matches; a bonus of 0.5
            makes any match worth at least a perfect one's precision gain.

    Info keys: ``crmse`` (stol where unmatched or invalid), ``matched``, ``valid`` (0/1).
    """

    name = "crmse"

    def __init__(
        self,
        references: Sequence["Structure"] | str | Path,
        scale: float = 1.0,
        n_jobs: int = 1,
        matcher: Mapping[str, float] | None = None,
        thresholds: ValidityThresholds | Mapping[str, float] | None = None,
        match_bonus: float = 0.0,
    ) -> None:
        if not (isinstance(match_bonus, (int, float)) and math.isfinite(match_bonus) and match_bonus >= 0):
            raise ValueError(f"match_bonus must be a finite number >= 0, got {match_bonus!r}")
        self.match_bonus = float(match_bonus)
        if isinstance(references, (str, Path)):
            from crystalign.rewards.references import load_structures

            references = load_structures(references)[0]
        elif hasattr(references, "to_structures"):  # a CrystalBatch, e.g. load_dataset(...).batch
            references = references.to_structures()
        if len(references) == 0:
            raise ValueError("references: no reference structures given")
        self.matcher_kwargs = {**BENCHMARK_TOLERANCES, **dict(matcher or {})}
        self.stol = float(self.matcher_kwargs["stol"])
        self.matcher = make_matcher(**self.matcher_kwargs)
        self.scale = float(scale)
        self.n_jobs = max(1, int(n_jobs if n_jobs > 0 else (os.cpu_count() or 1)))
        self.thresholds = coerce_thresholds(thresholds)
        self.index: dict[str, list["Structure"]] = {}
        for ref in references:
            self.index.setdefault(ref.composition.reduced_formula, []).append(ref)
        self._pool: ProcessPoolExecutor | None = None

    def __call__(self, batch: "CrystalBatch | Sequence[Structure]") -> RewardResult:
        batch = as_batch(batch)
        b = batch.num_structures
        valid = batch.validity(self.thresholds).valid.cpu().numpy().astype(bool)
        rms = np.full(b, np.nan)
        idx = np.flatnonzero(valid)
        if idx.size:
            structures = batch[torch.as_tensor(idx, device=batch.device)].to_structures()
            # only structures with a same-formula reference need the (slow) matcher
            todo = [k for k, s in enumerate(structures) if s.composition.reduced_formula in self.index]
            values = self._match([structures[k] for k in todo])
            rms[idx[todo]] = values
        matched = np.isfinite(rms)
        crmse = np.where(matched, rms, self.stol)
        info = {"crmse": as_tensor(crmse, batch), "matched": as_tensor(matched, batch), "valid": as_tensor(valid, batch)}
        return RewardResult(as_tensor(self.scale * (self.stol - crmse + self.match_bonus * matched), batch), info)

    def _match(self, structures: list["Structure"]) -> list[float]:
        if self.n_jobs == 1 or len(structures) < 2:
            return [min_rms(s, self.index[s.composition.reduced_formula], self.matcher) for s in structures]
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.n_jobs, initializer=_init_worker, initargs=(self.index, self.matcher_kwargs))
        chunk = max(1, len(structures) // (4 * self.n_jobs))
        return list(self._pool.map(_min_rms_in_worker, structures, chunksize=chunk))

    def close(self) -> None:
        """Stop the worker processes (also done when the reward is garbage-collected)."""
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_pool"] = None  # pools do not pickle; a copy makes its own
        return state
