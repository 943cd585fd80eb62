"""Model commands: ``crystalign import-omatg``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from crystalign.cli.common import use_threads


def import_omatg(
    ckpt: Path = typer.Argument(..., help="The authors' OMatG checkpoint (Lightning .ckpt or a bare state dict)."),
    out: Path = typer.Option(..., "--out", "-o", help="crystalign model checkpoint to write (.pt)."),
    config: Optional[str] = typer.Option(
        None, "--config",
        help="Training config (preset name or YAML) giving the interpolants, base lattice and sampler of the checkpoint "
        "(default: mp_20_paper_gpu for CSP weights, mp_20_dng_gpu for de novo weights).",
    ),
    force: bool = typer.Option(False, "--force", help="Overwrite OUT if it exists."),
) -> None:
    """Convert an OMatG checkpoint into a crystalign model usable by sample, rl fit and predict.

    The weights are checked name by name; interpolants, base distribution and sampler come from --config
    (default: the paper's MP-20 Trig-SDE-Gamma setup, the checkpoint OMatG-IRL starts from, or for de novo weights,
    recognised by their 101-row species embedding, the authors' MP-20 DNG setup). The Linear, Trig
    and EncDec variants import; the VPSBD/VESBD variants (a one-sided interpolant) do not, and are recognised by
    the variant name of their published folder (e.g. MP-20-CSP/VPSBD-ODE/model.ckpt): keep that folder name.

    Example: crystalign import-omatg MP-20-CSP/Trig-SDE-Gamma/model.ckpt --out mp20_trig_sde.pt
    """
    use_threads(None)  # before torch starts (the default count; a conversion hardly computes)
    from crystalign.cli.generate import resolve_config
    from crystalign.config import ConfigError, load_config
    from crystalign.distributions import BaseDistribution
    from crystalign.generator import Generator
    from crystalign.io import check_output_file, save_torch
    from crystalign.model.checkpoint import CheckpointError
    from crystalign.model.omatg_import import load_omatg_model
    from crystalign.training import TrainConfig

    try:
        check_output_file(out)
    except (ValueError, OSError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    if out.exists() and not force:
        typer.echo(f"error: {out} exists; pass --force to overwrite it", err=True)
        raise typer.Exit(1)
    try:
        net, src = load_omatg_model(ckpt)
        if config is None:
            config = "mp_20_dng_gpu" if net.config.dng else "mp_20_paper_gpu"
        train_cfg = load_config(resolve_config(Path(config)), TrainConfig)
        gen_cfg = train_cfg.generator
        if net.config.dng != (gen_cfg.interpolants.get("species") is not None):
            kind = "de novo (DNG)" if net.config.dng else "CSP"
            raise ValueError(
                f"{ckpt} holds {kind} weights but --config {config} is for a "
                f"{'CSP' if net.config.dng else 'DNG'} model; give a {kind} config (e.g. "
                f"{'mp_20_dng_gpu' if net.config.dng else 'mp_20_paper_gpu'})"
            )
        gen_cfg.net = net.config
        base = BaseDistribution(gen_cfg.base.mu, gen_cfg.base.s) if gen_cfg.base.mu else BaseDistribution.from_preset(gen_cfg.base.lattice)
        gen = Generator(gen_cfg, base)
        gen.net.load_state_dict(net.state_dict())
    except (CheckpointError, FileNotFoundError, ConfigError, ValueError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    try:
        save_torch(out, gen.checkpoint_dict(extra={"provenance": {"imported_from": src, "config": str(config)}}))
    except OSError as err:  # e.g. the disk filled up: nothing partial is left behind (atomic write)
        typer.echo(f"error: cannot write {out}: {err}", err=True)
        raise typer.Exit(1) from None
    cfg, src = net.config.to_dict(), src
    kind = "DNG" if cfg["dng"] else "CSP"
    typer.echo(
        f"wrote {out}: {kind} CSPNet {cfg['num_layers']} x {cfg['hidden_dim']} "
        f"({src['num_parameters']:,} parameters) from {ckpt} (sha256 {src['sha256'][:12]})"
    )


def register(app: typer.Typer) -> None:
    """Add the model commands to the top-level ``crystalign`` app."""
    app.command("import-omatg")(import_omatg)
