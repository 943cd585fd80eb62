"""OMatG's LMDB format: one record per structure, ``{cell, pos (Cartesian Å), atomic_numbers, pbc}``.

OMatG writes each value with ``pickle.dumps`` of a dict of torch tensors, and every tensor pickles
its storage through ``torch.storage._load_from_bytes``, which calls ``torch.load(weights_only=False)``:
plain unpickling would run whatever a file asks for. Values are therefore decoded with
``torch.load(..., weights_only=True)`` where that works (files written with ``torch.save``), and
otherwise with a restricted unpickler that admits only tensors, numpy arrays and containers. It
reads each tensor storage (torch's legacy layout: a few small pickles, then raw bytes) with a
parser that admits only storage type names, ten times faster than a ``torch.load`` per storage;
any other storage layout goes to ``torch.load(..., weights_only=True)``.

Example::

    for key, record in iter_lmdb_records("carbon_24_unique/val.lmdb"):
        record["cell"], record["pos"], record["atomic_numbers"]
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch

from crystalign.data.errors import DataError

#: keys every structure record holds
REQUIRED_KEYS = ("cell", "pos", "atomic_numbers")
#: non-structure keys some LMDB writers add (record count)
METADATA_KEYS = (b"length",)


# torch's legacy serialisation of one storage, as ``torch.storage._load_from_bytes`` receives it
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _StorageUnpickler(pickle.Unpickler):
    """Reads the small pickles of a legacy storage stream; only storage type names are admitted."""

    def __init__(self, file: io.BytesIO, storages: dict[str, tuple[Any, int]]) -> None:
        super().__init__(file)
        self.storages = storages

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} in a storage stream")

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage" and pid[5] is None):
            raise pickle.UnpicklingError(f"unsupported storage reference {pid!r}")
        _, dtype, key, _location, numel, _ = pid
        self.storages[str(key)] = (dtype, int(numel))
        return str(key)


def _read_legacy_storage(data: bytes) -> np.ndarray:
    """The flat contents of one legacy-format storage, read without ``torch.load``'s per-call overhead."""
    f = io.BytesIO(data)
    storages: dict[str, tuple[Any, int]] = {}
    if _StorageUnpickler(f, storages).load() != _LEGACY_MAGIC:
        raise pickle.UnpicklingError("not a legacy storage stream")
    if _StorageUnpickler(f, storages).load() != _LEGACY_PROTOCOL:
        raise pickle.UnpicklingError("unknown legacy protocol")
    info = _StorageUnpickler(f, storages).load()
    if not isinstance(info, dict) or not info.get("little_endian", False):
        raise pickle.UnpicklingError("big-endian storage")
    root = _StorageUnpickler(f, storages).load()
    keys = _StorageUnpickler(f, storages).load()
    if not isinstance(root, str) or keys != [root] or root not in storages:
        raise pickle.UnpicklingError("unexpected storage layout")
    dtype, numel = storages[root]
    count = int.from_bytes(f.read(8), "little")
    if count != numel:
        raise pickle.UnpicklingError("storage size mismatch")
    raw = f.read(numel * np.dtype(dtype).itemsize)
    if len(raw) != numel * np.dtype(dtype).itemsize:
        raise pickle.UnpicklingError("storage data cut short")
    return np.frombuffer(raw, dtype=dtype).copy()


def _load_storage_bytes(data: bytes) -> Any:
    try:
        return _read_legacy_storage(data)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError):
        # any other layout: torch's own safe loader
        return torch.load(io.BytesIO(data), weights_only=True)


def _rebuild_tensor(storage: Any, offset: int, size: Any, stride: Any, *rest: Any) -> torch.Tensor:
    if isinstance(storage, np.ndarray):
        # as_strided checks the view against the storage bounds
        return torch.as_strided(torch.from_numpy(storage), tuple(size), tuple(stride), int(offset))
    return torch._utils._rebuild_tensor_v2(storage, offset, size, stride, *rest)


def _safe_globals() -> dict[tuple[str, str], Any]:
    import codecs

    allowed: dict[tuple[str, str], Any] = {
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch.storage", "_load_from_bytes"): _load_storage_bytes,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # protocol-2 pickles of bytes
    }
    core = getattr(np, "_core", None)
    multiarray = getattr(core, "multiarray", None)
    if multiarray is None:  # numpy < 2
        from numpy.core import multiarray  # type: ignore[no-redef]
    # pickles name the module numpy had when they were written
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "_reconstruct")] = multiarray._reconstruct
        allowed[(mod, "scalar")] = multiarray.scalar
    for name in ("float64", "float32", "int64", "int32", "int16", "int8", "uint8", "bool_"):
        allowed[("numpy", name)] = getattr(np, name)
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    _allowed: dict[tuple[str, str], Any] | None = None

    def find_class(self, module: str, name: str) -> Any:
        if _RestrictedUnpickler._allowed is None:
            _RestrictedUnpickler._allowed = _safe_globals()
        try:
            return _RestrictedUnpickler._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only tensors, arrays and containers)") from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not supported in LMDB values")


class ValueDecoder:
    """Decodes LMDB values safely: ``torch.load(weights_only=True)`` first; if a file's values are
    plain pickles (OMatG's case, which ``weights_only`` rejects), the restricted unpickler for the
    rest of that file."""

    def __init__(self) -> None:
        self.mode: str | None = None  # "torch" or "restricted", fixed by the first value

    def __call__(self, data: bytes) -> Any:
        if self.mode != "restricted":
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # torch warns about the pickle protocol it then rejects
                    obj = torch.load(io.BytesIO(data), weights_only=True)
                self.mode = "torch"
                return obj
            except Exception:
                if self.mode == "torch":
                    raise
                self.mode = "restricted"
        return _RestrictedUnpickler(io.BytesIO(data)).load()


def decode_value(data: bytes) -> Any:
    """Decode one LMDB value safely (see :class:`ValueDecoder`)."""
    return ValueDecoder()(data)


def _open_env(path: Path):
    import lmdb

    subdir = path.is_dir()
    data_file = path / "data.mdb" if subdir else path
    if not data_file.is_file():
        raise DataError("LMDB data file not found", path)
    if data_file.stat().st_size == 0:
        raise DataError("empty file", path)
    try:
        env = lmdb.open(str(path), subdir=subdir, readonly=True, lock=False, readahead=False, max_readers=1)
    except lmdb.Error as err:
        raise DataError(f"not a readable LMDB file ({err})", path) from None
    # LMDB maps the file and trusts its header: pages past the end of a truncated file would crash
    # the process on access, so the header is checked against the real file size first.
    size = data_file.stat().st_size
    need = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    if size < need:
        env.close()
        raise DataError(f"truncated LMDB file ({size} bytes, its header needs {need})", path)
    return env


def iter_lmdb_records(path: str | os.PathLike) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """Yield (key, record dict) for every structure record; :class:`DataError` on damage."""
    import lmdb

    path = Path(path)
    env = _open_env(path)
    decode = ValueDecoder()
    try:
        with env.begin(buffers=False) as txn:
            try:
                for row, (key, value) in enumerate(txn.cursor()):
                    if key in METADATA_KEYS:
                        continue
                    name = key.decode("utf-8", "replace")
                    try:
                        record = decode(value)
                    except Exception as err:
                        detail = str(err).splitlines()[0][:160] if str(err) else ""
                        raise DataError(f"cannot decode LMDB value ({type(err).__name__}: {detail})", path, row, name) from None
                    if not isinstance(record, Mapping):
                        raise DataError(f"LMDB value is a {type(record).__name__}, expected a dict", path, row, name)
                    missing = [k for k in REQUIRED_KEYS if k not in record]
                    if missing:
                        raise DataError(f"LMDB record lacks {', '.join(missing)}", path, row, name)
                    yield name, record
            except lmdb.Error as err:
                raise DataError(f"corrupted LMDB file ({err})", path) from None
    finally:
        env.close()


def write_lmdb(path: str | os.PathLike, records: Mapping[str, Mapping[str, Any]] | list[Mapping[str, Any]]) -> None:
    """Write structure records in OMatG's layout (keys ``00000000``, ...; values pickled dicts of tensors).

    Written to a temporary file and renamed, so a reader never sees a half-written database.
    """
    import lmdb

    from crystalign.io import atomic_path

    items = records.items() if isinstance(records, Mapping) else ((f"{i:08d}", r) for i, r in enumerate(records))
    items = list(items)
    payloads = [(k.encode(), pickle.dumps(dict(v), protocol=4)) for k, v in items]
    map_size = max(1 << 20, 4 * sum(len(k) + len(v) + 64 for k, v in payloads))
    with atomic_path(path) as tmp:
        env = lmdb.open(str(tmp), subdir=False, map_size=map_size, lock=False)
        try:
            with env.begin(write=True) as txn:
                for k, v in payloads:
                    txn.put(k, v)
        finally:
            env.close()
        lock = Path(str(tmp) + "-lock")
        if lock.exists():
            lock.unlink()
