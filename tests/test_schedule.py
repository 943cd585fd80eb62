"""A learned velocity schedule as the default sampler: it integrates exactly the mean path velocity-annealing RL
trained, travels inside the model file, is recorded, and refuses what does not belong to it."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from crystalign.cli import app
from crystalign.generator import Generator, composition_batch
from crystalign.io import save_torch
from crystalign.rl.rollout import Policy
from crystalign.rl.scale import ScaleMLP
from crystalign.rl.trainer import RLTrainer
from crystalign.schedule import VelocitySchedule
from test_rl_loop import config, mean_path, rocksalt_reward, tiny_generator

runner = CliRunner()


def _varied_scale(seed: int = 0) -> ScaleMLP:
    """A ScaleMLP whose s(t) varies with t and differs between fields (the heads are zero at init)."""
    torch.manual_seed(seed)
    scale = ScaleMLP()
    with torch.no_grad():
        for head in scale.heads.values():
            head.weight.normal_(0.0, 0.5)
            head.bias.fill_(1.5)
    return scale


def test_schedule_sampler_is_the_scale_policys_mean_path():
    gen = tiny_generator()
    policy = Policy(gen, config(variant="scale", fields=["pos", "cell"]))
    policy.scale.load_state_dict(_varied_scale().state_dict())
    template = composition_batch(["SrTiO3", "KNbO3"], 2).to(dtype=torch.float32)
    rl, x0 = mean_path(policy, gen, template, 9)
    schedule = VelocitySchedule(policy.scale, steps=9, model_hash=gen.model_hash())
    s = schedule.values([0.1, 0.9])
    assert abs(s["pos"][0] - s["pos"][1]) > 1e-3 and s["pos"] != s["cell"]  # a real, time-dependent schedule
    sampled = gen.sampler(schedule=schedule).sample(x0)  # steps default to the schedule's
    assert torch.allclose(sampled.frac, rl.frac, atol=1e-6)
    assert torch.allclose(sampled.lattice, rl.lattice, atol=1e-5)
    plain = gen.sampler(steps=9).sample(x0)
    assert not torch.allclose(plain.frac, sampled.frac, atol=1e-3)


def _scale_run(tmp_path, gen: Generator):
    cfg = config(variant="scale", fields=["pos", "cell"], steps=7, iterations=1, noise={"pos": {"kind": "constant", "a": 0.3}, "cell": {"kind": "constant", "a": 0.3}})
    comps = composition_batch(["NaCl", "KBr"], 1).to(dtype=torch.float32)
    RLTrainer(Policy(gen, cfg), rocksalt_reward, cfg, comps, progress=False).fit(tmp_path / "rl")
    return tmp_path / "rl" / "last.pt"


def test_attached_schedule_travels_with_the_model_and_is_recorded(tmp_path):
    gen = tiny_generator()
    model = tmp_path / "tiny.pt"
    save_torch(model, gen.checkpoint_dict())
    run = _scale_run(tmp_path, gen)
    from_run = VelocitySchedule.from_rl_checkpoint(run)
    assert from_run.steps == 7 and from_run.model_hash == gen.model_hash()

    annealed = tmp_path / "tiny_annealed.pt"
    res = runner.invoke(app, ["rl", "attach-schedule", str(run), "--out", str(annealed)])
    assert res.exit_code == 0, res.output
    loaded = Generator.load(annealed)
    assert loaded.model_hash() == gen.model_hash() and loaded.schedule is not None
    assert loaded.schedule.weights_sha256() == from_run.weights_sha256()
    assert loaded.sampler().config.steps == 7  # the schedule's step count is the default
    assert loaded.sampler(schedule=False).config.steps == gen.config.sampling.steps

    template = composition_batch(["NaCl"], 3).to(dtype=torch.float32)
    by_default = loaded.sample(template, seed=3)
    by_path = gen.sample(template, seed=3, schedule=str(run))
    assert torch.equal(by_default.frac, by_path.frac) and torch.equal(by_default.lattice, by_path.lattice)
    off = loaded.sample(template, seed=3, schedule=False, steps=7)
    assert torch.equal(off.frac, gen.sample(template, seed=3, steps=7).frac)

    out = tmp_path / "samples"
    res = runner.invoke(app, ["sample", "--model", str(annealed), "-c", "NaCl", "-n", "2", "--out", str(out), "--threads", "1"])
    assert res.exit_code == 0, res.output
    record = json.loads((out / "samples.json").read_text())["sampler"]
    assert record["steps"] == 7 and record["schedule"]["weights_sha256"] == from_run.weights_sha256()
    assert record["schedule"]["model_hash"] == gen.model_hash()
    out2 = tmp_path / "samples_plain"
    res = runner.invoke(app, ["sample", "--model", str(annealed), "-c", "NaCl", "-n", "2", "--out", str(out2), "--no-schedule", "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert json.loads((out2 / "samples.json").read_text())["sampler"]["schedule"] is None

    png = tmp_path / "s.png"
    res = runner.invoke(app, ["rl", "plot-schedule", str(annealed), "--out", str(png)])
    assert res.exit_code == 0 and png.read_bytes()[:4] == b"\x89PNG", res.output
    res = runner.invoke(app, ["rl", "plot-schedule", str(model), "--out", str(tmp_path / "t.png")])
    assert res.exit_code != 0 and "carries no learned velocity schedule" in res.output


def test_schedule_refuses_what_does_not_belong_to_it(tmp_path):
    gen, other = tiny_generator(0), tiny_generator(1)
    run = _scale_run(tmp_path, gen)
    with pytest.raises(ValueError, match="learned for another model"):
        other.sampler(schedule=str(run))
    schedule = VelocitySchedule.from_rl_checkpoint(run)
    with pytest.raises(ValueError, match="both scale the velocity"):
        gen.sampler(schedule=schedule, anneal_pos=5.0)
    with pytest.raises(ValueError, match="steps must be"):
        VelocitySchedule(ScaleMLP(), steps=1, model_hash=gen.model_hash())
    damaged = schedule.to_dict()
    damaged["state_dict"] = {k: v.clone() for k, v in damaged["state_dict"].items()}
    damaged["state_dict"]["heads.pos.bias"].fill_(math.nan)
    with pytest.raises(ValueError, match="not finite"):
        VelocitySchedule.from_dict(damaged, where="m.pt:schedule")
    # a model file whose schedule was learned for other weights is refused when loaded
    ckpt = other.checkpoint_dict()
    ckpt["schedule"] = schedule.to_dict()
    save_torch(tmp_path / "mixed.pt", ckpt)
    with pytest.raises(ValueError, match="mixed.pt:schedule: learned for another model"):
        Generator.load(tmp_path / "mixed.pt")
    # an RL run of another variant has no s(t)
    vel = config(variant="velocity", fields=["pos"], steps=5, iterations=1)
    comps = composition_batch(["NaCl"], 1).to(dtype=torch.float32)
    RLTrainer(Policy(gen, vel), rocksalt_reward, vel, comps, progress=False).fit(tmp_path / "vel")
    with pytest.raises(ValueError, match="has no learned s"):
        VelocitySchedule.from_rl_checkpoint(tmp_path / "vel" / "last.pt")

    model = tmp_path / "tiny.pt"
    save_torch(model, gen.checkpoint_dict())
    cases = [
        (["--schedule", str(run), "--no-schedule"], "either --schedule or --no-schedule"),
        (["--schedule", str(run), "--anneal-pos", "5"], "both scale the velocity"),
        (["--schedule", str(tmp_path / "nowhere.pt")], "does not exist"),
        (["--steps", "1"], "--steps must be >= 2"),
    ]
    for extra, message in cases:
        out = tmp_path / "never"
        res = runner.invoke(app, ["sample", "--model", str(model), "-c", "NaCl", "--out", str(out), *extra])
        assert res.exit_code != 0 and message in res.output, (extra, res.output)
        assert len(res.output.strip().splitlines()) == 1, res.output
        assert not out.exists()


def test_shipped_annealed_model_is_perov_5_with_a_schedule_that_tightens_matches(data_root):
    """The shipped perov_5_annealed: perov_5's weights, its learned s(t) by default, and on held-out structures of
    the dev split, matches at least 1.5x tighter than the plain sampler at the same 20 time points."""
    from crystalign.data.splits import DataConfig, load_training_data
    from crystalign.metrics import csp_metrics

    annealed, plain = Generator.load("perov_5_annealed"), Generator.load("perov_5")
    assert annealed.model_hash() == plain.model_hash() and plain.schedule is None
    assert annealed.schedule is not None and annealed.sampler().config.steps == annealed.schedule.steps == 20
    s = annealed.schedule.values([0.05, 0.5, 0.95])["pos"]
    assert s[1] > 1.0 and s[2] < s[1]  # it anneals mid-trajectory and less at the end, where large steps overshoot
    _, hold, _ = load_training_data(DataConfig(dataset="perov_5", niggli=True), data_root=str(data_root))
    refs = hold[:96].to(dtype=torch.float32)
    learned = csp_metrics(annealed.sample(refs, seed=0), refs, n_workers=0, progress=False)
    base = csp_metrics(annealed.sample(refs, seed=0, schedule=False), refs, n_workers=0, progress=False)
    assert learned.rmse * 1.5 < base.rmse, (learned.rmse, base.rmse)
    assert learned.valid_rate >= base.valid_rate
