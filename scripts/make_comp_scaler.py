"""Write the fixed composition-feature scaler that DNG coverage uses by default.

CDVAE standardises the Magpie composition features of its coverage metric (COV) with fixed constants taken over a
broad chemistry, not over the reference set: a reference with little compositional spread (perov_5) would
otherwise inflate every composition distance. This script computes such constants (per-feature mean and standard
deviation) over the genuine MP-20 rows of the `mp_20_sample` dataset (81 elements) and writes them, with their
provenance, into the package.

    CRYSTALIGN_DATA_ROOT=/path/to/data python scripts/make_comp_scaler.py
"""

from __future__ import annotations

import hashlib
import sys
import warnings
from pathlib import Path

import numpy as np

from crystalign.data import load_dataset
from crystalign.io import write_json
from crystalign.provenance import versions

OUT = Path(__file__).resolve().parents[1] / "src" / "crystalign" / "data" / "magpie_scaler.json"


def main() -> None:
    from matminer.featurizers.composition.composite import ElementProperty

    ds = load_dataset("mp_20_sample")
    structures = ds.batch.to_structures()
    featurizer = ElementProperty.from_preset("magpie")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        feats = np.array([featurizer.featurize(s.composition) for s in structures], dtype=float)
        means, stds = np.nanmean(feats, axis=0), np.nanstd(feats, axis=0)
    source = Path(ds.source) if getattr(ds, "source", None) else None
    record = {
        "description": "per-feature mean and standard deviation of matminer's ElementProperty magpie features "
        "over the mp_20_sample dataset (genuine MP-20 rows): the fixed composition scaler of DNG coverage",
        "features": featurizer.feature_labels(),
        "means": [float(v) for v in means],
        "stds": [float(v) for v in stds],
        "n_structures": len(structures),
        "source": {"dataset": "mp_20_sample",
                   "sha256": hashlib.sha256(source.read_bytes()).hexdigest() if source and source.is_file() else None},
        "versions": versions(),
        "command": " ".join(sys.argv),
    }
    write_json(OUT, record)
    print(f"wrote {OUT} ({len(means)} features over {len(structures)} structures)")


if __name__ == "__main__":
    main()
