"""The Python API as a notebook user calls it: the top-level names, the natural argument types (a formula, a
pymatgen Composition, numpy integers, lists of Structures), errors that name the argument, and calls that leave
the caller's random state and thread count alone. Real shipped model, real rewards."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from pymatgen.core import Composition, Lattice, Structure

import crystalign
from crystalign import Generator
from crystalign.crystal import CrystalBatch
from crystalign.generator import parse_composition
from crystalign.metrics import csp_metrics
from crystalign.rewards.base import CallableReward, Reward, RewardResult, as_tensor
from crystalign.rewards.crmse import CRMSEReward
from crystalign.rewards.symmetry import NonTriclinicReward
from crystalign.steering import as_reward

TINY_RL = dict(
    iterations=1, steps=3, group_size=2, num_groups=1, progress=False,
    noise={"pos": {"kind": "constant", "a": 0.1}, "cell": {"kind": "constant", "a": 0.1}},
)


@pytest.fixture(scope="module")
def perov():
    return Generator.load("perov_5")


def nacl() -> Structure:
    return Structure(Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def test_top_level_names_stay_what_they_are():
    """`crystalign.predict` was replaced by its module once `crystalign.predict` (the module) had been imported."""
    import crystalign.prediction  # noqa: F401  (what a user or a library might import first)

    assert callable(crystalign.predict) and crystalign.predict is crystalign.prediction.predict
    assert callable(crystalign.predict)  # and on the second access
    for name in crystalign.__all__:
        assert importlib.util.find_spec(f"crystalign.{name}") is None, f"{name} is also a submodule's name"
        assert name in dir(crystalign)  # tab completion sees the lazy names


def test_compositions_as_a_formula_a_composition_or_a_list(perov):
    one = perov.sample_compositions("BN", n=2, steps=3)  # a string is one formula, not a list of characters
    assert [s.composition.reduced_formula for s in one] == ["BN", "BN"]
    same = perov.sample_compositions(Composition("BN"), n=2, steps=3)
    assert [s.composition.formula for s in same] == [s.composition.formula for s in one]
    mixed = perov.sample_compositions([Composition("SrTiO3"), "BaZrO3"], n=1, steps=3)
    assert [s.composition.reduced_formula for s in mixed] == ["SrTiO3", "BaZrO3"]
    assert parse_composition(Composition("Sr2Ti2O6")) == parse_composition("Sr2Ti2O6")
    with pytest.raises(ValueError, match="no compositions given"):
        perov.sample_compositions([], n=1)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        perov.sample_compositions("BN", batch_size=0)
    with pytest.raises(TypeError, match="formula string or a pymatgen Composition, got int"):
        parse_composition(5)
    with pytest.raises(TypeError, match="compositions must be a formula, a pymatgen Composition or a list of them, got int"):
        perov.sample_compositions(5)
    with pytest.raises(ValueError, match="fractional count 2.5 of Fe"):  # not silently Fe2O
        perov.sample_compositions(Composition("Fe2.5O"), n=1, steps=3)


def test_numpy_integer_seeds_are_seeds(perov):
    seed = np.arange(4)[3]
    a = perov.sample_compositions("SrTiO3", n=2, seed=seed, steps=3)
    b = perov.sample_compositions("SrTiO3", n=2, seed=3, steps=3)
    assert [s.frac_coords.tolist() for s in a] == [s.frac_coords.tolist() for s in b]
    with pytest.raises(TypeError, match="seed must be an integer or None, got float"):
        perov.sample_compositions("SrTiO3", seed=1.5)
    from crystalign.rl.config import RLConfig

    cfg = RLConfig(seed=np.int64(7))
    assert cfg.seed == 7 and type(cfg.seed) is int  # plain data in checkpoints and YAML


def test_steer_takes_numpy_seeds_and_compositions_and_leaves_threads_alone(perov):
    threads = torch.get_num_threads()
    steered = crystalign.steer(perov, lambda ss: [s.density for s in ss], Composition("SrTiO3"), seed=np.int64(1),
                               num_threads=1 if threads != 1 else 2, **TINY_RL)
    assert torch.get_num_threads() == threads
    assert [s.composition.reduced_formula for s in steered.sample(Composition("SrTiO3"), n=2, seed=np.int64(0))] == ["SrTiO3"] * 2
    with pytest.raises(ValueError, match="compositions: no compositions given"):
        crystalign.steer(perov, lambda ss: [1.0] * len(ss), [], **TINY_RL)


def test_a_callable_with_a_name_is_still_a_function_of_structures():
    class Density:
        name = "density"

        def __call__(self, structures):
            return [s.density for s in structures]

    reward = as_reward(Density())
    assert isinstance(reward, CallableReward) and reward.name == "density"
    result = reward([nacl()])
    assert result.info["density"].item() == pytest.approx(nacl().density)

    class BatchReward(Reward):  # a reward written against the batch interface declares itself
        name = "atoms"

        def __call__(self, batch):
            return RewardResult(as_tensor(batch.n_atoms.tolist(), batch))

    explicit = BatchReward()
    assert as_reward(explicit) is explicit

    class StrictSymmetry(NonTriclinicReward):  # a user's subclass of a shipped reward is a reward too
        name = "strict_symmetry"

    strict = StrictSymmetry()
    assert as_reward(strict) is strict


def test_rewards_take_the_structures_the_sampler_returns(perov):
    structures = perov.sample_compositions(["SrTiO3", "BaTiO3"], n=2, steps=5)
    batch = CrystalBatch.from_structures(structures)
    symmetry = NonTriclinicReward()
    assert torch.equal(symmetry(structures).rewards, symmetry(batch).rewards)
    refs = CrystalBatch.from_structures([nacl()])
    crmse = CRMSEReward(refs)  # references as a CrystalBatch, e.g. load_dataset(...).batch
    assert crmse([nacl()]).info["matched"].tolist() == [1.0]
    with pytest.raises(TypeError, match="a reward takes a CrystalBatch or pymatgen Structures, got str"):
        symmetry("SrTiO3")
    with pytest.raises(TypeError, match="fn must return one number per structure, got NoneType"):
        CallableReward(lambda ss: None, name="broken")([nacl(), nacl()])


def test_metrics_refuse_a_single_structure_or_a_fractional_k():
    with pytest.raises(TypeError, match="generated: give a list of Structures"):
        csp_metrics(nacl(), [nacl()], progress=False)
    with pytest.raises(TypeError, match="k must be an integer"):
        csp_metrics([nacl()], [nacl()], k=1.0, progress=False)


def test_loading_a_potential_leaves_the_callers_random_state_alone():
    from crystalign.rewards.mlip import SevenNetBackend

    torch.manual_seed(0)
    before = torch.get_rng_state()
    backend = SevenNetBackend(device="cpu").load()  # builds the network (random init) before loading weights
    backend.ase_calculator()
    assert torch.equal(torch.get_rng_state(), before)


def test_predict_options_in_python_types_and_bad_rl_options_up_front(tmp_path):
    from crystalign.prediction import PredictOptions

    opts = PredictOptions(composition=Composition("SrTiO3"), formula_units=[1, 2], seed=np.int64(4))
    assert (opts.composition, opts.formula_units, opts.seed) == ("SrTiO3", "1,2", 4)
    assert PredictOptions(formula_units=2).formula_units == "2"
    with pytest.raises(ValueError, match=r"RL options \(rl_\*\): variant must be one of"):
        crystalign.predict("SrTiO3", rl_variant="velocty", out=str(tmp_path / "p"), progress=False)
    assert not (tmp_path / "p").exists()  # refused before anything was sampled or written
