"""Files that are not checkpoints at all (notes, an empty file, JSON, another archive) given where a model or
an RL checkpoint belongs: one line naming the file and saying what it is, from Python and from the command
line, never torch's internal reason ("list index out of range") or a traceback."""

import os
import subprocess
import sys
import zipfile

import pytest
import torch
from typer.testing import CliRunner

from crystalign.cli import app
from crystalign.generator import Generator
from crystalign.model.checkpoint import CheckpointError
from crystalign.steering import SteeredModel

runner = CliRunner()

FOREIGN = {
    "notes.txt": (b"notes from Tuesday\nrun 3 looked fine\n", "it is a text file"),
    "empty.pt": (b"", "the file is empty"),
    "model.json": (b'{"format": "crystalign-model"}\n', "JSON"),
    "blank.pt": (b"\n\n  \n", "blank space"),
    # first bytes on which torch's legacy reader fails with "list index out of range"
    "odd.pt": (b")abc\n", "it is a text file"),
    "binary.pt": (bytes([0x29, 0xFF, 0xFE, 0x00]) * 8, "unrecognised binary content"),
}


@pytest.fixture
def foreign_files(tmp_path):
    for name, (content, _) in FOREIGN.items():
        (tmp_path / name).write_bytes(content)
    with zipfile.ZipFile(tmp_path / "archive.pt", "w") as archive:
        archive.writestr("readme.txt", "not a checkpoint")
    return tmp_path


def expectations():
    return [*((name, needle) for name, (_, needle) in FOREIGN.items()), ("archive.pt", "zip archive")]


@pytest.mark.parametrize("name,needle", expectations())
def test_generator_load_names_a_file_that_is_not_a_checkpoint(foreign_files, name, needle):
    path = foreign_files / name
    with pytest.raises(CheckpointError) as info:
        Generator.load(path)
    message = str(info.value)
    assert message.startswith(f"{path} is not a crystalign model checkpoint: ") and needle in message
    assert "\n" not in message and "index out of range" not in message and "operand" not in message


def test_rl_checkpoint_loading_names_a_file_that_is_not_a_checkpoint(foreign_files):
    with pytest.raises(CheckpointError, match="notes.txt is not a crystalign RL checkpoint: it is a text file"):
        SteeredModel.load(foreign_files / "notes.txt")


@pytest.mark.parametrize("payload", [None, 7, torch.zeros(3)], ids=["none", "int", "tensor"])
def test_generator_load_of_a_torch_file_holding_no_dict(tmp_path, payload):
    torch.save(payload, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt: not a crystalign generator checkpoint"):
        Generator.load(tmp_path / "other.pt")


def test_damaged_torch_files_are_still_called_corrupted(tmp_path):
    good = Generator.load("perov_5")
    torch.save(good.checkpoint_dict(), tmp_path / "full.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "full.pt").read_bytes()[:300])
    with pytest.raises(CheckpointError, match="cut.pt is corrupted, truncated"):
        Generator.load(tmp_path / "cut.pt")


@pytest.mark.parametrize("name,needle", expectations())
def test_sample_command_names_a_file_that_is_not_a_checkpoint(foreign_files, name, needle):
    out = foreign_files / "samples"
    res = runner.invoke(app, ["sample", "--model", str(foreign_files / name), "--composition", "SrTiO3", "-n", "1", "--out", str(out)])
    assert res.exit_code == 2, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    text = "".join(res.output.replace("│", "").split())  # rich may wrap a long path
    assert "".join(f"{foreign_files / name} is not a crystalign model checkpoint".split()) in text
    assert needle.replace(" ", "") in text and "Traceback" not in res.output
    assert not out.exists()


def test_sample_command_in_a_shell_prints_one_line(foreign_files):
    """The real command: stderr is one error line, no traceback."""
    notes = foreign_files / "notes.txt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "crystalign.cli", "sample", "--model", str(notes), "--composition", "SrTiO3", "-n", "1",
         "--out", str(foreign_files / "samples")],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert lines == [f"error: {notes} is not a crystalign model checkpoint: it is a text file, not a torch checkpoint (it begins 'notes from Tuesday')"]
    assert not (foreign_files / "samples").exists()
