"""Weighted sum of rewards: R = Σ_j w_j R_j.

Zero-weight terms do not enter the sum; they are computed only when ``monitor`` is on (e.g. during validation, to
watch a metric without optimising it) and skipped otherwise, so an expensive monitor costs nothing in training.
Info keys are ``"<term>/<key>"`` plus ``"<term>/reward"``, so terms never collide.

Example::

    reward = CompositeReward([("energy", EnergyReward(), 1.0), ("sym", NonTriclinicReward(), 0.0)])
    reward.monitor = True        # validation: also compute "sym"
    reward(batch).info["sym/non_triclinic"]
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch

from crystalign.rewards.base import Reward, RewardResult

if TYPE_CHECKING:  # pragma: no cover
    from crystalign.crystal import CrystalBatch


class CompositeReward:
    """Weighted sum of named terms ``(name, reward, weight)``; duplicate names get ``_2``, ``_3``, ... suffixes."""

    name = "composite"

    def __init__(self, terms: Sequence[tuple[str | None, Reward, float]], monitor: bool = False) -> None:
        if not terms:
            raise ValueError("terms: a composite reward needs at least one term")
        self.terms: list[tuple[str, Reward, float]] = []
        seen: dict[str, int] = {}
        for name, reward, weight in terms:
            base = name or getattr(reward, "name", None) or type(reward).__name__.lower()
            seen[base] = seen.get(base, 0) + 1
            unique = base if seen[base] == 1 else f"{base}_{seen[base]}"
            self.terms.append((unique, reward, float(weight)))
        self.monitor = monitor

    @classmethod
    def from_spec(cls, terms: Sequence[Mapping[str, Any]], monitor: bool = False, where: str = "reward") -> "CompositeReward":
        """From config: ``terms = [{"kind": "energy", "weight": 1.0, "name": "e", ...reward kwargs}, ...]``."""
        from crystalign.rewards.base import make_reward

        if not isinstance(terms, Sequence) or isinstance(terms, (str, bytes)) or not terms:
            raise ValueError(f"{where}.terms: expected a non-empty list of reward specs")
        built = []
        for j, term in enumerate(terms):
            here = f"{where}.terms[{j}]"
            if not isinstance(term, Mapping):
                raise ValueError(f"{here}: expected a mapping with 'kind' and 'weight'")
            if "weight" not in term:
                raise ValueError(f"{here}: missing required key 'weight'")
            spec = {k: v for k, v in term.items() if k not in ("weight", "name")}
            try:
                weight = float(term["weight"])
            except (TypeError, ValueError):
                raise ValueError(f"{here}.weight: expected a number, got {term['weight']!r}") from None
            built.append((term.get("name"), make_reward(spec, where=here), weight))
        return cls(built, monitor=monitor)

    def __call__(self, batch: "CrystalBatch") -> RewardResult:
        total = torch.zeros(batch.num_structures, dtype=torch.float64, device=batch.device)
        info: dict[str, torch.Tensor] = {}
        for name, reward, weight in self.terms:
            if weight == 0.0 and not self.monitor:
                continue
            result = reward(batch)
            if weight != 0.0:
                total = total + weight * result.rewards.to(total)
            info[f"{name}/reward"] = result.rewards.to(total)
            for key, value in result.info.items():
                info[f"{name}/{key}"] = value
        return RewardResult(total, info)

    def __repr__(self) -> str:
        body = ", ".join(f"{n}×{w:g}" for n, _, w in self.terms)
        return f"CompositeReward({body}, monitor={self.monitor})"
