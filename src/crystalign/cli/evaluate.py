"""``crystalign evaluate``: CSP metrics of generated structures against references.

Inputs and their order (pairing is by index, see :mod:`crystalign.metrics`):

* a folder of CIFs, read in plain lexicographic order of the file names, so name files with
  zero-padded indices: ``000000.cif, 000001.cif, ...`` or, with k samples per reference,
  ``000000_00.cif ... 000000_07.cif, 000001_00.cif ...``. Names whose numbers are not padded
  (``1_10.cif`` sorting before ``1_2.cif``) are refused rather than silently mispaired.
  If the folder holds ``index.json`` (a JSON list of file names relative to the folder, or
  ``{"files": [...]}``), that order is used instead; a ``null`` entry marks a failed generation
  and counts as invalid.
* an extended XYZ file (``.extxyz``/``.xyz``), structures in file order;
* a single CIF file, data blocks in order;
* references only: a CDVAE-style CSV with a ``cif`` column (rows in file order) or an OMatG LMDB.

Generated files (or extxyz frames) that cannot be read count as invalid structures; unreadable references are
an error, as is an extxyz file whose frame boundaries are lost (the message names the frame).

With ``--out OUT`` the evaluation is resumable: every matched pair is appended to ``.OUT.partial.jsonl``
beside it (see :func:`crystalign.metrics.csp_metrics`); ``--resume`` continues from there, and the file goes
once OUT is written. Without ``--resume`` an existing one is refused, never silently reused or overwritten.
Timed-out pairs stay timeouts on resume; delete the file to match everything again.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from crystalign.cli.common import fail as _fail, threads_option, use_threads

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    from pymatgen.core import Structure

EXAMPLE = """\
Examples:

  crystalign evaluate samples/ -r perov_5/test.csv -k 4 --json --out metrics.json

  crystalign evaluate samples/ -r perov_5/test.csv -k 4 --out metrics.json --resume

samples/ holds 000000_000.cif, 000000_001.cif, ... (or an index.json listing the files in order);
sample j of reference i is file number i*k + j. With --out, finished pairs are kept in .metrics.json.partial.jsonl
as they are matched: after an interruption, rerun the same command with --resume to match only the rest.
"""


def register(app: typer.Typer) -> None:
    """Add the ``evaluate`` command to ``app``."""
    app.command("evaluate", epilog=EXAMPLE, no_args_is_help=True)(evaluate)


def evaluate(
    generated: Path = typer.Argument(
        ..., exists=True, help="Folder of CIFs (zero-padded names or index.json), an extxyz file or a CIF file."
    ),
    reference: Path = typer.Option(
        ..., "--reference", "-r",
        help="References: CSV with a 'cif' column, CIF folder, extxyz or LMDB, or a dataset name (as in sample --compositions-from).",
    ),
    k: Optional[int] = typer.Option(
        None, "-k", min=1, help="Samples per reference (contiguous). Default: #generated / #references."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON instead of text."),
    workers: Optional[int] = typer.Option(
        None, "--workers", min=0, help="Matching processes (default min(2, CPUs); 0 = in this process)."
    ),
    timeout: float = typer.Option(
        60.0, "--timeout", min=0.0, help="Per-pair time limit in seconds (0 = none). Timed-out pairs count as misses."
    ),
    out: Optional[Path] = typer.Option(
        None, "--out",
        help="Also write the metrics with per-pair details to this JSON file; finished pairs are kept in "
        ".OUT.partial.jsonl beside it until then.",
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue an interrupted evaluation from the pairs finished in --out's .OUT.partial.jsonl."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar on stderr."),
    metre: str = typer.Option(
        "samples", "--metre",
        help="METRe compares each reference with its own k samples ('samples') or with every generated structure "
        "of the same reduced composition ('any': polymorph splits such as carbon_24).",
    ),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="Folder holding the named datasets (for a dataset name in -r)."),
    threads: Optional[int] = threads_option(),
) -> None:
    """Match rate, RMSE, cRMSE, METRe and validity of generated structures vs references (same-index pairs)."""
    from crystalign.io import OutputPathError, check_output_file, remove_stale_parts, write_json

    use_threads(threads)
    checkpoint = None
    if out is not None:
        try:  # up front: a bad --out must not surface only after all the matching
            check_output_file(out)
        except OutputPathError as exc:
            _fail(f"--out: {exc}")
        checkpoint = checkpoint_path(out)
        remove_stale_parts(out.parent, names=[out.name])  # a write of --out that a kill interrupted
        if checkpoint.exists() and not resume:
            _fail(
                f"{checkpoint} holds the finished pairs of an interrupted evaluation: pass --resume to continue "
                "it, or delete the file to start over"
            )
    elif resume:
        _fail("--resume needs --out: the finished pairs are kept in a file beside the --out file")
    try:
        try:
            gen, gen_names = load_structures(generated, tolerate_unreadable=True)
            ref, _ = load_structures(reference, tolerate_unreadable=False, data_root=data_root)
        except (ValueError, OSError) as exc:  # DataError is a ValueError
            _fail(str(exc))
        from crystalign.metrics import CheckpointError, csp_metrics  # after the inputs: it imports torch
        from crystalign.provenance import versions

        unreadable = [name for s, name in zip(gen, gen_names) if s is None]
        if unreadable:
            typer.echo(f"{len(unreadable)} generated structure(s) unreadable, counted invalid: {', '.join(unreadable[:10])}", err=True)
        try:
            result = csp_metrics(
                gen, ref, k=k, n_workers=workers, timeout=timeout or None, progress=progress, metre=metre,
                checkpoint=checkpoint,
            )
        except (CheckpointError, ValueError) as exc:  # CheckpointError: a file to resume from or delete
            _fail(str(exc))
    except KeyboardInterrupt:
        if checkpoint is not None and checkpoint.exists():
            msg = f"interrupted: the finished pairs are saved in {checkpoint}; rerun the same command with --resume to continue"
        else:
            msg = "interrupted before any pair was saved" + ("" if out else " (give --out to make the evaluation resumable)")
        typer.secho(msg, fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(130) from None
    if result.resumed_pairs:
        typer.echo(f"resumed: {result.resumed_pairs} pair(s) taken from {checkpoint}, the rest matched now", err=True)
    if k is None and result.k > 1:
        typer.echo(
            f"k = {result.k} inferred ({result.n} generated / {result.n_references} references): generated "
            f"structure i*{result.k} + j is sample j of reference i; pass -k to set it",
            err=True,
        )
    _warn_composition_mismatch(result)
    # the metrics are printed before the file is written: a failing write must not lose them
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    else:
        typer.echo(result.summary())
    if out is not None:
        try:
            write_json(out, {**result.to_dict(details=True), "provenance": {
                "generated": str(generated), "reference": str(reference), "timeout_s": timeout, "workers": workers,
                "command": " ".join(sys.argv), "versions": versions(),
            }})
        except OSError as exc:
            kept = f" (the matched pairs stay in {checkpoint} for --resume)" if checkpoint.exists() else ""
            typer.secho(f"error: cannot write {out}: {exc.strerror or exc}{kept}", fg=typer.colors.RED, err=True)
            raise typer.Exit(1) from None
        checkpoint.unlink(missing_ok=True)  # the metrics are safe in OUT: nothing left to resume


def checkpoint_path(out: Path) -> Path:
    """Where ``evaluate --out OUT`` keeps its finished pairs until OUT is written (hidden, as hull build's)."""
    return out.with_name(f".{out.name}.partial.jsonl")


def _warn_composition_mismatch(result) -> None:
    """Most valid pairs with different reduced compositions usually means mismatched inputs (e.g. references
    from another dataset or another order), not a bad model: say so instead of silently reporting ~0 %."""
    pairs = [p for p, ok in enumerate(result.valid) if ok and result.reference_valid[p // result.k]]
    differ = sum(not result.same_composition[p] for p in pairs)
    if pairs and 2 * differ > len(pairs):
        typer.secho(
            f"warning: {differ} of {len(pairs)} valid pairs have different reduced compositions and cannot match. "
            "Pairing is by index (sample j of reference i is generated structure i*k + j): check that the "
            "references are the ones the structures were generated for, in the same order.",
            fg=typer.colors.YELLOW,
            err=True,
        )


# ---------------------------------------------------------------------------------------------- readers


def load_structures(
    path: Path, tolerate_unreadable: bool = False, data_root: Path | None = None
) -> tuple[list["Structure | None"], list[str]]:
    """Structures and their names, in pairing order.

    Generated sets (``tolerate_unreadable=True``) keep every index: an entry that cannot be read, or
    an index.json ``null``, becomes ``None`` (counted invalid), and degenerate cells are kept for the
    validity check to judge. References are read strictly, files through :mod:`crystalign.data.readers`,
    and may be a dataset name (looked up under ``data_root``, as everywhere).
    """
    path = Path(path)
    if not tolerate_unreadable and not path.exists():
        from crystalign.data import load_dataset

        ds = load_dataset(str(path), data_root=str(data_root) if data_root else None)
        return ds.batch.to_structures(), ds.ids
    if path.is_dir() and not (path / "data.mdb").exists() and (tolerate_unreadable or (path / "index.json").exists()):
        return _load_cif_folder(path, tolerate_unreadable)
    # a reference CIF folder is read as every command reads it (`sample --compositions-from` included): the data
    # readers, in file-name order, so its rows pair with the samples drawn from it
    suffix = path.suffix.lower()
    if tolerate_unreadable:
        if suffix in (".extxyz", ".xyz"):
            return _load_extxyz_tolerant(path)
        if suffix == ".cif":
            from crystalign.data.cif import split_cif_blocks

            blocks = split_cif_blocks(path.read_text(errors="replace"))
            return _from_cif_texts([text for _, text in blocks], [f"{path.name}:{b}" for b, _ in blocks], True)
    from crystalign.data.readers import read_structures

    ds = read_structures(path)
    return ds.batch.to_structures(), ds.ids


def _natural_key(name: str):
    return [(0, int(tok), "") if tok.isdigit() else (1, 0, tok) for tok in re.split(r"(\d+)", name)]


def _folder_listing(folder: Path) -> list[str | None]:
    index = folder / "index.json"
    if index.exists():
        try:
            listing = json.loads(index.read_text(errors="replace"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{index}: not valid JSON ({exc}); expected a list of file names in pairing order") from None
        if isinstance(listing, dict):
            listing = listing.get("files")
        if not isinstance(listing, list) or not all(f is None or isinstance(f, str) for f in listing):
            raise ValueError(f"{index}: expected a JSON list of file names (or null) or {{'files': [...]}}")
        return listing
    names = sorted(p.name for p in folder.iterdir() if p.suffix.lower() == ".cif" and p.is_file())
    if not names:
        raise ValueError(f"{folder}: no .cif files and no index.json")
    if names != sorted(names, key=_natural_key):
        raise ValueError(
            f"{folder}: CIF names are not zero-padded, so their lexicographic order is not their index order "
            f"(e.g. {names[:3]}); rename them (000000_00.cif, ...) or add an index.json listing them in order"
        )
    return names


def _load_cif_folder(folder: Path, tolerate_unreadable: bool):
    listing = _folder_listing(folder)
    texts = []
    for name in listing:
        if name is None:  # a failed generation recorded in index.json
            texts.append("")
            continue
        try:
            texts.append((folder / name).read_text(errors="replace"))
        except OSError as exc:
            if not tolerate_unreadable:
                raise ValueError(f"{folder / name}: {exc}") from exc
            texts.append("")
    return _from_cif_texts(texts, [str(n) for n in listing], tolerate_unreadable)


def _from_cif_texts(texts: list[str], names: list[str], tolerate_unreadable: bool):
    from crystalign.data.cif import parse_cif_texts

    parsed = parse_cif_texts(texts)
    if parsed.errors and not tolerate_unreadable:
        i = min(parsed.errors)
        raise ValueError(f"cannot read {names[i]}: {parsed.errors[i]}")
    structures = [
        None if z is None else _structure(lat, z, f) for z, f, lat in zip(parsed.numbers, parsed.frac, parsed.lattice)
    ]
    return structures, names


def _structure(lattice: np.ndarray, numbers, frac: np.ndarray) -> "Structure | None":
    from pymatgen.core import Lattice, Structure

    try:
        return Structure(Lattice(lattice), list(numbers), frac, coords_are_cartesian=False)
    except Exception:  # e.g. atomic number 0 from an unfinished sample
        return None


def _load_extxyz_tolerant(path: Path):
    import numpy as np
    from ase.io import read

    try:
        frames = read(path, index=":", format="extxyz")
    except Exception:  # noqa: BLE001 - ase raises many kinds; re-read frame by frame to keep the readable ones
        frames = _extxyz_frames(path)
    structures = []
    for atoms in frames:
        if atoms is None:
            structures.append(None)
            continue
        cell = np.asarray(atoms.cell.array, dtype=np.float64)
        pos = np.asarray(atoms.positions, dtype=np.float64)
        with np.errstate(all="ignore"):
            try:
                frac = np.linalg.solve(cell.T, pos.T).T  # positions = frac @ cell
            except np.linalg.LinAlgError:
                frac = pos @ np.linalg.pinv(cell)  # collapsed cell: kept so it is counted invalid
        structures.append(_structure(cell, atoms.numbers, frac))
    return structures, [f"{path.name}[{i}]" for i in range(len(frames))]


def _extxyz_frames(path: Path) -> list:
    """Frames of a damaged extxyz file, ``None`` for each one that cannot be parsed (e.g. a truncated last frame).

    Boundaries come from each frame's atom-count line; where no count line stands where the next frame should
    start, the rest of the file cannot be split into frames and a ValueError names the file, frame and line.
    """
    import io

    from ase.io import read

    lines = path.read_text(errors="replace").splitlines(keepends=True)
    frames: list = []
    pos = 0
    while pos < len(lines):
        if not lines[pos].strip():
            pos += 1
            continue
        head = lines[pos].strip()
        if not head.isdigit():
            found = repr(head[:40]) if head.isprintable() else "unreadable (binary or garbled) text"
            raise ValueError(
                f"{path}: cannot read frame {len(frames)} (line {pos + 1}): expected its atom count, found "
                f"{found}, so the frames from here on cannot be told apart"
            )
        end = pos + int(head) + 2  # count line, comment line, one line per atom
        try:
            frames.append(read(io.StringIO("".join(lines[pos:end])), format="extxyz"))
        except Exception:  # noqa: BLE001 - a damaged frame counts as an invalid structure
            frames.append(None)
        pos = end
    return frames
