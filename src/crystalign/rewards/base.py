"""The reward interface, user-callable rewards and the config factory.

A reward maps a :class:`~crystalign.crystal.CrystalBatch` of B structures (or pymatgen Structures, e.g. what
``Generator.sample_compositions`` returns) to a :class:`RewardResult`: a (B,)
float64 tensor that RL *maximises*, plus per-structure diagnostics. Every diagnostic is a (B,) float64 tensor
(flags are 0/1, quantities that do not exist for a structure are NaN), so callers can log
``nanmean`` of any key without special cases.

Example::

    reward = make_reward({"kind": "energy", "backend": "sevenn"})
    result = reward(batch)
    result.rewards, result.info["energy_per_atom_ev"]
"""

from __future__ import annotations

import importlib
import inspect
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from crystalign.geometry import ValidityThresholds

if TYPE_CHECKING:  # pragma: no cover
    from pymatgen.core import Structure

    from crystalign.crystal import CrystalBatch


@dataclass
class RewardResult:
    """``rewards`` (B,) to maximise and ``info``: name -> (B,) per-structure diagnostics."""

    rewards: torch.Tensor
    info: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.rewards.dim() != 1:
            raise ValueError(f"rewards must have shape (B,), got {tuple(self.rewards.shape)}")
        n = self.rewards.shape[0]
        for key, value in self.info.items():
            if value.shape != (n,):
                raise ValueError(f"info[{key!r}] must have shape ({n},), got {tuple(value.shape)}")

    def summary(self) -> dict[str, float]:
        """Batch means for logging: ``reward_mean`` plus the NaN-ignoring mean of every info key."""
        out = {"reward_mean": float(self.rewards.double().mean())}
        for key, value in self.info.items():
            finite = value[~torch.isnan(value)]
            out[key] = float(finite.double().mean()) if finite.numel() else math.nan
        return out


@runtime_checkable
class Reward(Protocol):
    """Anything with a ``name`` that maps a CrystalBatch to a :class:`RewardResult`.

    A reward written outside crystalign subclasses this class (``class MyReward(Reward): ...``) so that
    :func:`crystalign.steer` calls it with a CrystalBatch; any other callable is called with Structures."""

    name: str

    def __call__(self, batch: "CrystalBatch") -> RewardResult: ...


def as_batch(structures: "CrystalBatch | Structure | Sequence[Structure]") -> "CrystalBatch":
    """A reward's input as a CrystalBatch: a batch as is, or pymatgen Structures (what ``Generator.sample_compositions``
    returns) converted; anything else is a TypeError naming what was given."""
    from pymatgen.core import Structure

    from crystalign.crystal import CrystalBatch

    if isinstance(structures, CrystalBatch):
        return structures
    if isinstance(structures, Structure):
        structures = [structures]
    if isinstance(structures, (list, tuple)) and structures and all(isinstance(s, Structure) for s in structures):
        return CrystalBatch.from_structures(list(structures))
    raise TypeError(f"a reward takes a CrystalBatch or pymatgen Structures, got {type(structures).__name__}")


def is_reward(obj: Any) -> bool:
    """A crystalign reward (batch -> RewardResult): one of ours, or a class that subclasses :class:`Reward`.
    Any other callable is a plain function of pymatgen Structures, even if it happens to have a ``name``."""
    mro = type(obj).__mro__
    return isinstance(obj, Reward) and (Reward in mro or any(c.__module__.startswith("crystalign.") for c in mro))


def preload(reward: Any) -> None:
    """Load the potentials ``reward`` evaluates with (its own and its composite terms') now, so that a bad or missing
    model file fails before the first rollout instead of minutes into a run."""
    from crystalign.rewards.mlip import MLIPBackend

    backend = getattr(reward, "backend", None)
    if isinstance(backend, MLIPBackend):
        backend.load()
    for _, term, _ in getattr(reward, "terms", ()):
        preload(term)


def as_tensor(values: Any, like: "CrystalBatch") -> torch.Tensor:
    """A (B,) float64 tensor on the batch's device."""
    return torch.as_tensor(np.asarray(values, dtype=np.float64), device=like.device)


def coerce_thresholds(value: ValidityThresholds | Mapping[str, float] | None) -> ValidityThresholds:
    if value is None:
        return ValidityThresholds()
    if isinstance(value, ValidityThresholds):
        return value
    if isinstance(value, Mapping):
        allowed = set(ValidityThresholds.__dataclass_fields__)
        unknown = sorted(set(value) - allowed)
        if unknown:
            raise ValueError(f"thresholds: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
        return ValidityThresholds(**value)
    raise TypeError(f"thresholds must be ValidityThresholds or a mapping, got {type(value).__name__}")


class CallableReward:
    """Wrap a plain function ``structures -> list of floats`` (higher is better) as a :class:`Reward`.

    Structures failing the shared validity check are not passed to ``fn`` and get ``invalid_value``;
    non-finite outputs also get ``invalid_value`` (so a crashing user metric cannot poison RL advantages).
    By default (``None``) that is the batch's lowest valid reward, so a broken structure never scores above a
    valid one whatever the sign of the objective (a fixed 0 would reward breaking structures under a negative
    objective such as -energy); with no valid structure in the batch it is 0.

    Example::

        reward = CallableReward(lambda ss: [s.density for s in ss], name="density")
        reward(batch).info["density"]
    """

    def __init__(
        self,
        fn: Callable[[list["Structure"]], Sequence[float]],
        name: str | None = None,
        invalid_value: float | None = None,
        check_validity: bool = True,
        thresholds: ValidityThresholds | Mapping[str, float] | None = None,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "callable").strip("<>") or "callable"
        self.invalid_value = None if invalid_value is None else float(invalid_value)
        self.check_validity = check_validity
        self.thresholds = coerce_thresholds(thresholds)

    def __call__(self, batch: "CrystalBatch | Sequence[Structure]") -> RewardResult:
        batch = as_batch(batch)
        b = batch.num_structures
        valid = batch.validity(self.thresholds).valid.cpu().numpy() if self.check_validity else np.ones(b, bool)
        raw = np.full(b, np.nan)
        idx = np.flatnonzero(valid)
        if idx.size:
            structures = batch[torch.as_tensor(idx, device=batch.device)].to_structures()
            out = self.fn(structures)
            try:
                values = np.asarray(out, dtype=np.float64).reshape(-1)
            except (TypeError, ValueError):
                values = None
            if out is None or values is None:
                raise TypeError(f"reward {self.name!r}: fn must return one number per structure, got {type(out).__name__} {out!r:.80}")
            if values.shape[0] != idx.size:
                raise ValueError(f"reward {self.name!r}: fn returned {values.shape[0]} values for {idx.size} structures")
            raw[idx] = values
        ok = np.isfinite(raw)
        floor = self.invalid_value if self.invalid_value is not None else (float(raw[ok].min()) if ok.any() else 0.0)
        rewards = np.where(ok, raw, floor)
        return RewardResult(as_tensor(rewards, batch), {self.name: as_tensor(raw, batch), "valid": as_tensor(ok, batch)})


# ---------------------------------------------------------------------------------------------- factory

# kind -> "module:attribute"; imported only when used so that asking for symmetry never imports an MLIP
_BUILTIN: dict[str, str] = {
    "energy": "crystalign.rewards.energy:EnergyReward",
    "e_above_hull": "crystalign.rewards.hull:EnergyAboveHullReward",
    "crmse": "crystalign.rewards.crmse:CRMSEReward",
    "non_triclinic": "crystalign.rewards.symmetry:NonTriclinicReward",
    "non_centrosymmetric": "crystalign.rewards.symmetry:NonCentrosymmetricReward",
    "composite": "crystalign.rewards.composite:CompositeReward.from_spec",
    "callable": "crystalign.rewards.base:_callable_from_spec",
}
_ALIASES = {"hull": "e_above_hull", "ehull": "e_above_hull", "energy_above_hull": "e_above_hull"}
_REGISTRY: dict[str, Callable[..., Reward]] = {}


def register_reward(kind: str, factory: Callable[..., Reward]) -> None:
    """Make ``{"kind": kind, **kwargs}`` build ``factory(**kwargs)`` in :func:`make_reward`."""
    kind = kind.lower()
    if kind in _BUILTIN or kind in _ALIASES:
        raise ValueError(f"reward kind {kind!r} is built in and cannot be replaced")
    _REGISTRY[kind] = factory


def available_rewards() -> list[str]:
    return sorted({*_BUILTIN, *_REGISTRY})


def _import_path(path: str) -> Any:
    module, _, attr = path.partition(":")
    if not attr:
        raise ValueError(f"expected 'package.module:function', got {path!r}")
    # a misspelt user spec is a config mistake: say what is missing instead of an import traceback
    try:
        obj: Any = importlib.import_module(module)
    except ImportError as err:
        missing = getattr(err, "name", None)
        own = missing is not None and (module == missing or module.startswith(missing + "."))
        why = f"module {module!r} not found ({err})" if own else f"importing module {module!r} failed: {err}"
        raise ValueError(f"cannot import {path!r}: {why} (is it installed or on PYTHONPATH?)") from None
    for i, part in enumerate(attr.split(".")):
        if not hasattr(obj, part):
            owner = ".".join([module, *attr.split(".")[:i]])
            raise ValueError(f"cannot import {path!r}: {owner!r} has no attribute {part!r}")
        obj = getattr(obj, part)
    return obj


def _callable_from_spec(fn: str | Callable, **kwargs: Any) -> CallableReward:
    return CallableReward(_import_path(fn) if isinstance(fn, str) else fn, **kwargs)


def make_reward(spec: str | Mapping[str, Any] | Reward, where: str = "reward") -> Reward:
    """Build a reward from a config value.

    ``spec`` is a kind (``"energy"``), a mapping ``{"kind": ..., **constructor kwargs}``, or already a reward.
    Composite: ``{"kind": "composite", "terms": [{"kind": "energy", "weight": 1.0}, ...], "monitor": false}``.
    Errors name the offending key path (``where``).
    """
    if isinstance(spec, str):
        spec = {"kind": spec}
    elif not isinstance(spec, Mapping):
        if callable(spec) and hasattr(spec, "name"):
            return spec  # type: ignore[return-value]
        raise TypeError(f"{where}: expected a kind name or a mapping with a 'kind' key, got {type(spec).__name__}")
    if "kind" not in spec:
        raise ValueError(f"{where}: missing required key 'kind' (one of {', '.join(available_rewards())})")
    kind = str(spec["kind"]).lower()
    kind = _ALIASES.get(kind, kind)
    kwargs = {k: v for k, v in spec.items() if k != "kind"}
    if kind in _REGISTRY:
        factory = _REGISTRY[kind]
    elif kind in _BUILTIN:
        factory = _import_path(_BUILTIN[kind])
    else:
        raise ValueError(f"{where}.kind: unknown reward kind {spec['kind']!r}; known: {', '.join(available_rewards())}")
    _check_kwargs(factory, kwargs, f"{where} ({kind})")
    if kind == "composite":
        kwargs["where"] = where
    try:
        return factory(**kwargs)
    except (TypeError, ValueError) as err:
        if str(err).startswith(where):
            raise
        raise ValueError(f"{where} ({kind}): {err}") from err


def _check_kwargs(factory: Callable[..., Any], kwargs: Mapping[str, Any], where: str) -> None:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # builtins without a signature: let the call raise
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    allowed = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n != "where"]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(allowed)}")
    missing = [
        n for n, p in params.items()
        if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in kwargs
    ]
    if missing:
        raise ValueError(f"{where}: missing required key(s) {', '.join(map(repr, missing))}")
