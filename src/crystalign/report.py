"""A self-contained HTML report of one structure-prediction run, read at a glance.

``write_report`` writes ``out_dir/report.html`` plus every figure as a PNG in ``out_dir/figures/``. The first
screen holds the answer: the composition, any warnings, the ranked structures as a table with plain labels and
units, and an interactive 3-D view (mouse-rotatable, unit cell drawn, Jmol element colours) of the best ones.
Below it come the RL curves (only when RL ran) and the energy histograms, each with a caption that says what
changed, and at the bottom, folded in a ``<details>``, the raw summary and provenance.

The page is one file that can be mailed or archived: figures are embedded as base64 PNGs, the CSS is inline,
and the 3-D viewer (3Dmol.js, vendored in ``crystalign/report_assets/`` with its licence) is inlined once, so
it makes no network requests. Without JavaScript or WebGL the table is still there and each viewer box says
why it is empty. Every file is written atomically.

Example::

    write_report(
        "runs/SrTiO3", "SrTiO3 — inference-time RL",
        summary={"composition": "SrTiO3", "model": "omatg-perov5", "reward": "sevenn", "seed": 0,
                 "wall_time_s": 812.4, "versions": {"crystalign": "0.1.0", "torch": "2.5.1"}, "symprec": 0.1},
        candidates=[{"rank": 1, "id": "c0", "formula": "SrTiO3", "spacegroup": "Pm-3m (221)",
                     "energy_per_atom_ev": -8.012, "valid": True, "file": "cifs/c0.cif"}, ...],
        history=[{"iteration": 0, "reward_mean": 7.1, "reward_std": 0.4}, ...],
        energies_before=[...], energies_after=[...],
        structures=[structure_c0, ...],            # aligned with ``candidates``
    )
"""

from __future__ import annotations

import base64
import functools
import html
import io
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence
from urllib.parse import quote

import numpy as np

from crystalign.io import atomic_path

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure
    from pymatgen.core import Structure

__all__ = ["write_report", "plot_schedule", "REPORT_NAME", "FIGURES_DIR"]

REPORT_NAME = "report.html"
FIGURES_DIR = "figures"

# The vendored 3-D viewer (see report_assets/README.md); the hash pins the exact file the tests were run with.
THREEDMOL_VERSION = "2.5.5"
THREEDMOL_SHA256 = "f7cc78921ae72e7623e89cdd111434f58c2efddd2ffda1cd212644b406fb8016"
_ASSETS = "report_assets"
# More WebGL contexts than this per page make browsers drop the oldest (Chrome's limit is 16).
MAX_3D_VIEWS = 12

_DASH = "—"
_DPI = 110
# Muted, colour-blind-friendly pair for "before"/"after" and the main series.
_C_BEFORE = "#8c8c8c"
_C_AFTER = "#1f6fb2"
_C_MAIN = "#1f6fb2"
_C_VAL = "#d9712b"

# History panels: (title, y-label, [(mean key, std key or None, legend label, colour)]).
_HISTORY_PANELS: tuple[tuple[str, str, tuple[tuple[str, str | None, str, str], ...]], ...] = (
    (
        "Reward",
        "reward",
        (
            ("reward_mean", "reward_std", "train mean", _C_MAIN),
            ("val_reward_mean", "val_reward_std", "validation", _C_VAL),
        ),
    ),
    (
        "Energy per atom",
        "eV/atom",
        (
            ("energy_per_atom_ev_mean", "energy_per_atom_ev_std", "train mean", _C_MAIN),
            ("val_energy_per_atom_ev_mean", "val_energy_per_atom_ev_std", "validation", _C_VAL),
            ("energy_per_atom_ev_min", None, "train best", "#2a9d55"),
        ),
    ),
    (
        "Rejected fraction",
        "fraction",
        (
            ("rejected_fraction", None, "train", _C_MAIN),
            ("val_rejected_fraction", None, "validation", _C_VAL),
            ("invalid_fraction", None, "train, geometry only", "#999999"),
        ),
    ),
)


# ---------------------------------------------------------------------------------------------- figures
def _new_figure(width: float, height: float, constrained: bool = True) -> Figure:
    # Figure + an explicit Agg canvas: no pyplot, so no global backend state and no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained" if constrained else None)
    FigureCanvasAgg(fig)
    return fig


def _figure_bytes(fig: Figure, fmt: str = "png") -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=_DPI, facecolor="white")
    return buf.getvalue()


FIGURE_FORMATS = ("png", "pdf", "svg")


def figure_format(path: str | os.PathLike) -> str:
    """The image format a file name asks for (its suffix); ValueError naming the file for other suffixes."""
    suffix = Path(path).suffix
    fmt = suffix.lower().lstrip(".")
    if fmt not in FIGURE_FORMATS:
        raise ValueError(f"{path}: cannot write a figure as {suffix or '(no suffix)'}; give a file name ending in .png, .pdf or .svg")
    return fmt


def _write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _finite(x: Any) -> float | None:
    """``x`` as a float, or None when missing, non-numeric or not finite."""
    if x is None or isinstance(x, bool):
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _finite_array(values: Sequence[Any] | None) -> np.ndarray:
    if values is None:
        return np.empty(0)
    vals = [_finite(v) for v in values]
    return np.asarray([v for v in vals if v is not None], dtype=float)


def _style_axes(ax) -> None:
    ax.grid(True, color="#e6e6e6", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _schedule_figure(schedule: Mapping[str, Sequence[float]]) -> Figure | None:
    """Panels for the velocity-annealing rates ``*_s`` (the velocity is scaled by 1 + s(t); the untrained s is 0,
    drawn for reference), the noise ``*_sigma``, and any other per-time series; None when there is nothing to plot."""
    if "t" not in schedule:
        raise ValueError(f"schedule needs a 't' grid, got keys {sorted(schedule)}")
    t = np.asarray(schedule["t"], dtype=float).reshape(-1)
    groups: dict[str, list[tuple[str, np.ndarray]]] = {"s": [], "sigma": [], "other": []}
    for key, values in schedule.items():
        # Saved schedules may carry metadata next to the series (a kind, a name); only sequences are plotted.
        if key == "t" or values is None or isinstance(values, (str, bytes, Mapping)) or np.ndim(values) == 0:
            continue
        y = np.asarray(values, dtype=float).reshape(-1)
        if y.shape != t.shape:
            raise ValueError(f"schedule[{key!r}] has {y.size} values for {t.size} times")
        group = "sigma" if key.endswith("sigma") else "s" if key.endswith("_s") or key == "s" else "other"
        groups[group].append((key, y))
    panels = [(name, series) for name, series in groups.items() if series]
    if not panels:
        return None

    fig = _new_figure(min(3.8 * len(panels), 9.3), 3.1)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    titles = {"s": "Velocity annealing s(t)", "sigma": "Exploration noise σ(t)", "other": "Other schedule terms"}
    for ax, (name, series) in zip(axes, panels):
        for key, y in series:
            ax.plot(t, y, linewidth=2, label=key)
        if name == "s":
            ax.axhline(0.0, color="#999999", linestyle="--", linewidth=1, label="untrained (s = 0)")
        if name == "sigma":
            positive = np.concatenate([y[y > 0] for _, y in series]) if series else np.empty(0)
            # sigma often spans decades (large near t=0), where a linear axis hides the rest of the curve.
            if positive.size and positive.max() / max(positive.min(), 1e-300) > 100:
                ax.set_yscale("log")
        ax.set_title(titles[name], fontsize=11)
        ax.set_xlabel("t  (0 = noise, 1 = data)")
        _style_axes(ax)
        ax.legend(fontsize=8, frameon=False)
    return fig


def plot_schedule(schedule: Mapping[str, Sequence[float]], path: str | os.PathLike) -> Path:
    """Plot a (learned) schedule ``{"t": [...], "pos_s": [...], "cell_s": [...], "pos_sigma": [...]}`` to a PNG,
    PDF or SVG file (by the suffix of ``path``).

    Any subset of the series may be present; keys ending in ``_s`` are velocity-annealing rates, keys ending in ``sigma`` noise
    levels. Raises ValueError when there is no ``t`` or no series, a series does not match ``t`` in length, or the
    suffix is not .png, .pdf or .svg.
    """
    fmt = figure_format(path)
    fig = _schedule_figure(schedule)
    if fig is None:
        raise ValueError("schedule has no series besides 't' to plot")
    path = Path(path)
    _write_bytes(path, _figure_bytes(fig, fmt))
    return path


def _history_figure(history: Sequence[Mapping[str, Any]]) -> Figure | None:
    iterations = [_finite(row.get("iteration")) for row in history]
    x_all = np.asarray([i if it is None else it for i, it in enumerate(iterations)], dtype=float)
    panels = []
    for title, ylabel, series in _HISTORY_PANELS:
        present = [s for s in series if any(_finite(row.get(s[0])) is not None for row in history)]
        if present:
            panels.append((title, ylabel, present))
    if not panels:
        return None

    # About 9.3 in at _DPI fills the page's content column at 1:1, so fonts keep their size.
    fig = _new_figure(min(3.1 * len(panels), 9.3), 3.0)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, ylabel, series) in zip(axes, panels):
        for key, std_key, label, colour in series:
            # Rows may lack a key (e.g. validation every few iterations): plot only the rows that have it.
            pts = [(x, _finite(row.get(key)), _finite(row.get(std_key)) if std_key else None)
                   for x, row in zip(x_all, history)]
            pts = [p for p in pts if p[1] is not None]
            x = np.asarray([p[0] for p in pts])
            y = np.asarray([p[1] for p in pts])
            sparse = len(pts) < 0.5 * len(history) or len(pts) < 3
            band = bool(std_key) and len(pts) > 1 and all(p[2] is not None for p in pts)
            ax.plot(x, y, color=colour, linewidth=1.8, marker="o" if sparse else None, markersize=4,
                    label=label + (" ± std" if band else ""))
            if band:
                s = np.asarray([p[2] for p in pts])
                ax.fill_between(x, y - s, y + s, color=colour, alpha=0.18, linewidth=0)
        if ylabel == "fraction":
            ax.set_ylim(-0.02, 1.02)
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("RL iteration")
        ax.set_ylabel(ylabel)
        _style_axes(ax)
        ax.legend(fontsize=8, frameon=False)
    return fig


def _hist_range(both: np.ndarray) -> tuple[float, float, int]:
    """The shown energy range and how many values fall outside it. A few exploded structures (energies of tens
    of eV/atom) would squash everything else into one bar, so the range stops 5 interquartile ranges beyond the
    quartiles (about 7 sigma: no real tail is cut)."""
    q1, q3 = np.percentile(both, [25, 75])
    lo, hi = max(both.min(), q1 - 5 * (q3 - q1)), min(both.max(), q3 + 5 * (q3 - q1))
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    return float(lo), float(hi), int(np.sum((both < lo) | (both > hi)))


def _energy_hist_figure(before: np.ndarray, after: np.ndarray) -> Figure | None:
    if before.size == 0 and after.size == 0:
        return None
    both = np.concatenate([before, after])
    lo, hi, n_out = _hist_range(both)
    # Shared bins, so the two distributions are directly comparable bar by bar.
    edges = np.linspace(lo, hi, min(40, max(10, int(np.sqrt(both.size)) * 2)) + 1)
    fig = _new_figure(6.4, 3.4)
    ax = fig.subplots()
    for values, label, colour in ((before, "before RL", _C_BEFORE), (after, "after RL", _C_AFTER)):
        if values.size == 0:
            continue
        median = float(np.median(values))
        ax.hist(values, bins=edges, color=colour, alpha=0.55, label=f"{label} (n={values.size}, median {median:.3f})")
        ax.hist(values, bins=edges, histtype="step", color=colour, linewidth=1.4)
        ax.axvline(median, color=colour, linestyle="--", linewidth=1.2)
    ax.set_xlabel("energy per atom (eV/atom)")
    ax.set_ylabel("structures")
    title = "Energy per atom before vs after RL" if before.size and after.size else "Energy per atom"
    if n_out:
        title += f"  ({n_out} outside the shown range)"
    ax.set_title(title, fontsize=11)
    _style_axes(ax)
    ax.legend(fontsize=8, frameon=False)
    return fig


# ---------------------------------------------------------------------------------------------- formatting
def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _fmt_value(value: Any) -> str:
    if value is None:
        return _DASH
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else _DASH
    if isinstance(value, Mapping):
        return ", ".join(f"{k} {_fmt_value(v)}" for k, v in value.items()) or _DASH
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt_value(v) for v in value) or _DASH
    return str(value)


def _fmt_duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {sec:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _fmt_tolerance(value: Any) -> str:
    """A space-group tolerance as '0.1 Å' (keys of ``spacegroups`` are strings such as "0.1")."""
    v = _finite(value)
    return f"{v:g} Å" if v is not None else str(value)


# Plain labels (with units) for the summary keys ``crystalign predict`` writes; other keys get a label made from
# their name by _plain_label.
_LABELS = {
    "composition": "composition asked for",
    "formula": "reduced formula",
    "cells": "cells sampled",
    "model": "generative model",
    "requested_model": "model asked for (predict samples its RL-tuned model where that found lower energies)",
    "n_rollout_candidates": "RL rollouts ranked with the candidates (already scored by the reward)",
    "model_hash": "model hash (sha256)",
    "checkpoint": "checkpoint",
    "reward": "reward",
    "mlip": "interatomic potential",
    "seed": "random seed",
    "n": "samples per cell",
    "steps": "integration steps per sample",
    "rl_steps": "RL iterations asked for",
    "relax": "relaxed with the potential",
    "symprec": "space-group tolerance (Å)",
    "coverage_warnings": "coverage warnings",
    "warnings": "warnings",
    "answer": "answer",
    "no_answer_reason": "why there is no answer",
    "options": "options",
    "versions": "package versions",
    "command": "command",
    "rl_stopped": "RL stopped early",
    "n_valid": "valid structures",
    "n_unique": "unique candidates ranked",
    "n_candidates": "candidates scored",
    "n_relaxed": "candidates relaxed",
    "n_relax_converged": "relaxations converged",
    "n_relax_not_converged": "relaxations not converged",
    "n_relax_failed": "relaxations failed",
    "best_energy_per_atom_ev": "best energy per atom (eV/atom)",
    "base_energy_per_atom_ev_mean": "mean energy per atom of the base model's samples (eV/atom)",
    "sampled_energy_per_atom_ev_mean": "mean energy per atom of the final samples (eV/atom)",
    "final_energy_per_atom_ev_mean": "mean energy per atom of the ranked candidates (eV/atom)",
    "base_invalid_fraction": "invalid fraction of the base model's samples",
    "wall_time_s": "wall time",
    "wall_time": "wall time",
}

# Unit suffixes of key names, longest first: (suffix, replacement in the label).
_UNIT_SUFFIXES = (
    ("_energy_per_atom_ev_mean", " mean energy per atom (eV/atom)"),
    ("_energy_per_atom_ev", " energy per atom (eV/atom)"),
    ("_ev_per_a", " (eV/Å)"),
    ("_mev", " (meV)"),
    ("_ev", " (eV)"),
    ("_s", " (s)"),
)


def _plain_label(key: str) -> str:
    if key in _LABELS:
        return _LABELS[key]
    label = key
    for suffix, unit in _UNIT_SUFFIXES:
        if label.endswith(suffix) and len(label) > len(suffix):
            label = label[: -len(suffix)] + unit
            break
    if label.startswith("n_"):
        label = "number of " + label[2:]
    return label.replace("_", " ").strip()


def _value_html(key: str, value: Any, depth: int = 0) -> str:
    if key in ("wall_time_s", "wall_time") and _finite(value) is not None:
        return _e(_fmt_duration(float(value)))
    if isinstance(value, Mapping) and value and depth < 2:
        # Nested records (versions, options, the potential) as their own small table, one entry a line.
        rows = "".join(f"<tr><th>{_e(k)}</th><td>{_value_html(str(k), v, depth + 1)}</td></tr>" for k, v in value.items())
        return f'<table class="kv nested">{rows}</table>'
    if isinstance(value, (list, tuple)) and any(isinstance(v, str) and len(v) > 40 for v in value):
        return "<ul>" + "".join(f"<li>{_e(_fmt_value(v))}</li>" for v in value) + "</ul>"
    return _e(_fmt_value(value))


def _provenance_rows(summary: Mapping[str, Any]) -> str:
    return "\n".join(f"<tr><th>{_e(_plain_label(str(k)))}</th><td>{_value_html(str(k), v)}</td></tr>" for k, v in summary.items())


def _file_href(file: Any, out_dir: Path) -> str | None:
    """A link relative to ``out_dir`` (so the report folder can be moved), percent-encoded; None if unusable."""
    if file is None or str(file) == "":
        return None
    path = Path(str(file))
    if path.is_absolute():
        try:
            path = path.resolve().relative_to(out_dir.resolve())
        except ValueError:
            return path.resolve().as_uri()
    return quote(path.as_posix())


def _link(file: Any, out_dir: Path, text: str | None = None) -> str | None:
    href = _file_href(file, out_dir)
    return f'<a href="{_e(href)}">{_e(text or Path(str(file)).name)}</a>' if href else None


# ---------------------------------------------------------------------------------------------- candidates
@dataclass
class _Row:
    index: int  # position in ``candidates`` (and ``structures``)
    rank: Any
    formula: str
    spacegroup: str
    energy: float | None
    valid: bool
    trusted: bool
    file: Any
    id: str
    relax: Mapping[str, Any] | None = None
    spacegroups: dict[str, str] = field(default_factory=dict)
    symmetry_note: str = ""
    conventional_file: Any = None
    untrusted_reason: str = ""
    source: str = ""


def _rows(candidates: Sequence[Mapping[str, Any]]) -> list[_Row]:
    rows = []
    for i, c in enumerate(candidates):
        sgs = c.get("spacegroups")
        rows.append(
            _Row(
                index=i,
                rank=c.get("rank", i + 1),
                formula=str(c.get("formula") or _DASH),
                spacegroup=str(c.get("spacegroup") or _DASH),
                energy=_finite(c.get("energy_per_atom_ev")),
                valid=bool(c.get("valid", False)),
                # Absent means trusted: only rows another stage explicitly distrusts are set apart.
                trusted=c.get("trusted", True) is not False,
                file=c.get("file"),
                id=str(c.get("id", "")),
                relax=c.get("relax"),
                spacegroups={str(k): str(v) for k, v in sgs.items() if v is not None} if isinstance(sgs, Mapping) else {},
                symmetry_note=str(c.get("symmetry_note") or ""),
                conventional_file=c.get("conventional_file"),
                untrusted_reason=str(c.get("untrusted_reason") or ""),
                source=str(c.get("source") or ""),
            )
        )
    return rows


def _rank_key(r: _Row) -> tuple:
    rank = _finite(r.rank)
    return (rank is None, rank or 0.0, r.index)


def _relax_cell(relax: Mapping[str, Any] | None) -> str:
    """'yes' / 'no (largest force 0.21 eV/Å)' for the question 'did the relaxation converge?'."""
    if not relax:
        return _DASH
    status = str(relax.get("status", ""))
    force = _finite(relax.get("fmax_ev_per_a"))
    steps = relax.get("steps")
    detail = ", ".join(x for x in (f"{steps} steps" if steps is not None else "",
                                   f"largest force {force:.3f} eV/Å" if force is not None else "") if x)
    tip = f' title="{_e(detail)}"' if detail else ""
    if status == "converged":
        return f'<span class="ok"{tip}>yes</span>'
    if status == "not_converged":
        text = f"no ({force:.2f} eV/Å)" if force is not None else "no"
        return f'<span class="warn"{tip}>{_e(text)}</span>'
    if status == "failed":
        why = str(relax.get("error") or "")
        return f'<span class="bad" title="{_e(why)}">no: relaxation failed, unrelaxed geometry</span>'
    if status in ("skipped_invalid", "not_relaxed"):
        return "not relaxed"
    return _e(status.replace("_", " ") or _DASH)


def _sg_columns(rows: Sequence[_Row], symprec: float | None) -> list[tuple[str | None, str]]:
    """The space-group columns: (tolerance key or None, header as HTML). One per tolerance in ``spacegroups``, else
    one."""
    keys = sorted({k for r in rows for k in r.spacegroups}, key=lambda k: (_finite(k) is None, _finite(k) or 0.0, k))
    if keys:
        return [(k, f"space group<br>tolerance {_e(_fmt_tolerance(k))}") for k in keys]
    return [(None, "space group" + (f"<br>tolerance {symprec:g} Å" if symprec is not None else ""))]


def _sg_cell(r: _Row, key: str | None, keys: Sequence[str | None], symprec: float | None) -> str:
    if key is None:
        return r.spacegroup
    if key in r.spacegroups:
        return r.spacegroups[key]
    # A row without per-tolerance groups shows its single one under the tolerance it was found with.
    home = next((k for k in keys if symprec is not None and _finite(k) == symprec), keys[0])
    return r.spacegroup if key == home else _DASH


def _files_cell(r: _Row, out_dir: Path) -> str:
    links = [x for x in (_link(r.file, out_dir), _link(r.conventional_file, out_dir, "conventional cell")) if x]
    return "<br>".join(links) or _DASH


def _ranked_table(rows: Sequence[_Row], out_dir: Path, symprec: float | None) -> str:
    best = min((r.energy for r in rows if r.energy is not None), default=None)
    with_relax = any(r.relax for r in rows)
    with_notes = any(r.symmetry_note for r in rows)
    # where each answer was sampled (base model, an RL rollout, the RL policy): shown once RL added candidates
    with_source = len({r.source for r in rows if r.source}) > 1 or any(r.source.startswith("rl") for r in rows)
    sg_cols = _sg_columns(rows, symprec)
    keys = [k for k, _ in sg_cols]
    heads = (
        ['<th class="num">rank</th>', "<th>formula</th>"] + [f"<th>{h}</th>" for _, h in sg_cols]
        + ['<th class="num">energy per atom<br>(eV/atom)</th>', '<th class="num">energy above<br>the best<br>(meV/atom)</th>']
        + (["<th>relaxation<br>converged?</th>"] if with_relax else [])
        + (["<th>sampled by</th>"] if with_source else [])
        + ["<th>files</th>"]
    )
    body = []
    for n, r in enumerate(rows):
        energy = f"{r.energy:.4f}" if r.energy is not None else _DASH
        above = f"{(r.energy - best) * 1000.0:.1f}" if r.energy is not None and best is not None else _DASH
        # Striping by candidate (not by <tr>), so a candidate and its note row share a background.
        cls = "cand" + (" even" if n % 2 else "") + (" has-note" if r.symmetry_note else "")
        attrs = f' class="{cls}"' + (f' title="{_e(r.id)}"' if r.id else "")
        body.append(
            f'<tr{attrs}><td class="num">{_e(r.rank)}</td><td>{_e(r.formula)}</td>'
            + "".join(f"<td>{_e(_sg_cell(r, k, keys, symprec))}</td>" for k in keys)
            + f'<td class="num">{_e(energy)}</td><td class="num">{_e(above)}</td>'
            + (f"<td>{_relax_cell(r.relax)}</td>" if with_relax else "")
            + (f"<td>{_e(r.source or _DASH)}</td>" if with_source else "")
            + f"<td>{_files_cell(r, out_dir)}</td></tr>"
        )
        if r.symmetry_note:
            # A sentence, so a full-width line under its candidate rather than a column that would widen the table.
            body.append(f'<tr class="note{" even" if n % 2 else ""}"><td></td>'
                        f'<td colspan="{len(heads) - 1}">{_e(r.symmetry_note)}</td></tr>')
    head = "".join(heads)
    # A long list scrolls inside its box, so the 3-D views below stay near the first screen.
    return (f'<div class="scroll tall"><table class="cands ranked"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def _untrusted_reason(r: _Row) -> str:
    if r.untrusted_reason:
        return r.untrusted_reason
    if not r.valid:
        return "invalid geometry (atoms too close or a degenerate cell)"
    return "not trusted" if not r.trusted else "no trustworthy answer in this run"


def _untrusted_table(rows: Sequence[_Row], out_dir: Path, symprec: float | None) -> str:
    sg_cols = _sg_columns(rows, symprec)
    keys = [k for k, _ in sg_cols]
    head = ("<th>formula</th>" + "".join(f"<th>{h}</th>" for _, h in sg_cols)
            + '<th class="num">energy per atom<br>(eV/atom)</th><th>why it is not ranked</th><th>files</th>')
    body = []
    for r in rows:
        energy = f"{r.energy:.4f}" if r.energy is not None else _DASH
        attrs = f' title="{_e(r.id)}"' if r.id else ""
        body.append(
            f"<tr{attrs}><td>{_e(r.formula)}</td>"
            + "".join(f"<td>{_e(_sg_cell(r, k, keys, symprec))}</td>" for k in keys)
            + f'<td class="num">{_e(energy)}</td><td class="reason">{_e(_untrusted_reason(r))}</td>'
            + f"<td>{_files_cell(r, out_dir)}</td></tr>"
        )
    return (f'<div class="scroll"><table class="cands untrusted"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


# ---------------------------------------------------------------------------------------------- 3-D views
@functools.lru_cache(maxsize=1)
def _threedmol_script() -> str:
    """The vendored 3Dmol.js, with its licence as a leading comment, ready to inline in a <script> element."""
    folder = resources.files("crystalign") / _ASSETS
    code = (folder / "3Dmol-min.js").read_bytes()  # its sha256 is checked by the tests (THREEDMOL_SHA256)
    licence = (folder / "3Dmol.LICENSE.txt").read_text(encoding="utf-8").replace("*/", "* /")
    # "</script" anywhere in the code would end the element early; "<\/script" means the same in JavaScript.
    text = re.sub(r"</(script)", r"<\\/\1", code.decode("utf-8"), flags=re.I)
    return f"/* 3Dmol.js {THREEDMOL_VERSION}, inlined by crystalign; its licence:\n{licence}\n*/\n{text}"


def _as_atoms(structure):
    from ase import Atoms

    if isinstance(structure, Atoms):
        return structure
    from pymatgen.io.ase import AseAtomsAdaptor

    return AseAtomsAdaptor.get_atoms(structure)


# Atoms closer than this to a cell face also get drawn on the opposite face, as crystal viewers do (a cubic
# perovskite then shows its eight corner atoms, not one); loose enough for a relaxation's last few mÅ of drift.
_FACE_TOL_A = 0.05


def _near_faces(frac: np.ndarray, spacing: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Which fractional coordinates lie within _FACE_TOL_A of the cell's low and high faces (distance in Å:
    fractional coordinate times the spacing of the lattice planes)."""
    return frac * spacing < _FACE_TOL_A, (1.0 - frac) * spacing < _FACE_TOL_A


def _display_origin(frac: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """The atom to put at the cell's corner for the picture. Generated structures sit anywhere in the cell (the
    origin is arbitrary), so a cubic perovskite can come out with no atom on a face and look like a random
    cluster; shifting the whole crystal to the atom that puts the most atoms on faces, edges and corners gives
    the picture a crystallographer expects. The same crystal: the linked CIF files keep the original origin."""
    if len(frac) == 0 or len(frac) > 300:  # (n, n, 3) below; large cells are unreadable anyway
        return np.zeros(3)
    shifted = (frac[None, :, :] - frac[:, None, :]) % 1.0
    shifted[shifted > 1.0 - 1e-9] = 0.0
    low, high = _near_faces(shifted, spacing)
    drawn = (2 ** (low | high).sum(axis=2)).sum(axis=1)  # sites drawn, periodic copies included, per origin
    return frac[int(np.argmax(drawn))]


def _p1_cif(structure) -> tuple[str, list[str]]:
    """A minimal P1 CIF of ``structure`` for the viewer, its origin on an atom (see _display_origin), with the
    periodic copies of atoms on the cell's faces, edges and corners added; and its elements in order of first
    appearance."""
    import itertools

    atoms = _as_atoms(structure)
    a, b, c, alpha, beta, gamma = atoms.cell.cellpar()
    frac = atoms.get_scaled_positions(wrap=True)
    spacing = 1.0 / np.linalg.norm(np.linalg.inv(atoms.cell.array).T, axis=1)
    frac = (frac - _display_origin(frac, spacing)) % 1.0
    frac[frac > 1.0 - 1e-9] = 0.0
    near_low, near_high = _near_faces(frac, spacing)
    symbols = atoms.get_chemical_symbols()
    sites = []
    for s, f, lo, hi in zip(symbols, frac, near_low, near_high):
        options = [[0] + ([1] if lo[k] else []) + ([-1] if hi[k] else []) for k in range(3)]
        sites += [(s, f + np.array(shift)) for shift in itertools.product(*options)]
    lines = [
        "data_structure",
        f"_cell_length_a {a:.6f}", f"_cell_length_b {b:.6f}", f"_cell_length_c {c:.6f}",
        f"_cell_angle_alpha {alpha:.6f}", f"_cell_angle_beta {beta:.6f}", f"_cell_angle_gamma {gamma:.6f}",
        "_symmetry_space_group_name_H-M 'P 1'",
        "loop_", "_symmetry_equiv_pos_as_xyz", "'x, y, z'",
        "loop_", "_atom_site_label", "_atom_site_type_symbol",
        "_atom_site_fract_x", "_atom_site_fract_y", "_atom_site_fract_z",
    ]
    lines += [f"{s}{i + 1} {s} {x:.6f} {y:.6f} {z:.6f}" for i, (s, (x, y, z)) in enumerate(sites)]
    return "\n".join(lines) + "\n", list(dict.fromkeys(symbols))


def _jmol_hex(symbol: str) -> str:
    from ase.data import atomic_numbers
    from ase.data.colors import jmol_colors

    r, g, b = (int(round(255 * x)) for x in jmol_colors[atomic_numbers.get(symbol, 0)])
    return f"#{r:02x}{g:02x}{b:02x}"


def _viewer_card(r: _Row, structure, n: int) -> str:
    cif, elements = _p1_cif(structure)
    # One source for the colours of the spheres and of the legend: ASE's Jmol table.
    colours = {el: _jmol_hex(el) for el in elements}
    energy = f"{r.energy:.3f} eV/atom" if r.energy is not None else "no energy"
    sg = next(iter(r.spacegroups.values()), r.spacegroup) if r.spacegroup == _DASH else r.spacegroup
    legend = "".join(f'<span class="el"><i style="background:{c}"></i>{_e(el)}</span>' for el, c in colours.items())
    label = f"#{r.rank} {r.formula}, {sg}, {energy}"
    return (
        f'<figure class="card" id="structure-{n}">'
        f'<div class="viewer" role="img" aria-label="{_e("3-D view of " + label)}" data-rank="{_e(r.rank)}" '
        f"data-cif=\"{_e(cif)}\" data-colors='{_e(json.dumps(colours))}'>"
        '<p class="fallback">The 3-D view needs JavaScript and WebGL; the CIF file is linked in the table.</p></div>'
        f'<figcaption><b>#{_e(r.rank)} {_e(r.formula)}</b> · {_e(sg)} · {_e(energy)}'
        f'<span class="legend">{legend}</span></figcaption></figure>'
    )


def _viewer_cards(rows: Sequence[_Row], structures: Sequence[Any]) -> list[str]:
    """The 3-D view cards of ``rows``; none, with a warning, when the vendored viewer cannot be read (a broken
    install), and a structure that cannot be converted is left out with a warning: the table matters more."""
    try:
        _threedmol_script()
    except OSError as err:
        warnings.warn(f"report: no 3-D views, the vendored 3Dmol.js could not be read ({err})", stacklevel=3)
        return []
    cards = []
    for r in rows:
        try:
            cards.append(_viewer_card(r, structures[r.index], len(cards) + 1))
        except Exception as err:  # noqa: BLE001 - any conversion failure; the table still lists the candidate
            warnings.warn(f"report: no 3-D view of candidate {r.id or r.rank} ({type(err).__name__}: {err})", stacklevel=3)
    return cards


# Runs once the library and every viewer box exist (end of <body>). Each box either shows its structure
# (data-state="drawn") or keeps a sentence saying why not ("fallback", "error"); nothing is thrown to the console,
# so a browser without WebGL still shows a clean page with the table.
_VIEWER_JS = """
(function () {
  "use strict";
  var boxes = Array.prototype.slice.call(document.querySelectorAll("div.viewer"));
  if (!boxes.length) return;
  function explain(box, state, text) {
    box.setAttribute("data-state", state);
    var p = box.querySelector(".fallback");
    if (p) { p.textContent = text; p.hidden = false; }
  }
  var lib = window.$3Dmol, webgl = false;
  try {
    var probe = document.createElement("canvas");
    webgl = !!(window.WebGLRenderingContext && (probe.getContext("webgl2") || probe.getContext("webgl")));
  } catch (e) { webgl = false; }
  if (!lib || !webgl) {
    boxes.forEach(function (box) {
      explain(box, "fallback", (lib ? "No 3-D view: this browser has WebGL turned off or unavailable."
                                    : "No 3-D view: the viewer script did not load.") +
                               " The table and the CIF files are unaffected.");
    });
    return;
  }
  boxes.forEach(function (box) {
    try {
      var colours = JSON.parse(box.getAttribute("data-colors"));
      var map = {};
      Object.keys(colours).forEach(function (el) { map[el] = parseInt(colours[el].slice(1), 16); });
      var viewer = lib.createViewer(box, {backgroundColor: "white", antialias: true});
      var model = viewer.addModel(box.getAttribute("data-cif"), "cif", {assignBonds: false});
      viewer.addUnitCell(model, {box: {color: "#444444"}, alabel: "a", blabel: "b", clabel: "c"});
      viewer.setStyle({}, {sphere: {scale: 0.3, colorscheme: {prop: "elem", map: map}}});
      viewer.zoomTo();
      // c up, a towards the viewer and slightly from above (rotations about the screen axes): looking straight
      // down an axis, as the viewer starts, would hide the third dimension.
      viewer.rotate(-90, "vx");
      viewer.rotate(-30, "vy");
      viewer.rotate(15, "vx");
      viewer.zoom(0.85);
      viewer.render();
      var home = viewer.getView();
      var reset = document.createElement("button");
      reset.type = "button";
      reset.className = "reset";
      reset.textContent = "reset view";
      reset.addEventListener("click", function () { viewer.setView(home); viewer.render(); });
      box.appendChild(reset);
      box.querySelector(".fallback").hidden = true;
      box.setAttribute("data-state", "drawn");
    } catch (err) {
      explain(box, "error", "The 3-D view failed (" + String((err && err.message) || err).slice(0, 160) +
                            "). The table and the CIF files are unaffected.");
    }
  });
})();
"""


# ---------------------------------------------------------------------------------------------- captions
def _first_last(history: Sequence[Mapping[str, Any]], key: str) -> tuple[float, float] | None:
    values = [v for v in (_finite(row.get(key)) for row in history) if v is not None]
    return (values[0], values[-1]) if len(values) >= 2 else None


def _change(what: str, pair: tuple[float, float], fmt: str | None = None, unit: str = "") -> str:
    a, b = pair
    if fmt is None:  # three significant digits for the larger of the two, the same decimals for both
        fmt = f".{max(0, 2 - math.floor(math.log10(max(abs(a), abs(b), 1e-12))))}f"
    unit = f" {unit}" if unit else ""
    if f"{a:{fmt}}" == f"{b:{fmt}}":
        return f"{what} stayed at {a:{fmt}}{unit}"
    return f"{what} {'rose' if b > a else 'fell'} from {a:{fmt}} to {b:{fmt}}{unit}"


def _history_caption(history: Sequence[Mapping[str, Any]]) -> str:
    parts = []
    if (p := _first_last(history, "reward_mean")) is not None:
        parts.append(_change("the mean reward", p))
    if (p := _first_last(history, "energy_per_atom_ev_mean")) is not None:
        parts.append(_change("the mean energy per atom of the RL policy's samples", p, ".3f", "eV/atom"))
    for key, what in (("rejected_fraction", "the rejected fraction"), ("invalid_fraction", "the invalid fraction")):
        if (p := _first_last(history, key)) is not None:
            parts.append(_change(what, (100 * p[0], 100 * p[1]), ".0f", "%"))
            break
    n = len(history)
    head = f"Inference-time RL, {n} iteration{'s' if n != 1 else ''}" + (": " + "; ".join(parts) if parts else "")
    return head + ". Shaded bands are ± one standard deviation over the batch; validation points use held-out samples."


def _hist_caption(before: np.ndarray, after: np.ndarray) -> str:
    _, _, n_out = _hist_range(np.concatenate([before, after]))
    if before.size and after.size:
        mb, ma = float(np.median(before)), float(np.median(after))
        d = 1000.0 * (ma - mb)
        text = (f"Energy per atom of the {before.size} structures sampled before RL (base model; median {mb:.3f} eV/atom) "
                f"and the {after.size} sampled by the RL policy (median {ma:.3f} eV/atom): the median "
                + (f"{'fell' if d < 0 else 'rose'} by {abs(d):.0f} meV/atom." if abs(d) >= 0.5 else "did not change."))
    else:
        values = before if before.size else after
        text = f"Energy per atom of the {values.size} sampled structures (median {float(np.median(values)):.3f} eV/atom)."
    text += " Same bins for both; dashed lines are medians."
    if n_out:
        text += (f" {n_out} structure{'s' if n_out != 1 else ''} with energies far from the rest "
                 f"{'lie' if n_out != 1 else 'lies'} outside the shown range.")
    return text


# ---------------------------------------------------------------------------------------------- page
def _img(data: bytes, alt: str, rel: str, caption: str) -> str:
    b64 = base64.b64encode(data).decode("ascii")
    return (
        f'<figure><img src="data:image/png;base64,{b64}" alt="{_e(alt)}">'
        f'<figcaption>{_e(caption)} <a href="{_e(quote(rel))}">{_e(rel)}</a></figcaption></figure>'
    )


def _section(anchor: str, title: str, how: str, content: str) -> str:
    how_html = f'<p class="how">{_e(how)}</p>' if how else ""
    return f'<section id="{_e(anchor)}"><h2>{_e(title)}</h2>{how_html}{content}</section>'


def _warnings(summary: Mapping[str, Any]) -> list[str]:
    out = [str(w) for w in (summary.get("warnings") or []) if w]
    for w in summary.get("coverage_warnings") or []:
        if w and str(w) not in out:
            out.append(str(w))
    stopped = summary.get("rl_stopped")
    if stopped and not any(str(stopped) in w for w in out):
        kept = summary.get("n_rollout_candidates")
        out.append(
            f"Inference-time RL stopped early ({stopped}); the candidates come from the base model"
            + (f" and the {kept} rollouts scored before it stopped." if kept else " alone.")
        )
    return out


def _potential(summary: Mapping[str, Any]) -> str | None:
    """The interatomic potential that scored the energies, as 'sevenn 7net-0', from ``summary["mlip"]``."""
    mlip = summary.get("mlip")
    if not isinstance(mlip, Mapping) or not mlip.get("name"):
        return None
    text = str(mlip["name"])
    if mlip.get("model") not in (None, "", "None"):
        text += f" {Path(str(mlip['model'])).name}"
    return text + (f" ({mlip['modal']})" if mlip.get("modal") else "")


def _facts(summary: Mapping[str, Any]) -> str:
    facts = []
    potential = _potential(summary)
    for key, label, value in (("model", "model", summary.get("model")),
                              ("reward", "potential" if potential else "reward", potential or summary.get("reward")),
                              ("seed", "seed", summary.get("seed"))):
        if value not in (None, ""):
            facts.append(f"{label} <b>{_e(_fmt_value(value))}</b>")
    wall = _finite(summary.get("wall_time_s", summary.get("wall_time")))
    if wall is not None:
        facts.append(f"run time <b>{_e(_fmt_duration(wall))}</b>")
    return f'<p class="facts">{" · ".join(facts)}</p>' if facts else ""


_CSS = """
:root { --fg:#1d2430; --muted:#5b6675; --line:#dfe3e8; --accent:#1f6fb2; --bad:#b3261e; --warn:#8a5a00; --bg:#f6f7f9; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--fg);
       font:15px/1.5 "Segoe UI", Roboto, "Helvetica Neue", Arial, "DejaVu Sans", sans-serif; }
main { max-width:1120px; margin:0 auto; padding:22px 24px 48px; }
header, section { background:#fff; border:1px solid var(--line); border-radius:10px; padding:16px 22px; }
section { margin-top:16px; }
h1 { font-size:15px; font-weight:600; color:var(--muted); margin:0; }
p.composition { font-size:28px; margin:2px 0 0; }
p.composition b { font-weight:700; }
p.facts { color:var(--muted); margin:2px 0 0; font-size:14px; }
p.facts b { color:var(--fg); font-weight:600; }
h2 { font-size:18px; margin:0 0 4px; }
p.how { color:var(--muted); margin:0 0 10px; font-size:13.5px; }
.warnings { margin-top:12px; border:1px solid #e3b341; background:#fff8e1; border-radius:8px; padding:8px 14px; }
.warnings ul { margin:4px 0 0; padding-left:20px; }
.noanswer { border:1px solid #e0a3a0; background:#fdecea; border-radius:8px; padding:10px 16px; }
.noanswer p.verdict { font-size:20px; font-weight:700; color:var(--bad); margin:0 0 4px; }
.noanswer p { margin:0; }
table { border-collapse:collapse; }
.scroll { overflow-x:auto; }
.scroll.tall { max-height:30em; overflow-y:auto; }
.scroll.tall thead th { position:sticky; top:0; background:#fff; z-index:1; }
@media print { .scroll.tall { max-height:none; } }
table.cands { width:100%; font-size:14px; }
table.cands th { text-align:left; vertical-align:bottom; border-bottom:2px solid var(--line); padding:6px 9px;
                 color:var(--muted); font-weight:600; line-height:1.25; white-space:nowrap; }
table.cands th.num { text-align:right; }
table.cands td { border-bottom:1px solid var(--line); padding:5px 9px; white-space:nowrap; }
table.cands tr.even { background:#fafbfc; }
table.cands tr.has-note td { border-bottom:none; }
table.cands tr.note td { font-size:13px; color:var(--muted); white-space:normal; padding-top:0; }
table.cands td.reason { font-size:13px; color:var(--muted); white-space:normal; min-width:14em; }
table.untrusted td { color:#6b717b; }
table.untrusted tbody tr:nth-child(even) { background:#fafbfc; }
td.num { text-align:right; font-variant-numeric:tabular-nums; font-size:13px; white-space:nowrap;
         font-family:"DejaVu Sans Mono", Menlo, Consolas, monospace; }
.ok { color:#2a7d46; font-weight:600; }
.warn { color:var(--warn); font-weight:600; }
.bad { color:var(--bad); font-weight:600; }
a { color:var(--accent); text-decoration:none; }
a:hover { text-decoration:underline; }
.viewers { display:grid; grid-template-columns:repeat(auto-fill, minmax(250px, 1fr)); gap:12px; margin-top:14px; }
.card { margin:0; border:1px solid var(--line); border-radius:8px; overflow:hidden; background:#fff; }
.viewer { position:relative; width:100%; height:250px; background:#fff; }
.viewer .fallback { position:absolute; inset:0; margin:0; padding:24px; display:flex; align-items:center;
                    justify-content:center; text-align:center; color:var(--muted); font-size:13px; }
.viewer .fallback[hidden] { display:none; }
.viewer button.reset { position:absolute; right:6px; bottom:6px; z-index:1; font-size:11px; color:var(--muted);
                       background:#ffffffcc; border:1px solid var(--line); border-radius:4px; padding:1px 6px; cursor:pointer; }
.card figcaption { border-top:1px solid var(--line); padding:5px 10px; font-size:13px; }
.legend { display:block; color:var(--muted); font-size:12px; }
.legend .el { margin-right:10px; white-space:nowrap; }
.legend i { display:inline-block; width:10px; height:10px; border-radius:50%; border:1px solid #0006; margin-right:4px;
            vertical-align:-1px; }
.grid { display:grid; grid-template-columns:repeat(auto-fill, minmax(min(480px, 100%), 1fr)); gap:14px; }
figure { margin:0; }
figure img { display:block; width:auto; max-width:100%; height:auto; border:1px solid var(--line); border-radius:6px; background:#fff; }
figcaption { font-size:13px; color:var(--muted); margin-top:4px; }
details#provenance { margin-top:16px; background:#fff; border:1px solid var(--line); border-radius:10px; padding:10px 22px; }
details#provenance summary { cursor:pointer; font-weight:600; }
table.kv th { text-align:left; color:var(--muted); font-weight:600; padding:2px 18px 2px 0; vertical-align:top; }
table.kv td { padding:2px 0; overflow-wrap:anywhere; }
table.kv.nested { font-size:13px; }
table.kv ul { margin:0; padding-left:18px; }
footer { color:var(--muted); font-size:12px; margin-top:18px; text-align:center; }
"""


def write_report(
    out_dir: str | os.PathLike,
    title: str,
    summary: Mapping[str, Any],
    candidates: Sequence[Mapping[str, Any]],
    history: Sequence[Mapping[str, Any]] | None = None,
    energies_before: Sequence[float] | None = None,
    energies_after: Sequence[float] | None = None,
    schedule: Mapping[str, Sequence[float]] | None = None,
    structures: Sequence[Structure | None] | None = None,
    top_k: int = 6,
) -> Path:
    """Write ``out_dir/report.html`` (self-contained) and its figures as PNGs in ``out_dir/figures/``.

    Args:
        out_dir: report folder; ``file`` entries of ``candidates`` are linked relative to it.
        title: page title.
        summary: the query and provenance (composition, model, reward, seed, wall_time_s, versions, ...); all
            of it is shown, folded, at the bottom. Read for the first screen: ``composition`` (or ``formula``),
            ``model``, ``reward``, ``seed``, ``wall_time_s``, ``symprec`` (Å, the space-group tolerance),
            ``warnings`` (list of strings; also ``coverage_warnings`` and ``rl_stopped``), ``answer`` ("none" when
            no trustworthy candidate exists) and ``no_answer_reason``.
        candidates: one dict per candidate with ``rank, id, formula, spacegroup, energy_per_atom_ev, valid,
            file`` and optionally ``relax`` ({status, steps, fmax_ev_per_a}), ``trusted`` (False: listed under
            "Not ranked (untrusted)" with ``untrusted_reason``, never in the ranked answer), ``spacegroups``
            ({tolerance in Å: "Cm (8)"}), ``symmetry_note`` and ``conventional_file``. Invalid candidates are
            never ranked either. The energy may be None/NaN (shown as "—").
        history: RL iterations, rows with ``iteration`` and any of ``reward_mean``, ``reward_std``,
            ``val_reward_mean``, ``energy_per_atom_ev_mean``, ``invalid_fraction``, ...; section skipped if empty.
        energies_before, energies_after: energy per atom of the samples before and after RL (non-finite values
            are dropped); section skipped if both are empty.
        schedule: ``{"t": [...], "pos_s": [...], "cell_s": [...], "pos_sigma": [...]}``, any subset of series.
        structures: aligned with ``candidates`` (``structures[i]`` is candidate ``i``; None entries allowed);
            interactive 3-D views of the ``top_k`` best-ranked candidates that have one.
        top_k: how many structures to show in 3-D (at most MAX_3D_VIEWS).

    Returns:
        The path of ``report.html``.
    """
    out_dir = Path(out_dir)
    fig_dir = out_dir / FIGURES_DIR
    fig_dir.mkdir(parents=True, exist_ok=True)
    rows = _rows(candidates)
    if structures is not None and len(structures) != len(rows):
        raise ValueError(f"{len(structures)} structures for {len(rows)} candidates; they must be aligned")
    symprec = _finite(summary.get("symprec"))
    composition = summary.get("composition") or summary.get("formula")

    def emit(fig: Figure, name: str, alt: str, caption: str) -> str:
        data = _figure_bytes(fig)
        _write_bytes(fig_dir / name, data)
        return _img(data, alt, f"{FIGURES_DIR}/{name}", caption)

    # ---- first screen: the answer
    no_answer = str(summary.get("answer", "")).lower() == "none"
    ranked = [] if no_answer else sorted((r for r in rows if r.valid and r.trusted), key=_rank_key)
    ranked_ids = {r.index for r in ranked}
    unranked = sorted((r for r in rows if r.index not in ranked_ids), key=_rank_key)
    sections = []
    viewers_used = False
    if rows or no_answer:  # an RL-fit report has training curves, no candidates and no answer
        if ranked:
            content = _ranked_table(ranked, out_dir, symprec)
            cards = []
            if structures is not None and top_k > 0:
                shown = [r for r in ranked if structures[r.index] is not None][: min(top_k, MAX_3D_VIEWS)]
                cards = _viewer_cards(shown, structures)
            if cards:
                viewers_used = True
                content += f'<div class="viewers">{"".join(cards)}</div>'
            potential = _potential(summary)
            scorer = (f", as computed by the interatomic potential {potential}" if potential
                      else f", as scored by the reward '{summary['reward']}'" if summary.get("reward") else "")
            how = (f"Lowest energy per atom first{scorer}; 'energy above the best' is the gap to rank 1. "
                   "'Relaxation converged?' says whether the largest remaining force fell below the threshold; if not "
                   "(the force left is given), the energy is less certain."
                   + (" 3-D views: drag to rotate, scroll to zoom; the box is the unit cell (axes a red, b green, "
                      "c blue), its corner moved onto an atom, and atoms on its faces and corners are repeated."
                      if cards else "")
                   + (f" The table scrolls: all {len(ranked)} are listed." if len(ranked) > 12 else ""))
            sections.append(_section("answer", f"Answer: {len(ranked)} ranked structure{'s' if len(ranked) != 1 else ''}"
                                     + (f" for {composition}" if composition else ""), how, content))
        else:
            reason = str(summary.get("no_answer_reason") or "")
            if not reason:
                reason = (f"None of the {len(rows)} candidates is trustworthy: each was invalid or failed a check; "
                          "see 'Not ranked' below." if rows else "No candidates were produced.")
            verdict = "No trustworthy structure was found" + (f" for {composition}." if composition else ".")
            sections.append(
                f'<section id="answer"><div class="noanswer"><p class="verdict">{_e(verdict)}</p>'
                f"<p>{_e(reason)}</p></div></section>"
            )
        if unranked:
            sections.append(
                _section(
                    "untrusted",
                    f"Not ranked (untrusted): {len(unranked)} candidate{'s' if len(unranked) != 1 else ''}",
                    "Generated and scored, but left out of the answer for the reason given; their files are kept "
                    "for inspection.",
                    _untrusted_table(unranked, out_dir, symprec),
                )
            )

    # ---- below the fold: how the run got there
    if history:
        fig = _history_figure(history)
        if fig is not None:
            sections.append(_section("history", "RL progress", "",
                                     emit(fig, "rl_history.png", "reward and energy over RL iterations", _history_caption(history))))

    before, after = _finite_array(energies_before), _finite_array(energies_after)
    fig = _energy_hist_figure(before, after)
    if fig is not None:
        sections.append(_section("energies", "Energy distribution", "",
                                 emit(fig, "energy_hist.png", "energy per atom before vs after RL", _hist_caption(before, after))))

    if schedule:
        fig = _schedule_figure(schedule)
        if fig is not None:
            caption = ("s(t) is the learned velocity annealing: the frozen velocity is scaled by 1 + s(t) (the dashed "
                       "line is the untrained s = 0); σ(t) is the exploration noise of the RL policy along the "
                       "trajectory, from noise (t = 0) to data (t = 1).")
            sections.append(_section("schedule", "Learned schedule", "", emit(fig, "schedule.png", "learned schedule", caption)))

    warns = _warnings(summary)
    warn_html = ('<div class="warnings" role="alert"><b>Warnings</b><ul>' + "".join(f"<li>{_e(w)}</li>" for w in warns)
                 + "</ul></div>") if warns else ""
    comp_html = f'<p class="composition">Composition <b>{_e(composition)}</b></p>' if composition else ""
    provenance = (
        '<details id="provenance"><summary>Run details and provenance: versions, options, command, hashes, seed '
        f'and every summary value</summary><table class="kv">{_provenance_rows(summary)}</table></details>'
    )
    scripts = (f'<script>{_threedmol_script()}</script>\n<script>{_VIEWER_JS}</script>' if viewers_used else "")
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    credit = f" 3-D views by 3Dmol.js {THREEDMOL_VERSION} (BSD-3-Clause), inlined." if viewers_used else ""
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<main>
<header>
<h1>{_e(title)}</h1>
{comp_html}
{_facts(summary)}
{warn_html}
</header>
{chr(10).join(sections)}
{provenance}
<footer>Generated {_e(stamp)} by crystalign.{_e(credit)}</footer>
</main>
{scripts}
</body>
</html>
"""
    path = out_dir / REPORT_NAME
    # Explicit UTF-8 (the page declares it), independent of the locale's default encoding.
    _write_bytes(path, page.encode("utf-8"))
    return path
