r"""Masked discrete flow matching for the species of de novo (DNG) models (Campbell et al. 2024).

Species are tokens: atomic numbers 1..100, and 0 for the MASK token. The base distribution masks every atom; at time
t each token of the data is revealed (unmasked) independently with probability t:

.. math::
    x_t^i = x_1^i \text{ with probability } t, \qquad x_t^i = \mathrm{MASK} \text{ otherwise}.

The network predicts logits over the 100 elements for every atom, in the same call that gives the position and
lattice velocities; the loss is the cross-entropy of those logits against :math:`x_1 - 1` (method.md §2.4).

Sampling (one network call per step, shared with the continuous fields), from the current tokens :math:`x_t`:

* draw :math:`\hat x_1 \sim \mathrm{softmax}(\text{logits})` per atom;
* a masked token becomes :math:`\hat x_1` with probability :math:`\Delta t\,(1 + \eta t)/(1 - t)`;
* an unmasked token is re-masked with probability :math:`\Delta t\,\eta` (η = ``noise``: lets early choices be
  revised);
* at the last step every token still masked is unmasked.

Example::

    species = MaskedSpecies(noise=0.1)
    x_t = species.interpolate(t[batch], x1.species)
    loss = species.loss(out["species_b"], x1.species)
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from crystalign.config import ConfigError

#: The token of a species not yet generated.
MASK = 0


class MaskedSpecies:
    """Species interpolant and integrator of a DNG model; ``noise`` is the re-masking rate η ≥ 0."""

    def __init__(self, noise: float = 0.0) -> None:
        if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not math.isfinite(noise) or noise < 0:
            raise ValueError(f"species noise must be a finite number >= 0, got {noise!r}")
        self.noise = float(noise)

    def interpolate(self, t_atom: torch.Tensor, x1: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Tokens at time ``t_atom`` (N,): each data species kept with probability t, else MASK."""
        if x1.numel() and int(x1.min()) < 1:
            raise ValueError("data species must be atomic numbers >= 1 (0 is the MASK token)")
        keep = _uniform(x1.shape, generator, x1.device) < t_atom.double()
        return torch.where(keep, x1, torch.full_like(x1, MASK))

    @staticmethod
    def loss(logits: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the (N, 100) logits against the data species (class index Z - 1), mean over atoms."""
        if logits.dim() != 2 or logits.shape[0] != x1.shape[0]:
            raise ValueError(f"species logits have shape {tuple(logits.shape)}, expected ({x1.shape[0]}, 100)")
        return F.cross_entropy(logits.float(), x1 - 1)

    def step(
        self,
        x_t: torch.Tensor,
        logits: torch.Tensor,
        t: float,
        dt: float,
        last: bool = False,
        generator: torch.Generator | None = None,
        allowed: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Tokens after one step of size ``dt`` from time ``t``; ``last`` unmasks everything still masked.
        ``allowed``: a (100,) bool mask of the elements that may be drawn (Z - 1), the others get probability 0."""
        logits = logits.double()
        if allowed is not None:
            logits = logits.masked_fill(~allowed.to(logits.device), float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        x1_hat = _multinomial(probs, generator) + 1
        masked = x_t == MASK
        if last:
            return torch.where(masked, x1_hat, x_t)
        u = _uniform(x_t.shape, generator, x_t.device)
        p_unmask = min(1.0, dt * (1.0 + self.noise * t) / max(1.0 - t, 1e-12))
        p_remask = min(1.0, dt * self.noise)
        unmask = masked & (u < p_unmask)
        remask = ~masked & (u < p_remask)
        out = torch.where(unmask, x1_hat, x_t)
        return torch.where(remask, torch.full_like(out, MASK), out)

    def to_config(self) -> dict[str, Any]:
        return {"kind": "mask", "noise": self.noise}

    @classmethod
    def from_config(cls, config: Mapping[str, Any], where: str = "species") -> "MaskedSpecies":
        if not isinstance(config, Mapping):
            raise ConfigError(f"{where}: expected a mapping such as {{kind: mask, noise: 0.1}}, got {type(config).__name__}")
        unknown = sorted(set(config) - {"kind", "noise"})
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; allowed: kind, noise")
        kind = config.get("kind", "mask")
        if kind != "mask":
            raise ConfigError(f"{where}.kind: unknown {kind!r}; allowed: mask (masked discrete flow matching)")
        try:
            return cls(config.get("noise", 0.0))
        except ValueError as err:
            raise ConfigError(f"{where}.noise: {err}") from None

    def __repr__(self) -> str:
        return f"MaskedSpecies(noise={self.noise})"


def _uniform(shape: torch.Size, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    # drawn on the generator's device (a CPU generator drives GPU sampling too), then moved
    return torch.rand(shape, generator=generator, dtype=torch.float64).to(device) if generator is not None else torch.rand(shape, dtype=torch.float64, device=device)


def _multinomial(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    if generator is not None and probs.device.type != "cpu":
        return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(probs.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
