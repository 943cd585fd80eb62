"""``crystalign rl fit | sample | plot-schedule``: inference-time RL on a base model's velocity field."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

import typer

from crystalign.cli.common import check_device_name, check_model, threads_option, use_threads
from crystalign.cli.generate import _fail, resolve_config

# no torch here: see crystalign/cli/__init__.py

app = typer.Typer(help="Inference-time reinforcement learning (OMatG-IRL) on a base model.", no_args_is_help=True)


@app.command("fit")
def fit_cmd(
    config: Path = typer.Argument(..., help="RL YAML config (shipped presets: rl_perov_5_velocity_cpu, ...)."),
    base_checkpoint: str = typer.Option(..., "--base-checkpoint", "-b", help="Base model: shipped name or checkpoint path."),
    out: Path = typer.Option(Path("runs/rl"), "--out", "-o"),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/last.pt (no iteration is lost)."),
    iterations: Optional[int] = typer.Option(None, "--iterations", help="Total iterations (overrides the config; raise it to extend a run with --resume)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda or cuda:N (overrides the config)."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="Folder holding the named datasets of the config."),
    report: bool = typer.Option(True, "--report/--no-report", help="Write OUT/report.html at the end."),
    threads: Optional[int] = typer.Option(
        None, "--threads", show_default=False,
        help="CPU threads of this process, 1 to the CPUs it may use (overrides the config's num_threads). Default: "
        "$OMP_NUM_THREADS if set, else one per core that no other process keeps busy at start, less one spare.",
    ),
) -> None:
    """Reinforce a base model toward a reward.

    Example: crystalign rl fit rl_perov_5_velocity_cpu --base-checkpoint perov_5 --out runs/rl_perov
    Several processes or GPUs: torchrun --nproc-per-node 4 -m crystalign.cli rl fit CONFIG -b CKPT
    Presets: `crystalign config list`; every key of one: `crystalign config show rl_perov_5_velocity_cpu`.
    """
    use_threads(threads)
    path = resolve_config(config)
    check_model(base_checkpoint)  # cheap checks before torch is imported
    if device is not None:
        check_device_name(device, "--device")

    import torch

    from crystalign.config import ConfigError, load_config
    from crystalign.generator import Generator, resolve_model
    from crystalign.model.checkpoint import read_checkpoint_file
    from crystalign.data.splits import load_training_data
    from crystalign.rewards.base import preload
    from crystalign.rewards.mlip import MLIPLoadError
    from crystalign.coverage import coverage_summary
    from crystalign.rl.checkpoints import check_resume, check_run_dir
    from crystalign.rl.config import RLConfig, check_device
    from crystalign.rl.trainer import RLDivergedError, RLTrainer, make_policy

    try:
        cfg = load_config(path, RLConfig)
    except (ConfigError, ValueError) as err:
        msg = str(err)
        _fail(msg if msg.startswith(str(path)) else f"{path}: {msg}")
    try:
        overrides = {k: v for k, v in {"iterations": iterations, "device": device, "num_threads": threads}.items() if v is not None}
        cfg = dataclasses.replace(cfg, **overrides)  # re-runs RLConfig's checks on the overridden values
        check_device(cfg.device, "--device" if device is not None else f"{path}: device")
    except ValueError as err:
        _fail(str(err))
    cfg = dataclasses.replace(cfg, device=init_distributed(cfg.device))
    try:  # cheap checks first (arguments in command-line order): they fail before the base model and data are loaded
        resolve_model(base_checkpoint)
        check_run_dir(out, resume)
    except (FileExistsError, FileNotFoundError, PermissionError) as err:
        _fail(str(err))
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    try:
        base = Generator.load(base_checkpoint).to(cfg.device)
        if resume:
            check_resume(read_checkpoint_file(out / "last.pt"), cfg, base.model_hash(), where=str(out / "last.pt"))
        train, hold, _ = load_training_data(cfg.data, str(data_root) if data_root else None)
        reward, val_reward = build_rewards(cfg.reward, train, hold)
        preload(reward)
        preload(val_reward)
        policy = make_policy(base, cfg)
    except (FileNotFoundError, ValueError, ConfigError, MLIPLoadError) as err:
        _fail(str(err))
    trainer = RLTrainer(
        policy, reward, cfg, train.to(cfg.device, dtype=torch.float32), hold.to(cfg.device, dtype=torch.float32), validation_reward=val_reward
    )
    warning = coverage_summary(base, train) if trainer.rank == 0 else None
    if warning:
        typer.secho(f"warning: {warning}", fg=typer.colors.YELLOW, err=True)
    try:
        history = trainer.fit(out, resume=resume)
    except RLDivergedError as err:
        _fail(f"{err}. Last good checkpoint: {out / 'last.pt'}", code=3)
    except (FileNotFoundError, FileExistsError, PermissionError) as err:
        _fail(str(err))
    except KeyboardInterrupt:
        done = f"{trainer.iteration} iteration(s) finished, the last checkpointed in {out / 'last.pt'}" if trainer.iteration else "no iteration finished"
        _fail(f"interrupted: {done}; rerun the same command with --resume to continue", code=130)
    if trainer.rank == 0:
        write_rl_summary(out, trainer, base_checkpoint)
    if report and trainer.rank == 0:
        write_rl_report(out, trainer)
    last = history[-1] if history else {}
    typer.echo(json.dumps({k: v for k, v in last.items() if isinstance(v, (int, float))}, indent=2))


def init_distributed(device: str) -> str:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1): GRPO groups are then sharded.
    Returns the device this rank runs on."""
    import os

    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        if device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if dist.is_initialized() and device.startswith("cuda"):
        # each rank owns the GPU torchrun gave it: an explicit cuda:N would put every rank on the same one
        return "cuda"
    return device


def build_rewards(spec, train, hold):
    """(training reward, validation reward) for ``rl fit`` (method.md §3.9).

    * A cRMSE reward without ``references``, top-level or a composite term (at any depth), compares against the
      training structures during training and the held-out structures during validation.
    * A composite's validation reward is its :meth:`~crystalign.rewards.CompositeReward.monitoring` copy: zero-weight
      terms are skipped in training and computed (logged as ``val_<term>/...``) in validation; other terms are shared.
    """
    from functools import cache

    from crystalign.rewards import make_reward

    train_reward = make_reward(_with_references(spec, cache(lambda: train.to_structures())))
    hold_refs = cache(lambda: hold.to_structures()) if hold is not None and hold.num_structures else None
    return train_reward, _validation_reward(spec, train_reward, hold_refs)


def _default_references(spec) -> bool:
    """A cRMSE spec naming no references: it gets those of the split it is evaluated on."""
    return isinstance(spec, Mapping) and str(spec.get("kind", "")).lower() == "crmse" and "references" not in spec


def _composite_terms(spec):
    is_composite = isinstance(spec, Mapping) and str(spec.get("kind", "")).lower() == "composite"
    return spec.get("terms") if is_composite and isinstance(spec.get("terms"), list) else None


def _with_references(spec, references):
    """``spec`` with ``references()`` given to every cRMSE spec in it that names none."""
    if _default_references(spec):
        return {**spec, "references": references()}
    terms = _composite_terms(spec)
    return {**spec, "terms": [_with_references(t, references) for t in terms]} if terms is not None else spec


def _validation_reward(spec, reward, hold_refs):
    """``reward`` (built from ``spec``) for validation: default-reference cRMSE rebuilt on ``hold_refs()`` (kept when
    there is no held-out split), composites as monitoring copies, everything else shared."""
    from crystalign.rewards import CompositeReward, make_reward

    if _default_references(spec):
        return make_reward({**spec, "references": hold_refs()}) if hold_refs is not None else reward
    if not isinstance(reward, CompositeReward):
        return reward
    specs = _composite_terms(spec) or [None] * len(reward.terms)  # None: built from reward objects, not a config
    replace = {}
    for (name, term, _), term_spec in zip(reward.terms, specs):
        inner = CompositeReward.parse_term(term_spec, name)[1] if term_spec is not None else None
        replace[name] = _validation_reward(inner, term, hold_refs)
    return reward.monitoring(replace)


def write_rl_summary(out: Path, trainer, base_checkpoint: str) -> None:
    """OUT/summary.json: what the run was (config, seed, base model, versions, command) and where it ended."""
    import sys

    from crystalign.config import to_dict
    from crystalign.io import write_json
    from crystalign.provenance import versions

    last = trainer.history[-1] if trainer.history else {}
    write_json(out / "summary.json", {
        "config": to_dict(trainer.config),
        "seed": trainer.config.seed,
        "base_checkpoint": str(base_checkpoint),
        "base_model_hash": trainer.reference_hash,
        "iterations": trainer.iteration,
        "best_val_reward_mean": trainer.best_val if trainer.best_val > float("-inf") else None,
        "last": {k: v for k, v in last.items() if isinstance(v, (int, float))},
        "checkpoints": {"last": "last.pt", "best": "best.pt"},
        "versions": versions(),
        "command": " ".join(sys.argv),
    })


def write_rl_report(out: Path, trainer) -> None:
    from crystalign.report import write_report

    hist = trainer.history
    summary = {
        "title": "RL fit",
        "variant": trainer.config.variant,
        "iterations": trainer.iteration,
        "reward": str(trainer.config.reward),
        "seed": trainer.config.seed,
    }
    write_report(out, title="crystalign rl fit", summary=summary, candidates=[], history=hist, schedule=schedule_of(trainer.policy))


def schedule_of(policy, points: int = 101) -> dict:
    """Learned s(t) and σ(t) on a grid, for plots and reports."""
    import torch

    device = next(policy.parameters()).device
    t = torch.linspace(1e-3, 0.999, points, device=device)
    out: dict = {"t": t.tolist()}
    with torch.no_grad():
        if policy.scale is not None:
            s = policy.scale(t)
            out["pos_s"], out["cell_s"] = s["pos_s"].tolist(), s["cell_s"].tolist()
        for f, tr in policy.transitions.items():
            out[f"{f}_sigma"] = tr.noise(t).tolist()
    return out


@app.command("sample")
def sample_cmd(
    checkpoint: Path = typer.Argument(..., help="RL checkpoint (OUT/best.pt or OUT/last.pt of rl fit)."),
    composition: Optional[list[str]] = typer.Option(None, "--composition", "-c", help="Formula, e.g. SrTiO3 (repeatable)."),
    compositions_from: Optional[Path] = typer.Option(
        None, "--compositions-from", help="Reference file or dataset name: sample each row's composition, in row order."
    ),
    n: int = typer.Option(1, "-n", help="Structures per composition (with --composition), or crystals of a de novo run."),
    k: int = typer.Option(1, "-k", help="Structures per reference row (with --compositions-from)."),
    atoms: Optional[int] = typer.Option(None, "--atoms", min=1, help="De novo runs: atoms per crystal (default: drawn as in training)."),
    out: Path = typer.Option(Path("rl_samples"), "--out", "-o", help="Output folder (one without earlier samples)."),
    no_noise: bool = typer.Option(False, "--no-noise", help="Deterministic mean path instead of the trained stochastic policy."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Time points, >= 2 (default: as trained)."),
    seed: int = typer.Option(0, "--seed", help="Random seed (with the batch size, it fixes the structures)."),
    batch_size: int = typer.Option(256, "--batch-size", help="Structures per network batch."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="Folder holding the named datasets (for a dataset name in --compositions-from)."),
    threads: Optional[int] = threads_option(),
) -> None:
    """Sample the reinforced policy.

    Examples:
      crystalign rl sample runs/rl_perov/best.pt --composition SrTiO3 -n 16 --out rl_samples/
      crystalign rl sample runs/rl_dng/best.pt -n 100 --out rl_dng_samples/      # a de novo run: no compositions
    """
    from crystalign.cli.generate import check_sample_counts, check_sample_folder, report_samples
    from crystalign.io import check_output_dir

    used_threads = use_threads(threads)
    # cheap checks first, before torch is imported (a de novo run, known once loaded, takes no compositions)
    dng_request = composition is None and compositions_from is None
    if not dng_request:
        check_sample_counts(composition, compositions_from, n, k)
    elif n < 1:
        _fail("-n must be >= 1")
    if batch_size < 1:
        _fail(f"--batch-size must be >= 1, got {batch_size}")
    if not checkpoint.exists():
        _fail(f"checkpoint {checkpoint} does not exist")  # the wording of read_checkpoint_file
    check_device_name(device, "--device")
    try:
        check_output_dir(out)
        check_sample_folder(out, resume=False)
    except (ValueError, PermissionError, FileExistsError) as err:
        _fail(str(err))

    from crystalign.coverage import composition_coverage_warnings
    from crystalign.generator import composition_batch
    from crystalign.io import write_structure_set
    from crystalign.rl.checkpoints import load_policy
    from crystalign.rl.config import check_device
    from crystalign.steering import SteeredModel

    try:
        dev = check_device(device, "--device")
    except ValueError as err:
        _fail(str(err))
    try:
        policy, state = load_policy(checkpoint)
        # None means "as trained"; an explicit value goes through RLConfig's own check (steps >= 2)
        steps = dataclasses.replace(policy.config, steps=steps).steps if steps is not None else policy.config.steps
        if policy.reference.is_dng != dng_request:
            if dng_request:
                check_sample_counts(composition, compositions_from, n, k)  # a CSP run: names what is missing
            _fail(f"{checkpoint} is a de novo run: it generates the species; give -n (and --atoms), not compositions")
        if dng_request:
            template = policy.reference.dng_template(n, atoms, seed=seed)
        elif composition:
            template = composition_batch(composition, n, max_atoms=policy.reference.config.max_atoms)
        else:
            from crystalign.data import load_dataset

            ref = load_dataset(str(compositions_from), data_root=str(data_root) if data_root else None)
            template = ref.batch.repeat_interleave(k)
            template = template.replace(ids=[f"{i // k:06d}_{i % k:03d}" for i in range(template.num_structures)])
    except (FileNotFoundError, ValueError) as err:
        _fail(str(err))
    warns = [] if dng_request else composition_coverage_warnings(policy.reference, template)
    for w in warns:
        typer.secho(f"warning: {w}", fg=typer.colors.YELLOW, err=True)
    t0 = time.time()
    batch = SteeredModel(policy.to(dev)).sample_batch(template, steps=steps, seed=seed, noise=not no_noise, batch_size=batch_size, progress=None).to("cpu")
    valid = batch.validity().valid.tolist()
    record = {"checkpoint": str(checkpoint), "iteration": state.get("iteration"), "seed": seed, "noise": not no_noise, "steps": steps, "threads": used_threads, "coverage_warnings": warns}
    write_structure_set(out, batch, record, valid=valid)
    report_samples(out, batch.num_structures, sum(valid), time.time() - t0)


@app.command("plot-schedule")
def plot_schedule_cmd(
    checkpoint: str = typer.Argument(..., help="RL checkpoint, or a model (shipped name or file) that carries a learned schedule."),
    out: Path = typer.Option(Path("schedule.png"), "--out", "-o"),
) -> None:
    """Plot the learned s(t) (velocity annealing) and σ(t) as a PNG, PDF or SVG (by the suffix of --out).

    Examples:
      crystalign rl plot-schedule runs/rl_scale/best.pt --out schedule.png
      crystalign rl plot-schedule perov_5 --out perov_5_schedule.png
    """
    use_threads(None)  # before torch starts
    from crystalign.io import check_output_file
    from crystalign.report import figure_format, plot_schedule

    try:
        figure_format(out)
        check_output_file(out)
    except (ValueError, PermissionError) as err:
        _fail(str(err))
    try:
        series = _schedule_series(checkpoint)
    except (FileNotFoundError, ValueError) as err:
        _fail(str(err))
    plot_schedule(series, out)
    typer.echo(f"wrote {out}")


def _schedule_series(name_or_path: str, points: int = 101) -> dict:
    """s(t) (and σ(t) of an RL run) on a grid, from an RL checkpoint or from a model carrying a schedule."""
    from crystalign.generator import Generator, resolve_model
    from crystalign.model.checkpoint import read_checkpoint_file
    from crystalign.rl.checkpoints import FORMAT, load_policy

    path = resolve_model(name_or_path)
    state = read_checkpoint_file(path, what="RL checkpoint or crystalign model")
    if isinstance(state, dict) and state.get("format") == FORMAT:
        policy, _ = load_policy(path)
        return schedule_of(policy, points)
    from crystalign.generator import CHECKPOINT_FORMAT

    if isinstance(state, dict) and isinstance(state.get("generator"), dict):  # a training checkpoint
        state = state["generator"]
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path}: not a crystalign RL checkpoint (format: {found!r}) nor a crystalign model")
    gen = Generator.load(path)
    if gen.schedule is None:
        raise ValueError(f"{name_or_path}: this model carries no learned velocity schedule (attach one with `crystalign rl attach-schedule`)")
    t = [1e-3 + (0.999 - 1e-3) * i / (points - 1) for i in range(points)]
    values = gen.schedule.values(t)
    return {"t": t, "pos_s": values["pos"], "cell_s": values["cell"]}


@app.command("attach-schedule")
def attach_schedule_cmd(
    checkpoint: Path = typer.Argument(..., help="RL checkpoint of a velocity-annealing run (variant: scale): OUT/best.pt of rl fit."),
    out: Path = typer.Option(..., "--out", "-o", help="Model file to write: the run's base model with the learned s(t) as its default sampler."),
) -> None:
    """Write the base model of a velocity-annealing RL run with its learned s(t) attached: `sample`, `predict` and
    the Python API then integrate with [1 + s(t)]·b at the schedule's step count by default (--no-schedule turns it off).

    Example: crystalign rl attach-schedule runs/rl_scale/best.pt --out models/perov_5_annealed.pt
    """
    use_threads(None)
    from crystalign.io import check_output_file, save_torch

    if not checkpoint.exists():
        _fail(f"checkpoint {checkpoint} does not exist")
    try:
        check_output_file(out)
    except (ValueError, PermissionError) as err:
        _fail(str(err))
    from crystalign.generator import Generator
    from crystalign.provenance import versions
    from crystalign.rl.checkpoints import read_rl_checkpoint
    from crystalign.schedule import VelocitySchedule

    try:
        schedule = VelocitySchedule.from_rl_checkpoint(checkpoint)
        reference = read_rl_checkpoint(checkpoint)["reference"]
        gen = Generator.from_checkpoint_dict(reference, where=f"{checkpoint}:reference")
    except (FileNotFoundError, ValueError) as err:
        _fail(str(err))
    gen.schedule = schedule.checked_for(gen)
    # the base model's own provenance (training config and data) stays; the schedule's origin is added
    provenance = {**(reference.get("provenance") or {}), "schedule": {**schedule.record(), "from": str(checkpoint), "versions": versions()}}
    save_torch(out, gen.checkpoint_dict({"provenance": provenance}))
    typer.echo(f"wrote {out} (learned s(t) for {schedule.steps} time points attached)")


@app.command("export")
def export_cmd(
    checkpoint: Path = typer.Argument(..., help="RL checkpoint of a velocity-based run (OUT/best.pt of rl fit)."),
    out: Path = typer.Option(..., "--out", "-o", help="Model file to write: the reinforced network as a model."),
    base: Optional[str] = typer.Option(
        None, "--base",
        help="Where the exported model finds its base model when the run reinforced only some fields (or is de novo): "
        "a shipped model name or a file (default: the shipped model the run started from).",
    ),
) -> None:
    """Write the reinforced network of a velocity-based RL run as a model that `sample`, `predict` and the Python API
    use like a base model: Euler integration is the policy's mean path (its sampling without exploration noise).

    A run on pos and cell of a CSP model exports one network. A run that reinforced only some fields, or a de novo
    run (its species follow the frozen base model), exports the tuned network with a reference to its base model
    (checked by hash when loaded): the fields left out, and the species, come from the base network.

    Example: crystalign rl export runs/rl_perov_energy/best.pt --out perov_5_energy.pt
    """
    use_threads(None)
    from crystalign.io import check_output_file, save_torch

    if not checkpoint.exists():
        _fail(f"checkpoint {checkpoint} does not exist")
    try:
        check_output_file(out)
    except (ValueError, PermissionError) as err:
        _fail(str(err))
    from crystalign.generator import Generator, shipped_models
    from crystalign.provenance import versions
    from crystalign.rl.checkpoints import load_policy

    try:
        policy, state = load_policy(checkpoint)
    except (FileNotFoundError, ValueError) as err:
        _fail(str(err))
    if policy.config.variant != "velocity":
        # the score variant's mean path adds σ²/(2γ)·η, and the annealing variants scale a frozen network: none of
        # them is plain Euler of one network
        _fail(f"{checkpoint}: a {policy.config.variant!r} RL run cannot be exported as a model (only 'velocity')")
    ref = policy.reference
    if ref.tuned_from is not None:
        _fail(f"{checkpoint}: the run started from an RL-tuned model; export needs a run from a base model")
    base_hash = ref.model_hash()
    provenance = {
        "rl": {
            "checkpoint": str(checkpoint), "iteration": state.get("iteration"), "reward": policy.config.reward,
            "base_model_hash": base_hash, "variant": policy.config.variant, "fields": list(policy.config.fields),
            "versions": versions(),
        }
    }
    anneal = policy.config.anneal
    if sorted(policy.config.fields) == ["cell", "pos"] and not ref.is_dng:
        ref.net.load_state_dict(policy.net.state_dict())
        ref.schedule = None
        ref.config.sampling.follow_policy(anneal, policy.config.steps, policy.config.anneal_cap)  # the policy's mean path
        save_torch(out, ref.checkpoint_dict({"provenance": provenance}))
        typer.echo(f"wrote {out} (the network of iteration {state.get('iteration')}, reinforced from model {base_hash})")
        return
    # the fields left out (and de novo species) follow the frozen base network: the model keeps a reference to it
    if base is None:
        # the model cards record each shipped model's hash: no need to load every model
        cards = {name: path.with_suffix(".json") for name, path in shipped_models().items()}
        base = next((n for n, c in cards.items() if c.is_file() and json.loads(c.read_text()).get("model_hash") == base_hash), None)
        if base is None:
            _fail(f"{checkpoint}: the run's base model (hash {base_hash}) is not a shipped model; pass --base FILE, the base model's file")
    try:
        given = Generator.load(base)
    except (FileNotFoundError, ValueError) as err:
        _fail(f"--base: {err}")
    if given.model_hash() != base_hash:
        _fail(f"--base {base} has hash {given.model_hash()}, but the run was reinforced from a base with hash {base_hash}")
    if base not in shipped_models():  # a file: found again relative to the exported model's folder
        base = os.path.relpath(Path(base).resolve(), out.resolve().parent)
    gen = Generator.tuned(ref, policy.net, policy.config.fields, base, anneal=anneal, steps=policy.config.steps,
                         anneal_cap=policy.config.anneal_cap)
    save_torch(out, gen.checkpoint_dict({"provenance": provenance}))
    typer.echo(
        f"wrote {out} (the {', '.join(policy.config.fields)} velocity of iteration {state.get('iteration')}, the rest "
        f"from base model {base}, hash {base_hash})"
    )


def register(parent: typer.Typer) -> None:
    parent.add_typer(app, name="rl")

