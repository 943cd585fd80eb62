"""RL checkpoints and run folders: reading and checking a checkpoint, rebuilding its policy, and the checks
before a run starts or resumes. :class:`~crystalign.rl.trainer.RLTrainer` writes them.

Example::

    policy, state = load_policy("runs/rl/best.pt")
    state["iteration"], state["history"][-1]
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import torch.distributed as dist

from crystalign.config import config_changes
from crystalign.generator import Generator
from crystalign.rl.config import RLConfig
from crystalign.rl.distributed import rank_and_world
from crystalign.rl.rollout import Policy
from crystalign.rl.scale import ScaleMLP

log = logging.getLogger(__name__)

#: what RLTrainer.state() writes and read_rl_checkpoint() expects
FORMAT = "crystalign-rl"
FORMAT_VERSION = 1

RUN_FILES = ("last.pt", "history.json", "best.pt")

# Config keys a resumed run may change: they decide how long it runs, where, on how many threads, how often it is
# validated and when the guards stop it, but not what an iteration computes (max_atoms_per_backward only regroups
# an exact sum; duplicate_check only adds a logged statistic). Everything else would silently mix two runs.
RESUMABLE_KEYS = ("iterations", "device", "num_threads", "max_atoms_per_backward", "validation.every", "max_invalid_fraction", "duplicate_check")


def check_run_dir(out_dir: str | Path, resume: bool) -> Path:
    """Before any work: ``out_dir`` is writable, holds a run to resume (``resume``) or holds no run (so a new
    run cannot overwrite one)."""
    from crystalign.io import check_output_dir, recover_first_checkpoint, remove_stale_parts

    out = Path(out_dir)
    rank, world = rank_and_world()
    if rank == 0:  # one rank probes: ranks sharing the folder would race on the probe file
        check_output_dir(out)
        remove_stale_parts(out)  # temporary files of a checkpoint write that a kill interrupted
        if resume and recover_first_checkpoint(out / "last.pt", out / "best.pt"):
            log.warning("%s: the run was stopped while writing its first checkpoint; resuming from best.pt", out)
    if resume and world > 1:
        dist.barrier()  # every rank sees the recovered last.pt
    if resume and not (out / "last.pt").exists():
        raise FileNotFoundError(f"--resume: no {out / 'last.pt'} to resume from")
    if not resume and any((out / f).exists() for f in RUN_FILES):
        raise FileExistsError(f"{out} already holds an RL run; pass --resume (resume=True from Python) to continue it, or choose another --out")
    return out


def check_resume(state: dict[str, Any], config: RLConfig, reference_hash: str, where: str = "RL checkpoint") -> None:
    """ValueError when ``config`` or the base model differs from the run saved in ``state`` (except
    :data:`RESUMABLE_KEYS`): resuming must continue the same run, not a mix of two."""
    diff = config_changes(RLConfig, state.get("config") or {}, config)
    changed = sorted(k for k in diff if k not in RESUMABLE_KEYS)
    if changed:
        detail = "; ".join(f"{k}: {diff[k][0]!r} -> {diff[k][1]!r}" for k in changed)
        raise ValueError(
            f"--resume: the config differs from the run in {where} in {', '.join(changed)} ({detail}). Only "
            f"{', '.join(RESUMABLE_KEYS)} may change when resuming; use the run's config or choose another --out"
        )
    saved_hash = state.get("reference_hash")
    if saved_hash is None and isinstance(state.get("reference"), dict):
        try:  # checkpoints written before the hash was recorded: hash the base model they carry
            saved_hash = Generator.from_checkpoint_dict(state["reference"], where=f"{where}:reference").model_hash()
        except ValueError:
            saved_hash = None
    if saved_hash is None:
        warnings.warn(f"{where} records no base model: cannot check that --base-checkpoint is the one the run started from", stacklevel=2)
    elif saved_hash != reference_hash:
        raise ValueError(
            f"--resume: the base model (hash {reference_hash}) is not the one the run in {where} started from "
            f"(hash {saved_hash}); pass the original --base-checkpoint or choose another --out"
        )


def load_policy(path: str | Path, map_location: str = "cpu") -> tuple[Policy, dict[str, Any]]:
    """Rebuild the reinforced policy (and its frozen reference) from an RL checkpoint."""
    from crystalign.config import from_dict

    state = read_rl_checkpoint(path, map_location)
    try:
        config = from_dict(RLConfig, state["config"], where=f"{path}:config")
    except ValueError as err:  # RLConfig's own checks do not know the file
        raise ValueError(str(err) if str(err).startswith(str(path)) else f"{path}:config: {err}") from None
    reference = Generator.from_checkpoint_dict(state["reference"], where=f"{path}:reference")
    # the frozen s(t) of scaled_velocity is part of the saved policy: the run it came from may be gone
    policy = Policy(reference, config, scale_model=ScaleMLP() if config.variant == "scaled_velocity" else None)
    try:
        missing, unexpected = policy.load_state_dict(state["policy"], strict=False)
    except RuntimeError as err:  # wrong shapes: a damaged file, or one from another network size
        raise ValueError(f"{path}: RL checkpoint does not fit its policy: {str(err).splitlines()[-1].strip()}") from None
    missing = [k for k in missing if not k.startswith("reference.")]  # the reference comes from state["reference"]
    if unexpected or missing:
        raise ValueError(f"{path}: RL checkpoint does not fit its policy (unexpected {unexpected[:5]}, missing {missing[:5]})")
    policy.eval()
    return policy, state


def read_rl_checkpoint(path: str | Path, map_location: str = "cpu") -> dict[str, Any]:
    """The contents of an RL checkpoint written by :class:`~crystalign.rl.trainer.RLTrainer`, checked to be one."""
    from crystalign.model.checkpoint import read_checkpoint_file

    state = read_checkpoint_file(path, map_location, what="crystalign RL checkpoint")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path}: not a crystalign RL checkpoint (format: {found!r})")
    missing = [k for k in ("config", "reference", "policy") if not isinstance(state.get(k), dict)]
    if missing:
        raise ValueError(f"{path}: damaged RL checkpoint: no {', '.join(missing)} entry")
    return state


def load_scale_model(path: str | None) -> ScaleMLP | None:
    """A frozen pre-learned s(t) (for ``scaled_velocity``) from a velocity-annealing RL checkpoint."""
    if not path:
        return None
    state = read_rl_checkpoint(path)
    model = ScaleMLP()
    weights = {k.removeprefix("scale."): v for k, v in state["policy"].items() if k.startswith("scale.")}
    if not weights:
        raise ValueError(f"{path}: no learned s(t) in this checkpoint (train one with variant: scale)")
    model.load_state_dict(weights)
    return model
