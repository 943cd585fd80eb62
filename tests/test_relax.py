"""Batched relaxation: the same trajectories as ASE's own FIRE, one batched potential call per step, failures
and divergence confined to their structure, constraints honoured. Real SevenNet-0 and CHGNet forces throughout."""

from __future__ import annotations

import numpy as np
import pytest

from crystalign.relax import relax_batch
from crystalign.rewards.mlip import ForceField, MLIPBackend, get_backend

pytestmark = pytest.mark.data


@pytest.fixture(scope="module")
def kicked_atoms(perov_val_csv):
    """Real perov_5 structures, displaced off their minimum (their DFT cells are not SevenNet's minimum either, so
    the cell relaxes too): the first converges within 70 FIRE steps, the second does not."""
    from crystalign.data import read_structures

    atoms = [read_structures(perov_val_csv).batch.to_atoms()[i] for i in (6, 0)]
    rng = np.random.default_rng(0)
    for a in atoms:
        a.positions += rng.normal(0.0, 0.02, a.positions.shape)
    return atoms


class CountingBackend(MLIPBackend):
    """Wraps a real backend and records how many structures each call carried."""

    def __init__(self, inner: MLIPBackend, sabotage: dict[int, int] | None = None):
        self.inner, self.calls = inner, []
        self.name, self.model, self.device, self.dtype = inner.name, inner.model, inner.device, inner.dtype
        self.sabotage = sabotage or {}  # atoms.info["tag"] -> from which call on its energy explodes

    def energies(self, atoms_list):
        return self.inner.energies(atoms_list)

    def energy_forces_stress(self, atoms_list):
        self.calls.append(len(atoms_list))
        out = self.inner.energy_forces_stress(atoms_list)
        for tag, call in self.sabotage.items():
            for k, atoms in enumerate(atoms_list):
                if atoms.info.get("tag") == tag and len(self.calls) >= call:
                    out[k] = ForceField(-1e6 * len(atoms), out[k].forces, out[k].stress)  # energy -> -inf
        return out


def test_sevenn_batched_forces_and_stress_equal_its_ase_calculator(kicked_atoms):
    sevenn = get_backend("sevenn")
    calc = sevenn.ase_calculator()
    batched = sevenn.energy_forces_stress(kicked_atoms)
    for atoms, res in zip(kicked_atoms, batched):
        ref = atoms.copy()
        ref.calc = calc
        assert res.energy == pytest.approx(ref.get_potential_energy(), abs=1e-4)
        np.testing.assert_allclose(res.forces, ref.get_forces(), atol=1e-4)
        np.testing.assert_allclose(res.stress, ref.get_stress(), atol=1e-6)
        assert np.abs(res.stress).max() > 1e-4  # a strained cell: the comparison is not of zeros


def test_chgnet_batched_forces_and_stress_equal_its_ase_calculator(kicked_atoms):
    chgnet = get_backend("chgnet")
    calc = chgnet.ase_calculator()
    for atoms, res in zip(kicked_atoms, chgnet.energy_forces_stress(kicked_atoms)):
        ref = atoms.copy()
        ref.calc = calc
        assert res.energy == pytest.approx(ref.get_potential_energy(), abs=1e-4)
        np.testing.assert_allclose(res.forces, ref.get_forces(), atol=1e-4)
        np.testing.assert_allclose(res.stress, ref.get_stress(), atol=1e-6)


def test_batched_fire_follows_ase_fire_step_for_step_with_one_call_per_step(kicked_atoms):
    from ase.filters import FrechetCellFilter
    from ase.optimize import FIRE

    sevenn = get_backend("sevenn")
    counting = CountingBackend(sevenn)
    relaxed = relax_batch(kicked_atoms, counting, steps=70, fmax=0.05)
    steps = [a.info["relax_steps"] for a in relaxed]
    # one call per optimiser step for all structures still relaxing, never one call per structure
    assert len(counting.calls) == max(steps) + 1 and counting.calls[0] == len(kicked_atoms)
    assert counting.calls == sorted(counting.calls, reverse=True)
    calc = sevenn.ase_calculator()
    for atoms, ours in zip(kicked_atoms, relaxed):
        ref = atoms.copy()
        ref.calc = calc
        opt = FIRE(FrechetCellFilter(ref), logfile=None)
        converged = opt.run(fmax=0.05, steps=70)
        assert ours.info["relax_status"] == ("converged" if converged else "not_converged")
        assert ours.info["relax_steps"] == opt.nsteps
        per_atom = ref.get_potential_energy() / len(ref)
        assert ours.info["relax_energy_ev"] / len(ours) == pytest.approx(per_atom, abs=1e-3)  # the same minimum
        np.testing.assert_allclose(ours.positions, ref.positions, atol=1e-3)
        np.testing.assert_allclose(ours.cell[:], ref.cell[:], atol=1e-3)
    assert [a.info["relax_status"] for a in relaxed] == ["converged", "not_converged"]


def test_a_diverging_candidate_fails_alone_and_the_others_relax_as_before(kicked_atoms):
    atoms = [a.copy() for a in kicked_atoms]
    for tag, a in enumerate(atoms):
        a.info["tag"] = tag
    sevenn = get_backend("sevenn")
    clean = relax_batch(atoms, sevenn, steps=10, fmax=0.05)
    broken = relax_batch(atoms, CountingBackend(sevenn, sabotage={0: 4}), steps=10, fmax=0.05)
    assert broken[0].info["relax_status"] == "failed" and "diverged" in broken[0].info["relax_error"]
    np.testing.assert_array_equal(broken[0].positions, atoms[0].positions)  # the starting geometry is kept
    assert broken[1].info["relax_status"] == clean[1].info["relax_status"] == "not_converged"
    np.testing.assert_allclose(broken[1].positions, clean[1].positions, atol=1e-6)


def test_a_symmetry_constraint_is_honoured(perov_val_csv):
    """FixSymmetry added through ``prepare`` keeps the cubic perovskite cubic while FIRE relaxes its cell."""
    from ase.constraints import FixSymmetry
    from ase.spacegroup.symmetrize import check_symmetry
    from pymatgen.core import Lattice, Structure
    from pymatgen.io.ase import AseAtomsAdaptor

    cubic = Structure.from_spacegroup("Pm-3m", Lattice.cubic(4.05), ["Sr", "Ti", "O"], [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0]])
    atoms = AseAtomsAdaptor.get_atoms(cubic)
    out = relax_batch([atoms], get_backend("sevenn"), steps=40, fmax=0.02, prepare=lambda a: a.set_constraint(FixSymmetry(a)))[0]
    assert check_symmetry(out, 1e-4).number == 221
    assert abs(out.cell.cellpar()[0] - 4.05) > 1e-3  # the cell did relax
    assert not out.constraints  # the returned structure carries no optimiser constraint


def test_bad_arguments_are_refused(kicked_atoms):
    sevenn = get_backend("sevenn")
    with pytest.raises(ValueError, match="steps must be >= 0"):
        relax_batch(kicked_atoms, sevenn, steps=-1)
    with pytest.raises(ValueError, match="fmax must be > 0"):
        relax_batch(kicked_atoms, sevenn, fmax=0.0)


def test_an_element_the_potential_lacks_fails_that_structure_only(kicked_atoms):
    odd = kicked_atoms[0].copy()
    odd.numbers[0] = 100  # fermium: not in SevenNet-0's element table
    with pytest.warns(UserWarning, match="could not be evaluated"):
        out = relax_batch([odd, kicked_atoms[1]], get_backend("sevenn"), steps=3, fmax=0.05)
    assert out[0].info["relax_status"] == "failed" and out[1].info["relax_status"] in ("converged", "not_converged")
    assert out[1].info["relax_steps"] <= 3 and np.isfinite(out[1].info["relax_energy_ev"])
