"""What every command shares: the one-line error style, the --threads option, and the cheap input checks that run
before torch, pymatgen or a potential is imported.

This module, like every command module, imports no torch at module level: `crystalign --help`, `crystalign models`
and every refused input answer at once, and the thread settings are chosen before the OpenMP runtime starts.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NoReturn, Optional

import typer
from typer.core import TyperGroup

PACKAGE = Path(__file__).resolve().parent.parent
PRETRAINED = PACKAGE / "pretrained"  # generator.pretrained_dir(), without importing torch

# click's base class of user errors (typer >= 0.20 vendors click, older typers depend on it)
_CLICK_EXCEPTION = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
_CLICK_WORDS = {"Invalid", "Missing", "No", "Got", "Option", "Argument", "Error", "Requires"}


def fail(msg: str, code: int = 2) -> NoReturn:
    """The one error style of every command: ``error: MESSAGE`` on one line of stderr, exit code 2 (a bad input)."""
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


class OneLineErrors(TyperGroup):
    """The root command group: click's usage errors (a bad option value, a missing argument or file, an unknown
    option) are printed in the commands' own one-line ``error: ...`` style, instead of click's usage block or
    typer's rich box, which a script reading stderr (or a person) would otherwise have to tell apart."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):  # type: ignore[override]
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except _CLICK_EXCEPTION as err:
            if type(err).__name__ == "NoArgsIsHelpError":  # a bare group: its help, as click shows it
                err.show()
            else:
                typer.secho(f"error: {usage_message(err)}", fg=typer.colors.RED, err=True)
            sys.exit(err.exit_code)
        except typer.Abort:
            typer.echo("Aborted!", err=True)
            sys.exit(1)
        # without standalone mode click returns the exit code of typer.Exit, or the command's return value (None)
        sys.exit(code if isinstance(code, int) else 0)


def usage_message(err) -> str:
    """A click error as one line: "invalid value for '-n': ... (see `crystalign sample --help`)"."""
    msg = " ".join(err.format_message().split())
    first, _, rest = msg.partition(" ")
    if first in _CLICK_WORDS:
        msg = f"{first.lower()} {rest}".rstrip()
    ctx = getattr(err, "ctx", None)
    if ctx is not None:
        msg = f"{msg.rstrip('.')} (see `{ctx.command_path} --help`)"
    return msg


THREADS_HELP = (
    "CPU threads of this process, 1 to the CPUs it may use. Default: $OMP_NUM_THREADS if set, else one per core "
    "that no other process keeps busy at start, less one spare (so 1 on 2 cores)."
)


def threads_option(default_text: Optional[str] = None):
    """The ``--threads`` option of every command that computes (see :func:`use_threads`)."""
    if default_text:
        return typer.Option(None, "--threads", help=THREADS_HELP.split(" Default:")[0] + f" Default: {default_text}.", show_default=False)
    return typer.Option(None, "--threads", help=THREADS_HELP, show_default=False)


def use_threads(threads: Optional[int], small_batches: bool = False) -> int:
    """Apply ``--threads`` (None: the default) before anything imports torch; a count out of range is a clean error.

    The OpenMP runtime reads its thread count and wait policy once, when torch starts, so every computing command
    calls this first. See :func:`crystalign.settings.configure_threads`. ``small_batches``: the command's work is
    many small tensor operations (predict: RL on 32 five-atom cells, MLIP calls on a few structures), where sleeping
    OpenMP threads cost more to wake than they give: its default is one thread unless $OMP_NUM_THREADS says
    otherwise (measured quiet on 2 cores: 8 RL iterations 19.9 s with 1 thread, 30.8 s with 2 sleeping ones).
    """
    import os

    from crystalign import settings

    configure_threads = settings.configure_threads
    users = os.environ.get("OMP_NUM_THREADS") and os.environ["OMP_NUM_THREADS"] != settings._SET_HERE.get("OMP_NUM_THREADS")
    if threads is None and small_batches and not users:  # a value configure_threads wrote earlier is not the user's
        threads = 1
    try:
        return configure_threads(threads)
    except ValueError as err:
        fail(f"--{err}")


def shipped_model_names() -> list[str]:
    return sorted(p.stem for p in PRETRAINED.glob("*.pt"))


def check_model(name: str) -> None:
    """An unknown model name or a missing checkpoint fails at once, before torch is imported to load it (the same
    message as :func:`crystalign.generator.resolve_model`, which checks it again)."""
    names = shipped_model_names()
    if str(name) in names or Path(name).exists():
        return
    fail(f"unknown model {str(name)!r}: not a shipped model ({', '.join(names) or 'none'}) nor an existing file")


def check_device_name(device: str, where: str, extra: tuple[str, ...] = ()) -> None:
    """A malformed device name fails at once; whether the device is there is asked of torch later. The wording
    is that of :func:`crystalign.rl.config.check_device`."""
    import re

    if device in extra or re.fullmatch(r"(cpu|cuda|mps)(:\d+)?", device or ""):
        return
    fail(f"{where}: invalid device {device!r}; expected {', '.join((*extra, 'cpu', 'cuda'))} or cuda:N")


def check_output_parent(out: Path) -> None:
    """An output folder that cannot be created fails at once, in the words of :func:`crystalign.io.check_output_dir`,
    which the work repeats; unlike it, this creates nothing, so a query refused later leaves no empty folder."""
    import os

    out = Path(out)
    if out.exists() and not out.is_dir():
        fail(f"output folder {out} is an existing file; choose a folder")
    parent = out
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        fail(f"output folder {out} is not writable: Not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        fail(f"output folder {out} is not writable: Permission denied")
