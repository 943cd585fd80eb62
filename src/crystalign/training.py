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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from crystalign.config import to_dict
from crystalign.data.splits import DataConfig, load_training_data
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


@dataclass
class ValidationConfig:
    every_n_epochs: int = 1
    match_every_n_epochs: int = 0  # 0 = never during training
    match_subset: int = 64
    match_steps: int = 50


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
    """Per-key losses (``pos_b``, ``pos_eta``, ``cell_b``, ``cell_eta``) for one batch of data."""
    ips = gen.interpolants
    x0 = gen.base.sample(x1.species, x1.n_atoms, generator=generator, dtype=x1.dtype, device=x1.device)
    if min_perm:
        x0 = x0.replace(frac=min_perm_coupling(x0.frac, x1.frac, x1.n_atoms))
    t = sample_times(x1.num_structures, generator=generator, device=x1.device, dtype=x1.dtype)
    samples = ips.interpolate(t, x0, x1, generator=generator)
    edges = build_edges(x1.n_atoms)
    out = gen.net(t, x1.species, samples["pos"].x_t, samples["cell"].x_t, x1.n_atoms, edges=edges)
    b_minus = None
    if ips.needs_minus_pass:
        minus = ips.minus_states(samples)
        out_m = gen.net(t, x1.species, minus["pos"], minus["cell"], x1.n_atoms, edges=edges)
        b_minus = {f: out_m[f"{f}_b"] for f in ips.fields}
    return ips.losses(
        samples,
        b_plus={f: out[f"{f}_b"] for f in ips.fields},
        eta={f: out[f"{f}_eta"] for f in ips.fields},
        b_minus=b_minus,
    )


# ---------------------------------------------------------------------- Lightning module
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
    def training_step(self, batch: CrystalBatch, batch_idx: int):
        losses = interpolant_losses(self.generator, batch, min_perm=self.config.min_perm_coupling)
        loss = self.generator.interpolants.total_loss(losses)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite training loss at epoch {self.current_epoch}, step {self.global_step} "
                f"({ {k: float(v) for k, v in losses.items()} }); the last good checkpoint is kept"
            )
        bs = batch.num_structures
        self.log("train/loss", loss, prog_bar=True, batch_size=bs, on_step=False, on_epoch=True, sync_dist=True)
        for k, v in losses.items():
            self.log(f"train/{k}", v, batch_size=bs, on_step=False, on_epoch=True, sync_dist=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.ema is not None:
            d = self.config.optim.ema_decay
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
        if not vcfg.match_every_n_epochs or self.holdout is None or self.trainer.sanity_checking:
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
        # the exportable model travels inside every checkpoint: config, base distribution, data hash, versions
        gen = self.ema or self.generator
        checkpoint["generator"] = gen.checkpoint_dict(extra={"provenance": self.provenance()})

    def provenance(self) -> dict[str, Any]:
        return getattr(self, "_provenance", {})

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch.to(device)


# ---------------------------------------------------------------------- driver
def coverage_of(batch: CrystalBatch) -> dict[str, Any]:
    from pymatgen.core import Element

    zs = sorted(set(batch.species.tolist()))
    return {
        "elements": [Element.from_Z(z).symbol for z in zs],
        "n_atoms_min": int(batch.n_atoms.min()),
        "n_atoms_max": int(batch.n_atoms.max()),
        "n_structures": batch.num_structures,
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
        if self.max_s is not None and time.time() - self.start > self.max_s:
            trainer.should_stop = True


def train(cfg: TrainConfig, out_dir: str | Path, resume: bool = False, data_root: str | None = None, config_path: str | None = None) -> dict[str, Any]:
    """Train a base model; writes checkpoints (``last.ckpt``, ``best.ckpt``) and ``model.pt`` to ``out_dir``."""
    from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar

    from crystalign.io import save_torch, write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    train_set, holdout, data_sha = load_training_data(cfg.data, data_root)
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
    g = torch.Generator().manual_seed(cfg.seed)
    train_loader = DataLoader(tr_ds, batch_size=bs, shuffle=True, collate_fn=tr_ds.collate, generator=g, drop_last=len(tr_ds) > bs)
    val_loader = DataLoader(ho_ds, batch_size=bs, shuffle=False, collate_fn=ho_ds.collate) if len(ho_ds) else None

    logger: Any = False
    tc = cfg.trainer
    if tc.logger == "csv":
        from lightning.pytorch.loggers import CSVLogger

        logger = CSVLogger(out, name="logs", version=0)
    elif tc.logger == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        logger = TensorBoardLogger(out, name="tb")
    elif tc.logger == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        logger = WandbLogger(save_dir=out)
    monitor = "val/loss" if val_loader is not None else "train/loss"
    ckpt_cb = ModelCheckpoint(dirpath=out, filename="best", monitor=monitor, mode="min", save_last=True, save_top_k=1)
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
        enable_progress_bar=tc.progress_bar,
        check_val_every_n_epoch=cfg.validation.every_n_epochs,
        num_sanity_val_steps=0,
        enable_model_summary=False,
        deterministic=False,
    )
    ckpt_path = None
    if resume:
        last = out / "last.ckpt"
        if not last.exists():
            raise FileNotFoundError(f"--resume: no {last} to resume from")
        ckpt_path = str(last)
    t0 = time.time()
    trainer.fit(module, train_loader, val_loader, ckpt_path=ckpt_path)
    wall = time.time() - t0
    result = {"wall_s": wall, "epochs": trainer.current_epoch, "global_step": trainer.global_step, "best": ckpt_cb.best_model_path}
    if trainer.is_global_zero:
        best_path = ckpt_cb.best_model_path or str(out / "last.ckpt")
        ckpt = torch.load(best_path, map_location="cpu", weights_only=True)
        save_torch(out / "model.pt", ckpt["generator"])
        write_json(out / "train_summary.json", {**result, **module.provenance(), "monitor": monitor, "best_score": float(ckpt_cb.best_model_score) if ckpt_cb.best_model_score is not None else None})
    return result


def describe(cfg: TrainConfig) -> str:
    return json.dumps(to_dict(cfg), indent=2)
