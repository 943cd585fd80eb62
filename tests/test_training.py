"""Base-model training on real data: tiny models, few steps; checkpoints, resume, NaN guard, DDP on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from crystalign.config import ConfigError, from_dict, load_config
from crystalign.generator import Generator
from crystalign.training import TrainConfig, train

TINY = {
    "seed": 0,
    "data": {"dataset": "perov_5", "split": "val", "holdout_fraction": 0.1, "split_seed": 0, "max_structures": 96},
    "generator": {
        "net": {"hidden_dim": 32, "num_layers": 2, "num_freqs": 8, "time_dim": 16},
        "interpolants": {"pos": {"path": "linear", "periodic": True, "correct_com": True}, "cell": {"path": "linear"}},
        "sampling": {"steps": 5},
    },
    "optim": {"lr": 1e-3, "batch_size": 32, "max_epochs": 1, "ema_decay": 0.9},
    "validation": {"every_n_epochs": 1, "match_every_n_epochs": 1, "match_subset": 4, "match_steps": 3},
    "trainer": {"accelerator": "cpu", "devices": 1, "logger": "csv", "progress_bar": False},
}


def with_changes(config: dict, **changes) -> dict:
    """A deep copy of ``config`` with dotted keys (``"optim.lr"``) set to new values."""
    cfg = json.loads(json.dumps(config))
    for dotted, value in changes.items():
        node = cfg
        *path, last = dotted.split(".")
        for key in path:
            node = node[key]
        node[last] = value
    return cfg


def tiny_config(**changes) -> TrainConfig:
    return from_dict(TrainConfig, with_changes(TINY, **changes))


def test_train_checkpoint_resume(tmp_path, data_root):
    out = tmp_path / "run"
    result = train(tiny_config(), out, data_root=str(data_root))
    assert result["epochs"] == 1
    ckpt = torch.load(out / "last.ckpt", map_location="cpu", weights_only=True)
    prov = ckpt["generator"]["provenance"]
    assert len(prov["data_sha256"]) == 64 and prov["seed"] == 0 and "torch" in prov["versions"]
    assert prov["n_train"] + prov["n_holdout"] == 96
    gen = Generator.load(out / "model.pt")
    assert gen.coverage["elements"] and gen.coverage["n_atoms_max"] == 5
    assert (out / "logs" / "version_0" / "metrics.csv").exists()
    metrics = (out / "logs" / "version_0" / "metrics.csv").read_text()
    assert "val/match_rate" in metrics and "train/pos_b" in metrics
    # resume continues from epoch 1 to 2
    result2 = train(tiny_config(**{"optim.max_epochs": 2}), out, resume=True, data_root=str(data_root))
    assert result2["epochs"] == 2 and result2["global_step"] == 2 * result["global_step"]


def test_nan_loss_stops_with_clear_message_and_keeps_checkpoint(tmp_path, data_root, monkeypatch):
    import crystalign.training as training

    out = tmp_path / "run"
    train(tiny_config(), out, data_root=str(data_root))
    good = (out / "last.ckpt").read_bytes()
    real = training.interpolant_losses
    # the resumed session's losses blow up, as after a diverging update (the real losses, times NaN)
    monkeypatch.setattr(training, "interpolant_losses", lambda *a, **k: {key: v * float("nan") for key, v in real(*a, **k).items()})
    with pytest.raises(FloatingPointError, match="non-finite training loss"):
        train(tiny_config(**{"optim.max_epochs": 3}), out, resume=True, data_root=str(data_root))
    assert (out / "last.ckpt").read_bytes() == good
    Generator.load(out / "last.ckpt")


def test_config_errors_name_the_key(tmp_path):
    bad = json.loads(json.dumps(TINY))
    bad["optim"]["learning_rate"] = 1.0
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match=r"optim: unknown key\(s\) 'learning_rate'"):
        load_config(p, TrainConfig)
    bad = json.loads(json.dumps(TINY))
    bad["optim"]["batch_size"] = "large"
    p.write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match=r"optim.batch_size: expected an integer"):
        load_config(p, TrainConfig)


def test_shipped_presets_parse():
    root = Path(__import__("crystalign").__file__).parent / "configs"
    presets = sorted(root.glob("*_cpu.yaml")) + sorted(root.glob("*_gpu.yaml"))
    assert presets
    for path in presets:
        if path.name.startswith("rl_"):
            continue
        cfg = load_config(path, TrainConfig)
        from crystalign.interpolants import Interpolants

        Interpolants.from_config(cfg.generator.interpolants)


def test_shipped_rl_presets_parse():
    from crystalign.rl.config import RLConfig

    root = Path(__import__("crystalign").__file__).parent / "configs"
    presets = sorted(root.glob("rl_*.yaml"))
    assert len(presets) >= 4
    for path in presets:
        cfg = load_config(path, RLConfig)
        assert cfg.fields and cfg.iterations > 0


def test_ddp_two_cpu_processes_keep_weights_identical(tmp_path, data_root):
    """2-process DDP (gloo) for a few steps; parameters must agree across ranks afterwards."""
    cfg = tiny_config(
        **{
            "trainer.devices": 2,
            "trainer.strategy": "ddp_fork",
            "trainer.check_rank_consistency": True,
            "validation.match_every_n_epochs": 0,
            "optim.ema_decay": None,
        }
    )
    out = tmp_path / "run"
    train(cfg, out, data_root=str(data_root))
    result = json.loads((out / "rank_consistency.json").read_text())
    assert result["world_size"] == 2
    assert result["max_abs_diff"] == 0.0
    assert result["global_step"] > 0


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_resume_continues_draw_for_draw(tmp_path, data_root):
    """One epoch, then a resumed second, ends with exactly the weights of two epochs in one go: the checkpoint
    carries the random streams (batch order, times, base samples, noise)."""
    # validation every epoch, and every second epoch, where a run killed after a validation-end checkpoint (best.ckpt
    # is that checkpoint) is re-entered by Lightning at the finished epoch
    for every, first, total in ((1, 1, 2), (2, 2, 4)):
        quick = {"validation.match_every_n_epochs": 0, "validation.every_n_epochs": every}
        straight_dir, split_dir = tmp_path / f"straight{every}", tmp_path / f"split{every}"
        train(tiny_config(**quick, **{"optim.max_epochs": total}), straight_dir, data_root=str(data_root))
        train(tiny_config(**quick, **{"optim.max_epochs": first}), split_dir, data_root=str(data_root))
        if every > 1:  # as a kill just after the validation-end checkpoint leaves the folder
            (split_dir / "last.ckpt").write_bytes((split_dir / "best.ckpt").read_bytes())
        train(tiny_config(**quick, **{"optim.max_epochs": total}), split_dir, resume=True, data_root=str(data_root))
        straight, split = _weights(straight_dir / "last.ckpt"), _weights(split_dir / "last.ckpt")
        assert straight.keys() == split.keys()
        assert all(torch.equal(straight[k], split[k]) for k in straight), every


def test_a_kill_during_the_first_checkpoint_resumes_from_best(tmp_path, data_root):
    """Lightning writes best.ckpt before last.ckpt: a kill between them must not leave a folder that neither
    --resume (no last.ckpt) nor a new run (a run is there) accepts."""
    quick = {"validation.match_every_n_epochs": 0}
    out = tmp_path / "run"
    train(tiny_config(**quick), out, data_root=str(data_root))
    (out / "last.ckpt").write_bytes((out / "best.ckpt").read_bytes())  # the first checkpoint: both the same point
    straight = _weights(out / "last.ckpt")
    (out / "last.ckpt").unlink()
    result = train(tiny_config(**quick, **{"optim.max_epochs": 2}), out, resume=True, data_root=str(data_root))
    assert result["epochs"] == 2 and _weights(out / "last.ckpt").keys() == straight.keys()


def cif_folder(folder: Path, csv_path: Path, n: int) -> Path:
    """A user's dataset as a folder of CIF files: the first ``n`` rows of a CDVAE-style CSV."""
    import csv

    folder.mkdir()
    csv.field_size_limit(1 << 30)
    with open(csv_path, newline="") as fh:
        for i, row in zip(range(n), csv.DictReader(fh)):
            (folder / f"s{i:02d}.cif").write_text(row["cif"])
    return folder


def test_resume_refuses_a_run_past_max_epochs_and_a_changed_cif_folder(tmp_path, data_root, perov_val_csv):
    """Resuming a finished run without raising max_epochs was a Lightning traceback (and an empty log folder); a
    CIF folder changed since the checkpoint trained on other data silently (folders had no digest)."""
    from crystalign.training import RunFolderError

    folder = cif_folder(tmp_path / "mycifs", perov_val_csv, 40)
    quick = {"validation.match_every_n_epochs": 0, "data.dataset": str(folder), "optim.max_epochs": 2}
    out = tmp_path / "run"
    train(tiny_config(**quick), out, data_root=str(data_root))
    logs = sorted(p.name for p in (out / "logs").iterdir())
    with pytest.raises(RunFolderError, match="already at epoch 2, past optim.max_epochs = 1; pass --max-epochs above 2"):
        train(tiny_config(**{**quick, "optim.max_epochs": 1}), out, resume=True, data_root=str(data_root))
    assert sorted(p.name for p in (out / "logs").iterdir()) == logs
    for f in sorted(folder.iterdir())[:10]:
        f.unlink()
    with pytest.raises(RunFolderError, match="changed since"):
        train(tiny_config(**{**quick, "optim.max_epochs": 3}), out, resume=True, data_root=str(data_root))


def test_a_broken_file_in_a_cif_folder_stops_training_unless_skip_bad(tmp_path, data_root, perov_val_csv):
    folder = cif_folder(tmp_path / "mycifs", perov_val_csv, 30)
    (folder / "zz_broken.cif").write_text("data_x\n_cell_length_a garbage\n")
    quick = {"validation.match_every_n_epochs": 0, "data.dataset": str(folder)}
    with pytest.raises(Exception, match="zz_broken"):
        train(tiny_config(**quick), tmp_path / "strict", data_root=str(data_root))
    with pytest.warns(UserWarning, match=r"data.skip_bad: left out 1 structure\(s\) .*zz_broken"):
        result = train(tiny_config(**quick, **{"data.skip_bad": True}), tmp_path / "run", data_root=str(data_root))
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert result["epochs"] == 1 and summary["n_train"] + summary["n_holdout"] == 30


def test_epochs_after_the_last_validation_are_checkpointed(tmp_path, data_root):
    cfg = tiny_config(**{"validation.every_n_epochs": 2, "validation.match_every_n_epochs": 0, "optim.max_epochs": 3})
    result = train(cfg, tmp_path / "run", data_root=str(data_root))
    ckpt = torch.load(tmp_path / "run" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == result["global_step"] and ckpt["epoch"] == result["epochs"] == 3


def test_non_finite_gradients_stop_before_the_step(tmp_path, data_root, monkeypatch):
    """A finite loss whose gradient is not (here: d sqrt(x)/dx at 0) must not reach the weights."""
    import crystalign.training as training

    out = tmp_path / "run"
    train(tiny_config(), out, data_root=str(data_root))
    good = (out / "last.ckpt").read_bytes()
    real = training.interpolant_losses
    monkeypatch.setattr(
        training, "interpolant_losses", lambda *a, **k: {key: v + torch.sqrt(v - v.detach()) for key, v in real(*a, **k).items()}
    )
    with pytest.raises(FloatingPointError, match="non-finite gradients"):
        train(tiny_config(**{"optim.max_epochs": 3}), out, resume=True, data_root=str(data_root))
    assert (out / "last.ckpt").read_bytes() == good
    assert all(torch.isfinite(v).all() for v in _weights(out / "last.ckpt").values() if v.is_floating_point())


def test_lightning_checkpoints_are_written_atomically_beside_their_target(tmp_path, data_root, monkeypatch):
    """Lightning's own save moves a file from the temp folder, a plain copy across filesystems: a kill could leave a
    truncated last.ckpt. Every checkpoint must be renamed into place from a temporary file in its own folder."""
    import crystalign.io as io

    renames = []
    real = io.os.replace
    monkeypatch.setattr(io.os, "replace", lambda src, dst: (renames.append((Path(src), Path(dst))), real(src, dst))[1])
    train(tiny_config(**{"validation.match_every_n_epochs": 0}), tmp_path / "run", data_root=str(data_root))
    written = {dst.name for src, dst in renames if dst.suffix == ".ckpt" and src.parent == dst.parent}
    assert {"best.ckpt", "last.ckpt"} <= written, renames
    assert not list((tmp_path / "run").glob(".*.part"))


def test_fp16_loss_scaler_overflow_skips_the_step_instead_of_stopping(tmp_path, data_root, monkeypatch):
    """'16-mixed' (CUDA) scales the loss; on overflow the gradients are inf on purpose and the scaler skips the step
    and lowers its scale. Lightning's fp16 plugin with a real GradScaler, on the CPU, starting at an overflowing scale."""
    import lightning as L
    from lightning.pytorch.plugins.precision import MixedPrecision

    import crystalign.training as training

    scalers = []
    real = L.Trainer

    def fp16_trainer(*args, **kwargs):
        if "callbacks" in kwargs:  # the run's trainer (not an option probe): fp16 with loss scaling
            kwargs.pop("precision", None)
            scalers.append(torch.amp.GradScaler("cpu", init_scale=1e38))
            kwargs["plugins"] = [*kwargs.get("plugins", []), MixedPrecision("16-mixed", "cpu", scaler=scalers[-1])]
        return real(*args, **kwargs)

    monkeypatch.setattr(training.L, "Trainer", fp16_trainer)
    cfg = tiny_config(**{"validation.match_every_n_epochs": 0, "optim.ema_decay": None, "trainer.logger": "none"})
    result = train(cfg, tmp_path / "run", data_root=str(data_root))
    assert result["global_step"] > 0 and scalers[-1].get_scale() < 1e38  # it overflowed, lowered the scale, went on


def test_options_that_cannot_work_are_refused_before_any_work(tmp_path, data_root):
    import importlib.util

    with pytest.raises(ConfigError, match="trainer.precision = .bf16-true.: training data and weights would be rounded"):
        train(tiny_config(**{"trainer.precision": "bf16-true"}), tmp_path / "a", data_root=str(data_root))
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(ConfigError, match="trainer.logger = 'wandb' needs the 'wandb' package"):
            train(tiny_config(**{"trainer.logger": "wandb"}), tmp_path / "b", data_root=str(data_root))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
