"""Rewards that need no MLIP: interface, factory, user callables, cRMSE, symmetry, composite."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from pymatgen.core import Lattice, Structure

from crystalign.crystal import CrystalBatch
from crystalign.rewards import (
    CallableReward,
    CompositeReward,
    CRMSEReward,
    NonCentrosymmetricReward,
    NonTriclinicReward,
    RewardResult,
    available_rewards,
    make_reward,
    register_reward,
)


def read_csv_structures(path, n: int | None = None) -> list[Structure]:
    import pandas as pd

    frame = pd.read_csv(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [Structure.from_str(cif, fmt="cif") for cif in frame["cif"].iloc[:n]]


def overlapping_copy(s: Structure, distance: float = 0.1) -> Structure:
    """Move atom 1 to within ``distance`` Å of atom 0 (fails the shared validity check)."""
    out = s.copy()
    out.replace(1, out[1].species, coords=out[0].coords + np.array([distance, 0, 0]), coords_are_cartesian=True)
    return out


def p1_distorted(s: Structure, seed: int = 0, amount: float = 0.25) -> Structure:
    """Random atomic displacements and a sheared lattice: space group P1."""
    rng = np.random.default_rng(seed)
    lattice = Lattice(s.lattice.matrix @ (np.eye(3) + rng.uniform(-0.05, 0.05, (3, 3))))
    cart = s.cart_coords + rng.normal(scale=amount, size=(len(s), 3))
    return Structure(lattice, s.species, cart, coords_are_cartesian=True)


@pytest.fixture(scope="module")
def perovskites(perov_val_csv) -> list[Structure]:
    return read_csv_structures(perov_val_csv, 40)


def _by_space_group(structures, number):
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # spglib's legacy error-handling notice
        for s in structures:
            if SpacegroupAnalyzer(s, symprec=0.1).get_space_group_number() == number:
                return s
    pytest.fail(f"no structure with space group {number} in the sample")


# ---------------------------------------------------------------------------------------------- interface


def test_reward_result_checks_shapes():
    with pytest.raises(ValueError, match="shape"):
        RewardResult(torch.zeros(3), {"x": torch.zeros(2)})
    summary = RewardResult(torch.tensor([1.0, 3.0]), {"e": torch.tensor([float("nan"), 2.0])}).summary()
    assert summary == {"reward_mean": 2.0, "e": 2.0}  # NaN entries are left out of info means


def test_callable_reward_skips_invalid_and_non_finite(perovskites):
    seen: list[int] = []

    def volume_per_atom(structures):
        seen.append(len(structures))
        return [s.volume / len(s) if k != 1 else float("nan") for k, s in enumerate(structures)]

    batch = CrystalBatch.from_structures([perovskites[0], overlapping_copy(perovskites[1]), perovskites[2], perovskites[3]])
    reward = CallableReward(volume_per_atom, invalid_value=-1.0)
    out = reward(batch)
    assert seen == [3]  # the overlapping structure never reached the user function
    assert reward.name == "volume_per_atom"
    assert out.rewards[1] == -1.0 and out.rewards[2] == -1.0  # invalid geometry, NaN output
    assert out.rewards[0] == pytest.approx(perovskites[0].volume / 5)
    assert out.info["valid"].tolist() == [1.0, 0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="returned 1 values for 4"):
        CallableReward(lambda ss: [0.0], name="short")(CrystalBatch.from_structures(perovskites[:4]))
    # by default an invalid structure scores the batch's lowest valid reward: never above a valid one, even for
    # a negative objective, where a fixed 0 would make breaking a structure the best move
    negative = CallableReward(lambda ss: [-s.volume / len(s) for s in ss])(batch)
    valid_scores = [-perovskites[k].volume / 5 for k in (0, 2, 3)]  # structure 1 overlaps
    assert negative.rewards[1] == pytest.approx(min(valid_scores))
    assert negative.rewards.max() == pytest.approx(max(valid_scores))


# ---------------------------------------------------------------------------------------------- factory


def test_factory_builds_and_names_bad_keys():
    assert isinstance(make_reward("non_triclinic"), NonTriclinicReward)
    comp = make_reward(
        {"kind": "composite", "terms": [{"kind": "non_triclinic", "weight": 1.0}, {"kind": "non_centrosymmetric", "weight": 0.5, "name": "nc"}]}
    )
    assert [(n, w) for n, _, w in comp.terms] == [("non_triclinic", 1.0), ("nc", 0.5)]
    assert {"energy", "e_above_hull", "crmse", "composite", "callable"} <= set(available_rewards())
    cases = [
        ({"weight": 1.0}, "missing required key 'kind'"),
        ({"kind": "nope"}, r"reward.kind: unknown reward kind 'nope'"),
        ({"kind": "non_triclinic", "symprc": 0.1}, r"unknown key\(s\) 'symprc'"),
        ({"kind": "crmse"}, r"missing required key\(s\) 'references'"),
        ({"kind": "composite", "terms": [{"kind": "non_triclinic"}]}, r"reward.terms\[0\]: missing required key 'weight'"),
        ({"kind": "composite", "terms": [{"kind": "energy", "weight": 1, "backend": "bogus"}]}, r"terms\[0\].*unknown MLIP backend 'bogus'"),
        ({"kind": "non_triclinic", "thresholds": {"min_dist": 0.5}}, r"thresholds: unknown key"),
    ]
    for spec, message in cases:
        with pytest.raises(ValueError, match=message):
            make_reward(spec)


def test_factory_user_kinds_and_callable_paths(perovskites):
    register_reward("n_sites_test", lambda scale=1.0: CallableReward(lambda ss: [scale * len(s) for s in ss], name="n_sites"))
    batch = CrystalBatch.from_structures(perovskites[:2])
    assert make_reward({"kind": "n_sites_test", "scale": 2.0})(batch).rewards.tolist() == [10.0, 10.0]
    with pytest.raises(ValueError, match="built in"):
        register_reward("energy", lambda: None)
    density = make_reward({"kind": "callable", "fn": f"{__name__}:_density", "name": "density"})
    assert density(batch).info["density"][0] == pytest.approx(perovskites[0].density)


def _density(structures):
    return [s.density for s in structures]


def test_load_structures_from_csv_cif_and_extxyz(mp20_sample_csv, tmp_path):
    from ase.io import write

    from crystalign.rewards import load_structures

    structures, ids = load_structures(mp20_sample_csv)
    expected = read_csv_structures(mp20_sample_csv, 3)
    assert len(structures) == 142 and ids[0] == "mp-10009"
    for got, want in zip(structures, expected):
        assert got.composition == want.composition
        np.testing.assert_allclose(got.lattice.matrix, want.lattice.matrix, atol=1e-6)
    expected[0].to(filename=str(tmp_path / "a.cif"))
    write(tmp_path / "b.extxyz", [s.to_ase_atoms() for s in expected[1:]])
    more, more_ids = load_structures([tmp_path / "a.cif", tmp_path / "b.extxyz"])
    assert [s.composition.reduced_formula for s in more] == [s.composition.reduced_formula for s in expected]
    assert more_ids == ["a", "b:0", "b:1"]
    with pytest.raises(FileNotFoundError):
        load_structures(tmp_path / "missing.csv")


# ---------------------------------------------------------------------------------------------- cRMSE


def test_crmse_reference_wrong_composition_and_invalid(perovskites):
    refs = perovskites[:10]
    reward = CRMSEReward(refs, scale=2.0)
    wrong = next(s for s in perovskites[10:] if s.composition.reduced_formula not in reward.index)
    near = refs[3].copy()
    near.perturb(0.05)
    batch = CrystalBatch.from_structures([refs[0], refs[1], near, wrong, overlapping_copy(refs[2])])
    out = reward(batch)
    r = out.rewards.numpy()
    assert r[0] == pytest.approx(2.0 * 0.5, abs=1e-6) and r[1] == pytest.approx(1.0, abs=1e-6)  # stol − 0
    assert 0.0 < r[2] < 1.0  # a perturbed copy is matched, with a small RMS
    assert r[3] == 0.0 and r[4] == 0.0  # wrong composition, invalid: cRMSE = stol
    assert out.info["matched"].tolist() == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert out.info["crmse"][3] == 0.5
    parallel = CRMSEReward(refs, scale=2.0, n_jobs=2)
    try:
        torch.testing.assert_close(parallel(batch).rewards, out.rewards)
    finally:
        parallel.close()
    # a match bonus adds scale * bonus to matched structures only, so a loose match outranks any miss
    bonus = CRMSEReward(refs, scale=2.0, match_bonus=0.5)(batch).rewards.numpy()
    np.testing.assert_allclose(bonus - r, 2.0 * 0.5 * out.info["matched"].numpy(), atol=1e-6)
    for bad in (-0.1, float("nan"), "1"):
        with pytest.raises(ValueError, match="match_bonus"):
            CRMSEReward(refs, match_bonus=bad)


# ---------------------------------------------------------------------------------------------- symmetry


def test_symmetry_rewards_on_known_structures(perovskites):
    cubic = _by_space_group(perovskites, 221)  # Pm-3m: centrosymmetric
    polar = _by_space_group(perovskites, 99)  # P4mm: no inversion
    distorted = p1_distorted(cubic)
    batch = CrystalBatch.from_structures([cubic, polar, distorted, overlapping_copy(cubic)])
    nt = NonTriclinicReward()(batch)
    nc = NonCentrosymmetricReward()(batch)
    assert nt.rewards.tolist() == [1.0, 1.0, 0.0, 0.0]
    assert nc.rewards.tolist() == [0.0, 1.0, 0.0, 0.0]
    assert nt.info["space_group_number"][:3].tolist() == [221.0, 99.0, 1.0]
    assert "non_triclinic" in nt.info and "non_centrosymmetric" in nc.info


# ---------------------------------------------------------------------------------------------- composite


def test_composite_weights_and_monitoring(perovskites):
    calls = []

    def counted(structures):
        calls.append(len(structures))
        return [1.0] * len(structures)

    cubic, polar = _by_space_group(perovskites, 221), _by_space_group(perovskites, 99)
    batch = CrystalBatch.from_structures([cubic, polar, p1_distorted(cubic)])
    reward = CompositeReward(
        [(None, NonTriclinicReward(), 1.0), (None, NonCentrosymmetricReward(), 2.0), ("watch", CallableReward(counted), 0.0)]
    )
    out = reward(batch)
    assert out.rewards.tolist() == [1.0, 3.0, 0.0]
    assert calls == [] and not any(k.startswith("watch/") for k in out.info)  # zero weight: skipped
    assert {"non_triclinic/non_triclinic", "non_centrosymmetric/non_centrosymmetric", "non_triclinic/valid"} <= set(out.info)
    reward.monitor = True
    monitored = reward(batch)
    assert calls == [3] and monitored.rewards.tolist() == [1.0, 3.0, 0.0]  # computed, not added
    assert monitored.info["watch/reward"].tolist() == [1.0, 1.0, 1.0]
    twice = CompositeReward([(None, NonTriclinicReward(), 1.0), (None, NonTriclinicReward(), 1.0)])
    assert [n for n, _, _ in twice.terms] == ["non_triclinic", "non_triclinic_2"]
    with pytest.raises(ValueError, match="at least one term"):
        CompositeReward([])
