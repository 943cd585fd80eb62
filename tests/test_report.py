"""The HTML run report: content, layout, escaping, self-containment, and rendering in a real headless browser.

The browser tests need Chromium (``.ci/install-browser`` installs it). Without it they skip, unless
CRYSTALIGN_REQUIRE_BROWSER=1 (set in CI), where a missing browser is a failure.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
import os
import re
import shutil
import signal
import subprocess
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

from crystalign.report import THREEDMOL_SHA256, THREEDMOL_VERSION, plot_schedule, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# The comment the report puts before the inlined library, and a piece of the library's own code (its export).
LIB_BANNER = f"3Dmol.js {THREEDMOL_VERSION}, inlined by crystalign"
LIB_CODE = 'root["3Dmol"]=factory()'


# ---------------------------------------------------------------------------------------------- inputs
def _structures() -> list[Structure]:
    perovskite = Structure.from_spacegroup(
        "Pm-3m", Lattice.cubic(3.9), ["Sr", "Ti", "O"], [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0]]
    )
    rutile = Structure.from_spacegroup(
        "P4_2/mnm", Lattice.tetragonal(4.594, 2.959), ["Ti", "O"], [[0, 0, 0], [0.3048, 0.3048, 0]]
    )
    # A tilted, lower-symmetry SrTiO3 variant: a strained monoclinic cell with displaced atoms.
    distorted = Structure(
        Lattice.monoclinic(3.95, 3.88, 4.02, 93.0),
        ["Sr", "Ti", "O", "O", "O"],
        [[0.0, 0.0, 0.0], [0.52, 0.49, 0.51], [0.5, 0.5, 0.03], [0.5, 0.02, 0.5], [0.03, 0.5, 0.5]],
    )
    # Invalid: two atoms almost on top of each other.
    clash = Structure(Lattice.cubic(3.9), ["Sr", "Ti", "O", "O", "O"],
                      [[0, 0, 0], [0.02, 0.01, 0.0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    # Valid but distrusted (say, a potential's hole): the lowest energy of all, which must not become the answer.
    hole = Structure(Lattice.cubic(2.9), ["Sr", "Ti", "O", "O", "O"],
                     [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    return [perovskite, distorted, rutile, clash, hole]


UNTRUSTED_REASON = "energy far below the potential's training range (Sr–O 1.45 Å)"
SYMMETRY_NOTE = "Pm-3m (221) is 2.1 meV/atom above the distorted P2/m (10)"


def _inputs(tmp_path: Path, formula0: str = "SrTiO3") -> dict:
    structures = _structures()
    cif_dir = tmp_path / "cifs"
    cif_dir.mkdir(parents=True, exist_ok=True)
    candidates = []
    energies = [-8.0123, -7.9811, -7.9502, None, -9.7]
    sgs = ["Pm-3m (221)", "P2/m (10)", "P4_2/mnm (136)", "P1 (1)", "Pm-3m (221)"]
    relax = [{"status": "converged", "steps": 12, "fmax_ev_per_a": 0.031},
             {"status": "not_converged", "steps": 100, "fmax_ev_per_a": 0.213},
             {"status": "converged", "steps": 40, "fmax_ev_per_a": 0.044},
             {"status": "skipped_invalid"},
             {"status": "converged", "steps": 7, "fmax_ev_per_a": 0.01}]
    for i, (s, e, sg) in enumerate(zip(structures, energies, sgs)):
        file = cif_dir / f"cand_{i}.cif"
        s.to(filename=str(file))
        candidates.append(
            {
                "rank": i + 1,
                "id": f"cand_{i}",
                "formula": formula0 if i == 0 else s.composition.reduced_formula,
                "spacegroup": sg,
                "energy_per_atom_ev": e,
                "valid": i != 3,
                "file": f"cifs/cand_{i}.cif",
                "relax": relax[i],
            }
        )
    # The optional keys of the trust and symmetry checks.
    candidates[0]["spacegroups"] = {"0.01": "Pm-3m (221)", "0.1": "Pm-3m (221)"}
    candidates[0]["conventional_file"] = "cifs/cand_0_conventional.cif"
    candidates[1]["spacegroups"] = {"0.01": "P2/m (10)", "0.1": "Pm-3m (221)"}
    candidates[1]["symmetry_note"] = SYMMETRY_NOTE
    candidates[4].update(trusted=False, untrusted_reason=UNTRUSTED_REASON, rank=None)
    rng = np.random.default_rng(0)
    history = []
    for it in range(30):
        row = {
            "iteration": it,
            "reward_mean": 7.0 + 1.2 * (1 - math.exp(-it / 8)) + 0.05 * rng.normal(),
            "reward_std": 0.6 * math.exp(-it / 20) + 0.1,
            "energy_per_atom_ev_mean": -7.0 - 1.2 * (1 - math.exp(-it / 8)),
            "invalid_fraction": 0.2 * math.exp(-it / 6),
        }
        if it % 5 == 0:
            row["val_reward_mean"] = row["reward_mean"] - 0.1
        history.append(row)
    t = np.linspace(1e-3, 1.0, 50)
    return dict(
        title="SrTiO3 — inference-time RL",
        summary={
            "composition": "SrTiO3",
            "model": "omatg-perov5",
            "model_hash": "9f" * 32,
            "reward": "sevenn (energy per atom)",
            "mlip": {"name": "sevenn", "model": "/models/7net-0.pth"},
            "seed": 0,
            "symprec": 0.1,
            "warnings": ["SrTiO3 needs 5 atoms per cell; the model was trained on up to 20, fine"],
            "wall_time_s": 812.4,
            "command": "crystalign predict SrTiO3 -n 32",
            "n_relax_not_converged": 1,
            "best_energy_per_atom_ev": -8.0123,
            "versions": {"crystalign": "0.1.0", "torch": "2.5.1", "pymatgen": "2024.11.13"},
        },
        candidates=candidates,
        history=history,
        energies_before=list(rng.normal(-7.0, 0.5, 256)) + [float("nan")],
        energies_after=list(rng.normal(-8.1, 0.3, 256)),
        schedule={"t": t.tolist(), "pos_s": (0.3 * t).tolist(), "cell_s": (-0.1 * t).tolist(),
                  "pos_sigma": (0.1668 * np.sqrt((1 - t) / t)).tolist()},
        structures=structures,
    )


def _data_uri_pngs(page: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def _without_scripts(page: str) -> str:
    """The page's markup, without the contents of its <script> elements (the inlined library is 0.5 MB of code)."""
    return re.sub(r"<script>.*?</script>", "<script></script>", page, flags=re.S)


def _table(page: str, cls: str) -> str:
    match = re.search(rf'<table class="cands {cls}">.*?</table>', page, flags=re.S)
    assert match, cls
    return match.group(0)


def _column(table: str, n: int) -> list[str]:
    """Text of the ``n``-th cell of every body row (candidates, not the note lines under them)."""
    body = re.search(r"<tbody>(.*)</tbody>", table, flags=re.S).group(1)
    return [re.sub(r"<[^>]+>", "", re.findall(r"<td[^>]*>(.*?)</td>", row, flags=re.S)[n])
            for row in re.findall(r'<tr(?! class="note)[^>]*>(.*?)</tr>', body, flags=re.S)]


# ---------------------------------------------------------------------------------------------- unit tests
@pytest.fixture(scope="module")
def full_report(tmp_path_factory) -> Path:
    """One report with every section, shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("report") / "run"
    path = write_report(out, **_inputs(out))
    assert path == out / "report.html"
    return path


def _lean(inputs: dict) -> dict:
    """Drop the chart sections, for tests about something else: fewer figures to draw."""
    return {**inputs, "history": None, "energies_before": None, "energies_after": None, "schedule": None}


def test_full_report_contents(full_report):
    out, path = full_report.parent, full_report
    page = path.read_text(encoding="utf-8")
    markup = _without_scripts(page)

    # Figures: written as separate PNGs and embedded as the very same bytes; structures are 3-D views, not PNGs.
    files = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert files == ["energy_hist.png", "rl_history.png", "schedule.png"]
    embedded = _data_uri_pngs(page)
    assert len(embedded) == len(files)
    on_disk = {(out / "figures" / f).read_bytes() for f in files}
    assert all(png.startswith(PNG_MAGIC) for png in embedded) and set(embedded) == on_disk
    assert not list(out.rglob("*.part"))  # atomic writes leave no temporaries
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in [path, *(out / "figures").iterdir()])  # shareable

    # The first screen: composition, facts, warnings, the ranked answer with plain labels and units.
    assert '<p class="composition">Composition <b>SrTiO3</b></p>' in markup
    for text in ("model <b>omatg-perov5</b>", "potential <b>sevenn 7net-0.pth</b>", "13 min 32 s",
                 "Answer: 3 ranked structures for SrTiO3", "as computed by the interatomic potential sevenn 7net-0.pth;"):
        assert text in markup, text
    assert "the model was trained on up to 20" in markup.split('<section id="answer">')[0]  # warnings up top
    ranked = _table(markup, "ranked")
    for header in ("rank", "formula", "space group<br>tolerance 0.01 Å", "space group<br>tolerance 0.1 Å",
                   "energy per atom<br>(eV/atom)", "energy above<br>the best<br>(meV/atom)", "relaxation<br>converged?",
                   "files"):
        assert f">{header}</th>" in ranked, header
    assert _column(ranked, 0) == ["1", "2", "3"]
    assert _column(ranked, 2) == ["Pm-3m (221)", "P2/m (10)", "—"]  # tolerance 0.01 Å; rutile has no per-tolerance groups
    assert _column(ranked, 3) == ["Pm-3m (221)", "Pm-3m (221)", "P4_2/mnm (136)"]  # its one group is at symprec 0.1 Å
    assert _column(ranked, 4) == ["-8.0123", "-7.9811", "-7.9502"]
    assert _column(ranked, 5) == ["0.0", "31.2", "62.1"]  # meV/atom above rank 1, not above the untrusted -9.7
    assert _column(ranked, 6) == ["yes", "no (0.21 eV/Å)", "yes"]
    # the symmetry note: a line of its own right under its candidate
    assert re.search(rf'title="cand_1">.*?</tr><tr class="note[^"]*"><td></td><td colspan="7">{re.escape(SYMMETRY_NOTE)}</td></tr>',
                     ranked)
    assert ranked.count('<tr class="note') == 1
    assert 'href="cifs/cand_0.cif"' in ranked and 'href="cifs/cand_0_conventional.cif">conventional cell</a>' in ranked

    # Untrusted and invalid candidates: set apart with the reason, never ranked.
    untrusted = _table(markup, "untrusted")
    assert "Not ranked (untrusted): 2 candidates" in markup
    assert "cand_3.cif" in untrusted and "cand_4.cif" in untrusted
    assert "cand_3.cif" not in ranked and "cand_4.cif" not in ranked and "-9.7" not in ranked
    assert UNTRUSTED_REASON.replace("'", "&#x27;") in untrusted and "invalid geometry" in untrusted

    # One 3-D view per ranked structure (top_k 6 > 3), each with the structure as CIF and a legend.
    views = re.findall(r'<div class="viewer"[^>]*>', markup)
    assert [re.search(r'data-rank="(\d+)"', v).group(1) for v in views] == ["1", "2", "3"]
    cif = html.unescape(re.search(r'data-cif="([^"]*)"', views[0]).group(1))
    assert "_cell_length_a 3.900000" in cif and "_atom_site_fract_x" in cif
    assert len(re.findall(r"^(Sr|Ti|O)\d+ ", cif, flags=re.M)) == 21  # with the copies on the faces: see below
    assert json.loads(html.unescape(re.search(r"data-colors='([^']*)'", views[0]).group(1))) == {
        "Sr": "#00ff00", "Ti": "#bfc2c7", "O": "#ff0d0d"}  # Jmol colours
    assert markup.count('<span class="legend">') == 3

    # Below the fold: captioned figures that say what changed, then the provenance folded in <details>.
    assert "the mean reward rose from 7.01 to 8.18" in markup
    assert "the mean energy per atom of the RL policy&#x27;s samples fell from -7.000 to -8.168 eV/atom" in markup
    assert re.search(r"the median fell by \d+ meV/atom", markup)
    order = [markup.index(s) for s in ('<section id="answer">', '<section id="untrusted">', '<section id="history">',
                                       '<section id="energies">', '<section id="schedule">', '<details id="provenance">')]
    assert order == sorted(order)
    details = re.search(r'<details id="provenance">.*?</details>', markup, flags=re.S).group(0)
    for label in ("package versions", "torch", "2.5.1", "command", "crystalign predict SrTiO3 -n 32",
                  "model hash (sha256)", "random seed", "space-group tolerance (Å)", "relaxations not converged",
                  "best energy per atom (eV/atom)"):
        assert f">{label}<" in details, label
    assert "n_relax_not_converged" not in markup and "best energy per atom ev" not in markup  # no raw keys


def test_self_contained(full_report):
    page = full_report.read_text(encoding="utf-8")
    markup = _without_scripts(page)
    refs = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', markup, flags=re.I)
    assert refs
    assert not [r for r in refs if re.match(r"\s*(https?:)?//", r, flags=re.I)]
    assert all(r.startswith("data:image/png;base64,") or not re.match(r"[a-z]+:", r) for r in refs)
    assert "<link" not in markup and not re.search(r"<script[^>]", page)  # no external script or stylesheet
    css = re.search(r"<style>(.*?)</style>", page, flags=re.S).group(1)
    assert "@import" not in css and "url(" not in css
    # The library once, in the first of two scripts, with its licence; then the code that draws the views.
    assert page.count("<script>") == 2 and page.count(LIB_BANNER) == 1 and page.count(LIB_CODE) == 1
    assert "Redistribution and use in source and binary forms" in page
    assert page.index(LIB_BANNER) < page.index(LIB_CODE) < page.index("lib.createViewer(box")


def test_vendored_viewer_is_pinned():
    folder = resources.files("crystalign") / "report_assets"
    code = (folder / "3Dmol-min.js").read_bytes()
    assert hashlib.sha256(code).hexdigest() == THREEDMOL_SHA256
    assert code.count(LIB_CODE.encode()) == 1
    readme = (folder / "README.md").read_text(encoding="utf-8")
    assert THREEDMOL_VERSION in readme and THREEDMOL_SHA256 in readme and "npm" in readme
    licence = (folder / "3Dmol.LICENSE.txt").read_text(encoding="utf-8")
    assert "BSD-3-Clause" in licence and "University of Pittsburgh" in licence


def test_text_is_escaped(tmp_path):
    inputs = {**_lean(_inputs(tmp_path, formula0="<script>alert(1)</script>")), "top_k": 1}
    inputs["title"] = 'Run "A" & <b>B</b>'
    inputs["summary"]["model"] = "<img src=x onerror=alert(1)>"
    inputs["summary"]["warnings"] = ["<b>careful</b>"]
    inputs["candidates"][1]["file"] = 'cifs/a"b <c>.cif'
    inputs["candidates"][1]["symmetry_note"] = "</td><script>x()</script>"
    inputs["candidates"][4]["untrusted_reason"] = "<i>odd</i>"
    page = write_report(tmp_path, **inputs).read_text(encoding="utf-8")
    markup = _without_scripts(page)
    assert "<script>alert" not in page and "<script>x()" not in page and "<img src=x" not in page
    assert "<b>B</b>" not in page and "<b>careful</b>" not in page and "<i>odd</i>" not in page
    assert page.count("<script>") == 2  # only the library and the viewer code
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in markup
    assert "Run &quot;A&quot; &amp; &lt;b&gt;B&lt;/b&gt;" in markup
    assert 'href="cifs/a%22b%20%3Cc%3E.cif"' in markup  # the href is percent-encoded, the link text escaped


def test_no_trustworthy_answer(tmp_path):
    inputs = _lean(_inputs(tmp_path))
    for c in inputs["candidates"]:
        c.update(trusted=False, untrusted_reason="every relaxation diverged")
    inputs["summary"].update(answer="none", no_answer_reason="All 5 candidates failed the trust checks.")
    page = write_report(tmp_path, **inputs).read_text(encoding="utf-8")
    assert "No trustworthy structure was found for SrTiO3." in page
    assert "All 5 candidates failed the trust checks." in page
    assert 'class="cands ranked"' not in page and '<div class="viewer"' not in page
    assert "<script" not in page  # no views, so no library either
    assert _column(_table(page, "untrusted"), 0) == ["SrTiO3", "SrTiO3", "TiO2", "SrTiO3", "SrTiO3"]
    assert page.index("No trustworthy structure") < page.index('<section id="untrusted">')

    # Without the summary saying so, candidates that are all invalid or untrusted lead to the same verdict.
    inputs = _lean(_inputs(tmp_path / "b"))
    for c in inputs["candidates"]:
        c["valid"] = False
    page = write_report(tmp_path / "b", **inputs).read_text(encoding="utf-8")
    assert "No trustworthy structure was found for SrTiO3." in page and "None of the 5 candidates" in page


def test_rl_figures_only_when_rl_ran(tmp_path):
    inputs = {**_inputs(tmp_path), "history": [], "schedule": None, "energies_after": None}
    page = write_report(tmp_path, **inputs).read_text(encoding="utf-8")
    assert '<section id="history">' not in page and "RL progress" not in page
    assert not (tmp_path / "figures" / "rl_history.png").exists()
    assert '<section id="energies">' in page
    assert re.search(r"Energy per atom of the 256 sampled structures \(median -\d\.\d{3} eV/atom\)", page)


def test_missing_sections_are_skipped(tmp_path):
    cands = [{"rank": 1, "id": "x", "formula": "Si", "spacegroup": None, "energy_per_atom_ev": float("nan"),
              "valid": False, "file": None}]
    page = write_report(tmp_path, "minimal", {"composition": "Si"}, cands, history=[],
                        energies_before=[float("nan")], energies_after=None, schedule=None,
                        structures=None).read_text(encoding="utf-8")
    assert '<section id="answer">' in page and '<section id="untrusted">' in page
    for section in ("history", "energies", "schedule"):
        assert f'<section id="{section}">' not in page
    assert "<img" not in page and "<script" not in page and not list((tmp_path / "figures").glob("*.png"))

    # An RL-fit report: curves and the provenance, no answer; partial inputs (history without rewards, only
    # "after" energies, a schedule with only sigma) still plot.
    page = write_report(tmp_path / "b", "partial", {"seed": 3}, [], history=[{"iteration": 0, "invalid_fraction": 0.5},
                                                                             {"iteration": 1, "invalid_fraction": 0.25}],
                        energies_after=[-3.0, -3.1, -2.9], schedule={"t": [0.1, 0.5, 1.0], "pos_sigma": [1.0, 0.5, 0.0]},
                        structures=[]).read_text(encoding="utf-8")
    for section in ("history", "energies", "schedule"):
        assert f'<section id="{section}">' in page
    assert "the invalid fraction fell from 50 to 25 %" in page
    assert '<section id="answer">' not in page and "No trustworthy" not in page
    assert '<details id="provenance">' in page and ">random seed<" in page


def test_structures_must_align_with_candidates(tmp_path):
    inputs = _inputs(tmp_path)
    inputs["structures"] = inputs["structures"][:2]
    with pytest.raises(ValueError, match="aligned"):
        write_report(tmp_path, **inputs)


def test_top_k_limits_views(tmp_path):
    inputs = _inputs(tmp_path)
    inputs["structures"][0] = None  # a candidate without a structure is passed over, not drawn
    page = write_report(tmp_path, **_lean(inputs), top_k=1).read_text(encoding="utf-8")
    assert re.findall(r'<div class="viewer"[^>]*data-rank="(\d+)"', page) == ["2"]
    assert 'aria-label="3-D view of #2 SrTiO3, P2/m (10), -7.981 eV/atom"' in page
    page = write_report(tmp_path, **_lean(inputs), top_k=0).read_text(encoding="utf-8")
    assert '<div class="viewer"' not in page and "<script" not in page


def test_views_take_ase_atoms_and_skip_what_they_cannot_draw(tmp_path):
    from pymatgen.io.ase import AseAtomsAdaptor

    inputs = _lean(_inputs(tmp_path))
    inputs["structures"][0] = "not a structure"
    inputs["structures"][1] = AseAtomsAdaptor.get_atoms(inputs["structures"][1])
    with pytest.warns(UserWarning, match="no 3-D view of candidate cand_0"):
        page = write_report(tmp_path, **inputs).read_text(encoding="utf-8")
    assert re.findall(r'<div class="viewer"[^>]*data-rank="(\d+)"', page) == ["2", "3"]
    assert _column(_table(page, "ranked"), 0) == ["1", "2", "3"]  # the table keeps every candidate


def test_view_puts_an_atom_on_the_corner_and_repeats_boundary_atoms():
    """Generated crystals sit anywhere in their cell: the view moves the origin onto the atom that puts the most
    atoms on the cell's boundary, and draws their periodic copies, so a perovskite looks like one."""
    from crystalign.report import _p1_cif

    def sites(structure):
        cif, _ = _p1_cif(structure)
        rows = [ln.split() for ln in cif.splitlines() if re.match(r"(Sr|Ti|O)\d+ ", ln)]
        return sorted((r[1], *(round(float(x), 3) for x in r[2:])) for r in rows)

    perovskite = _structures()[0]
    shifted = perovskite.copy()
    shifted.translate_sites(list(range(len(shifted))), [0.137, 0.61, 0.29])  # an arbitrary origin
    # Ti on the 8 corners, O on the 12 edge centres (4 copies each of 3), Sr in the middle
    assert sites(shifted) == sites(perovskite)
    drawn = sites(perovskite)
    assert [s[0] for s in drawn].count("Ti") == 8 and [s[0] for s in drawn].count("O") == 12
    assert ("Ti", 0.0, 0.0, 0.0) in drawn and ("Ti", 1.0, 1.0, 1.0) in drawn and ("Sr", 0.5, 0.5, 0.5) in drawn
    # a relaxation's last few mÅ of drift still counts as on the face
    nudged = perovskite.copy()
    nudged.translate_sites([1], [0.004, -0.003, 0.002])
    assert len(sites(nudged)) == 21


def test_energy_histogram_keeps_outliers_from_squashing_the_plot():
    from crystalign.report import _energy_hist_figure, _hist_caption

    rng = np.random.default_rng(1)
    before = np.concatenate([rng.normal(-7.0, 0.5, 200), [250.0]])  # one exploded structure
    after = rng.normal(-8.0, 0.3, 200)
    ax = _energy_hist_figure(before, after).axes[0]
    assert "1 outside the shown range" in ax.get_title()
    assert ax.get_xlim()[1] < 0
    assert "1 structure with energies far from the rest lies outside" in _hist_caption(before, after)
    # Only one side, or identical values, still gives a plot.
    assert _energy_hist_figure(np.empty(0), np.full(5, -3.0)) is not None
    assert _energy_hist_figure(np.empty(0), np.empty(0)) is None


def test_plot_schedule(tmp_path):
    from PIL import Image

    path = plot_schedule({"t": [0.0, 0.5, 1.0], "pos_s": [0.0, 0.6, 1.0], "cell_s": [0.0, 0.4, 1.0],
                          "pos_sigma": [0.3, 0.2, 0.1], "kind": "mlp"}, tmp_path / "sub" / "schedule.png")
    assert path.read_bytes().startswith(PNG_MAGIC)
    with Image.open(path) as im:
        assert im.width > 300 and im.height > 200
    with pytest.raises(ValueError, match="'t'"):
        plot_schedule({"pos_s": [0.0, 1.0]}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="values for"):
        plot_schedule({"t": [0.0, 1.0], "pos_s": [0.0]}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="no series"):
        plot_schedule({"t": [0.0, 1.0]}, tmp_path / "x.png")


# ---------------------------------------------------------------------------------------------- browser
# Injected into a *copy* of the report only. The head part records console.error calls, uncaught exceptions,
# rejected promises and failed resource loads from the very start of parsing; the body part (after the report's
# own scripts, which draw the 3-D views synchronously) waits for load, checks that every <img> decoded, counts
# the non-white pixels of each viewer's WebGL canvas (3Dmol keeps its drawing buffer, so it can be read back),
# and publishes the verdict as JSON in a <pre> that --dump-dom prints.
_PROBE_HEAD = """<script>
window.__errors = [];
window.addEventListener("error", function (e) {
  window.__errors.push("error: " + (e.message || (e.target && (e.target.src || e.target.href) || "").slice(0, 80) || "resource"));
}, true);
window.addEventListener("unhandledrejection", function (e) { window.__errors.push("rejection: " + e.reason); });
(function () {
  var orig = console.error;
  console.error = function () { window.__errors.push("console.error: " + Array.prototype.join.call(arguments, " ")); orig.apply(console, arguments); };
})();
</script>"""

_PROBE_BODY = """<script>
// Synchronous on purpose: "load" fires only after every image has loaded or failed, and a PNG that does not
// decode has naturalWidth 0. (Waiting on img.decode() promises races --dump-dom under a loaded CPU.)
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var root = document.documentElement;
  var viewers = Array.prototype.slice.call(document.querySelectorAll("div.viewer")).map(function (box) {
    var canvas = box.querySelector("canvas"), drawn = 0, total = 0;
    if (canvas && canvas.width && canvas.height) {
      var copy = document.createElement("canvas");
      copy.width = canvas.width; copy.height = canvas.height;
      var ctx = copy.getContext("2d");
      ctx.fillStyle = "#ffffff";  // transparent pixels count as background, not as drawn
      ctx.fillRect(0, 0, copy.width, copy.height);
      ctx.drawImage(canvas, 0, 0);
      var d = ctx.getImageData(0, 0, copy.width, copy.height).data;
      total = copy.width * copy.height;
      for (var i = 0; i < d.length; i += 4) { if (d[i] < 230 || d[i + 1] < 230 || d[i + 2] < 230) drawn++; }
    }
    box.setAttribute("data-drawn-pixels", String(drawn));
    var note = box.querySelector(".fallback");
    return {state: box.getAttribute("data-state"), pixels: drawn, total: total,
            note: note && !note.hidden && note.offsetHeight > 0 ? note.textContent : null};
  });
  var result = {
    images: imgs.length,
    broken: imgs.filter(function (img) { return !img.complete || img.naturalWidth === 0; }).map(function (img) { return img.alt; }),
    sizes: imgs.map(function (img) { return [img.naturalWidth, img.naturalHeight]; }),
    errors: window.__errors,
    sections: document.querySelectorAll("section").length,
    rows: document.querySelectorAll("table.ranked tbody tr.cand").length,
    viewers: viewers,
    details_closed: !!document.querySelector("details#provenance:not([open])"),
    overflow_x: root.scrollWidth > root.clientWidth
  };
  var pre = document.createElement("pre");
  pre.id = "probe";
  pre.textContent = JSON.stringify(result);
  document.body.appendChild(pre);
});
</script>"""

# Software WebGL (SwiftShader through ANGLE), so the 3-D views draw on machines without a GPU; --disable-gpu
# keeps it software-only everywhere (it does not turn SwiftShader off).
_WEBGL = ("--use-angle=swiftshader", "--enable-unsafe-swiftshader")
_NO_WEBGL = ("--disable-3d-apis",)


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def chromium() -> str:
    exe = _chromium()
    if exe is None:
        msg = "chromium not found (install it with .ci/install-browser)"
        if os.environ.get("CRYSTALIGN_REQUIRE_BROWSER") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return exe


def _run_chromium(exe: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
        "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-quic", "--hide-scrollbars", "--mute-audio",
        f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--window-size=1200,2400", *args,
    ]
    # Own process group: on a timeout the renderer/GPU children go too, not just the launcher.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"chromium did not finish in 120 s; stderr tail:\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


# Chromium's own notes about its software WebGL ("GPU stall due to ReadPixels", the SwiftShader opt-in) reach
# the same log as the page's console, but are the browser's, not the page's.
_BROWSER_NOTES = re.compile(r"GL Driver Message|Automatic fallback to software WebGL")


def _console_lines(stderr: str) -> list[str]:
    # Chromium logs every console message of the page (any level: log, warn, error) and uncaught exceptions
    # as '...:INFO:CONSOLE(n)' / ':INFO:CONSOLE:n' lines; the report logs nothing, so any such line is a fault.
    return [ln for ln in stderr.splitlines() if re.search(r":CONSOLE[:(]", ln) and not _BROWSER_NOTES.search(ln)]


def _probe(exe: str, page: Path, tmp_path: Path, *flags: str) -> tuple[dict, list[str]]:
    """Load a probed copy of ``page`` (next to it, so relative links resolve alike) and return the verdict."""
    html_text = page.read_text(encoding="utf-8")
    assert "<head>" in html_text and "</body>" in html_text
    probed = page.with_name(f"probe-{page.name}")
    probed.write_text(html_text.replace("<head>", "<head>" + _PROBE_HEAD, 1).replace("</body>", _PROBE_BODY + "</body>", 1),
                      encoding="utf-8")
    proc = _run_chromium(exe, tmp_path / f"profile-{page.stem}-{len(flags)}", *flags, "--virtual-time-budget=10000",
                         "--dump-dom", probed.as_uri())
    match = re.search(r'<pre id="probe">(.*?)</pre>', proc.stdout, flags=re.S)
    assert match, f"the probe did not report (rc={proc.returncode}); stderr tail:\n{proc.stderr[-3000:]}"
    return json.loads(html.unescape(match.group(1))), _console_lines(proc.stderr)


def test_browser_probe_catches_faults(tmp_path, chromium):
    """The probe itself can fail: a broken image, a missing file, console.error, an exception and an empty
    viewer are all seen."""
    bad = tmp_path / "bad.html"
    bad.write_text(
        '<!DOCTYPE html><html><head><meta charset="utf-8"></head><body>'
        '<img src="data:image/png;base64,iVBORw0KGgoAAAA=" alt="truncated"><img src="missing.png" alt="missing">'
        '<div class="viewer" data-state="drawn"><canvas width="50" height="50"></canvas></div>'
        '<script>console.error("boom"); undefinedFunction();</script></body></html>',
        encoding="utf-8",
    )
    result, console = _probe(chromium, bad, tmp_path, *_WEBGL)
    assert sorted(result["broken"]) == ["missing", "truncated"]
    assert any("boom" in e for e in result["errors"]) and any("undefinedFunction" in e for e in result["errors"])
    assert any("boom" in ln for ln in console) and any("Uncaught" in ln for ln in console)
    assert result["viewers"] == [{"state": "drawn", "pixels": 0, "total": 2500, "note": None}]


def test_report_renders_in_headless_chromium(tmp_path, chromium, full_report):
    from PIL import Image, ImageStat

    # 1) after load, in the DOM: every image decoded, every 3-D view drew, nothing went wrong, the page fits 1200 px
    result, console = _probe(chromium, full_report, tmp_path, *_WEBGL)
    assert result["errors"] == [] and console == []
    assert result["images"] == 3 and result["broken"] == []
    assert all(w > 100 and h > 100 for w, h in result["sizes"])
    assert result["sections"] == 5 and result["rows"] == 3 and result["details_closed"]
    assert [v["state"] for v in result["viewers"]] == ["drawn"] * 3, result["viewers"]
    for v in result["viewers"]:
        # atoms and the cell cover a fair part of the canvas, but not all of it (not a blank or a black box)
        assert 0.03 * v["total"] < v["pixels"] < 0.7 * v["total"], v
        assert v["note"] is None
    assert not result["overflow_x"], "the page scrolls sideways at 1200 px"

    # 2) the report itself, unmodified, as a screenshot: no console output, and a real, varied picture
    shot = tmp_path / "report.png"
    proc = _run_chromium(chromium, tmp_path / "profile-shot", *_WEBGL, f"--screenshot={shot}",
                         "--virtual-time-budget=8000", full_report.as_uri())
    assert shot.exists(), f"no screenshot (rc={proc.returncode}); stderr tail:\n{proc.stderr[-3000:]}"
    assert _console_lines(proc.stderr) == []
    keep = os.environ.get("CRYSTALIGN_KEEP_SCREENSHOT")
    if keep:  # to look at the rendered page by eye
        shutil.copy(shot, keep)
    with Image.open(shot) as im:
        im = im.convert("RGB")
        assert im.size == (1200, 2400)
        colours = im.getcolors(maxcolors=1 << 20)
        assert colours is None or len(colours) > 50, "the screenshot is (nearly) a single colour"
        assert ImageStat.Stat(im.convert("L")).stddev[0] > 10
        # The lower half holds figures, not empty page.
        assert ImageStat.Stat(im.crop((0, 1200, 1200, 2400)).convert("L")).stddev[0] > 10


def test_report_without_webgl_keeps_the_table(tmp_path, chromium, full_report):
    """A browser without WebGL: the table and figures stay, each viewer box says why it is empty, and no
    exception reaches the console."""
    result, console = _probe(chromium, full_report, tmp_path, *_NO_WEBGL)
    assert result["errors"] == [] and console == []
    assert result["rows"] == 3 and result["images"] == 3 and result["broken"] == []
    assert [v["state"] for v in result["viewers"]] == ["fallback"] * 3
    assert all(v["pixels"] == 0 and "WebGL" in v["note"] for v in result["viewers"])


def test_json_outputs_are_strict_json(tmp_path):
    """NaN/inf (no valid candidate, an empty mean) become null: JavaScript's JSON.parse and strict readers
    reject Python's NaN/Infinity tokens."""
    import json
    import math

    import numpy as np

    from crystalign.io import write_json

    write_json(tmp_path / "s.json", {"best": math.nan, "rows": [1.5, float("inf"), np.float64("nan"), np.float32(2.0)], "ok": "x"})
    text = (tmp_path / "s.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard constant {c}")) == {
        "best": None, "rows": [1.5, None, None, 2.0], "ok": "x"
    }
