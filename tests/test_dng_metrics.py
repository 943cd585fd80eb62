"""DNG metrics (crystalign.dng_metrics) and `crystalign evaluate --dng`, on real perov_5 structures from the data root.

CrystalNN fingerprints cost ~80 ms per perov_5 structure, so coverage is computed on a few dozen structures only.
"""

from __future__ import annotations

import json
import numpy as np
import pytest
from typer.testing import CliRunner

from crystalign import dng_metrics as dm
from crystalign.dng_metrics import cdvae_cutoffs, dng_metrics, smact_validity


@pytest.fixture(scope="module")
def perov(perov_val_csv):
    from crystalign.data import read_structures

    structures = read_structures(perov_val_csv).batch.to_structures()
    # distinct reduced compositions, so index-based expectations (duplicates, novelty) are unambiguous
    seen, out = set(), []
    for s in structures:
        key = s.composition.reduced_formula
        if key not in seen:
            seen.add(key)
            out.append(s)
        if len(out) == 60:
            break
    return out


def _perturbed(s, rng):
    t = s.copy()
    t.apply_strain(rng.uniform(0.25, 0.4, 3))  # anisotropic strain
    for i in range(len(t)):
        t.translate_sites([i], rng.normal(0, 0.6, 3), frac_coords=False, to_unit_cell=True)
    return t


# ---------------------------------------------------------------------------------------------- identity


def test_a_set_against_itself_is_perfect(perov):
    ref = perov[:40]
    r = dng_metrics(ref, ref, ref, dataset="perov_5")
    assert r.struct_valid == r.comp_valid == r.valid == 1.0 and r.n_valid == 40
    assert r.cov_recall == r.cov_precision == 1.0
    assert r.cov_recall_valid == r.cov_precision_valid == 1.0
    assert r.cov_recall_struct == r.cov_recall_comp == r.cov_precision_struct == r.cov_precision_comp == 1.0
    assert r.amsd_recall == pytest.approx(0.0, abs=1e-9) and r.amcd_precision == pytest.approx(0.0, abs=1e-9)
    assert r.cov_thresholds == (0.2, 4.0) and r.n_reference_coverage == 40 and r.coverage_note is None
    assert r.wdist_density == r.wdist_num_atoms == r.wdist_num_elems == 0.0
    assert r.uniqueness == 1.0 and r.novelty == 0.0 and r.n_novel == 0
    assert r.stable_rate is None and r.sun_rate is None  # no energies given
    d = r.to_dict()
    assert list(d) == list(dm.DNGMetrics._KEYS)
    json.dumps(d)
    # every JSON key is documented in the module docstring
    doc = dm.__doc__
    assert all(f"``{key}``" in doc for key in d), [k for k in d if f"``{k}``" not in doc]
    assert "COV-R" in r.summary() and "novelty" in r.summary()


def test_perturbed_structures_lower_coverage(perov):
    ref = perov[:30]
    rng = np.random.default_rng(0)
    moved = [_perturbed(s, rng) for s in ref]
    r = dng_metrics(moved, ref, thresholds=(0.2, 4.0))
    assert r.cov_recall < 0.7 and r.cov_precision < 0.7, (r.cov_recall, r.cov_precision)
    assert r.amsd_recall > 0.1
    # composition untouched: its distances stay zero; the density distribution moved away
    assert r.amcd_recall == pytest.approx(0.0, abs=1e-9)
    # so the per-cutoff breakdown puts the whole shortfall on the structure fingerprint
    assert r.cov_recall_comp == r.cov_precision_comp == 1.0
    assert (r.cov_recall_struct, r.cov_precision_struct) == (r.cov_recall, r.cov_precision)
    assert r.wdist_density > 0.5 and r.wdist_num_atoms == 0.0


# ---------------------------------------------------------------------------------------------- validity


def test_duplicates_halve_uniqueness(perov):
    base = perov[:20]
    r = dng_metrics(base + [s.copy() for s in base], base)  # no cutoffs: coverage skipped, with the reason
    assert r.uniqueness == 0.5 and r.n_unique == 20
    assert r.unique_flags == [True] * 20 + [False] * 20
    assert r.cov_recall is None and "no cutoffs" in r.coverage_note
    assert r.novelty is None  # no training set


def test_close_atoms_and_unreadable_entries_are_structurally_invalid(perov):
    s = perov[0].copy()
    s.append(s[0].specie, s[0].coords + np.array([0.1, 0.0, 0.0]), coords_are_cartesian=True)
    r = dng_metrics([perov[1], s, None], perov[:5])
    assert r.struct_valid_flags == [True, False, False]
    assert r.n_valid == 1 and r.valid == pytest.approx(1 / 3)
    assert r.comp_valid_flags[2] is False  # None fails every test


def test_smact_validity_follows_cdvae():
    assert smact_validity("NaCl") and smact_validity("SrTiO3") and smact_validity("Fe2O3")
    assert not smact_validity("NaCl2") and not smact_validity("Na3Cl") and not smact_validity("NaO2")
    assert smact_validity("C") and smact_validity("Si4")  # single elements
    assert smact_validity("CuAu3")  # all-metal alloy
    assert smact_validity("NaCl", oxidation_states="icsd24") and not smact_validity("NaCl2", oxidation_states="icsd24")
    assert smact_validity({"Na": 2, "Cl": 2})  # gcd-reduced, as CDVAE
    assert not smact_validity({"Na": 0.5, "Cl": 0.5})  # disorder: not integer counts
    # CDVAE's Pauling test: a missing electronegativity passes (smact 4's own test fails it)
    assert dm._pauling_ok((1, -1), (None, 3.0))
    assert not dm._pauling_ok((1, -1), (3.0, 0.9))


def test_charge_imbalanced_structure_is_compositionally_invalid():
    from pymatgen.core import Lattice, Structure

    nacl = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    nacl2 = nacl.copy()
    nacl2.append("Cl", [0.25, 0.25, 0.25])
    nacl2.append("Cl", [0.75, 0.75, 0.75])  # Na4Cl6 = Na2Cl3: no single oxidation state of Cl balances it
    assert nacl2.composition.reduced_formula == "Na2Cl3"
    r = dng_metrics([nacl, nacl2], [nacl])
    assert r.comp_valid_flags == [True, False] and r.struct_valid_flags == [True, True]
    assert r.valid == 0.5


# ---------------------------------------------------------------------------------------------- coverage edge cases


def test_coverage_without_valid_structures_is_null_with_a_reason(perov):
    r = dng_metrics([None, None], perov[:3], dataset="perov_5")
    assert r.valid == 0.0 and r.cov_recall is None and r.cov_precision is None
    assert "no valid generated structure" in r.coverage_note
    assert r.wdist_density is None and r.uniqueness is None
    json.dumps(r.to_dict(details=True))


def test_coverage_against_a_reference_without_shared_elements_says_so(perov):
    from pymatgen.core import Lattice, Structure

    cu = Structure.from_spacegroup("Fm-3m", Lattice.cubic(3.61), ["Cu"], [[0, 0, 0]])
    gen = [s for s in perov[:10] if "Cu" not in {e.symbol for e in s.composition.elements}][:3]
    r = dng_metrics(gen, [cu], thresholds=(0.2, 4.0))
    assert r.cov_recall is not None  # computed, but flagged
    assert "no reference structure contains any element" in r.coverage_note


def test_cutoffs_and_inputs_are_checked(perov):
    assert cdvae_cutoffs("mp20") == (0.4, 10.0) and cdvae_cutoffs("perov_5:test") == (0.2, 4.0)
    assert cdvae_cutoffs("carbon") == (0.2, 4.0)
    with pytest.raises(ValueError, match="no CDVAE coverage cutoffs"):
        cdvae_cutoffs("mpts_52")
    with pytest.raises(ValueError, match="e_above_hull"):
        dng_metrics(perov[:2], perov[:2], e_above_hull=[0.0])
    with pytest.raises(ValueError, match="cutoffs must be positive"):
        dng_metrics(perov[:2], perov[:2], thresholds=(0.2, -1))
    with pytest.raises(ValueError, match="no reference"):
        dng_metrics(perov[:2], [])
    with pytest.raises(ValueError, match="oxidation_states"):
        dng_metrics(perov[:2], perov[:2], oxidation_states="bogus")


def test_reference_fingerprints_are_cached_on_disk(perov, tmp_path):
    cache = tmp_path / "fp.npz"
    first = dng_metrics(perov[:3], perov[3:8], thresholds=(0.2, 4.0), fingerprint_cache=cache)
    assert cache.exists()
    stamp = cache.stat().st_mtime_ns
    again = dng_metrics(perov[:3], perov[3:8], thresholds=(0.2, 4.0), fingerprint_cache=cache)
    assert cache.stat().st_mtime_ns == stamp and again.to_dict() == first.to_dict()
    dng_metrics(perov[:3], perov[3:9], thresholds=(0.2, 4.0), fingerprint_cache=cache)  # other references
    assert cache.stat().st_mtime_ns != stamp


# ---------------------------------------------------------------------------------------------- stability, S.U.N.


def test_sun_arithmetic_by_hand(perov):
    a, b, c, d = perov[:4]
    gen = [a, a.copy(), b, c, None, d]
    e_hull = [0.0, 0.0, 0.05, -0.1, None, 0.2]
    r = dng_metrics(gen, perov[:4], training=[c, perov[10]], e_above_hull=e_hull)
    # valid: a, a', b, c, d; unique: a, b, c, d; novel: a, b, d (c is in training)
    assert r.n_valid == 5 and r.n_unique == 4 and r.uniqueness == 0.8
    assert r.n_novel == 3 and r.novelty == 0.75
    assert r.novel_flags == [True, None, True, False, None, True]
    assert r.stable_rate == pytest.approx(3 / 6)  # a, a', c (<= 0)
    assert r.metastable_rate == pytest.approx(4 / 6)  # and b (<= 0.1)
    assert r.n_e_above_hull == 5
    assert r.e_above_hull_mean == pytest.approx(0.03) and r.e_above_hull_median == pytest.approx(0.0)
    assert r.sun_flags == [True, False, False, False, False, False] and r.sun_rate == pytest.approx(1 / 6)
    assert r.n_msun == 2 and r.msun_rate == pytest.approx(2 / 6)  # a and b
    # a looser threshold makes b stable too; without a training set there is no S.U.N.
    assert dng_metrics(gen, perov[:4], training=[c], e_above_hull=e_hull, stable_threshold=0.1).n_sun == 2
    plain = dng_metrics(gen, perov[:4], e_above_hull=e_hull)
    assert plain.stable_rate == pytest.approx(0.5) and plain.sun_rate is None and plain.n_sun is None
    rec = r.to_dict(details=True)["structures"]
    assert rec[3] == {"index": 3, "struct_valid": True, "comp_valid": True, "unique": True, "novel": False,
                      "e_above_hull": -0.1, "sun": False}


def test_energies_above_hull_reuse_the_hull_reward():
    from ase.calculators.emt import EMT
    from pymatgen.core import Lattice, Structure

    from crystalign.dng_metrics import energies_above_hull
    from crystalign.rewards.hull import build_hull
    from crystalign.rewards.mlip import ASECalculatorBackend

    backend = ASECalculatorBackend(EMT(), name="emt", model="ase-emt")
    cu = Structure.from_spacegroup("Fm-3m", Lattice.cubic(3.61), ["Cu"], [[0, 0, 0]])
    hull = build_hull([cu], backend, add_elements=False)
    stretched = Structure.from_spacegroup("Fm-3m", Lattice.cubic(3.9), ["Cu"], [[0, 0, 0]])
    e = energies_above_hull([cu, stretched, None], hull, backend=backend)
    assert e[0] == pytest.approx(0.0, abs=1e-6) and e[1] > 0.01 and e[2] is None


# ---------------------------------------------------------------------------------------------- CLI


def _cif_folder(structures, folder):
    folder.mkdir()
    for i, s in enumerate(structures):
        s.to(filename=str(folder / f"{i:06d}.cif"))
    return folder


def test_cli_dng_writes_the_documented_json(perov, tmp_path):
    from crystalign.cli import app

    gen = _cif_folder(perov[:8], tmp_path / "gen")
    ref = _cif_folder(perov[:8], tmp_path / "ref")
    out = tmp_path / "dng.json"
    res = CliRunner().invoke(app, ["evaluate", str(gen), "--dng", "-r", str(ref), "--training", str(ref),
                                   "--cov-cutoffs", "0.2,4", "--no-progress", "--json", "--out", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert list(data)[: len(dm.DNGMetrics._KEYS)] == list(dm.DNGMetrics._KEYS)
    assert data["valid"] == 1.0 and data["cov_recall"] == 1.0 and data["novelty"] == 0.0
    assert data["cov_thresholds"] == {"struct": 0.2, "comp": 4.0}
    assert len(data["structures"]) == 8 and data["structures"][0]["novel"] is False
    prov = data["provenance"]
    assert prov["training"] == str(ref) and prov["cov_cutoffs_from"] == "--cov-cutoffs" and "versions" in prov
    printed = json.loads(res.stdout[res.stdout.index("{"):])
    assert printed["n_generated"] == 8 and "structures" not in printed


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["-k", "2"], "error: -k does not apply to --dng"),
        (["--metre", "samples"], "error: --metre does not apply to --dng"),
        (["--cov-cutoffs", "0.2"], "error: --cov-cutoffs must be two positive numbers"),
    ],
)
def test_cli_dng_refuses_pairing_options_in_one_line(tmp_path, extra, needle):
    from crystalign.cli import app

    res = CliRunner().invoke(app, ["evaluate", str(tmp_path), "--dng", "-r", "x.csv", *extra])
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(needle), res.output


def test_cli_refuses_dng_options_without_dng(tmp_path):
    from crystalign.cli import app

    res = CliRunner().invoke(app, ["evaluate", str(tmp_path), "-r", "x.csv", "--hull", "h.json"])
    assert res.exit_code == 2 and res.output.strip() == "error: --hull applies to --dng only"


def test_cli_dataset_reference_names_its_split_and_cutoffs(data_root):
    from crystalign.cli.evaluate import _dataset_of, load_structures

    assert _dataset_of("perov_5") == "perov_5" and _dataset_of("mp_20:test") == "mp_20"
    assert _dataset_of(str(data_root / "perov_5" / "val.csv")) == "perov_5"
    assert _dataset_of("somewhere/else.csv") is None
    structures, _ = load_structures("perov_5:val", data_root=data_root)
    assert len(structures) == 3787


def test_broad_composition_scaler_is_the_default_and_closer_than_the_reference_own(perov):
    """CDVAE scales composition features by fixed constants over a broad chemistry; scaling by a narrow reference
    set (perov_5: ABX3 only) inflates every composition distance and so lowers coverage."""
    gen, ref = perov[:20], perov[20:60]
    default = dng_metrics(gen, ref, dataset="perov_5")
    broad = dng_metrics(gen, ref, dataset="perov_5", comp_scaler=dm.broad_comp_scaler())
    own = dng_metrics(gen, ref, dataset="perov_5", comp_scaler="reference")
    assert default.amcd_recall == pytest.approx(broad.amcd_recall)
    assert broad.amcd_recall < own.amcd_recall and broad.cov_recall >= own.cov_recall
    means, stds = dm.broad_comp_scaler()
    assert len(means) == len(stds) == 132 and all(s >= 0 for s in stds) and sum(s > 0 for s in stds) > 100
    with pytest.raises(ValueError, match="comp_scaler must be"):
        dng_metrics(gen[:2], ref[:2], dataset="perov_5", comp_scaler="narrow")


def test_cli_dng_report_lists_every_crystal_with_its_verdicts(perov, tmp_path):
    from crystalign.cli import app

    gen_structures = perov[:6] + [_perturbed(perov[6], np.random.default_rng(0))]
    gen = _cif_folder(gen_structures, tmp_path / "gen")
    ref = _cif_folder(perov[:20], tmp_path / "ref")
    report = tmp_path / "report.html"
    res = CliRunner().invoke(app, ["evaluate", str(gen), "--dng", "-r", str(ref), "--training", str(ref),
                                   "--cov-cutoffs", "0.2,4", "--no-progress", "--report", str(report)])
    assert res.exit_code == 0, res.output
    page = report.read_text()
    assert page.count("<tr class=") == 7  # one row per crystal
    for s in gen_structures:
        assert s.composition.reduced_formula in page
    assert "data:image/png;base64," in page and "cov_recall" in page and "Provenance" in page
    bad = CliRunner().invoke(app, ["evaluate", str(gen), "-r", str(ref), "--report", str(report)])
    assert bad.exit_code != 0 and "--report applies to --dng only" in bad.output


def test_generate_report_scores_the_new_crystals_against_the_reference(perov, tmp_path):
    from crystalign.cli import app
    from crystalign.cli.denovo import training_data_of

    ref = _cif_folder(perov[:20], tmp_path / "ref")
    out = tmp_path / "gen"
    res = CliRunner().invoke(app, ["generate", "--model", "perov_5_dng", "-n", "4", "--steps", "6", "--out", str(out),
                                   "--report", "-r", str(ref)])
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_generated"] == 4 and 0 <= metrics["valid"] <= 1 and metrics["provenance"]["reference"] == str(ref)
    assert (out / "report.html").read_text().count("<tr class=") == 4  # one row per generated crystal
    # without -r the report compares with the model's own training data
    assert training_data_of("perov_5_dng") == "perov_5:val"
    bad = CliRunner().invoke(app, ["generate", "--model", "perov_5_dng", "-n", "4", "--out", str(tmp_path / "b"), "--hull", "h.json"])
    assert bad.exit_code != 0 and bad.output.strip() == "error: --reference and --hull apply to --report"
