"""Model commands: ``crystalign import-omatg``."""

from __future__ import annotations

from pathlib import Path

import typer

from crystalign.model.checkpoint import CheckpointError


def import_omatg(
    ckpt: Path = typer.Argument(..., help="The authors' OMatG checkpoint (Lightning .ckpt or a bare state dict)."),
    out: Path = typer.Option(..., "--out", "-o", help="crystalign model checkpoint to write (.pt)."),
    force: bool = typer.Option(False, "--force", help="Overwrite OUT if it exists."),
) -> None:
    """Convert an OMatG checkpoint into a crystalign model checkpoint (weights only, checked name by name)."""
    from crystalign.model.omatg_import import import_omatg_checkpoint

    if out.exists() and not force:
        typer.echo(f"error: {out} exists; pass --force to overwrite it", err=True)
        raise typer.Exit(1)
    try:
        meta = import_omatg_checkpoint(ckpt, out)
    except (CheckpointError, FileNotFoundError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    cfg, src = meta["model_config"], meta["source"]
    kind = "DNG" if cfg["dng"] else "CSP"
    typer.echo(
        f"wrote {out}: {kind} CSPNet {cfg['num_layers']} x {cfg['hidden_dim']} "
        f"({src['num_parameters']:,} parameters) from {ckpt} (sha256 {src['sha256'][:12]})"
    )


def register(app: typer.Typer) -> None:
    """Add the model commands to the top-level ``crystalign`` app."""
    app.command("import-omatg")(import_omatg)
