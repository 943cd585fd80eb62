"""``crystalign data``: list, download and summarise datasets."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer

from crystalign.cli.common import threads_option, use_threads

app = typer.Typer(
    help="Datasets: list the registry, download named splits, summarise any dataset.\n\n"
    "Example: crystalign data summary perov_5 --split val --data-root /data/csp",
    no_args_is_help=True,
    add_completion=False,
)

DATA_ROOT_HELP = "Folder laid out <root>/<name>/<split>.csv, searched first (default: $CRYSTALIGN_DATA_ROOT)."
CACHE_HELP = "Download cache (default: $CRYSTALIGN_CACHE or ~/.cache/crystalign)."


def _fail(err: Exception) -> typer.Exit:
    typer.echo(f"error: {err}", err=True)
    return typer.Exit(1)


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@app.command("list")
def list_datasets(
    data_root: Optional[Path] = typer.Option(None, "--data-root", help=DATA_ROOT_HELP),
    cache: Optional[Path] = typer.Option(None, "--cache", help=CACHE_HELP),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """List the named datasets, their splits and where each is available locally.

    Example: crystalign data list --data-root /data/csp
    """
    from crystalign.data.registry import local_path, registry

    entries = []
    for name, info in registry().items():
        for split, s in info.splits.items():
            path, _ = local_path(name, split, data_root=data_root, cache=cache)
            entries.append(
                {
                    "dataset": name,
                    "split": split,
                    "rows": s.rows,
                    "bytes": s.bytes,
                    "format": s.format,
                    "downloadable": bool(s.url),
                    "local": str(path) if path else None,
                }
            )
    if as_json:
        typer.echo(json.dumps(entries, indent=2))
        return
    header = ("dataset", "split", "rows", "size", "format", "download", "local copy")
    rows = [
        (
            e["dataset"],
            e["split"],
            str(e["rows"] or "?"),
            _size(e["bytes"]),
            e["format"],
            "yes" if e["downloadable"] else "no",
            e["local"] or "-",
        )
        for e in entries
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


@app.command("download")
def download_cmd(
    name: str = typer.Argument(..., help="Dataset name (see `crystalign data list`)."),
    split: Optional[str] = typer.Option(None, "--split", "-s", help="One split (default: all splits)."),
    cache: Optional[Path] = typer.Option(None, "--cache", help=CACHE_HELP),
    base_url: Optional[str] = typer.Option(
        None, "--base-url", help="Mirror laid out <url>/<name>/<file>, replacing the public URLs ($CRYSTALIGN_DATA_URL)."
    ),
    force: bool = typer.Option(False, "--force", help="Download again even if a verified copy exists."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar on a terminal."),
) -> None:
    """Download a named dataset into the cache (resumable, sha256-verified).

    Example: crystalign data download perov_5 --split val
    """
    from crystalign.data.download import download
    from crystalign.data.errors import DataError

    try:
        paths = download(name, split, cache=cache, base_url=base_url, force=force, progress=progress)
    except DataError as err:
        raise _fail(err) from None
    for s, p in paths.items():
        typer.echo(f"{name}/{s}: {p}")


@app.command("summary")
def summary_cmd(
    dataset: str = typer.Argument(..., help="Dataset name or a path (.csv, .cif, .xyz, .lmdb or a folder)."),
    split: Optional[str] = typer.Option(None, "--split", "-s", help="Split of a named dataset (default: val, or its only split)."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help=DATA_ROOT_HELP),
    cache: Optional[Path] = typer.Option(None, "--cache", help=CACHE_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    niggli: bool = typer.Option(False, "--niggli", help="Niggli-reduce cells before the statistics."),
    primitive: bool = typer.Option(False, "--primitive", help="Use primitive cells."),
    spacegroups: bool = typer.Option(True, "--spacegroups/--no-spacegroups", help="Space groups with spglib (slowest part)."),
    workers: int = typer.Option(0, "--workers", "-j", min=0, help="Processes for the space-group search (0: all cores, at most 8)."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Leave out unreadable rows instead of stopping."),
    top: int = typer.Option(15, "--top", min=1, help="Rows shown per table (elements, space groups)."),
    threads: Optional[int] = threads_option(),
) -> None:
    """Summarise a dataset: sizes, elements, space groups, lattice statistics, log-normal length fit.

    Example: crystalign data summary perov_5 --split val --data-root /data/csp --json
    """
    use_threads(threads)
    from crystalign.data.errors import DataError
    from crystalign.data.readers import load_dataset
    from crystalign.data.summary import format_summary, summarize

    from crystalign.data.registry import is_registered

    if split is not None and not is_registered(dataset):
        raise _fail(DataError(f"--split selects a split of a named dataset; {dataset} is read as a file or folder"))
    try:
        ds = load_dataset(
            dataset, split, data_root=data_root, cache=cache, niggli=niggli, primitive=primitive, skip_bad=skip_bad
        )
    except DataError as err:
        raise _fail(err) from None
    result = summarize(ds, spacegroups=spacegroups, workers=min(os.cpu_count() or 1, 8) if workers == 0 else workers, progress=not as_json)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        typer.echo(format_summary(result, top=top))
