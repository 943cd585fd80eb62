"""``crystalign generate``: new crystals from a de novo (DNG) model, species included."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from crystalign.cli.common import check_device_name, check_model, check_output_parent, fail as _fail, threads_option, use_threads

# no torch here: see crystalign/cli/__init__.py


def generate_cmd(
    model: str = typer.Option(..., "--model", "-m", help="A de novo (DNG) model: shipped name (e.g. perov_5_dng) or checkpoint path."),
    n: int = typer.Option(..., "-n", help="Number of crystals to generate."),
    out: Path = typer.Option(Path("generated"), "--out", "-o", help="Output folder: CIFs, structures.extxyz, samples.json."),
    atoms: Optional[int] = typer.Option(
        None, "--atoms", help="Atoms per crystal (default: drawn from the training crystals' sizes)."
    ),
    elements: Optional[str] = typer.Option(
        None, "--elements",
        help="Elements the crystals may contain: comma-separated symbols (e.g. Sr,Ba,Ti,O,N), or 'all' (default: "
        "the training crystals' elements).",
    ),
    steps: Optional[int] = typer.Option(None, "--steps", help="Integration time points (default: the model's)."),
    method: Optional[str] = typer.Option(None, "--method", help="euler, heun or sde."),
    anneal_pos: Optional[float] = typer.Option(None, "--anneal-pos", help="Velocity annealing s for positions: (1 + s t) b (default: the model's)."),
    anneal_cap: Optional[float] = typer.Option(
        None, "--anneal-cap", help="Cap c of an annealed step: at most the fraction c of the way left to the model's estimate of the final crystal (default: the model's; inf: no cap)."
    ),
    batch_size: int = typer.Option(256, "--batch-size", min=1, help="Crystals per network batch."),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N."),
    trajectory: bool = typer.Option(False, "--trajectory", help="Also write every integration step (trajectory.extxyz)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in OUT from its last finished batch."),
    report: bool = typer.Option(
        False, "--report",
        help="Also score the crystals (validity, coverage, uniqueness, novelty; E-hull and S.U.N. with --hull) and write "
        "OUT/report.html and OUT/metrics.json, as `evaluate --dng --report` does.",
    ),
    reference: Optional[str] = typer.Option(
        None, "--reference", "-r",
        help="--report: reference and training crystals (file, folder, dataset name or NAME:SPLIT; default: the "
        "model's training data, e.g. perov_5:val).",
    ),
    hull: Optional[Path] = typer.Option(None, "--hull", help="--report: hull file (crystalign hull build) for E-hull and S.U.N."),
    threads: Optional[int] = threads_option(),
) -> None:
    """Generate new crystals (species, positions and lattice) with a de novo model.

    Examples:
      crystalign generate --model perov_5_dng -n 1000 --out gen/
      crystalign evaluate gen/ --dng --reference perov_5      # validity, coverage, novelty, ...
      crystalign generate --model perov_5_dng -n 200 --out gen/ --report --hull hull.json   # and OUT/report.html
    """
    from crystalign.cli.generate import check_device, check_sample_folder, sample_and_report
    from crystalign.io import OutputPathError, check_output_dir

    used_threads = use_threads(threads)
    if n < 1:
        _fail(f"-n must be >= 1, got {n}")
    if atoms is not None and atoms < 1:
        _fail(f"--atoms must be >= 1, got {atoms}")
    if steps is not None and steps < 2:
        _fail(f"--steps must be >= 2 time points, got {steps}")
    if not report and (reference is not None or hull is not None):
        _fail("--reference and --hull apply to --report")
    if hull is not None and not hull.is_file():
        _fail(f"--hull: {hull} is not a file (build one with `crystalign hull build`)")
    check_model(model)
    check_device_name(device, "--device")
    check_output_parent(out)
    if report and reference is None:
        reference = training_data_of(model)
        if reference is None:
            _fail(f"--report: {model} does not record its training data; give the reference crystals with -r")

    from crystalign.generator import Generator

    torch_device = check_device(device)
    try:
        gen = Generator.load(model).to(torch_device)
        if not gen.is_dng:
            raise ValueError(
                f"{model} is a crystal structure prediction (CSP) model: it needs compositions (`crystalign sample "
                "--composition ...`); `generate` needs a de novo (DNG) model such as perov_5_dng"
            )
        template = gen.dng_template(n, atoms, seed=seed)
        chosen = elements if elements in (None, "all") else [e.strip() for e in elements.split(",") if e.strip()]
        overrides = dict(steps=steps, method=method, anneal_pos=anneal_pos, anneal_cap=anneal_cap, elements=chosen)
        gen.sampler(**overrides)  # checks the settings against this model
    except (FileNotFoundError, ValueError) as err:
        _fail(str(err))
    try:
        check_output_dir(out)
        check_sample_folder(out, resume)
    except (OutputPathError, FileExistsError) as err:
        _fail(str(err))
    sample_and_report(
        gen, template, out, seed=seed, batch_size=batch_size, trajectory=trajectory, overrides=overrides,
        model_name=model, resume=resume,
        extra_record={"device": str(torch_device), "threads": used_threads, "mode": "dng", "atoms": atoms,
                      "elements": chosen or "training"},
    )
    if report:
        from crystalign.cli.evaluate import _evaluate_dng

        _evaluate_dng(
            None, out, reference, reference, hull, None, 0.0, None, None, None, False, out / "metrics.json",
            progress=True, data_root=None, report=out / "report.html",
        )
        typer.echo(f"wrote {out / 'report.html'} and {out / 'metrics.json'} (reference {reference})")


def training_data_of(model: str) -> str | None:
    """``NAME:SPLIT`` of the dataset a model was trained on, from its checkpoint's record (None if it has none)."""
    from crystalign.generator import resolve_model
    from crystalign.model.checkpoint import read_checkpoint_file

    ckpt = read_checkpoint_file(resolve_model(model), "cpu", what="crystalign model checkpoint")
    ckpt = ckpt.get("generator", ckpt) if isinstance(ckpt, dict) else {}
    data = ((ckpt.get("provenance") or {}).get("config") or {}).get("data") or {}
    return f"{data['dataset']}:{data.get('split') or 'train'}" if data.get("dataset") else None


def register(app: typer.Typer) -> None:
    app.command("generate")(generate_cmd)
