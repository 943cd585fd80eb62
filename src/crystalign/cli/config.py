"""``crystalign config``: the shipped presets, and every key of a config with the value a run would use."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import typer

from crystalign.cli.generate import _fail

app = typer.Typer(help="Configs: list the shipped presets, show (and check) every key of a training or RL config.", no_args_is_help=True)

PRESETS = Path(__file__).resolve().parent.parent / "configs"
KINDS = ("train", "rl")


def config_class(kind: str) -> type:
    if kind == "train":
        from crystalign.training import TrainConfig

        return TrainConfig
    if kind == "rl":
        from crystalign.rl.config import RLConfig

        return RLConfig
    raise ValueError(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}")


#: the top-level keys of RLConfig that TrainConfig lacks, written out because importing either config class imports
#: torch (and lightning), which `config list` must not wait for; tests/test_cli_config.py keeps it equal to the classes'
RL_ONLY_KEYS = frozenset({
    "anneal", "anneal_cap", "clip_eps", "costs", "device", "duplicate_check", "fields", "grad_clip", "group_size", "iterations", "lr",
    "max_atoms_per_backward", "max_invalid_fraction", "minibatch_trajectories", "noise", "normalize_costs", "num_groups",
    "num_threads", "position_normalization", "ppo_epochs", "reference_noise", "reward", "scale_model", "share_x0",
    "steps", "variant",
})


def rl_only_keys() -> set[str]:
    """RL_ONLY_KEYS computed from the config classes (imports torch)."""
    return {f.name for f in dataclasses.fields(config_class("rl"))} - {f.name for f in dataclasses.fields(config_class("train"))}


def guess_kind(data: dict) -> str:
    """'rl' when the config has a key only RL configs have (variant, reward, group_size, ...), else 'train'."""
    return "rl" if set(data) & RL_ONLY_KEYS else "train"


def _description(path: Path) -> str:
    first = path.read_text().splitlines()[:1]
    return first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""


@app.command("list")
def list_cmd() -> None:
    """The shipped preset configs (use a name wherever a config file goes: `crystalign train perov_5_cpu`).

    Example: crystalign config list
    """
    from crystalign.config import load_yaml

    for path in sorted(PRESETS.glob("*.yaml")):
        kind = guess_kind(load_yaml(path))
        typer.echo(f"{path.stem:<30} {kind:<6} {_description(path)}")


@app.command("show")
def show_cmd(
    config: Optional[str] = typer.Argument(None, help="Preset name or YAML file (omitted: the defaults of --kind)."),
    kind: Optional[str] = typer.Option(None, "--kind", help="train or rl (default: from the config's keys)."),
) -> None:
    """Every key of a config with the value a run would use (defaults filled in), as YAML; checks the config.

    The output is itself a valid config: save it, edit it, pass it to `crystalign train` or `crystalign rl fit`.

    Examples:
      crystalign config show perov_5_cpu                 # a shipped preset, complete
      crystalign config show my_rl.yaml > full.yaml      # check your file and see what it leaves at defaults
      crystalign config show --kind rl                   # every RL option and its default
    """
    import yaml

    from crystalign.config import ConfigError, from_dict, load_yaml, to_dict

    if kind is not None and kind not in KINDS:
        _fail(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if config is None:
        if kind is None:
            _fail("give a preset name or config file, or --kind train|rl for the defaults")
        data, where = {}, "defaults"
    else:
        path = Path(config)
        if not path.exists():
            path = PRESETS / f"{config.removesuffix('.yaml')}.yaml"
            if not path.exists():
                _fail(f"{config}: config file not found (nor a shipped preset; see `crystalign config list`)")
        try:
            data = load_yaml(path)
        except ConfigError as err:
            _fail(str(err))
        where = str(path)
    kind = kind or guess_kind(data)
    try:
        cfg = from_dict(config_class(kind), data, where=where)
    except (ConfigError, ValueError) as err:
        msg = str(err)
        _fail(msg if msg.startswith(where) else f"{where}: {msg}")
    typer.echo(f"# {kind} config: {where}, every key with the value a run uses")
    typer.echo(yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False, allow_unicode=True).rstrip())


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="config")
