"""``crystalign train`` with bad user input: clear errors (no traceback) before any work, and no earlier run lost.

One tiny real run (perov_5, 1 epoch) is shared by the module; tests that change it work on a copy.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from crystalign.cli import app
from crystalign.config import ConfigError, load_config, to_dict
from crystalign.training import TrainConfig
from test_training import TINY as TRAINING_TINY
from test_training import with_changes

# test_training's tiny run, smaller still: one layer, no EMA, no match-rate validation
TINY = with_changes(
    TRAINING_TINY,
    **{
        "data.max_structures": 64,
        "generator.net": {"hidden_dim": 16, "num_layers": 1, "num_freqs": 4, "time_dim": 16},
        "generator.sampling.steps": 3,
        "optim.ema_decay": None,
        "validation.match_every_n_epochs": 0,
    },
)


def write_config(path: Path, **changes) -> Path:
    path.write_text(yaml.safe_dump(with_changes(TINY, **changes)))
    return path


def train_cli(*args, data_root: Path):
    return CliRunner().invoke(app, ["train", *map(str, args), "--data-root", str(data_root)])


def assert_clean_error(res, *fragments: str) -> None:
    assert res.exit_code == 2, res.output
    assert isinstance(res.exception, SystemExit), f"traceback instead of a clean error: {res.exception!r}"
    for fragment in fragments:
        assert fragment in res.output, res.output


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, data_root) -> tuple[Path, Path]:
    """(config, run folder) of a finished 1-epoch run; copy the folder before changing it."""
    root = tmp_path_factory.mktemp("first_run")
    cfg = write_config(root / "tiny.yaml")
    res = train_cli(cfg, "--out", root / "run", data_root=data_root)
    assert res.exit_code == 0, res.output
    return cfg, root / "run"


def copy_run(first_run, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(first_run[1], run)
    return run


def test_fresh_run_into_a_folder_holding_a_run_is_refused(first_run, tmp_path, data_root):
    run = copy_run(first_run, tmp_path)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    res = train_cli(first_run[0], "--out", run, data_root=data_root)
    assert_clean_error(res, "already holds a training run", "last.ckpt", "--resume", "another --out")
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before  # nothing overwritten or added


def test_out_must_be_a_writable_folder(tmp_path, data_root):
    cfg = write_config(tmp_path / "tiny.yaml")
    afile = tmp_path / "afile"
    afile.write_text("mine")
    assert_clean_error(train_cli(cfg, "--out", afile, data_root=data_root), str(afile), "existing file")
    assert_clean_error(train_cli(cfg, "--out", afile / "run", data_root=data_root), str(afile / "run"))
    assert afile.read_text() == "mine"
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert_clean_error(train_cli(cfg, "--out", locked / "run", data_root=data_root), "not writable")


def test_resume_keeps_the_earlier_sessions_metrics(first_run, tmp_path, data_root):
    run = copy_run(first_run, tmp_path)  # a moved run folder, too: it must still resume into last.ckpt
    res = train_cli(first_run[0], "--out", run, "--resume", "--max-epochs", "2", data_root=data_root)
    assert res.exit_code == 0, res.output
    epochs = set()
    for metrics in sorted((run / "logs").glob("version_*/metrics.csv")):
        with metrics.open() as f:
            epochs |= {int(row["epoch"]) for row in csv.DictReader(f) if row["train/loss"]}
    assert epochs == {0, 1}
    assert sorted(p.name for p in run.glob("*.ckpt")) == ["best.ckpt", "last.ckpt"]  # no last-v1.ckpt beside a stale one
    assert torch.load(run / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 2
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["resumed_from"]["config_changes"] == {"optim.max_epochs": [1, 2]}
    assert summary["config"]["optim"]["max_epochs"] == 2


def test_resume_with_a_different_config_is_refused(first_run, tmp_path, data_root):
    run = copy_run(first_run, tmp_path)
    last = (run / "last.ckpt").read_bytes()
    changed = write_config(tmp_path / "changed.yaml", **{"optim.lr": 0.5, "seed": 3, "validation.every_n_epochs": 2})
    res = train_cli(changed, "--out", run, "--resume", "--max-epochs", "2", data_root=data_root)
    assert_clean_error(res, "optim.lr: 0.001 -> 0.5", "seed: 0 -> 3", str(run / "last.ckpt"))
    assert "validation.every_n_epochs:" not in res.output and "optim.max_epochs:" not in res.output  # allowed changes
    res = train_cli(first_run[0], "--out", run, "--resume", "--devices", "2", data_root=data_root)
    assert_clean_error(res, "trainer.devices: 1 -> 2")
    assert (run / "last.ckpt").read_bytes() == last


def test_resume_refuses_a_changed_data_file(tmp_path, perov_val_csv):
    from crystalign.training import RunFolderError, train

    with perov_val_csv.open(newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, [row for _, row in zip(range(40), reader)]

    def write_rows(n: int) -> None:
        with data.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows[:n])

    data = tmp_path / "mine.csv"
    write_rows(40)
    cfg = load_config(write_config(tmp_path / "c.yaml", **{"data.dataset": str(data), "data.max_structures": None}), TrainConfig)
    train(cfg, tmp_path / "run")
    write_rows(39)
    with pytest.raises(RunFolderError, match=r"data file .*mine.csv.* changed since"):
        train(cfg, tmp_path / "run", resume=True)


def test_resume_may_not_stretch_a_cosine_schedule(tmp_path):
    from crystalign.training import check_resume_config

    saved = to_dict(load_config(write_config(tmp_path / "c.yaml", **{"optim.cosine_schedule": True}), TrainConfig))
    longer = load_config(write_config(tmp_path / "c2.yaml", **{"optim.cosine_schedule": True, "optim.max_epochs": 4}), TrainConfig)
    with pytest.raises(ConfigError, match=r"optim.max_epochs: 1 -> 4 \(optim.max_epochs is the cosine schedule's length"):
        check_resume_config(saved, longer, Path("last.ckpt"))


def test_out_of_range_config_values_name_the_key(tmp_path, data_root):
    bad = write_config(tmp_path / "bad.yaml", **{"generator.net.hidden_dim": -4})
    with pytest.raises(ConfigError, match=r"bad.yaml.generator.net: .*hidden_dim must be >= 1, got -4"):
        load_config(bad, TrainConfig)
    with pytest.raises(ConfigError, match=r"generator.sampling: steps must be >= 2"):
        load_config(write_config(tmp_path / "steps.yaml", **{"generator.sampling.steps": 1}), TrainConfig)
    for key, value, message in [
        ("optim.max_epochs", 0, "optim: max_epochs must be >= 1, got 0"),
        ("optim.lr", -1.0, "optim: lr must be a positive number"),
        ("optim.ema_decay", 1.5, "optim: ema_decay must be in \\(0, 1\\)"),
        ("validation.match_steps", 1, "validation: match_steps must be >= 2"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(write_config(tmp_path / "range.yaml", **{key: value}), TrainConfig)
    assert_clean_error(train_cli(bad, "--out", tmp_path / "run", data_root=data_root), "generator.net", "hidden_dim")


def test_unusable_hardware_options_name_the_option(tmp_path, data_root):
    cfg = write_config(tmp_path / "tiny.yaml")
    out = tmp_path / "run"
    if not torch.cuda.is_available():
        gpu = write_config(tmp_path / "gpu.yaml", **{"trainer.accelerator": "gpu"})
        assert_clean_error(train_cli(gpu, "--out", out, data_root=data_root), "trainer.accelerator", "'gpu'", "this machine has: cpu")
    assert_clean_error(train_cli(cfg, "--out", out, "--accelerator", "tpu", data_root=data_root), "--accelerator", "'tpu'")
    assert_clean_error(train_cli(cfg, "--out", out, "--devices", "banana", data_root=data_root), "trainer.devices (--devices) = 'banana'")
    assert not out.exists()  # refused before any work


def test_resume_refuses_a_folder_with_two_runs_checkpoints(first_run, tmp_path, data_root):
    run = copy_run(first_run, tmp_path)
    shutil.copy(run / "last.ckpt", run / "last-v1.ckpt")  # as an earlier crystalign left a second run's checkpoint
    res = train_cli(first_run[0], "--out", run, "--resume", "--max-epochs", "2", data_root=data_root)
    assert_clean_error(res, "last-v1.ckpt besides last.ckpt")


def test_corrupt_last_checkpoint_on_resume_names_the_file(first_run, tmp_path, data_root):
    run = copy_run(first_run, tmp_path)
    (run / "last.ckpt").write_bytes((run / "last.ckpt").read_bytes()[:50_000])  # a truncated copy
    res = train_cli(first_run[0], "--out", run, "--resume", "--max-epochs", "2", data_root=data_root)
    assert_clean_error(res, f"cannot resume from {run / 'last.ckpt'}", f"copy {run / 'best.ckpt'} over it")
