"""The ``crystalign`` command line. Each command group lives in its own module and registers here.

No module of this package imports torch, pymatgen, lightning or a potential at module level: each command imports
them when its work starts, after its cheap input checks and after :func:`crystalign.cli.common.use_threads` has
chosen the thread settings (which the OpenMP runtime reads only once, when torch starts). `--help`, `models`,
`config list` and refused inputs so answer at once; tests/test_cli_startup.py holds that.
"""

from __future__ import annotations

import typer

from crystalign.cli.common import OneLineErrors

app = typer.Typer(
    name="crystalign",
    cls=OneLineErrors,
    help="Steerable generative crystal structure prediction (stochastic interpolants + inference-time RL).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# --- command registrations (one line per module) ---
from crystalign.cli import data as _data  # noqa: E402
from crystalign.cli import generate as _generate  # noqa: E402
from crystalign.cli import denovo as _denovo  # noqa: E402
from crystalign.cli import rl as _rl  # noqa: E402
from crystalign.cli import evaluate as _evaluate  # noqa: E402
from crystalign.cli import models as _models  # noqa: E402
from crystalign.cli import predict as _predict  # noqa: E402
from crystalign.cli import hull as _hull  # noqa: E402
from crystalign.cli import config as _config  # noqa: E402

app.add_typer(_data.app, name="data")
_generate.register(app)
_denovo.register(app)
_rl.register(app)
_evaluate.register(app)
_models.register(app)
_predict.register(app)
_hull.register(app)
_config.register(app)
# --- end registrations ---


def main() -> None:
    from crystalign.settings import tune_allocator

    tune_allocator()
    app()
