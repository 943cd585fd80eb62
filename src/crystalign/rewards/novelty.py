"""A novelty penalty for search: an inner reward minus a fixed cost for structures already found.

Per-query RL in ``predict`` ranks every structure it scores; a structure that repeats one already found (the
benchmark StructureMatcher) adds nothing to that ranking, because it relaxes into the same minimum. This wrapper
keeps an archive of every distinct valid structure seen so far (the base candidates can seed it) and subtracts
``penalty`` from the reward of each repeat, so the policy is paid for lower energies in basins it has not found yet.

Example::

    reward = NoveltyReward(EnergyReward(backend), penalty=0.25)
    reward.add(base_candidates, base_energies)      # what the archive starts from
    result = reward(batch)                          # result.info["duplicate"]: 1 for a repeat
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from crystalign.crystal import CrystalBatch
from crystalign.rewards.base import RewardResult


class NoveltyReward:
    """``inner``'s reward minus ``penalty`` for each structure that matches an archived one.

    ``penalty``: in the inner reward's units (eV/atom for the energy reward). Structures are compared only with archived
    ones of the same reduced formula whose ``energy_key`` lies within ``energy_window`` (a cheap filter before the
    matcher: copies of one structure differ little in energy). Within a batch, structures are taken lowest energy
    first, so the best member of a new cluster is the one archived and the others pay. Info keys: the inner
    reward's, plus ``duplicate`` (0/1) and ``archive_size``.
    """

    def __init__(self, inner: Any, penalty: float, energy_key: str = "energy_per_atom_ev", energy_window: float = 0.3):
        if not penalty > 0:
            raise ValueError(f"novelty penalty must be > 0, got {penalty}")
        from crystalign.matching import make_matcher

        self.inner = inner
        self.penalty = float(penalty)
        self.energy_key = energy_key
        self.energy_window = float(energy_window)
        self.name = f"{getattr(inner, 'name', type(inner).__name__)}+novelty({self.penalty:g})"
        self._matcher = make_matcher()
        self._archive: dict[str, list[tuple[float, Any]]] = {}  # reduced formula -> (energy, structure)

    @property
    def archive_size(self) -> int:
        return sum(len(v) for v in self._archive.values())

    def add(self, batch: CrystalBatch, energies: torch.Tensor) -> torch.Tensor:
        """Archive the distinct structures of ``batch`` (NaN energy: invalid, skipped); returns 1.0 for each that
        repeats an archived one (or a lower-energy one of this batch), else 0.0."""
        e = np.asarray(energies.detach().cpu().double(), dtype=float)
        structures = batch.to("cpu").to_structures()
        duplicate = np.zeros(len(structures))
        for i in np.argsort(np.where(np.isfinite(e), e, np.inf), kind="stable"):
            if not np.isfinite(e[i]):
                continue
            s = structures[i]
            bucket = self._archive.setdefault(s.composition.reduced_formula, [])
            near = [t for energy, t in bucket if abs(energy - e[i]) <= self.energy_window]
            if any(self._matcher.fit(s, t) for t in near):
                duplicate[i] = 1.0
            else:
                bucket.append((float(e[i]), s))
        return torch.as_tensor(duplicate, dtype=torch.float64)

    def __call__(self, batch: CrystalBatch) -> RewardResult:
        result = self.inner(batch)
        if self.energy_key not in result.info:
            raise KeyError(f"novelty penalty: the inner reward {self.inner!r} reports no {self.energy_key!r}")
        duplicate = self.add(batch, result.info[self.energy_key])
        rewards = result.rewards.double() - self.penalty * duplicate.to(result.rewards.device)
        info = {**result.info, "duplicate": duplicate.to(result.rewards.device), "archive_size": torch.full_like(duplicate, self.archive_size).to(result.rewards.device)}
        return RewardResult(rewards.to(result.rewards.dtype), info)
