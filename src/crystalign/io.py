"""Atomic file writes: a reader never sees a half-written output file."""

from __future__ import annotations

import glob
import json
import math
import os
import re
import socket
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def _process_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: read once: the umask can only be read by setting it, which would race with threads creating files
_UMASK = _process_umask()
#: temporary files of atomic writes older than this were left by an earlier process (killed mid-write)
_STARTED = time.time()
#: who writes a temporary file: its name carries host and process id, so a cleanup never takes a live write's file
_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"
_PART = re.compile(r"^\.(?P<name>.+)\.(?P<host>[A-Za-z0-9_-]+)-(?P<pid>\d+)\.[A-Za-z0-9_]+\.part$")
#: a temporary file of another machine (a shared file system) untouched this long is taken as abandoned
_FOREIGN_PART_AGE_S = 3600.0


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_HOST}-{os.getpid()}.", suffix=".part", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600 files; outputs get the usual permissions (0666 minus the umask)
        os.chmod(tmp_path, 0o666 & ~_UMASK)
        with open(tmp_path, "rb") as fh:  # the bytes reach the disk before the rename makes them the file
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def remove_stale_parts(folder: str | os.PathLike, names: list[str] | None = None, recursive: bool = False) -> int:
    """Delete the temporary files (``.NAME.HOST-PID.*.part``) that a process killed during an atomic write left in
    ``folder``: of the outputs ``names`` only, or of any output (a folder the command owns); ``recursive`` includes
    subfolders. A file whose writer is still running is never touched (same host: its process exists; another
    host: written to within the last hour), nor a finished output. Returns how many were removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    patterns = [f".{glob.escape(n)}.*.part" for n in names] if names is not None else [".*.part"]
    removed = 0
    for pattern in patterns:
        for part in folder.rglob(pattern) if recursive else folder.glob(pattern):
            try:
                if part.is_file() and _abandoned(part):
                    part.unlink()
                    removed += 1
            except OSError:  # gone already, or not ours to remove: leave it
                continue
    return removed


def _abandoned(part: Path) -> bool:
    owner = _PART.match(part.name)
    if owner is None:  # not named by this version: only if it predates this process
        return part.stat().st_mtime < _STARTED
    if owner["host"] != _HOST:
        return time.time() - part.stat().st_mtime > _FOREIGN_PART_AGE_S
    pid = int(owner["pid"])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def recover_first_checkpoint(last: str | os.PathLike, best: str | os.PathLike) -> bool:
    """A run killed while writing its very first checkpoints has ``best`` (written first) but no ``last``: make
    ``last`` a copy of ``best``, which holds that same point of the run, so ``--resume`` continues from it.
    Returns whether it did."""
    last, best = Path(last), Path(best)
    if last.exists() or not best.is_file():
        return False
    import shutil

    with atomic_path(last) as tmp:
        shutil.copyfile(best, tmp)
    return True


class OutputPathError(PermissionError):
    """An output path that cannot be written: raised before any work is done."""


def check_output_dir(out: str | os.PathLike) -> Path:
    """Fail before any work if the folder ``out`` cannot be created or written (creates it)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"output folder {out} is an existing file; choose a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise OutputPathError(f"output folder {out} is not writable: {err.strerror or err}") from None
    return out


def check_output_file(path: str | os.PathLike) -> Path:
    """Fail before any work if the file ``path`` cannot be written (a folder there, or an unwritable parent)."""
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"output file {path} is an existing folder; give a file name")
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise OutputPathError(f"cannot write {path}: {parent} is a file, not a folder")
    check_output_dir(parent)
    return path


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Strict JSON: NaN and ±inf (no valid candidate, an empty mean) are written as null, which every JSON
    reader accepts, instead of Python's NaN/Infinity, which JavaScript and strict parsers reject."""
    write_text(path, json.dumps(_finite_or_null(obj), indent=2, sort_keys=False, default=str, allow_nan=False) + "\n")


def _finite_or_null(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_null(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:  # numpy / torch scalars
        return _finite_or_null(obj.item())
    return obj


def save_torch(path: str | os.PathLike, obj: Any) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def write_structure_set(
    out: str | os.PathLike, batch: Any, record: dict[str, Any], trajectory: list | None = None, valid: list[bool] | None = None
) -> list[str]:
    """Generated structures as ``OUT/<id>.cif`` (one per structure), ``structures.extxyz``, ``index.json``
    (file order = pairing order for ``crystalign evaluate``) and ``samples.json`` (``record`` plus the file list,
    validity and versions). ``trajectory``: optional list of batches, written to ``trajectory.extxyz``."""
    from ase.io import write as ase_write

    from crystalign.provenance import versions

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ids = batch.ids or [f"{i:06d}" for i in range(batch.num_structures)]
    repeated = [sid for sid, count in Counter(ids).items() if count > 1]
    if repeated:  # ids are file names: a repeat would silently overwrite another structure's CIF
        raise ValueError(f"duplicate structure ids {', '.join(map(str, repeated[:5]))}: each id names an output file")
    if valid is None:  # the caller may have checked already (the periodic-distance search is not free)
        valid = batch.validity().valid.tolist()
    names = []
    structures = batch.to_structures()
    for sid, s in zip(ids, structures):
        write_text(out / f"{sid}.cif", s.to(fmt="cif"))
        names.append(f"{sid}.cif")
    with atomic_path(out / "structures.extxyz") as tmp:
        ase_write(tmp, batch.to_atoms(), format="extxyz")
    if trajectory:
        # every frame names its structure and integration step (frames come batch after batch)
        steps_seen: Counter = Counter()
        frames = []
        for step_batch in trajectory:
            frame_ids = step_batch.ids or [str(i) for i in range(step_batch.num_structures)]
            for sid, atoms in zip(frame_ids, step_batch.to_atoms()):
                atoms.info.update(id=sid, step=steps_seen[sid])
                steps_seen[sid] += 1
                frames.append(atoms)
        with atomic_path(out / "trajectory.extxyz") as tmp:
            ase_write(tmp, frames, format="extxyz")
    write_json(out / "index.json", names)
    write_json(
        out / "samples.json",
        {
            **record,
            "n": len(names),
            "valid_fraction": sum(valid) / max(len(valid), 1),
            "structures": [
                {"id": sid, "file": nm, "formula": s.composition.reduced_formula, "valid": bool(v)}
                for sid, nm, s, v in zip(ids, names, structures, valid)
            ],
            "versions": versions(),
        },
    )
    return names
