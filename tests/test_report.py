"""The HTML run report: content, escaping, self-containment, and rendering in a real headless browser.

The browser test needs Chromium (``.ci/install-browser`` installs it). Without it the test skips, unless
CRYSTALIGN_REQUIRE_BROWSER=1 (set in CI), where a missing browser is a failure.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

from crystalign.report import plot_schedule, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


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
    return [perovskite, distorted, rutile, clash]


def _inputs(tmp_path: Path, formula0: str = "SrTiO3") -> dict:
    structures = _structures()
    cif_dir = tmp_path / "cifs"
    cif_dir.mkdir(parents=True, exist_ok=True)
    candidates = []
    energies = [-8.0123, -7.9811, -7.9502, float("nan")]
    sgs = ["Pm-3m (221)", "P2/m (10)", "P4_2/mnm (136)", "P1 (1)"]
    for i, (s, e, sg) in enumerate(zip(structures, energies, sgs)):
        file = cif_dir / f"cand_{i}.cif"
        s.to(filename=str(file))
        candidates.append(
            {
                "rank": i + 1,
                "id": f"cand_{i}",
                "formula": formula0 if i == 0 else s.composition.reduced_formula,
                "spacegroup": sg,
                "energy_per_atom_ev": None if i == 3 else e,
                "valid": i != 3,
                "file": f"cifs/cand_{i}.cif",
            }
        )
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
            "reward": "sevenn (energy per atom)",
            "seed": 0,
            "wall_time_s": 812.4,
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


# ---------------------------------------------------------------------------------------------- unit tests
@pytest.fixture(scope="module")
def full_report(tmp_path_factory) -> Path:
    """One report with every section, shared by the tests that only read it (drawing takes seconds)."""
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

    # Figures: written as separate PNGs and embedded as the very same bytes.
    files = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert files == ["energy_hist.png", "rl_history.png", "schedule.png",
                     "structure_01.png", "structure_02.png", "structure_03.png", "structure_04.png"]
    embedded = _data_uri_pngs(page)
    assert len(embedded) == len(files)
    on_disk = {(out / "figures" / f).read_bytes() for f in files}
    assert all(png.startswith(PNG_MAGIC) for png in embedded) and set(embedded) == on_disk
    assert not list(out.rglob("*.part"))  # atomic writes leave no temporaries
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in [path, *(out / "figures").iterdir()])  # shareable

    # Header and table.
    for text in ("SrTiO3", "omatg-perov5", "sevenn", "13 min 32 s", "torch 2.5.1", "Pm-3m (221)", "P4_2/mnm (136)"):
        assert text in page, text
    gaps = re.findall(r'<td class="num">([^<]*)</td><td><span class="ok">', page)
    assert gaps == ["0.0", "31.2", "62.1"]  # meV/atom above the best valid candidate (-8.0123 eV/atom)
    assert "-8.0123" in page and "-7.9502" in page
    assert 'href="cifs/cand_0.cif"' in page
    invalid_row = re.search(r'<tr class="invalid".*?</tr>', page).group(0)
    assert "cand_3.cif" in invalid_row and invalid_row.count("—") == 2  # no energy, no gap
    for section in ("candidates", "structures", "history", "energies", "schedule"):
        assert f'<section id="{section}">' in page


def test_self_contained_and_no_script(full_report):
    page = full_report.read_text(encoding="utf-8")
    refs = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', page, flags=re.I)
    assert refs
    assert not [r for r in refs if re.match(r"\s*(https?:)?//", r, flags=re.I)]
    assert not re.search(r"https?://", page)
    assert "<script" not in page.lower() and "@import" not in page and "url(" not in page
    assert all(r.startswith("data:image/png;base64,") or not re.match(r"[a-z]+:", r) for r in refs)


def test_text_is_escaped(tmp_path):
    inputs = {**_lean(_inputs(tmp_path, formula0="<script>alert(1)</script>")), "top_k": 1}
    inputs["title"] = 'Run "A" & <b>B</b>'
    inputs["summary"]["model"] = "<img src=x onerror=alert(1)>"
    inputs["candidates"][1]["file"] = 'cifs/a"b <c>.cif'
    page = write_report(tmp_path, **inputs).read_text(encoding="utf-8")
    assert "<script" not in page and "<img src=x" not in page and "<b>B</b>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "Run &quot;A&quot; &amp; &lt;b&gt;B&lt;/b&gt;" in page
    assert 'href="cifs/a%22b%20%3Cc%3E.cif"' in page  # the href is percent-encoded, the link text escaped


def test_missing_sections_are_skipped(tmp_path):
    cands = [{"rank": 1, "id": "x", "formula": "Si", "spacegroup": None, "energy_per_atom_ev": float("nan"),
              "valid": False, "file": None}]
    page = write_report(tmp_path, "minimal", {"composition": "Si"}, cands, history=[],
                        energies_before=[float("nan")], energies_after=None, schedule=None,
                        structures=None).read_text(encoding="utf-8")
    assert '<section id="candidates">' in page
    for section in ("structures", "history", "energies", "schedule"):
        assert f'<section id="{section}">' not in page
    assert "<img" not in page and not list((tmp_path / "figures").glob("*.png"))

    # Partial inputs: history without rewards, only "after" energies, a schedule with only sigma.
    page = write_report(tmp_path / "b", "partial", {}, [], history=[{"iteration": 0, "invalid_fraction": 0.5},
                                                                     {"iteration": 1, "invalid_fraction": 0.25}],
                        energies_after=[-3.0, -3.1, -2.9], schedule={"t": [0.1, 0.5, 1.0], "pos_sigma": [1.0, 0.5, 0.0]},
                        structures=[]).read_text(encoding="utf-8")
    for section in ("history", "energies", "schedule"):
        assert f'<section id="{section}">' in page
    assert '<section id="candidates">' not in page  # an RL-fit report: curves, no empty candidates table


def test_structures_must_align_with_candidates(tmp_path):
    inputs = _inputs(tmp_path)
    inputs["structures"] = inputs["structures"][:2]
    with pytest.raises(ValueError, match="aligned"):
        write_report(tmp_path, **inputs)


def test_top_k_limits_pictures(tmp_path):
    inputs = _inputs(tmp_path)
    inputs["structures"][0] = None  # a candidate without a structure is passed over, not drawn
    page = write_report(tmp_path, **_lean(inputs), top_k=2).read_text(encoding="utf-8")
    assert sorted(p.name for p in (tmp_path / "figures").glob("structure_*.png")) == ["structure_01.png",
                                                                                       "structure_02.png"]
    assert 'alt="#2  SrTiO3' in page and 'alt="#3  TiO2' in page and 'alt="#1 ' not in page


def test_energy_histogram_keeps_outliers_from_squashing_the_plot():
    from crystalign.report import _energy_hist_figure

    rng = np.random.default_rng(1)
    before = np.concatenate([rng.normal(-7.0, 0.5, 200), [250.0]])  # one exploded structure
    ax = _energy_hist_figure(before, rng.normal(-8.0, 0.3, 200)).axes[0]
    assert "1 outside the shown range" in ax.get_title()
    assert ax.get_xlim()[1] < 0
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
# Injected into a *copy* of the report only (the report itself has no JavaScript). The head part records
# console.error calls, uncaught exceptions and failed resource loads from the very start of parsing; the body
# part waits for load, checks that every <img> decoded, and publishes the verdict as JSON in a <pre> that
# --dump-dom prints.
_PROBE_HEAD = """<script>
window.__errors = [];
window.addEventListener("error", function (e) {
  window.__errors.push("error: " + (e.message || (e.target && (e.target.src || e.target.href) || "").slice(0, 80) || "resource"));
}, true);
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
  var result = {
    images: imgs.length,
    broken: imgs.filter(function (img) { return !img.complete || img.naturalWidth === 0; }).map(function (img) { return img.alt; }),
    sizes: imgs.map(function (img) { return [img.naturalWidth, img.naturalHeight]; }),
    errors: window.__errors,
    sections: document.querySelectorAll("section").length,
    rows: document.querySelectorAll("table.cands tbody tr").length,
    overflow_x: root.scrollWidth > root.clientWidth
  };
  var pre = document.createElement("pre");
  pre.id = "probe";
  pre.textContent = JSON.stringify(result);
  document.body.appendChild(pre);
});
</script>"""


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
        "--disable-component-update", "--disable-sync", "--hide-scrollbars", "--mute-audio",
        f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--window-size=1200,2400", *args,
    ]
    # Own process group: on a timeout the renderer/GPU children go too, not just the launcher.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"chromium did not finish in 90 s; stderr tail:\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _console_lines(stderr: str) -> list[str]:
    # Chromium logs every console message of the page (any level) and uncaught exceptions as
    # '...:INFO:CONSOLE(n)' / ':INFO:CONSOLE:n' lines; the report has no script, so any such line is a fault.
    return [ln for ln in stderr.splitlines() if re.search(r":CONSOLE[:(]", ln)]


def _probe(exe: str, page: Path, tmp_path: Path) -> tuple[dict, list[str]]:
    """Load a probed copy of ``page`` (next to it, so relative links resolve alike) and return the verdict."""
    html_text = page.read_text(encoding="utf-8")
    assert "<head>" in html_text and "</body>" in html_text
    probed = page.with_name(f"probe-{page.name}")
    probed.write_text(html_text.replace("<head>", "<head>" + _PROBE_HEAD, 1).replace("</body>", _PROBE_BODY + "</body>", 1),
                      encoding="utf-8")
    proc = _run_chromium(exe, tmp_path / f"profile-{page.stem}", "--virtual-time-budget=10000", "--dump-dom",
                         probed.as_uri())
    match = re.search(r'<pre id="probe">(.*?)</pre>', proc.stdout, flags=re.S)
    assert match, f"the probe did not report (rc={proc.returncode}); stderr tail:\n{proc.stderr[-3000:]}"
    return json.loads(html.unescape(match.group(1))), _console_lines(proc.stderr)


def test_browser_probe_catches_faults(tmp_path, chromium):
    """The probe itself can fail: a broken image, a missing file, console.error and an exception are all seen."""
    bad = tmp_path / "bad.html"
    bad.write_text(
        '<!DOCTYPE html><html><head><meta charset="utf-8"></head><body>'
        '<img src="data:image/png;base64,iVBORw0KGgoAAAA=" alt="truncated"><img src="missing.png" alt="missing">'
        '<script>console.error("boom"); undefinedFunction();</script></body></html>',
        encoding="utf-8",
    )
    result, console = _probe(chromium, bad, tmp_path)
    assert sorted(result["broken"]) == ["missing", "truncated"]
    assert any("boom" in e for e in result["errors"]) and any("undefinedFunction" in e for e in result["errors"])
    assert any("boom" in ln for ln in console) and any("Uncaught" in ln for ln in console)


def test_report_renders_in_headless_chromium(tmp_path, chromium, full_report):
    from PIL import Image, ImageStat

    # 1) after load, in the DOM: every image decoded, nothing went wrong, the page fits 1200 px
    result, console = _probe(chromium, full_report, tmp_path)
    assert result["images"] == 7
    assert result["broken"] == []
    assert all(w > 100 and h > 100 for w, h in result["sizes"])
    assert result["errors"] == [] and console == []
    assert result["sections"] == 5 and result["rows"] == 4
    assert not result["overflow_x"], "the page scrolls sideways at 1200 px"

    # 2) the report itself, unmodified, as a screenshot: no console output, and a real, varied picture
    shot = tmp_path / "report.png"
    proc = _run_chromium(chromium, tmp_path / "profile-shot", f"--screenshot={shot}", "--virtual-time-budget=5000",
                         full_report.as_uri())
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
