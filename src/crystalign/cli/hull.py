"""``crystalign hull build``: a reference convex hull computed with an MLIP, for the e-above-hull reward."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from crystalign.cli.common import check_device_name, fail as _fail, threads_option, use_threads

app = typer.Typer(help="Reference convex hulls for the energy-above-hull reward.", no_args_is_help=True)


@app.command("build")
def build_cmd(
    references: List[Path] = typer.Argument(
        ..., help="Reference structures: CSV with a 'cif' column, CIF files or folders, extxyz, ...", exists=True
    ),
    out: Path = typer.Option(Path("hull.json"), "--out", "-o", help="Hull file to write (JSON)."),
    backend: str = typer.Option("sevenn", "--backend", "-b", help="MLIP backend: sevenn, chgnet or mace."),
    model: Optional[str] = typer.Option(
        None, "--model", help="Model name or file (default: the backend's own); a file is read by its package's loader, which unpickles it: only files you trust."
    ),
    device: str = typer.Option("auto", "--device", help="cpu, cuda or auto."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 or float64 (default: the backend's own)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted build from its finished batches."),
    modal: Optional[str] = typer.Option(
        None, "--modal", help="Fidelity of a multi-fidelity SevenNet model, e.g. PBE or R2SCAN for 7net-mf-0 (recorded in the hull)."
    ),
    add_elements: bool = typer.Option(
        True, "--add-elements/--no-add-elements", help="Add approximate elemental references the references lack."
    ),
    batch_size: int = typer.Option(256, "--batch-size", min=1, help="References per saved batch (the unit --resume keeps)."),
    threads: Optional[int] = threads_option(),
) -> None:
    """Compute MLIP energies of REFERENCES and save the hull entries.

    Example: crystalign hull build data/mp_20/train.csv --backend sevenn --out hull.json
    """
    import sys
    import warnings

    from crystalign.io import OutputPathError, check_output_file

    use_threads(threads)
    check_device_name(device, "--device", extra=("auto",))
    try:  # before any MLIP energy is computed, so a bad --out never costs the work
        check_output_file(out)
    except OutputPathError as err:
        _fail(str(err))

    from crystalign.rewards.hull import build_hull, check_partial, partial_path
    from crystalign.rewards.mlip import get_backend

    try:
        check_partial(out, resume)
    except FileExistsError as err:
        _fail(str(err))
    try:  # a bad model fails now, not after every reference has been read
        mlip = get_backend(backend, model=model, device=device, dtype=dtype, modal=modal).load()
    except (ValueError, ImportError, FileNotFoundError, RuntimeError) as err:
        _fail(str(err))
    structures, ids = [], []
    for path in references:
        got, got_ids = _read_references(path)
        structures += got
        ids += got_ids
    if not structures:
        _fail("no reference structures could be read")
    typer.echo(f"{len(structures)} reference structures; backend {mlip!r}")
    provenance = {"references": [str(p) for p in references], "command": " ".join(sys.argv)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            hull = build_hull(
                structures, mlip, ids=ids, add_elements=add_elements, out=out, progress=True, provenance=provenance,
                resume=resume, batch_size=batch_size,
            )
        except ValueError as err:
            _fail(str(err))
        except KeyboardInterrupt:
            partial = partial_path(out)
            try:
                kept = len(json.loads(partial.read_text())["batches"]) if partial.exists() else 0
            except (ValueError, KeyError, OSError):
                kept = 0
            if kept:
                _fail(f"interrupted; {kept} finished batch(es) of energies are kept in {partial}: rerun the same command with --resume", code=130)
            _fail(f"interrupted before the first batch of {batch_size} references finished; nothing is kept (a smaller --batch-size saves more often)", code=130)
    for w in caught:
        if "hull" in str(w.message):
            typer.secho(f"warning: {w.message}", fg=typer.colors.YELLOW, err=True)
    added = hull.meta.get("auto_elemental_references", [])
    typer.echo(
        f"wrote {out}: {len(hull.entries)} entries ({hull.meta['n_skipped']} references skipped, "
        f"{len(added)} elemental references added), {len(hull.elements)} elements covered"
    )


ACCEPTED_FORMATS = "a CSV with a 'cif' column, a .cif file, a folder of .cif files, or a structure file ASE reads (.extxyz, .xyz, POSCAR, ...)"


def _read_references(path: Path) -> tuple[list, list[str]]:
    """One reference file or folder; a file that cannot be read is a clean error naming it and the accepted formats."""
    from crystalign.rewards.references import load_structures

    try:
        return load_structures(path)
    except Exception as err:  # noqa: BLE001 - ase and pymatgen raise many kinds for a file they cannot read
        hint = ""
        if type(err).__name__ == "UnknownFileTypeError":  # ase could not guess the format from the name or content
            reason, hint = "unknown file type", f". Accepted: {ACCEPTED_FORMATS}"
        elif isinstance(err, (ValueError, OSError)):
            reason = str(err)
        else:
            reason = f"{type(err).__name__}: {err}"
        if str(path) not in reason:
            reason = f"{path}: {reason}"
        _fail(f"cannot read reference structures: {reason}{hint}")
        raise AssertionError  # unreachable


def register(app_: typer.Typer) -> None:
    app_.add_typer(app, name="hull")
