"""``crystalign predict`` (the main job) and ``crystalign models``."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Optional

import typer

from crystalign.cli.common import (
    PRETRAINED, check_device_name, check_model, check_output_parent, fail as _fail, threads_option, use_threads,
)

# crystalign.prediction's defaults, repeated here because importing it imports torch (a test keeps them equal)
DEFAULT_COMPOSITION = "SrTiO3"
DEFAULT_MODEL = "perov_5"


def predict_cmd(
    composition: str = typer.Argument(DEFAULT_COMPOSITION, help="Chemical formula of one cell, e.g. SrTiO3."),
    n: Optional[int] = typer.Option(
        None, "-n", help="Candidates to sample from the base model (per cell size), and as many from the RL policy.", show_default="32",
    ),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Shipped model name (see `crystalign models`) or checkpoint path."),
    reward: str = typer.Option("energy", "--reward", help="Objective: only 'energy' (MLIP energy per atom); other rewards through `crystalign rl fit`."),
    backend: str = typer.Option("sevenn", "--backend", help="MLIP for energies, RL reward and relaxation: sevenn, chgnet or mace."),
    mlip_model: Optional[str] = typer.Option(
        None, "--mlip-model",
        help="The backend's model name or file (default: SevenNet-0, CHGNet 0.3.0, MACE medium-mpa-0). A file is read by "
        "its package's own loader, which unpickles it: use only files from sources you trust.",
    ),
    modal: Optional[str] = typer.Option(
        None, "--modal", help="Fidelity of a multi-fidelity SevenNet model, e.g. PBE or R2SCAN for --mlip-model 7net-mf-0."
    ),
    rl_steps: int = typer.Option(
        0, "--rl-steps",
        help="Iterations of inference-time RL on this composition (default 0, base model only: at equal MLIP budget, "
        "sampling more candidates found lower energies; README).",
    ),
    budget: Optional[int] = typer.Option(
        None, "--budget",
        help="MLIP energy evaluations before relaxation for the whole query: without --rl-steps the base model samples "
        "them all (instead of -n); with it, -n base and -n policy candidates come first and RL runs as many of its "
        "iterations as the rest pays for.",
    ),
    rl_novelty: float = typer.Option(
        0.0, "--rl-novelty",
        help="RL reward cost (eV/atom) of a rollout that repeats a structure already found: pays per-query RL for new "
        "basins (0: off).",
    ),
    tuned: bool = typer.Option(
        True, "--tuned/--no-tuned",
        help="For a shipped base model whose RL-tuned model found lower relaxed energies at an equal MLIP budget "
        "(carbon_24 -> carbon_24_energy; `crystalign models`), draw the candidates from the tuned model.",
    ),
    mix_base: Optional[float] = typer.Option(
        None, "--mix-base",
        help="Share of the candidates drawn from the base model the sampled model was RL-tuned from, the rest from the "
        "tuned model [default: the tuned model's card, else 0].",
    ),
    rank_rollouts: bool = typer.Option(
        True, "--rank-rollouts/--no-rank-rollouts",
        help="Rank every structure RL's reward scored (its rollouts) with the candidates; they cost no extra MLIP evaluation.",
    ),
    relax: bool = typer.Option(True, "--relax/--no-relax", help="Relax candidates with the MLIP (ASE FIRE, bounded steps)."),
    relax_steps: Optional[int] = typer.Option(
        None, "--relax-steps", help="Maximum FIRE steps per structure [default: 400, or 20 per atom of the largest cell if more].",
    ),
    relax_top: int = typer.Option(16, "--relax-top", help="Relax only this many lowest-energy distinct candidates (copies of one structure relax into one minimum)."),
    formula_units: str = typer.Option(
        "", "--formula-units", "-z",
        help="Formula units per cell to try, -n candidates each: e.g. 1,2,4, or auto (the multiples within the model's "
        "training cell sizes, up to 6). Default: the composition as written, or auto when its cell size lies outside the "
        "model's training range.",
    ),
    force: bool = typer.Option(False, "--force", help="Sample even a composition the model cannot cover (an element it never saw, no cell size in its range)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Integration time points (default: the model's, that of its learned velocity schedule if it carries one; 50 otherwise)."),
    no_schedule: bool = typer.Option(False, "--no-schedule", help="Sample the base candidates without the model's learned velocity schedule."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default predictions/FORMULA)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in --out."),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("cpu", "--device"),
    threads: Optional[int] = threads_option(default_text="1 (small batches: see README)"),
) -> None:
    """Predict likely low-energy crystal structures of a composition; writes CIFs and report.html.

    Examples:
      crystalign predict                          # SrTiO3 on the shipped perov_5 model
      crystalign predict BaZrO3 -n 64 --rl-steps 30 --out predictions/BaZrO3
      crystalign predict CaTiO3 --rl-steps 0 --no-relax
      crystalign predict BaTiO3 --budget 704 --rl-steps 100       # RL iterations as the 704 MLIP evaluations pay for
      crystalign predict C --model carbon_24 -z auto -n 16   # cells of 6 to 24 carbon atoms (sampled by carbon_24_energy)
      crystalign predict BaTiO3 --backend mace --mlip-model mace-mpa-0-medium.model   # a local MACE file
    """
    use_threads(threads, small_batches=True)
    # cheap checks first: they answer before torch and the potential are imported (predict checks the rest)
    if reward != "energy":
        _fail(f"--reward {reward!r}: predict ranks by MLIP energy; use `crystalign rl fit` with a config for other rewards")
    if budget is not None and n is not None and rl_steps == 0:
        _fail("give -n or --budget, not both: without --rl-steps the budget is the number of candidates")
    n = 32 if n is None else n
    check_counts(n, rl_steps, steps, relax_top, relax_steps, budget)
    check_model(model)
    check_device_name(device, "--device")
    if out is not None:
        check_output_parent(out)

    from crystalign.prediction import PredictWarning, default_out_dir, predict
    from crystalign.rewards.mlip import MLIPLoadError

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PredictWarning)
        try:
            result = predict(
                composition, n=n, model=model, backend=backend, mlip_model=mlip_model, mlip_modal=modal, rl_steps=rl_steps, rank_rollouts=rank_rollouts, rl_novelty=rl_novelty, tuned=tuned, mix_base=mix_base, budget=budget, relax=relax, relax_steps=relax_steps, relax_top=relax_top,
                steps=steps, schedule=not no_schedule, formula_units=formula_units, force=force, out=str(out) if out else "", resume=resume, seed=seed, device=device,
                progress=True,
            )
        except KeyboardInterrupt:
            where = out or default_out_dir(composition)
            typer.secho(f"interrupted: finished stages are saved in {where}; rerun with --resume to continue", fg=typer.colors.YELLOW, err=True)
            raise typer.Exit(130)
        except (ValueError, FileNotFoundError, FileExistsError, PermissionError, ImportError, MLIPLoadError) as err:
            _fail(str(err))
        finally:
            for w in caught:
                if issubclass(w.category, PredictWarning):
                    typer.secho(f"warning: {w.message}", fg=typer.colors.YELLOW, err=True)
    s = result.summary
    cells = ", ".join(s.get("cells") or [s["formula"]])
    ranked = [r for r in result.candidates if r.get("trusted", True)]
    untrusted = [r for r in result.candidates if not r.get("trusted", True)]
    if not ranked:
        reason = s.get("no_answer_reason") or "every structure failed the validity check or the potential's trust checks"
        typer.secho(
            f"\n{cells}: no trustworthy structure among {s['n_candidates']} candidates: {reason} (see warnings above and "
            f"{result.out_dir / 'report.html'}). Try more candidates (-n), other cell sizes (-z), or a model trained on "
            "similar compositions.",
            fg=typer.colors.RED, err=True,
        )
        raise typer.Exit(1)
    symprec = s.get("symprec")
    if s.get("requested_model") and s["model"] != s["requested_model"]:
        typer.echo(f"candidates from {s['model']}, the RL-tuned model of {s['requested_model']} (--no-tuned: {s['requested_model']} itself)")
    if s.get("mix_base"):
        typer.echo(f"{s['mix_base']['n_per_cell']} candidates per cell from {s['mix_base']['model']}, the base of {s['model']} (--mix-base)")
    typer.echo(
        f"\n{cells}: {s['n_unique']} unique trusted candidates of {s['n_candidates']} (best {s['best_energy_per_atom_ev']:.4f} eV/atom"
        + (f"; space groups at {symprec:g} Å)" if symprec else ")")
    )
    for row in ranked[:10]:
        found = f"  ({row['source']})" if str(row.get("source", "")).startswith("rl") else ""
        typer.echo(f"  {row['rank']:>3}  {row['formula']:<12} {row['spacegroup']:<16} {row['energy_per_atom_ev']:9.4f} eV/atom  +{row['energy_above_best_mev']:6.1f} meV  {row['file']}{found}")
        if row.get("symmetry_note"):
            typer.echo(f"       {row['symmetry_note']}")
    if untrusted:
        typer.secho(f"not ranked ({len(untrusted)} untrusted):", fg=typer.colors.YELLOW, err=True)
        for row in untrusted[:10]:
            typer.secho(f"       {row['formula']:<12} {row['energy_per_atom_ev']:9.4f} eV/atom  {row['untrusted_reason']}  {row['file']}", fg=typer.colors.YELLOW, err=True)
    typer.echo(f"report: {result.out_dir / 'report.html'}")


def check_counts(n: int, rl_steps: int, steps: int | None, relax_top: int, relax_steps: int | None, budget: int | None = None) -> None:
    """PredictOptions.validate's checks of the counts, in its words, made here before torch is imported."""
    for bad, msg in (
        (n <= 0, f"-n must be a positive number of candidates, got {n}"),
        (rl_steps < 0, f"--rl-steps must be >= 0, got {rl_steps}"),
        (steps is not None and steps < 2, f"--steps must be >= 2, got {steps}"),
        (budget is not None and budget < 1, f"--budget must be a positive number of MLIP energy evaluations, got {budget}"),
        (relax_top < 1, f"--relax-top must be >= 1, got {relax_top}"),
        (relax_steps is not None and relax_steps < 0, f"--relax-steps must be >= 0, got {relax_steps}"),
    ):
        if bad:
            _fail(msg)


def models_cmd(as_json: bool = typer.Option(False, "--json")) -> None:
    """List the shipped pretrained models and their model cards.

    Example: crystalign models --json
    """
    cards = {}
    for path in sorted(PRETRAINED.glob("*.pt")):  # generator.shipped_models() without importing torch
        name, card_path = path.stem, path.with_suffix(".json")
        cards[name] = json.loads(card_path.read_text()) if card_path.exists() else {"file": str(path)}
    if as_json:
        typer.echo(json.dumps(cards, indent=2))
        return
    if not cards:
        typer.echo("no shipped models")
    for name, card in cards.items():
        cov = card.get("coverage", {})
        metrics = card.get("validation", {})
        schedule = card.get("schedule")
        dng = (card.get("dng_validation") or {}).get("metrics")
        gap = card.get("energy_gap_validation")
        if gap:  # an RL-tuned model: its energy gap to the known structures against its base model's
            mine, base = gap.get("this_model") or {}, gap.get("base_sampler") or {}
            quality = (
                f"RL-tuned from {card.get('tuned_from', {}).get('model', '?')}: energy gap to the known structures "
                f"{_ev(mine.get('gap_mean_ev_per_atom'))} (base {_ev(base.get('gap_mean_ev_per_atom'))}), "
                f"held-out match rate {_pct(mine.get('match_rate'))} (base {_pct(base.get('match_rate'))})"
            )
        elif dng:  # a de novo model: validity and coverage of what it generates
            quality = (
                f"de novo: valid {_pct(dng.get('valid'))}, COV-R {_pct(dng.get('cov_recall'))}, "
                f"COV-P {_pct(dng.get('cov_precision'))}, novel {_pct(dng.get('novelty'))}"
            )
        elif schedule:  # its default sampler is the learned schedule: quote that sampler's held-out figures
            rows = [r for r in schedule.get("dev_results", []) if r.get("sampler") == "learned" and r.get("steps") == schedule.get("steps")]
            quality = (
                f"learned velocity schedule, {schedule.get('steps')} time points: held-out match rate "
                + ", ".join(f"{_pct(r['match_rate'])} (RMSE {r['rmse']:.3f})" for r in rows[:3])
                + (f" over {len(rows)} seeds" if len(rows) > 1 else "")
            )
        else:
            rates = sorted((int(k.split("_")[2]), v) for k, v in metrics.items() if re.fullmatch(r"match_rate_\d+_steps", k))
            quality = "held-out match rate " + (", ".join(f"{_pct(v)} ({n} steps)" for n, v in rates) or "?")
        if card.get("predict_replaces_base"):
            quality += f"; `predict --model {card.get('tuned_from', {}).get('model', '?')}` samples this model (--no-tuned: the base)"
        typer.echo(
            f"{name:<12} {card.get('description', '')}\n"
            f"{'':<12} atoms/cell {cov.get('n_atoms_min', '?')}–{cov.get('n_atoms_max', '?')}, {len(cov.get('elements', []))} elements; {quality}"
        )


def _ev(value) -> str:
    return f"{value:.3f} eV/atom" if isinstance(value, (int, float)) else "?"


def _pct(value) -> str:
    return f"{100 * value:.1f} %" if isinstance(value, (int, float)) else "?"


def register(app: typer.Typer) -> None:
    app.command("predict")(predict_cmd)
    app.command("models")(models_cmd)
