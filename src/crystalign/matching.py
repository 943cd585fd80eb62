"""The benchmark StructureMatcher convention (CDVAE/DiffCSP/FlowMM/OMatG), in one place."""

from __future__ import annotations

#: stol 0.5, ltol 0.3, angle_tol 10 degrees: the CSP benchmark tolerances (not pymatgen's defaults).
BENCHMARK_TOLERANCES = {"stol": 0.5, "ltol": 0.3, "angle_tol": 10.0}


def make_matcher(**overrides):
    """A pymatgen StructureMatcher with the benchmark tolerances (``overrides`` replace them)."""
    from pymatgen.analysis.structure_matcher import StructureMatcher

    kwargs = dict(BENCHMARK_TOLERANCES)
    kwargs.update(overrides)
    return StructureMatcher(**kwargs)
