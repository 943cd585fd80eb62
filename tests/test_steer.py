"""crystalign.steer: inference-time RL from Python with a plain function as the objective, on the shipped
perov_5 model (real network, real pymatgen structures)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import crystalign
from crystalign.steering import SteeredModel

# reinforce the cell with strong exploration: the objective below depends on it alone
CELL_RL = dict(
    steps=8, group_size=8, num_groups=2, lr=3e-3, ppo_epochs=2, fields=["cell"], costs={"cell_policy": 1.0},
    noise={"pos": {"kind": "constant", "a": 0.3}, "cell": {"kind": "constant", "a": 0.3}},
    position_normalization="none", progress=False,
)


def volume_per_atom(structures):
    assert all(type(s).__name__ == "Structure" for s in structures)
    return [s.volume / len(s) for s in structures]


def test_steer_raises_a_python_objective():
    """A real learning test: 6 iterations toward larger volume per atom make sampled SrTiO3 cells far larger."""
    base = crystalign.steer("perov_5", volume_per_atom, ["SrTiO3"], iterations=0, **CELL_RL)
    steered = crystalign.steer("perov_5", volume_per_atom, "SrTiO3", iterations=6, **CELL_RL)
    assert [r["iteration"] for r in steered.history] == list(range(1, 7))
    before = np.mean(volume_per_atom(base.sample("SrTiO3", n=64, seed=3)))
    after = np.mean(volume_per_atom(steered.sample("SrTiO3", n=64, seed=3)))
    assert 10 < before < 25  # the base model's perovskite cells (~12-16 Å³/atom)
    assert after > 2 * before, (before, after)
    assert steered.history[-1]["volume_per_atom_mean"] > steered.history[0]["volume_per_atom_mean"]


def test_steer_run_folder_resumes_and_reloads(tmp_path):
    """With ``out`` every iteration is checkpointed: two iterations then a resumed third equal three in one go,
    and the saved policy samples exactly what the in-memory one does."""
    comps = ["SrTiO3", "BaZrO3"]
    whole = crystalign.steer("perov_5", volume_per_atom, comps, iterations=3, out=tmp_path / "whole", **CELL_RL)
    crystalign.steer("perov_5", volume_per_atom, comps, iterations=2, out=tmp_path / "part", **CELL_RL)
    with pytest.raises(FileExistsError, match="resume"):
        crystalign.steer("perov_5", volume_per_atom, comps, iterations=3, out=tmp_path / "part", **CELL_RL)
    part = crystalign.steer("perov_5", volume_per_atom, comps, iterations=3, out=tmp_path / "part", resume=True, **CELL_RL)
    assert [r["iteration"] for r in part.history] == [1, 2, 3]
    for a, b in zip(whole.policy.trainable_state().values(), part.policy.trainable_state().values()):
        assert torch.equal(a, b)

    loaded = SteeredModel.load(tmp_path / "part" / "last.pt")
    assert loaded.checkpoint == part.checkpoint and len(loaded.history) == 3
    mine, theirs = part.sample_batch(_template("BaZrO3", 4), seed=11), loaded.sample_batch(_template("BaZrO3", 4), seed=11)
    assert torch.equal(mine.frac, theirs.frac) and torch.equal(mine.lattice, theirs.lattice)
    again = loaded.sample_batch(_template("BaZrO3", 4), seed=11, noise=False)
    assert not torch.equal(again.lattice, theirs.lattice)  # the mean path differs from the stochastic policy


def _template(formula: str, n: int):
    from crystalign.generator import composition_batch

    return composition_batch([formula], n)


def test_steer_resume_refuses_other_compositions_and_records_plain_data(tmp_path):
    comps = ["SrTiO3", "BaZrO3"]
    # a reward config holding a Python function: the checkpoint records the reward's name, so it stays loadable
    spec = {"kind": "callable", "fn": volume_per_atom}
    crystalign.steer("perov_5", spec, comps, iterations=1, out=tmp_path / "run", **CELL_RL)
    assert SteeredModel.load(tmp_path / "run" / "last.pt").policy.config.reward == "volume_per_atom"
    with pytest.raises(ValueError, match="data.dataset"):
        crystalign.steer("perov_5", spec, ["CaTiO3"], iterations=2, out=tmp_path / "run", resume=True, **CELL_RL)
    with pytest.raises(ValueError, match="reward"):
        crystalign.steer("perov_5", lambda ss: [0.0] * len(ss), comps, iterations=2, out=tmp_path / "run", resume=True, **CELL_RL)
    resumed = crystalign.steer("perov_5", spec, comps, iterations=2, out=tmp_path / "run", resume=True, **CELL_RL)
    assert len(resumed.history) == 2
    # without validation best.pt is the final policy, also after a resumed run
    assert len(SteeredModel.load(tmp_path / "run" / "best.pt").history) == 2


def test_steer_seed_fixes_initialisation_without_touching_the_global_rng(tmp_path):
    """Velocity annealing starts from a freshly initialised s(t) network: the seed decides it, the caller's RNG
    is left alone; its learned s(t) then drives the scaled-velocity variant."""
    opts = dict(variant="scale", steps=6, group_size=4, num_groups=1, progress=False)
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = crystalign.steer("perov_5", volume_per_atom, "SrTiO3", iterations=0, seed=5, **opts)
    assert torch.equal(torch.rand(3), before)
    b = crystalign.steer("perov_5", volume_per_atom, "SrTiO3", iterations=0, seed=5, **opts)
    c = crystalign.steer("perov_5", volume_per_atom, "SrTiO3", iterations=0, seed=6, **opts)
    state = lambda m: torch.cat([v.flatten() for v in m.policy.trainable_state().values()])  # noqa: E731
    assert torch.equal(state(a), state(b)) and not torch.equal(state(a), state(c))

    crystalign.steer("perov_5", volume_per_atom, "SrTiO3", iterations=1, out=tmp_path / "scale", **opts)
    scaled = crystalign.steer(
        "perov_5", volume_per_atom, "SrTiO3", iterations=1, variant="scaled_velocity",
        scale_model=str(tmp_path / "scale" / "last.pt"), steps=6, group_size=4, num_groups=1, progress=False,
    )
    assert len(scaled.history) == 1 and len(scaled.sample("SrTiO3", n=2)) == 2
    # the frozen s(t) is saved with the scaled-velocity policy: it loads after its source run is gone
    crystalign.steer(
        "perov_5", volume_per_atom, "SrTiO3", iterations=1, variant="scaled_velocity", out=tmp_path / "sv",
        scale_model=str(tmp_path / "scale" / "last.pt"), steps=6, group_size=4, num_groups=1, progress=False,
    )
    import shutil

    shutil.rmtree(tmp_path / "scale")
    reloaded = SteeredModel.load(tmp_path / "sv" / "last.pt")
    assert len(reloaded.sample("SrTiO3", n=2, seed=1)) == 2


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(reward=42), TypeError, "reward must be a function of structures"),
        (dict(compositions=[]), ValueError, "compositions: no compositions given"),
        (dict(compositions=["Xx2O"]), ValueError, "Xx"),
        (dict(lr=1e-3, lerning_rate=1.0), TypeError, r"unknown RL option\(s\) \['lerning_rate'\]"),
        (dict(reward_scale=2, iterations=0), TypeError, "unknown RL option"),
        (dict(group_size=1), ValueError, "group_size must be >= 2"),
        (dict(model="no_such_model"), (ValueError, FileNotFoundError), "no_such_model"),
        (dict(resume=True), ValueError, "needs the run folder"),
        (dict(validation={"every": 1}), TypeError, r"unknown RL option\(s\) \['validation'\]"),
    ],
)
def test_steer_bad_input(kwargs, error, message):
    args = {"model": "perov_5", "reward": volume_per_atom, "compositions": ["SrTiO3"], "iterations": 1, "progress": False}
    args.update(kwargs)
    with pytest.raises(error, match=message):
        crystalign.steer(args.pop("model"), args.pop("reward"), args.pop("compositions"), **args)
