"""Training the base model: a Lightning module over stochastic-interpolant losses, plus the run driver.

One network call per loss evaluation returns every field's b and η (the reference calls the network
once per field). With an antithetic γ a second call at x_t⁻ is needed (method.md §2.4).

Example::

    cfg = load_config("configs/perov_5_cpu.yaml", TrainConfig)
    result = train(cfg, out_dir="runs/perov_5")
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.utils.data import DataLoader, Dataset, RandomSampler

from crystalign.config import ConfigError, config_changes, is_finite_number, require, to_dict
from crystalign.data.splits import DataConfig, load_training_data
from crystalign.io import save_torch
from crystalign.provenance import versions
from crystalign.crystal import CrystalBatch
from crystalign.distributions import BaseDistribution, LATTICE_PRESETS
from crystalign.generator import Generator, GeneratorConfig
from crystalign.model.cspnet import build_edges
from crystalign.interpolants import sample_times
from crystalign.interpolants.coupling import min_perm_coupling

log = logging.getLogger(__name__)


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 256
    max_epochs: int = 1000
    max_minutes: float | None = None
    grad_clip: float = 0.5
    ema_decay: float | None = None
    cosine_schedule: bool = False
    min_lr: float = 1e-6

    def __post_init__(self) -> None:
        require(is_finite_number(self.lr) and self.lr > 0, "lr", "a positive number", self.lr)
        require(is_finite_number(self.weight_decay) and self.weight_decay >= 0, "weight_decay", ">= 0", self.weight_decay)
        require(self.batch_size >= 1, "batch_size", ">= 1", self.batch_size)
        require(self.max_epochs >= 1, "max_epochs", ">= 1", self.max_epochs)
        require(self.max_minutes is None or self.max_minutes > 0, "max_minutes", "> 0 or null", self.max_minutes)
        require(is_finite_number(self.grad_clip) and self.grad_clip >= 0, "grad_clip", ">= 0 (0 = no clipping)", self.grad_clip)
        require(self.ema_decay is None or 0 < self.ema_decay < 1, "ema_decay", "in (0, 1) or null", self.ema_decay)
        require(is_finite_number(self.min_lr) and self.min_lr >= 0, "min_lr", ">= 0", self.min_lr)


@dataclass
class ValidationConfig:
    every_n_epochs: int = 1
    match_every_n_epochs: int = 0  # 0 = never during training
    match_subset: int = 64
    match_steps: int = 50

    def __post_init__(self) -> None:
        require(self.every_n_epochs >= 1, "every_n_epochs", ">= 1", self.every_n_epochs)
        require(self.match_every_n_epochs >= 0, "match_every_n_epochs", ">= 0 (0 = never)", self.match_every_n_epochs)
        require(self.match_subset >= 1, "match_subset", ">= 1", self.match_subset)
        require(self.match_steps >= 2, "match_steps", ">= 2", self.match_steps)


@dataclass
class TrainerConfig:
    accelerator: str = "auto"
    devices: int | str = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    logger: Literal["csv", "tensorboard", "wandb", "none"] = "csv"
    num_threads: int | None = None
    progress_bar: bool = True
    check_rank_consistency: bool = False


@dataclass
class TrainConfig:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    min_perm_coupling: bool = False
    optim: OptimConfig = field(default_factory=OptimConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


# ---------------------------------------------------------------------- data
class StructureIndexDataset(Dataset):
    """Indices into one in-memory CrystalBatch; the collate function slices it (no per-item tensors)."""

    def __init__(self, batch: CrystalBatch):
        self.batch = batch

    def __len__(self) -> int:
        return self.batch.num_structures

    def __getitem__(self, i: int) -> int:
        return i

    def collate(self, indices: list[int]) -> CrystalBatch:
        return self.batch[torch.tensor(indices)]


# ---------------------------------------------------------------------- losses
def interpolant_losses(gen: Generator, x1: CrystalBatch, generator: torch.Generator | None = None, min_perm: bool = False) -> dict[str, torch.Tensor]:
    """Per-key losses (``pos_b``, ``pos_eta``, ``cell_b``, ``cell_eta``; ``species`` for DNG) for one batch of data."""
    ips = gen.interpolants
    x0 = gen.base.sample(x1.species, x1.n_atoms, generator=generator, dtype=x1.dtype, device=x1.device)
    if min_perm:
        x0 = x0.replace(frac=min_perm_coupling(x0.frac, x1.frac, x1.n_atoms))
    t = sample_times(x1.num_structures, generator=generator, device=x1.device, dtype=x1.dtype)
    samples = ips.interpolate(t, x0, x1, generator=generator)
    # DNG: the network sees the partly masked species at time t and predicts the data species from them
    species_t = x1.species if ips.species is None else ips.species.interpolate(t[x1.batch], x1.species, generator)
    edges = build_edges(x1.n_atoms)
    out = gen.net(t, species_t, samples["pos"].x_t, samples["cell"].x_t, x1.n_atoms, edges=edges)
    b_minus = None
    if ips.needs_minus_pass:
        minus = ips.minus_states(samples)
        out_m = gen.net(t, species_t, minus["pos"], minus["cell"], x1.n_atoms, edges=edges)
        b_minus = {f: out_m[f"{f}_b"] for f in ips.fields}
    return ips.losses(
        samples,
        b_plus={f: out[f"{f}_b"] for f in ips.fields},
        eta={f: out[f"{f}_eta"] for f in ips.fields},
        b_minus=b_minus,
        species=None if ips.species is None else (out["species_b"], x1.species),
    )


# ---------------------------------------------------------------------- Lightning module
class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written like every crystalign output: a temporary file beside the target, fsynced, then
    renamed over it. Lightning's own save writes into the temp folder and moves the file, which is a plain copy when
    that folder is on another filesystem (tmpfs /tmp): a kill mid-copy left a truncated last.ckpt."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("storage_options are not supported for crystalign checkpoints")
        save_torch(path, checkpoint)


class EpochShuffleSampler(RandomSampler):
    """A fresh permutation per epoch that depends on (seed, epoch) only.

    A shared shuffle stream would make ``--resume`` drift: resuming from a checkpoint written at a validation end,
    Lightning re-enters the finished epoch and calls ``iter()`` on the loader once more, drawing one permutation
    too many. Lightning sets the epoch (``set_epoch``); under DDP it swaps in a DistributedSampler, which is
    seeded per epoch the same way.
    """

    def __init__(self, data_source: Any, seed: int) -> None:
        super().__init__(data_source)
        self.seed, self.epoch = int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(len(self.data_source), generator=g).tolist())


class GeneratorModule(L.LightningModule):
    def __init__(self, config: TrainConfig, generator: Generator, holdout: CrystalBatch | None = None):
        super().__init__()
        self.config = config
        self.generator = generator
        self.holdout = holdout
        self.ema: Generator | None = None
        if config.optim.ema_decay:
            self.ema = copy.deepcopy(generator)
            self.ema.requires_grad_(False)
        self._last_finite_epoch = -1

    # Lightning hooks ---------------------------------------------------
    def on_train_start(self) -> None:
        if self.trainer.world_size > 1:
            # one seed on every rank would give every rank the same times, x0 and noise: the global batch would hold
            # only batch_size distinct draws. Reseeded after DDP has broadcast rank 0's weights (and EMA copy).
            torch.manual_seed(int(self.config.seed) + 1000 * self.global_rank + 7919 * self.global_step)

    def training_step(self, batch: CrystalBatch, batch_idx: int):
        losses = interpolant_losses(self.generator, batch, min_perm=self.config.min_perm_coupling)
        loss = self.generator.interpolants.total_loss(losses)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite training loss at epoch {self.current_epoch}, step {self.global_step} "
                f"({ {k: float(v.detach()) for k, v in losses.items()} }); the last good checkpoint is kept"
            )
        bs = batch.num_structures
        self.log("train/loss", loss, prog_bar=True, batch_size=bs, on_step=False, on_epoch=True, sync_dist=True)
        for k, v in losses.items():
            self.log(f"train/{k}", v, batch_size=bs, on_step=False, on_epoch=True, sync_dist=True)
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        # a finite loss can still give non-finite gradients; one such step would turn every weight into NaN.
        # Under fp16 loss scaling, inf gradients are the scaler's overflow signal: it skips the step and lowers
        # the scale itself, so they are not an error there.
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            return
        grads = [p.grad for p in self.generator.net.parameters() if p.grad is not None]
        if grads and not torch.isfinite(torch.stack([torch.linalg.vector_norm(g) for g in grads])).all():
            raise FloatingPointError(
                f"non-finite gradients at epoch {self.current_epoch}, step {self.global_step}; the step is not taken "
                "and the last good checkpoint is kept (lower optim.lr or set optim.grad_clip)"
            )

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.ema is not None:
            # warm-up (the usual min(d, (1+n)/(10+n))): a short run's average is not dominated by the random init
            n = self.global_step
            d = min(self.config.optim.ema_decay, (1.0 + n) / (10.0 + n))
            with torch.no_grad():
                for pe, p in zip(self.ema.net.parameters(), self.generator.net.parameters()):
                    pe.mul_(d).add_(p.detach(), alpha=1 - d)

    def validation_step(self, batch: CrystalBatch, batch_idx: int):
        gen = self.ema or self.generator
        g = torch.Generator(device=batch.device).manual_seed(1234 + batch_idx)
        # the training objective, coupling included, so the two losses are comparable
        losses = interpolant_losses(gen, batch, generator=g, min_perm=self.config.min_perm_coupling)
        loss = gen.interpolants.total_loss(losses)
        self.log("val/loss", loss, prog_bar=True, batch_size=batch.num_structures, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        vcfg = self.config.validation
        # a DNG model has no composition to match a reference with
        if not vcfg.match_every_n_epochs or self.holdout is None or self.trainer.sanity_checking or self.generator.is_dng:
            return
        if (self.current_epoch + 1) % vcfg.match_every_n_epochs:
            return
        from crystalign.metrics import csp_metrics

        ref = self.holdout[: vcfg.match_subset].to(self.device, dtype=self.dtype)
        gen = self.ema or self.generator
        samples = gen.sample(ref, seed=0, steps=vcfg.match_steps)
        metrics = csp_metrics(samples, ref, n_workers=0, progress=False, timeout=30.0)
        self.log("val/match_rate", float(metrics.match_rate), prog_bar=True, sync_dist=True)
        if metrics.rmse is not None:
            self.log("val/rmse", float(metrics.rmse), sync_dist=True)

    def configure_optimizers(self):
        o = self.config.optim
        opt = torch.optim.AdamW([p for p in self.generator.net.parameters() if p.requires_grad], lr=o.lr, weight_decay=o.weight_decay)
        if not o.cosine_schedule:
            return opt
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=o.max_epochs, eta_min=o.min_lr)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        for name, model in (("weights", self.generator), ("EMA weights", self.ema)):
            if model is not None and not all(torch.isfinite(p).all() for p in model.net.parameters()):
                raise FloatingPointError(
                    f"the {name} became non-finite during epoch {self.current_epoch}; the last good checkpoint is kept"
                )
        # the exportable model travels inside every checkpoint: config, base distribution, data hash, versions
        gen = self.ema or self.generator
        checkpoint["generator"] = gen.checkpoint_dict(extra={"provenance": self.provenance()})
        # random streams: a resumed run draws what the uninterrupted run would have drawn next
        checkpoint["crystalign_rng"] = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        rng = checkpoint.get("crystalign_rng")
        if not rng:  # a checkpoint from before the random states were kept: resumes, but not draw for draw
            return
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(rng["cuda"])

    def provenance(self) -> dict[str, Any]:
        return getattr(self, "_provenance", {})

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch.to(device)


# ---------------------------------------------------------------------- driver
def coverage_of(batch: CrystalBatch) -> dict[str, Any]:
    from pymatgen.core import Element

    zs = sorted(set(batch.species.tolist()))
    counts = torch.bincount(batch.n_atoms.cpu())
    return {
        "elements": [Element.from_Z(z).symbol for z in zs],
        "n_atoms_min": int(batch.n_atoms.min()),
        "n_atoms_max": int(batch.n_atoms.max()),
        "n_structures": batch.num_structures,
        # DNG models draw the atom count of a new crystal from this distribution
        "n_atoms_counts": {str(n): int(c) for n, c in enumerate(counts.tolist()) if c},
    }


def build_generator(cfg: TrainConfig, train: CrystalBatch) -> Generator:
    bcfg = cfg.generator.base
    if bcfg.mu is not None and bcfg.s is not None:
        base = BaseDistribution(bcfg.mu, bcfg.s)
    elif bcfg.lattice == "fit":
        base = BaseDistribution.fit(train.lattice)
    else:
        try:
            base = BaseDistribution.from_preset(bcfg.lattice)
        except (KeyError, ValueError):
            raise ValueError(f"generator.base.lattice: unknown preset {bcfg.lattice!r} (use 'fit' or one of {sorted(LATTICE_PRESETS)})") from None
    mu, s = base.mu, base.s
    gen_cfg = copy.deepcopy(cfg.generator)
    gen_cfg.base.mu, gen_cfg.base.s = [float(v) for v in mu], [float(v) for v in s]
    gen_cfg.max_atoms = max(gen_cfg.max_atoms, int(train.n_atoms.max()))
    return Generator(gen_cfg, base, coverage=coverage_of(train))


class RankConsistencyCheck(L.Callback):
    """At the end of training, gathers every rank's parameters and records the largest difference.

    Under DDP the ranks must hold identical weights; a non-zero difference means a desynchronised run.
    """

    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir) / "rank_consistency.json"

    def on_train_end(self, trainer, pl_module) -> None:
        from crystalign.io import write_json

        flat = torch.cat([p.detach().flatten() for p in pl_module.generator.net.parameters()])
        gathered = trainer.strategy.all_gather(flat)
        if gathered.dim() == 1:
            gathered = gathered.unsqueeze(0)
        diff = float((gathered - gathered[0]).abs().max())
        if trainer.is_global_zero:
            write_json(self.path, {"world_size": trainer.world_size, "max_abs_diff": diff, "global_step": trainer.global_step})


class _Timer(L.Callback):
    """Stops training after ``max_minutes`` of wall time, at an epoch boundary (checkpoint saved)."""

    def __init__(self, max_minutes: float | None):
        self.max_s = None if max_minutes is None else 60.0 * max_minutes
        self.start = time.time()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.max_s is None:
            return
        # rank 0's clock decides for all: ranks that stopped at different epochs would deadlock in the all-reduce
        stop = trainer.strategy.broadcast(time.time() - self.start > self.max_s, src=0)
        trainer.should_stop = trainer.should_stop or bool(stop)


class RunFolderError(ValueError):
    """The run folder holds another run, or its checkpoint cannot be resumed; the message names the file."""


#: Files that mark a folder as holding a training run (a fresh run there would mix with them).
RUN_FILES = ("*.ckpt", "model.pt", "train_summary.json")

#: Config keys that may differ from the checkpoint's on resume: they extend the run or change how it is executed
#: and watched, not what is trained. Any other change would be ignored (the optimizer, scheduler and loop state come
#: from the checkpoint, e.g. its lr) or would make the recorded config wrong; devices/num_nodes set the number of DDP
#: processes, hence the effective batch size, so they stay fixed too.
RESUME_MAY_CHANGE = (
    "optim.max_epochs",
    "optim.max_minutes",
    "validation.",
    "trainer.accelerator",
    "trainer.strategy",
    "trainer.logger",
    "trainer.num_threads",
    "trainer.progress_bar",
    "trainer.check_rank_consistency",
)

_CLI_FLAGS = {"accelerator": "--accelerator", "devices": "--devices", "num_nodes": "--num-nodes"}


def check_resume_config(saved: dict[str, Any], cfg: TrainConfig, ckpt_path: Path) -> dict[str, tuple[Any, Any]]:
    """The allowed changes from the checkpoint's config; raises :class:`ConfigError` listing any other."""
    changes = config_changes(TrainConfig, saved, cfg)
    refused = [k for k in changes if not any(k == a or (a.endswith(".") and k.startswith(a)) for a in RESUME_MAY_CHANGE)]
    why = ""
    if "optim.max_epochs" in changes and cfg.optim.cosine_schedule:
        refused.append("optim.max_epochs")
        why = " (optim.max_epochs is the cosine schedule's length, restored from the checkpoint)"
    if refused:
        listed = "; ".join(f"{k}: {changes[k][0]!r} -> {changes[k][1]!r}" for k in sorted(refused))
        may = [a for a in RESUME_MAY_CHANGE if not (a == "optim.max_epochs" and cfg.optim.cosine_schedule)]
        allowed = ", ".join(a + "*" if a.endswith(".") else a for a in may)
        raise ConfigError(
            f"--resume: the config differs from the one {ckpt_path} was trained with: {listed}{why}. "
            f"Restore these values, or start a new run in another folder. May change on resume: {allowed}"
        )
    return changes


def read_resume_checkpoint(last: Path) -> dict[str, Any]:
    """``last.ckpt`` for --resume, or :class:`RunFolderError` saying what to do with an unreadable one."""
    from crystalign.model.checkpoint import CheckpointError, read_checkpoint_file

    if not last.exists():
        raise FileNotFoundError(f"--resume: no {last} to resume from")
    stray = sorted(p.name for p in last.parent.glob("last-v*.ckpt"))
    if stray:  # left by an earlier crystalign that trained a new run into this folder: last.ckpt may be the old run
        raise RunFolderError(
            f"--resume: {last.parent} holds {', '.join(stray)} besides last.ckpt, so it is unclear which run to continue; "
            f"rename the checkpoint to continue to last.ckpt and move the others (and their best-v*.ckpt) aside"
        )
    try:
        ckpt = read_checkpoint_file(last)
        if not isinstance(ckpt, dict) or "pytorch-lightning_version" not in ckpt or "generator" not in ckpt:
            raise CheckpointError(f"{last} is not a crystalign training checkpoint")
    except CheckpointError as err:
        best = last.with_name("best.ckpt")
        hint = f"copy {best} over it to resume from the best epoch instead, or " if best.is_file() else ""
        raise RunFolderError(
            f"--resume: cannot resume from {last}: {str(err).rstrip('.')}. Remove it and {hint}start a new run with another --out"
        ) from None
    return ckpt


def _hardware_here() -> str:
    found = [f"cpu ({os.cpu_count()} cores)"]
    if torch.cuda.is_available():
        found.append(f"cuda/gpu ({torch.cuda.device_count()} devices)")
    if torch.backends.mps.is_available():
        found.append("mps")
    return ", ".join(found)


def check_trainer_options(tc: TrainerConfig) -> None:
    """Fail before any work when Lightning rejects a hardware option; the error names it and what this machine has."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    import importlib.util

    needs = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}.get(tc.logger, ())
    if needs and not any(importlib.util.find_spec(m) for m in needs):
        raise ConfigError(f"trainer.logger = {tc.logger!r} needs the {needs[0]!r} package: pip install {needs[0]} (or use logger: csv)")
    rejected = (MisconfigurationException, ValueError, TypeError, ImportError)
    # Lightning validates these when a Trainer is built: add them one at a time to learn which one it rejects
    opts: dict[str, Any] = {}
    quiet = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # the probes' "GPU available" lines would repeat the real trainer's
    try:
        for key in ("accelerator", "devices", "num_nodes", "strategy", "precision"):
            opts[key] = getattr(tc, key)
            try:
                L.Trainer(**opts, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
            except rejected as err:
                flag = f" ({_CLI_FLAGS[key]})" if key in _CLI_FLAGS else ""
                context = f" with accelerator {tc.accelerator!r}" if key != "accelerator" else ""
                msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise ConfigError(
                    f"trainer.{key}{flag} = {opts[key]!r} cannot be used{context}: {msg} (this machine has: {_hardware_here()})"
                ) from None
    finally:
        quiet.setLevel(level)


def train(cfg: TrainConfig, out_dir: str | Path, resume: bool = False, data_root: str | None = None, config_path: str | None = None) -> dict[str, Any]:
    """Train a base model; writes checkpoints (``last.ckpt``, ``best.ckpt``) and ``model.pt`` to ``out_dir``.

    A fresh run needs a folder without a run in it; ``resume=True`` continues ``out_dir/last.ckpt`` with the same
    config (except :data:`RESUME_MAY_CHANGE`). Every session logs to its own ``logs/version_N``.
    """
    from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
    from lightning.pytorch.utilities import rank_zero_only

    from crystalign.io import check_output_dir, recover_first_checkpoint, remove_stale_parts, write_json

    check_trainer_options(cfg.trainer)
    if str(cfg.trainer.precision) in ("16-true", "bf16-true"):  # (Lightning's "16"/"bf16" mean the -mixed ones)
        # Lightning casts each batch to the half type before the network sees it: fractional coordinates rounded to
        # bf16 are off by up to 2e-3, a 1.6 rad phase error at the top Fourier frequency, and an EMA would never move
        raise ConfigError(
            f"trainer.precision = {cfg.trainer.precision!r}: training data and weights would be rounded to half "
            "precision; use '16-mixed' or 'bf16-mixed' (half-precision compute, float32 data and weights)"
        )
    out = Path(out_dir)
    if rank_zero_only.rank == 0:  # DDP ranks that rerun the command would race on the probe file
        check_output_dir(out)
        remove_stale_parts(out)  # temporary files of a checkpoint write that a kill interrupted
    last = out / "last.ckpt"
    resume_from = last
    changes: dict[str, tuple[Any, Any]] = {}
    saved_prov: dict[str, Any] = {}
    if resume:
        if not last.exists() and (out / "best.ckpt").is_file():
            # stopped while writing its first checkpoints: best.ckpt (written first) holds that same point. Every
            # rank reads it (none waits for another's copy); rank 0 also makes it last.ckpt for later resumes
            log.warning("%s: the run was stopped while writing its first checkpoint; resuming from best.ckpt", out)
            resume_from = out / "best.ckpt"
            if rank_zero_only.rank == 0:
                recover_first_checkpoint(last, resume_from)
        saved = read_resume_checkpoint(resume_from)
        saved_prov = saved["generator"].get("provenance") or {}
        done_epochs = int(saved.get("epoch") or 0)
        if done_epochs > cfg.optim.max_epochs:  # Lightning would refuse mid-start, after the logger made a folder
            raise RunFolderError(
                f"--resume: {resume_from} is already at epoch {done_epochs}, past optim.max_epochs = "
                f"{cfg.optim.max_epochs}; pass --max-epochs above {done_epochs} to train further"
            )
        if "config" in saved_prov:
            changes = check_resume_config(saved_prov["config"], cfg, resume_from)
        else:
            log.warning("%s records no config (an older crystalign?): config changes on resume are not checked", last)
    else:
        existing = sorted({p.name for pattern in RUN_FILES for p in out.glob(pattern)})
        if existing:
            # Lightning would write last-v1.ckpt beside the old last.ckpt, and a later --resume would load the old run
            raise RunFolderError(
                f"{out} already holds a training run ({', '.join(existing)}); pass --resume to continue it, "
                "or choose another --out for a new run"
            )
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    train_set, holdout, data_sha = load_training_data(cfg.data, data_root)
    if saved_prov.get("data_sha256") and data_sha and saved_prov["data_sha256"] != data_sha:
        raise RunFolderError(
            f"--resume: the data file of {cfg.data.dataset!r} changed since {last} was written "
            f"(sha256 {saved_prov['data_sha256'][:12]}... then, {data_sha[:12]}... now); resume with the same data"
        )
    gen = build_generator(cfg, train_set)
    module = GeneratorModule(cfg, gen, holdout)
    module._provenance = {
        "config": to_dict(cfg),
        "config_path": config_path,
        "data_sha256": data_sha,
        "seed": cfg.seed,
        "versions": versions(),
        "n_train": train_set.num_structures,
        "n_holdout": holdout.num_structures,
    }
    tr_ds = StructureIndexDataset(train_set.to(dtype=torch.float32))
    ho_ds = StructureIndexDataset(holdout.to(dtype=torch.float32))
    bs = cfg.optim.batch_size
    # the loader's own generator: each iter() draws a worker base seed from it, which would otherwise come from the
    # global stream that the training steps draw from (and an extra iter() on resume would shift them)
    train_loader = DataLoader(
        tr_ds, batch_size=bs, sampler=EpochShuffleSampler(tr_ds, cfg.seed), collate_fn=tr_ds.collate,
        drop_last=len(tr_ds) > bs, generator=torch.Generator().manual_seed(cfg.seed),
    )
    val_loader = (
        DataLoader(ho_ds, batch_size=bs, shuffle=False, collate_fn=ho_ds.collate, generator=torch.Generator().manual_seed(cfg.seed))
        if len(ho_ds) else None
    )

    logger: Any = False
    tc = cfg.trainer
    if tc.logger == "csv":
        from lightning.pytorch.loggers import CSVLogger

        logger = CSVLogger(out, name="logs")  # a new version_N per session: a resumed run keeps the earlier metrics
    elif tc.logger == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        logger = TensorBoardLogger(out, name="tb")
    elif tc.logger == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        logger = WandbLogger(save_dir=out)
    monitor = "val/loss" if val_loader is not None else "train/loss"
    # no -v1 files: last.ckpt must always be the newest state, since --resume reads it
    ckpt_cb = ModelCheckpoint(dirpath=out, filename="best", monitor=monitor, mode="min", save_last=True, save_top_k=1, enable_version_counter=False)
    callbacks: list[Any] = [ckpt_cb, _Timer(cfg.optim.max_minutes)]
    if tc.check_rank_consistency:
        callbacks.append(RankConsistencyCheck(out))
    if tc.progress_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=max(1, len(train_loader) // 4)))
    trainer = L.Trainer(
        accelerator=tc.accelerator,
        devices=tc.devices,
        num_nodes=tc.num_nodes,
        strategy=tc.strategy,
        precision=tc.precision,
        max_epochs=cfg.optim.max_epochs,
        gradient_clip_val=cfg.optim.grad_clip or None,
        logger=logger,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        enable_progress_bar=tc.progress_bar,
        check_val_every_n_epoch=cfg.validation.every_n_epochs,
        num_sanity_val_steps=0,
        enable_model_summary=False,
        deterministic=False,
    )
    t0 = time.time()
    try:
        trainer.fit(module, train_loader, val_loader, ckpt_path=str(resume_from) if resume else None, weights_only=True)
    except SystemExit:
        if trainer.interrupted:  # Lightning turns Ctrl-C into exit(1) after its shutdown: give callers the interrupt
            raise KeyboardInterrupt from None
        raise
    # ModelCheckpoint saves at validation ends: epochs after the last validation would be lost to --resume
    trainer.save_checkpoint(str(last))
    wall = time.time() - t0
    result = {"wall_s": wall, "epochs": trainer.current_epoch, "global_step": trainer.global_step, "best": ckpt_cb.best_model_path}
    result["log_dir"] = getattr(logger, "log_dir", None) if tc.logger in ("csv", "tensorboard") else None
    if resume:
        result["resumed_from"] = {"checkpoint": str(resume_from), "config_changes": {k: list(v) for k, v in changes.items()}}
    else:
        result["resumed_from"] = None
    if trainer.is_global_zero:
        best_path = ckpt_cb.best_model_path or str(out / "last.ckpt")
        ckpt = torch.load(best_path, map_location="cpu", weights_only=True)
        save_torch(out / "model.pt", ckpt["generator"])
        write_json(out / "train_summary.json", {**result, **module.provenance(), "monitor": monitor, "best_score": float(ckpt_cb.best_model_score) if ckpt_cb.best_model_score is not None else None})
    return result


def describe(cfg: TrainConfig) -> str:
    return json.dumps(to_dict(cfg), indent=2)
