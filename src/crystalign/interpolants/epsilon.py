r"""Diffusion coefficients :math:`\varepsilon(t)` of the SDE sampler.

The generative SDE is :math:`dx = [b - (\varepsilon/\gamma)\,\eta]\,dt + \sqrt{2\varepsilon}\,dW`, so the noise
scale is :math:`\sigma(t) = \sqrt{2\varepsilon(t)}`. Any :math:`\varepsilon \ge 0` gives the same marginals; it only
trades drift for noise.

Example::

    eps = VanishingEpsilon(c=9.4187, mu=0.19678, sigma=0.040028)
    sigma_t = torch.sqrt(2 * eps(t))
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import torch

__all__ = ["Epsilon", "ConstantEpsilon", "VanishingEpsilon"]


def _check_c(c: float, owner: str) -> None:
    if not (c >= 0.0 and math.isfinite(c)):
        raise ValueError(f"{owner}: c must be a finite number >= 0, got {c}")


class Epsilon(ABC):
    """:math:`\\varepsilon(t) \\ge 0`, elementwise on a time tensor."""

    name: str = ""

    @abstractmethod
    def __call__(self, t: torch.Tensor) -> torch.Tensor: ...

    def to_config(self) -> dict[str, Any]:
        return {"kind": self.name}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.to_config().items() if k != "kind")
        return f"{type(self).__name__}({args})"


class ConstantEpsilon(Epsilon):
    r""":math:`\varepsilon(t) = c`."""

    name = "constant"

    def __init__(self, c: float = 1.0) -> None:
        _check_c(c, type(self).__name__)
        self.c = float(c)

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return torch.full_like(t, self.c)

    def to_config(self) -> dict[str, Any]:
        return {"kind": self.name, "c": self.c}


class VanishingEpsilon(Epsilon):
    r"""A smooth box: :math:`\varepsilon(t) = c\,S\!\big(\tfrac{t-\mu}{\sigma}\big)\,S\!\big(\tfrac{1-\mu-t}{\sigma}\big)`.

    :math:`S` is the logistic sigmoid, so :math:`\varepsilon \approx c` on :math:`(\mu, 1-\mu)` and falls to ~0
    within a few :math:`\sigma` of both ends, where :math:`\varepsilon/\gamma` would otherwise blow up.
    """

    name = "vanishing"

    def __init__(self, c: float = 1.0, sigma: float = 0.01, mu: float = 0.075) -> None:
        _check_c(c, type(self).__name__)
        if not (sigma > 0.0 and math.isfinite(sigma)):
            raise ValueError(f"VanishingEpsilon: sigma must be a positive number, got {sigma}")
        if not 0.0 <= mu < 0.5:
            raise ValueError(f"VanishingEpsilon: mu must lie in [0, 0.5), got {mu}")
        self.c = float(c)
        self.sigma = float(sigma)
        self.mu = float(mu)

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return self.c * torch.sigmoid((t - self.mu) / self.sigma) * torch.sigmoid((1.0 - self.mu - t) / self.sigma)

    def to_config(self) -> dict[str, Any]:
        return {"kind": self.name, "c": self.c, "sigma": self.sigma, "mu": self.mu}
