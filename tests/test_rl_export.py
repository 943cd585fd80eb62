"""A velocity-based RL run exported as a model: its plain Euler sampling is the reinforced policy's mean path."""

from __future__ import annotations

import torch
from typer.testing import CliRunner

from crystalign.cli import app
from crystalign.generator import Generator, composition_batch
from crystalign.rl.checkpoints import load_policy
from crystalign.rl.rollout import Policy, rollout
from crystalign.rl.trainer import RLTrainer
from test_rl_loop import config, rocksalt_reward, tiny_generator

runner = CliRunner()


def _fit(tmp_path, variant: str, fields: list[str]):
    gen = tiny_generator()
    costs = {f"{f}_{kind}": cost for f in fields for kind, cost in (("policy", 1.0), ("regularization", 1e-3))}
    cfg = config(variant=variant, fields=fields, steps=7, iterations=2, lr=1e-2, costs=costs)
    comps = composition_batch(["NaCl", "KBr"], 1).to(dtype=torch.float32)
    RLTrainer(Policy(gen, cfg), rocksalt_reward, cfg, comps, progress=False).fit(tmp_path / f"{variant}_{len(fields)}")
    return gen, tmp_path / f"{variant}_{len(fields)}" / "last.pt"


def test_exported_velocity_policy_samples_its_mean_path(tmp_path):
    gen, run = _fit(tmp_path, "velocity", ["pos", "cell"])
    out = tmp_path / "tuned.pt"
    res = runner.invoke(app, ["rl", "export", str(run), "--out", str(out)])
    assert res.exit_code == 0, res.output
    tuned = Generator.load(out)
    assert tuned.model_hash() != gen.model_hash()  # the reinforced weights, not the base's
    policy, _ = load_policy(run)
    template = composition_batch(["NaCl", "KBr"], 2).to(dtype=torch.float32)
    x0 = tuned.base_sample(template.species, template.n_atoms, torch.Generator().manual_seed(0))
    mean_path = rollout(policy, template, 7, torch.Generator().manual_seed(1), store=False, noise=False, x0=x0).final
    sampled = tuned.sampler(steps=7).sample(x0)
    assert torch.allclose(sampled.frac, mean_path.frac, atol=1e-5)
    assert torch.allclose(sampled.lattice, mean_path.lattice, atol=1e-4)


def test_only_velocity_runs_on_every_field_export(tmp_path):
    for variant, fields, message in (("scale", ["pos", "cell"], "only 'velocity'"), ("velocity", ["pos"], "needs a run on pos and cell")):
        _, run = _fit(tmp_path, variant, fields)
        out = tmp_path / "never.pt"
        res = runner.invoke(app, ["rl", "export", str(run), "--out", str(out)])
        assert res.exit_code != 0 and message in res.output and not out.exists(), res.output
        assert len(res.output.strip().splitlines()) == 1
