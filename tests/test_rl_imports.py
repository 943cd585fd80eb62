"""Module layout: the RL trainer and the coverage checks stand without the main job (no import cycle between
``prediction``, ``rl`` and ``steering``), and the coverage checks behave as ``predict``, ``sample`` and ``rl fit``
show them."""

import subprocess
import sys
import textwrap
from types import SimpleNamespace

from crystalign.coverage import composition_coverage_warnings, coverage_summary, coverage_warnings
from crystalign.generator import composition_batch


def test_rl_trainer_and_coverage_do_not_import_the_main_job():
    # a fresh interpreter: this test process has imported everything already
    code = textwrap.dedent(
        """
        import sys
        from types import SimpleNamespace

        import crystalign.rl.trainer, crystalign.rl.checkpoints
        from crystalign.coverage import composition_coverage_warnings, coverage_summary
        from crystalign.generator import composition_batch

        narrow = SimpleNamespace(coverage={"elements": ["Na", "Cl"], "n_atoms_min": 2, "n_atoms_max": 2})
        batch = composition_batch(["KBr"], 2)
        assert coverage_summary(narrow, batch) and composition_coverage_warnings(narrow, batch)
        loaded = sorted(m for m in ("crystalign.prediction", "crystalign.steering", "crystalign.cli") if m in sys.modules)
        assert not loaded, loaded
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr


def test_coverage_views_of_one_check():
    narrow = SimpleNamespace(coverage={"elements": ["Na", "Cl"], "n_atoms_min": 2, "n_atoms_max": 2})
    assert coverage_warnings(narrow, [11, 17]) == []
    assert coverage_warnings(SimpleNamespace(coverage=None), [19, 35]) == []
    (elements, size) = coverage_warnings(narrow, [19, 35, 35, 19])
    assert "K" in elements and "Br" in elements and "4 atoms per cell" in size

    batch = composition_batch(["KBr", "NaCl", "KBr"], 2)
    # once per distinct composition, named by its formula
    assert composition_coverage_warnings(narrow, batch) == [f"KBr: {coverage_warnings(narrow, [19, 35])[0]}"]
    summary = coverage_summary(narrow, batch)
    assert summary.startswith("4 of 6 training compositions lie outside") and "(4x)" in summary
