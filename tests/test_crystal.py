"""CrystalBatch and the shared validity check, on real structures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pymatgen.core import Lattice, Structure

from crystalign.crystal import CrystalBatch
from crystalign.geometry import (
    all_pairs,
    check_validity,
    lattice_from_params,
    lattice_params,
    min_image,
    unwrap,
    wrap,
)


def _read_csv_structures(path, limit=None):
    import pandas as pd

    df = pd.read_csv(path)
    if limit:
        df = df.iloc[:limit]
    return [Structure.from_str(c, fmt="cif") for c in df["cif"]]


@pytest.fixture(scope="module")
def mp20(mp20_sample_csv):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _read_csv_structures(mp20_sample_csv)


def test_pymatgen_round_trip_exact(mp20):
    batch = CrystalBatch.from_structures(mp20)
    assert batch.num_structures == 142
    back = CrystalBatch.from_structures(batch.to_structures())
    assert torch.equal(back.species, batch.species)
    assert torch.allclose(back.lattice, batch.lattice, atol=1e-12)
    assert torch.allclose(back.frac, batch.frac, atol=1e-12)


def test_ase_round_trip(mp20):
    batch = CrystalBatch.from_structures(mp20)
    back = CrystalBatch.from_atoms(batch.to_atoms())
    assert torch.equal(back.species, batch.species)
    assert torch.allclose(back.lattice, batch.lattice, atol=1e-10)
    assert min_image(back.frac - batch.frac).abs().max() < 1e-10


def test_cartesian_matches_pymatgen(mp20):
    batch = CrystalBatch.from_structures(mp20[:10])
    cart = np.concatenate([s.cart_coords for s in mp20[:10]])
    assert np.allclose(batch.cartesian().numpy(), cart, atol=1e-8)


def test_index_cat_repeat(mp20):
    batch = CrystalBatch.from_structures(mp20[:6], ids=[f"s{i}" for i in range(6)])
    sub = batch[[4, 1]]
    assert sub.ids == ["s4", "s1"]
    assert torch.equal(sub.n_atoms, batch.n_atoms[[4, 1]])
    assert torch.equal(sub.species, torch.cat([batch[4].species, batch[1].species]))
    both = CrystalBatch.cat([batch[:3], batch[3:]])
    assert torch.equal(both.frac, batch.frac) and both.ids == batch.ids
    rep = batch.repeat_interleave(3)
    assert rep.num_structures == 18
    assert rep.ids[:3] == ["s0"] * 3
    assert torch.equal(rep[4].frac, batch[1].frac)
    mask = torch.zeros(6, dtype=torch.bool)
    mask[[0, 5]] = True
    assert batch[mask].ids == ["s0", "s5"]
    assert torch.equal(batch.batch, torch.repeat_interleave(torch.arange(6), batch.n_atoms))


def test_to_device_dtype(mp20):
    batch = CrystalBatch.from_structures(mp20[:3]).to(dtype=torch.float32)
    assert batch.frac.dtype == torch.float32 and batch.species.dtype == torch.long


def test_validity_matches_pymatgen_distances(mp20):
    batch = CrystalBatch.from_structures(mp20)
    report = batch.validity()
    assert bool(report.valid.all())
    for i, s in enumerate(mp20):
        d = s.distance_matrix.copy()
        np.fill_diagonal(d, np.inf)
        expected = min(d.min(), min(s.lattice.abc))
        assert abs(expected - float(report.min_distance[i])) < 1e-6


@pytest.mark.parametrize("shear", [[[1, 0, 0], [4, 1, 0], [0, 0, 1]], [[1, 2, 0], [5, 11, 3], [0, 0, 1]]])
def test_min_distance_does_not_depend_on_the_cell_basis(mp20, shear):
    # the same crystals written in skewed, unreduced cells: their nearest images lie many cells away
    m = torch.tensor(shear, dtype=torch.float64)
    assert abs(float(torch.linalg.det(m))) == 1.0
    batch = CrystalBatch.from_structures(mp20[:12])
    reduced = batch.validity().min_distance
    counts = batch.n_atoms
    skew_lat = m @ batch.lattice
    skew_frac = wrap(batch.frac @ torch.linalg.inv(m))
    skewed = check_validity(skew_frac, skew_lat, counts).min_distance
    assert torch.allclose(skewed, reduced, atol=1e-9)
    # and a skewed cell that passes the polar-sine test but whose atom sits 0.36 A from its own image
    lat = torch.tensor([[[5.0, 0, 0], [19.8, 0.3, 0], [0, 0, 5.0]]], dtype=torch.float64)
    report = check_validity(torch.zeros(1, 3, dtype=torch.float64), lat, torch.tensor([1]))
    assert float(report.polar_sine[0]) > 1e-2
    assert abs(float(report.min_distance[0]) - 0.3605551) < 1e-6 and not bool(report.valid[0])


def test_validity_catches_broken_structures(mp20):
    good = mp20[0]
    overlapping = good.copy()
    overlapping.translate_sites([1], overlapping[0].coords - overlapping[1].coords + np.array([0.1, 0, 0]), frac_coords=False)
    flat = Structure(Lattice([[4, 0, 0], [0, 4, 0], [4, 4, 1e-4]]), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    tiny = Structure(Lattice.cubic(0.3), ["Si"], [[0, 0, 0]])
    batch = CrystalBatch.from_structures([good, overlapping, flat, tiny])
    report = batch.validity()
    assert report.valid.tolist() == [True, False, False, False]
    reasons = report.reasons()
    assert "min distance" in reasons[1]
    assert "polar sine" in reasons[2] and "volume" in reasons[2]
    assert "volume" in reasons[3]


def test_validity_non_finite_never_raises():
    frac = torch.tensor([[0.0, 0.0, 0.0], [float("nan"), 0.5, 0.5], [0.1, 0.1, 0.1]])
    lattice = torch.stack([torch.eye(3) * 4, torch.eye(3) * 4])
    lattice[1, 0, 0] = float("inf")
    report = check_validity(frac, lattice, torch.tensor([1, 2]))
    assert report.valid.tolist() == [True, False]


def test_torus_helpers():
    x0 = torch.tensor([0.95, 0.1, 0.5])
    x1 = torch.tensor([0.05, 0.9, 0.5])
    assert torch.allclose(unwrap(x0, x1), torch.tensor([1.05, -0.1, 0.5]))
    assert torch.allclose(wrap(torch.tensor([-0.25, 1.25, 3.0])), torch.tensor([0.75, 0.25, 0.0]))
    assert wrap(torch.tensor([-1e-9], dtype=torch.float32)).item() < 1.0


def test_lattice_params_round_trip():
    lengths = torch.tensor([[3.0, 4.0, 5.0], [6.0, 6.5, 7.0]], dtype=torch.float64)
    angles = torch.tensor([[90.0, 90.0, 90.0], [70.0, 100.0, 115.0]], dtype=torch.float64)
    lat = lattice_from_params(lengths, angles)
    l2, a2 = lattice_params(lat)
    assert torch.allclose(l2, lengths) and torch.allclose(a2, angles)
    pm = Lattice.from_parameters(6.0, 6.5, 7.0, 70.0, 100.0, 115.0)
    assert np.isclose(abs(np.linalg.det(lat[1].numpy())), pm.volume)


def test_all_pairs_per_structure():
    src, dst, pb = all_pairs(torch.tensor([2, 3]))
    assert src.numel() == 4 + 9
    assert torch.equal(pb, torch.tensor([0] * 4 + [1] * 9))
    assert set(zip(src[4:].tolist(), dst[4:].tolist())) == {(i, j) for i in range(2, 5) for j in range(2, 5)}
    src, dst, _ = all_pairs(torch.tensor([2, 3]), include_self=False)
    assert src.numel() == 2 + 6 and bool((src != dst).all())


def test_bad_inputs():
    with pytest.raises(ValueError, match="atom counts"):
        CrystalBatch(torch.tensor([1, 1]), torch.zeros(2, 3), torch.eye(3)[None], torch.tensor([3]))
    with pytest.raises(ValueError, match="atomic numbers"):
        CrystalBatch._from_numpy([np.array([0])], [np.zeros((1, 3))], [np.eye(3)], [1], None, torch.float64)

    disordered = Structure(Lattice.cubic(4), [{"Na": 0.5, "K": 0.5}], [[0, 0, 0]])
    with pytest.raises(ValueError, match="partial occupancy"):
        CrystalBatch.from_structures([disordered], ids=["row 7"])
