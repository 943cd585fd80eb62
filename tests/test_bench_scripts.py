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
