"""Readers: CDVAE-style CSV, CIF files and folders, extxyz, OMatG LMDB -> :class:`Dataset`.

Every reader returns a :class:`Dataset`: a float64 :class:`~crystalign.crystal.CrystalBatch`, the
per-structure ids and the remaining per-structure properties (CSV columns, extxyz info, extra LMDB
keys). Bad input raises :class:`~crystalign.data.errors.DataError` naming the file, the row and the
id; with ``skip_bad=True`` bad structures are left out instead, listed in ``Dataset.skipped`` and
logged. Non-finite coordinates and degenerate cells (volume or polar sine below the thresholds of
:mod:`crystalign.geometry`) are always rejected; ``validate=True`` applies the whole shared validity
check (:func:`crystalign.geometry.check_validity`, including the minimum interatomic distance).

Example::

    ds = read_structures("perov_5/val.csv", niggli=True)
    ds.batch.lattice.shape, ds.ids[:3], ds.properties["heat_ref"][:3]
"""

from __future__ import annotations

import csv
import logging
import math
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from crystalign.crystal import MAX_ATOMIC_NUMBER, CrystalBatch
from crystalign.data.cif import parse_cif_texts, split_cif_blocks
from crystalign.data.errors import DataError
from crystalign.geometry import MIN_POLAR_SINE, MIN_VOLUME, ValidityReport, check_validity, polar_sine, volume, wrap
from crystalign.ops import scatter_sum

log = logging.getLogger("crystalign.data")

CSV_SUFFIXES = (".csv",)
CIF_SUFFIXES = (".cif",)
XYZ_SUFFIXES = (".xyz", ".extxyz")
LMDB_SUFFIXES = (".lmdb", ".mdb")


@dataclass
class Dataset:
    """Structures (``batch``, float64) with their ids and per-structure properties.

    ``properties`` maps a name to a numpy array (numeric columns) or a list (anything else), one
    entry per structure. ``skipped`` lists ``(id, reason)`` of structures left out by ``skip_bad``.
    """

    batch: CrystalBatch
    properties: dict[str, Any] = field(default_factory=dict)
    source: Path | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    name: str | None = None
    split: str | None = None

    @property
    def ids(self) -> list[str]:
        return list(self.batch.ids or [str(i) for i in range(len(self.batch))])

    def __len__(self) -> int:
        return len(self.batch)

    def __repr__(self) -> str:
        label = self.name or (self.source.name if self.source else "dataset")
        if self.split:
            label += f"/{self.split}"
        return f"Dataset({label}: {len(self)} structures, {self.batch.num_atoms} atoms, properties={list(self.properties)})"

    def subset(self, index: Sequence[int] | np.ndarray | torch.Tensor) -> "Dataset":
        """The structures at ``index`` (order kept), with their properties."""
        idx = torch.as_tensor(np.asarray(index, dtype=np.int64) if not isinstance(index, torch.Tensor) else index)
        idx_list = idx.tolist()
        props = {
            k: (v[np.asarray(idx_list, dtype=np.int64)] if isinstance(v, np.ndarray) else [v[i] for i in idx_list])
            for k, v in self.properties.items()
        }
        return replace(self, batch=self.batch[idx], properties=props, skipped=list(self.skipped))

    def random_split(self, fraction: float, seed: int = 0) -> tuple["Dataset", "Dataset"]:
        """(rest, held_out): a seeded random ``fraction`` of the structures held out."""
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"fraction must lie in (0, 1), got {fraction}")
        perm = np.random.default_rng(seed).permutation(len(self))
        n_out = max(1, int(round(fraction * len(self))))
        return self.subset(np.sort(perm[n_out:])), self.subset(np.sort(perm[:n_out]))

    def to_structures(self):
        """pymatgen Structures of all structures."""
        return self.batch.to_structures()


# ---------------------------------------------------------------------------------------------- helpers
def _column(values: Sequence[Any]) -> Any:
    """Numeric columns become int64/float64 arrays (blank -> NaN); anything else stays a list."""
    vals = list(values)
    if vals and all(isinstance(v, (bool, np.bool_)) for v in vals):
        return np.asarray(vals, dtype=bool)
    if all(isinstance(v, (str, int, np.integer)) and not isinstance(v, bool) for v in vals):
        try:
            return np.asarray([int(v) for v in vals], dtype=np.int64)  # int("1.5") fails: not an int column
        except (ValueError, OverflowError):
            pass
    try:
        return np.asarray([math.nan if v is None or v == "" else float(v) for v in vals], dtype=np.float64)
    except (ValueError, TypeError):
        return vals


def _scalar(value: Any) -> Any:
    """A plain Python scalar, or None for anything that is not one (vectors, arrays, objects)."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 and value.dim() == 0 else None
    if isinstance(value, np.ndarray):
        return value.item() if value.ndim == 0 else None
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, (bool, int, float, str)):
        return value
    return None


def _frac_from_cartesian(pos: np.ndarray, cell: np.ndarray) -> np.ndarray:
    """Fractional coordinates; NaN when the cell is singular (the validity check then names it)."""
    with np.errstate(all="ignore"):
        try:
            if not np.isfinite(cell).all():
                raise np.linalg.LinAlgError
            return np.linalg.solve(cell.T, pos.T).T
        except np.linalg.LinAlgError:
            return np.full_like(pos, np.nan)


def _fail_or_skip(
    errors: dict[int, str], ids: Sequence[str], path: Path, skip_bad: bool, row_offset: int = 0
) -> list[tuple[str, str]]:
    if not errors:
        return []
    if not skip_bad:
        row = min(errors)
        raise DataError(errors[row], path, row + row_offset, ids[row])
    skipped = [(ids[r], errors[r]) for r in sorted(errors)]
    shown = ", ".join(i for i, _ in skipped[:10]) + (" ..." if len(skipped) > 10 else "")
    log.warning("%s: skipped %d bad structure(s): %s", path, len(skipped), shown)
    return skipped


def _assemble(
    path: Path,
    ids: list[str],
    numbers: list[np.ndarray | None],
    frac: list[np.ndarray | None],
    lattice: list[np.ndarray | None],
    columns: Mapping[str, Sequence[Any]],
    errors: dict[int, str],
    *,
    niggli: bool,
    primitive: bool,
    skip_bad: bool,
    validate: bool,
    row_offset: int = 0,
) -> Dataset:
    """Check atoms and geometry of parsed rows, apply cell reductions, build the Dataset."""
    errors = dict(errors)
    for i, z in enumerate(numbers):
        if i in errors or z is None:
            errors.setdefault(i, "no structure")
            continue
        if z.size == 0:
            errors[i] = "structure has no atoms"
            continue
        bad = (z < 1) | (z > MAX_ATOMIC_NUMBER)
        if bad.any():
            errors[i] = f"unknown element / atomic number {sorted(set(z[bad].tolist()))} (supported: 1..{MAX_ATOMIC_NUMBER})"

    good = [i for i in range(len(ids)) if i not in errors]
    if good:
        lat = torch.from_numpy(np.stack([lattice[i] for i in good]).astype(np.float64))
        fr = torch.from_numpy(np.concatenate([frac[i] for i in good]).astype(np.float64))
        counts = torch.tensor([numbers[i].size for i in good], dtype=torch.long)
        report = _geometry_report(fr, lat, counts, full=validate)
        if not report.valid.all():
            reasons = report.reasons()
            finite_lat = torch.isfinite(lat).flatten(1).all(-1)
            for k in torch.nonzero(~report.valid).flatten().tolist():
                # the report measures a non-finite cell as zero volume; say what is really wrong
                why = "non-finite lattice (NaN or inf in the cell)" if not finite_lat[k] else reasons[k]
                errors[good[k]] = f"invalid geometry: {why or 'non-finite coordinates'}"
            good = [i for i in good if i not in errors]

    skipped = _fail_or_skip(errors, ids, path, skip_bad, row_offset)
    if not good:
        first = min(errors) if errors else None
        why = f" (e.g. {ids[first]}: {errors[first]})" if first is not None else ""
        raise DataError(f"no valid structures{why}", path)

    z_list = [numbers[i] for i in good]
    f_list = [frac[i] for i in good]
    l_list = [lattice[i] for i in good]
    if niggli or primitive:
        z_list, f_list, l_list = _reduce_cells(z_list, f_list, l_list, niggli=niggli, primitive=primitive)

    f_all = torch.from_numpy(np.concatenate(f_list).astype(np.float64))
    batch = CrystalBatch(
        species=torch.from_numpy(np.concatenate(z_list).astype(np.int64)),
        frac=wrap(f_all),
        lattice=torch.from_numpy(np.stack(l_list).astype(np.float64)),
        n_atoms=torch.tensor([z.size for z in z_list], dtype=torch.long),
        ids=[ids[i] for i in good],
    )
    props = {name: _column([col[i] for i in good]) for name, col in columns.items()}
    return Dataset(batch=batch, properties=props, source=path, skipped=skipped)


def chunked_validity(frac: torch.Tensor, lattice: torch.Tensor, counts: torch.Tensor, chunk: int = 2048) -> ValidityReport:
    """:func:`crystalign.geometry.check_validity` over slices of ``chunk`` structures: its pair
    indices grow with the sum of n^2, which for a large dataset of big cells is gigabytes at once."""
    ptr = [0, *torch.cumsum(counts, 0).tolist()]
    parts = []
    for s in range(0, counts.numel(), chunk):
        e = min(s + chunk, counts.numel())
        parts.append(check_validity(frac[ptr[s] : ptr[e]], lattice[s:e], counts[s:e]))
    return ValidityReport(
        valid=torch.cat([p.valid for p in parts]),
        volume=torch.cat([p.volume for p in parts]),
        min_distance=torch.cat([p.min_distance for p in parts]),
        polar_sine=torch.cat([p.polar_sine for p in parts]),
    )


def _geometry_report(frac: torch.Tensor, lattice: torch.Tensor, counts: torch.Tensor, full: bool) -> ValidityReport:
    """The shared validity check (``full``), or only its cell part: finite geometry, volume and polar
    sine. The cell part is what every reader enforces; interatomic distances cost far more to check
    and are a property of the data (generated samples may violate them), not a reading error."""
    if full:
        return chunked_validity(frac, lattice, counts)
    finite_lat = torch.isfinite(lattice).flatten(1).all(-1)
    batch = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    finite_atoms = scatter_sum((~torch.isfinite(frac).all(-1)).long(), batch, counts.numel()) == 0
    safe = torch.where(finite_lat[:, None, None], lattice, torch.zeros_like(lattice))
    vol, ps = volume(safe), polar_sine(safe)
    valid = finite_lat & finite_atoms & (vol >= MIN_VOLUME) & (ps >= MIN_POLAR_SINE)
    return ValidityReport(valid=valid, volume=vol, min_distance=torch.full_like(vol, math.inf), polar_sine=ps)


def _reduce_cells(z_list, f_list, l_list, *, niggli: bool, primitive: bool):
    """Primitive cell and/or Niggli reduction (pymatgen), then the canonical orientation of the
    CDVAE pipeline (``Lattice.from_parameters``), so reduced cells of one dataset share a frame."""
    from pymatgen.core import Lattice, Structure

    out_z, out_f, out_l = [], [], []
    for z, f, lat in zip(z_list, f_list, l_list):
        s = Structure(Lattice(lat), z.tolist(), f, coords_are_cartesian=False)
        if primitive:
            s = s.get_primitive_structure()
        if niggli:
            s = s.get_reduced_structure()
        canon = Lattice.from_parameters(*s.lattice.parameters)
        out_z.append(np.asarray(s.atomic_numbers, dtype=np.int64))
        out_f.append(np.asarray(s.frac_coords, dtype=np.float64))
        out_l.append(np.asarray(canon.matrix, dtype=np.float64))
    return out_z, out_f, out_l


def _check_file(path: Path) -> None:
    if not path.exists():
        raise DataError("no such file or folder", path)
    if path.is_file() and path.stat().st_size == 0:
        raise DataError("empty file", path)


# ---------------------------------------------------------------------------------------------- CSV
def read_csv(
    path: str | os.PathLike,
    *,
    cif_column: str = "cif",
    id_column: str = "material_id",
    niggli: bool = False,
    primitive: bool = False,
    skip_bad: bool = False,
    validate: bool = False,
) -> Dataset:
    """CDVAE-style CSV: a ``cif`` column of CIF text; other columns become properties.

    Ids come from ``material_id`` (else the row index). Columns holding CIF text (names ending in
    ``cif``) and the id column are not kept as properties; an unnamed index column is kept as ``index``.
    Rows are numbered from 0 in the order of the file (header excluded).
    """
    path = Path(path)
    _check_file(path)
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with open(path, newline="", encoding="utf-8-sig") as fh:  # -sig: spreadsheet exports start with a BOM
        try:
            rows = list(csv.reader(fh))
        except (csv.Error, UnicodeDecodeError) as err:
            raise DataError(f"cannot read CSV ({err})", path) from None
    rows = [r for r in rows if r]  # blank lines
    if not rows:
        raise DataError("empty file", path)
    header = [h.strip() for h in rows[0]]
    if cif_column not in header:
        raise DataError(f"no '{cif_column}' column (columns: {', '.join(h or '<unnamed>' for h in header)})", path)
    body = rows[1:]
    if not body:
        raise DataError("no data rows (header only)", path)
    i_cif = header.index(cif_column)
    i_id = header.index(id_column) if id_column in header else None

    ncol = len(header)
    errors: dict[int, str] = {}
    texts: list[str] = []
    ids: list[str] = []
    for r, row in enumerate(body):
        idv = row[i_id].strip() if i_id is not None and i_id < len(row) else ""
        ids.append(idv or str(r))
        if len(row) != ncol:
            errors[r] = f"row has {len(row)} fields, the header has {ncol} (truncated or malformed CSV)"
            texts.append("")
            continue
        texts.append(row[i_cif])

    parsed = parse_cif_texts(texts)
    for r, reason in parsed.errors.items():
        errors.setdefault(r, reason)

    columns: dict[str, list[Any]] = {}
    for c, name in enumerate(header):
        if c in (i_cif, i_id) or name.lower().endswith("cif") or name.lower().startswith("cif"):  # e.g. DiffCSP's cif.conv
            continue
        key = name or "index"
        columns[key] = [row[c] if c < len(row) else "" for row in body]

    ds = _assemble(
        path, ids, parsed.numbers, parsed.frac, parsed.lattice, columns, errors,
        niggli=niggli, primitive=primitive, skip_bad=skip_bad, validate=validate,
    )  # fmt: skip
    return ds


# ---------------------------------------------------------------------------------------------- CIF
def read_cif(
    path: str | os.PathLike,
    *,
    niggli: bool = False,
    primitive: bool = False,
    skip_bad: bool = False,
    validate: bool = False,
) -> Dataset:
    """A CIF file (every data block is a structure) or a folder of ``*.cif`` files (sorted by name).

    Ids are file stems, ``stem:block`` for files holding several blocks. Property ``file`` names
    the source file of each structure.
    """
    path = Path(path)
    _check_file(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in CIF_SUFFIXES)
        if not files:
            raise DataError("folder holds no .cif files", path)
    else:
        files = [path]
    texts: list[str] = []
    ids: list[str] = []
    names: list[str] = []
    errors: dict[int, str] = {}
    for f in files:
        try:
            text = f.read_text(encoding="utf-8", errors="replace")
        except OSError as err:
            raise DataError(f"cannot read ({err})", f) from None
        if not text.strip():
            if path.is_dir():
                errors[len(ids)] = "empty file"
                ids.append(f.stem)
                names.append(f.name)
                texts.append("")
                continue
            raise DataError("empty file", f)
        # journal CIFs open with a metadata block (data_global) that holds no atoms
        blocks = [b for b in split_cif_blocks(text) if "_atom_site_" in b[1].lower()] or split_cif_blocks(text)
        for block_name, block in blocks:
            ids.append(f.stem if len(blocks) == 1 else f"{f.stem}:{block_name}")
            names.append(f.name)
            texts.append(block)
    parsed = parse_cif_texts(texts)
    for r, reason in parsed.errors.items():
        errors.setdefault(r, reason)
    if path.is_dir() and not skip_bad and errors:
        # name the offending file rather than a row of the folder
        r = min(errors)
        raise DataError(errors[r], path / names[r], id=ids[r])
    return _assemble(
        path, ids, parsed.numbers, parsed.frac, parsed.lattice, {"file": names}, errors,
        niggli=niggli, primitive=primitive, skip_bad=skip_bad, validate=validate,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------- extxyz
def read_extxyz(
    path: str | os.PathLike,
    *,
    niggli: bool = False,
    primitive: bool = False,
    skip_bad: bool = False,
    validate: bool = False,
) -> Dataset:
    """Extended XYZ (ase.io) with periodic cells. Ids from info ``material_id``/``id``, else the frame
    index; scalar info entries and calculator results (energy, ...) become properties."""
    import ase.io

    path = Path(path)
    _check_file(path)
    try:
        frames = ase.io.read(str(path), index=":", format="extxyz")
    except Exception as err:  # ase raises many types for bad text
        raise DataError(f"cannot read extxyz ({type(err).__name__}: {err})", path) from None
    if not frames:
        raise DataError("no structures in file", path)
    return _from_records(
        path,
        [
            (
                str(a.info.get("material_id", a.info.get("id", i))),
                np.asarray(a.numbers),
                np.asarray(a.positions, dtype=np.float64),
                np.asarray(a.cell.array, dtype=np.float64),
                np.asarray(a.pbc),
                {**{k: v for k, v in a.info.items() if k not in ("material_id", "id")}, **_calc_results(a)},
            )
            for i, a in enumerate(frames)
        ],
        niggli=niggli, primitive=primitive, skip_bad=skip_bad, validate=validate,
    )  # fmt: skip


def _calc_results(atoms) -> dict[str, Any]:
    calc = getattr(atoms, "calc", None)
    results = getattr(calc, "results", None) or {}
    return {k: v for k, v in results.items() if _scalar(v) is not None}


def _from_records(
    path: Path,
    records: Iterable[tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray, Mapping[str, Any]]],
    **opts: Any,
) -> Dataset:
    """(id, numbers, Cartesian positions, cell, pbc, extra) records -> Dataset."""
    ids: list[str] = []
    numbers: list[np.ndarray | None] = []
    frac: list[np.ndarray | None] = []
    lattice: list[np.ndarray | None] = []
    extras: list[Mapping[str, Any]] = []
    errors: dict[int, str] = {}
    for r, (rid, z, pos, cell, pbc, extra) in enumerate(records):
        ids.append(rid)
        extras.append(extra)
        try:
            z = np.asarray(z).astype(np.int64).reshape(-1)
            pos = np.asarray(pos, dtype=np.float64).reshape(-1, 3)
            cell = np.asarray(cell, dtype=np.float64).reshape(3, 3)
        except (ValueError, TypeError) as err:
            errors[r] = f"malformed record ({err})"
            numbers.append(None), frac.append(None), lattice.append(None)
            continue
        if pos.shape[0] != z.size:
            errors[r] = f"{z.size} atomic numbers for {pos.shape[0]} positions"
        elif pbc is not None and not np.asarray(pbc).astype(bool).all():
            errors[r] = f"only fully periodic structures are supported (pbc={np.asarray(pbc).astype(bool).tolist()})"
        numbers.append(z)
        frac.append(_frac_from_cartesian(pos, cell))
        lattice.append(cell)
    if not ids:
        raise DataError("no structures in file", path)
    keys: list[str] = []
    for extra in extras:
        for k, v in extra.items():
            if k not in keys and _scalar(v) is not None:
                keys.append(k)
    columns = {k: [_scalar(e.get(k)) for e in extras] for k in keys}
    return _assemble(path, ids, numbers, frac, lattice, columns, errors, **opts)


# ---------------------------------------------------------------------------------------------- LMDB
def read_lmdb(
    path: str | os.PathLike,
    *,
    niggli: bool = False,
    primitive: bool = False,
    skip_bad: bool = False,
    validate: bool = False,
) -> Dataset:
    """OMatG's LMDB (a file, or a folder holding ``data.mdb``): records ``cell``, ``pos`` (Cartesian),
    ``atomic_numbers``, ``pbc``; ids are the LMDB keys; other scalar entries become properties."""
    from crystalign.data.lmdb_format import REQUIRED_KEYS, iter_lmdb_records

    path = Path(path)
    _check_file(path)

    def records():
        for key, rec in iter_lmdb_records(path):
            extra = {k: v for k, v in rec.items() if k not in REQUIRED_KEYS and k != "pbc"}
            yield key, _np(rec["atomic_numbers"]), _np(rec["pos"]), _np(rec["cell"]), _np(rec.get("pbc")), extra

    return _from_records(path, records(), niggli=niggli, primitive=primitive, skip_bad=skip_bad, validate=validate)


def _np(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


# ---------------------------------------------------------------------------------------------- dispatch
def detect_format(path: str | os.PathLike) -> str:
    """'csv', 'cif', 'extxyz' or 'lmdb' from the suffix (or the folder's content)."""
    path = Path(path)
    if path.is_dir():
        if (path / "data.mdb").exists():
            return "lmdb"
        if any(p.suffix.lower() in CIF_SUFFIXES for p in path.iterdir()):
            return "cif"
        raise DataError("folder holds neither .cif files nor an LMDB (data.mdb)", path)
    suffix = path.suffix.lower()
    for fmt, suffixes in (("csv", CSV_SUFFIXES), ("cif", CIF_SUFFIXES), ("extxyz", XYZ_SUFFIXES), ("lmdb", LMDB_SUFFIXES)):
        if suffix in suffixes:
            return fmt
    raise DataError(f"unknown file type {suffix or '(no suffix)'!r}; supported: .csv, .cif, .xyz/.extxyz, .lmdb or a folder", path)


_READERS = {"csv": read_csv, "cif": read_cif, "extxyz": read_extxyz, "lmdb": read_lmdb}


def read_structures(
    path: str | os.PathLike,
    *,
    format: str | None = None,  # noqa: A002 - mirrors ase.io
    niggli: bool = False,
    primitive: bool = False,
    skip_bad: bool = False,
    validate: bool = False,
    **kwargs: Any,
) -> Dataset:
    """Read any supported file or folder (format from the suffix unless given). See the module doc."""
    path = Path(path).expanduser()
    _check_file(path)
    fmt = format or detect_format(path)
    if fmt not in _READERS:
        raise DataError(f"unknown format {fmt!r}; supported: {', '.join(_READERS)}", path)
    return _READERS[fmt](path, niggli=niggli, primitive=primitive, skip_bad=skip_bad, validate=validate, **kwargs)


def _is_dataset_path(path: Path) -> bool:
    """A file or folder some reader takes (by :func:`detect_format`): what a name can only mean as a path."""
    if not path.exists():
        return False
    try:
        detect_format(path)
    except DataError:
        return False
    return True


def load_dataset(
    name_or_path: str | os.PathLike,
    split: str | None = None,
    data_root: str | os.PathLike | None = None,
    niggli: bool = False,
    primitive: bool = False,
    *,
    cache: str | os.PathLike | None = None,
    skip_bad: bool = False,
    validate: bool = False,
) -> Dataset:
    """A named dataset split (``perov_5``, ``carbon_24``, ...) or any readable path.

    Named datasets are looked up in the data root (``data_root`` or $CRYSTALIGN_DATA_ROOT, laid out
    ``<root>/<name>/<split>.csv``), then in the download cache; otherwise a :class:`DataError` says
    how to download them. ``split=None`` means ``val``, or the dataset's only split.

    Example::

        ds = load_dataset("perov_5", split="val", data_root="/data/csp")
    """
    from crystalign.data.registry import is_registered, resolve

    text = str(name_or_path)
    # a registered name means the dataset, unless a readable dataset file or folder of that name is right here
    if not is_registered(text) or _is_dataset_path(Path(text).expanduser()):
        path = Path(text).expanduser()
        if not path.exists() and not any(sep in text for sep in ("/", os.sep)) and not path.suffix:
            from crystalign.data.registry import unknown_dataset_error

            raise unknown_dataset_error(text)
        ds = read_structures(path, niggli=niggli, primitive=primitive, skip_bad=skip_bad, validate=validate)
        ds.split = split
        return ds
    path, split_name = resolve(text, split, data_root=data_root, cache=cache)
    ds = read_structures(path, niggli=niggli, primitive=primitive, skip_bad=skip_bad, validate=validate)
    ds.name, ds.split = text, split_name
    return ds


__all__ = [
    "Dataset",
    "DataError",
    "read_csv",
    "read_cif",
    "read_extxyz",
    "read_lmdb",
    "read_structures",
    "load_dataset",
    "detect_format",
]
