"""CSP metrics (match rate, RMSE, cRMSE, METRe, validity, timeouts) and ``crystalign evaluate``, on real data."""

from __future__ import annotations

import csv
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import typer
from pymatgen.core import Lattice, Structure
from typer.testing import CliRunner

import crystalign.metrics as metrics
from crystalign.matching import make_matcher
from crystalign.metrics import SUMMARY_KEYS, CheckpointError, CSPMetrics, csp_metrics, structure_validity

pytestmark = pytest.mark.data

needs_fork = pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="needs the fork start method")


# ---------------------------------------------------------------------------------------------- helpers


def read_rows(path: Path, n: int, max_atoms: int | None = None) -> list[dict]:
    """The first ``n`` CSV rows (optionally only those with at most ``max_atoms`` atoms), as dicts."""
    csv.field_size_limit(sys.maxsize)
    rows = []
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            if max_atoms is not None and len(parse_cif(row["cif"])) > max_atoms:
                continue
            rows.append(row)
            if len(rows) == n:
                break
    return rows


def parse_cif(text: str) -> Structure:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Structure.from_str(text, fmt="cif", primitive=False)


def read_structures(path: Path, n: int, max_atoms: int | None = None) -> list[Structure]:
    return [parse_cif(r["cif"]) for r in read_rows(path, n, max_atoms)]


def perturb(s: Structure, rng: np.random.Generator, displacement: float = 0.01, strain: float = 0.005) -> Structure:
    """Every atom moved by ``displacement`` Å in a random direction, the cell strained by up to ``strain``."""
    e = rng.uniform(-strain, strain, (3, 3))
    lattice = s.lattice.matrix @ (np.eye(3) + (e + e.T) / 2)
    cart = s.frac_coords @ lattice
    step = rng.normal(size=cart.shape)
    step *= displacement / np.linalg.norm(step, axis=1, keepdims=True)
    return Structure(Lattice(lattice), s.species, cart + step, coords_are_cartesian=True)


@pytest.fixture(scope="module")
def mp20(mp20_sample_csv) -> list[Structure]:
    return read_structures(mp20_sample_csv, 24, max_atoms=12)


# ---------------------------------------------------------------------------------------------- metrics


def test_perturbed_copies_match_with_small_rmse(mp20):
    rng = np.random.default_rng(0)
    refs = mp20[:16]
    gen = [perturb(s, rng) for s in refs]
    result = csp_metrics(gen, refs, progress=False)
    assert result.match_rate == 1.0 and result.valid_rate == 1.0
    assert result.n == 16 and result.k == 1 and result.timeouts == 0 and result.errors == 0
    assert 0 < result.rmse < 0.02
    assert result.crmse == pytest.approx(result.rmse)
    assert result.metre_match_rate == 1.0 and result.metre_rmse == pytest.approx(result.rmse)


def test_shuffled_pairs_never_match(mp20):
    refs = mp20[:12]
    gen = refs[1:] + refs[:1]  # every pair now has two different compositions
    result = csp_metrics(gen, refs, progress=False)
    assert result.match_rate == 0.0
    assert result.rmse is None
    assert result.crmse == pytest.approx(0.5)
    assert not any(result.same_composition) and result.timeouts == 0


def test_degenerate_structures_are_invalid_not_fatal(mp20):
    ref = mp20[0]
    collapsed = Structure(Lattice(ref.lattice.matrix * np.array([[1.0], [1.0], [1e-5]])), ref.species, ref.frac_coords)
    flat = Structure(Lattice(np.array([[3.0, 0, 0], [0, 3.0, 0], [0, 0, 0.0]])), ref.species, ref.frac_coords)
    coords = ref.frac_coords.copy()
    coords[1] = coords[0] + 1e-3  # two atoms nearly on top of each other
    overlapping = Structure(ref.lattice, ref.species, coords)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        non_finite = Structure(Lattice(np.full((3, 3), np.nan)), ref.species, ref.frac_coords)
    generated = [ref.copy(), collapsed, flat, overlapping, non_finite, None]
    result = csp_metrics(generated, [ref], k=len(generated), progress=False)
    assert result.valid == [True, False, False, False, False, False]
    assert result.valid_rate == pytest.approx(1 / 6)
    assert result.matched == [True] + [False] * 5
    assert result.match_rate == pytest.approx(1 / 6) and result.metre_match_rate == 1.0
    assert structure_validity(generated) == result.valid


def test_metre_counts_a_reference_once_if_any_sample_matches(mp20):
    rng = np.random.default_rng(1)
    a, b, c = mp20[:3]
    generated = [
        b, c, perturb(a, rng),  # reference a: only the last sample is right
        a, c, a,  # reference b: no sample has its composition
        perturb(c, rng, 0.01), perturb(c, rng, 0.05), a,  # reference c: two matches, keep the best
    ]
    result = csp_metrics(generated, [a, b, c], k=3, progress=False)
    assert result.matched == [False, False, True, False, False, False, True, True, False]
    assert result.match_rate == pytest.approx(3 / 9)
    assert result.metre_match_rate == pytest.approx(2 / 3)
    assert result.best_rms[1] is None
    assert result.best_rms[2] == pytest.approx(min(result.rms[6], result.rms[7]))
    assert result.metre_rmse == pytest.approx((result.rms[2] + result.best_rms[2]) / 2)
    assert result.metre_crmse == pytest.approx((result.rms[2] + 0.5 + result.best_rms[2]) / 3)
    assert result.crmse == pytest.approx((sum(r for r in result.rms if r is not None) + 6 * 0.5) / 9)
    with pytest.raises(ValueError, match="expected k"):
        csp_metrics(generated[:8], [a, b, c], k=3, progress=False)


@pytest.mark.parametrize("n_workers", [2, 0])
def test_tiny_time_limit_counts_timeouts(mp20, n_workers):
    refs = mp20[:4]
    bad = refs[1:] + refs[:1]  # wrong compositions are never sent to the matcher, so never time out
    generated = [refs[0], bad[1], refs[2], refs[3]]
    result = csp_metrics(generated, refs, timeout=1e-6, n_workers=n_workers, progress=False)
    assert result.timeouts == 3 and result.timed_out_pairs == [0, 2, 3]
    assert result.match_rate == 0.0 and result.crmse == pytest.approx(0.5)
    assert result.to_dict()["timed_out_pairs"] == [0, 2, 3]


def _stuck_in_c(matcher, gen, ref):
    # SIGALRM blocked stands in for a long call inside compiled code that Python cannot interrupt
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    time.sleep(60)


def _dies(matcher, gen, ref):
    os._exit(3)


@needs_fork
def test_stuck_or_dying_workers_are_replaced_and_reported(mp20, monkeypatch):
    refs = mp20[:3]
    monkeypatch.setattr(metrics, "_HARD_GRACE_S", 0.3)
    monkeypatch.setattr(metrics, "_get_rms", _stuck_in_c)
    start = time.monotonic()
    result = csp_metrics(refs, refs, timeout=0.2, n_workers=2, progress=False)
    assert time.monotonic() - start < 10
    assert result.timeouts == 3 and result.timed_out == [True] * 3 and result.errors == 0
    monkeypatch.setattr(metrics, "_get_rms", _dies)
    result = csp_metrics(refs, refs, timeout=5, n_workers=2, progress=False)
    assert result.errors == 3 and result.match_rate == 0.0
    assert all("exit code 3" in e for e in result.error)


def test_summary_keys_exact(mp20):
    result = csp_metrics(mp20[:2], mp20[:2], progress=False)
    d = result.to_dict()
    assert tuple(d)[: len(SUMMARY_KEYS)] == ("match_rate", "rmse", "crmse", "valid_rate", "n", "timeouts")
    assert isinstance(d["n"], int) and isinstance(d["timeouts"], int)
    json.dumps(result.to_dict(details=True), allow_nan=False)
    assert isinstance(result, CSPMetrics) and "match rate" in result.summary()


def test_agrees_with_a_plain_structure_matcher_loop(mp20, carbon_val_csv):
    """Same matches and RMS as a sequential StructureMatcher loop, on 20 real pairs with hits and misses."""
    rng = np.random.default_rng(2)
    carbon = read_structures(carbon_val_csv, 9, max_atoms=8)
    gen = [perturb(s, rng, d, 0.02) for s, d in zip(mp20[:12], np.linspace(0.02, 0.6, 12))] + carbon[1:9]
    refs = mp20[:12] + carbon[0:8]  # carbon vs carbon: same composition, mostly different structures
    result = csp_metrics(gen, refs, progress=False)
    matcher = make_matcher()
    expected = []
    for g, r in zip(gen, refs):
        out = matcher.get_rms_dist(g, r)
        expected.append(None if out is None else out[0])
    assert result.matched == [e is not None for e in expected]
    assert 0 < sum(result.matched) < 20
    for got, want in zip(result.rms, expected):
        assert (got is None and want is None) or got == pytest.approx(want, rel=1e-9)


# ---------------------------------------------------------------------------------------------- CLI


@pytest.fixture
def runner_app() -> typer.Typer:
    from crystalign.cli.evaluate import register

    app = typer.Typer()

    @app.callback()
    def _root() -> None:  # keeps "evaluate" a subcommand, as in the real CLI
        pass

    register(app)
    return app


def _write_reference_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_cli_end_to_end_on_real_perovskites(perov_val_csv, tmp_path, runner_app):
    rows = read_rows(perov_val_csv, 6)
    ref_csv = tmp_path / "ref.csv"
    _write_reference_csv(ref_csv, rows)
    gen_dir = tmp_path / "gen"
    gen_dir.mkdir()
    for i, row in enumerate(rows):
        (gen_dir / f"{i:06d}.cif").write_text(row["cif"])
    (gen_dir / "000005.cif").write_text("not a CIF")  # unreadable: counted invalid, not fatal
    out = tmp_path / "metrics.json"
    runner = CliRunner()
    res = runner.invoke(runner_app, ["evaluate", str(gen_dir), "--reference", str(ref_csv), "--json", "--out", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert tuple(d)[:6] == SUMMARY_KEYS
    assert d["n"] == 6 and d["match_rate"] == pytest.approx(5 / 6) and d["valid_rate"] == pytest.approx(5 / 6)
    assert d["rmse"] == pytest.approx(0.0, abs=1e-6) and d["timeouts"] == 0
    saved = json.loads(out.read_text())
    assert len(saved["pairs"]) == 6 and saved["pairs"][5]["valid"] is False
    assert saved["provenance"]["reference"] == str(ref_csv) and "pymatgen" in saved["provenance"]["versions"]

    res = runner.invoke(runner_app, ["evaluate", str(gen_dir), "-r", str(ref_csv), "--no-progress"])
    assert res.exit_code == 0 and "match rate" in res.stdout and "83.33 %" in res.stdout


def test_cli_orders_by_index_json_and_refuses_unpadded_names(perov_val_csv, tmp_path, runner_app):
    rows = read_rows(perov_val_csv, 3)
    ref_csv = tmp_path / "ref.csv"
    _write_reference_csv(ref_csv, rows)
    gen_dir = tmp_path / "gen"
    gen_dir.mkdir()
    names = ["b.cif", "c.cif", "a.cif"]  # lexicographic order is a rotation of the pairing order
    for name, row in zip(names, rows):
        (gen_dir / name).write_text(row["cif"])
    runner = CliRunner()
    args = ["evaluate", str(gen_dir), "-r", str(ref_csv), "--json", "--no-progress"]
    assert json.loads(runner.invoke(runner_app, args).stdout)["match_rate"] == 0.0
    (gen_dir / "index.json").write_text(json.dumps(names))
    assert json.loads(runner.invoke(runner_app, args).stdout)["match_rate"] == 1.0

    bad = tmp_path / "unpadded"
    bad.mkdir()
    for i, row in zip([1, 2, 10], rows):
        (bad / f"{i}.cif").write_text(row["cif"])
    res = runner.invoke(runner_app, ["evaluate", str(bad), "-r", str(ref_csv)])
    assert res.exit_code != 0 and "zero-padded" in res.output


def test_cli_extxyz_with_a_collapsed_sample(perov_val_csv, tmp_path, runner_app):
    from ase.io import write
    from pymatgen.io.ase import AseAtomsAdaptor

    rows = read_rows(perov_val_csv, 2)
    refs = [parse_cif(r["cif"]) for r in rows]
    atoms = [AseAtomsAdaptor.get_atoms(s) for s in refs for _ in range(2)]
    atoms[1].cell[2] = 0.0  # sample 1 of reference 0 collapsed to a plane
    xyz = tmp_path / "gen.extxyz"
    write(xyz, atoms, format="extxyz")
    ref_csv = tmp_path / "ref.csv"
    _write_reference_csv(ref_csv, rows)
    res = CliRunner().invoke(runner_app, ["evaluate", str(xyz), "-r", str(ref_csv), "-k", "2", "--json", "--no-progress", "--workers", "0"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["k"] == 2 and d["n"] == 4 and d["n_references"] == 2
    assert d["valid_rate"] == pytest.approx(3 / 4) and d["match_rate"] == pytest.approx(3 / 4)
    assert d["metre_match_rate"] == 1.0


def test_cli_help_shows_an_example(runner_app):
    res = CliRunner().invoke(runner_app, ["evaluate", "--help"])
    assert res.exit_code == 0
    assert "Example" in res.output and "--reference" in res.output and "index.json" in res.output


# ---------------------------------------------------------------------------------------------- resume

N_QUICK = 12  # pairs of the resume case before its two slow ones
SLOW_TIMEOUT_S = 1.0  # the slow pairs run into it (they need 5-6 s), the quick ones take under 0.1 s


@dataclass
class ResumeCase:
    gen_dir: Path
    ref_dir: Path
    gen: list
    ref: list
    baseline: CSPMetrics  # the uninterrupted run


def _write_cif_folder(folder: Path, structures: list[Structure]) -> None:
    folder.mkdir()
    for i, s in enumerate(structures):
        (folder / f"{i:06d}.cif").write_text(s.to(fmt="cif"))


def checkpoint_records(path: Path) -> list[dict]:
    """The complete pair lines of a checkpoint: not the header, not a torn last line."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_bytes().split(b"\n")[1:-1]]


@pytest.fixture(scope="module")
def resume_case(mp20, carbon_val_csv, tmp_path_factory) -> ResumeCase:
    """18 real pairs as CIF folders: 12 quick ones (matches and misses), two 216-atom pairs that run into the
    1 s limit (a window in which to interrupt), 4 quick ones; and the metrics of an uninterrupted run."""
    from crystalign.cli.evaluate import load_structures

    rng = np.random.default_rng(3)
    carbon = read_structures(carbon_val_csv, 10)
    big = next(s for s in carbon if len(s) == 12).copy()
    big.make_supercell([3, 3, 2])  # 216 atoms, each moved 0.2 Å: matching takes 5-6 s, far over the 1 s limit
    slow = [perturb(big, rng, 0.2, 0.0) for _ in range(2)]
    refs = mp20[:8] + carbon[:4] + slow + mp20[8:12]
    gen = (
        [perturb(s, rng, 0.05) for s in mp20[:8]] + carbon[1:5]  # same composition C, other polymorphs
        + [perturb(s, rng, 0.2, 0.0) for s in slow]
        + [perturb(s, rng, 0.05) for s in mp20[8:12]]
    )
    root = tmp_path_factory.mktemp("resume")
    _write_cif_folder(root / "gen", gen)
    _write_cif_folder(root / "ref", refs)
    gen_read, _ = load_structures(root / "gen", tolerate_unreadable=True)
    ref_read, _ = load_structures(root / "ref")
    baseline = csp_metrics(gen_read, ref_read, timeout=SLOW_TIMEOUT_S, n_workers=1, progress=False)
    assert baseline.timed_out_pairs == [12, 13] and all(baseline.same_composition) and baseline.errors == 0, baseline.summary()
    assert 8 <= sum(baseline.matched) < 16
    return ResumeCase(root / "gen", root / "ref", gen_read, ref_read, baseline)


def test_interrupted_run_resumes_to_the_same_metrics_matching_only_the_rest(resume_case, tmp_path):
    """A real SIGINT part-way through in-process matching; the resumed run (worker pool) reuses every saved pair."""
    ck = tmp_path / "pairs.jsonl"

    def interrupt_in_the_slow_pairs() -> None:
        deadline = time.monotonic() + 60
        while len(checkpoint_records(ck)) < N_QUICK and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C as in a terminal
    try:
        watcher = threading.Thread(target=interrupt_in_the_slow_pairs, daemon=True)
        watcher.start()
        with pytest.raises(KeyboardInterrupt):
            csp_metrics(resume_case.gen, resume_case.ref, timeout=SLOW_TIMEOUT_S, n_workers=0, progress=False, checkpoint=ck)
        watcher.join()
    finally:
        signal.signal(signal.SIGINT, previous)
    saved = checkpoint_records(ck)
    assert N_QUICK <= len(saved) < 18
    assert [r["pair"] for r in saved] == list(range(len(saved)))

    result = csp_metrics(resume_case.gen, resume_case.ref, timeout=SLOW_TIMEOUT_S, n_workers=1, progress=False, checkpoint=ck)
    assert result.to_dict(details=True) == resume_case.baseline.to_dict(details=True)
    assert result.resumed_pairs == len(saved)
    records = checkpoint_records(ck)
    assert records[: len(saved)] == saved  # kept as they were
    assert sorted(r["pair"] for r in records) == list(range(18))  # every pair matched once over both runs
    assert [r["pair"] for r in records if r["status"] == "timeout"] == [12, 13]
    # a finished checkpoint: a third run matches nothing (timeouts stay timeouts until the file is deleted)
    again = csp_metrics(resume_case.gen, resume_case.ref, timeout=SLOW_TIMEOUT_S, n_workers=1, progress=False, checkpoint=ck)
    assert again.resumed_pairs == 18 and again.to_dict(details=True) == result.to_dict(details=True)
    assert checkpoint_records(ck) == records


def test_cli_ctrl_c_then_resume_gives_the_uninterrupted_metrics(resume_case, tmp_path, runner_app):
    out = tmp_path / "metrics.json"
    sidecar = tmp_path / ".metrics.json.partial.jsonl"
    args = [
        "evaluate", str(resume_case.gen_dir), "-r", str(resume_case.ref_dir), "--out", str(out),
        "--timeout", str(SLOW_TIMEOUT_S), "--workers", "1", "--no-progress", "--json",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "crystalign.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 120
    while len(checkpoint_records(sidecar)) < N_QUICK and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == 130, output
    assert "Traceback" not in output and str(sidecar) in output and "--resume" in output
    assert len(output.strip().splitlines()) == 1  # one line
    saved = checkpoint_records(sidecar)
    assert N_QUICK <= len(saved) < 18 and not out.exists()

    runner = CliRunner()
    res = runner.invoke(runner_app, args)  # without --resume the sidecar is neither reused nor overwritten
    assert res.exit_code == 2 and "--resume" in res.stderr and str(sidecar) in res.stderr
    assert checkpoint_records(sidecar) == saved

    res = runner.invoke(runner_app, args + ["--resume"])
    assert res.exit_code == 0, res.output
    assert f"resumed: {len(saved)} pair(s)" in res.stderr
    expected = json.loads(json.dumps(resume_case.baseline.to_dict(details=True)))
    written = json.loads(out.read_text())
    assert "versions" in written.pop("provenance")  # how it was run; the metrics themselves are the baseline's
    assert written == expected
    assert json.loads(res.stdout) == json.loads(json.dumps(resume_case.baseline.to_dict()))
    assert not sidecar.exists()  # the evaluation is complete: nothing left to resume


def test_a_torn_last_line_is_dropped(mp20, tmp_path):
    rng = np.random.default_rng(4)
    refs = mp20[:8]
    # 6 close copies, one far off (same composition), one of another composition (never matched)
    gen = [perturb(s, rng) for s in refs[:6]] + [perturb(refs[6], rng, 0.4), refs[6]]
    ck = tmp_path / "pairs.jsonl"
    full = csp_metrics(gen, refs, n_workers=0, progress=False, checkpoint=ck)
    lines = ck.read_bytes().split(b"\n")
    ck.write_bytes(b"\n".join(lines[:4]) + b"\n" + lines[4][: len(lines[4]) // 2])  # header, 3 pairs, half a line
    resumed = csp_metrics(gen, refs, n_workers=0, progress=False, checkpoint=ck)
    assert resumed.resumed_pairs == 3
    assert resumed.to_dict(details=True) == full.to_dict(details=True)
    records = checkpoint_records(ck)  # the fragment was cut off, not glued to the next line
    assert ck.read_bytes().endswith(b"\n") and len(records) == len(set(r["pair"] for r in records)) == 7

    lines = ck.read_bytes().split(b"\n")
    ck.write_bytes(b"\n".join([lines[0], b"{not json", *lines[2:]]))  # damage inside is not a torn line
    with pytest.raises(CheckpointError, match=rf"{ck}, line 2"):
        csp_metrics(gen, refs, n_workers=0, progress=False, checkpoint=ck)


def test_a_checkpoint_of_other_inputs_is_refused(perov_val_csv, mp20, tmp_path, runner_app):
    rows = read_rows(perov_val_csv, 6)
    ref_csv, other_csv = tmp_path / "ref.csv", tmp_path / "other.csv"
    _write_reference_csv(ref_csv, rows)
    _write_reference_csv(other_csv, rows[1:] + rows[:1])
    gen_dir = tmp_path / "gen"
    gen_dir.mkdir()
    for i, row in enumerate(rows):
        (gen_dir / f"{i:06d}.cif").write_text(row["cif"])
    out = tmp_path / "metrics.json"
    sidecar = tmp_path / ".metrics.json.partial.jsonl"
    from crystalign.cli.evaluate import checkpoint_path, load_structures

    assert checkpoint_path(out) == sidecar
    gen, _ = load_structures(gen_dir, tolerate_unreadable=True)
    ref, _ = load_structures(ref_csv)
    other, _ = load_structures(other_csv)
    runner = CliRunner()
    args = ["evaluate", str(gen_dir), "--out", str(out), "--resume", "--no-progress", "--workers", "0"]
    for made_with, differs in [
        (dict(references=other), "the reference structures"),
        (dict(references=ref, matcher_kwargs={"stol": 0.3}), "the matcher tolerances"),
        (dict(references=ref, timeout=5.0), "the per-pair timeout"),
    ]:
        sidecar.unlink(missing_ok=True)
        csp_metrics(gen, n_workers=0, progress=False, checkpoint=sidecar, **made_with)
        before = sidecar.read_bytes()
        res = runner.invoke(runner_app, [*args, "-r", str(ref_csv)])
        assert res.exit_code == 2, res.output
        assert str(sidecar) in res.stderr and differs in res.stderr and "delete it" in res.stderr
        assert sidecar.read_bytes() == before and not out.exists()  # never mixed into, never overwritten
    with pytest.raises(CheckpointError, match="the generated structures"):
        csp_metrics(mp20[:6], ref, n_workers=0, progress=False, checkpoint=sidecar, timeout=5.0)
    sidecar.unlink()
    res = runner.invoke(runner_app, [*args, "-r", str(ref_csv)])  # --resume with nothing to resume: a fresh run
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text())["match_rate"] == 1.0 and not sidecar.exists()


def test_cli_resume_needs_out_and_an_existing_checkpoint_needs_resume(perov_val_csv, tmp_path, runner_app):
    rows = read_rows(perov_val_csv, 2)
    ref_csv = tmp_path / "ref.csv"
    _write_reference_csv(ref_csv, rows)
    runner = CliRunner()
    res = runner.invoke(runner_app, ["evaluate", str(ref_csv), "-r", str(ref_csv), "--resume"])
    assert res.exit_code == 2 and "--resume needs --out" in res.stderr

    out = tmp_path / "metrics.json"
    sidecar = tmp_path / ".metrics.json.partial.jsonl"
    sidecar.write_text("left by an interrupted run\n")
    res = runner.invoke(runner_app, ["evaluate", str(ref_csv), "-r", str(ref_csv), "--out", str(out)])
    assert res.exit_code == 2 and str(sidecar) in res.stderr
    assert "pass --resume" in res.stderr and "delete the file" in res.stderr
    assert sidecar.read_text() == "left by an interrupted run\n" and not out.exists()
    res = runner.invoke(runner_app, ["evaluate", str(ref_csv), "-r", str(ref_csv), "--out", str(out), "--resume"])
    assert res.exit_code == 2 and "not a csp_metrics checkpoint" in res.stderr and str(sidecar) in res.stderr


def test_cli_reference_by_dataset_name(data_root, tmp_path, runner_app):
    """`-r NAME` reads a named dataset through the data root, as `sample --compositions-from NAME` does."""
    from crystalign.data import load_dataset

    ref = load_dataset("perov_5_train_subset", data_root=data_root)
    gen_dir = tmp_path / "gen"
    gen_dir.mkdir()
    for i, s in enumerate(ref.batch[:116].to_structures()):
        (gen_dir / f"{i:06d}.cif").write_text(s.to(fmt="cif"))
    res = CliRunner().invoke(runner_app, [
        "evaluate", str(gen_dir), "-r", "perov_5_train_subset", "--data-root", str(data_root), "--json", "--no-progress", "--workers", "0",
    ])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["match_rate"] == pytest.approx(1.0)
    res = CliRunner().invoke(runner_app, ["evaluate", str(gen_dir), "-r", "perov_55", "--no-progress"])
    flat = "".join(c for c in res.output if c not in "│ \n")  # the usage-error box wraps the message
    assert res.exit_code != 0 and "Didyoumeanperov_5" in flat
