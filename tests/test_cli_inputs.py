"""User mistakes on the command line (sample, evaluate, hull build, import-omatg): clear errors naming the file,
row or key, given before any work is done, and no lost results."""

from __future__ import annotations

import csv
import errno
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from crystalign.cli import app
from crystalign.generator import composition_batch, pretrained_dir
from crystalign.rewards.hull import ReferenceHull


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_clean_error(res, *needles: str, code: int = 2) -> None:
    """A user error: the given exit code, no Python exception, and a message holding each needle."""
    assert res.exit_code == code, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output
    text = "".join(res.output.replace("│", "").split())  # rich wraps messages in a box, mid-word for long paths
    for needle in needles:
        assert needle.replace(" ", "") in text, (needle, res.output)


def perov_rows(csv_path: Path, n: int) -> list[dict]:
    csv.field_size_limit(1 << 30)
    with open(csv_path, newline="") as fh:
        reader = csv.DictReader(fh)
        return [row for _, row in zip(range(n), reader)]


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture
def perov_pair(perov_val_csv, tmp_path):
    """Two real perovskite references and a generated folder holding exactly them (zero-padded names)."""
    rows = perov_rows(perov_val_csv, 2)
    ref = write_csv(tmp_path / "ref.csv", rows)
    gen = tmp_path / "gen"
    gen.mkdir()
    for i, row in enumerate(rows):
        (gen / f"{i:06d}.cif").write_text(row["cif"])
    return gen, ref, rows


def _must_not_run(*args, **kwargs):
    raise AssertionError("the work started although the input was bad")


# ---------------------------------------------------------------------------------------------- --out paths


@pytest.mark.parametrize("bad", ["folder", "below_a_file"])
def test_evaluate_refuses_bad_out_before_matching(perov_pair, tmp_path, monkeypatch, bad):
    gen, ref, _ = perov_pair
    (tmp_path / "afile").write_text("x")
    out = tmp_path if bad == "folder" else tmp_path / "afile" / "m.json"
    monkeypatch.setattr("crystalign.metrics.csp_metrics", _must_not_run)
    res = invoke("evaluate", gen, "-r", ref, "--out", out, "--no-progress", "--workers", "0")
    assert_clean_error(res, "--out", "folder" if bad == "folder" else "afile is a file")


def test_evaluate_prints_metrics_even_if_writing_out_fails(perov_pair, tmp_path, monkeypatch):
    gen, ref, _ = perov_pair

    def disk_full(path, obj):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("crystalign.io.write_json", disk_full)
    out = tmp_path / "metrics.json"
    res = invoke("evaluate", gen, "-r", ref, "--out", out, "--no-progress", "--workers", "0")
    assert_clean_error(res, str(out), "No space left", code=1)
    assert "match rate" in res.stdout and "100.00 %" in res.stdout  # the work is not lost


def test_hull_build_refuses_bad_out_before_the_mlip(perov_pair, tmp_path, monkeypatch):
    _, ref, _ = perov_pair
    (tmp_path / "afile").write_text("x")
    monkeypatch.setattr("crystalign.rewards.mlip.get_backend", _must_not_run)
    assert_clean_error(invoke("hull", "build", ref, "--out", tmp_path / "afile" / "h.json"), "afile is a file")
    assert_clean_error(invoke("hull", "build", ref, "--out", tmp_path), "existing folder")


def test_sample_refuses_an_existing_file_as_out_before_sampling(tmp_path, monkeypatch):
    target = tmp_path / "afile"
    target.write_text("keep me")
    monkeypatch.setattr("crystalign.cli.generate.run_sampling", _must_not_run)
    assert_clean_error(invoke("sample", "-m", "perov_5", "-c", "SrTiO3", "--out", target), str(target), "existing file")
    assert target.read_text() == "keep me"


# ---------------------------------------------------------------------------------------------- import-omatg


def test_import_omatg_refuses_a_crystalign_checkpoint(tmp_path):
    out = tmp_path / "imp.pt"
    res = invoke("import-omatg", pretrained_dir() / "perov_5.pt", "--out", out)
    assert_clean_error(res, "perov_5.pt", "already a crystalign checkpoint", "use it directly", code=1)
    assert not out.exists()


def test_files_that_are_not_checkpoints_are_clean_errors(tmp_path):
    """Text, JSON, a bare folder: one line naming the file, no traceback, no advice to unpickle it."""
    (tmp_path / "text.ckpt").write_text("hello\n")  # torch's legacy unpickler raises a KeyError on this
    (tmp_path / "spec.json").write_text('{"tensors": []}')
    (tmp_path / "folder.ckpt").mkdir()
    for name in ("text.ckpt", "spec.json"):
        res = invoke("import-omatg", tmp_path / name, "--out", tmp_path / "o.pt")
        assert_clean_error(res, name, "not a torch checkpoint", code=1)
        assert "weights_only=False" not in res.output and "Extract the weights" not in res.output
        assert_clean_error(invoke("sample", "-m", tmp_path / name, "-c", "SrTiO3", "--out", tmp_path / "s"), name, "not a torch checkpoint")
    assert_clean_error(invoke("import-omatg", tmp_path / "folder.ckpt", "--out", tmp_path / "o.pt"), "is a folder, not a checkpoint file", code=1)
    assert not (tmp_path / "o.pt").exists() and not (tmp_path / "s").exists()


def test_import_omatg_refuses_an_unwritable_out_before_reading_the_checkpoint(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("keep me")
    (tmp_path / "adir").mkdir()
    monkeypatch.setattr("crystalign.model.omatg_import.load_omatg_model", _must_not_run)
    src = pretrained_dir() / "perov_5.pt"
    assert_clean_error(invoke("import-omatg", src, "--out", tmp_path / "adir", "--force"), "is an existing folder", code=1)
    assert_clean_error(invoke("import-omatg", src, "--out", tmp_path / "afile" / "x.pt"), "afile is a file, not a folder", code=1)
    assert (tmp_path / "afile").read_text() == "keep me"


# ---------------------------------------------------------------------------------------------- sample


def test_repeated_composition_gets_distinct_ids_and_files(tmp_path):
    # the non-repeated naming is unchanged
    assert composition_batch(["SrTiO3", "BaTiO3"], 2).ids == ["SrTiO3_0", "SrTiO3_1", "BaTiO3_0", "BaTiO3_1"]
    assert composition_batch(["SrTiO3", "BaTiO3", "SrTiO3"], 2).ids == [
        "SrTiO3_0", "SrTiO3_1", "BaTiO3_0", "BaTiO3_1", "SrTiO3_2", "SrTiO3_3",
    ]  # fmt: skip
    out = tmp_path / "s"
    res = invoke("sample", "-m", "perov_5", "-c", "SrTiO3", "-c", "SrTiO3", "-n", "2", "--steps", "2", "--out", out)
    assert res.exit_code == 0, res.output
    index = json.loads((out / "index.json").read_text())
    assert len(index) == len(set(index)) == 4
    assert sorted(p.name for p in out.glob("*.cif")) == sorted(index)

    from crystalign.io import write_structure_set

    # the writer itself refuses ids that would overwrite each other's files (e.g. ids from a caller's own template)
    with pytest.raises(ValueError, match="duplicate structure ids SrTiO3_0"):
        write_structure_set(tmp_path / "dup", composition_batch(["SrTiO3"], 2).replace(ids=["SrTiO3_0"] * 2), {})
    assert not (tmp_path / "dup" / "index.json").exists()


@pytest.mark.parametrize(
    "source,count,needle",
    [
        (["-c", "SrTiO3"], ["-k", "4"], "-k 4 applies to --compositions-from"),
        (["--compositions-from", "REF"], ["-n", "4"], "-n 4 applies to --composition"),
    ],
)
def test_sample_refuses_the_count_of_the_other_source(perov_pair, tmp_path, monkeypatch, source, count, needle):
    """-k with --composition (or -n with --compositions-from) was silently ignored: 1 structure instead of 4."""
    _, ref, _ = perov_pair
    monkeypatch.setattr("crystalign.cli.generate.run_sampling", _must_not_run)
    args = [str(ref) if a == "REF" else a for a in source]
    assert_clean_error(invoke("sample", "-m", "perov_5", *args, *count, "--out", tmp_path / "s"), needle)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--batch-size", "0"], "--batch-size"),
        (["--batch-size", "-1"], "--batch-size"),
        (["--device", "banana"], "banana"),
        (["--device", "cuda"], "cuda"),
    ],
)
def test_sample_bad_batch_size_or_device_is_a_clean_error(tmp_path, args, needle):
    if args[-1] == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    res = invoke("sample", "-m", "perov_5", "-c", "SrTiO3", "--out", tmp_path / "s", *args)
    assert_clean_error(res, needle)
    assert not (tmp_path / "s" / "index.json").exists()


def test_sample_compositions_from_a_dataset_name_uses_data_root(data_root, tmp_path, monkeypatch):
    if not (data_root / "perov_5_train_subset" / "train.csv").exists():
        pytest.skip("perov_5_train_subset missing under the data root")
    monkeypatch.delenv("CRYSTALIGN_DATA_ROOT", raising=False)  # only --data-root can find it
    monkeypatch.setenv("CRYSTALIGN_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "s"
    args = ["sample", "-m", "perov_5", "--compositions-from", "perov_5_train_subset", "--steps", "2", "--out", out]
    res = invoke(*args, "--data-root", data_root)
    assert res.exit_code == 0, res.output
    assert len(json.loads((out / "index.json").read_text())) == 116
    res = invoke(*args[:-1], tmp_path / "s2")  # no data root: an error saying where it looked, not a traceback
    assert_clean_error(res, "perov_5_train_subset", "--data-root")


# ---------------------------------------------------------------------------------------------- error messages


def test_evaluate_malformed_index_json_names_the_file(perov_pair, tmp_path):
    gen, ref, _ = perov_pair
    (gen / "index.json").write_text('["000000.cif",\n')
    res = invoke("evaluate", gen, "-r", ref, "--no-progress")
    assert_clean_error(res, str(gen / "index.json"), "not valid JSON")


def _write_extxyz(path: Path, rows: list[dict], k: int) -> list[str]:
    from ase.io import write
    from pymatgen.core import Structure
    from pymatgen.io.ase import AseAtomsAdaptor

    atoms = [AseAtomsAdaptor.get_atoms(Structure.from_str(r["cif"], fmt="cif")) for r in rows for _ in range(k)]
    write(path, atoms, format="extxyz")
    return path.read_text().splitlines(keepends=True)


def test_evaluate_truncated_extxyz_counts_the_broken_frame_invalid(perov_pair, tmp_path):
    _, ref, rows = perov_pair
    xyz = tmp_path / "gen.extxyz"
    lines = _write_extxyz(xyz, rows, k=2)
    xyz.write_text("".join(lines[:-1]) + lines[-1][:12])  # the last frame is cut inside its last atom
    res = invoke("evaluate", xyz, "-r", ref, "-k", "2", "--json", "--no-progress", "--workers", "0")
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["n"] == 4 and d["valid_rate"] == pytest.approx(3 / 4) and d["match_rate"] == pytest.approx(3 / 4)
    assert "gen.extxyz[3]" in res.stderr


def test_evaluate_extxyz_with_lost_frame_boundaries_names_file_and_frame(perov_pair, tmp_path):
    _, ref, rows = perov_pair
    xyz = tmp_path / "gen.extxyz"
    lines = _write_extxyz(xyz, rows, k=2)
    per_frame = len(lines) // 4
    del lines[per_frame + 3]  # frame 1 loses an atom line: frame 2's count line is swallowed
    xyz.write_text("".join(lines))
    assert_clean_error(invoke("evaluate", xyz, "-r", ref, "--no-progress"), "gen.extxyz", "frame 2")
    xyz.write_bytes(bytes(range(256)) * 4)  # garbage
    assert_clean_error(invoke("evaluate", xyz, "-r", ref, "--no-progress"), "gen.extxyz", "frame 0")


def _hull_dict() -> dict:
    return {
        "format": "crystalign-hull",
        "version": 1,
        "backend": {"name": "sevenn", "model": "7net-0"},
        "entries": [
            {"id": "a", "composition": {"Sr": 1.0}, "energy_ev": -1.5},
            {"id": "b", "composition": {"Ti": 1.0}, "energy_ev": -7.0},
        ],
    }


def test_a_reference_cif_folder_reads_as_sample_reads_it(perov_pair, tmp_path):
    """Unpadded names (mp-10009_GaTe.cif, ...) are fine for references: they are read in file-name order, as
    `sample --compositions-from` reads them, so the samples pair with them; a broken CIF in a hull's reference
    folder is skipped with a warning naming it."""
    gen, _, rows = perov_pair
    refs = tmp_path / "refs"
    refs.mkdir()
    for i, row in enumerate(rows):
        (refs / f"mp-{10 - 9 * i}_x.cif").write_text(row["cif"])  # mp-10_x.cif before mp-1_x.cif by name
    sampled = invoke("sample", "-m", "perov_5", "--compositions-from", refs, "--steps", "3", "--out", tmp_path / "s")
    assert sampled.exit_code == 0, sampled.output
    res = invoke("evaluate", tmp_path / "s", "-r", refs, "--json")
    assert res.exit_code == 0 and "composition" not in res.output, res.output  # each sample meets its own reference
    from crystalign.rewards.references import load_structures

    (refs / "zz_broken.cif").write_text("data_x\n_cell_length_a garbage\n")
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable CIF file\(s\): zz_broken.cif"):
        structures, ids = load_structures(refs)
    assert ids == ["mp-10_x", "mp-1_x"] and len(structures) == 2


def test_fewer_samples_than_references_says_so(perov_pair, tmp_path):
    gen, ref, _ = perov_pair
    (gen / "000000.cif").unlink()
    res = invoke("evaluate", gen, "-r", ref)
    assert_clean_error(res, "every reference needs at least one sample")


def test_hull_file_errors_name_the_file_and_entry(tmp_path):
    good = tmp_path / "hull.json"
    good.write_text(json.dumps(_hull_dict()))
    assert len(ReferenceHull.load(good).entries) == 2

    truncated = tmp_path / "trunc.json"
    truncated.write_text(good.read_text()[:60])
    with pytest.raises(ValueError, match="trunc.json.*not valid JSON"):
        ReferenceHull.load(truncated)

    data = _hull_dict()
    del data["entries"][1]["composition"]
    nocomp = tmp_path / "nocomp.json"
    nocomp.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"nocomp.json: entry 1 \(id 'b'\): lacks the 'composition' key"):
        ReferenceHull.load(nocomp)

    data = _hull_dict()
    data["entries"][0]["energy_ev"] = "lots"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"bad.json: entry 0 \(id 'a'\)"):
        ReferenceHull.load(bad)


def test_hull_build_unknown_reference_format_names_file_and_formats(tmp_path):
    junk = tmp_path / "random.pt"
    junk.write_bytes(bytes(range(256)) * 8)
    res = invoke("hull", "build", junk, "--out", tmp_path / "h.json")
    assert_clean_error(res, "random.pt", "unknown file type", "CSV with a 'cif' column", ".extxyz")


def test_hull_build_shows_progress_and_records_provenance(perov_pair, tmp_path, monkeypatch):
    pytest.importorskip("sevenn", reason="the sevenn extra is not installed")
    import tqdm.auto

    _, ref, _ = perov_pair
    bars = []

    class RecordingBar(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.kw, self.done = kwargs, 0
            bars.append(self)

        def update(self, n=1):
            self.done += n
            return super().update(n)

    monkeypatch.setattr(tqdm.auto, "tqdm", RecordingBar)
    out = tmp_path / "hull.json"
    res = invoke("hull", "build", ref, "--no-add-elements", "--device", "cpu", "--out", out)
    assert res.exit_code == 0, res.output
    energy_bars = [b for b in bars if b.kw.get("total") == 2]
    assert energy_bars and energy_bars[0].done == 2 and energy_bars[0].kw.get("disable") is None  # shown on a terminal
    meta = json.loads(out.read_text())["meta"]
    assert {"crystalign", "torch", "pymatgen", "sevenn"} <= set(meta["versions"])
    assert meta["references"] == [str(ref)] and "command" in meta


def test_hull_build_records_the_modal_of_a_multi_fidelity_model(perov_pair, tmp_path):
    pytest.importorskip("sevenn", reason="the sevenn extra is not installed")
    _, ref, _ = perov_pair
    out = tmp_path / "hull.json"
    res = invoke("hull", "build", ref, "--model", "7net-mf-0", "--modal", "PBE", "--no-add-elements", "--device", "cpu", "--out", out)
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text())["backend"]["modal"] == "PBE"


# ---------------------------------------------------------------------------------------------- evaluate warnings


def test_evaluate_warns_when_pairs_differ_in_composition(perov_pair, carbon_val_csv, tmp_path):
    gen, ref, _ = perov_pair
    res = invoke("evaluate", gen, "-r", ref, "--no-progress", "--workers", "0")
    assert res.exit_code == 0 and "composition" not in res.stderr  # matching pairs: no warning

    other = write_csv(tmp_path / "carbon.csv", perov_rows(carbon_val_csv, 2))
    res = invoke("evaluate", gen, "-r", other, "--no-progress", "--workers", "0")
    assert res.exit_code == 0, res.output
    assert "2 of 2 valid pairs have different reduced compositions" in res.stderr
    assert "by index" in res.stderr


def test_evaluate_says_when_k_was_inferred(perov_pair, tmp_path):
    gen, ref, rows = perov_pair
    for i, row in enumerate(rows):  # two samples per reference
        (gen / f"{i:06d}.cif").unlink()
        for j in range(2):
            (gen / f"{i:06d}_{j:02d}.cif").write_text(row["cif"])
    res = invoke("evaluate", gen, "-r", ref, "--no-progress", "--workers", "0")
    assert res.exit_code == 0, res.output
    assert "k = 2 inferred" in res.stderr
    res = invoke("evaluate", gen, "-r", ref, "-k", "2", "--no-progress", "--workers", "0")
    assert res.exit_code == 0 and "inferred" not in res.stderr


# ---------------------------------------------------------------------------------------------- sample --resume


def test_interrupted_sampling_resumes_bit_identical(tmp_path, monkeypatch):
    from crystalign.generator import Generator

    args = ["sample", "-m", "perov_5", "-c", "SrTiO3", "-c", "BaZrO3", "-n", "3", "--steps", "5", "--batch-size", "2", "--trajectory"]
    full = tmp_path / "full"
    assert invoke(*args, "--out", full).exit_code == 0

    real = Generator.base_sample
    calls = {"n": 0}

    def interrupted_on_the_third_batch(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, *a, **kw)

    part = tmp_path / "part"
    monkeypatch.setattr(Generator, "base_sample", interrupted_on_the_third_batch)
    res = invoke(*args, "--out", part)
    assert res.exit_code == 130 and "2 finished batch(es) kept" in res.output and "--resume" in res.output
    assert not (part / "samples.json").exists()
    monkeypatch.setattr(Generator, "base_sample", real)
    # other settings cannot continue the interrupted run
    assert_clean_error(invoke(*args[:-1], "--seed", "1", "--resume", "--out", part), "seed", "--resume")
    assert invoke(*args[:-1], "--resume", "--out", part).exit_code != 0  # without --trajectory: other settings
    res = invoke(*args, "--resume", "--out", part)
    assert res.exit_code == 0, res.output
    for name in ("structures.extxyz", "trajectory.extxyz", "index.json", "SrTiO3_0.cif", "BaZrO3_2.cif"):
        assert (part / name).read_bytes() == (full / name).read_bytes(), name
    assert not (part / ".sampling").exists()
