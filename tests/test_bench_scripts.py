"""Every benchmark script still imports against the current package (a renamed function once broke one
silently): each is loaded as a module, without running its benchmark, and its --help parses."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPTS = sorted(BENCH.glob("*.py"))


def test_there_are_benchmark_scripts():
    assert len(SCRIPTS) >= 5, SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_benchmark_script_imports_and_parses_help(script, monkeypatch, capsys):
    if script.stem == "mlip":
        pytest.importorskip("sevenn", reason="bench/mlip.py needs the sevenn extra")
    monkeypatch.syspath_prepend(str(BENCH))  # as `python bench/X.py` runs it: siblings import each other
    module = runpy.run_path(str(script), run_name="bench_import_check")  # imports only: main() is guarded
    assert callable(module.get("main")), f"{script.name} has no main()"
    monkeypatch.setattr(sys, "argv", [script.name, "--help"])
    with pytest.raises(SystemExit) as done:
        module["main"]()
    assert done.value.code == 0 and "usage:" in capsys.readouterr().out
    for name in [n for n, m in sys.modules.items() if str(getattr(m, "__file__", "")).startswith(str(BENCH))]:
        del sys.modules[name]  # sibling scripts imported as top-level modules ("rl", "sample") go again


def test_best_of_k_vote_picks_the_lowest_energy_member_of_the_largest_matching_group(perov_val_csv, monkeypatch):
    """Two copies of one perov_5 crystal (one slightly displaced) outvote a different crystal of lower energy, and
    of the two copies the lower-energy one is chosen."""
    import numpy as np

    from crystalign.data import read_structures
    from crystalign.matching import make_matcher

    monkeypatch.syspath_prepend(str(BENCH))
    vote = runpy.run_path(str(BENCH / "best_of_k.py"), run_name="bench_import_check")["vote"]
    a, b = read_structures(perov_val_csv).batch.to_structures()[:2]
    assert not make_matcher().fit(a, b)
    a2 = a.copy()
    a2.perturb(0.05, min_distance=0.05)
    assert vote([a, b, a2], np.array([-5.0, -9.0, -5.5]), make_matcher()) == 2
    assert vote([a, b, a2], np.array([-5.5, -9.0, -5.0]), make_matcher()) == 0
    for name in [n for n, m in sys.modules.items() if str(getattr(m, "__file__", "")).startswith(str(BENCH))]:
        del sys.modules[name]
