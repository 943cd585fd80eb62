"""``crystalign train`` and ``crystalign sample``."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from crystalign.cli.common import (
    check_device_name, check_model, check_output_parent, fail as _fail, threads_option, use_threads,
)

# no torch here: see crystalign/cli/__init__.py


def train_cmd(
    config: Path = typer.Argument(..., help="YAML training config or a preset name (`crystalign config list`)."),
    out: Path = typer.Option(Path("runs/train"), "--out", "-o", help="Run folder: checkpoints, logs, model.pt (a new run needs a folder without one)."),
    resume: bool = typer.Option(
        False, "--resume",
        help="Continue from OUT/last.ckpt; the config must match the run's, except e.g. --max-minutes, and --max-epochs "
        "unless the learning rate follows a cosine schedule (its length is fixed).",
    ),
    devices: Optional[str] = typer.Option(None, "--devices", help="Devices per node (Lightning), e.g. 2 or 'auto'."),
    num_nodes: Optional[int] = typer.Option(None, "--num-nodes", help="Number of nodes for DDP."),
    accelerator: Optional[str] = typer.Option(None, "--accelerator", help="cpu, gpu or auto."),
    max_minutes: Optional[float] = typer.Option(None, "--max-minutes", help="Stop after this much wall time."),
    max_epochs: Optional[int] = typer.Option(None, "--max-epochs"),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="Folder holding the named datasets."),
    threads: Optional[int] = threads_option(),
) -> None:
    """Train a CSP base model.

    Example: crystalign train perov_5_cpu --out runs/perov_5
    (a bare name selects a shipped preset config, see `crystalign config list`; a path selects your own YAML,
    `crystalign config show perov_5_cpu` prints every key to start one from)
    """
    use_threads(threads)
    path = resolve_config(config)  # before lightning and torch are imported

    from crystalign.config import ConfigError, load_config
    from crystalign.io import OutputPathError
    from crystalign.training import TrainConfig, train

    try:
        cfg = load_config(path, TrainConfig)
    except ConfigError as err:
        _fail(str(err))
    if devices is not None:
        cfg.trainer.devices = int(devices) if devices.isdigit() else devices
        if cfg.trainer.strategy == "auto" and devices not in ("1", "auto"):
            cfg.trainer.strategy = "ddp"
    if num_nodes is not None:
        cfg.trainer.num_nodes = num_nodes
    if accelerator is not None:
        cfg.trainer.accelerator = accelerator
    if max_minutes is not None:
        cfg.optim.max_minutes = max_minutes
    if max_epochs is not None:
        cfg.optim.max_epochs = max_epochs
    if threads is not None:  # the config's trainer.num_threads would otherwise override --threads
        cfg.trainer.num_threads = threads
    try:
        result = train(cfg, out, resume=resume, data_root=str(data_root) if data_root else None, config_path=str(path))
    except KeyboardInterrupt:
        last = out / "last.ckpt"
        kept = f"the last checkpoint is {last} (written at each validation)" if last.exists() else "no checkpoint was written yet"
        _fail(f"interrupted: {kept}; rerun the same command with --resume to continue", code=130)
    except FloatingPointError as err:
        last = out / "last.ckpt"
        where = f"Last good checkpoint: {last}" if last.exists() else "No checkpoint was written before it"
        _fail(f"{err}. {where}", code=3)
    except (FileNotFoundError, ValueError, OutputPathError) as err:  # ValueError: ConfigError, RunFolderError
        _fail(str(err))
    typer.echo(json.dumps(result, indent=2))


def resolve_config(config: Path) -> Path:
    if config.exists():
        return config
    shipped = Path(__file__).resolve().parent.parent / "configs" / f"{config.name.removesuffix('.yaml')}.yaml"
    if shipped.exists():
        return shipped
    _fail(f"{config}: config file not found (nor a shipped preset)")
    raise AssertionError  # unreachable


def sample_cmd(
    model: str = typer.Option(..., "--model", "-m", help="Shipped model name or checkpoint path."),
    composition: Optional[list[str]] = typer.Option(None, "--composition", "-c", help="Formula, e.g. SrTiO3 (repeatable)."),
    compositions_from: Optional[Path] = typer.Option(None, "--compositions-from", help="Reference file or dataset name: sample each row's composition, in row order."),
    n: int = typer.Option(1, "-n", help="Structures per composition (with --composition)."),
    k: int = typer.Option(1, "-k", help="Structures per reference row (with --compositions-from)."),
    out: Path = typer.Option(Path("samples"), "--out", "-o", help="Output folder."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Integration time points (default: the model's)."),
    method: Optional[str] = typer.Option(None, "--method", help="euler, heun or sde."),
    anneal_pos: Optional[float] = typer.Option(None, "--anneal-pos", help="Velocity annealing s for positions: (1 + s t) b."),
    anneal_cell: Optional[float] = typer.Option(None, "--anneal-cell", help="Velocity annealing s for the lattice."),
    anneal_cap: Optional[float] = typer.Option(
        None, "--anneal-cap", help="Cap c of an annealed step: at most the fraction c of the way left to the model's estimate of the final structure; inf: no cap."
    ),
    schedule: Optional[Path] = typer.Option(
        None, "--schedule", help="Learned velocity schedule s(t): an RL checkpoint of variant scale for this model (default: the model's own, if it carries one)."
    ),
    no_schedule: bool = typer.Option(False, "--no-schedule", help="Integrate without the model's learned velocity schedule."),
    batch_size: int = typer.Option(256, "--batch-size", min=1, help="Structures per network batch."),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N."),
    trajectory: bool = typer.Option(False, "--trajectory", help="Also write every integration step (trajectory.extxyz)."),
    data_root: Optional[Path] = typer.Option(
        None, "--data-root", help="Folder holding the named datasets (for a dataset name in --compositions-from)."
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in OUT from its last finished batch."),
    threads: Optional[int] = threads_option(),
) -> None:
    """Sample crystal structures for compositions.

    Examples:
      crystalign sample --model perov_5 --composition SrTiO3 -n 32 --out samples/
      crystalign sample --model runs/perov_5/model.pt --compositions-from holdout.csv -k 1 --out gen/
    """
    from crystalign.io import OutputPathError, check_output_dir

    used_threads = use_threads(threads)
    # cheap checks first, before torch and the model load
    check_sample_counts(composition, compositions_from, n, k)
    check_model(model)
    check_device_name(device, "--device")
    check_output_parent(out)  # creates nothing: a query refused below leaves no empty folder
    if schedule is not None and no_schedule:
        _fail("give either --schedule or --no-schedule")
    if steps is not None and steps < 2:
        _fail(f"--steps must be >= 2 time points, got {steps}")
    if schedule is not None and not schedule.exists():
        _fail(f"--schedule: {schedule} does not exist")

    from crystalign.coverage import composition_coverage_warnings
    from crystalign.generator import Generator, composition_batch

    torch_device = check_device(device)
    try:
        gen = Generator.load(model).to(torch_device)
        gen.check_csp("`crystalign sample`")
    except (FileNotFoundError, ValueError) as err:
        _fail(str(err))
    try:
        if composition:
            template = composition_batch(composition, n, max_atoms=gen.config.max_atoms)
        else:
            from crystalign.data import load_dataset

            # a dataset name works here as everywhere else (looked up in --data-root / $CRYSTALIGN_DATA_ROOT)
            ref = load_dataset(str(compositions_from), data_root=data_root)
            ref_batch = ref.batch if hasattr(ref, "batch") else ref
            template = ref_batch.repeat_interleave(k)
            template = template.replace(ids=[f"{i // k:06d}_{i % k:03d}" for i in range(template.num_structures)])
        overrides = dict(
            steps=steps, method=method, anneal_pos=anneal_pos, anneal_cell=anneal_cell, anneal_cap=anneal_cap,
            schedule=False if no_schedule else (str(schedule) if schedule is not None else None),
        )
        gen.sampler(**overrides)  # checks the settings against this model (e.g. 'sde' needs a denoiser)
    except ValueError as err:
        _fail(str(err))
    try:  # before sampling, so a bad --out never costs the samples
        check_output_dir(out)
        check_sample_folder(out, resume)
    except (OutputPathError, FileExistsError) as err:
        _fail(str(err))
    warns = composition_coverage_warnings(gen, template)
    for w in warns:
        typer.secho(f"warning: {w}", fg=typer.colors.YELLOW, err=True)
    sample_and_report(
        gen, template, out, seed=seed, batch_size=batch_size, trajectory=trajectory, overrides=overrides,
        model_name=model, resume=resume, extra_record={"device": str(torch_device), "threads": used_threads, "coverage_warnings": warns},
    )


def sample_and_report(gen, template, out: Path, **kwargs) -> None:
    """:func:`run_sampling` for a command: clean errors, a resumable interruption, and the closing report."""
    try:
        result = run_sampling(gen, template, out, **kwargs)
    except ValueError as err:
        _fail(str(err))
    except KeyboardInterrupt:
        kept = len(list((out / ".sampling").glob("batch_*.pt")))
        _fail(f"interrupted; {kept} finished batch(es) kept in {out / '.sampling'}: rerun the same command with --resume", code=130)
    report_samples(out, result["n"], result["n_valid"], result["wall_s"])


def report_samples(out: Path, n: int, n_valid: int, wall_s: float) -> None:
    """What `sample` and `rl sample` say when done: where, how many, how many valid."""
    typer.echo(f"wrote {n} structures to {out} ({n_valid} valid, {wall_s:.1f} s)")
    if n_valid < n:
        typer.secho(
            f"warning: {n - n_valid} structure(s) fail the validity check (flat or collapsed cells, "
            "overlapping atoms); they are written and flagged in samples.json",
            fg=typer.colors.YELLOW, err=True,
        )


def check_sample_counts(composition: str | None, compositions_from: object | None, n: int, k: int) -> None:
    """One source of compositions, and only its own count: -n with --composition, -k with --compositions-from
    (the other would be silently ignored, and a later `evaluate` would pair the wrong number of samples)."""
    if (composition is None) == (compositions_from is None):
        _fail("give either --composition or --compositions-from")
    if n < 1 or k < 1:
        _fail("-n and -k must be >= 1")
    if composition is not None and k != 1:
        _fail(f"-k {k} applies to --compositions-from; with --composition give the number of structures with -n")
    if compositions_from is not None and n != 1:
        _fail(f"-n {n} applies to --composition; with --compositions-from give the structures per reference row with -k")


def check_sample_folder(out: Path, resume: bool) -> None:
    """A new sampling run needs a folder without another run's samples (evaluate would pair stale files), and
    the finished batches of an interrupted run are only continued or removed on purpose."""
    if resume:
        if (out / "samples.json").exists() and not (out / ".sampling").exists():
            raise FileExistsError(f"{out} holds finished samples (samples.json), nothing to resume; choose another --out")
        return
    if (out / ".sampling" / "run.json").exists():
        raise FileExistsError(
            f"{out} holds an interrupted sampling run ({out / '.sampling'}): pass --resume to continue it, or delete "
            "that folder to start over"
        )
    if (out / "samples.json").exists():
        raise FileExistsError(f"{out} already holds samples (samples.json); choose another --out or delete them first")


def check_device(device: str) -> torch.device:
    """The torch device named ``device``, or a clean CLI error when it is unknown or not available here."""
    from crystalign.rl.config import check_device as resolve

    try:
        return resolve(device, "--device")
    except ValueError as err:
        _fail(str(err))


def run_sampling(
    gen, template, out: Path, seed: int, batch_size: int, trajectory: bool, overrides: dict, model_name: str, resume: bool = False,
    extra_record: dict | None = None,
) -> dict:
    """Sample in batches with a progress bar; write CIFs, one extxyz and a JSON record (all atomically).

    Every finished batch is kept in ``OUT/.sampling`` with the random state after it, so an interrupted run
    continues with ``resume`` and ends bit-identical to an uninterrupted one on the CPU (on a GPU, to the
    rounding of its non-deterministic atomic adds); the folder goes once all is written.
    """
    import hashlib
    import shutil

    import torch
    from tqdm import tqdm

    from crystalign.crystal import CrystalBatch
    from crystalign.model.checkpoint import read_checkpoint_file
    from crystalign.io import remove_stale_parts, save_torch, write_json, write_structure_set

    t0 = time.time()
    p = next(gen.net.parameters())
    template = template.to(p.device, dtype=p.dtype)
    sampler = gen.sampler(**overrides)
    # what was integrated: the model's defaults, the overrides, and the velocity schedule (None: none)
    sampler_cfg = {**vars(sampler.config), "schedule": sampler.schedule.record() if sampler.schedule is not None else None}
    if getattr(sampler, "elements", None) is not None:  # a DNG model's element restriction (atomic numbers)
        sampler_cfg["elements"] = (torch.nonzero(sampler.elements).squeeze(-1) + 1).tolist()
    layout = hashlib.sha256(repr((template.species.tolist(), template.n_atoms.tolist(), template.ids)).encode()).hexdigest()
    run = {"model_hash": gen.model_hash(), "seed": seed, "sampler": sampler_cfg, "batch_size": batch_size,
           "trajectory": trajectory, "dtype": str(p.dtype), "compositions_sha256": layout}
    partial = out / ".sampling"
    remove_stale_parts(out, recursive=True)  # temporary files of writes that a kill interrupted
    if resume and (partial / "run.json").exists():
        saved = json.loads((partial / "run.json").read_text())
        if isinstance(saved.get("sampler"), dict):  # runs started before the cap existed sampled without one
            saved["sampler"].setdefault("anneal_cap", None)
        changed = sorted(key for key in run.keys() | saved.keys() if saved.get(key) != run.get(key))
        if changed:
            raise ValueError(f"--resume: {out} holds an interrupted run with other {', '.join(changed)}; rerun it as it was, or use another --out")
    else:
        shutil.rmtree(partial, ignore_errors=True)  # a new run: batches of an older one must not leak in
        write_json(partial / "run.json", run)
    g = torch.Generator().manual_seed(seed)  # CPU draws, moved to the device: a seed means the same on any device
    parts, frames = [], []
    chunks = list(template.split(batch_size))
    n_steps = sampler.config.steps - 1
    bar = tqdm(total=len(chunks) * n_steps, desc="sampling", unit="step", disable=None)  # integration steps of all batches
    for i, part in enumerate(chunks):
        done = partial / f"batch_{i:05d}.pt"
        if done.exists():
            kept = read_checkpoint_file(done)  # on the CPU: generator states are CPU byte tensors on every device
            dev = lambda x: x.to(p.device)  # noqa: E731
            # species: generated by a DNG model (absent from CSP batches, whose species are given)
            species = kept.get("species")
            res = part.replace(frac=dev(kept["frac"]), lattice=dev(kept["lattice"]), **({"species": dev(species)} if species is not None else {}))
            frame_species = kept.get("frames_species") or [res.species] * len(kept["frames_frac"])
            frames.extend(
                part.replace(frac=dev(f), lattice=dev(c), species=dev(z))
                for f, c, z in zip(kept["frames_frac"], kept["frames_lattice"], frame_species)
            )
            g.set_state(kept["rng"])
            bar.update(n_steps)
        else:
            x0 = gen.base_sample(part.species, part.n_atoms, g)
            res = sampler.sample(x0, generator=g, trajectory=trajectory, callback=lambda k, n: bar.update(1))
            traj = []
            if trajectory:
                res, traj = res
            save_torch(done, {"frac": res.frac, "lattice": res.lattice, "rng": g.get_state(),
                              "frames_frac": [f.frac for f in traj], "frames_lattice": [f.lattice for f in traj],
                              **({"species": res.species, "frames_species": [f.species for f in traj]} if gen.is_dng else {})})
            frames.extend(f.replace(ids=part.ids) for f in traj)
        parts.append(res.replace(ids=part.ids))
    bar.close()
    batch = CrystalBatch.cat(parts)
    record = {
        "model": model_name,
        "model_hash": gen.model_hash(),
        "seed": seed,
        # the noise is drawn batch after batch: the same seed gives the same structures at the same batch size
        "batch_size": batch_size,
        "sampler": sampler_cfg,
        **(extra_record or {}),
        "wall_s": time.time() - t0,
        "command": " ".join(sys.argv),
    }
    valid = batch.validity().valid.tolist()
    write_structure_set(out, batch, record, trajectory=frames or None, valid=valid)
    shutil.rmtree(partial, ignore_errors=True)
    return {**record, "n": batch.num_structures, "n_valid": sum(valid)}


def register(app: typer.Typer) -> None:
    app.command("train")(train_cmd)
    app.command("sample")(sample_cmd)
