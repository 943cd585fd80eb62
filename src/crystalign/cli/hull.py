"""``crystalign hull build``: a reference convex hull computed with an MLIP, for the e-above-hull reward."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(help="Reference convex hulls for the energy-above-hull reward.", no_args_is_help=True)


def _fail(msg: str, code: int = 2) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


@app.command("build")
def build_cmd(
    references: List[Path] = typer.Argument(
        ..., help="Reference structures: CSV with a 'cif' column, CIF files or folders, extxyz, ...", exists=True
    ),
    out: Path = typer.Option(Path("hull.json"), "--out", "-o", help="Hull file to write (JSON)."),
    backend: str = typer.Option("sevenn", "--backend", "-b", help="MLIP backend: sevenn, chgnet or mace."),
    model: Optional[str] = typer.Option(None, "--model", help="Model name or file (default: the backend's own)."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda or auto."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 or float64 (default: the backend's own)."),
    add_elements: bool = typer.Option(
        True, "--add-elements/--no-add-elements", help="Add approximate elemental references the references lack."
    ),
) -> None:
    """Compute MLIP energies of REFERENCES and save the hull entries.

    Example: crystalign hull build data/mp_20/train.csv --backend sevenn --out hull.json
    """
    import warnings

    from crystalign.rewards.hull import build_hull
    from crystalign.rewards.mlip import get_backend
    from crystalign.rewards.references import load_structures

    try:
        structures, ids = load_structures(list(references))
        mlip = get_backend(backend, model=model, device=device, dtype=dtype)
    except (ValueError, ImportError, FileNotFoundError) as err:
        _fail(str(err))
    if not structures:
        _fail("no reference structures could be read")
    typer.echo(f"{len(structures)} reference structures; backend {mlip!r}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hull = build_hull(structures, mlip, ids=ids, add_elements=add_elements, out=out)
    for w in caught:
        if "hull" in str(w.message):
            typer.secho(f"warning: {w.message}", fg=typer.colors.YELLOW, err=True)
    added = hull.meta.get("auto_elemental_references", [])
    typer.echo(
        f"wrote {out}: {len(hull.entries)} entries ({hull.meta['n_skipped']} references skipped, "
        f"{len(added)} elemental references added), {len(hull.elements)} elements covered"
    )


def register(app_: typer.Typer) -> None:
    app_.add_typer(app, name="hull")
