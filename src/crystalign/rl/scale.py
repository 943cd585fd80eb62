r"""ScaleMLP: the learned velocity-annealing schedule :math:`s_\theta(t)` per field.

The velocity-annealing policy moves along the frozen base velocity with a learned speed,
:math:`x' = x + [1 + s_\theta(t)]\,b_\text{ref}\,\Delta t + \sigma\sqrt{\Delta t}\,\xi\,b_\text{ref}`, and the
scaled-velocity variant uses a frozen, pre-learned :math:`s(t)` as a fixed multiplier :math:`1 + s(t)`.

* ``shared_trunk=True`` (default): trunk Linear(1,64)–SiLU–[Linear(64,64)–SiLU]×2–Linear(64,64) and one
  Linear(64,1) head per field, 12,738 parameters.
* ``shared_trunk=False``: one Linear(1,64)–SiLU–[Linear(64,64)–SiLU]×2–Linear(64,1) per field, 17,026 parameters.

Output layers are zero-initialised, so :math:`s \equiv 0` at the start: the policy is the base sampler.

Example::

    scale = ScaleMLP()
    out = scale(torch.full((8,), 0.3))        # {"pos_s": (8,), "cell_s": (8,)}, zeros at init
"""

from __future__ import annotations

import torch
from torch import nn

from crystalign.rl.schedules import time_mlp

__all__ = ["ScaleMLP"]

FIELDS = ("pos", "cell")


class ScaleMLP(nn.Module):
    """``forward(t) -> {"pos_s": s_pos(t), "cell_s": s_cell(t)}``, each with the shape of ``t``."""

    def __init__(self, hidden: int = 64, n_hidden_layers: int = 2, shared_trunk: bool = True) -> None:
        super().__init__()
        self.shared_trunk = bool(shared_trunk)
        if self.shared_trunk:
            # the trunk ends in a plain Linear (no activation); the heads read its features directly
            self.trunk = time_mlp(hidden, n_hidden_layers, hidden, zero_init_output=False)
            self.heads = nn.ModuleDict({f: _zero_linear(hidden, 1) for f in FIELDS})
        else:
            self.nets = nn.ModuleDict({f: time_mlp(hidden, n_hidden_layers, 1) for f in FIELDS})

    def forward(self, t: torch.Tensor | float) -> dict[str, torch.Tensor]:
        t = torch.as_tensor(t)
        dtype = t.dtype if t.is_floating_point() else torch.get_default_dtype()
        w = next(self.parameters())
        x = t.to(device=w.device, dtype=w.dtype).unsqueeze(-1)
        if self.shared_trunk:
            h = self.trunk(x)
            return {f"{f}_s": self.heads[f](h).squeeze(-1).to(dtype) for f in FIELDS}
        return {f"{f}_s": self.nets[f](x).squeeze(-1).to(dtype) for f in FIELDS}


def _zero_linear(n_in: int, n_out: int) -> nn.Linear:
    layer = nn.Linear(n_in, n_out)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer
