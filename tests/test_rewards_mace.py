"""The MACE backend. mace-torch pins an e3nn that sevenn cannot use, so it lives in its own environment:
here it must fail clearly when absent, and in a mace environment load a local model file (no network)."""

from __future__ import annotations

import importlib.util

import pytest

from crystalign.rewards import get_backend, make_reward

HAVE_MACE = importlib.util.find_spec("mace") is not None


@pytest.mark.skipif(HAVE_MACE, reason="mace-torch is installed: the missing-package error cannot occur")
def test_mace_missing_gives_clear_error():
    with pytest.raises(ImportError, match=r"needs the .mace-torch. package.*crystalign\[mace\]"):
        make_reward({"kind": "energy", "backend": "mace"})
    with pytest.raises(ImportError, match="'mace' energy backend needs"):
        get_backend({"name": "mace", "model": "model.model"})


@pytest.mark.skipif(not HAVE_MACE, reason="mace-torch lives in its own environment (crystalign[mace])")
def test_mace_local_model_file(tmp_path):
    import mace  # noqa: F401  (must come before e3nn)
    import numpy as np
    import torch
    from e3nn import o3
    from mace import modules
    from pymatgen.core import Lattice, Structure

    from crystalign.crystal import CrystalBatch
    from crystalign.rewards import EnergyReward

    # a randomly initialised model saved like the foundation-model files: exercises loading, not accuracy
    z_table = list(range(1, 90))
    block = modules.interaction_classes["RealAgnosticResidualInteractionBlock"]
    model = modules.ScaleShiftMACE(
        r_max=5.0, num_bessel=8, num_polynomial_cutoff=5, max_ell=2, interaction_cls=block, interaction_cls_first=block,
        num_interactions=2, num_elements=len(z_table), hidden_irreps=o3.Irreps("16x0e+16x1o"), MLP_irreps=o3.Irreps("16x0e"),
        atomic_energies=np.zeros(len(z_table)), avg_num_neighbors=10.0, atomic_numbers=z_table, correlation=3,
        gate=torch.nn.functional.silu, atomic_inter_scale=1.0, atomic_inter_shift=0.0,
    )
    path = tmp_path / "random.model"
    torch.save(model, path)
    nacl = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    batch = CrystalBatch.from_structures([nacl, nacl.copy()])
    backend = get_backend({"name": "mace", "model": str(path), "device": "cpu"})
    assert backend.dtype == torch.float64
    e = backend.energies(batch.to_atoms())
    assert np.isfinite(e).all() and e[0] == pytest.approx(e[1])
    out = EnergyReward(backend)(batch)
    assert out.info["valid"].tolist() == [1.0, 1.0]
    with pytest.raises(RuntimeError, match="local .model file"):
        get_backend({"name": "mace", "model": "no-such-foundation-model", "device": "cpu"}).energies(batch.to_atoms())
