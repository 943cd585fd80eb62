"""A velocity-based RL run exported as a model: its plain Euler sampling is the reinforced policy's mean path."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from crystalign.cli import app
from crystalign.generator import Generator, composition_batch
from crystalign.rl.checkpoints import load_policy
from crystalign.rl.rollout import Policy, rollout
from crystalign.rl.trainer import RLTrainer
from test_rl_loop import config, mean_path, rocksalt_reward, tiny_generator

runner = CliRunner()


def _fit(tmp_path, variant: str, fields: list[str], **options):
    gen = tiny_generator()
    costs = {f"{f}_{kind}": cost for f in fields for kind, cost in (("policy", 1.0), ("regularization", 1e-3))}
    cfg = config(variant=variant, fields=fields, steps=7, iterations=2, lr=1e-2, costs=costs, **options)
    comps = composition_batch(["NaCl", "KBr"], 1).to(dtype=torch.float32)
    RLTrainer(Policy(gen, cfg), rocksalt_reward, cfg, comps, progress=False).fit(tmp_path / f"{variant}_{len(fields)}")
    return gen, tmp_path / f"{variant}_{len(fields)}" / "last.pt"


def _samples_its_mean_path(tuned: Generator, run):
    """Plain Euler of the exported model equals the RL policy's mean path from the same x0; returns (samples, x0)."""
    policy, _ = load_policy(run)
    template = composition_batch(["NaCl", "KBr"], 2).to(dtype=torch.float32)
    path, x0 = mean_path(policy, tuned, template, 7)
    sampled = tuned.sampler(steps=7).sample(x0)
    assert torch.allclose(sampled.frac, path.frac, atol=1e-5)
    assert torch.allclose(sampled.lattice, path.lattice, atol=1e-4)
    return sampled, x0


def test_exported_velocity_policy_samples_its_mean_path(tmp_path):
    gen, run = _fit(tmp_path, "velocity", ["pos", "cell"])
    out = tmp_path / "tuned.pt"
    res = runner.invoke(app, ["rl", "export", str(run), "--out", str(out)])
    assert res.exit_code == 0, res.output
    tuned = Generator.load(out)
    assert tuned.model_hash() != gen.model_hash()  # the reinforced weights, not the base's
    sampled, x0 = _samples_its_mean_path(tuned, run)


def test_annealed_rollouts_follow_the_annealed_base_sampler_and_export_it(tmp_path):
    """With anneal {pos: s, cell: c} the rollout moves along (1 + s t) b: before training its mean path is the base
    model's annealed Euler sampler; the exported model samples with that annealing by default, as its mean path."""
    from crystalign.rl.config import RLConfig

    anneal = {"pos": 2.0, "cell": 1.0}
    gen = tiny_generator()
    cfg = config(variant="velocity", fields=["pos"], steps=7, anneal=anneal)
    template = composition_batch(["NaCl", "KBr"], 2).to(dtype=torch.float32)
    untrained, x0 = mean_path(Policy(gen, cfg), gen, template, 7)
    annealed = gen.sampler(steps=7, anneal_pos=2.0, anneal_cell=1.0).sample(x0)
    plain = gen.sampler(steps=7).sample(x0)
    assert torch.allclose(untrained.frac, annealed.frac, atol=1e-5) and torch.allclose(untrained.lattice, annealed.lattice, atol=1e-4)
    assert not torch.allclose(untrained.frac, plain.frac, atol=1e-3)

    gen, run = _fit(tmp_path, "velocity", ["pos"], anneal=anneal)
    base_file = tmp_path / "base.pt"
    torch.save(gen.checkpoint_dict(), base_file)
    out = tmp_path / "tuned.pt"
    res = runner.invoke(app, ["rl", "export", str(run), "--out", str(out), "--base", str(base_file)])
    assert res.exit_code == 0, res.output
    tuned = Generator.load(out)
    sampling = tuned.config.sampling
    assert (sampling.anneal_pos, sampling.anneal_cell, sampling.steps) == (2.0, 1.0, 7)
    _samples_its_mean_path(tuned, run)
    # annealed rollouts are for the velocity variant, with finite non-negative s per field
    for bad, message in (
        (dict(variant="scale", anneal={"pos": 2.0}), "needs variant 'velocity'"),
        (dict(anneal={"species": 1.0}), "anneal"),
        (dict(anneal={"pos": -1.0}), "anneal.pos"),
        (dict(anneal={"pos": float("nan")}), "anneal.pos"),
    ):
        with pytest.raises(ValueError, match=message):
            RLConfig(**{"fields": ["pos"], **bad})


def test_capped_annealed_rollouts_follow_the_capped_base_sampler_and_export_it(tmp_path):
    """With anneal_cap the rollout's annealed steps are capped as the base sampler's: the untrained mean path is the
    capped sampler (not the uncapped one), and the exported model samples with the cap by default."""
    from crystalign.rl.config import RLConfig

    gen = tiny_generator()
    cfg = config(variant="velocity", fields=["pos"], steps=7, anneal={"pos": 20.0}, anneal_cap=0.3)
    template = composition_batch(["NaCl", "KBr"], 2).to(dtype=torch.float32)
    untrained, x0 = mean_path(Policy(gen, cfg), gen, template, 7)
    capped = gen.sampler(steps=7, anneal_pos=20.0, anneal_cap=0.3).sample(x0)
    uncapped = gen.sampler(steps=7, anneal_pos=20.0).sample(x0)
    assert torch.allclose(untrained.frac, capped.frac, atol=1e-5) and torch.allclose(untrained.lattice, capped.lattice, atol=1e-4)
    assert not torch.allclose(untrained.frac, uncapped.frac, atol=1e-3)

    gen, run = _fit(tmp_path, "velocity", ["pos", "cell"], anneal={"pos": 20.0}, anneal_cap=0.3)
    out = tmp_path / "tuned.pt"
    res = runner.invoke(app, ["rl", "export", str(run), "--out", str(out)])
    assert res.exit_code == 0, res.output
    sampling = Generator.load(out).config.sampling
    assert (sampling.anneal_pos, sampling.anneal_cap, sampling.steps) == (20.0, 0.3, 7)
    _samples_its_mean_path(Generator.load(out), run)
    with pytest.raises(ValueError, match="anneal_cap must be a number > 0"):
        RLConfig(fields=["pos"], anneal={"pos": 2.0}, anneal_cap=0.0)
    assert RLConfig(fields=["pos"], anneal={"pos": 2.0}, anneal_cap=float("inf")).anneal_cap is None


def test_only_velocity_runs_export(tmp_path):
    _, run = _fit(tmp_path, "scale", ["pos", "cell"])
    out = tmp_path / "never.pt"
    res = runner.invoke(app, ["rl", "export", str(run), "--out", str(out)])
    assert res.exit_code != 0 and "only 'velocity'" in res.output and not out.exists(), res.output
    assert len(res.output.strip().splitlines()) == 1


def test_positions_only_run_exports_with_its_base_and_samples_its_mean_path(tmp_path):
    gen, run = _fit(tmp_path, "velocity", ["pos"])
    out = tmp_path / "models" / "tuned.pt"
    out.parent.mkdir()
    # the lattice follows the base network: the exported model needs to find that base again
    res = runner.invoke(app, ["rl", "export", str(run), "--out", str(out)])
    assert res.exit_code != 0 and "pass --base" in res.output and not out.exists(), res.output
    base_file = tmp_path / "models" / "base.pt"
    torch.save(gen.checkpoint_dict(), base_file)
    res = runner.invoke(app, ["rl", "export", str(run), "--out", str(out), "--base", str(base_file)])
    assert res.exit_code == 0, res.output
    tuned = Generator.load(out)
    assert tuned.tuned_from == {"fields": ["pos"], "model": "base.pt", "hash": gen.model_hash()}
    sampled, x0 = _samples_its_mean_path(tuned, run)
    base_path = gen.sampler(steps=7).sample(x0)
    assert not torch.allclose(sampled.frac, base_path.frac, atol=1e-3)  # the positions are the tuned network's
    # the pair moves together (the base is found relative to the model's folder) ...
    moved = tmp_path / "elsewhere"
    (tmp_path / "models").rename(moved)
    again = Generator.load(moved / "tuned.pt")
    assert again.model_hash() == tuned.model_hash()
    # ... and a missing or different base is refused in one line
    (moved / "base.pt").unlink()
    with pytest.raises(FileNotFoundError, match="base model 'base.pt' is missing"):
        Generator.load(moved / "tuned.pt")
    other = tiny_generator()
    with torch.no_grad():
        next(other.net.parameters()).add_(0.1)
    torch.save(other.checkpoint_dict(), moved / "base.pt")
    with pytest.raises(ValueError, match="was reinforced from a base with hash"):
        Generator.load(moved / "tuned.pt")
    res = runner.invoke(app, ["rl", "export", str(run), "--out", str(tmp_path / "x.pt"), "--base", str(moved / "base.pt")])
    assert res.exit_code != 0 and "was reinforced from a base with hash" in res.output and len(res.output.strip().splitlines()) == 1


def test_shipped_energy_model_lowers_the_energy_of_held_out_compositions(data_root):
    """perov_5_energy: perov_5's lattice network and the reinforced positions; on held-out compositions of the dev
    split, from the same x0, SevenNet-0 scores its structures lower than the base model's, and rejects fewer."""
    from crystalign.data.splits import DataConfig, load_training_data
    from crystalign.rewards import EnergyReward

    tuned, base = Generator.load("perov_5_energy"), Generator.load("perov_5")
    assert tuned.tuned_from == {"fields": ["pos"], "model": "perov_5", "hash": base.model_hash()}
    assert torch.equal(tuned.net.base.lattice_out.weight, base.net.lattice_out.weight)
    _, hold, _ = load_training_data(DataConfig(dataset="perov_5", niggli=True), data_root=str(data_root))
    refs = hold[:48].to(dtype=torch.float32)
    x0 = base.base_sample(refs.species, refs.n_atoms, torch.Generator().manual_seed(0))
    reward = EnergyReward("sevenn")
    e_tuned = reward(tuned.sampler().sample(x0)).info["energy_per_atom_ev"]
    e_base = reward(base.sampler(schedule=False).sample(x0)).info["energy_per_atom_ev"]
    both = torch.isfinite(e_tuned) & torch.isfinite(e_base)
    assert (e_tuned[both] - e_base[both]).mean() < -0.05, (e_tuned[both] - e_base[both]).mean()
    assert torch.isfinite(e_tuned).sum() >= torch.isfinite(e_base).sum()
    res = runner.invoke(app, ["models"])
    assert "RL-tuned from perov_5" in res.output and "RL-tuned from carbon_24" in res.output
    # only the carbon model claims (with its evidence) that predict should sample it instead of its base
    assert res.output.count("samples this model") == 1 and "`predict --model carbon_24` samples this model" in res.output
    carbon = Generator.load("carbon_24_energy")
    assert carbon.tuned_from == {"fields": ["pos"], "model": "carbon_24", "hash": Generator.load("carbon_24").model_hash()}


def test_shipped_sde_model_samples_as_ode_or_sde_and_supports_score_rl():
    """perov_5_sde carries the denoiser score-based RL needs; its default sampler is its ODE (Euler, 50 steps)."""
    from crystalign.rl.config import RLConfig

    gen = Generator.load("perov_5_sde")
    assert gen.interpolants["pos"].uses_denoiser and not gen.interpolants["cell"].uses_denoiser
    assert gen.sampler().config.method == "euler" and gen.sampler().config.steps == 50
    template = composition_batch(["SrTiO3", "BaZrO3"], 2).to(dtype=torch.float32)
    ode = gen.sample(template, seed=0, steps=10)
    sde = gen.sample(template, seed=0, steps=10, method="sde")
    assert torch.isfinite(sde.frac).all() and not torch.allclose(ode.frac, sde.frac)
    score = Policy(gen, RLConfig(variant="score", fields=["pos"], costs={"pos_policy": 1.0, "pos_regularization": 1e-5}))
    traj = rollout(score, template, 6, torch.Generator().manual_seed(0), store=True)
    assert traj.final.frac.shape == template.frac.shape and len(traj.actions) == 5
