"""Readers on the real datasets (counts, agreement with pymatgen, round trips) and on bad input."""

from __future__ import annotations

import csv
import math
import pickle
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from crystalign.crystal import CrystalBatch
from crystalign.data import DataError, Dataset, load_dataset, read_cif, read_csv, read_extxyz, read_lmdb, read_structures
from crystalign.data.cif import parse_cif_pymatgen
from crystalign.data.download import sha256_file
from crystalign.data.lmdb_format import write_lmdb
from crystalign.data.registry import get_info, registry
from crystalign.geometry import min_image

pytestmark = pytest.mark.data

# (dataset, split, rows) as documented in the data README
EXPECTED = [
    ("perov_5", "val", 3787),
    ("carbon_24", "val", 2032),
    ("carbon_24_unique", "val", 850),
    ("carbon_24_nsplit_htl", "train", 2633),
    ("carbon_24_nsplit_htl", "val", 792),
    ("perov_5_train_subset", "train", 116),
    ("mp_20_sample", "sample", 142),
]


@pytest.fixture(scope="session")
def loaded(data_root) -> dict[tuple[str, str], Dataset]:
    """Every real file, read once per session."""
    return {(name, split): load_dataset(name, split, data_root=data_root) for name, split, _ in EXPECTED}


def _csv_rows(path: Path, n: int | None = None) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    return rows[0], rows[1 : None if n is None else n + 1]


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows([header, *rows])
    return path


def _assert_same(batch: CrystalBatch, other: CrystalBatch, tol: float = 1e-6) -> None:
    assert torch.equal(batch.n_atoms, other.n_atoms)
    assert torch.equal(batch.species, other.species)
    assert torch.allclose(batch.lattice, other.lattice.to(batch.dtype), atol=tol, rtol=0)
    assert min_image(batch.frac - other.frac.to(batch.dtype)).abs().max() <= tol


# ------------------------------------------------------------------------------------------ real data
@pytest.mark.parametrize("name,split,rows", EXPECTED)
def test_real_files_load_with_documented_counts(loaded, name, split, rows):
    ds = loaded[(name, split)]
    assert len(ds) == rows == get_info(name).splits[split].rows
    assert ds.batch.dtype == torch.float64 and len(ds.ids) == rows
    assert not ds.skipped
    assert ((ds.batch.frac >= 0) & (ds.batch.frac < 1)).all()
    for values in ds.properties.values():
        assert len(values) == rows


def test_real_files_match_registry_checksums(data_root):
    for name, info in registry().items():
        for s in info.splits.values():
            path = data_root / name / s.file
            if path.exists():
                assert sha256_file(path) == s.sha256, path
                assert path.stat().st_size == s.bytes


def test_real_files_pass_shared_validity_check(loaded):
    for key, ds in loaded.items():
        # a stride of the large files keeps the O(n^2) distance check quick
        batch = ds.batch if len(ds) < 1000 else ds.batch[::7]
        assert bool(batch.validity().valid.all()), key


def test_pymatgen_round_trip_of_all_structures(loaded):
    """Every loaded structure survives batch -> pymatgen -> batch to 1e-6 (frac compared min-image)."""
    for key, ds in loaded.items():
        back = CrystalBatch.from_structures(ds.batch.to_structures())
        _assert_same(ds.batch, back)


def test_csv_reader_agrees_with_pymatgen_parse(loaded, data_root):
    """The fast CIF path equals pymatgen's own parse (same site order, lattice, coordinates), for every
    row of the multi-element sample and a stride of the larger files."""
    for (name, split), ds in loaded.items():
        path = ds.source
        if path.suffix != ".csv":
            continue
        header, rows = _csv_rows(path)
        i_cif = header.index("cif")
        stride = 1 if len(rows) < 200 else 25
        ptr = ds.batch.ptr.tolist()
        for r in range(0, len(rows), stride):
            z, frac, lat = parse_cif_pymatgen(rows[r][i_cif])
            a, b = ptr[r], ptr[r + 1]
            assert np.array_equal(ds.batch.species[a:b].numpy(), z), (name, r)
            assert np.abs(ds.batch.lattice[r].numpy() - lat).max() < 1e-6
            d = ds.batch.frac[a:b].numpy() - frac
            assert np.abs(d - np.round(d)).max() < 1e-6


def test_mp20_properties_and_ids(loaded):
    ds = loaded[("mp_20_sample", "sample")]
    assert ds.ids[0] == "mp-10009"
    assert ds.properties["spacegroup.number"].dtype == np.int64
    assert ds.properties["band_gap"].dtype == np.float64
    assert isinstance(ds.properties["pretty_formula"], list)
    assert "cif" not in ds.properties and "material_id" not in ds.properties
    assert len(set(ds.batch.species.tolist())) == 81


def test_lmdb_matches_ase_conversion(loaded, carbon_lmdb):
    ds = loaded[("carbon_24_unique", "val")]
    assert ds.ids[:2] == ["00000000", "00000001"]
    assert set(ds.batch.species.tolist()) == {6}
    # Cartesian positions are reproduced from frac @ lattice (up to periodic images)
    ase_back = CrystalBatch.from_atoms(ds.batch.to_atoms())
    _assert_same(ds.batch, ase_back)


def test_cif_write_read_round_trip(loaded, tmp_path):
    from pymatgen.io.cif import CifWriter

    ds = loaded[("mp_20_sample", "sample")].subset(range(0, 142, 7))
    folder = tmp_path / "cifs"
    folder.mkdir()
    for i, s in zip(ds.ids, ds.to_structures()):
        CifWriter(s).write_file(folder / f"{i}.cif")
    back = read_cif(folder)
    assert back.ids == sorted(ds.ids)
    order = [ds.ids.index(i) for i in back.ids]
    ref = ds.subset(order).batch
    # pymatgen may order sites differently after writing; compare per structure as sorted sets
    for k in range(len(back)):
        a, b = ref[k], back.batch[k]
        assert torch.allclose(a.lattice, b.lattice, atol=1e-6)
        assert sorted(a.species.tolist()) == sorted(b.species.tolist())
        cart_a = (a.frac @ a.lattice[0]).numpy()
        fb = b.frac.numpy()
        for z, f in zip(a.species.tolist(), a.frac.numpy()):
            d = fb - f
            d -= np.round(d)
            assert (np.abs(d).max(axis=1) < 1e-6).any()
        assert cart_a.shape[0] == fb.shape[0]


def test_symmetrized_and_uncertain_cifs_go_through_pymatgen(loaded, tmp_path):
    """CIFs with symmetry operations or uncertainties ('0.25(1)') are expanded by pymatgen."""
    from pymatgen.io.cif import CifWriter

    ds = loaded[("mp_20_sample", "sample")].subset(range(6))
    texts = [str(CifWriter(s, symprec=0.01)) for s in ds.to_structures()]
    assert any("'-x, -y, -z'" in t or "-x" in t for t in texts)
    header, rows = _csv_rows(ds.source, 6)
    i = header.index("cif")
    rows = [list(r) for r in rows]
    for r, t in zip(rows, texts):
        r[i] = t
    # one P1 row with an uncertainty in a coordinate stays readable
    rows[0][i] = re.sub(r"(_atom_site_occupancy\n\s+\S+\s+\S+\s+\S+\s+)(\d\.\d+)", r"\g<1>\g<2>(3)", ds.to_structures()[0].to(fmt="cif"), count=1)
    assert "(3)" in rows[0][i]
    back = read_csv(_write_csv(tmp_path / "sym.csv", header, rows))
    assert len(back) == len(ds)
    # symmetrized CIFs hold the conventional cell: same composition and volume per atom
    for a, b in zip(ds.to_structures(), back.to_structures()):
        assert a.composition.reduced_formula == b.composition.reduced_formula
        assert math.isclose(a.volume / len(a), b.volume / len(b), rel_tol=1e-4)


def test_multi_block_cif_file(loaded, tmp_path):
    header, rows = _csv_rows(loaded[("perov_5_train_subset", "train")].source, 3)
    text = "\n".join(r[header.index("cif")] for r in rows)
    path = tmp_path / "three.cif"
    path.write_text(text)
    ds = read_structures(path)
    assert len(ds) == 3 and all(i.startswith("three:") for i in ds.ids)


def test_extxyz_round_trip(loaded, tmp_path):
    import ase.io

    ds = loaded[("mp_20_sample", "sample")].subset(range(20))
    atoms = ds.batch.to_atoms()
    for a, i, e in zip(atoms, ds.ids, ds.properties["formation_energy_per_atom"]):
        a.info["material_id"] = i
        a.info["formation_energy"] = float(e)
    path = tmp_path / "s.extxyz"
    ase.io.write(path, atoms, format="extxyz")
    back = read_extxyz(path)
    assert back.ids == ds.ids
    _assert_same(ds.batch, back.batch)
    assert np.allclose(back.properties["formation_energy"], ds.properties["formation_energy_per_atom"])


def test_lmdb_write_read_round_trip(loaded, tmp_path):
    ds = loaded[("perov_5_train_subset", "train")].subset(range(10))
    recs = {
        i: {"pos": b.cartesian(), "cell": b.lattice[0], "atomic_numbers": b.species.int(), "pbc": torch.ones(3, dtype=torch.int32), "energy": torch.tensor(1.5)}
        for i, b in zip(ds.ids, ds.batch.split(1))
    }
    path = tmp_path / "x.lmdb"
    write_lmdb(path, recs)
    back = read_lmdb(path)
    assert sorted(back.ids) == sorted(ds.ids)
    order = [back.ids.index(i) for i in ds.ids]
    _assert_same(ds.batch, back.subset(order).batch)
    assert np.allclose(back.properties["energy"], 1.5)


def test_niggli_and_primitive(loaded, tmp_path):
    ds = loaded[("carbon_24", "val")].subset(range(40))
    red = read_csv(_write_csv(tmp_path / "c.csv", *_csv_rows(ds.source, 40)), niggli=True)
    lengths = red.batch.lattice.norm(dim=-1)
    assert (lengths[:, 0] <= lengths[:, 1] + 1e-6).all() and (lengths[:, 1] <= lengths[:, 2] + 1e-6).all()
    vol = torch.linalg.det(ds.batch.lattice).abs()
    assert torch.allclose(torch.linalg.det(red.batch.lattice).abs(), vol, rtol=1e-8)
    assert torch.equal(red.batch.n_atoms, ds.batch.n_atoms)

    # a 2x1x1 supercell comes back to the primitive cell
    from pymatgen.io.cif import CifWriter

    s = loaded[("perov_5_train_subset", "train")].to_structures()[0]
    sc = s.copy()
    sc.make_supercell([2, 1, 1])
    path = tmp_path / "sc.cif"
    CifWriter(sc).write_file(path)
    assert len(read_cif(path).batch.species) == 10
    prim = read_cif(path, primitive=True)
    assert int(prim.batch.n_atoms[0]) == 5
    assert math.isclose(float(torch.linalg.det(prim.batch.lattice[0]).abs()), s.volume, rel_tol=1e-6)


def test_subset_and_random_split(loaded):
    ds = loaded[("perov_5_train_subset", "train")]
    rest, held = ds.random_split(0.1, seed=3)
    assert len(held) == 12 and len(rest) == 104
    assert not set(rest.ids) & set(held.ids)
    again = ds.random_split(0.1, seed=3)[1]
    assert again.ids == held.ids
    assert np.allclose(held.properties["heat_ref"], ds.subset([ds.ids.index(i) for i in held.ids]).properties["heat_ref"])


# ------------------------------------------------------------------------------------------ bad input
@pytest.fixture
def perov_rows(perov_val_csv):
    return _csv_rows(perov_val_csv, 6)


def _with_cif(header, rows, k, edit):
    rows = [list(r) for r in rows]
    i = header.index("cif")
    rows[k][i] = edit(rows[k][i])
    return rows


def test_malformed_cif_row_names_file_row_and_id(tmp_path, perov_rows):
    header, rows = perov_rows
    bad = _with_cif(header, rows, 2, lambda c: c[: len(c) // 3])
    path = _write_csv(tmp_path / "bad.csv", header, bad)
    bad_id = rows[2][header.index("material_id")]
    with pytest.raises(DataError) as err:
        read_csv(path)
    msg = str(err.value)
    assert str(path) in msg and "row 2" in msg and bad_id in msg and "CIF" in msg
    assert err.value.row == 2 and err.value.id == bad_id


def test_skip_bad_reports_skipped_rows(tmp_path, perov_rows, caplog):
    header, rows = perov_rows
    bad = _with_cif(header, rows, 1, lambda c: "data_broken\n_cell_length_a 1\n")
    bad = _with_cif(header, bad, 4, lambda c: c.replace("_cell_length_a", "_cell_length_q"))
    path = _write_csv(tmp_path / "bad.csv", header, bad)
    with caplog.at_level("WARNING", logger="crystalign.data"):
        ds = read_csv(path, skip_bad=True)
    ids = [r[header.index("material_id")] for r in rows]
    assert len(ds) == 4 and ds.ids == [ids[0], ids[2], ids[3], ids[5]]
    assert [i for i, _ in ds.skipped] == [ids[1], ids[4]]
    assert "skipped 2" in caplog.text and ids[1] in caplog.text
    assert len(ds.properties["heat_ref"]) == 4


def test_missing_cif_column(tmp_path, perov_rows):
    header, rows = perov_rows
    header = ["structure" if h == "cif" else h for h in header]
    path = _write_csv(tmp_path / "nocif.csv", header, rows)
    with pytest.raises(DataError, match=r"no 'cif' column \(columns: .*structure"):
        read_csv(path)


def test_empty_and_header_only_files(tmp_path, perov_rows):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataError, match="empty file") as err:
        read_structures(empty)
    assert str(empty) in str(err.value)
    header, _ = perov_rows
    with pytest.raises(DataError, match="no data rows"):
        read_csv(_write_csv(tmp_path / "h.csv", header, []))
    (tmp_path / "e.cif").write_text("\n")
    with pytest.raises(DataError, match="empty file"):
        read_cif(tmp_path / "e.cif")


def test_truncated_csv(tmp_path, perov_val_csv):
    text = perov_val_csv.read_text()[:5000]
    path = tmp_path / "cut.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=r"row \d+"):
        read_csv(path)
    assert len(read_csv(path, skip_bad=True)) >= 1


def test_unknown_element(tmp_path, perov_rows):
    header, rows = perov_rows
    bad = _with_cif(header, rows, 0, lambda c: c.replace("  Cu  Cu0", "  Xx  Xx0"))
    with pytest.raises(DataError, match=r"row 0 .*unknown element 'Xx'"):
        read_csv(_write_csv(tmp_path / "x.csv", header, bad))


def test_partial_occupancy(tmp_path, perov_rows):
    header, rows = perov_rows
    bad = _with_cif(header, rows, 3, lambda c: c.rstrip("\n")[:-1] + "0.5\n")
    with pytest.raises(DataError, match=r"row 3 .*partial occupancy"):
        read_csv(_write_csv(tmp_path / "p.csv", header, bad))


def _set_tag(cif: str, tag: str, value: str) -> str:
    return re.sub(rf"^({tag}\s+)\S+", rf"\g<1>{value}", cif, count=1, flags=re.M)


@pytest.mark.parametrize(
    "edit,reason",
    [
        (lambda c: _set_tag(c, "_cell_length_a", "nan"), "non-finite lattice"),
        (lambda c: _set_tag(c, "_cell_length_b", "0.0"), "volume 0"),
        (lambda c: _set_tag(c, "_cell_angle_gamma", "0.0"), "volume"),
    ],
    ids=["nan", "zero-length", "flat"],
)
def test_degenerate_lattice(tmp_path, perov_rows, edit, reason):
    header, rows = perov_rows
    bad = _with_cif(header, rows, 1, edit)
    with pytest.raises(DataError, match=rf"row 1 .*invalid geometry: .*{reason}"):
        read_csv(_write_csv(tmp_path / "d.csv", header, bad))


def test_overlapping_atoms_only_with_validate(tmp_path, perov_rows):
    header, rows = perov_rows

    def squash(c: str) -> str:  # put N3 0.1 Å from N2
        lines = c.splitlines()
        n2 = next(i for i, l in enumerate(lines) if " N2 " in l)
        n3 = next(i for i, l in enumerate(lines) if " N3 " in l)
        parts = lines[n2].split()
        parts[1] = "N3"
        parts[3] = f"{float(parts[3]) + 0.02:.8f}"
        lines[n3] = "  " + "  ".join(parts)
        return "\n".join(lines) + "\n"

    path = _write_csv(tmp_path / "o.csv", header, _with_cif(header, rows, 0, squash))
    assert len(read_csv(path)) == 6  # reading is faithful
    with pytest.raises(DataError, match="min distance"):
        read_csv(path, validate=True)


def test_unknown_suffix_and_missing_path(tmp_path):
    p = tmp_path / "a.json"
    p.write_text("{}")
    with pytest.raises(DataError, match="unknown file type"):
        read_structures(p)
    with pytest.raises(DataError, match="no such file"):
        read_structures(tmp_path / "missing.csv")


# ------------------------------------------------------------------------------------------ bad LMDB
@pytest.mark.parametrize("keep", [0.0, 0.5, 0.999])
def test_truncated_lmdb(tmp_path, carbon_lmdb, keep):
    data = carbon_lmdb.read_bytes()
    path = tmp_path / "cut.lmdb"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(DataError) as err:
        read_lmdb(path)
    assert str(path) in str(err.value)
    assert any(w in str(err.value) for w in ("empty", "truncated", "not a readable LMDB"))


def test_corrupted_lmdb_value(tmp_path, carbon_lmdb):
    data = bytearray(carbon_lmdb.read_bytes())
    # damage the payload of records, not the B-tree: each value starts with a pickle header
    hits = [m.start() for m in re.finditer(rb"\x80\x04\x95", bytes(data))]
    for i in hits[5:8]:
        data[i + 12 : i + 40] = b"\xff" * 28
    path = tmp_path / "bad.lmdb"
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"row \d+ \(id \d+\): cannot decode LMDB value"):
        read_lmdb(path)


def test_lmdb_refuses_arbitrary_pickles(tmp_path):
    class Evil:
        def __reduce__(self):
            return (shutil.rmtree, (str(tmp_path / "victim"),))

    (tmp_path / "victim").mkdir()
    path = tmp_path / "evil.lmdb"
    import lmdb

    env = lmdb.open(str(path), subdir=False, map_size=1 << 20, lock=False)
    with env.begin(write=True) as txn:
        txn.put(b"00000000", pickle.dumps({"pos": Evil(), "cell": 1, "atomic_numbers": 2}))
    env.close()
    with pytest.raises(DataError, match="cannot decode"):
        read_lmdb(path)
    assert (tmp_path / "victim").exists()


def test_lmdb_non_periodic_record(tmp_path):
    rec = {
        "pos": torch.zeros(1, 3, dtype=torch.float64),
        "cell": torch.eye(3, dtype=torch.float64) * 3,
        "atomic_numbers": torch.tensor([6], dtype=torch.int32),
        "pbc": torch.tensor([1, 1, 0], dtype=torch.int32),
    }
    path = tmp_path / "np.lmdb"
    write_lmdb(path, [rec])
    with pytest.raises(DataError, match="fully periodic"):
        read_lmdb(path)


# ------------------------------------------------------------------------------------------ resolution
def test_load_dataset_resolution(tmp_path, data_root, monkeypatch):
    monkeypatch.delenv("CRYSTALIGN_DATA_ROOT", raising=False)
    with pytest.raises(DataError, match=r"crystalign data download perov_5 --split train"):
        load_dataset("perov_5", "train", cache=tmp_path)
    with pytest.raises(DataError, match="no public download"):
        load_dataset("mp_20_sample", cache=tmp_path)
    with pytest.raises(DataError, match="Did you mean perov_5"):
        load_dataset("perov5")
    with pytest.raises(DataError, match="has no split 'test'"):
        load_dataset("mp_20_sample", "test", data_root=data_root)
    # the cache is searched after the data root
    (tmp_path / "perov_5_train_subset").mkdir()
    shutil.copy(data_root / "perov_5_train_subset" / "train.csv", tmp_path / "perov_5_train_subset" / "train.csv")
    ds = load_dataset("perov_5_train_subset", cache=tmp_path)
    assert len(ds) == 116 and ds.source.parent.parent == tmp_path and ds.split == "train"
    # a plain path works too
    assert len(load_dataset(tmp_path / "perov_5_train_subset" / "train.csv")) == 116


def test_no_warnings_from_pymatgen_on_fallback(tmp_path, perov_rows):
    header, rows = perov_rows
    # an oxidation-state symbol is not handled by the fast path: pymatgen parses it, quietly
    fixed = _with_cif(header, rows, 0, lambda c: c.replace("  Cu  Cu0", "  Cu2+  Cu0"))
    path = _write_csv(tmp_path / "ox.csv", header, fixed)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = read_csv(path)
    assert 29 in ds.batch[0].species.tolist()


def test_spreadsheet_csv_with_bom_and_padded_header(tmp_path, perov_rows):
    """Excel's "CSV UTF-8" starts with a byte-order mark; header names may carry spaces."""
    header, rows = perov_rows
    ids = [r[header.index("material_id")] for r in rows]
    order = [header.index("material_id"), header.index("cif")]
    path = tmp_path / "excel.csv"
    with open(path, "w", newline="", encoding="utf-8-sig") as fh:
        csv.writer(fh).writerows([[" material_id", "cif "], *[[r[i] for i in order] for r in rows]])
    ds = read_csv(path)
    assert ds.ids == ids and "\ufeffmaterial_id" not in ds.properties
    _assert_same(ds.batch, read_csv(_write_csv(tmp_path / "plain.csv", header, rows)).batch)


def test_all_rows_bad_with_skip_bad_says_why(tmp_path, perov_rows):
    header, rows = perov_rows
    bad = rows
    for k in range(len(rows)):
        bad = _with_cif(header, bad, k, lambda c: c.replace("_cell_length_a", "_cell_length_q"))
    with pytest.raises(DataError, match=r"no valid structures \(e\.g\. " + rows[0][header.index("material_id")]):
        read_csv(_write_csv(tmp_path / "bad.csv", header, bad), skip_bad=True)


def test_journal_cif_with_a_metadata_block(tmp_path, loaded):
    """Journal CIFs open with data_global (authors, citation, no atoms): it is not a structure."""
    s = loaded[("perov_5", "val")].batch[:1].to_structures()[0]
    text = "data_global\n_journal_name_full 'Acta Cryst.'\n_publ_author_name 'A. Author'\n\n" + s.to(fmt="cif")
    (tmp_path / "paper.cif").write_text(text)
    ds = read_cif(tmp_path / "paper.cif")
    assert ds.ids == ["paper"] and len(ds) == 1
    _assert_same(ds.batch, CrystalBatch.from_structures([s]))


def test_trailing_comment_in_an_atom_loop_is_not_data(tmp_path, loaded):
    """A hand-written CIF (label first, as many journals write it) with a comment that has as many tokens as an
    atom row: read as data, it would add an atom."""
    s = loaded[("perov_5", "val")].batch[:1].to_structures()[0]
    a, b, c = s.lattice.abc
    al, be, ga = s.lattice.angles
    rows = [f"{site.specie}{i} {site.specie} {x:.6f} {y:.6f} {z:.6f}" for i, (site, (x, y, z)) in enumerate(zip(s, s.frac_coords))]
    rows[-1] += f"   # {s[0].specie} 0.25 0.25 0.25"  # five tokens, as many as the loop has tags
    text = (
        f"data_test\n_cell_length_a {a}\n_cell_length_b {b}\n_cell_length_c {c}\n_cell_angle_alpha {al}\n"
        f"_cell_angle_beta {be}\n_cell_angle_gamma {ga}\nloop_\n _symmetry_equiv_pos_as_xyz\n 'x, y, z'\nloop_\n"
        " _atom_site_label\n _atom_site_type_symbol\n _atom_site_fract_x\n _atom_site_fract_y\n _atom_site_fract_z\n"
        + "\n".join(rows) + "\n"
    )
    (tmp_path / "commented.cif").write_text(text)
    ds = read_cif(tmp_path / "commented.cif")
    _assert_same(ds.batch, CrystalBatch.from_structures([s]))


def test_a_registered_name_beats_an_unrelated_folder_of_that_name(tmp_path, data_root, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "perov_5").mkdir()  # e.g. a run folder named after the dataset
    (tmp_path / "perov_5" / "notes.txt").write_text("not data")
    assert len(load_dataset("perov_5", data_root=data_root)) == 3787
