"""Reward-hacking guards of the MLIP rewards, on real SevenNet / CHGNet and real data.

* the contact trust check: geometry-valid structures with fused atoms (d_ij < 0.5 (r_cov,i + r_cov,j)) are
  energy-invalid, while every real structure passes it;
* the invalid penalty is a floor of the reward (valid energies / e_hull are capped at it);
* a hull's backend identity includes SevenNet's ``modal`` and is enforced on load.
"""

from __future__ import annotations

import os

import json
import warnings

import numpy as np
import pytest
import torch
from pymatgen.core import Lattice, Structure

from crystalign.crystal import CrystalBatch
from crystalign.geometry import (
    _SHIFTS,
    _nearest_image_search,
    covalent_radius,
    min_pbc_distance,
    min_pbc_radius_ratio,
    wrap,
)
from crystalign.rewards import EnergyAboveHullReward, EnergyReward, MLIPBackend, build_hull, get_backend, make_reward
from crystalign.rewards.energy import MIN_RADIUS_RATIO, contact_ratio, screened_energies

pytest.importorskip("sevenn", reason="the sevenn extra is not installed")


def nacl_conventional() -> Structure:
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def nacl_primitive() -> Structure:
    return nacl_conventional().get_primitive_structure()


def cl_moved_near_na(structure: Structure, d: float) -> Structure:
    """The first Cl moved to ``d`` Å (along x) from the first Na; everything else intact."""
    na = next(i for i, site in enumerate(structure) if site.specie.symbol == "Na")
    cl = next(i for i, site in enumerate(structure) if site.specie.symbol == "Cl")
    out = structure.copy()
    out.replace(cl, "Cl", coords=structure[na].coords + np.array([d, 0.0, 0.0]), coords_are_cartesian=True)
    return out


def squeezed(structure: Structure, factor: float) -> Structure:
    out = structure.copy()
    out.scale_lattice(structure.volume * factor**3)
    return out


def read_structures(path) -> list[Structure]:
    from crystalign.rewards import load_structures

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_structures(path)[0]


class CountingBackend(MLIPBackend):
    """The real backend, recording the atom counts of every structure it is asked to evaluate."""

    def __init__(self, inner: MLIPBackend) -> None:
        self.inner = inner
        self.name, self.model, self.device, self.dtype = inner.name, inner.model, inner.device, inner.dtype
        self.seen: list[int] = []

    def energies(self, atoms_list):
        self.seen += [len(a) for a in atoms_list]
        return self.inner.energies(atoms_list)


@pytest.fixture(scope="module")
def sevenn():
    return get_backend("sevenn", device="cpu")


# ---------------------------------------------------------------------------------------------- geometry


def _brute_force_ratio(s: Structure, cutoff: float = 7.0) -> float:
    from ase.data import covalent_radii

    r = np.array([covalent_radii[site.specie.Z] for site in s])
    return min(n.nn_distance / (r[i] + r[n.index]) for i, nbrs in enumerate(s.get_all_neighbors(cutoff)) for n in nbrs)


def test_radius_ratio_exact_in_any_cell_basis(mp20_sample_csv):
    structures = read_structures(mp20_sample_csv)[:30]
    batch = CrystalBatch.from_structures(structures)
    ratio = contact_ratio(batch)
    np.testing.assert_allclose(ratio, [_brute_force_ratio(s) for s in structures], atol=1e-9)
    radii = covalent_radius(batch.species)
    for shear in ([[1, 0, 0], [4, 1, 0], [0, 0, 1]], [[1, 2, 0], [5, 11, 3], [0, 0, 1]]):
        m = torch.tensor(shear, dtype=torch.float64)
        skewed = min_pbc_radius_ratio(wrap(batch.frac @ torch.linalg.inv(m)), m @ batch.lattice, batch.n_atoms, radii)
        np.testing.assert_allclose(skewed.numpy(), ratio, atol=1e-9)


def test_radius_ratio_fallback_uses_the_ratio_bound():
    # Cs alone along a 5 Å axis (self-image ratio 5 / (2 * 2.44) = 1.02) and an H2 molecule (1.24 / 0.62 = 2.0).
    # Written with a' = a - 2b, the Cs self-image lies outside the 27 neighbouring cells, and
    # neither the best distance (1.24 Å) nor the best ratio taken as a distance says so: only the bound
    # best_ratio * max(r_i + r_j) sends it to the LLL search.
    s = Structure(Lattice.orthorhombic(5.0, 12.0, 12.0), ["Cs", "H", "H"], [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5 + 1.24 / 12, 0.5]])
    batch = CrystalBatch.from_structures([s])
    radii = covalent_radius(batch.species)
    m = torch.tensor([[1, -2, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.float64)
    lat, frac = (m @ batch.lattice[0])[None], wrap(batch.frac @ torch.linalg.inv(m))
    only_27 = float(_nearest_image_search(frac, lat, batch.n_atoms, _SHIFTS, 1 << 18, radii))
    assert abs(only_27 - 2.0) < 1e-9  # the plain 27-image search misses the Cs self-image
    assert abs(float(min_pbc_radius_ratio(frac, lat, batch.n_atoms, radii)[0]) - 5.0 / (2 * 2.44)) < 1e-9
    assert abs(float(min_pbc_distance(frac, lat, batch.n_atoms)[0]) - 1.24) < 1e-9  # distances unchanged


def test_real_structures_pass_the_trust_check(perov_val_csv, mp20_sample_csv, carbon_val_csv):
    # every structure of perov_5 val (3787), the mp_20 sample (142) and carbon_24 val (2032)
    for path in (perov_val_csv, mp20_sample_csv, carbon_val_csv):
        structures = read_structures(path)
        assert len(structures) > 100
        batch = CrystalBatch.from_structures(structures)
        assert bool(batch.validity().valid.all())
        ratio = contact_ratio(batch)
        assert np.isfinite(ratio).all()
        # smallest real values: 0.667 (perov_5), 0.761 (mp_20), 0.801 (carbon_24); the default leaves a margin
        assert ratio.min() >= MIN_RADIUS_RATIO + 0.1, (path, ratio.min())
    assert EnergyReward().min_radius_ratio == MIN_RADIUS_RATIO == 0.5


# ---------------------------------------------------------------------------------------------- trust check


def test_nacl_cl_at_060_a_is_energy_invalid_with_a_reason(sevenn):
    real = nacl_conventional()
    broken = cl_moved_near_na(real, 0.60)
    batch = CrystalBatch.from_structures([real, broken])
    assert bool(batch.validity().valid.all())  # the benchmark check (0.5 Å) passes it
    # the exploit: without the trust check SevenNet scores it far below the real crystal, inside the window
    unguarded = EnergyReward(sevenn, min_radius_ratio=None)(batch)
    assert unguarded.info["valid"].tolist() == [1.0, 1.0]
    assert float(unguarded.rewards[1]) > float(unguarded.rewards[0]) + 5.0

    counting = CountingBackend(sevenn)
    reward = EnergyReward(counting)
    out = reward(batch)
    assert counting.seen == [8]  # the broken cell never reached the MLIP
    assert 3.0 < float(out.rewards[0]) < 4.0
    assert float(out.rewards[1]) == -3.0
    assert out.info["valid"].tolist() == [1.0, 0.0]
    assert out.info["invalid_geometry"].tolist() == [0.0, 0.0]
    assert out.info["invalid_contact"].tolist() == [0.0, 1.0]
    assert out.info["invalid_energy"].tolist() == [0.0, 1.0]  # energy-invalid: the contact check is its reason
    assert torch.isnan(out.info["energy_per_atom_ev"][1])
    expected = 0.60 / (covalent_radius(torch.tensor([11]))[0] + covalent_radius(torch.tensor([17]))[0])
    assert abs(float(out.info["contact_ratio"][1]) - float(expected)) < 1e-9
    reasons = reward.screen(batch).reasons()
    assert reasons[0] == "" and reasons[1].startswith("close contact") and "< 0.5" in reasons[1], reasons


def test_hull_reward_applies_the_trust_check(sevenn):
    prim = nacl_primitive()
    hull = build_hull([prim], sevenn)
    batch = CrystalBatch.from_structures([prim, cl_moved_near_na(prim, 0.60)])
    out = EnergyAboveHullReward(hull)(batch)
    assert out.info["valid"].tolist() == [1.0, 0.0]
    assert out.info["invalid_contact"].tolist() == [0.0, 1.0]
    assert out.rewards.tolist()[1] == -3.0 and abs(float(out.rewards[0])) < 1e-6
    assert torch.isnan(out.info["e_above_hull_ev_per_atom"][1])


def test_trust_check_option_is_validated():
    assert make_reward({"kind": "energy", "min_radius_ratio": 0.4}).min_radius_ratio == 0.4
    assert make_reward({"kind": "energy", "min_radius_ratio": None}).min_radius_ratio is None
    with pytest.raises(ValueError, match="min_radius_ratio"):
        make_reward({"kind": "energy", "min_radius_ratio": 1.5})


# ---------------------------------------------------------------------------------------------- penalty floor


def test_penalty_is_a_floor_sevenn(sevenn):
    # with the trust check off (to reach valid high energies), Na-Cl at 1.00 Å gives E/atom ~ +14 > penalty 3
    prim = nacl_primitive()
    batch = CrystalBatch.from_structures([prim, cl_moved_near_na(prim, 1.00), cl_moved_near_na(prim, 0.90)])
    out = EnergyReward(sevenn, min_radius_ratio=None, scale=2.0)(batch)
    e = out.info["energy_per_atom_ev"].numpy()
    assert out.info["valid"].tolist() == [1.0, 1.0, 1.0]
    assert e[1] > 3.0  # the raw energy stays in the info
    assert (out.rewards >= -2.0 * 3.0).all()  # never below an invalid structure's reward
    assert out.rewards[1].item() == -6.0 and out.info["penalty_capped"].tolist()[:2] == [0.0, 1.0]
    torch.testing.assert_close(out.rewards[0], -2.0 * out.info["energy_per_atom_ev"][0])
    # with the trust check on (default) both are invalid: same reward, flagged as close contacts
    guarded = EnergyReward(sevenn, scale=2.0)(batch)
    assert guarded.rewards[1:].tolist() == [-6.0, -6.0] and guarded.info["invalid_contact"].tolist() == [0.0, 1.0, 1.0]


def test_penalty_is_a_floor_chgnet():
    pytest.importorskip("chgnet", reason="the chgnet extra is not installed")
    prim = nacl_primitive()
    # lattice x0.50: valid (contact ratio 0.53, density 0.36/Å^3) but E/atom ~ +6.4; x0.45, x0.42: invalid
    batch = CrystalBatch.from_structures([prim, squeezed(prim, 0.50), squeezed(prim, 0.45), squeezed(prim, 0.42)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = EnergyReward({"name": "chgnet", "device": "cpu"})(batch)
    assert out.info["valid"].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert out.info["energy_per_atom_ev"][1] > 3.0
    assert out.rewards[1:].tolist() == [-3.0, -3.0, -3.0]  # breaking it further does not raise the reward
    assert out.info["penalty_capped"].tolist() == [0.0, 1.0, 0.0, 0.0]


def test_penalty_is_a_floor_hull(sevenn):
    prim = nacl_primitive()
    hull = build_hull([prim], sevenn)
    batch = CrystalBatch.from_structures([prim, squeezed(prim, 0.8), squeezed(prim, 0.7), cl_moved_near_na(prim, 0.6)])
    out = EnergyAboveHullReward(hull, invalid_penalty=3.0)(batch)
    e_hull = out.info["e_above_hull_ev_per_atom"].numpy()
    assert out.info["valid"].tolist() == [1.0, 1.0, 1.0, 0.0]
    assert 0.5 < e_hull[1] < 3.0 and e_hull[2] > 3.0  # raw e_hull in the info
    assert (out.rewards >= -3.0).all() and out.rewards[2].item() == -3.0
    assert out.info["penalty_capped"].tolist() == [0.0, 0.0, 1.0, 0.0]
    torch.testing.assert_close(out.rewards[:2], -out.info["e_above_hull_ev_per_atom"][:2])
    # an optional lower cap still applies to the reward only
    capped = EnergyAboveHullReward(hull, max_energy_above_hull=1.0)(batch)
    assert capped.rewards[1:3].tolist() == [-1.0, -1.0] and capped.info["e_above_hull_ev_per_atom"][1] > 1.0


# ---------------------------------------------------------------------------------------------- hull identity


def test_hull_records_and_enforces_the_sevenn_modal(tmp_path):
    pbe = get_backend({"name": "sevenn", "model": "7net-mf-0", "modal": "PBE", "device": "cpu"})
    r2scan = get_backend({"name": "sevenn", "model": "7net-mf-0", "modal": "R2SCAN", "device": "cpu"})
    prim = nacl_primitive()
    batch = CrystalBatch.from_structures([prim])
    e_pbe, e_r2 = float(pbe.energies(batch.to_atoms())[0]) / 2, float(r2scan.energies(batch.to_atoms())[0]) / 2
    assert abs(e_pbe - e_r2) > 1.0  # the modal sets the energy scale

    path = tmp_path / "hull.json"
    hull = build_hull([prim], pbe, out=path)
    assert hull.backend["modal"] == "PBE" and json.loads(path.read_text())["backend"]["modal"] == "PBE"
    with pytest.raises(ValueError, match="not comparable"):
        EnergyAboveHullReward(hull, backend=r2scan)
    with pytest.raises(ValueError, match="not comparable"):
        EnergyAboveHullReward(path, backend={"name": "sevenn", "model": "7net-mf-0", "modal": "R2SCAN", "device": "cpu"})
    # without a backend the recorded one is rebuilt from every recorded key, modal and dtype included
    reward = EnergyAboveHullReward(path)
    assert reward.backend is get_backend({"name": "sevenn", "model": "7net-mf-0", "modal": "PBE", "dtype": "float32"})
    assert abs(float(reward(batch).info["e_above_hull_ev_per_atom"][0])) < 1e-5  # the reference lies on its hull
    assert EnergyAboveHullReward(path, backend=pbe).backend is pbe


def test_hull_files_without_modal_load_with_a_clear_rule(tmp_path, sevenn):
    # a hull file written before `modal` was recorded: backend has name, model, dtype only
    def legacy(model: str):
        path = tmp_path / f"legacy-{model}.json"
        entry = {"id": "Na", "composition": {"Na": 1.0}, "energy_ev": -1.3}
        data = {"format": "crystalign-hull", "version": 1, "backend": {"name": "sevenn", "model": model, "dtype": "float32"},
                "meta": {}, "entries": [entry]}
        path.write_text(json.dumps(data))
        return path

    # single-fidelity 7net-0: modal never mattered, the file loads and matches the plain backend
    old = legacy("7net-0")
    assert EnergyAboveHullReward(old).backend.identity == sevenn.identity
    assert EnergyAboveHullReward(old, backend=sevenn).hull.identity == sevenn.identity == {"name": "sevenn", "model": "7net-0"}
    # multi-fidelity: no modal recorded reads as "built without one", refused for a backend with a modal
    mf = legacy("7net-mf-0")
    with pytest.raises(ValueError, match="records no 'modal'"):
        EnergyAboveHullReward(mf, backend={"name": "sevenn", "model": "7net-mf-0", "modal": "PBE", "device": "cpu"})
    # a modal is identity only for SevenNet; other backends are unchanged
    assert get_backend("sevenn", device="cpu", model="7net-mf-0", modal="PBE").identity == {
        "name": "sevenn", "model": "7net-mf-0", "modal": "PBE"
    }


def test_screened_energies_trust_check_can_be_switched_off(sevenn):
    broken = cl_moved_near_na(nacl_conventional(), 0.60)
    batch = CrystalBatch.from_structures([broken])
    assert not screened_energies(batch, sevenn).valid[0]
    off = screened_energies(batch, sevenn, min_radius_ratio=None)
    assert off.valid[0] and off.contact_ok[0] and off.radius_ratio[0] < 0.3


def test_interrupted_hull_build_resumes_with_the_same_entries(tmp_path, monkeypatch, perov_val_csv):
    import crystalign.rewards.hull as hull_module
    from crystalign.data import read_structures
    from crystalign.rewards.hull import build_hull

    refs = read_structures(perov_val_csv).batch[:3].to_structures()
    full = build_hull(refs, "sevenn", add_elements=False, out=tmp_path / "full.json", batch_size=1)
    real, calls = hull_module.screened_energies, {"n": 0}

    def interrupted_on_the_third_batch(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)

    out = tmp_path / "part.json"
    monkeypatch.setattr(hull_module, "screened_energies", interrupted_on_the_third_batch)
    with pytest.raises(KeyboardInterrupt):
        build_hull(refs, "sevenn", add_elements=False, out=out, batch_size=1)
    partial = tmp_path / ".part.json.partial.json"
    assert partial.exists() and not out.exists()
    saved = partial.read_bytes()
    with pytest.raises(FileExistsError, match="--resume"):  # a plain rerun used to delete the saved batches
        build_hull(refs, "sevenn", add_elements=False, out=out, batch_size=1)
    assert partial.read_bytes() == saved
    stale = tmp_path / ".part.json.partial.json.x1y2.part"  # a batch-file write that a kill cut short
    stale.write_text("{")
    os.utime(stale, (0, 0))
    with pytest.raises(ValueError, match="other references"):
        build_hull(refs[:2], "sevenn", add_elements=False, out=out, batch_size=1, resume=True)
    calls["n"] = -10  # no more interruptions; count the MLIP batches the resumed build still needs
    resumed = build_hull(refs, "sevenn", add_elements=False, out=out, batch_size=1, resume=True)
    assert calls["n"] == -9  # only the unfinished third batch was computed
    assert [(e.id, e.composition, e.energy_ev) for e in resumed.entries] == [(e.id, e.composition, e.energy_ev) for e in full.entries]
    assert not partial.exists() and not stale.exists()
