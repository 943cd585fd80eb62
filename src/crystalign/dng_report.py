"""A self-contained HTML report of de novo generated crystals: the DNG metrics, histograms of the generated set
against the reference set, and a table of every crystal with its validity, novelty and energy above the hull.

Example::

    result = dng_metrics(generated, reference, training, dataset="perov_5", e_above_hull=e_hull)
    write_dng_report("report.html", result, generated, reference, names=[...], provenance={"command": ...})
"""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from pymatgen.core import Structure

    from crystalign.dng_metrics import DNGMetrics

#: crystals listed in the table (the rest are counted, and are in the JSON of ``evaluate --out``)
MAX_ROWS = 1000

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;font-size:13px}
td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}th{background:#f3f3f3}td.l,th.l{text-align:left}
tr.sun td{background:#eef8ee}img{max-width:100%}.note{color:#666;font-size:13px}
"""


def _e(x: Any) -> str:
    return html.escape(str(x))


def _fmt(value: Any, pct: bool = False) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{100 * value:.1f} %" if pct else f"{value:.4g}"
    return _e(value)


def _histograms(generated: Sequence["Structure | None"], valid: Sequence[bool], reference: Sequence["Structure"],
                e_hull: Sequence[float | None] | None) -> bytes | None:
    from crystalign.report import _figure_bytes, _new_figure

    gen = [s for s, ok in zip(generated, valid) if ok and s is not None]
    if not gen:
        return None
    panels = [
        ("density (g/cm³)", [float(s.density) for s in gen], [float(s.density) for s in reference]),
        ("distinct elements", [len(s.composition.elements) for s in gen], [len(s.composition.elements) for s in reference]),
    ]
    values = [v for v in (e_hull or []) if v is not None and np.isfinite(v)]
    fig = _new_figure(4.0 * (len(panels) + (1 if values else 0)), 3.0)
    axes = fig.subplots(1, len(panels) + (1 if values else 0))
    for ax, (label, g, r) in zip(axes, panels):
        both = np.asarray(g + r, dtype=float)
        bins = np.linspace(both.min(), both.max() + 1e-9, 30) if label.startswith("density") else np.arange(0.5, both.max() + 1.5)
        ax.hist(r, bins=bins, density=True, alpha=0.5, label=f"reference ({len(r)})")
        ax.hist(g, bins=bins, density=True, alpha=0.5, label=f"generated, valid ({len(g)})")
        ax.set_xlabel(label)
        ax.legend(fontsize=8)
    if values:
        ax = axes[-1]
        ax.hist(np.clip(values, None, 3.0), bins=30)
        ax.axvline(0.0, color="k", lw=0.8)
        ax.set_xlabel("E above hull (eV/atom; > 3 shown at 3)")
    return _figure_bytes(fig, "png")


def render_dng_report(
    result: "DNGMetrics",
    generated: Sequence["Structure | None"],
    reference: Sequence["Structure"],
    names: Sequence[str] | None = None,
    title: str = "De novo generated crystals",
    provenance: Mapping[str, Any] | None = None,
) -> str:
    """The report as one HTML string (figures embedded)."""
    from crystalign.metrics import structure_validity

    data = result.to_dict(details=True)
    records = data.pop("structures")
    names = list(names) if names is not None else [f"{i:06d}" for i in range(len(generated))]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(title)}</title><style>{_STYLE}</style></head><body>",
             f"<h1>{_e(title)}</h1>"]
    pct_keys = {"struct_valid", "comp_valid", "valid", "cov_recall", "cov_precision", "cov_recall_valid", "cov_precision_valid",
                "cov_recall_struct", "cov_recall_comp", "cov_precision_struct", "cov_precision_comp",
                "uniqueness", "novelty", "stable_rate", "metastable_rate", "sun_rate", "msun_rate"}
    rows = "".join(
        f"<tr><th class='l'>{_e(k)}</th><td>{_fmt(v, k in pct_keys) if not isinstance(v, (dict, list, tuple)) else _e(v)}</td></tr>"
        for k, v in data.items()
    )
    parts.append(f"<h2>Metrics</h2><table>{rows}</table>")
    valid = structure_validity(generated)
    png = _histograms(generated, valid, reference, [r.get("e_above_hull") for r in records] if data.get("n_e_above_hull") else None)
    if png is not None:
        parts.append(f"<h2>Against the reference set</h2><img alt='histograms' src='data:image/png;base64,{base64.b64encode(png).decode()}'>")
    # S.U.N. first, then the lowest E-hull, then valid before invalid
    order = sorted(
        range(len(records)),
        key=lambda i: (not records[i].get("sun"), records[i].get("e_above_hull") if records[i].get("e_above_hull") is not None else np.inf,
                       not (records[i].get("struct_valid") and records[i].get("comp_valid")), i),
    )
    head = "<tr><th class='l'>crystal</th><th class='l'>formula</th><th>atoms</th><th>density</th><th>struct. valid</th>" \
           "<th>comp. valid</th><th>unique</th><th>novel</th><th>E-hull (eV/atom)</th><th>S.U.N.</th></tr>"
    body = []
    for i in order[:MAX_ROWS]:
        r, s = records[i], generated[i]
        formula = s.composition.reduced_formula if s is not None else "unreadable"
        body.append(
            f"<tr class='{'sun' if r.get('sun') else ''}'><td class='l'>{_e(names[i])}</td><td class='l'>{_e(formula)}</td>"
            f"<td>{len(s) if s is not None else '—'}</td><td>{_fmt(float(s.density)) if s is not None else '—'}</td>"
            + "".join(f"<td>{_fmt(r.get(k))}</td>" for k in ("struct_valid", "comp_valid", "unique", "novel", "e_above_hull", "sun"))
            + "</tr>"
        )
    more = f"<p class='note'>{len(records) - MAX_ROWS} more crystals are not listed (all are in the JSON of --out).</p>" if len(records) > MAX_ROWS else ""
    parts.append(f"<h2>Crystals</h2><table>{head}{''.join(body)}</table>{more}")
    if provenance:
        prov = "".join(f"<tr><th class='l'>{_e(k)}</th><td class='l'>{_e(v)}</td></tr>" for k, v in provenance.items())
        parts.append(f"<h2>Provenance</h2><table>{prov}</table>")
    parts.append("</body></html>")
    return "".join(parts)


def write_dng_report(path: str | os.PathLike, *args: Any, **kwargs: Any) -> Path:
    """Write :func:`render_dng_report` to ``path`` atomically."""
    from crystalign.io import write_text

    write_text(path, render_dng_report(*args, **kwargs))
    return Path(path)
