r"""Latent noise scales :math:`\gamma(t)` of the stochastic interpolant :math:`x_t = I(t) + \gamma(t)\,z`.

Every :math:`\gamma` vanishes at both ends, :math:`\gamma(0) = \gamma(1) = 0`. When :math:`\dot\gamma` is singular
at the ends the velocity target has unbounded variance there and the b-loss must use antithetic pairs
:math:`x_t^\pm = I \pm \gamma z` (``requires_antithetic``).

Example::

    gamma = LatentGammaSqrt(a=0.0492)
    g, dg = gamma(torch.tensor([0.5]))
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import torch

from crystalign.interpolants.paths import _check_switch, encoder_decoder_switch

__all__ = ["Gamma", "NoGamma", "LatentGammaSqrt", "LatentGammaEncoderDecoder"]


class Gamma(ABC):
    """:math:`\\gamma(t)` and :math:`\\dot\\gamma(t)`, elementwise on a time tensor."""

    name: str = ""
    #: whether the b-loss needs the antithetic pair (singular :math:`\dot\gamma` at the ends)
    requires_antithetic: bool = False

    @abstractmethod
    def gamma(self, t: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def d_gamma(self, t: torch.Tensor) -> torch.Tensor: ...

    @property
    def is_zero(self) -> bool:
        """True when there is no latent noise at all (z is then not drawn)."""
        return False

    def __call__(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gamma(t), self.d_gamma(t)

    def to_config(self) -> dict[str, Any]:
        return {"kind": self.name}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.to_config().items() if k != "kind")
        return f"{type(self).__name__}({args})"


class NoGamma(Gamma):
    """:math:`\\gamma \\equiv 0`: a deterministic interpolant."""

    name = "none"

    @property
    def is_zero(self) -> bool:
        return True

    def gamma(self, t: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(t)

    def d_gamma(self, t: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(t)


class LatentGammaSqrt(Gamma):
    r""":math:`\gamma(t) = \sqrt{a\,t(1-t)}`, :math:`\dot\gamma(t) = \dfrac{a(1-2t)}{2\sqrt{a\,t(1-t)}}`.

    :math:`\dot\gamma` diverges at :math:`t \to 0, 1`, hence antithetic sampling.
    """

    name = "sqrt"
    requires_antithetic = True

    def __init__(self, a: float = 1.0) -> None:
        if not (a > 0.0 and math.isfinite(a)):
            raise ValueError(f"LatentGammaSqrt: a must be a positive number, got {a}")
        self.a = float(a)

    def gamma(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(self.a * t * (1.0 - t))

    def d_gamma(self, t: torch.Tensor) -> torch.Tensor:
        return self.a * (1.0 - 2.0 * t) / (2.0 * self.gamma(t))

    def to_config(self) -> dict[str, Any]:
        return {"kind": self.name, "a": self.a}


class LatentGammaEncoderDecoder(Gamma):
    r""":math:`\gamma(t) = \sqrt{a}\,\sin^2(\pi f(t))`, :math:`\dot\gamma = \sqrt{a}\,\pi \sin(2\pi f)\,f'`.

    :math:`f` is the encoder-decoder time warp (:func:`~crystalign.interpolants.paths.encoder_decoder_switch`);
    :math:`\gamma` peaks at :math:`\sqrt a` at the switch time, where the encoder-decoder path is pure noise.
    For the defaults :math:`\gamma = \sin^2(\pi t)`. :math:`\dot\gamma` is bounded, so no antithetic pairs.
    """

    name = "encoder_decoder"

    def __init__(self, a: float = 1.0, switch_time: float = 0.5, power: float = 1.0) -> None:
        if not (a > 0.0 and math.isfinite(a)):
            raise ValueError(f"LatentGammaEncoderDecoder: a must be a positive number, got {a}")
        _check_switch(switch_time, power, type(self).__name__)
        self.a = float(a)
        self.switch_time = float(switch_time)
        self.power = float(power)

    def gamma(self, t: torch.Tensor) -> torch.Tensor:
        f, _ = encoder_decoder_switch(t, self.switch_time, self.power)
        return math.sqrt(self.a) * torch.sin(math.pi * f) ** 2

    def d_gamma(self, t: torch.Tensor) -> torch.Tensor:
        f, df = encoder_decoder_switch(t, self.switch_time, self.power)
        return math.sqrt(self.a) * math.pi * torch.sin(2.0 * math.pi * f) * df

    def to_config(self) -> dict[str, Any]:
        return {"kind": self.name, "a": self.a, "switch_time": self.switch_time, "power": self.power}
