"""Sampler, Generator bundle and composition parsing (real network, random weights)."""

from __future__ import annotations

import pytest
import torch

from crystalign.distributions import BaseDistribution
from crystalign.generator import Generator, GeneratorConfig, composition_batch, parse_composition
from crystalign.model.checkpoint import read_checkpoint_file
from crystalign.model.cspnet import CSPNetConfig


def tiny_generator(interpolants=None, seed=0) -> Generator:
    torch.manual_seed(seed)
    cfg = GeneratorConfig(net=CSPNetConfig(hidden_dim=32, num_layers=2, num_freqs=8, time_dim=16))
    if interpolants is not None:
        cfg.interpolants = interpolants
    return Generator(cfg, BaseDistribution.from_preset("perov_5"))


SDE_INTERPOLANTS = {
    "pos": {
        "path": "trig",
        "periodic": True,
        "correct_com": True,
        "sde": True,
        "gamma": {"kind": "sqrt", "a": 0.05},
        "epsilon": {"kind": "vanishing", "c": 1.0, "mu": 0.2, "sigma": 0.04},
    },
    "cell": {"path": "trig"},
}


class CountingNet(torch.nn.Module):
    """Wraps the real network to count forward calls."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.calls = 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.net(*args, **kwargs)


@pytest.mark.parametrize("method,per_step", [("euler", 1), ("sde", 1), ("heun", 2)])
def test_one_network_call_per_step(method, per_step):
    gen = tiny_generator(SDE_INTERPOLANTS if method == "sde" else None)
    counter = CountingNet(gen.net)
    gen.net = counter
    template = composition_batch(["SrTiO3", "BaZrO3"], 3)
    out = gen.sample(template, seed=0, steps=11, method=method)
    assert counter.calls == 10 * per_step
    assert out.num_structures == 6
    assert bool((out.frac >= 0).all() and (out.frac < 1).all())
    assert torch.isfinite(out.lattice).all()
    assert torch.equal(out.species, template.species)


def test_seeded_sampling_is_reproducible():
    gen = tiny_generator()
    template = composition_batch(["CaTiO3"], 4)
    a = gen.sample(template, seed=3, steps=8)
    b = gen.sample(template, seed=3, steps=8)
    c = gen.sample(template, seed=4, steps=8)
    assert torch.equal(a.frac, b.frac) and torch.equal(a.lattice, b.lattice)
    assert not torch.equal(a.frac, c.frac)


def test_velocity_annealing_changes_path_and_zero_is_identity():
    gen = tiny_generator()
    template = composition_batch(["CaTiO3"], 2)
    base = gen.sample(template, seed=0, steps=8)
    same = gen.sample(template, seed=0, steps=8, anneal_pos=0.0)
    annealed = gen.sample(template, seed=0, steps=8, anneal_pos=5.0)
    assert torch.equal(base.frac, same.frac)
    assert not torch.allclose(base.frac, annealed.frac)


def test_trajectory_has_every_step():
    gen = tiny_generator()
    x0 = gen.base_sample(*[composition_batch(["SrTiO3"], 2).species, torch.tensor([5, 5])])
    final, traj = gen.sampler(steps=6).sample(x0, trajectory=True)
    assert len(traj) == 6
    assert torch.equal(traj[-1].frac, final.frac)
    assert torch.equal(traj[0].frac, x0.frac)


def test_checkpoint_round_trip(tmp_path):
    from crystalign.io import save_torch

    gen = tiny_generator(SDE_INTERPOLANTS)
    save_torch(tmp_path / "m.pt", gen.checkpoint_dict())
    back = Generator.load(tmp_path / "m.pt")
    assert back.model_hash() == gen.model_hash()
    assert back.interpolants["pos"].uses_denoiser
    template = composition_batch(["SrTiO3"], 2)
    assert torch.equal(gen.sample(template, seed=1, steps=5).frac, back.sample(template, seed=1, steps=5).frac)


def test_a_float64_model_loads_as_float64(tmp_path):
    """A model trained with trainer.precision 64-true is sampled in float64, not silently rounded to float32."""
    from crystalign.io import save_torch

    gen = tiny_generator().to(torch.float64)
    save_torch(tmp_path / "m64.pt", gen.checkpoint_dict())
    back = Generator.load(tmp_path / "m64.pt")
    assert {p.dtype for p in back.net.parameters()} == {torch.float64}
    assert all(torch.equal(a, b) for a, b in zip(gen.net.parameters(), back.net.parameters()))
    template = composition_batch(["SrTiO3"], 2).to(dtype=torch.float64)
    assert back.sample(template, seed=1, steps=3).frac.dtype == torch.float64
    # half-precision weights load as float32: geometry in half precision is meaningless
    save_torch(tmp_path / "m16.pt", tiny_generator().to(torch.float16).checkpoint_dict())
    assert {p.dtype for p in Generator.load(tmp_path / "m16.pt").net.parameters()} == {torch.float32}


def test_bad_checkpoints(tmp_path):
    from crystalign.io import save_torch

    gen = tiny_generator()
    corrupt = tmp_path / "corrupt.pt"
    save_torch(corrupt, gen.checkpoint_dict())
    corrupt.write_bytes(corrupt.read_bytes()[:200])
    with pytest.raises(ValueError, match="corrupt"):
        Generator.load(corrupt)
    future = gen.checkpoint_dict()
    future["format_version"] = 99
    save_torch(tmp_path / "future.pt", future)
    with pytest.raises(ValueError, match="version 99"):
        Generator.load(tmp_path / "future.pt")
    save_torch(tmp_path / "other.pt", {"weights": torch.zeros(3)})
    with pytest.raises(ValueError, match="not a crystalign generator"):
        Generator.load(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="unknown model"):
        Generator.load(tmp_path / "missing.pt")
    assert isinstance(read_checkpoint_file(tmp_path / "future.pt"), dict)
    # a pickle with code in it is refused with the unpickler's reason, without torch's weights_only=False advice
    import pickle

    (tmp_path / "pickled.pt").write_bytes(pickle.dumps(ValueError("boom")))
    with pytest.raises(ValueError, match="unpickler") as err:
        Generator.load(tmp_path / "pickled.pt")
    assert "weights_only" not in str(err.value)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "model.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="is a folder, not a checkpoint file; it holds model.pt"):
        Generator.load(tmp_path / "run")


def test_parse_composition():
    assert parse_composition("SrTiO3") == sorted([38, 22, 8, 8, 8])
    assert parse_composition("C6") == [6] * 6
    for bad, msg in [("", "cannot parse"), ("Xx2O", "cannot parse|unknown"), ("Fe0.5O", "fractional"), ("<script>", "cannot parse")]:
        with pytest.raises(ValueError, match=msg):
            parse_composition(bad)
    with pytest.raises(ValueError, match="maximum of 5"):
        parse_composition("SrTi2O6", max_atoms=5)
    # pymatgen reads T and D as hydrogen isotopes: a capitalisation typo must not become "zero count" or water
    with pytest.raises(ValueError, match="T is not an element symbol .*did you mean Ti"):
        parse_composition("SrTIO3")
    with pytest.raises(ValueError, match="D is not an element symbol"):
        parse_composition("D2O")
    with pytest.raises(ValueError, match="zero count"):
        parse_composition("Sr0TiO3")
    with pytest.raises(ValueError, match="n must be"):
        composition_batch(["SrTiO3"], 0)


def test_sample_cli_benchmark_protocol_with_shipped_model(tmp_path, perov_val_csv):
    """`sample --compositions-from REF -k 2` pairs with `evaluate -k 2`; `--composition ... --trajectory` writes all outputs."""
    import json

    import pandas as pd
    from typer.testing import CliRunner

    from crystalign.cli import app

    ref = tmp_path / "ref.csv"
    pd.read_csv(perov_val_csv).iloc[:6].to_csv(ref, index=False)
    runner = CliRunner()
    gen_dir = tmp_path / "gen"
    res = runner.invoke(app, ["sample", "--model", "perov_5", "--compositions-from", str(ref), "-k", "2", "--steps", "20", "--out", str(gen_dir)])
    assert res.exit_code == 0, res.output
    names = json.loads((gen_dir / "index.json").read_text())
    assert names[:3] == ["000000_000.cif", "000000_001.cif", "000001_000.cif"] and len(names) == 12
    record = json.loads((gen_dir / "samples.json").read_text())
    assert record["seed"] == 0 and record["sampler"]["steps"] == 20 and record["model_hash"] and "torch" in record["versions"]
    res = runner.invoke(app, ["evaluate", str(gen_dir), "--reference", str(ref), "-k", "2", "--json", "--workers", "0"])
    assert res.exit_code == 0, res.output
    metrics = json.loads(res.output[res.output.index("{"):])
    assert metrics["n"] == 12 and metrics["timeouts"] == 0 and metrics["match_rate"] > 0.2  # the trained model matches perovskites
    traj_dir = tmp_path / "one"
    res = runner.invoke(app, ["sample", "-m", "perov_5", "-c", "SrTiO3", "-n", "3", "--steps", "6", "--method", "heun", "--trajectory", "--out", str(traj_dir)])
    assert res.exit_code == 0, res.output
    from ase.io import read

    assert len(read(traj_dir / "structures.extxyz", index=":")) == 3
    frames = read(traj_dir / "trajectory.extxyz", index=":")
    assert len(frames) == 3 * 6  # 6 time points per structure, x0 included
    by_id: dict = {}
    for f in frames:
        by_id.setdefault(f.info["id"], []).append(f.info["step"])
    assert by_id == {f"SrTiO3_{j}": list(range(6)) for j in range(3)}
    assert len(read(traj_dir / "trajectory.extxyz", index=":")) == 3 * 6
    bad = runner.invoke(app, ["sample", "-m", "perov_5", "-c", "SrTiO3", "--method", "rk9", "--out", str(traj_dir)])
    assert bad.exit_code != 0 and "method" in bad.output


def test_seeds_give_independent_streams_and_none_is_random(tmp_path):
    """Different seeds share no structures, whatever the batch size; seed=None differs on every call; the API
    draws what `crystalign sample` draws for the same seed and batch size."""
    import json

    from pymatgen.io.cif import CifParser
    from typer.testing import CliRunner

    from crystalign.cli import app

    gen = Generator.load("perov_5")
    kw = dict(n=4, steps=6, batch_size=2)
    a, b = gen.sample_compositions(["SrTiO3"], seed=0, **kw), gen.sample_compositions(["SrTiO3"], seed=1, **kw)
    assert not any(x.lattice == y.lattice for x in a for y in b)
    assert [s.lattice for s in gen.sample_compositions(["SrTiO3"], seed=0, **kw)] == [s.lattice for s in a]
    r1, r2 = gen.sample_compositions(["SrTiO3"], seed=None, **kw), gen.sample_compositions(["SrTiO3"], seed=None, **kw)
    assert [s.lattice for s in r1] != [s.lattice for s in r2]

    res = CliRunner().invoke(app, ["sample", "-m", "perov_5", "-c", "SrTiO3", "-n", "4", "--steps", "6", "--batch-size", "2", "--out", str(tmp_path / "s")])
    assert res.exit_code == 0, res.output
    files = json.loads((tmp_path / "s" / "index.json").read_text())
    cli = [CifParser(tmp_path / "s" / f).parse_structures(primitive=False)[0] for f in files]
    params = lambda s: [*s.lattice.abc, *s.lattice.angles]  # noqa: E731  (a CIF keeps the cell parameters, not its orientation)
    assert all(max(abs(u - v) for u, v in zip(params(x), params(y))) < 1e-4 for x, y in zip(cli, a))
    assert json.loads((tmp_path / "s" / "samples.json").read_text())["batch_size"] == 2


def test_sample_cli_guards_its_output_and_inputs(tmp_path):
    """A folder holding samples is not mixed with a new run; an interrupted run is only continued or removed on
    purpose; 'sde' needs a denoiser; compositions the model never saw are warned about."""
    from typer.testing import CliRunner

    from crystalign.cli import app

    run = lambda *args: CliRunner().invoke(app, ["sample", "-m", "perov_5", "--steps", "4", *map(str, args)])  # noqa: E731
    out = tmp_path / "s"
    assert run("-c", "SrTiO3", "--out", out).exit_code == 0
    res = run("-c", "SrTiO3", "-n", "2", "--out", out)
    assert res.exit_code != 0 and "already holds samples" in res.output
    assert "nothing to resume" in run("-c", "SrTiO3", "--out", out, "--resume").output
    (tmp_path / "cut" / ".sampling").mkdir(parents=True)
    (tmp_path / "cut" / ".sampling" / "run.json").write_text("{}")
    res = run("-c", "SrTiO3", "--out", tmp_path / "cut")
    assert res.exit_code != 0 and "interrupted sampling run" in res.output and "--resume" in res.output
    res = run("-c", "SrTiO3", "--method", "sde", "--out", tmp_path / "sde")
    assert res.exit_code != 0 and "needs a model trained with a denoiser" in res.output and not (tmp_path / "sde" / "samples.json").exists()
    res = run("-c", "PuC3", "--out", tmp_path / "pu")
    assert res.exit_code == 0 and "PuC3: element(s) C, Pu never appear" in res.output and "4 atoms per cell" in res.output


def test_anneal_cap_bounds_each_annealed_step_to_a_fraction_of_the_way_left():
    from crystalign.geometry import wrap
    from crystalign.interpolants import time_grid
    from crystalign.sampling import FieldNet

    gen = tiny_generator()
    ts = time_grid(12, dtype=torch.float64).tolist()
    free = gen.sampler(steps=12, anneal_pos=5.0).multipliers(ts)
    capped = gen.sampler(steps=12, anneal_pos=5.0, anneal_cap=0.5).multipliers(ts)
    dts = [b - a for a, b in zip(ts, ts[1:])]
    for k, t in enumerate(ts[:-1]):
        assert capped["pos"][k] == pytest.approx(min(1.0 + 5.0 * t, 0.5 * (1.0 - t) / dts[k]))
    assert capped["pos"][0] == free["pos"][0] and capped["pos"][-2] < free["pos"][-2]  # binds late only
    assert capped["cell"] == free["cell"] == [1.0] * 12  # a field that is not annealed keeps plain Euler steps

    # one step from t0 with a binding cap moves x by c (1 - t0) b: the fraction c of the way to x + (1 - t0) b,
    # the model's estimate of the final structure on this linear path
    template = composition_batch(["SrTiO3", "BaZrO3"], 2)
    x0 = gen.base_sample(template.species, template.n_atoms, generator=torch.Generator().manual_seed(0))
    t0, t1 = time_grid(2, dtype=torch.float64).tolist()
    out = gen.sampler(steps=2, anneal_pos=1e6, anneal_cap=0.3).sample(x0)
    with torch.no_grad():
        field = FieldNet(gen.net, x0.species, x0.n_atoms)(t0, x0.frac, x0.lattice)
    assert torch.allclose(out.frac, wrap(x0.frac + 0.3 * (1.0 - t0) * field["pos_b"]), atol=1e-6)
    assert torch.allclose(out.lattice, x0.lattice + (t1 - t0) * field["cell_b"], atol=1e-6)

    # a cap that never binds is the uncapped sampler; a binding one changes the path
    same = gen.sample(template, seed=0, steps=8, anneal_pos=5.0, anneal_cap=1e9)
    assert torch.equal(same.frac, gen.sample(template, seed=0, steps=8, anneal_pos=5.0).frac)
    assert torch.equal(same.frac, gen.sample(template, seed=0, steps=8, anneal_pos=5.0, anneal_cap=float("inf")).frac)
    assert gen.sampler(anneal_pos=5.0, anneal_cap=float("inf")).config.anneal_cap is None  # recorded as no cap
    assert not torch.allclose(same.frac, gen.sample(template, seed=0, steps=8, anneal_pos=5.0, anneal_cap=0.5).frac)
    for bad in (0.0, -1.0, float("nan"), float("-inf")):
        with pytest.raises(ValueError, match="anneal_cap must be a number > 0"):
            gen.sampler(anneal_pos=5.0, anneal_cap=bad)
