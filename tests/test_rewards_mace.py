"""The MACE backend. mace-torch pins an e3nn that sevenn cannot use, so it lives in its own environment
(`.ci/test-mace` builds one): here it must fail clearly when absent, and in a mace environment load a local
model file (no network) and give the ASE calculator's energies from its batched path."""

from __future__ import annotations

import importlib.util
import os

import pytest
from typer.testing import CliRunner

from crystalign.cli import app
from crystalign.rewards import get_backend, make_reward

HAVE_MACE = importlib.util.find_spec("mace") is not None
# .ci/test-mace sets CRYSTALIGN_REQUIRE_MACE: there a missing mace-torch fails the tests instead of skipping them
needs_mace = pytest.mark.skipif(
    not HAVE_MACE and not os.environ.get("CRYSTALIGN_REQUIRE_MACE"),
    reason="mace-torch lives in its own environment (crystalign[mace], see .ci/test-mace)",
)


@pytest.mark.skipif(HAVE_MACE, reason="mace-torch is installed: the missing-package error cannot occur")
def test_mace_missing_gives_clear_error():
    with pytest.raises(ImportError, match=r"needs the .mace-torch. package.*crystalign\[mace\]"):
        make_reward({"kind": "energy", "backend": "mace"})
    with pytest.raises(ImportError, match="'mace' energy backend needs"):
        get_backend({"name": "mace", "model": "model.model"})


@pytest.mark.skipif(HAVE_MACE, reason="mace-torch is installed: the missing-package error cannot occur")
def test_predict_with_mace_missing_fails_before_any_work(tmp_path):
    res = CliRunner().invoke(app, ["predict", "SrTiO3", "--backend", "mace", "--out", str(tmp_path / "p")])
    assert res.exit_code != 0 and "needs the 'mace-torch' package" in res.output
    assert not (tmp_path / "p").exists()


def _random_mace_file(path, z_table):
    """A randomly initialised MACE saved like the foundation-model files: exercises loading and batching, not
    accuracy (no MACE weights ship in a wheel)."""
    import mace  # noqa: F401  (must come before e3nn)
    import numpy as np
    import torch
    from e3nn import o3
    from mace import modules

    torch.manual_seed(0)
    block = modules.interaction_classes["RealAgnosticResidualInteractionBlock"]
    model = modules.ScaleShiftMACE(
        r_max=5.0, num_bessel=8, num_polynomial_cutoff=5, max_ell=2, interaction_cls=block, interaction_cls_first=block,
        num_interactions=2, num_elements=len(z_table), hidden_irreps=o3.Irreps("16x0e+16x1o"), MLP_irreps=o3.Irreps("16x0e"),
        atomic_energies=np.linspace(-1.0, -3.0, len(z_table)), avg_num_neighbors=10.0, atomic_numbers=list(z_table),
        correlation=3, gate=torch.nn.functional.silu, atomic_inter_scale=1.0, atomic_inter_shift=0.0,
    )
    torch.save(model, path)
    return path


@needs_mace
def test_mace_local_model_file(tmp_path):
    import torch
    from pymatgen.core import Lattice, Structure

    from crystalign.crystal import CrystalBatch
    from crystalign.rewards import EnergyReward

    path = _random_mace_file(tmp_path / "random.model", range(1, 90))
    nacl = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    batch = CrystalBatch.from_structures([nacl, nacl.copy()])
    backend = get_backend({"name": "mace", "model": str(path), "device": "cpu"})
    assert backend.dtype == torch.float64
    e = backend.energies(batch.to_atoms())
    assert all(x == x for x in e) and e[0] == pytest.approx(e[1])
    out = EnergyReward(backend)(batch)
    assert out.info["valid"].tolist() == [1.0, 1.0]
    with pytest.raises(RuntimeError, match="local .model file"):
        get_backend({"name": "mace", "model": "no-such-foundation-model", "device": "cpu"}).energies(batch.to_atoms())


@needs_mace
def test_mace_batched_energies_equal_the_calculator(tmp_path, mp20_sample_csv):
    """The batched energy-only forward (the default) gives the ASE calculator's energies structure by structure on real
    mp_20 crystals of different sizes; a structure with an element outside the model's table gets NaN alone."""
    import numpy as np

    from crystalign.data import load_dataset

    batch = load_dataset(mp20_sample_csv).batch[:12]
    atoms = batch.to_atoms()
    present = sorted({int(z) for a in atoms for z in a.numbers})
    # drop one element that only some of the structures contain from the model's table
    missing = next(z for z in present if 0 < sum(z in a.numbers for a in atoms) < len(atoms))
    table = [z for z in range(1, 90) if z != missing]
    path = _random_mace_file(tmp_path / "random.model", table)

    one_by_one = get_backend({"name": "mace", "model": str(path), "device": "cpu", "mode": "ase"}).energies(atoms)
    batched = get_backend({"name": "mace", "model": str(path), "device": "cpu", "batch_size": 5}).energies(atoms)
    unknown = np.array([not set(a.numbers.tolist()) <= set(table) for a in atoms])
    assert unknown.any() and not unknown.all()
    assert np.isnan(one_by_one[unknown]).all() and np.isnan(batched[unknown]).all()
    assert np.isfinite(one_by_one[~unknown]).all() and len(set(np.round(one_by_one[~unknown], 6))) > 1
    np.testing.assert_allclose(batched[~unknown], one_by_one[~unknown], rtol=1e-10, atol=1e-9)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        get_backend({"name": "mace", "model": str(path), "device": "cpu", "batch_size": 0})
    with pytest.raises(ValueError, match="mode must be 'fast' or 'ase'"):
        get_backend({"name": "mace", "model": str(path), "device": "cpu", "mode": "torch-sim"})


@needs_mace
def test_predict_with_a_local_mace_file(tmp_path):
    """`predict --backend mace` without a model file fails offline before any work; with one it runs, and the
    outputs name the MACE model."""
    import json

    # a foundation-model name that cannot be fetched (no network here; a name mace_mp rejects anywhere)
    res = CliRunner().invoke(
        app, ["predict", "SrTiO3", "--backend", "mace", "--mlip-model", "no-such-foundation-model", "--out", str(tmp_path / "none")]
    )
    assert res.exit_code != 0 and "local .model file" in res.output
    assert not (tmp_path / "none").exists()
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"not a model")
    for model, message in ((garbage, "garbage.model' could not be loaded"), (tmp_path / "typo.model", "typo.model does not exist")):
        res = CliRunner().invoke(app, ["predict", "SrTiO3", "--backend", "mace", "--mlip-model", str(model), "--out", str(tmp_path / "none")])
        assert res.exit_code != 0 and message in res.output and "Traceback" not in res.output, res.output
        assert not (tmp_path / "none").exists()

    path = _random_mace_file(tmp_path / "random.model", range(1, 90))
    out = tmp_path / "p"
    res = CliRunner().invoke(app, [
        "predict", "SrTiO3", "--backend", "mace", "--mlip-model", str(path), "-n", "4", "--rl-steps", "1",
        "--steps", "6", "--relax-top", "1", "--relax-steps", "2", "--out", str(out),
    ])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mlip"] == {"name": "mace", "model": str(path)}
