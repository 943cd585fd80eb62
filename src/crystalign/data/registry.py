"""Named datasets: where their splits live online, their checksums, and where they are found locally.

Lookup order for a split: the data root (``--data-root`` / $CRYSTALIGN_DATA_ROOT, laid out
``<root>/<name>/<file>``, e.g. ``perov_5/val.csv``), then the download cache (same layout under
:func:`crystalign.settings.cache_dir`). A mirror of the same layout can replace the public URLs:
``download(..., base_url=...)`` or $CRYSTALIGN_DATA_URL.

Example::

    info = get_info("perov_5")
    path, split = resolve("perov_5", "val")
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

from crystalign.data.errors import DataError
from crystalign.settings import cache_dir, data_root

#: overrides every registry URL with ``<base>/<name>/<file>`` (a mirror with the data-root layout)
BASE_URL_ENV = "CRYSTALIGN_DATA_URL"


@dataclass(frozen=True)
class SplitInfo:
    dataset: str
    split: str
    file: str
    url: str | None
    sha256: str
    bytes: int | None
    format: str
    rows: int | None = None

    def url_for(self, base_url: str | None = None) -> str | None:
        """The download URL: ``<base_url>/<dataset>/<file>`` when a mirror is given, else the registry's."""
        base = base_url or os.environ.get(BASE_URL_ENV) or None
        if base:
            return f"{base.rstrip('/')}/{self.dataset}/{self.file}"
        return self.url


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    description: str
    max_atoms: int | None
    splits: dict[str, SplitInfo]

    @property
    def downloadable(self) -> bool:
        return all(s.url for s in self.splits.values())

    def default_split(self) -> str:
        """``val`` when there is one, else the only split."""
        if "val" in self.splits:
            return "val"
        if len(self.splits) == 1:
            return next(iter(self.splits))
        raise DataError(f"dataset {self.name!r} has splits {', '.join(self.splits)}: choose one")

    def split_info(self, split: str | None) -> SplitInfo:
        split = split or self.default_split()
        if split not in self.splits:
            raise DataError(f"dataset {self.name!r} has no split {split!r} (splits: {', '.join(self.splits)})")
        return self.splits[split]


@lru_cache(maxsize=1)
def registry() -> dict[str, DatasetInfo]:
    """All named datasets, from the packaged ``registry.json``."""
    text = resources.files("crystalign.data").joinpath("registry.json").read_text(encoding="utf-8")
    raw = json.loads(text)["datasets"]
    out: dict[str, DatasetInfo] = {}
    for name, entry in raw.items():
        splits = {
            split: SplitInfo(
                dataset=name,
                split=split,
                file=info.get("file", f"{split}.csv"),
                url=info.get("url"),
                sha256=info["sha256"].lower(),
                bytes=info.get("bytes"),
                format=info.get("format", "cdvae-csv"),
                rows=info.get("rows"),
            )
            for split, info in entry["splits"].items()
        }
        out[name] = DatasetInfo(name, entry.get("description", ""), entry.get("max_atoms"), splits)
    return out


def is_registered(name: str) -> bool:
    return name in registry()


def unknown_dataset_error(name: str) -> DataError:
    names = list(registry())
    close = difflib.get_close_matches(name, names, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return DataError(
        f"unknown dataset or missing path {name!r}.{hint} Known datasets: {', '.join(names)} "
        "(or give a path to a .csv, .cif, .xyz, .lmdb file or a folder)"
    )


def get_info(name: str) -> DatasetInfo:
    try:
        return registry()[name]
    except KeyError:
        raise unknown_dataset_error(name) from None


def local_path(
    name: str,
    split: str | None = None,
    data_root: str | os.PathLike | None = None,
    cache: str | os.PathLike | None = None,
) -> tuple[Path | None, str]:
    """(path, split): the first existing copy of the split in the data root then the cache, or None."""
    info = get_info(name).split_info(split)
    for base in _search_roots(data_root, cache):
        candidate = base / name / info.file
        if candidate.exists():
            return candidate, info.split
    return None, info.split


def _search_roots(root: str | os.PathLike | None, cache: str | os.PathLike | None) -> list[Path]:
    roots = []
    r = data_root(root)
    if r is not None:
        roots.append(r)
    roots.append(cache_dir(cache))
    return roots


def resolve(
    name: str,
    split: str | None = None,
    data_root: str | os.PathLike | None = None,
    cache: str | os.PathLike | None = None,
) -> tuple[Path, str]:
    """(path, split) of a named split found locally; a :class:`DataError` says how to get it otherwise."""
    path, split_name = local_path(name, split, data_root, cache)
    if path is not None:
        return path, split_name
    info = get_info(name)
    searched = ", ".join(str(b / name / info.splits[split_name].file) for b in _search_roots(data_root, cache))
    if info.splits[split_name].url:
        how = f"run `crystalign data download {name} --split {split_name}`, or point --data-root / $CRYSTALIGN_DATA_ROOT at a folder holding {name}/{info.splits[split_name].file}"
    else:
        how = f"it has no public download: point --data-root / $CRYSTALIGN_DATA_ROOT at a folder holding {name}/{info.splits[split_name].file}"
    raise DataError(f"dataset {name} split {split_name} not found (looked in {searched}); {how}")
