"""A self-contained HTML report of one structure-prediction run.

``write_report`` writes ``out_dir/report.html`` plus every figure as a PNG in ``out_dir/figures/``. The HTML
embeds the same PNGs as base64 data URIs and carries its CSS inline, so the single file can be mailed or
archived and still shows everything; it makes no network requests and needs no JavaScript. Every file is
written atomically.

Example::

    write_report(
        "runs/SrTiO3", "SrTiO3 — inference-time RL",
        summary={"composition": "SrTiO3", "model": "omatg-perov5", "reward": "sevenn", "seed": 0,
                 "wall_time_s": 812.4, "versions": {"crystalign": "0.1.0", "torch": "2.5.1"}},
        candidates=[{"rank": 1, "id": "c0", "formula": "SrTiO3", "spacegroup": "Pm-3m (221)",
                     "energy_per_atom_ev": -8.012, "valid": True, "file": "cifs/c0.cif"}, ...],
        history=[{"iteration": 0, "reward_mean": 7.1, "reward_std": 0.4}, ...],
        energies_before=[...], energies_after=[...],
        structures=[structure_c0, ...],            # aligned with ``candidates``
    )
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from dataclasses import dataclass
from datetime import datetime, timezone
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

_DASH = "—"
_DPI = 110
# Muted, colour-blind-friendly pair for "before"/"after" and the main series.
_C_BEFORE = "#8c8c8c"
_C_AFTER = "#1f6fb2"
_C_MAIN = "#1f6fb2"
_C_VAL = "#d9712b"

# Query keys shown first in the header, in this order; all other summary keys follow.
_HEADER_KEYS = ("composition", "model", "checkpoint", "reward", "seed", "wall_time_s", "wall_time", "versions")

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


def _energy_hist_figure(before: np.ndarray, after: np.ndarray) -> Figure | None:
    if before.size == 0 and after.size == 0:
        return None
    both = np.concatenate([before, after])
    # A few exploded structures (energies of tens of eV/atom) would squash everything else into one bar, so the
    # range stops 5 interquartile ranges beyond the quartiles (about 7 sigma: no real tail is cut); what falls
    # outside is counted in the title.
    q1, q3 = np.percentile(both, [25, 75])
    lo, hi = max(both.min(), q1 - 5 * (q3 - q1)), min(both.max(), q3 + 5 * (q3 - q1))
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    n_out = int(np.sum((both < lo) | (both > hi)))
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


def _with_boundary_images(atoms):
    """Add the periodic copies of atoms lying on cell faces/edges/corners, as crystal viewers do: otherwise a
    cubic perovskite shows one corner atom instead of eight and looks wrong."""
    from ase import Atoms

    frac = atoms.get_scaled_positions(wrap=True)
    frac[np.isclose(frac, 1.0, atol=1e-4)] = 0.0
    numbers = atoms.get_atomic_numbers()
    shifts = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], dtype=float)
    new_frac, new_numbers = [frac], [numbers]
    for shift in shifts[1:]:
        # An atom gets the copy shifted along every axis in which it sits on the 0 face.
        mask = np.all((shift == 0) | (frac < 1e-4), axis=1)
        if mask.any():
            new_frac.append(frac[mask] + shift)
            new_numbers.append(numbers[mask])
    cell = atoms.cell.array
    return Atoms(numbers=np.concatenate(new_numbers), positions=np.concatenate(new_frac) @ cell, cell=cell, pbc=True)


def _as_atoms(structure):
    from ase import Atoms

    if isinstance(structure, Atoms):
        return structure
    from pymatgen.io.ase import AseAtomsAdaptor

    return AseAtomsAdaptor.get_atoms(structure)


# Two views: down the a axis, and an oblique one that shows the 3D shape of the cell.
_VIEWS = (("along a", "-90y,-90z,0x"), ("oblique", "-65x,-20y,-15z"))


def _structure_figure(structure, title: str) -> Figure:
    from ase.data import chemical_symbols
    from ase.data.colors import jmol_colors
    from ase.visualize.plot import plot_atoms
    from matplotlib.patches import Patch

    atoms = _with_boundary_images(_as_atoms(structure))
    # Fixed margins instead of constrained layout: the axes are bare, and layout solving over hundreds of
    # patches would double the drawing time.
    fig = _new_figure(4.8, 2.9, constrained=False)
    axes = fig.subplots(1, 2, gridspec_kw=dict(left=0.02, right=0.98, bottom=0.13, top=0.83, wspace=0.06))
    for ax, (label, rotation) in zip(axes, _VIEWS):
        plot_atoms(atoms, ax, rotation=rotation, radii=0.45, show_unit_cell=2)
        ax.set_title(label, fontsize=9, color="#555555")
    elements = sorted(set(atoms.get_atomic_numbers().tolist()))
    handles = [Patch(facecolor=jmol_colors[z], edgecolor="black", linewidth=0.5, label=chemical_symbols[z]) for z in elements]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    return fig


# ---------------------------------------------------------------------------------------------- HTML
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


def _header_rows(summary: Mapping[str, Any]) -> str:
    keys = [k for k in _HEADER_KEYS if k in summary] + [k for k in summary if k not in _HEADER_KEYS]
    rows = []
    for key in keys:
        value = summary[key]
        if key in ("wall_time_s", "wall_time") and _finite(value) is not None:
            text, label = _fmt_duration(float(value)), "wall time"
        else:
            text, label = _fmt_value(value), key.replace("_", " ")
        rows.append(f"<tr><th>{_e(label)}</th><td>{_e(text)}</td></tr>")
    return "\n".join(rows)


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


@dataclass
class _Row:
    rank: Any
    formula: str
    spacegroup: str
    energy: float | None
    valid: bool
    file: Any
    id: str
    relax: Mapping[str, Any] | None = None


def _relax_text(relax: Mapping[str, Any] | None) -> str:
    if not relax:
        return _DASH
    status = str(relax.get("status", ""))
    force = relax.get("fmax_ev_per_a")
    detail = f", fmax {force:.3f} eV/Å" if isinstance(force, (int, float)) else ""
    steps = f"{relax['steps']} steps" if "steps" in relax else ""
    return {"converged": f"✓ {steps}{detail}".strip(), "not_converged": f"not converged{detail}",
            "failed": "failed (unrelaxed)"}.get(status, status.replace("_", " ") or _DASH)


def _rows(candidates: Sequence[Mapping[str, Any]]) -> list[_Row]:
    return [
        _Row(
            rank=c.get("rank", i + 1),
            formula=str(c.get("formula") or _DASH),
            spacegroup=str(c.get("spacegroup") or _DASH),
            energy=_finite(c.get("energy_per_atom_ev")),
            valid=bool(c.get("valid", False)),
            file=c.get("file"),
            id=str(c.get("id", "")),
            relax=c.get("relax"),
        )
        for i, c in enumerate(candidates)
    ]


def _best_energy(rows: Sequence[_Row]) -> float | None:
    # The reference is the best *valid* structure; invalid ones can have spuriously low MLIP energies.
    valid = [r.energy for r in rows if r.valid and r.energy is not None]
    pool = valid or [r.energy for r in rows if r.energy is not None]
    return min(pool) if pool else None


def _candidate_table(rows: Sequence[_Row], out_dir: Path) -> str:
    best = _best_energy(rows)
    with_relax = any(r.relax for r in rows)
    body = []
    for r in rows:
        energy = f"{r.energy:.4f}" if r.energy is not None else _DASH
        has_gap = r.valid and r.energy is not None and best is not None
        above = f"{(r.energy - best) * 1000.0:.1f}" if has_gap else _DASH
        href = _file_href(r.file, out_dir)
        link = f'<a href="{_e(href)}">{_e(Path(str(r.file)).name)}</a>' if href else _DASH
        valid = '<span class="ok">✓</span>' if r.valid else '<span class="bad">✗ invalid</span>'
        attrs = ("" if r.valid else ' class="invalid"') + (f' title="{_e(r.id)}"' if r.id else "")
        body.append(
            f'<tr{attrs}><td class="num">{_e(r.rank)}</td><td>{_e(r.formula)}</td><td>{_e(r.spacegroup)}</td>'
            f'<td class="num">{_e(energy)}</td><td class="num">{_e(above)}</td><td>{valid}</td>'
            + (f"<td>{_e(_relax_text(r.relax))}</td>" if with_relax else "")
            + f"<td>{link}</td></tr>"
        )
    head = (
        '<th class="num">rank</th><th>formula</th><th>space group</th><th class="num">energy (eV/atom)</th>'
        '<th class="num">above best (meV/atom)</th><th>valid</th>' + ("<th>relaxation</th>" if with_relax else "") + "<th>file</th>"
    )
    return f'<div class="scroll"><table class="cands"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _img(data: bytes, alt: str, rel: str) -> str:
    b64 = base64.b64encode(data).decode("ascii")
    return (
        f'<figure><img src="data:image/png;base64,{b64}" alt="{_e(alt)}">'
        f'<figcaption><a href="{_e(quote(rel))}">{_e(rel)}</a></figcaption></figure>'
    )


def _section(anchor: str, title: str, how: str, content: str) -> str:
    return (
        f'<section id="{_e(anchor)}"><h2>{_e(title)}</h2><p class="how"><b>How to read this:</b> {_e(how)}</p>'
        f"{content}</section>"
    )


_CSS = """
:root { --fg:#1d2430; --muted:#5b6675; --line:#dfe3e8; --accent:#1f6fb2; --bad:#b3261e; --bg:#f6f7f9; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--fg);
       font:15px/1.5 "Segoe UI", Roboto, "Helvetica Neue", Arial, "DejaVu Sans", sans-serif; }
main { max-width:1120px; margin:0 auto; padding:28px 24px 48px; }
header { background:#fff; border:1px solid var(--line); border-radius:10px; padding:18px 22px; }
h1 { font-size:24px; margin:0 0 10px; }
h2 { font-size:18px; margin:0 0 4px; }
section { background:#fff; border:1px solid var(--line); border-radius:10px; padding:18px 22px; margin-top:18px; }
p.how { color:var(--muted); margin:0 0 12px; font-size:13.5px; }
table { border-collapse:collapse; }
table.query th { text-align:left; color:var(--muted); font-weight:600; padding:2px 18px 2px 0; vertical-align:top; }
table.query td { padding:2px 0; }
.scroll { overflow-x:auto; }
table.cands { width:100%; font-size:14px; }
table.cands th { text-align:left; border-bottom:2px solid var(--line); padding:6px 10px; color:var(--muted);
                 font-weight:600; white-space:nowrap; }
table.cands th.num { text-align:right; }
table.cands td { border-bottom:1px solid var(--line); padding:5px 10px; }
table.cands tbody tr:nth-child(even) { background:#fafbfc; }
table.cands tr.invalid td { color:#8a8f98; }
td.num { text-align:right; font-variant-numeric:tabular-nums; font-size:13px;
         font-family:"DejaVu Sans Mono", Menlo, Consolas, monospace; }
.ok { color:#2a7d46; font-weight:600; }
.bad { color:var(--bad); font-weight:600; }
a { color:var(--accent); text-decoration:none; }
a:hover { text-decoration:underline; }
.grid { display:grid; grid-template-columns:repeat(auto-fill, minmax(min(480px, 100%), 1fr)); gap:14px; }
figure { margin:0; }
figure img { display:block; width:auto; max-width:100%; height:auto; border:1px solid var(--line); border-radius:6px; background:#fff; }
.grid figure img { width:100%; }
figcaption { font-size:12px; color:var(--muted); margin-top:3px; }
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
        summary: the query and provenance (composition, model, reward, seed, wall_time_s, versions, ...); every
            key is shown, the well-known ones first.
        candidates: one dict per candidate with ``rank, id, formula, spacegroup, energy_per_atom_ev, valid,
            file``; the energy may be None/NaN (shown as "—").
        history: RL iterations, rows with ``iteration`` and any of ``reward_mean``, ``reward_std``,
            ``val_reward_mean``, ``energy_per_atom_ev_mean``, ``invalid_fraction``, ...; section skipped if empty.
        energies_before, energies_after: energy per atom of the samples before and after RL (non-finite values
            are dropped); section skipped if both are empty.
        schedule: ``{"t": [...], "pos_s": [...], "cell_s": [...], "pos_sigma": [...]}``, any subset of series.
        structures: aligned with ``candidates`` (``structures[i]`` is candidate ``i``; None entries allowed);
            pictures of the ``top_k`` best-ranked candidates that have one.
        top_k: how many structures to draw.

    Returns:
        The path of ``report.html``.
    """
    out_dir = Path(out_dir)
    fig_dir = out_dir / FIGURES_DIR
    fig_dir.mkdir(parents=True, exist_ok=True)
    rows = _rows(candidates)
    if structures is not None and len(structures) != len(rows):
        raise ValueError(f"{len(structures)} structures for {len(rows)} candidates; they must be aligned")

    def emit(fig: Figure, name: str, alt: str) -> str:
        data = _figure_bytes(fig)
        _write_bytes(fig_dir / name, data)
        return _img(data, alt, f"{FIGURES_DIR}/{name}")

    sections = []
    n_valid = sum(r.valid for r in rows)
    if rows:  # an RL-fit report has training curves, no candidates
        sections.append(
            _section(
                "candidates",
                f"Candidates ({len(rows)}, {n_valid} valid)",
                "ranked by MLIP energy per atom (lower is more stable); 'above best' is the gap to the lowest-energy "
                "valid candidate in meV/atom, so 0 marks the best. Invalid structures (overlapping atoms, degenerate "
                "cells) are greyed out and have no gap.",
                _candidate_table(rows, out_dir),
            )
        )

    if structures is not None and top_k > 0:
        order = sorted(range(len(rows)), key=lambda i: (_finite(rows[i].rank) is None, _finite(rows[i].rank) or 0.0, i))
        chosen = [i for i in order if structures[i] is not None][:top_k]
        figs = []
        for n, i in enumerate(chosen, start=1):
            r = rows[i]
            energy = f"{r.energy:.3f} eV/atom" if r.energy is not None else "no energy"
            caption = f"#{r.rank}  {r.formula}  ·  {r.spacegroup}  ·  {energy}" + ("" if r.valid else "  ·  INVALID")
            fig = _structure_figure(structures[i], caption)
            figs.append(emit(fig, f"structure_{n:02d}.png", caption))
        if figs:
            sections.append(
                _section(
                    "structures",
                    f"Top {len(figs)} structures",
                    "one unit cell per candidate (the cell is the dashed box; atoms on its faces and corners are "
                    "repeated for clarity), seen down the a axis and from an oblique angle; colours follow the legend.",
                    f'<div class="grid">{"".join(figs)}</div>',
                )
            )

    if history:
        fig = _history_figure(history)
        if fig is not None:
            sections.append(
                _section(
                    "history",
                    "RL progress",
                    "each point is one RL iteration; the reward should rise and the energy fall while the invalid "
                    "fraction stays low. Shaded bands are ± one standard deviation over the batch; validation "
                    "curves use held-out samples.",
                    emit(fig, "rl_history.png", "reward and energy over RL iterations"),
                )
            )

    before, after = _finite_array(energies_before), _finite_array(energies_after)
    fig = _energy_hist_figure(before, after)
    if fig is not None:
        sections.append(
            _section(
                "energies",
                "Energy distribution",
                "energy per atom of the generated structures, before and after RL, on the same bins; dashed lines "
                "are medians. RL working means the 'after' mass moves left (lower energy).",
                emit(fig, "energy_hist.png", "energy per atom before vs after RL"),
            )
        )

    if schedule:
        fig = _schedule_figure(schedule)
        if fig is not None:
            sections.append(
                _section(
                    "schedule",
                    "Learned schedule",
                    "s(t) is the learned velocity annealing: the frozen velocity is scaled by 1 + s(t) (the dashed "
                    "line is the untrained s = 0); σ(t) is the exploration noise of the RL policy along the trajectory, "
                    "from noise (t=0) to data (t=1).",
                    emit(fig, "schedule.png", "learned schedule"),
                )
            )

    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
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
<table class="query">
{_header_rows(summary)}
</table>
</header>
{chr(10).join(sections)}
<footer>Generated {_e(stamp)} by crystalign.</footer>
</main>
</body>
</html>
"""
    path = out_dir / REPORT_NAME
    # Explicit UTF-8 (the page declares it), independent of the locale's default encoding.
    _write_bytes(path, page.encode("utf-8"))
    return path
