"""De novo generation: the masked species flow (math), DNG training and sampling on real data, `generate`."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from crystalign.cli import app
from crystalign.config import ConfigError
from crystalign.generator import Generator, GeneratorConfig
from crystalign.interpolants import MASK, Interpolants, MaskedSpecies, time_grid
from crystalign.training import TrainConfig, train

from test_training import TINY, with_changes

DNG_TINY = with_changes(
    TINY,
    **{
        "generator.net.dng": True,
        "generator.interpolants.species": {"kind": "mask", "noise": 0.2},
        "generator.interpolants.relative_costs": {"pos_b": 0.45, "cell_b": 0.05, "species": 0.5},
        "validation.match_every_n_epochs": 0,
        "optim.max_epochs": 3,
    },
)


def dng_config(**changes) -> TrainConfig:
    from crystalign.config import from_dict

    return from_dict(TrainConfig, with_changes(DNG_TINY, **changes))


@pytest.fixture(scope="module")
def dng_model(tmp_path_factory, data_root):
    out = tmp_path_factory.mktemp("dng") / "run"
    result = train(dng_config(), out, data_root=str(data_root))
    return out / "model.pt", result


# ------------------------------------------------------------------ the species flow, against its math
@pytest.mark.parametrize("t", [0.1, 0.5, 0.9])
def test_interpolation_reveals_each_species_with_probability_t(t):
    g = torch.Generator().manual_seed(0)
    x1 = torch.randint(1, 101, (40_000,), generator=g)
    xt = MaskedSpecies(0.3).interpolate(torch.full((40_000,), t), x1, generator=g)
    revealed = xt != MASK
    assert abs(revealed.double().mean().item() - t) < 0.01
    assert torch.equal(xt[revealed], x1[revealed])  # a revealed token is the data's, never another element


def test_loss_is_cross_entropy_against_atomic_number_minus_one():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(7, 100, generator=g)
    x1 = torch.tensor([1, 8, 22, 38, 100, 55, 3])
    expected = -torch.log_softmax(logits, -1)[torch.arange(7), x1 - 1].mean()
    assert torch.allclose(MaskedSpecies.loss(logits, x1), expected)
    sure = F.one_hot(x1 - 1, 100).float() * 50.0  # a model certain of the right element has ~zero loss
    assert MaskedSpecies.loss(sure, x1).item() < 1e-12 + 1e-6


@pytest.mark.parametrize("noise", [0.0, 0.5, 2.0])
def test_masked_fraction_follows_one_minus_t_along_sampling(noise):
    """The unmask rate (1 + ηt)/(1 − t) and the re-mask rate η keep P(masked) = 1 − t at every time: the sampler
    walks the interpolant's marginals whatever the noise (d/dt P = −P(1+ηt)/(1−t) + (1−P)η = −1 at P = 1 − t)."""
    g = torch.Generator().manual_seed(2)
    flow = MaskedSpecies(noise)
    n = 10_000
    species = torch.zeros(n, dtype=torch.long)
    logits = torch.zeros(n, 100)
    ts = time_grid(200, dtype=torch.float64).tolist()
    for k in range(len(ts) - 1):
        species = flow.step(species, logits, ts[k], ts[k + 1] - ts[k], last=k == len(ts) - 2, generator=g)
        if k + 1 in (50, 100, 150):
            masked = (species == MASK).double().mean().item()
            assert abs(masked - (1 - ts[k + 1])) < 0.02, (ts[k + 1], masked)
    assert not (species == MASK).any()  # the last step reveals everything
    assert species.min() >= 1 and species.max() <= 100


def test_revealed_species_follow_the_predicted_probabilities():
    g = torch.Generator().manual_seed(3)
    logits = torch.full((30_000, 100), -1e9)
    logits[:, 7] = 0.0  # O (Z = 8) ...
    logits[:, 21] = torch.log(torch.tensor(3.0))  # ... and Ti (Z = 22), three times as likely
    out = MaskedSpecies(0.0).step(torch.zeros(30_000, dtype=torch.long), logits, 0.5, 0.1, last=True, generator=g)
    assert set(out.unique().tolist()) == {8, 22}
    assert abs((out == 22).double().mean().item() - 0.75) < 0.01


def test_species_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"interpolants.species.noise"):
        Interpolants.from_config({"pos": {"path": "linear"}, "species": {"noise": -1}})
    with pytest.raises(ConfigError, match=r"interpolants.species.kind"):
        Interpolants.from_config({"pos": {"path": "linear"}, "species": {"kind": "uniform"}})
    with pytest.raises(ConfigError, match=r"only DNG models train species"):
        Interpolants.from_config({"pos": {"path": "linear"}, "relative_costs": {"pos_b": 1, "cell_b": 1, "species": 1}})
    with pytest.raises(ConfigError, match=r"no cost for active loss.*species"):
        Interpolants.from_config({"pos": {"path": "linear"}, "species": {"noise": 0.1}, "relative_costs": {"pos_b": 1, "cell_b": 1}})
    # net and interpolants must agree on being DNG
    from crystalign.config import from_dict
    from crystalign.distributions import BaseDistribution

    cfg = from_dict(GeneratorConfig, {"net": {"hidden_dim": 16, "num_layers": 1, "num_freqs": 4, "time_dim": 8, "dng": True}})
    with pytest.raises(ValueError, match="net.dng and generator.interpolants.species must agree"):
        Generator(cfg, BaseDistribution.from_preset("perov_5"))


# ------------------------------------------------------------------ training and sampling on real data
def test_dng_training_learns_species_and_records_atom_counts(dng_model):
    path, result = dng_model
    gen = Generator.load(path)
    assert gen.is_dng and gen.atom_counts() == {5: 86}  # 96 perov_5 structures, 10 % held out
    metrics = (path.parent / "logs" / "version_0" / "metrics.csv").read_text().splitlines()
    header = metrics[0].split(",")
    col = header.index("train/species")
    losses = [float(row.split(",")[col]) for row in metrics[1:] if row.split(",")[col]]
    assert len(losses) == 3 and losses[-1] < losses[0] - 0.2  # the species cross-entropy falls from its start


def test_generate_gives_complete_reproducible_crystals(dng_model):
    gen = Generator.load(dng_model[0])
    a = gen.generate(12, seed=5, steps=6, batch_size=5)
    b = gen.generate(12, seed=5, steps=6, batch_size=5)
    c = gen.generate(12, seed=6, steps=6, batch_size=5)
    assert torch.equal(a.species, b.species) and torch.equal(a.frac, b.frac) and torch.equal(a.lattice, b.lattice)
    assert not torch.equal(a.frac, c.frac)
    assert a.n_atoms.tolist() == [5] * 12 and a.species.min() >= 1 and a.species.max() <= 100
    assert a.ids == [f"dng_{i:06d}" for i in range(12)]
    sized = gen.generate(3, atoms=[2, 4, 7], seed=0, steps=4)
    assert sized.n_atoms.tolist() == [2, 4, 7] and len(sized.to_structures()[2]) == 7


def test_dng_and_csp_models_refuse_each_others_jobs(dng_model):
    gen = Generator.load(dng_model[0])
    with pytest.raises(ValueError, match="de novo"):
        gen.sample_compositions("SrTiO3")
    with pytest.raises(ValueError, match="outside this model's range"):
        gen.generate(2, atoms=0)
    with pytest.raises(ValueError, match="outside this model's range"):
        gen.generate(2, atoms=gen.config.max_atoms + 1)
    with pytest.raises(ValueError, match="CSP"):
        Generator.load("perov_5").generate(2)
    from crystalign.steering import steer

    with pytest.raises(ValueError, match="de novo"):
        steer(gen, lambda structures: [0.0] * len(structures), ["SrTiO3"], iterations=1)


def test_generate_cli_writes_what_the_api_generates_and_resumes(dng_model, tmp_path):
    from pymatgen.core import Structure

    model = str(dng_model[0])
    runner = CliRunner()
    out = tmp_path / "gen"
    res = runner.invoke(app, ["generate", "-m", model, "-n", "7", "--out", str(out), "--steps", "5", "--batch-size", "3", "--seed", "4"])
    assert res.exit_code == 0, res.output
    record = json.loads((out / "samples.json").read_text())
    assert record["seed"] == 4 and record["mode"] == "dng" and record["sampler"]["steps"] == 5 and "versions" in json.dumps(record)
    api = Generator.load(model).generate(7, seed=4, steps=5, batch_size=3).to_structures()
    for i in (0, 6):
        cif = Structure.from_file(out / f"dng_{i:06d}.cif")
        assert cif.composition == api[i].composition
        assert cif.lattice.abc == pytest.approx(api[i].lattice.abc, abs=1e-5)
    # an interrupted run continues from its finished batches and ends identical (species included)
    real = Generator.base_sample
    calls = {"n": 0}

    def interrupted_on_the_third_batch(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, *a, **kw)

    part = tmp_path / "part"
    args = ["generate", "-m", model, "-n", "7", "--steps", "5", "--batch-size", "3", "--seed", "4", "--trajectory"]
    assert runner.invoke(app, [*args, "--out", str(out / "full")]).exit_code == 0
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Generator, "base_sample", interrupted_on_the_third_batch)
        res = runner.invoke(app, [*args, "--out", str(part)])
    assert res.exit_code == 130 and "2 finished batch(es) kept" in res.output
    run_json = part / ".sampling" / "run.json"  # as written before the sampler had a cap: it resumes all the same
    saved = json.loads(run_json.read_text())
    assert saved["sampler"].pop("anneal_cap") is None
    run_json.write_text(json.dumps(saved))
    assert runner.invoke(app, [*args, "--out", str(part), "--resume"]).exit_code == 0
    for name in ("structures.extxyz", "trajectory.extxyz", "dng_000000.cif", "dng_000006.cif"):
        assert (part / name).read_bytes() == (out / "full" / name).read_bytes(), name
    # bad input: one-line errors
    for bad, msg in (
        (["-n", "2", "--atoms", "0"], "--atoms must be >= 1"),
        (["-n", "2", "--atoms", "1000"], "outside this model's range"),
        (["-n", "0"], "-n must be >= 1"),
    ):
        r = runner.invoke(app, ["generate", "-m", model, "--out", str(tmp_path / "bad"), *bad])
        assert r.exit_code != 0 and msg in r.output and len(r.output.strip().splitlines()) == 1, r.output
    r = runner.invoke(app, ["generate", "-m", "perov_5", "-n", "2", "--out", str(tmp_path / "bad")])
    assert r.exit_code != 0 and "CSP" in r.output
    r = runner.invoke(app, ["sample", "-m", model, "-c", "SrTiO3", "--out", str(tmp_path / "bad")])
    assert r.exit_code != 0 and "de novo" in r.output


# ------------------------------------------------------------------ RL on a de novo base model
def _rl_config(**kw):
    from crystalign.rl.config import RLConfig

    base = dict(variant="velocity", steps=6, group_size=4, num_groups=2, iterations=1, lr=1e-3, duplicate_check=False,
                ppo_epochs=1, costs={"pos_policy": 1.0, "pos_regularization": 0.0})
    base.update(kw)
    cfg = RLConfig(**base)
    cfg.validation.every = 0
    return cfg


def _density_reward(batch):
    from crystalign.rewards.base import RewardResult

    vol = torch.linalg.det(batch.lattice).abs()
    return RewardResult(rewards=(batch.n_atoms / vol).double(), info={})


def test_dng_rollout_integrates_species_passively_with_the_base_model(dng_model):
    from crystalign.rl.rollout import Policy, rollout

    gen = Generator.load(dng_model[0])
    policy = Policy(gen, _rl_config())
    template = gen.dng_template(6, seed=0).to(dtype=torch.float32)
    x0 = gen.base_sample(template.species, template.n_atoms, torch.Generator().manual_seed(0))
    # at initialisation the policy's mean path is the base sampler, species draws included (same random stream)
    rl = rollout(policy, template, 7, torch.Generator().manual_seed(1), noise=False, x0=x0)
    base = gen.sampler(steps=7).sample(x0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(rl.final.species, base.species)
    assert torch.allclose(rl.final.frac, base.frac, atol=1e-6) and torch.allclose(rl.final.lattice, base.lattice, atol=1e-5)
    assert len(rl.species) == 6 and (rl.species[0] == MASK).all() and (rl.final.species != MASK).all()


def test_dng_rl_first_epoch_ratio_is_one_and_diversity_is_logged(dng_model, tmp_path, data_root):
    from crystalign.data.splits import DataConfig, load_training_data
    from crystalign.rl.rollout import Policy
    from crystalign.rl.trainer import RLTrainer

    gen = Generator.load(dng_model[0])
    cfg = _rl_config()
    train, _, _ = load_training_data(DataConfig(dataset="perov_5", max_structures=16), str(data_root))
    trainer = RLTrainer(Policy(gen, cfg), _density_reward, cfg, train.to(dtype=torch.float32), progress=False)
    row = trainer.fit(tmp_path)[-1]
    assert row["pos_ratio_mean"] == pytest.approx(1.0, abs=1e-6) and row["pos_clip_fraction"] == 0.0
    assert 0 < row["distinct_formula_fraction"] <= 1
    # the run samples like its base model, without compositions; compositions and export are refused
    runner = CliRunner()
    out = tmp_path / "samples"
    res = runner.invoke(app, ["rl", "sample", str(tmp_path / "last.pt"), "-n", "3", "--atoms", "4", "--out", str(out), "--steps", "4"])
    assert res.exit_code == 0, res.output
    from ase.io import read

    made = read(out / "structures.extxyz", index=":")
    assert len(made) == 3 and all(len(a) == 4 and min(a.numbers) >= 1 for a in made)
    bad = runner.invoke(app, ["rl", "sample", str(tmp_path / "last.pt"), "-c", "SrTiO3", "--out", str(tmp_path / "b")])
    assert bad.exit_code != 0 and "de novo run" in bad.output
    # exported, the species and lattice follow the base model: it generates like the run's mean path
    res = runner.invoke(app, ["rl", "export", str(tmp_path / "last.pt"), "--out", str(tmp_path / "x.pt"), "--base", str(dng_model[0])])
    assert res.exit_code == 0, res.output
    tuned = Generator.load(tmp_path / "x.pt")
    assert tuned.is_dng and tuned.tuned_from["fields"] == list(cfg.fields)
    made = tuned.generate(3, atoms=4, seed=0, steps=4)
    assert made.n_atoms.tolist() == [4, 4, 4] and int(made.species.min()) >= 1


def test_generation_keeps_to_the_training_elements_or_the_ones_given(dng_model, tmp_path):
    gen = Generator.load(dng_model[0])
    trained = set(gen.coverage["elements"])
    from pymatgen.core.periodic_table import Element

    made = gen.generate(40, seed=1, steps=5)
    assert {Element.from_Z(z).symbol for z in made.species.tolist()} <= trained
    chosen = ["Sr", "Ti", "O", "N"]
    made = gen.generate(20, seed=1, steps=5, elements=chosen)
    assert {Element.from_Z(z).symbol for z in made.species.tolist()} <= set(chosen)
    with pytest.raises(ValueError, match="not an element symbol"):
        gen.generate(2, elements=["Xx"])
    res = CliRunner().invoke(app, ["generate", "-m", str(dng_model[0]), "-n", "6", "--steps", "4", "--elements", "Ba,Zr,S",
                                   "--out", str(tmp_path / "g")])
    assert res.exit_code == 0, res.output
    record = json.loads((tmp_path / "g" / "samples.json").read_text())
    assert record["sampler"]["elements"] == [16, 40, 56] and record["elements"] == ["Ba", "Zr", "S"]


def test_generate_cli_takes_capped_annealing_and_records_it(dng_model, tmp_path):
    model = str(dng_model[0])
    out = tmp_path / "g"
    res = CliRunner().invoke(app, ["generate", "-m", model, "-n", "4", "--steps", "6", "--anneal-pos", "5", "--anneal-cap", "0.5",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    record = json.loads((out / "samples.json").read_text())
    assert record["sampler"]["anneal_pos"] == 5.0 and record["sampler"]["anneal_cap"] == 0.5
    api = Generator.load(model).generate(4, seed=0, steps=6, anneal_pos=5.0, anneal_cap=0.5).to_structures()
    from pymatgen.core import Structure

    cif = Structure.from_file(out / "dng_000003.cif")
    assert cif.composition == api[3].composition and cif.lattice.abc == pytest.approx(api[3].lattice.abc, abs=1e-5)
    res = CliRunner().invoke(app, ["generate", "-m", model, "-n", "2", "--anneal-pos", "5", "--anneal-cap", "0", "--out", str(tmp_path / "bad")])
    assert res.exit_code != 0 and "anneal_cap must be a number > 0" in res.output and len(res.output.strip().splitlines()) == 1
