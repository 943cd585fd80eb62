r"""Base distribution :math:`p_0` for crystal structure prediction.

* fractional coordinates :math:`X_0 \sim U[0,1)^{N\times 3}`;
* lattice lengths :math:`a_i \sim \mathrm{LogNormal}(\mu_i, s_i)` independently for :math:`(a, b, c)`, angles
  :math:`\alpha, \beta, \gamma \sim U(60°, 120°)` i.i.d., cell :math:`L_0` = ``lattice_from_params`` (ASE
  ``cellpar_to_cell`` orientation). Angles in that box always give a non-degenerate cell;
* species copied from the target composition (CSP conditioning).

Example::

    p0 = BaseDistribution.from_preset("mp_20")
    x0 = p0.sample(x1.species, x1.n_atoms, generator=torch.Generator().manual_seed(0))
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from crystalign.crystal import CrystalBatch
from crystalign.geometry import lattice_from_params, lattice_params

__all__ = ["LATTICE_PRESETS", "BaseDistribution"]

#: Published log-normal lattice-length parameters (mu; s) for (a, b, c), per dataset.
LATTICE_PRESETS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "mp_20": ((1.5754, 1.7017, 1.9782), (0.2444, 0.2653, 0.3536)),
    "mpts_52": ((1.6565, 1.8408, 2.1225), (0.2952, 0.3340, 0.4189)),
    "perov_5": ((1.4192, 1.4192, 1.4192), (0.0727, 0.0727, 0.0727)),
    "carbon_24": ((0.9853, 1.3865, 1.7068), (0.1496, 0.2043, 0.2404)),
    "alex_mp_20": ((1.5809, 1.7467, 2.0652), (0.2728, 0.2945, 0.3090)),
}


def _triple(value: float | Sequence[float], name: str) -> tuple[float, float, float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = (value,) * 3
    values = tuple(float(v) for v in value)
    if len(values) != 3:
        raise ValueError(f"{name} needs 1 or 3 values (a, b, c), got {len(values)}")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{name} must be finite, got {values}")
    return values  # type: ignore[return-value]


@dataclass(frozen=True)
class BaseDistribution:
    """CSP base distribution: uniform positions, log-normal lengths, uniform angles, copied species.

    Args:
        mu, s: log-normal parameters of the lattice lengths (Å), one value or one per (a, b, c).
        angle_low, angle_high: bounds of the uniform cell angles in degrees.
    """

    mu: tuple[float, float, float]
    s: tuple[float, float, float]
    angle_low: float = 60.0
    angle_high: float = 120.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "mu", _triple(self.mu, "mu"))
        object.__setattr__(self, "s", _triple(self.s, "s"))
        if not all(v > 0 for v in self.s):
            raise ValueError(f"s must be positive, got {self.s}")
        if not 0.0 < self.angle_low < self.angle_high < 180.0:
            raise ValueError(f"need 0 < angle_low < angle_high < 180, got {self.angle_low}, {self.angle_high}")

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_preset(cls, name: str) -> "BaseDistribution":
        """Published parameters for ``mp_20``, ``mpts_52``, ``perov_5``, ``carbon_24`` or ``alex_mp_20``."""
        if name not in LATTICE_PRESETS:
            raise ValueError(f"unknown lattice preset {name!r}; available: {', '.join(LATTICE_PRESETS)}")
        mu, s = LATTICE_PRESETS[name]
        return cls(mu, s)

    @classmethod
    def fit(cls, lattice: torch.Tensor) -> "BaseDistribution":
        """Maximum-likelihood log-normal lengths from training cells (B,3,3) (angles keep the default box)."""
        if lattice.shape[0] < 2:
            raise ValueError("fitting needs at least 2 lattices")
        lengths, _ = lattice_params(lattice.detach().to(torch.float64))
        logs = lengths.log()
        return cls(tuple(logs.mean(0).tolist()), tuple(logs.std(0, unbiased=False).tolist()))

    @classmethod
    def from_config(cls, config: str | Mapping[str, Any]) -> "BaseDistribution":
        """``"mp_20"``, ``{"preset": "mp_20"}`` or ``{"mu": [...], "s": [...], "angle_low"?, "angle_high"?}``."""
        if isinstance(config, str):
            return cls.from_preset(config)
        config = dict(config)
        if "preset" in config:
            extra = sorted(set(config) - {"preset"})
            if extra:
                raise ValueError(f"a lattice preset takes no further keys, got {extra}")
            return cls.from_preset(config["preset"])
        unknown = sorted(set(config) - {"mu", "s", "angle_low", "angle_high"})
        if unknown:
            raise ValueError(f"unknown base distribution key(s) {unknown}; allowed: preset, mu, s, angle_low, angle_high")
        if "mu" not in config or "s" not in config:
            raise ValueError("a fitted base distribution needs both 'mu' and 's'")
        return cls(**config)

    def to_config(self) -> dict[str, Any]:
        return {"mu": list(self.mu), "s": list(self.s), "angle_low": self.angle_low, "angle_high": self.angle_high}

    # ------------------------------------------------------------------ sampling
    def sample_lattice(
        self,
        num: int,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """(num, 3, 3) cells, rows are lattice vectors."""
        dtype = dtype or torch.get_default_dtype()
        gen_device = generator.device if generator is not None else torch.device("cpu")
        mu = torch.tensor(self.mu, dtype=torch.float64, device=gen_device)
        s = torch.tensor(self.s, dtype=torch.float64, device=gen_device)
        noise = torch.randn((num, 3), generator=generator, dtype=torch.float64, device=gen_device)
        lengths = torch.exp(mu + s * noise)
        u = torch.rand((num, 3), generator=generator, dtype=torch.float64, device=gen_device)
        angles = self.angle_low + (self.angle_high - self.angle_low) * u
        # float64 for the cell construction, cast once at the end
        return lattice_from_params(lengths, angles).to(device=device or gen_device, dtype=dtype)

    def sample(
        self,
        species: torch.Tensor,
        n_atoms: torch.Tensor,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> CrystalBatch:
        """A base sample with the given species (N,) and atom counts (B,).

        Random numbers are drawn on the generator's device (CPU without one) and moved to ``device``
        (default: the device of ``species``), so a seed gives the same sample everywhere.
        """
        species = torch.as_tensor(species, dtype=torch.long)
        n_atoms = torch.as_tensor(n_atoms, dtype=torch.long)
        device = torch.device(device) if device is not None else species.device
        dtype = dtype or torch.get_default_dtype()
        if int(n_atoms.sum()) != species.numel():
            raise ValueError(f"sum(n_atoms)={int(n_atoms.sum())} but {species.numel()} species given")
        gen_device = generator.device if generator is not None else torch.device("cpu")
        frac = torch.rand((species.numel(), 3), generator=generator, dtype=dtype, device=gen_device)
        lattice = self.sample_lattice(n_atoms.numel(), generator=generator, dtype=dtype, device=device)
        return CrystalBatch(
            species=species.to(device).clone(), frac=frac.to(device), lattice=lattice, n_atoms=n_atoms.to(device)
        )

    def sample_like(self, x1: CrystalBatch, generator: torch.Generator | None = None) -> CrystalBatch:
        """A base sample with the composition, dtype and device of ``x1`` (ids kept)."""
        x0 = self.sample(x1.species, x1.n_atoms, generator=generator, dtype=x1.dtype, device=x1.device)
        return x0.replace(ids=x1.ids)
