r"""Deterministic interpolation paths :math:`I(t, x_0, x_1) = \alpha(t)\,x_0 + \beta(t)\,x_1`.

Every path satisfies :math:`\alpha(0) = \beta(1) = 1` and :math:`\alpha(1) = \beta(0) = 0` (except
:class:`MirrorPath`, which keeps a field fixed at :math:`x_1`). All methods act elementwise on a time tensor
of any shape and return tensors of the same shape, dtype and device.

Periodicity is not a property of the path: :class:`~crystalign.interpolants.stochastic.FieldInterpolant`
applies the path to the minimum-image pair on the torus when ``periodic=True``.

Example::

    path = TrigonometricPath()
    c = path(torch.tensor([0.25]))
    x_t = c.alpha * x0 + c.beta * x1
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "PathCoefficients",
    "InterpolationPath",
    "LinearPath",
    "TrigonometricPath",
    "EncoderDecoderPath",
    "MirrorPath",
    "encoder_decoder_switch",
]


@dataclass(frozen=True)
class PathCoefficients:
    """:math:`\\alpha(t), \\beta(t)` and their time derivatives, all of the shape of ``t``."""

    alpha: torch.Tensor
    beta: torch.Tensor
    d_alpha: torch.Tensor
    d_beta: torch.Tensor


class InterpolationPath(ABC):
    """Scalar schedules :math:`\\alpha(t)`, :math:`\\beta(t)` of the interpolant :math:`\\alpha x_0 + \\beta x_1`."""

    #: name used in config dicts (``{"path": name}``)
    name: str = ""

    @abstractmethod
    def alpha(self, t: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def beta(self, t: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def d_alpha(self, t: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def d_beta(self, t: torch.Tensor) -> torch.Tensor: ...

    def __call__(self, t: torch.Tensor) -> PathCoefficients:
        return PathCoefficients(self.alpha(t), self.beta(t), self.d_alpha(t), self.d_beta(t))

    def to_config(self) -> dict[str, Any]:
        """The ``path`` entry of a field config that rebuilds this path."""
        return {"kind": self.name}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.to_config().items() if k != "kind")
        return f"{type(self).__name__}({args})"


class LinearPath(InterpolationPath):
    r""":math:`\alpha(t) = 1 - t,\ \beta(t) = t`. On the torus the velocity is the geodesic one, :math:`x_1' - x_0'`."""

    name = "linear"

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return 1.0 - t

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        return t.clone()

    def d_alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.full_like(t, -1.0)

    def d_beta(self, t: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(t)


class TrigonometricPath(InterpolationPath):
    r""":math:`\alpha(t) = \cos(\pi t / 2),\ \beta(t) = \sin(\pi t / 2)`, so :math:`\alpha^2 + \beta^2 = 1`."""

    name = "trig"

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.cos(0.5 * math.pi * t)

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sin(0.5 * math.pi * t)

    def d_alpha(self, t: torch.Tensor) -> torch.Tensor:
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * t)

    def d_beta(self, t: torch.Tensor) -> torch.Tensor:
        return 0.5 * math.pi * torch.cos(0.5 * math.pi * t)


def _check_switch(switch_time: float, power: float, owner: str) -> None:
    if not 0.0 < switch_time < 1.0:
        raise ValueError(f"{owner}: switch_time must lie in (0, 1), got {switch_time}")
    # below p = 1/2 the time derivatives diverge at t -> 0 and t -> 1
    if not power >= 0.5:
        raise ValueError(f"{owner}: power must be >= 0.5 (bounded derivatives), got {power}")


def encoder_decoder_switch(t: torch.Tensor, switch_time: float, power: float) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The time warp of the encoder-decoder family and its derivative.

    .. math::
        f(t) = \frac{((1-s)t)^p}{(s(1-t))^p + ((1-s)t)^p},\qquad
        f'(t) = \frac{p\,(s(1-s))^p\,t^{p-1}(1-t)^{p-1}}{\big[(s(1-t))^p + ((1-s)t)^p\big]^2}

    with :math:`f(0) = 0`, :math:`f(s) = 1/2`, :math:`f(1) = 1`; for :math:`s = 1/2, p = 1` it is the identity.
    """
    s, p = switch_time, power
    u = ((1.0 - s) * t) ** p
    w = (s * (1.0 - t)) ** p
    den = u + w
    f = u / den
    df = p * (s * (1.0 - s)) ** p * (t * (1.0 - t)) ** (p - 1.0) / den**2
    return f, df


class EncoderDecoderPath(InterpolationPath):
    r"""Encoder-decoder path: :math:`x_0` is "encoded" into pure noise at :math:`t = s`, then decoded into :math:`x_1`.

    .. math::
        \alpha(t) = \cos^2(\pi f(t))\,\mathbb{1}[t \le s],\qquad
        \beta(t) = \cos^2(\pi f(t))\,\mathbb{1}[t > s],\qquad
        \dot\alpha = -\pi \sin(2\pi f) f'\,\mathbb{1}[t \le s]

    with :math:`f` from :func:`encoder_decoder_switch`. :math:`\alpha(s) = \beta(s) = 0`, so pair it with a
    :math:`\gamma` that is non-zero at :math:`s`. Both schedules are :math:`C^1` at :math:`s`.
    """

    name = "encoder_decoder"

    def __init__(self, switch_time: float = 0.5, power: float = 1.0) -> None:
        _check_switch(switch_time, power, type(self).__name__)
        self.switch_time = float(switch_time)
        self.power = float(power)

    def _cos2(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f, df = encoder_decoder_switch(t, self.switch_time, self.power)
        return torch.cos(math.pi * f) ** 2, -math.pi * torch.sin(2.0 * math.pi * f) * df

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        value, _ = self._cos2(t)
        return torch.where(t <= self.switch_time, value, torch.zeros_like(value))

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        value, _ = self._cos2(t)
        return torch.where(t > self.switch_time, value, torch.zeros_like(value))

    def d_alpha(self, t: torch.Tensor) -> torch.Tensor:
        _, deriv = self._cos2(t)
        return torch.where(t <= self.switch_time, deriv, torch.zeros_like(deriv))

    def d_beta(self, t: torch.Tensor) -> torch.Tensor:
        _, deriv = self._cos2(t)
        return torch.where(t > self.switch_time, deriv, torch.zeros_like(deriv))

    def __call__(self, t: torch.Tensor) -> PathCoefficients:
        value, deriv = self._cos2(t)
        first = t <= self.switch_time
        zero = torch.zeros_like(value)
        return PathCoefficients(
            alpha=torch.where(first, value, zero),
            beta=torch.where(first, zero, value),
            d_alpha=torch.where(first, deriv, zero),
            d_beta=torch.where(first, zero, deriv),
        )

    def to_config(self) -> dict[str, Any]:
        return {"kind": self.name, "switch_time": self.switch_time, "power": self.power}


class MirrorPath(InterpolationPath):
    r""":math:`x_t = x_1` for all t (:math:`\alpha = 0, \beta = 1`): keeps a field fixed at the data value.

    It deliberately breaks :math:`\beta(0) = 0`; the velocity target is zero.
    """

    name = "mirror"

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(t)

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(t)

    def d_alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(t)

    def d_beta(self, t: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(t)
