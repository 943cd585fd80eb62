"""Rewards on real pretrained MLIPs (SevenNet-0, CHGNet 0.3.0): energies, guards, the hull, the CLI."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from pymatgen.core import Lattice, Structure

from crystalign.crystal import CrystalBatch
from crystalign.geometry import ValidityThresholds
from crystalign.rewards import EnergyAboveHullReward, EnergyReward, MLIPBackend, ReferenceHull, build_hull, get_backend
from crystalign.rewards.hull import elemental_candidates

pytest.importorskip("sevenn", reason="the sevenn extra is not installed")


def read_csv_structures(path, n: int | None = None, ids: bool = False):
    import pandas as pd

    frame = pd.read_csv(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        structures = [Structure.from_str(cif, fmt="cif") for cif in frame["cif"].iloc[:n]]
    return (structures, frame["material_id"].iloc[:n].tolist()) if ids else structures


class CountingBackend(MLIPBackend):
    """The real backend, recording every structure it is asked to evaluate."""

    def __init__(self, inner: MLIPBackend) -> None:
        self.inner = inner
        self.name, self.model, self.device, self.dtype = inner.name, inner.model, inner.device, inner.dtype
        self.seen: list[int] = []  # atom counts of evaluated structures

    def energies(self, atoms_list):
        self.seen += [len(a) for a in atoms_list]
        return self.inner.energies(atoms_list)


@pytest.fixture(scope="module")
def mp20(mp20_sample_csv):
    return read_csv_structures(mp20_sample_csv, ids=True)


@pytest.fixture(scope="module")
def subset(mp20) -> CrystalBatch:
    return CrystalBatch.from_structures(mp20[0][:24])


@pytest.fixture(scope="module")
def sevenn():
    return get_backend("sevenn", device="cpu")


def nacl() -> Structure:
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def broken_structures() -> list[Structure]:
    """Atoms 0.1 Å apart, a flat cell, a tiny cell: all fail the shared validity check."""
    s = nacl()
    overlap = s.copy()
    overlap.replace(1, "Cl", coords=s[0].coords + np.array([0.1, 0, 0]), coords_are_cartesian=True)
    flat = Structure(Lattice([[4, 0, 0], [0, 4, 0], [2, 2, 1e-3]]), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.3]])
    tiny = Structure(Lattice.cubic(0.4), ["Na"], [[0, 0, 0]])
    return [overlap, flat, tiny]


# ---------------------------------------------------------------------------------------------- energies


def _check_energies(reward: EnergyReward, batch: CrystalBatch) -> None:
    first = reward(batch).info["energy_per_atom_ev"].numpy()
    # second run in reverse order: the result must not depend on batch position
    second = reward(batch[torch.arange(len(batch) - 1, -1, -1)]).info["energy_per_atom_ev"].numpy()[::-1]
    assert np.isfinite(first).all()
    assert np.all((first > -12.0) & (first < 0.0)), first
    np.testing.assert_allclose(first, second, atol=0.1)


def test_sevenn_energies_plausible_and_reproducible(subset, sevenn):
    _check_energies(EnergyReward(sevenn), subset)
    batched = get_backend("sevenn", device="cpu", batch_size=6).energies(subset[:12].to_atoms())
    np.testing.assert_allclose(batched, sevenn.energies(subset[:12].to_atoms()), atol=1e-3)


def test_chgnet_energies_plausible_and_reproducible(subset):
    pytest.importorskip("chgnet", reason="the chgnet extra is not installed")
    _check_energies(EnergyReward({"name": "chgnet", "device": "cpu"}), subset)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sevenn", "chgnet"])
def test_energies_all_mp20_sample(mp20, backend):
    if backend == "chgnet":
        pytest.importorskip("chgnet", reason="the chgnet extra is not installed")
    _check_energies(EnergyReward({"name": backend, "device": "cpu"}), CrystalBatch.from_structures(mp20[0]))


def test_sevenn_fast_path_matches_ase_calculator(subset, sevenn):
    atoms = subset[:3].to_atoms()
    n = np.array([len(a) for a in atoms])
    fast = sevenn.energies(atoms) / n
    ase = get_backend("sevenn", device="cpu", mode="ase").energies(atoms) / n
    np.testing.assert_allclose(fast, ase, atol=1e-4)
    double = get_backend("sevenn", device="cpu", dtype="float64").energies(atoms) / n
    np.testing.assert_allclose(double, fast, atol=1e-4)


# ---------------------------------------------------------------------------------------------- guards


def test_invalid_structures_get_penalty_without_mlip_call(subset, sevenn):
    counting = CountingBackend(sevenn)
    good = subset[:2].to_structures()
    batch = CrystalBatch.from_structures([good[0], *broken_structures(), good[1]])
    out = EnergyReward(counting, invalid_penalty=3.0, scale=2.0)(batch)
    assert counting.seen == [len(good[0]), len(good[1])]  # the MLIP saw only the valid structures
    assert out.rewards[1:4].tolist() == [-6.0] * 3
    assert out.info["valid"].tolist() == [1.0, 0.0, 0.0, 0.0, 1.0]
    assert out.info["invalid_geometry"].tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
    assert torch.isnan(out.info["energy_per_atom_ev"][1:4]).all()
    e = out.info["energy_per_atom_ev"]
    torch.testing.assert_close(out.rewards[[0, 4]], -2.0 * e[[0, 4]])


def test_absurd_energy_guard(sevenn):
    # with the validity screen switched off, SevenNet scores atoms 0.1 Å apart at ~ -1e8 eV/atom
    overlap = broken_structures()[0]
    batch = CrystalBatch.from_structures([nacl(), overlap])
    raw = sevenn.energies(batch.to_atoms()) / 2
    assert raw[1] < -20.0
    out = EnergyReward(sevenn, thresholds=ValidityThresholds(0.0, 0.0, 0.0))(batch)
    assert out.info["invalid_energy"].tolist() == [0.0, 1.0]
    assert out.rewards[1] == -3.0 and 2.0 < out.rewards[0] < 5.0


def test_clip_std_clips_valid_energies(subset, sevenn):
    plain = EnergyReward(sevenn)(subset[:8])
    clipped = EnergyReward(sevenn, clip_std=0.5)(subset[:8])
    e = plain.info["energy_per_atom_ev"]
    lo, hi = e.mean() - 0.5 * e.std(unbiased=False), e.mean() + 0.5 * e.std(unbiased=False)
    torch.testing.assert_close(clipped.rewards, -e.clamp(lo, hi))


def test_chgnet_isolated_atom_gives_nan_not_a_failed_batch():
    pytest.importorskip("chgnet", reason="the chgnet extra is not installed")
    lone = Structure(Lattice.cubic(14.0), ["Cu"], [[0, 0, 0]])  # nothing within CHGNet's 6 Å cutoff
    backend = get_backend("chgnet", device="cpu")
    e = backend.energies(CrystalBatch.from_structures([nacl(), lone]).to_atoms())
    assert np.isfinite(e[0]) and np.isnan(e[1])
    # CHGNet's own ASE calculator shares the model; making one (as relaxations do) must not change that answer
    backend.ase_calculator()
    e = backend.energies(CrystalBatch.from_structures([nacl(), lone]).to_atoms())
    assert np.isfinite(e[0]) and np.isnan(e[1])


def test_backend_errors_are_clear():
    with pytest.raises(ValueError, match="unknown MLIP backend 'nequip'"):
        get_backend("nequip")
    with pytest.raises(ValueError, match="float32 only"):
        get_backend("chgnet", dtype="float64")


def test_model_files_load_and_bad_ones_are_named(tmp_path):
    """A backend's own weights given as a file load like its name; a damaged file, a folder or an unknown name is
    an MLIPLoadError naming it (not a traceback from deep inside torch.load)."""
    from pathlib import Path

    from sevenn.util import pretrained_name_to_path

    from crystalign.rewards.mlip import CHGNetBackend, MLIPLoadError, SevenNetBackend

    pytest.importorskip("chgnet", reason="the chgnet extra is not installed")
    import chgnet.model.model as chgnet_model

    atoms = CrystalBatch.from_structures([nacl()]).to_atoms()
    cases = [
        (SevenNetBackend, "7net-0", Path(pretrained_name_to_path("7net-0"))),
        (CHGNetBackend, "0.3.0", next((Path(chgnet_model.module_dir).parent / "pretrained" / "0.3.0").glob("*.pth.tar"))),
    ]
    for cls, name, file in cases:
        kind = cls.__name__.removesuffix("Backend")
        by_file = cls(model=str(file), device="cpu").energies(atoms)
        np.testing.assert_allclose(by_file, cls(model=name, device="cpu").energies(atoms), rtol=0, atol=1e-6)
        damaged = tmp_path / f"{kind}.pth"
        damaged.write_bytes(file.read_bytes()[:4096])
        with pytest.raises(MLIPLoadError, match=rf"{kind} model file '{damaged}' could not be loaded"):
            cls(model=str(damaged), device="cpu").load()
        with pytest.raises(MLIPLoadError, match="is a folder, not a model file"):
            cls(model=str(tmp_path), device="cpu").load()
    with pytest.raises(MLIPLoadError, match="neither a file nor one of the shipped models 0.3.0, 0.2.0, r2scan"):
        CHGNetBackend(model="0.4.0", device="cpu").load()


def test_exploded_cells_are_not_evaluated(sevenn):
    """Two atoms thousands of Å apart: CHGNet's neighbour search asked for 126 GB; such a cell is invalid with a
    reason and never reaches the MLIP, and the rest of the batch is scored."""
    from crystalign.rewards.energy import MIN_NUMBER_DENSITY, screened_energies

    exploded = Structure(Lattice.cubic(5000.0), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    assert 2 / exploded.volume < MIN_NUMBER_DENSITY
    counting = CountingBackend(sevenn)
    batch = CrystalBatch.from_structures([nacl(), exploded])
    screened = screened_energies(batch, counting)
    assert counting.seen == [len(nacl())]
    assert screened.valid.tolist() == [True, False] and screened.dilute.tolist() == [False, True]
    assert screened.reasons()[1].startswith("too dilute")
    assert -6.0 < screened.energy_per_atom[0] < -2.0


# ---------------------------------------------------------------------------------------------- hull


@pytest.fixture(scope="module")
def small_hull(mp20, sevenn, tmp_path_factory):
    structures, ids = mp20
    keep = [k for k, s in enumerate(structures) if s.composition.reduced_formula in ("CuNi", "AlAu4", "LiMg")]
    assert len(keep) == 3
    path = tmp_path_factory.mktemp("hull") / "hull.json"
    hull = build_hull([structures[k] for k in keep], sevenn, ids=[ids[k] for k in keep], out=path)
    return hull, path, [structures[k] for k in keep]


def test_hull_build_and_round_trip(small_hull):
    hull, path, refs = small_hull
    data = json.loads(path.read_text())
    assert data["format"] == "crystalign-hull" and data["backend"]["name"] == "sevenn"
    assert hull.elements == {"Cu", "Ni", "Al", "Au", "Li", "Mg"}  # elemental references were added
    assert len(hull.entries) == 3 + 6
    again = ReferenceHull.load(path)
    assert [(e.composition, e.energy_ev, e.id) for e in again.entries] == [(e.composition, e.energy_ev, e.id) for e in hull.entries]
    assert again.backend == hull.backend


def test_e_above_hull_reward(small_hull, sevenn, mp20):
    hull, path, refs = small_hull
    uncovered = next(s for s in mp20[0] if "O" in s.composition)
    broken = refs[0].copy()
    broken.replace(1, broken[1].species, coords=broken[0].coords + np.array([0.1, 0, 0]), coords_are_cartesian=True)
    batch = CrystalBatch.from_structures([*refs, uncovered, broken])
    reward = EnergyAboveHullReward(path, invalid_penalty=2.0, uncovered_penalty=5.0)
    assert reward.backend is sevenn  # the backend recorded in the hull file, from the per-process cache
    with pytest.warns(UserWarning, match="no elemental reference for"):
        out = reward(batch)
    e_hull = out.info["e_above_hull_ev_per_atom"].numpy()
    assert np.all(e_hull[:3] >= -1e-6)  # reference entries cannot lie below their own hull
    on_hull = e_hull[:3] < 1e-6
    assert on_hull.any(), e_hull
    assert out.rewards[3] == -5.0 and out.info["hull_covered"][3] == 0.0  # oxide: no O reference
    assert out.rewards[4] == -2.0 and out.info["valid"][4] == 0.0  # covered but invalid
    torch.testing.assert_close(out.rewards[:3], -torch.as_tensor(e_hull[:3]))
    with pytest.raises(ValueError, match="not comparable"):
        EnergyAboveHullReward(path, backend={"name": "chgnet", "device": "cpu"})


def test_elemental_candidates_cover_awkward_elements():
    (label, dimer), = elemental_candidates("O")
    assert label == "O2-dimer" and len(dimer) == 2
    ga = elemental_candidates("Ga")  # ASE has no crystal reference for Ga: prototypes over volumes
    assert len(ga) > 4 and all(s.composition.reduced_formula == "Ga" for _, s in ga)
    assert CrystalBatch.from_structures([s for _, s in ga] + [dimer]).validity().valid.all()


def test_hull_cli(small_hull, tmp_path, mp20_sample_csv):
    import typer
    from typer.testing import CliRunner

    from crystalign.cli.hull import register

    app = typer.Typer()
    register(app)
    refs = tmp_path / "refs.cif"
    small_hull[2][0].to(filename=str(refs))
    out = tmp_path / "cli_hull.json"
    result = CliRunner().invoke(app, ["hull", "build", str(refs), "--backend", "sevenn", "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    hull = ReferenceHull.load(out)
    assert hull.elements == set(small_hull[2][0].composition.as_dict())
    bad = CliRunner().invoke(app, ["hull", "build", str(refs), "--backend", "nequip", "--out", str(out)])
    assert bad.exit_code == 2 and "unknown MLIP backend" in bad.output


def test_a_failing_chunk_costs_only_its_failing_structures():
    """Batched backends evaluate chunks; a chunk that raises (e.g. out of GPU memory for the whole batch, or one
    structure the model chokes on) is retried one structure at a time: only the structure that fails by
    itself gets NaN, and the failure is reported."""
    from crystalign.rewards.mlip import energies_in_chunks

    calls = []

    def evaluate(keys):
        calls.append(list(keys))
        if 7 in keys:
            raise RuntimeError("CUDA out of memory" if len(keys) > 1 else "cannot evaluate structure 7")
        return np.array(keys, dtype=float) * 2.0

    with pytest.warns(UserWarning, match=r"toy: 1 structure\(s\) could not be evaluated .*structure 7"):
        out = energies_in_chunks(list(range(10)), 4, evaluate, "toy")
    expected = np.arange(10) * 2.0
    expected[7] = np.nan
    np.testing.assert_array_equal(out, expected)
    assert calls == [[0, 1, 2, 3], [4, 5, 6, 7], [4], [5], [6], [7], [8, 9]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no failure, no warning
        np.testing.assert_array_equal(energies_in_chunks([1, 2], 4, evaluate, "toy"), [2.0, 4.0])


def test_novelty_penalty_charges_repeats_of_archived_structures(sevenn, perov_val_csv):
    """A slightly displaced copy of a structure is a repeat: the higher-energy one of the pair pays the penalty,
    exactly, the distinct one does not; once archived, every structure of the batch is a repeat."""
    from crystalign.data import read_structures
    from crystalign.rewards.novelty import NoveltyReward

    two = read_structures(perov_val_csv).batch[:2]
    kick = torch.randn(two.frac[:5].shape, generator=torch.Generator().manual_seed(0), dtype=two.frac.dtype)
    copy = two[:1].replace(frac=(two.frac[:5] + 0.005 * kick) % 1.0)
    batch = CrystalBatch.cat([two, copy])  # structure 0, a different structure 1, a copy of 0
    inner = EnergyReward(sevenn)
    reward = NoveltyReward(inner, penalty=0.25)
    plain = inner(batch)
    result = reward(batch)
    e = plain.info["energy_per_atom_ev"]
    repeat = 0 if e[0] > e[2] else 2
    expected = torch.zeros(3, dtype=torch.float64)
    expected[repeat] = 1.0
    torch.testing.assert_close(result.info["duplicate"].cpu(), expected)
    torch.testing.assert_close(result.rewards.double(), plain.rewards.double() - 0.25 * expected)
    torch.testing.assert_close(result.info["energy_per_atom_ev"], e)  # the energies themselves stay the potential's
    assert reward.archive_size == 2
    again = reward(batch)
    assert again.info["duplicate"].tolist() == [1.0, 1.0, 1.0] and reward.archive_size == 2
    with pytest.raises(ValueError, match="novelty penalty must be > 0"):
        NoveltyReward(inner, penalty=0.0)
