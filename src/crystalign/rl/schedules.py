r"""Exploration noise schedules :math:`\sigma(t)` of the RL policy.

One Euler–Maruyama step from the left grid time :math:`t` draws
:math:`\Delta x \sim \mathcal N(\mu, \sigma(t)^2 \Delta t)` per dimension, so :math:`\sigma` plays the role of the
base SDE's :math:`\sqrt{2\varepsilon(t)}`. Every schedule maps a time tensor to a tensor of the same shape.

* :class:`ConstantNoise`  :math:`\sigma(t) = a`
* :class:`SqrtNoise`      :math:`\sigma(t) = a\sqrt{(1-t)/t}` (Flow-GRPO's schedule with time reversed; :math:`a = \sigma(1/2)`)
* :class:`MLPNoise`       :math:`\sigma(t) = \max\big(\sigma_0 + \operatorname{softplus}(f_\phi(t)) - \ln 2,\ \sigma_{\min}\big)`
  with a zero-initialised output layer, so :math:`\sigma \equiv \sigma_0` at the start.

``learnable`` says whether the schedule has trainable parameters (only then is an entropy bonus meaningful).

Example::

    sigma = build_noise_schedule({"kind": "sqrt", "a": 0.1668})
    sigma(torch.tensor([0.001, 0.5]))        # tensor([5.2723, 0.1668])
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import nn

from crystalign.config import ConfigError

__all__ = [
    "NoiseSchedule",
    "ConstantNoise",
    "SqrtNoise",
    "MLPNoise",
    "time_mlp",
    "build_noise_schedule",
    "MIN_SIGMA",
]

#: Floor for learnable schedules: log-probs and the KL divide by sigma.
MIN_SIGMA = 1e-4


def time_mlp(hidden: int, n_hidden_layers: int, out_features: int, zero_init_output: bool = True) -> nn.Sequential:
    """Linear(1,h)–SiLU–[Linear(h,h)–SiLU]×n–Linear(h,out); a scalar-time MLP, output zero-initialised by default."""
    layers: list[nn.Module] = [nn.Linear(1, hidden), nn.SiLU()]
    for _ in range(n_hidden_layers):
        layers += [nn.Linear(hidden, hidden), nn.SiLU()]
    out = nn.Linear(hidden, out_features)
    if zero_init_output:
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
    layers.append(out)
    return nn.Sequential(*layers)


class NoiseSchedule(nn.Module):
    """Base class: ``forward(t) -> sigma`` elementwise, same shape and dtype as ``t``."""

    kind: str = ""

    def __init__(self, learnable: bool = False) -> None:
        super().__init__()
        self.learnable = bool(learnable)

    @property
    def is_zero(self) -> bool:
        """True when sigma is identically 0: the step is then the deterministic mean, with no log-prob."""
        return False

    def to_config(self) -> dict[str, Any]:  # pragma: no cover - overridden
        return {"kind": self.kind}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.to_config().items() if k != "kind")


def _as_time(t: torch.Tensor | float) -> torch.Tensor:
    t = torch.as_tensor(t)
    return t if t.is_floating_point() else t.to(torch.get_default_dtype())


class _ScaledNoise(NoiseSchedule):
    """sigma(t) = a * shape(t); ``a`` is a fixed buffer, or a parameter when learnable."""

    def __init__(self, a: float, learnable: bool = False) -> None:
        super().__init__(learnable)
        if not (math.isfinite(a) and a >= 0.0):
            raise ValueError(f"{type(self).__name__}: a must be a finite number >= 0, got {a}")
        if learnable and a == 0.0:
            raise ValueError(f"{type(self).__name__}: a learnable schedule needs a > 0")
        # a fixed amplitude stays a Python float so float64 runs see exactly the configured value
        self.a: nn.Parameter | float = nn.Parameter(torch.tensor(float(a))) if learnable else float(a)

    @property
    def is_zero(self) -> bool:
        return not self.learnable and self.a == 0.0

    def shape(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, t: torch.Tensor | float) -> torch.Tensor:
        t = _as_time(t)
        if not self.learnable:
            return self.a * self.shape(t)
        # a learnable amplitude could be driven through zero by the optimiser
        return (self.a.to(t) * self.shape(t)).clamp_min(MIN_SIGMA)

    def to_config(self) -> dict[str, Any]:
        return {"kind": self.kind, "a": float(self.a), "learnable": self.learnable}


class ConstantNoise(_ScaledNoise):
    r""":math:`\sigma(t) = a`."""

    kind = "constant"

    def shape(self, t: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(t)


class SqrtNoise(_ScaledNoise):
    r""":math:`\sigma(t) = a\sqrt{(1-t)/t}`: loud near the noise end :math:`t \to 0`, silent at the data end.

    With :math:`a = 0.16681` and :math:`t_0 = 10^{-3}`, :math:`\sigma(t_0) \approx 5.27`, so the first step
    effectively re-draws the positions; :math:`\sigma(0.979) \approx 0.025`.
    """

    kind = "sqrt"

    def shape(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sqrt((1.0 - t) / t)


class MLPNoise(NoiseSchedule):
    r""":math:`\sigma(t) = \max\big(\sigma_0 + \operatorname{softplus}(f_\phi(t)) - \ln 2,\ \sigma_{\min}\big)`.

    :math:`f_\phi`: Linear(1,h)–SiLU–[Linear(h,h)–SiLU]×n–Linear(h,1) with a zero-initialised output layer, so
    :math:`\operatorname{softplus}(0) = \ln 2` and :math:`\sigma \equiv \sigma_0` at initialisation. Without the
    floor :math:`\sigma` reaches :math:`\sigma_0 - \ln 2 < 0` when :math:`\sigma_0 < \ln 2` and
    :math:`f_\phi \to -\infty`; the floor has zero gradient, so a clamped sigma stays put rather than flipping sign.
    """

    kind = "mlp"

    def __init__(
        self,
        sigma0: float,
        hidden: int = 64,
        n_hidden_layers: int = 2,
        learnable: bool = True,
        min_sigma: float = MIN_SIGMA,
    ) -> None:
        super().__init__(learnable)
        if not (math.isfinite(sigma0) and sigma0 > 0.0):
            raise ValueError(f"MLPNoise: sigma0 must be a positive number, got {sigma0}")
        if not min_sigma > 0.0:
            raise ValueError(f"MLPNoise: min_sigma must be > 0, got {min_sigma}")
        self.sigma0 = float(sigma0)
        self.hidden = int(hidden)
        self.n_hidden_layers = int(n_hidden_layers)
        self.min_sigma = float(min_sigma)
        self.net = time_mlp(hidden, n_hidden_layers, 1)
        self.requires_grad_(self.learnable)

    def forward(self, t: torch.Tensor | float) -> torch.Tensor:
        t = _as_time(t)
        w = self.net[0].weight
        raw = self.net(t.to(device=w.device, dtype=w.dtype).unsqueeze(-1)).squeeze(-1).to(t)
        sigma = self.sigma0 + nn.functional.softplus(raw) - math.log(2.0)
        return sigma.clamp_min(self.min_sigma)

    def to_config(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "sigma0": self.sigma0,
            "hidden": self.hidden,
            "n_hidden_layers": self.n_hidden_layers,
            "learnable": self.learnable,
            "min_sigma": self.min_sigma,
        }


_KINDS: dict[str, type[NoiseSchedule]] = {
    "constant": ConstantNoise,
    "sqrt": SqrtNoise,
    "mlp": MLPNoise,
}
# names used by the reference configs, accepted so their YAML can be read as is
_ALIASES = {"ConstantNoiseSchedule": "constant", "SqrtNoiseSchedule": "sqrt", "MLPNoiseSchedule": "mlp"}
_ARGS = {
    "constant": {"a", "learnable"},
    "sqrt": {"a", "learnable"},
    "mlp": {"sigma0", "hidden", "n_hidden_layers", "learnable", "min_sigma"},
}


def build_noise_schedule(config: Mapping[str, Any] | NoiseSchedule, where: str = "noise") -> NoiseSchedule:
    """Schedule from ``{"kind": "constant"|"sqrt"|"mlp", ...arguments}``; an existing schedule is returned as is.

    Unknown kinds or arguments raise :class:`~crystalign.config.ConfigError` naming the key.
    """
    if isinstance(config, NoiseSchedule):
        return config
    if not isinstance(config, Mapping):
        raise ConfigError(f"{where}: expected a mapping with a 'kind', got {type(config).__name__}")
    args = dict(config)
    kind = args.pop("kind", None)
    kind = _ALIASES.get(kind, kind)
    if kind not in _KINDS:
        raise ConfigError(f"{where}.kind: {kind!r} is not one of {', '.join(sorted(_KINDS))}")
    unknown = sorted(set(args) - _ARGS[kind])
    if unknown:
        raise ConfigError(f"{where}: unknown argument(s) {', '.join(map(repr, unknown))} for kind {kind!r}; "
                          f"allowed: {', '.join(sorted(_ARGS[kind]))}")
    try:
        return _KINDS[kind](**args)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from None
