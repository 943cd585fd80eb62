"""Datasets: readers (CSV/CIF/extxyz/LMDB), the named-dataset registry, downloads and summaries.

Example::

    from crystalign.data import load_dataset, fit_lognormal_lengths
    ds = load_dataset("perov_5", split="val")       # data root, then the download cache
    ds.batch, ds.ids, ds.properties["heat_ref"]
    mu, s = fit_lognormal_lengths(ds.batch)
"""

from crystalign.data.download import download
from crystalign.data.errors import DataError
from crystalign.data.readers import (
    Dataset,
    detect_format,
    load_dataset,
    read_cif,
    read_csv,
    read_extxyz,
    read_lmdb,
    read_structures,
)
from crystalign.data.registry import get_info, registry, resolve
from crystalign.data.summary import fit_lognormal_lengths, space_groups, summarize

__all__ = [
    "DataError",
    "Dataset",
    "detect_format",
    "download",
    "fit_lognormal_lengths",
    "get_info",
    "load_dataset",
    "read_cif",
    "read_csv",
    "read_extxyz",
    "read_lmdb",
    "read_structures",
    "registry",
    "resolve",
    "space_groups",
    "summarize",
]
