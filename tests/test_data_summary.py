"""Dataset summaries, the log-normal length fit, and the ``crystalign data`` commands."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from crystalign.cli import app
from crystalign.crystal import CrystalBatch
from crystalign.data import load_dataset
from crystalign.data.summary import fit_lognormal_lengths, format_summary, space_groups, summarize

pytestmark = pytest.mark.data
runner = CliRunner()


@pytest.fixture(scope="module")
def mp20(data_root):
    return load_dataset("mp_20_sample", data_root=data_root)


@pytest.fixture(scope="module")
def perov_subset(data_root):
    return load_dataset("perov_5_train_subset", data_root=data_root)


def test_fit_lognormal_lengths_matches_numpy():
    rng = np.random.default_rng(0)
    lat = torch.from_numpy(np.stack([np.diag(rng.lognormal([1.0, 1.5, 2.0], [0.1, 0.2, 0.3])) for _ in range(400)]))
    batch = CrystalBatch(
        species=torch.full((400,), 6), frac=torch.zeros(400, 3, dtype=torch.float64), lattice=lat, n_atoms=torch.ones(400, dtype=torch.long)
    )
    mu, s = fit_lognormal_lengths(batch)
    logs = np.log(np.stack([np.diag(m) for m in lat.numpy()]))
    assert mu.dtype == torch.float64 and mu.shape == (3,) and s.shape == (3,)
    assert np.allclose(mu.numpy(), logs.mean(0)) and np.allclose(s.numpy(), logs.std(0))
    assert np.allclose(mu.numpy(), [1.0, 1.5, 2.0], atol=0.05)


def test_fit_uses_cell_as_read(perov_subset, data_root):
    """The fit follows the reader's options: Niggli reduction changes which length is a, b, c."""
    mu, s = fit_lognormal_lengths(perov_subset.batch)
    lengths = perov_subset.batch.lattice.norm(dim=-1)
    assert torch.allclose(mu, lengths.log().mean(0))
    red = load_dataset("perov_5_train_subset", data_root=data_root, niggli=True)
    mu_r, _ = fit_lognormal_lengths(red.batch)
    assert mu_r[0] <= mu_r[1] <= mu_r[2]


def test_space_groups_agree_with_materials_project(mp20):
    sgs = space_groups(mp20.batch)
    assert [s[0] for s in sgs] == mp20.properties["spacegroup.number"].tolist()


def test_summary_contents(perov_subset):
    s = summarize(perov_subset)
    assert s["rows"] == 116
    assert s["atoms"] == {"total": 580, "min": 5, "mean": 5.0, "max": 5, "histogram": {5: 116}}
    assert s["valid"] == 116
    assert s["elements"]["O"]["structures"] == 93
    assert sum(e["atoms"] for e in s["elements"].values()) == 580
    assert sum(s["space_groups"]["counts"].values()) == 116 and s["space_groups"]["failed"] == 0
    assert "Pm-3m (221)" in s["space_groups"]["counts"]
    lat = s["lattice"]
    assert np.allclose(lat["angles_mean"], 90.0)
    assert 5 < lat["volume_per_atom"]["mean"] < 30
    mu, sd = fit_lognormal_lengths(perov_subset.batch)
    assert s["lognormal_lengths"] == {"mu": mu.tolist(), "s": sd.tolist()}
    json.dumps(s)  # JSON-ready
    text = format_summary(s)
    assert "log-normal mu" in text and "Pm-3m (221)" in text and "116 / 116" in text


def test_cli_summary_json_by_name(data_root):
    result = runner.invoke(
        app, ["data", "summary", "perov_5_train_subset", "--data-root", str(data_root), "--json"]
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["rows"] == 116 and out["split"] == "train" and len(out["lognormal_lengths"]["mu"]) == 3


def test_cli_summary_table_by_path(carbon_lmdb):
    result = runner.invoke(app, ["data", "summary", str(carbon_lmdb), "--no-spacegroups", "--top", "3"])
    assert result.exit_code == 0, result.output
    assert "850" in result.output and "atoms per cell" in result.output and "log-normal s" in result.output
    assert "space groups" not in result.output


def test_cli_summary_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("CRYSTALIGN_DATA_ROOT", raising=False)
    result = runner.invoke(app, ["data", "summary", "perov_5", "--split", "test", "--cache", str(tmp_path)])
    assert result.exit_code == 1
    assert "crystalign data download perov_5" in result.output
    bad = tmp_path / "x.csv"
    bad.write_text("a,b\n1,2\n")
    result = runner.invoke(app, ["data", "summary", str(bad)])
    assert result.exit_code == 1 and "no 'cif' column" in result.output
    result = runner.invoke(app, ["data", "summary", str(bad), "--split", "test"])  # a file has no splits
    assert result.exit_code == 1 and "--split selects a split of a named dataset" in result.output
    result = runner.invoke(app, ["data", "summary", str(bad), "--top", "-1"])  # a negative slice showed all but one
    assert result.exit_code == 2 and "--top" in result.output


def test_cli_list(data_root, tmp_path):
    result = runner.invoke(app, ["data", "list", "--data-root", str(data_root), "--cache", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    rows = {(e["dataset"], e["split"]): e for e in json.loads(result.output)}
    assert rows[("perov_5", "val")]["local"] == str(data_root / "perov_5" / "val.csv")
    assert rows[("mp_20", "train")]["local"] is None and rows[("mp_20", "train")]["downloadable"]
    assert not rows[("mp_20_sample", "sample")]["downloadable"]
    table = runner.invoke(app, ["data", "list", "--data-root", str(data_root), "--cache", str(tmp_path)])
    assert table.exit_code == 0 and "carbon_24_unique" in table.output


@pytest.mark.parametrize("cmd", [[], ["list"], ["download"], ["summary"]])
def test_every_command_help_shows_an_example(cmd):
    result = runner.invoke(app, ["data", *cmd, "--help"])
    assert result.exit_code == 0
    assert "Example: crystalign data" in result.output

