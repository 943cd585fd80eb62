"""User-input handling of RL: existing run folders, resume compatibility, RLConfig domains, `rl sample` and
`rl plot-schedule` options, callable reward specs and coverage warnings. Tiny networks, one or two iterations,
a three-structure data file written here (no data root needed)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from crystalign.cli import app
from crystalign.distributions import BaseDistribution
from crystalign.generator import Generator, GeneratorConfig, composition_batch
from crystalign.io import save_torch
from crystalign.model.cspnet import CSPNetConfig
from crystalign.rewards import make_reward
from crystalign.rl.config import RLConfig
from crystalign.rl.rollout import Policy
from crystalign.rl.trainer import RLTrainer

runner = CliRunner()


def tiny_generator(seed: int = 0, coverage: dict | None = None) -> Generator:
    torch.manual_seed(seed)
    cfg = GeneratorConfig(net=CSPNetConfig(hidden_dim=16, num_layers=1, num_freqs=4, time_dim=8))
    return Generator(cfg, BaseDistribution.from_preset("perov_5"), coverage=coverage)


def write_rocksalts(path: Path) -> Path:
    """NaCl, KBr and LiF as 2-atom primitive rock-salt cells."""
    from ase.build import bulk
    from ase.io import write

    write(path, [bulk(f, "rocksalt", a=a) for f, a in (("NaCl", 5.64), ("KBr", 6.6), ("LiF", 4.03))], format="extxyz")
    return path


@pytest.fixture
def setup(tmp_path):
    """(tmp_path, base checkpoint, config path, a function that writes a config with changes)."""
    save_torch(tmp_path / "base.pt", tiny_generator().checkpoint_dict())
    data = write_rocksalts(tmp_path / "rocksalt.extxyz")
    cfg = {
        "variant": "velocity", "fields": ["pos"], "steps": 3, "group_size": 2, "num_groups": 2, "iterations": 1, "lr": 1e-3,
        "reward": {"kind": "non_triclinic"}, "duplicate_check": False,
        "data": {"dataset": str(data), "holdout_fraction": 0.0}, "validation": {"every": 0},
    }

    def write_config(name: str = "rl.yaml", **changes) -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump({**cfg, **changes}))
        return path

    return tmp_path, tmp_path / "base.pt", write_config(), write_config


def fit(config: Path, base: Path, out: Path, *extra: str):
    return runner.invoke(app, ["rl", "fit", str(config), "-b", str(base), "--out", str(out), "--no-report", *extra])


def assert_clean_error(res, *needles: str) -> None:
    """A non-zero exit through typer.Exit with a message naming each needle: no traceback."""
    assert res.exit_code != 0, res.output
    assert isinstance(res.exception, SystemExit), res.exception
    assert "Traceback" not in res.output
    for needle in needles:
        assert needle in res.output, (needle, res.output)


def iterations_of(out: Path) -> list[int]:
    return [r["iteration"] for r in json.loads((out / "history.json").read_text())]


# ---------------------------------------------------------------------- 1. an existing run folder
def test_fit_into_existing_run_without_resume_is_refused_and_keeps_the_run(setup):
    tmp, base, config, _ = setup
    out = tmp / "run"
    assert fit(config, base, out).exit_code == 0
    before = {name: (out / name).read_bytes() for name in ("last.pt", "best.pt", "history.json")}
    res = fit(config, base, out)
    assert_clean_error(res, "already holds an RL run", "--resume")
    assert {name: (out / name).read_bytes() for name in before} == before
    # a run of 0 iterations is a run too (and can be extended with --resume)
    zero = tmp / "zero"
    assert fit(config, base, zero, "--iterations", "0").exit_code == 0
    assert_clean_error(fit(config, base, zero), "already holds an RL run")
    res = fit(config, base, zero, "--resume", "--iterations", "1")
    assert res.exit_code == 0, res.output
    assert iterations_of(zero) == [1]


def test_a_kill_during_the_first_checkpoint_resumes_from_best(setup):
    """best.pt is written before last.pt: a kill between them left a folder neither --resume nor a new run took."""
    tmp, base, _, write_config = setup
    config = write_config("val.yaml", validation={"every": 1, "num_compositions": 2}, data={"dataset": str(tmp / "rocksalt.extxyz"), "holdout_fraction": 0.34})
    out = tmp / "run"
    assert fit(config, base, out, "--iterations", "1").exit_code == 0
    (out / "last.pt").unlink()  # as the kill left it
    stale = out / ".last.pt.a1b2c3.part"  # and the cut-short write of last.pt
    stale.write_bytes(b"half")
    os.utime(stale, (0, 0))
    res = fit(config, base, out, "--resume", "--iterations", "2")
    assert res.exit_code == 0, res.output
    assert iterations_of(out) == [0, 1, 2] and not stale.exists()  # 0: the untrained baseline


def test_fit_with_a_damaged_potential_file_fails_before_the_first_rollout(setup):
    pytest.importorskip("sevenn", reason="the sevenn extra is not installed")
    tmp, base, _, write_config = setup
    (tmp / "bad.pth").write_bytes(b"not a model")
    config = write_config("bad.yaml", reward={"kind": "energy", "backend": {"name": "sevenn", "model": str(tmp / "bad.pth")}})
    res = fit(config, base, tmp / "run")
    assert_clean_error(res, "SevenNet model file", "bad.pth", "could not be loaded")
    assert not (tmp / "run" / "last.pt").exists()


def test_fit_output_folder_checked_before_any_work(setup):
    tmp, base, config, _ = setup
    (tmp / "afile").write_text("x")
    assert_clean_error(fit(config, base, tmp / "afile"), "afile", "existing file")
    assert_clean_error(fit(config, base, tmp / "none", "--resume"), "--resume", "last.pt")


# ---------------------------------------------------------------------- 2. resume compatibility
def test_resume_refuses_a_changed_config_or_base_model(setup):
    tmp, base, config, write_config = setup
    out = tmp / "run"
    assert fit(config, base, out).exit_code == 0
    saved = (out / "last.pt").read_bytes()

    changed = write_config("changed.yaml", group_size=4, lr=3e-3)
    assert_clean_error(fit(changed, base, out, "--resume", "--iterations", "2"), "group_size", "lr", "another --out")
    other_data = write_config("other_data.yaml", data={"dataset": str(tmp / "rocksalt.extxyz"), "holdout_fraction": 0.5})
    assert_clean_error(fit(other_data, base, out, "--resume", "--iterations", "2"), "data.holdout_fraction")
    save_torch(tmp / "other.pt", tiny_generator(seed=1).checkpoint_dict())
    assert_clean_error(fit(config, tmp / "other.pt", out, "--resume", "--iterations", "2"), "base model", "--base-checkpoint")
    assert (out / "last.pt").read_bytes() == saved and iterations_of(out) == [1]

    # only what cannot change the run may differ: more iterations, validation frequency, threads
    extended = write_config("extended.yaml", iterations=2, validation={"every": 2}, num_threads=1)
    res = fit(extended, base, out, "--resume")
    assert res.exit_code == 0, res.output
    assert iterations_of(out) == [1, 2]


def test_resume_of_a_checkpoint_without_the_base_hash_checks_the_stored_base(setup):
    tmp, base, config, _ = setup
    out = tmp / "run"
    assert fit(config, base, out).exit_code == 0
    state = torch.load(out / "last.pt", weights_only=True)
    del state["reference_hash"]  # as written before the hash was recorded
    save_torch(out / "last.pt", state)
    save_torch(tmp / "other.pt", tiny_generator(seed=1).checkpoint_dict())
    assert_clean_error(fit(config, tmp / "other.pt", out, "--resume", "--iterations", "2"), "base model")
    res = fit(config, base, out, "--resume", "--iterations", "2")
    assert res.exit_code == 0, res.output
    assert iterations_of(out) == [1, 2]


def test_resume_check_in_the_python_api(tmp_path):
    comps = composition_batch(["NaCl", "KBr"], 1).to(dtype=torch.float32)
    reward = make_reward("non_triclinic")

    def trainer(**kw):
        cfg = RLConfig(steps=3, group_size=2, num_groups=2, iterations=1, duplicate_check=False, **kw)
        cfg.validation.every = 0
        return RLTrainer(Policy(tiny_generator(), cfg), reward, cfg, comps, progress=False)

    trainer().fit(tmp_path)
    with pytest.raises(FileExistsError, match="already holds an RL run"):
        trainer().fit(tmp_path)
    with pytest.raises(ValueError, match="seed"):
        trainer(seed=5).fit(tmp_path, resume=True)


# ---------------------------------------------------------------------- 3. RLConfig domains
@pytest.mark.parametrize(
    "key,value",
    [
        ("num_groups", -1), ("num_groups", 0), ("ppo_epochs", 0), ("lr", -1e-4), ("lr", 0.0), ("lr", math.nan),
        ("lr", math.inf), ("iterations", -2), ("clip_eps", 0.0), ("grad_clip", -1.0), ("max_invalid_fraction", 1.5),
        ("minibatch_trajectories", 0), ("num_threads", -1), ("device", "gpu"),
    ],
)
def test_rl_config_rejects_out_of_domain_values_naming_the_key(key, value):
    with pytest.raises(ValueError, match=key):
        RLConfig(**{key: value})


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"fields": ["pos", "cell"], "noise": {"pos": {"kind": "sqrt", "a": 0.1}}}, r"noise: no schedule for the reinforced field\(s\) \['cell'\]"),
        ({"costs": {"pos_policy": 1.0, "cell_policy": 1.0}}, "costs.cell_policy: field 'cell' is not reinforced"),
        ({"costs": {"pos_policy": 1.0, "pos_distillation": 0.1}}, "costs.pos_distillation: denoiser distillation belongs to the 'score' variant"),
    ],
)
def test_rl_config_combinations_that_cannot_train_are_refused_up_front(changes, message):
    """Caught when the config is read, not after the first rollout and reward (minutes with a real potential)."""
    with pytest.raises(ValueError, match=message):
        RLConfig(**changes)


def test_rl_validation_config_rejects_negative_values():
    from crystalign.rl.config import RLValidationConfig

    with pytest.raises(ValueError, match="validation.every"):
        RLValidationConfig(every=-1)
    with pytest.raises(ValueError, match="validation.num_compositions"):
        RLValidationConfig(num_compositions=0)


def test_fit_cli_rejects_bad_config_values_and_options(setup):
    tmp, base, config, write_config = setup
    bad = write_config("bad.yaml", num_groups=0)
    assert_clean_error(fit(bad, base, tmp / "a"), "bad.yaml", "num_groups")
    assert_clean_error(fit(config, base, tmp / "b", "--iterations", "-2"), "iterations must be >= 0")
    assert_clean_error(fit(config, base, tmp / "c", "--device", "gpu"), "invalid device 'gpu'")
    assert_clean_error(fit(config, base, tmp / "d", "--device", "cuda:99"), "'cuda:99' requested")
    on_missing_gpu = write_config("gpu.yaml", device="cuda:99")
    assert_clean_error(fit(on_missing_gpu, base, tmp / "e"), "gpu.yaml", "'cuda:99' requested")
    assert not (tmp / "b" / "last.pt").exists()


# ---------------------------------------------------------------------- 4. rl sample / plot-schedule options
@pytest.fixture
def rl_checkpoint(tmp_path):
    cfg = RLConfig(variant="scale", fields=["pos", "cell"], steps=3, group_size=2, num_groups=1, iterations=1, duplicate_check=False)
    cfg.validation.every = 0
    comps = composition_batch(["NaCl"], 1).to(dtype=torch.float32)
    RLTrainer(Policy(tiny_generator(), cfg), make_reward("non_triclinic"), cfg, comps, progress=False).fit(tmp_path / "run")
    return tmp_path / "run" / "last.pt"


@pytest.mark.parametrize(
    "args,needle",
    [
        (["-k", "0"], "-k"), (["-k", "-1"], "-k"), (["-n", "0"], "-n"),
        (["--steps", "1"], "steps must be >= 2"), (["--steps", "-4"], "steps must be >= 2"), (["--steps", "0"], "steps must be >= 2"),
        (["--batch-size", "0"], "--batch-size"), (["--device", "gpu"], "invalid device"), (["--device", "cuda:99"], "'cuda:99' requested"),
    ],
)
def test_rl_sample_rejects_bad_options(rl_checkpoint, tmp_path, args, needle):
    refs = write_rocksalts(tmp_path / "refs.extxyz")
    source = ["--compositions-from", str(refs)] if args[0] == "-k" else ["-c", "NaCl"]
    res = runner.invoke(app, ["rl", "sample", str(rl_checkpoint), *source, "--out", str(tmp_path / "s"), *args])
    assert_clean_error(res, needle)
    assert not (tmp_path / "s" / "index.json").exists()


def test_rl_sample_refuses_k_with_a_single_composition(rl_checkpoint, tmp_path):
    res = runner.invoke(app, ["rl", "sample", str(rl_checkpoint), "-c", "NaCl", "-k", "4", "--out", str(tmp_path / "s")])
    assert_clean_error(res, "-k 4 applies to --compositions-from")


def test_damaged_or_foreign_rl_checkpoints_are_clean_errors(rl_checkpoint, tmp_path):
    """rl sample and plot-schedule name the file and what is wrong with it; nothing is sampled."""
    state = torch.load(rl_checkpoint, weights_only=True)
    policy = dict(state["policy"])
    name = next(k for k, v in policy.items() if v.ndim == 2)
    policy[name] = torch.zeros(3, 3)
    cases = {
        "tensor.pt": (torch.zeros(3), "not a crystalign RL checkpoint (format: 'Tensor')"),
        "list.pt": ([1, 2], "not a crystalign RL checkpoint (format: 'list')"),
        "noref.pt": ({k: v for k, v in state.items() if k != "reference"}, "damaged RL checkpoint: no reference entry"),
        "noconfig.pt": ({k: v for k, v in state.items() if k != "config"}, "no config entry"),
        "shape.pt": ({**state, "policy": policy}, "does not fit its policy"),
    }
    for file, (obj, needle) in cases.items():
        save_torch(tmp_path / file, obj)
        res = runner.invoke(app, ["rl", "sample", str(tmp_path / file), "-c", "NaCl", "--out", str(tmp_path / "s")])
        assert_clean_error(res, file, needle)
        res = runner.invoke(app, ["rl", "plot-schedule", str(tmp_path / file), "--out", str(tmp_path / "s.png")])
        assert_clean_error(res, file, needle)
    assert not (tmp_path / "s" / "index.json").exists() and not (tmp_path / "s.png").exists()
    # a checkpoint without its iteration count still samples, and records that it is unknown
    save_torch(tmp_path / "noiter.pt", {k: v for k, v in state.items() if k != "iteration"})
    res = runner.invoke(app, ["rl", "sample", str(tmp_path / "noiter.pt"), "-c", "NaCl", "--steps", "3", "--out", str(tmp_path / "s")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "s" / "samples.json").read_text())["iteration"] is None


def test_rl_sample_explicit_steps_and_early_out_check(rl_checkpoint, tmp_path):
    res = runner.invoke(app, ["rl", "sample", str(rl_checkpoint), "-c", "NaCl", "-n", "2", "--steps", "4", "--out", str(tmp_path / "s")])
    assert res.exit_code == 0, res.output
    record = json.loads((tmp_path / "s" / "samples.json").read_text())
    assert record["steps"] == 4
    n_valid = sum(s["valid"] for s in record["structures"])
    assert f"wrote 2 structures to {tmp_path / 's'} ({n_valid} valid" in " ".join(res.output.split())
    (tmp_path / "afile").write_text("x")
    res = runner.invoke(app, ["rl", "sample", str(rl_checkpoint), "-c", "NaCl", "--out", str(tmp_path / "afile")])
    assert_clean_error(res, "afile", "existing file")
    # a second run into the same folder would leave the first run's files beside its own
    res = runner.invoke(app, ["rl", "sample", str(rl_checkpoint), "-c", "KBr", "--steps", "4", "--out", str(tmp_path / "s")])
    assert_clean_error(res, "already holds samples")


def test_rl_sample_takes_a_dataset_name(rl_checkpoint, tmp_path, data_root):
    res = runner.invoke(app, [
        "rl", "sample", str(rl_checkpoint), "--compositions-from", "perov_5_train_subset", "--data-root", str(data_root),
        "--steps", "3", "--out", str(tmp_path / "s"),
    ])
    assert res.exit_code == 0, res.output
    assert len(json.loads((tmp_path / "s" / "index.json").read_text())) == 116


def test_plot_schedule_writes_the_format_of_the_suffix(rl_checkpoint, tmp_path):
    for name, magic in (("s.pdf", b"%PDF"), ("s.svg", b"<?xml"), ("s.png", b"\x89PNG")):
        res = runner.invoke(app, ["rl", "plot-schedule", str(rl_checkpoint), "--out", str(tmp_path / name)])
        assert res.exit_code == 0, res.output
        assert (tmp_path / name).read_bytes().startswith(magic), name
    assert_clean_error(runner.invoke(app, ["rl", "plot-schedule", str(rl_checkpoint), "--out", str(tmp_path / "s.txt")]), "s.txt", ".pdf")
    assert not (tmp_path / "s.txt").exists()
    (tmp_path / "folder").mkdir()
    assert_clean_error(runner.invoke(app, ["rl", "plot-schedule", str(rl_checkpoint), "--out", str(tmp_path / "folder")]), "folder")


# ---------------------------------------------------------------------- 5. callable reward specs
def test_callable_reward_spec_that_cannot_be_imported_names_what_is_missing():
    with pytest.raises(ValueError, match="no_such_module_xyz.*not found"):
        make_reward({"kind": "callable", "fn": "no_such_module_xyz:score"})
    with pytest.raises(ValueError, match="'math' has no attribute 'no_such_fn'"):
        make_reward({"kind": "callable", "fn": "math:no_such_fn"})
    assert make_reward({"kind": "callable", "fn": "math:fsum"}).name == "fsum"


def test_fit_cli_with_a_missing_callable_reward_fails_cleanly(setup):
    tmp, base, _, write_config = setup
    config = write_config("cb.yaml", reward={"kind": "callable", "fn": "no_such_module_xyz:score"})
    assert_clean_error(fit(config, base, tmp / "run"), "no_such_module_xyz")


# ---------------------------------------------------------------------- 6. coverage warnings
def test_fit_warns_once_about_compositions_outside_the_base_models_coverage(setup):
    from crystalign.coverage import coverage_summary

    tmp, _, config, _ = setup
    save_torch(tmp / "narrow.pt", tiny_generator(coverage={"elements": ["Na", "Cl"], "n_atoms_min": 2, "n_atoms_max": 2}).checkpoint_dict())
    res = fit(config, tmp / "narrow.pt", tmp / "run")
    assert res.exit_code == 0, res.output
    assert res.output.count("outside the base model's training coverage") == 1
    assert "2 of 3 training compositions" in res.output and "Br, K" in res.output and "F, Li" in res.output
    # no coverage recorded or all compositions covered: no warning
    assert coverage_summary(tiny_generator(), composition_batch(["KBr"], 1)) is None
    wide = tiny_generator(coverage={"elements": ["Na", "Cl", "K", "Br", "Li", "F"], "n_atoms_min": 2, "n_atoms_max": 2})
    assert coverage_summary(wide, composition_batch(["NaCl", "KBr", "LiF"], 1)) is None
