"""Scatter / segment reductions in plain torch (no torch_scatter dependency)."""

from __future__ import annotations

import torch


def scatter_sum(src: torch.Tensor, index: torch.Tensor, dim_size: int) -> torch.Tensor:
    """Sum rows of ``src`` (N, ...) into ``dim_size`` segments given by ``index`` (N,)."""
    out = src.new_zeros((dim_size, *src.shape[1:]))
    return out.index_add_(0, index, src)


def scatter_mean(src: torch.Tensor, index: torch.Tensor, dim_size: int, counts: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of rows of ``src`` per segment; empty segments give 0."""
    total = scatter_sum(src, index, dim_size)
    if counts is None:
        counts = torch.bincount(index, minlength=dim_size)
    counts = counts.to(total.dtype).clamp_min(1)
    return total / counts.view(-1, *([1] * (src.dim() - 1)))


def scatter_min(src: torch.Tensor, index: torch.Tensor, dim_size: int, fill: float = float("inf")) -> torch.Tensor:
    """Minimum of a 1-D ``src`` per segment; empty segments give ``fill``."""
    out = torch.full((dim_size,), fill, dtype=src.dtype, device=src.device)
    return out.scatter_reduce(0, index, src, reduce="amin", include_self=True)


def scatter_max(src: torch.Tensor, index: torch.Tensor, dim_size: int, fill: float = float("-inf")) -> torch.Tensor:
    """Maximum of a 1-D ``src`` per segment; empty segments give ``fill``."""
    out = torch.full((dim_size,), fill, dtype=src.dtype, device=src.device)
    return out.scatter_reduce(0, index, src, reduce="amax", include_self=True)


def randn_on(shape, generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    """Standard normals shaped ``shape`` with ``like``'s dtype and device, drawn on the generator's device.

    torch refuses a CPU generator for a CUDA draw; drawing where the generator lives and moving the result also
    makes a seed give the same numbers on every device.
    """
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, dtype=like.dtype, device=device).to(like.device)
