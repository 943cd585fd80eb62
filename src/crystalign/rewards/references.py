"""Reference structures for the hull and cRMSE rewards, from a benchmark CSV, CIF files or any ASE-readable file.

Example::

    structures, ids = load_structures("data/mp_20/train.csv")     # a 'cif' column, ids from 'material_id'
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from pymatgen.core import Structure


def load_structures(path: str | Path | Sequence[str | Path]) -> tuple[list["Structure"], list[str]]:
    """Structures and ids from a CSV with a ``cif`` column, a ``.cif`` file, a folder of ``.cif`` files, or any
    file ASE can read (extxyz, POSCAR, ...). Several paths are concatenated. Unparseable rows are skipped with a
    warning naming them.
    """
    if isinstance(path, (list, tuple)):
        structures, ids = [], []
        for p in path:
            s, i = load_structures(p)
            structures += s
            ids += i
        return structures, ids
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"reference structures not found: {path}")
    if path.is_dir():
        files = sorted(path.glob("*.cif"))
        if not files:
            raise ValueError(f"{path}: folder holds no .cif files")
        structures, ids, bad = [], [], []
        for file in files:
            try:
                got, got_ids = load_structures(file)
            except Exception as err:  # noqa: BLE001 - pymatgen raises many kinds for a broken CIF
                bad.append(f"{file.name} ({(str(err).strip().splitlines() or [type(err).__name__])[0]})")
                continue
            structures += got
            ids += got_ids
        if not structures:
            raise ValueError(f"{path}: no readable CIF file: {'; '.join(bad[:3])}")
        if bad:
            warnings.warn(f"{path}: skipped {len(bad)} unreadable CIF file(s): {'; '.join(bad[:5])}", stacklevel=2)
        return structures, ids
    if path.suffix.lower() == ".csv":
        return _from_csv(path)
    if path.suffix.lower() == ".cif":
        from pymatgen.core import Structure

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pymatgen's CIF notes about rounding are noise here
            return [Structure.from_file(path)], [path.stem]
    from ase.io import read
    from pymatgen.io.ase import AseAtomsAdaptor

    frames = read(path, index=":")
    frames = frames if isinstance(frames, list) else [frames]
    return [AseAtomsAdaptor.get_structure(a) for a in frames], [f"{path.stem}:{i}" for i in range(len(frames))]


def _from_csv(path: Path) -> tuple[list["Structure"], list[str]]:
    import pandas as pd
    from pymatgen.core import Lattice, Structure

    from crystalign.data.cif import parse_cif_texts

    frame = pd.read_csv(path)
    if "cif" not in frame.columns:
        raise ValueError(f"{path}: no 'cif' column (columns: {', '.join(map(str, frame.columns))})")
    id_col = next((c for c in ("material_id", "id") if c in frame.columns), None)
    ids_all = [str(v) for v in (frame[id_col] if id_col else frame.index)]
    parsed = parse_cif_texts(frame["cif"].tolist())
    structures, ids = [], []
    for i, (z, f, lat) in enumerate(zip(parsed.numbers, parsed.frac, parsed.lattice)):
        if z is None:
            continue
        structures.append(Structure(Lattice(np.asarray(lat)), np.asarray(z).tolist(), np.asarray(f)))
        ids.append(ids_all[i])
    if parsed.errors:
        shown = ", ".join(f"{ids_all[i]} ({why})" for i, why in list(parsed.errors.items())[:5])
        warnings.warn(f"{path}: skipped {len(parsed.errors)} unparseable row(s): {shown}", stacklevel=2)
    return structures, ids
