"""`crystalign config`: presets are listed and every config can be shown complete, checked, and run as shown."""

from __future__ import annotations

import dataclasses

import pytest
import yaml
from typer.testing import CliRunner

from crystalign.cli import app
from crystalign.cli.config import PRESETS, config_class, guess_kind
from crystalign.config import load_config, to_dict


def run(*args):
    return CliRunner().invoke(app, ["config", *map(str, args)])


def test_list_names_every_preset_with_its_kind():
    res = run("list")
    assert res.exit_code == 0
    lines = {line.split()[0]: line.split()[1] for line in res.output.splitlines()}
    assert lines == {p.stem: ("rl" if p.stem.startswith("rl_") else "train") for p in PRESETS.glob("*.yaml")}


@pytest.mark.parametrize("preset", sorted(p.stem for p in PRESETS.glob("*.yaml")))
def test_show_is_complete_and_round_trips(preset, tmp_path):
    """The shown YAML holds every key, and as a config file it is the preset itself."""
    res = run("show", preset)
    assert res.exit_code == 0, res.output
    shown = yaml.safe_load(res.output)
    kind = guess_kind(shown)
    cls = config_class(kind)
    assert set(shown) == {f.name for f in dataclasses.fields(cls)}
    (tmp_path / "full.yaml").write_text(res.output)
    assert to_dict(load_config(tmp_path / "full.yaml", cls)) == to_dict(load_config(PRESETS / f"{preset}.yaml", cls))


def test_show_defaults_and_user_files(tmp_path):
    res = run("show", "--kind", "rl")
    assert res.exit_code == 0 and yaml.safe_load(res.output)["group_size"] == 8
    mine = tmp_path / "mine.yaml"
    mine.write_text("variant: score\nfields: [pos]\nlr: 0.001\n")
    shown = yaml.safe_load(run("show", mine).output)
    assert shown["variant"] == "score" and shown["lr"] == 0.001 and shown["num_groups"] == 4


@pytest.mark.parametrize(
    "text,message",
    [
        ("variant: velocity\ngroup_sise: 8\n", "group_sise"),  # a misspelt key is named
        ("variant: velocity\ngroup_size: 1\n", "group_size"),  # a value out of range too
        ("optim: {lr: fast}\n", "optim.lr"),
        ("- not a mapping\n", "mapping"),
    ],
)
def test_show_checks_the_config_and_names_the_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    res = run("show", path)
    assert res.exit_code != 0 and message in res.output and str(path) in res.output, res.output


def test_show_and_train_refuse_a_folder_or_binary_file_naming_it(tmp_path):
    (tmp_path / "folder.yaml").mkdir()
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00")
    for name, message in (("folder.yaml", "is a folder, not a config file"), ("bin.yaml", "not a text (UTF-8) file")):
        res = run("show", tmp_path / name)
        assert res.exit_code != 0 and message in res.output and name in res.output, res.output
        assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
        res = CliRunner().invoke(app, ["train", str(tmp_path / name), "--out", str(tmp_path / "run")])
        assert res.exit_code != 0 and message in res.output, res.output
        assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)


def test_show_needs_something_to_show():
    assert "--kind" in run("show").output
    assert "not found" in run("show", "no_such_preset").output
    assert "--kind must be" in run("show", "--kind", "banana").output
