"""CSPNet: the authors' parameter layout, agreement with a literal reference, symmetries, checkpoints, import."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from crystalign.crystal import CrystalBatch
from crystalign.model import (
    CheckpointError,
    CSPNet,
    CSPNetConfig,
    build_edges,
    fourier_features,
    import_omatg_checkpoint,
    load_model_checkpoint,
    save_model_checkpoint,
    sinusoidal_time_embedding,
)
from crystalign.model.checkpoint import FORMAT, FORMAT_VERSION
from crystalign.model.reference import reference_forward

AUTHORS_JSON = Path(__file__).parent / "data" / "omatg_cspnet_state_dict.json"
TINY = CSPNetConfig(hidden_dim=16, num_layers=2, num_freqs=4, time_dim=8)
HEADS = ("pos_b", "pos_eta", "cell_b", "cell_eta")


def _random_batch(n_atoms, dtype=torch.float64, seed=0, dng=False):
    g = torch.Generator().manual_seed(seed)
    n_atoms = torch.as_tensor(n_atoms)
    n = int(n_atoms.sum())
    low = 0 if dng else 1
    species = torch.randint(low, 101, (n,), generator=g)
    frac = torch.rand(n, 3, generator=g, dtype=dtype)
    lattice = 3.0 * torch.eye(3, dtype=dtype) + torch.randn(len(n_atoms), 3, 3, generator=g, dtype=dtype)
    t = torch.rand(len(n_atoms), generator=g, dtype=dtype)
    return t, species, frac, lattice, n_atoms


def _net(config=TINY, seed=0):
    torch.manual_seed(seed)
    net = CSPNet(config).double()
    # LayerNorm starts as the identity: randomise it so its parameters are exercised too
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "norm" in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.3)
    return net


def _random_rotation(seed, reflect):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    if (torch.linalg.det(q) < 0) != reflect:
        q[:, 0] = -q[:, 0]
    return q


# ---------------------------------------------------------------------------- layout


def test_parameter_names_and_shapes_equal_the_authors():
    spec = json.loads(AUTHORS_JSON.read_text())
    expected = {name.removeprefix("encoder."): tuple(shape) for name, shape in spec["tensors"]}
    net = CSPNet(CSPNetConfig.paper())
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == expected
    assert net.num_parameters() == spec["total_parameters"] == 12_403_400
    dng = CSPNet(CSPNetConfig.paper(dng=True))
    assert dng.num_parameters() == 12_403_912
    assert dng.node_embedding.weight.shape == (101, 512)


def test_embedding_layouts():
    t = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    e = sinusoidal_time_embedding(t, 256)
    assert e.shape == (3, 256)
    w = torch.exp(-torch.arange(128, dtype=torch.float64) * math.log(1e4) / 127)
    torch.testing.assert_close(e[:, :128], torch.sin(t[:, None] * w))
    torch.testing.assert_close(e[:, 128:], torch.cos(t[:, None] * w))
    dx = torch.rand(5, 3, dtype=torch.float64)
    phi = fourier_features(dx, 4)
    k = torch.arange(4, dtype=torch.float64)
    for d in range(3):  # [sin(d0 k..), sin(d1 k..), sin(d2 k..), cos(d0 k..), ...]
        torch.testing.assert_close(phi[:, 4 * d : 4 * d + 4], torch.sin(2 * math.pi * dx[:, d : d + 1] * k))
        torch.testing.assert_close(phi[:, 12 + 4 * d : 12 + 4 * d + 4], torch.cos(2 * math.pi * dx[:, d : d + 1] * k))


# ---------------------------------------------------------------------------- fast path == literal reference


@pytest.mark.parametrize("dng", [False, True])
def test_fast_forward_equals_literal_reference_values_and_gradients(dng):
    net = _net(CSPNetConfig(hidden_dim=16, num_layers=2, num_freqs=4, time_dim=8, dng=dng))
    t, species, frac, lattice, n_atoms = _random_batch([3, 1, 5, 2], dng=dng)
    frac.requires_grad_(True)
    lattice.requires_grad_(True)
    fast = net(t, species, frac, lattice, n_atoms, species_logits=True)
    ref = reference_forward(net, t, species, frac, lattice, n_atoms)
    assert set(fast) == set(ref)
    with torch.no_grad():  # the sampling path writes edge blocks in place
        fast_no_grad = net(t, species, frac, lattice, n_atoms, species_logits=True)
    for key in ref:
        torch.testing.assert_close(fast[key], ref[key], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(fast_no_grad[key], ref[key], rtol=1e-10, atol=1e-10)

    def grads(out):
        loss = sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)).sum() for o in out.values())
        return torch.autograd.grad(loss, [frac, lattice, *net.parameters()])

    for g_fast, g_ref in zip(grads(fast), grads(ref)):
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-9, atol=1e-10)


def test_gradcheck_small_network():
    net = _net(CSPNetConfig(hidden_dim=6, num_layers=1, num_freqs=2, time_dim=4))
    t, species, frac, lattice, n_atoms = _random_batch([2, 3])
    edges = build_edges(n_atoms)

    def f(frac, lattice):
        out = net(t, species, frac, lattice, n_atoms, edges)
        return out["pos_b"], out["cell_eta"]

    assert torch.autograd.gradcheck(f, (frac.requires_grad_(), lattice.requires_grad_()))


def test_dng_output_keys_and_species_indexing():
    net = _net(CSPNetConfig(hidden_dim=16, num_layers=1, num_freqs=4, time_dim=8, dng=True))
    t, species, frac, lattice, n_atoms = _random_batch([2, 3], dng=True)
    species[0] = 0  # the mask token is a valid input for DNG
    out = net(t, species, frac, lattice, n_atoms)
    assert set(out) == {*HEADS, "species_b", "species_eta"}
    assert out["species_b"].shape == (5, 100)
    csp = _net()
    assert set(csp(*_random_batch([2, 3]))) == set(HEADS)


# ---------------------------------------------------------------------------- symmetries (float64)


@pytest.fixture(scope="module")
def sym_case():
    net = _net()
    return net, _random_batch([4, 1, 6, 3], seed=3)


@torch.no_grad()
def test_permutation_within_crystals(sym_case):
    net, (t, species, frac, lattice, n_atoms) = sym_case
    offsets = torch.cumsum(n_atoms, 0) - n_atoms
    perm = torch.cat([o + torch.randperm(int(n), generator=torch.Generator().manual_seed(1)) for o, n in zip(offsets, n_atoms)])
    a = net(t, species, frac, lattice, n_atoms)
    b = net(t, species[perm], frac[perm], lattice, n_atoms)
    for key in ("pos_b", "pos_eta"):
        torch.testing.assert_close(b[key], a[key][perm])
    for key in ("cell_b", "cell_eta"):
        torch.testing.assert_close(b[key], a[key])


@torch.no_grad()
def test_translation_invariance(sym_case):
    net, (t, species, frac, lattice, n_atoms) = sym_case
    shift = torch.rand(len(n_atoms), 3, dtype=frac.dtype, generator=torch.Generator().manual_seed(2))
    moved = torch.remainder(frac + shift.repeat_interleave(n_atoms, 0), 1.0)
    a = net(t, species, frac, lattice, n_atoms)
    b = net(t, species, moved, lattice, n_atoms)
    for key in HEADS:
        torch.testing.assert_close(b[key], a[key], rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("reflect", [False, True])
@torch.no_grad()
def test_rotation_equivariance(sym_case, reflect):
    net, (t, species, frac, lattice, n_atoms) = sym_case
    rot = _random_rotation(5, reflect)
    a = net(t, species, frac, lattice, n_atoms)
    b = net(t, species, frac, lattice @ rot.T, n_atoms)
    for key in ("pos_b", "pos_eta"):
        torch.testing.assert_close(b[key], a[key])
    for key in ("cell_b", "cell_eta"):
        torch.testing.assert_close(b[key], a[key] @ rot.T)


@torch.no_grad()
def test_batching_invariance_and_cached_edges(sym_case):
    net, (t, species, frac, lattice, n_atoms) = sym_case
    batch = CrystalBatch(species=species, frac=frac, lattice=lattice, n_atoms=n_atoms)
    edges = build_edges(n_atoms)
    full = net.forward_batch(t, batch, edges=edges)
    rebuilt = net.forward_batch(t, batch)
    for key in HEADS:
        torch.testing.assert_close(full[key], rebuilt[key], rtol=0, atol=0)
    ptr = batch.ptr
    for k in range(len(batch)):
        alone = net.forward_batch(t[k : k + 1], batch[k])
        for key in ("pos_b", "pos_eta"):
            torch.testing.assert_close(alone[key], full[key][ptr[k] : ptr[k + 1]])
        for key in ("cell_b", "cell_eta"):
            torch.testing.assert_close(alone[key], full[key][k : k + 1])


def test_scalar_time_dtype_and_edge_mismatch():
    net = _net().float()
    t, species, frac, lattice, n_atoms = _random_batch([2, 3])
    out = net(0.25, species, frac, lattice, n_atoms)  # float64 inputs into a float32 network
    assert out["pos_b"].dtype == torch.float32
    ref = net(torch.full((2,), 0.25), species, frac.float(), lattice.float(), n_atoms)
    torch.testing.assert_close(out["cell_b"], ref["cell_b"])
    low = _net().to(torch.bfloat16)(t, species, frac, lattice, n_atoms)  # phases stay float32 inside
    assert low["pos_b"].dtype == torch.bfloat16
    torch.testing.assert_close(low["pos_b"].float(), net(t, species, frac, lattice, n_atoms)["pos_b"], atol=0.05, rtol=0.05)
    with pytest.raises(ValueError, match="rebuild them"):
        net(t, species, frac, lattice, n_atoms, edges=build_edges(torch.tensor([3, 2, 1])))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    net = _net()
    t, species, frac, lattice, n_atoms = _random_batch([3, 4])
    cpu = net(t, species, frac, lattice, n_atoms)
    gpu = net.cuda()(*(x.cuda() for x in (t, species, frac, lattice, n_atoms)))
    for key in HEADS:
        torch.testing.assert_close(gpu[key].cpu(), cpu[key])


# ---------------------------------------------------------------------------- checkpoints


def test_checkpoint_roundtrip(tmp_path):
    net = _net().float()
    path = tmp_path / "net.pt"
    save_model_checkpoint(path, net, {"dataset": "perov_5", "epochs": 3})
    loaded, meta = load_model_checkpoint(path)
    assert meta["format"] == FORMAT and meta["format_version"] == FORMAT_VERSION
    assert meta["extra"] == {"dataset": "perov_5", "epochs": 3}
    assert loaded.config == net.config and not loaded.training
    args = _random_batch([2, 3], dtype=torch.float32)
    with torch.no_grad():
        for key in HEADS:
            torch.testing.assert_close(loaded(*args)[key], net(*args)[key], rtol=0, atol=0)
    with pytest.raises(TypeError, match="plain Python data"):
        save_model_checkpoint(tmp_path / "bad.pt", net, {"obj": object()})


def test_checkpoint_errors(tmp_path):
    net = _net().float()
    good = tmp_path / "net.pt"
    save_model_checkpoint(good, net)
    data = good.read_bytes()

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupted"):
        load_model_checkpoint(truncated)
    with pytest.raises(FileNotFoundError):
        load_model_checkpoint(tmp_path / "missing.pt")

    ckpt = torch.load(good, weights_only=True)
    cases = {
        "other.pt": ({"weights": torch.zeros(2)}, "not a crystalign-model checkpoint"),
        "future.pt": ({**ckpt, "format_version": FORMAT_VERSION + 1}, "newer crystalign"),
        "badcfg.pt": ({**ckpt, "model_config": {**ckpt["model_config"], "width": 3}}, "unknown key"),
        "lightning.pt": ({"state_dict": {"model.encoder.coord_out.weight": torch.zeros(3, 16)}}, "import-omatg"),
        "shapes.pt": (
            {**ckpt, "state_dict": {**ckpt["state_dict"], "coord_out.weight": torch.zeros(4, 16)}},
            r"mismatched \(1\)",
        ),
    }
    for name, (obj, message) in cases.items():
        torch.save(obj, tmp_path / name)
        with pytest.raises(CheckpointError, match=message):
            load_model_checkpoint(tmp_path / name)


# ---------------------------------------------------------------------------- import of the authors' checkpoints


class _TrainerConfig:
    """Stands in for the Python objects a Lightning checkpoint pickles into its hyper-parameters."""

    def __init__(self):
        self.lr = 1e-3
        self.modules = {"encoder": "CSPNetFull"}


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _authors_checkpoint(path: Path, tensors: dict[str, torch.Tensor], extra_objects=()) -> None:
    torch.save(
        {
            "epoch": 41,
            "global_step": 12345,
            "pytorch-lightning_version": "2.4.0",
            "state_dict": {f"model.{k}": v for k, v in tensors.items()},
            "hyper_parameters": {"config": _TrainerConfig(), "objects": list(extra_objects)},
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-3}]}],
        },
        path,
    )


def test_import_paper_size_authors_checkpoint(tmp_path):
    spec = json.loads(AUTHORS_JSON.read_text())
    g = torch.Generator().manual_seed(0)
    tensors = {name: 0.02 * torch.randn(*shape, generator=g) for name, shape in spec["tensors"]}
    src = tmp_path / "omatg.ckpt"
    _authors_checkpoint(src, tensors)
    with pytest.raises(CheckpointError, match="Python objects"):  # the plain loader refuses it
        load_model_checkpoint(src)

    out = tmp_path / "imported.pt"
    meta = import_omatg_checkpoint(src, out)
    assert meta["model_config"] == CSPNetConfig.paper().to_dict()
    assert meta["source"]["epoch"] == 41 and meta["source"]["num_parameters"] == 12_403_400

    net, loaded_meta = load_model_checkpoint(out)
    assert loaded_meta["source"]["sha256"] == meta["source"]["sha256"]
    for name, value in net.state_dict().items():
        assert torch.equal(value, tensors[f"encoder.{name}"]), name
    t, species, frac, lattice, n_atoms = _random_batch([5, 2], dtype=torch.float32)
    with torch.no_grad():
        out_fast = net(t, species, frac, lattice, n_atoms)
        out_ref = reference_forward(net, t, species, frac, lattice, n_atoms)
    for key in HEADS:
        assert torch.isfinite(out_fast[key]).all()
        torch.testing.assert_close(out_fast[key], out_ref[key], rtol=1e-4, atol=1e-5)


def _tiny_authors_tensors(dng=False):
    net = CSPNet(CSPNetConfig(hidden_dim=16, num_layers=2, num_freqs=4, time_dim=8, dng=dng))
    return {f"encoder.{k}": v.clone() for k, v in net.state_dict().items()}


def test_import_infers_dng_and_never_runs_pickled_code(tmp_path):
    marker = tmp_path / "ran.txt"
    src = tmp_path / "dng.ckpt"
    _authors_checkpoint(src, _tiny_authors_tensors(dng=True), extra_objects=[_Payload(marker)])
    meta = import_omatg_checkpoint(src, tmp_path / "dng.pt")
    assert not marker.exists()
    assert meta["model_config"]["dng"] and meta["model_config"]["num_layers"] == 2
    net, _ = load_model_checkpoint(tmp_path / "dng.pt")
    assert set(net(*_random_batch([3], dtype=torch.float32, dng=True))) == {*HEADS, "species_b", "species_eta"}


def test_import_reports_every_mismatch(tmp_path):
    tensors = _tiny_authors_tensors()
    del tensors["encoder.coord_out_2.weight"]
    tensors["encoder.scalar_out.weight"] = torch.zeros(1, 16)
    tensors["encoder.lattice_out.weight"] = torch.zeros(6, 16)
    src = tmp_path / "broken.ckpt"
    _authors_checkpoint(src, tensors)
    with pytest.raises(CheckpointError) as info:
        import_omatg_checkpoint(src, tmp_path / "x.pt")
    message = str(info.value)
    assert "missing (1): coord_out_2.weight" in message
    assert "unexpected (1): scalar_out.weight" in message
    assert "lattice_out.weight: shape (6, 16), expected (9, 16)" in message
    assert not (tmp_path / "x.pt").exists()


def test_import_refuses_the_one_sided_score_based_variants(tmp_path):
    """VPSBD/VESBD weights fit the network but were trained for an interpolant crystalign does not have."""
    for variant in ("VPSBD-ODE", "VESBD-ODE", "Trig-ODE"):
        src = tmp_path / "vesbd_vs_trig" / "MP-20-CSP" / variant / "model.ckpt"  # only the variant folder counts
        src.parent.mkdir(parents=True)
        _authors_checkpoint(src, _tiny_authors_tensors())
        if variant.startswith("Trig"):
            assert import_omatg_checkpoint(src, tmp_path / "trig.pt")["model_config"]["num_layers"] == 2
            continue
        with pytest.raises(CheckpointError, match=f"{variant[:5]} variants use OMatG's one-sided"):
            import_omatg_checkpoint(src, tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()


def test_import_command(tmp_path):
    typer = pytest.importorskip("typer")
    from typer.testing import CliRunner

    from crystalign.cli.models import register

    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """crystalign"""

    register(app)
    src = tmp_path / "omatg.ckpt"
    _authors_checkpoint(src, _tiny_authors_tensors())
    out = tmp_path / "net.pt"
    runner = CliRunner()
    result = runner.invoke(app, ["import-omatg", str(src), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "CSP CSPNet 2 x 16" in result.output
    from crystalign.generator import Generator, composition_batch

    gen = Generator.load(out)  # usable wherever a crystalign model is: sample, rl fit, predict
    assert gen.net.config.hidden_dim == 16 and gen.interpolants["pos"].uses_denoiser
    assert gen.sample(composition_batch(["SrTiO3"], 2), seed=0, steps=3).num_structures == 2
    again = runner.invoke(app, ["import-omatg", str(src), "--out", str(out)])
    assert again.exit_code == 1 and "--force" in again.output
    bad = runner.invoke(app, ["import-omatg", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "n.pt")])
    assert bad.exit_code == 1 and "does not exist" in bad.output
    # the authors' de novo weights import with their DNG setup, and generate
    dng_src = tmp_path / "dng.ckpt"
    _authors_checkpoint(dng_src, _tiny_authors_tensors(dng=True))
    result = runner.invoke(app, ["import-omatg", str(dng_src), "--out", str(tmp_path / "dng.pt")])
    assert result.exit_code == 0 and "DNG CSPNet 2 x 16" in result.output, result.output
    dng = Generator.load(tmp_path / "dng.pt")
    assert dng.is_dng and dng.interpolants.species.noise == pytest.approx(0.1895)
    made = dng.generate(2, atoms=3, seed=0, steps=3)
    assert made.n_atoms.tolist() == [3, 3] and made.species.min() >= 1
    wrong = runner.invoke(app, ["import-omatg", str(dng_src), "--out", str(tmp_path / "w.pt"), "--config", "mp_20_paper_gpu"])
    assert wrong.exit_code == 1 and "DNG" in wrong.output and "mp_20_dng_gpu" in wrong.output
