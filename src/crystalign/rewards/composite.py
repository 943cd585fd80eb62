"""Weighted sum of rewards: R = Σ_j w_j R_j.

Zero-weight terms do not enter the sum; they are computed only when ``monitor`` is on and skipped otherwise, so an
expensive monitor costs nothing in training. The RL loop validates with :meth:`CompositeReward.monitoring`, a copy
with ``monitor`` on, so zero-weight terms are skipped in training and computed (and logged) in validation
(method.md §3.9).

Info keys are ``"<term>/<key>"`` plus ``"<term>/reward"``, so terms never collide, and ``"valid"`` (0/1): 0 where
a *weighted* term's own ``valid`` key is 0 (a zero-weight term cannot make the sum invalid); absent when no weighted
term reports validity.

Example::

    reward = CompositeReward([("energy", EnergyReward(), 1.0), ("sym", NonTriclinicReward(), 0.0)])
    validation = reward.monitoring()   # also computes "sym"; reward itself still skips it
    validation(batch).info["sym/non_triclinic"]
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch

from crystalign.rewards.base import Reward, RewardResult, as_batch

if TYPE_CHECKING:  # pragma: no cover
    from pymatgen.core import Structure

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

    @staticmethod
    def parse_term(term: Any, where: str) -> tuple[str | None, dict[str, Any], float]:
        """``(name, reward spec, weight)`` of one config term ``{"kind": ..., "weight": w, "name": n, ...kwargs}``."""
        if not isinstance(term, Mapping):
            raise ValueError(f"{where}: expected a mapping with 'kind' and 'weight'")
        if "weight" not in term:
            raise ValueError(f"{where}: missing required key 'weight'")
        try:
            weight = float(term["weight"])
        except (TypeError, ValueError):
            raise ValueError(f"{where}.weight: expected a number, got {term['weight']!r}") from None
        return term.get("name"), {k: v for k, v in term.items() if k not in ("weight", "name")}, weight

    @classmethod
    def from_spec(cls, terms: Sequence[Mapping[str, Any]], monitor: bool = False, where: str = "reward") -> "CompositeReward":
        """From config: ``terms = [{"kind": "energy", "weight": 1.0, "name": "e", ...reward kwargs}, ...]``."""
        from crystalign.rewards.base import make_reward

        if not isinstance(terms, Sequence) or isinstance(terms, (str, bytes)) or not terms:
            raise ValueError(f"{where}.terms: expected a non-empty list of reward specs")
        built = []
        for j, term in enumerate(terms):
            here = f"{where}.terms[{j}]"
            name, spec, weight = cls.parse_term(term, here)
            built.append((name, make_reward(spec, where=here), weight))
        return cls(built, monitor=monitor)

    def monitoring(self, replace: Mapping[str, Reward] | None = None) -> "CompositeReward":
        """A copy with ``monitor`` on (nested composites too) for validation. It shares the term objects (no model
        is loaded twice) except those named in ``replace`` (term name -> reward), e.g. a cRMSE term on other references."""
        replace = dict(replace or {})
        unknown = sorted(set(replace) - {name for name, _, _ in self.terms})
        if unknown:
            raise KeyError(f"no term(s) {unknown} in {self!r}")
        terms = []
        for name, reward, weight in self.terms:
            if name in replace:
                reward = replace[name]
            elif isinstance(reward, CompositeReward):
                reward = reward.monitoring()
            terms.append((name, reward, weight))
        return CompositeReward(terms, monitor=True)

    def __call__(self, batch: "CrystalBatch | Sequence[Structure]") -> RewardResult:
        batch = as_batch(batch)
        total = torch.zeros(batch.num_structures, dtype=torch.float64, device=batch.device)
        info: dict[str, torch.Tensor] = {}
        invalid: torch.Tensor | None = None
        for name, reward, weight in self.terms:
            if weight == 0.0 and not self.monitor:
                continue
            result = reward(batch)
            if weight != 0.0:
                total = total + weight * result.rewards.to(total)
                if "valid" in result.info:
                    bad = result.info["valid"].to(total) == 0
                    invalid = bad if invalid is None else invalid | bad
            info[f"{name}/reward"] = result.rewards.to(total)
            for key, value in result.info.items():
                info[f"{name}/{key}"] = value
        if invalid is not None:
            info["valid"] = (~invalid).to(total)
        return RewardResult(total, info)

    def __repr__(self) -> str:
        body = ", ".join(f"{n}×{w:g}" for n, _, w in self.terms)
        return f"CompositeReward({body}, monitor={self.monitor})"
