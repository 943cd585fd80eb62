"""``crystalign evaluate``: CSP metrics of generated structures against references, or with ``--dng`` de novo
generation metrics (validity, coverage, Wasserstein distances, uniqueness, novelty, S.U.N.;
:mod:`crystalign.dng_metrics`).

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

``--dng``: nothing is paired, so ``-k``, ``--metre``, ``--resume``, ``--workers`` and ``--timeout`` are refused.
``--reference`` is the reference set for coverage and the Wasserstein distances: a file, a folder, a dataset name
(its default split, ``val``) or ``NAME:SPLIT`` (``perov_5:test``, the split CDVAE and DiffCSP compare with).
``--training`` (a file, folder, dataset name or ``NAME:SPLIT``) enables novelty and S.U.N.; when the reference is a
dataset name it defaults to that dataset's ``train`` split if it is found locally (else novelty is skipped with a
note). The coverage cutoffs are CDVAE's for the reference's dataset (``perov_5``, ``carbon_24``, ``mp_20``: taken
from a dataset name, or the name of the folder holding a reference file) unless ``--cov-cutoffs STRUCT,COMP``
gives them. ``--hull HULL.json`` (``crystalign hull build``) adds stability and S.U.N.: the energies come from
:func:`crystalign.dng_metrics.energies_above_hull` with the MLIP the hull records. ``--out`` writes the metrics
with one record per structure and the provenance, atomically.
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

  crystalign evaluate samples/ --dng -r perov_5:test --training perov_5:train --hull hull.json --out dng.json

  crystalign evaluate samples/ -r perov_5/test.csv -k 4 --out metrics.json --resume

samples/ holds 000000_000.cif, 000000_001.cif, ... (or an index.json listing the files in order);
sample j of reference i is file number i*k + j. With --out, finished pairs are kept in .metrics.json.partial.jsonl
as they are matched: after an interruption, rerun the same command with --resume to match only the rest.
"""


def register(app: typer.Typer) -> None:
    """Add the ``evaluate`` command to ``app``."""
    app.command("evaluate", epilog=EXAMPLE, no_args_is_help=True)(evaluate)


def evaluate(
    ctx: typer.Context,
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
    dng: bool = typer.Option(
        False, "--dng", help="De novo generation metrics instead (validity, COV-R/P, Wasserstein, uniqueness, novelty, S.U.N.).",
    ),
    training: Optional[str] = typer.Option(
        None, "--training",
        help="--dng: training set for novelty/S.U.N. (file, folder, dataset name or NAME:SPLIT). Default: the train split "
        "of a dataset-name reference, if found.",
    ),
    hull: Optional[Path] = typer.Option(None, "--hull", help="--dng: hull file (crystalign hull build) for stability and S.U.N."),
    cov_cutoffs: Optional[str] = typer.Option(
        None, "--cov-cutoffs", help="--dng: coverage cutoffs STRUCT,COMP. Default: CDVAE's for the reference's dataset."
    ),
    stable_threshold: float = typer.Option(0.0, "--stable-threshold", help="--dng: e_hull (eV/atom) counted as stable."),
    max_reference: Optional[int] = typer.Option(
        None, "--max-reference", min=1, help="--dng: fingerprint at most this many references for coverage (random subset)."
    ),
    comp_scaler: Optional[str] = typer.Option(
        None, "--comp-scaler",
        help="--dng: how composition features are scaled for coverage: 'broad' (default: fixed constants over MP-20 "
        "chemistry, as CDVAE), 'reference' (the reference set's own), or a JSON file {\"means\": [...], \"stds\": [...]} "
        "of the 132 magpie features (e.g. CDVAE's constants).",
    ),
    fingerprint_cache: Optional[Path] = typer.Option(
        None, "--fingerprint-cache", dir_okay=False, help="--dng: .npz file caching the reference fingerprints."
    ),
    report: Optional[Path] = typer.Option(
        None, "--report", dir_okay=False,
        help="--dng: also write an HTML report: the metrics, histograms against the reference set, and every crystal "
        "with its validity, novelty and E-hull.",
    ),
) -> None:
    """Match rate, RMSE, cRMSE, METRe and validity of generated structures vs references (same-index pairs);
    with --dng, de novo generation metrics."""
    from crystalign.io import OutputPathError, check_output_file, remove_stale_parts, write_json

    use_threads(threads)
    if dng:
        _evaluate_dng(
            ctx, generated, str(reference), training, hull, cov_cutoffs, stable_threshold, max_reference, comp_scaler,
            fingerprint_cache, as_json, out, progress, data_root, report,
        )
        return
    for name, flag in (("training", "--training"), ("hull", "--hull"), ("cov_cutoffs", "--cov-cutoffs"),
                       ("stable_threshold", "--stable-threshold"), ("max_reference", "--max-reference"),
                       ("comp_scaler", "--comp-scaler"), ("fingerprint_cache", "--fingerprint-cache"), ("report", "--report")):
        if _given(ctx, name):
            _fail(f"{flag} applies to --dng only")
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


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether the option was set on the command line (or by an environment variable), not left at its default
    (``ctx`` None: called from another command, which sets nothing of this one)."""
    if ctx is None:
        return False
    source = ctx.get_parameter_source(name)
    # by name: typer >= 0.20 vendors its own click, whose enum is not the installed click's
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def _evaluate_dng(
    ctx, generated: Path, reference: str, training: Optional[str], hull: Optional[Path], cov_cutoffs: Optional[str],
    stable_threshold: float, max_reference: Optional[int], comp_scaler: Optional[str], fingerprint_cache: Optional[Path],
    as_json: bool, out: Optional[Path], progress: bool, data_root: Optional[Path], report: Optional[Path] = None,
) -> None:
    """``evaluate --dng``: cheap checks first, then the inputs, then the metrics (which import torch and pymatgen)."""
    from crystalign.io import OutputPathError, check_output_file, remove_stale_parts, write_json

    for name, flag in (("k", "-k"), ("metre", "--metre"), ("resume", "--resume"), ("workers", "--workers"),
                       ("timeout", "--timeout")):
        if _given(ctx, name):
            _fail(f"{flag} does not apply to --dng (DNG metrics pair nothing with the references)")
    thresholds = None
    if cov_cutoffs is not None:
        try:
            thresholds = tuple(float(x) for x in cov_cutoffs.split(","))
        except ValueError:
            thresholds = ()
        if len(thresholds) != 2 or not all(x > 0 and x != float("inf") for x in thresholds):
            _fail(f"--cov-cutoffs must be two positive numbers STRUCT,COMP (e.g. 0.4,10), got {cov_cutoffs!r}")
    if hull is not None and not hull.is_file():
        _fail(f"--hull: {hull} is not a file (build one with `crystalign hull build`)")
    scaler = comp_scaler or "broad"
    if comp_scaler not in (None, "broad", "reference"):
        comp_scaler = Path(comp_scaler)
        if not comp_scaler.is_file():
            _fail(f"--comp-scaler: {comp_scaler} is not a file (nor 'broad' or 'reference')")
        try:
            data = json.loads(comp_scaler.read_text(errors="replace"))
            scaler = ([float(x) for x in data["means"]], [float(x) for x in data["stds"]])
        except (ValueError, KeyError, TypeError) as exc:
            _fail(f"--comp-scaler {comp_scaler}: expected JSON {{\"means\": [...], \"stds\": [...]}} ({exc})")
    # up front: a bad --out or --report must not surface only after all the fingerprints
    for path, flag in ((out, "--out"), (report, "--report")):
        if path is not None:
            try:
                check_output_file(path)
            except OutputPathError as exc:
                _fail(f"{flag}: {exc}")
    if out is not None:
        remove_stale_parts(out.parent, names=[out.name])
    dataset = _dataset_of(reference)
    if thresholds is None and dataset is None:
        typer.echo(
            f"note: no CDVAE coverage cutoffs known for reference {reference!r}: coverage is skipped (give --cov-cutoffs "
            "STRUCT,COMP)", err=True,
        )
    try:
        gen, gen_names = load_structures(generated, tolerate_unreadable=True)
        ref, _ = load_structures(Path(reference), tolerate_unreadable=False, data_root=data_root)
        train, training_used = None, training
        if training is not None:
            train, _ = load_structures(Path(training), tolerate_unreadable=False, data_root=data_root)
        elif _is_dataset_name(reference):
            name = reference.split(":", 1)[0]
            from crystalign.data import DataError

            try:
                train, _ = load_structures(Path(f"{name}:train"), tolerate_unreadable=False, data_root=data_root)
                training_used = f"{name}:train"
            except DataError as exc:
                typer.echo(f"note: novelty and S.U.N. not computed: {exc}; or pass --training", err=True)
        else:
            typer.echo("note: novelty and S.U.N. not computed: pass --training (a file, folder or dataset name)", err=True)
    except (ValueError, OSError) as exc:  # DataError is a ValueError
        _fail(str(exc))
    unreadable = [name for s, name in zip(gen, gen_names) if s is None]
    if unreadable:
        typer.echo(f"{len(unreadable)} generated structure(s) unreadable, counted invalid: {', '.join(unreadable[:10])}", err=True)
    from crystalign.dng_metrics import dng_metrics, energies_above_hull  # after the inputs: imports torch, pymatgen
    from crystalign.dng_report import write_dng_report
    from crystalign.provenance import versions

    e_hull = None
    if hull is not None:
        try:
            e_hull = energies_above_hull(gen, hull, progress=progress)
        except (ValueError, OSError) as exc:
            _fail(f"--hull {hull}: {exc}")
    try:
        result = dng_metrics(
            gen, ref, train, thresholds=thresholds, dataset=None if thresholds else dataset, e_above_hull=e_hull,
            stable_threshold=stable_threshold, progress=progress, max_reference=max_reference, comp_scaler=scaler,
            fingerprint_cache=fingerprint_cache,
        )
    except ValueError as exc:
        _fail(str(exc))
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    else:
        typer.echo(result.summary())
    provenance = {
        "generated": str(generated), "reference": reference, "training": training_used, "hull": None if hull is None else str(hull),
        "cov_cutoffs_from": "--cov-cutoffs" if thresholds else (f"CDVAE ({dataset})" if dataset else None),
        "comp_scaler": str(comp_scaler) if comp_scaler else "broad",
        "max_reference": max_reference, "command": " ".join(sys.argv), "versions": versions(),
    }
    for path, write in (
        (out, lambda p: write_json(p, {**result.to_dict(details=True), "provenance": provenance})),
        (report, lambda p: write_dng_report(p, result, gen, ref, names=gen_names, title=f"De novo crystals: {generated}",
                                            provenance=provenance)),
    ):
        if path is None:
            continue
        try:
            write(path)
        except OSError as exc:
            typer.secho(f"error: cannot write {path}: {exc.strerror or exc}", fg=typer.colors.RED, err=True)
            raise typer.Exit(1) from None


def _is_dataset_name(text: str) -> bool:
    """A registered dataset name (or NAME:SPLIT) that is not a path here (a path of that name wins, as in load_dataset)."""
    from crystalign.data.registry import is_registered

    return not Path(text).exists() and is_registered(text.split(":", 1)[0])


def _dataset_of(reference: str) -> str | None:
    """The CDVAE dataset a reference belongs to, for its coverage cutoffs: a dataset name (NAME or NAME:SPLIT), or
    the name of the folder holding a reference file (``.../perov_5/test.csv``) or of a reference folder."""
    from crystalign.dng_metrics import _DATASET_ALIASES, CDVAE_COV_CUTOFFS  # light: numpy only at import

    path = Path(reference)
    candidates = [reference.split(":", 1)[0]] if not path.exists() else [path.parent.name, path.name]
    for name in candidates:
        name = _DATASET_ALIASES.get(name.lower(), name.lower())
        if name in CDVAE_COV_CUTOFFS:
            return name
    return None


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
        from crystalign.data.registry import is_registered

        name, split = str(path), None
        if ":" in name and is_registered(name.split(":", 1)[0]):  # NAME:SPLIT, e.g. perov_5:test
            name, split = name.split(":", 1)
        ds = load_dataset(name, split=split, data_root=str(data_root) if data_root else None)
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
