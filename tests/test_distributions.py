"""Base distribution p0: statistics of the lattice, copied species, seeding."""

from __future__ import annotations

import math

import pytest
import torch

from crystalign.distributions import LATTICE_PRESETS, BaseDistribution
from crystalign.geometry import lattice_params

DT = torch.float64


@pytest.mark.parametrize("name", ["mp_20", "carbon_24"])
def test_log_lengths_match_lognormal_parameters(name):
    p0 = BaseDistribution.from_preset(name)
    lattice = p0.sample_lattice(20_000, generator=torch.Generator().manual_seed(0), dtype=DT)
    lengths, angles = lattice_params(lattice)
    logs = lengths.log()
    mu, s = torch.tensor(LATTICE_PRESETS[name][0], dtype=DT), torch.tensor(LATTICE_PRESETS[name][1], dtype=DT)
    # ~4 standard errors: s/sqrt(n) for the mean, s/sqrt(2n) for the std
    assert (logs.mean(0) - mu).abs().max() < 4 * s.max() / math.sqrt(20_000)
    assert (logs.std(0) - s).abs().max() < 4 * s.max() / math.sqrt(40_000)
    assert angles.min() >= 60.0 - 1e-9 and angles.max() <= 120.0 + 1e-9
    assert (angles.mean(0) - 90.0).abs().max() < 0.5  # U(60, 120): std of the mean 0.12°
    assert (torch.linalg.det(lattice) > 0).all()  # right-handed, never flat


def test_sample_copies_species_and_counts():
    species = torch.tensor([8, 8, 8, 22, 38, 6, 6])
    n_atoms = torch.tensor([5, 2])
    x0 = BaseDistribution.from_preset("perov_5").sample(species, n_atoms, generator=torch.Generator().manual_seed(1))
    assert torch.equal(x0.species, species) and x0.species is not species
    assert torch.equal(x0.n_atoms, n_atoms)
    assert x0.frac.shape == (7, 3) and x0.lattice.shape == (2, 3, 3)
    assert (x0.frac >= 0).all() and (x0.frac < 1).all()
    assert x0.frac.dtype == torch.get_default_dtype()


def test_uniform_positions_statistics():
    species = torch.ones(30_000, dtype=torch.long)
    x0 = BaseDistribution.from_preset("mp_20").sample(
        species, torch.tensor([30_000]), generator=torch.Generator().manual_seed(2), dtype=DT
    )
    assert (x0.frac.mean(0) - 0.5).abs().max() < 0.01
    assert (x0.frac.var(0) - 1 / 12).abs().max() < 0.003


def test_seeded_reproducibility():
    p0 = BaseDistribution.from_preset("mpts_52")
    species, n_atoms = torch.tensor([3, 3, 9, 14]), torch.tensor([1, 3])
    a = p0.sample(species, n_atoms, generator=torch.Generator().manual_seed(42))
    b = p0.sample(species, n_atoms, generator=torch.Generator().manual_seed(42))
    c = p0.sample(species, n_atoms, generator=torch.Generator().manual_seed(43))
    assert torch.equal(a.frac, b.frac) and torch.equal(a.lattice, b.lattice)
    assert not torch.equal(a.frac, c.frac) and not torch.equal(a.lattice, c.lattice)


def test_sample_like_follows_target_dtype_and_ids():
    p0 = BaseDistribution.from_preset("alex_mp_20")
    x1 = p0.sample(torch.tensor([1, 2, 3]), torch.tensor([3]), dtype=DT).replace(ids=["x"])
    x0 = p0.sample_like(x1, generator=torch.Generator().manual_seed(0))
    assert x0.dtype == DT and x0.ids == ["x"] and torch.equal(x0.species, x1.species)


def test_presets_and_config():
    assert set(LATTICE_PRESETS) == {"mp_20", "mpts_52", "perov_5", "carbon_24", "alex_mp_20"}
    perov = BaseDistribution.from_preset("perov_5")
    assert perov.mu == (1.4192,) * 3 and perov.s == (0.0727,) * 3
    assert BaseDistribution.from_config("mp_20") == BaseDistribution.from_config({"preset": "mp_20"})
    fitted = BaseDistribution.from_config({"mu": [1.0, 1.1, 1.2], "s": 0.2})
    assert fitted.s == (0.2, 0.2, 0.2)
    assert BaseDistribution.from_config(fitted.to_config()) == fitted
    with pytest.raises(ValueError, match="mp_21"):
        BaseDistribution.from_preset("mp_21")
    with pytest.raises(ValueError, match="sigma"):
        BaseDistribution.from_config({"mu": 1.0, "sigma": 0.1})
    with pytest.raises(ValueError, match="positive"):
        BaseDistribution(1.0, (0.1, 0.0, 0.1))


def test_fit_recovers_parameters():
    true = BaseDistribution((1.2, 1.5, 1.9), (0.1, 0.2, 0.3))
    lattice = true.sample_lattice(20_000, generator=torch.Generator().manual_seed(5), dtype=DT)
    fitted = BaseDistribution.fit(lattice)
    assert max(abs(a - b) for a, b in zip(fitted.mu, true.mu)) < 0.01
    assert max(abs(a - b) for a, b in zip(fitted.s, true.s)) < 0.01
