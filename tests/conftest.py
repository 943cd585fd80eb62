"""Shared fixtures. Real datasets are read through the data root ($CRYSTALIGN_DATA_ROOT).

Without a data root the data tests skip with a reason; with CRYSTALIGN_REQUIRE_DATA=1 (set by .ci/run)
a missing data root is an error instead, so CI can never pass by skipping.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from crystalign.settings import data_root as _data_root


@pytest.fixture(autouse=True)
def _one_thread():
    # tests run as parallel workers (pytest -n 2); OpenMP threads beyond one core each only spin
    torch.set_num_threads(1)
    yield


@pytest.fixture(autouse=True)
def _seeded():
    # draws from the global RNG must not depend on which tests ran before in the same worker
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = _data_root()
    if root is None or not root.is_dir():
        msg = "real datasets not found: set CRYSTALIGN_DATA_ROOT to the folder holding perov_5/, carbon_24/, ..."
        if os.environ.get("CRYSTALIGN_REQUIRE_DATA") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return root


def _dataset_file(root: Path, rel: str) -> Path:
    path = root / rel
    if not path.exists():
        msg = f"dataset file {path} missing under the data root"
        if os.environ.get("CRYSTALIGN_REQUIRE_DATA") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def perov_val_csv(data_root) -> Path:
    return _dataset_file(data_root, "perov_5/val.csv")


@pytest.fixture(scope="session")
def carbon_val_csv(data_root) -> Path:
    return _dataset_file(data_root, "carbon_24/val.csv")


@pytest.fixture(scope="session")
def mp20_sample_csv(data_root) -> Path:
    return _dataset_file(data_root, "mp_20_sample/sample.csv")


@pytest.fixture(scope="session")
def carbon_lmdb(data_root) -> Path:
    return _dataset_file(data_root, "carbon_24_unique/val.lmdb")
