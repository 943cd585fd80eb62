"""Parameter-free embeddings of the CSPNet: time and fractional-displacement Fourier features.

Both follow the authors' layouts exactly so that imported weights see the same input channels.

Example::

    e = sinusoidal_time_embedding(torch.rand(4), dim=256)        # (4, 256)
    phi = fourier_features(torch.rand(10, 3), num_freqs=128)      # (10, 768)
"""

from __future__ import annotations

import math

import torch
from torch import nn


def sinusoidal_time_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[sin(t ω), cos(t ω)] with ω_k = exp(-k ln(1e4) / (dim/2 - 1)), k = 0..dim/2-1; (B,) -> (B, dim).

    The raw t in [0, 1] is used (no x1000 scaling), as in the authors' network.
    """
    half = dim // 2
    k = torch.arange(half, device=t.device, dtype=t.dtype)
    freqs = torch.exp(k * (-math.log(10000.0) / (half - 1)))
    arg = t.unsqueeze(-1) * freqs
    return torch.cat([arg.sin(), arg.cos()], dim=-1)


class SinusoidalTimeEmbedding(nn.Module):
    """Module wrapper of :func:`sinusoidal_time_embedding` (no parameters, no state)."""

    def __init__(self, dim: int = 256) -> None:
        super().__init__()
        if dim < 4 or dim % 2:
            raise ValueError(f"time embedding dim must be even and >= 4, got {dim}")
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return sinusoidal_time_embedding(t, self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


def fourier_features(dx: torch.Tensor, num_freqs: int) -> torch.Tensor:
    """Fourier features of fractional displacements, (E, 3) -> (E, 6 * num_freqs).

    Frequencies 2πk, k = 0..num_freqs-1, per Cartesian component of the fractional
    displacement. Layout matches DiffCSP's ``SinusoidsEmbedding``: all sines first, then all
    cosines; within each block component-major (d0 k0..kF-1, d1 ..., d2 ...).
    Integer frequencies make the features periodic in dx, hence invariant to wrapping.
    """
    return torch.cat(fourier_sin_cos(dx, num_freqs), dim=-1)


def fourier_sin_cos(dx: torch.Tensor, num_freqs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two halves of :func:`fourier_features`, each (E, 3 * num_freqs) and contiguous."""
    k = torch.arange(num_freqs, device=dx.device, dtype=dx.dtype) * (2.0 * math.pi)
    arg = (dx.unsqueeze(-1) * k).reshape(dx.shape[0], 3 * num_freqs)
    return arg.sin(), arg.cos()
