r"""The network of an RL-tuned model that reinforced only some fields.

Velocity-based RL (OMatG-IRL) moves a field by the policy's velocity :math:`b_\theta` only where it reinforces it;
every other field (and a de novo model's species) follows the frozen base network. The policy's mean path is
therefore Euler integration of a *pair* of networks. :class:`FieldSplitNet` is that pair behind the single-network
interface the sampler calls: one output dict, the reinforced velocities from the tuned network, the rest from the
base network.

Example::

    net = FieldSplitNet(base.net, policy.net, fields=("pos",))
    out = net(t, species, frac, lattice, n_atoms)   # out["pos_b"] tuned, out["cell_b"] and the rest from the base
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from crystalign.interpolants import FIELDS

__all__ = ["FieldSplitNet"]


class FieldSplitNet(nn.Module):
    """Base network with the velocities of ``fields`` taken from ``tuned`` (same architecture)."""

    def __init__(self, base: nn.Module, tuned: nn.Module, fields: Sequence[str]):
        super().__init__()
        fields = tuple(fields)
        bad = [f for f in fields if f not in FIELDS]
        if not fields or bad or len(set(fields)) != len(fields):
            raise ValueError(f"tuned fields must be distinct names among {list(FIELDS)}, got {list(fields)}")
        self.base = base
        self.tuned = tuned
        self.fields = fields
        self.config = base.config

    def forward(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        out = dict(self.base(*args, **kwargs))
        tuned = self.tuned(*args, **kwargs)
        for f in self.fields:
            out[f"{f}_b"] = tuned[f"{f}_b"]
        return out
