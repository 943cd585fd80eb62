"""The RL run's configuration (``RLConfig``: the YAML of ``crystalign rl fit``) and the device check.

Example::

    cfg = RLConfig(variant="velocity", group_size=8, num_groups=4, iterations=100)
    device = check_device(cfg.device)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from crystalign.config import is_finite_number, require
from crystalign.data.splits import DataConfig
from crystalign.generator import check_seed
from crystalign.interpolants import FIELDS
from crystalign.rl.objective import validate_costs
from crystalign.rl.policy import VARIANTS
from crystalign.rl.schedules import build_noise_schedule


@dataclass
class RLValidationConfig:
    every: int = 10
    num_compositions: int = 32
    samples_per_composition: int = 1

    def __post_init__(self) -> None:
        require(self.every >= 0, "validation.every", ">= 0 (0 = no validation)", self.every)
        require(self.num_compositions >= 1, "validation.num_compositions", ">= 1", self.num_compositions)
        require(self.samples_per_composition >= 1, "validation.samples_per_composition", ">= 1", self.samples_per_composition)


def check_device(device: str, where: str = "device", available: bool = True) -> torch.device:
    """``device`` as a torch.device; ValueError naming ``where`` for a malformed name or (``available``) a device
    this machine or PyTorch build cannot use."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{where}: invalid device {device!r}; expected cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"{where}: unsupported device {device!r}; expected cpu, cuda or cuda:N")
    if not available:
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{where}: {device!r} requested, but CUDA is not available (a CPU-only PyTorch build or no visible GPU); use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{where}: {device!r} requested, but only {torch.cuda.device_count()} CUDA device(s) are visible")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{where}: {device!r} requested, but MPS is not available on this machine; use cpu")
    return dev


@dataclass
class RLConfig:
    seed: int = 0
    variant: Literal["velocity", "score", "scale", "scaled_velocity"] = "velocity"
    fields: list[str] = field(default_factory=lambda: ["pos"])
    steps: int = 50
    noise: dict[str, Any] = field(default_factory=lambda: {"pos": {"kind": "sqrt", "a": 0.1668100537}, "cell": {"kind": "sqrt", "a": 0.1668100537}})
    reference_noise: dict[str, Any] | None = None
    group_size: int = 8
    num_groups: int = 4
    share_x0: bool = False
    ppo_epochs: int = 1
    clip_eps: float = 0.2
    position_normalization: Literal["none", "per_structure_weight", "per_atom_surrogate"] = "per_atom_surrogate"
    costs: dict[str, float] = field(default_factory=lambda: {"pos_policy": 1.0, "pos_regularization": 1e-3})
    normalize_costs: bool = False
    lr: float = 1e-4
    grad_clip: float = 1.0
    iterations: int = 100
    minibatch_trajectories: int | None = None
    # timesteps are batched into one forward/backward up to this many atoms; 0 = one timestep at a time
    max_atoms_per_backward: int = 2048
    reward: Any = "energy"
    data: DataConfig = field(default_factory=DataConfig)
    validation: RLValidationConfig = field(default_factory=RLValidationConfig)
    # guard on rejected_fraction: invalid by the geometric check or by the reward (see RLTrainer's log keys)
    max_invalid_fraction: float = 0.95
    duplicate_check: bool = True
    scale_model: str | None = None
    #: constant velocity annealing s of each field's rollout steps, (1 + s t) b as the base sampler's
    #: ``anneal_pos``/``anneal_cell`` (velocity variant only): reinforce the policy on the path it will be sampled with
    anneal: dict[str, float] = field(default_factory=dict)
    #: cap c of an annealed rollout step, at most c (1 - t)/dt times b dt, as the base sampler's ``anneal_cap``
    anneal_cap: float | None = None
    device: str = "cpu"
    num_threads: int | None = None

    def __post_init__(self) -> None:
        self.seed = check_seed(self.seed)
        bad = [f for f in self.fields if f not in FIELDS]
        if bad or not self.fields:
            raise ValueError(f"fields: must be a non-empty subset of {FIELDS}, got {self.fields}")
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (GRPO normalises within groups), got {self.group_size}")
        if self.steps < 2:
            raise ValueError(f"steps must be >= 2, got {self.steps}")
        if self.max_atoms_per_backward < 0:
            raise ValueError(f"max_atoms_per_backward must be >= 0, got {self.max_atoms_per_backward}")
        require(self.num_groups >= 1, "num_groups", ">= 1", self.num_groups)
        require(self.ppo_epochs >= 1, "ppo_epochs", ">= 1", self.ppo_epochs)
        require(self.iterations >= 0, "iterations", ">= 0", self.iterations)
        require(is_finite_number(self.lr) and self.lr > 0, "lr", "a positive finite number", self.lr)
        require(is_finite_number(self.clip_eps) and self.clip_eps > 0, "clip_eps", "a positive finite number", self.clip_eps)
        require(is_finite_number(self.grad_clip) and self.grad_clip >= 0, "grad_clip", "a finite number >= 0 (0 = no clipping)", self.grad_clip)
        require(
            is_finite_number(self.max_invalid_fraction) and 0 <= self.max_invalid_fraction <= 1,
            "max_invalid_fraction", "between 0 and 1", self.max_invalid_fraction,
        )
        require(self.minibatch_trajectories is None or self.minibatch_trajectories >= 1, "minibatch_trajectories", ">= 1 or null", self.minibatch_trajectories)
        require(self.num_threads is None or self.num_threads >= 0, "num_threads", ">= 0 or null (0/null = PyTorch's default)", self.num_threads)
        # the name only: whether this machine has the device is checked where the run starts, so a checkpoint
        # trained on a GPU still loads for sampling on a CPU-only machine
        check_device(self.device, "device", available=False)
        validate_costs(self.costs, self.normalize_costs)
        # checked here, not after the first rollout and reward (minutes with a real potential)
        missing_noise = [f for f in self.fields if f not in (self.noise or {})]
        if missing_noise:
            raise ValueError(f"noise: no schedule for the reinforced field(s) {missing_noise} (e.g. {{kind: sqrt, a: 0.1668}})")
        require(self.variant in VARIANTS, "variant", f"one of {VARIANTS}", self.variant)
        self.anneal = dict(self.anneal or {})
        for f, s in self.anneal.items():
            require(f in FIELDS, "anneal", f"keyed by fields {FIELDS}", f)
            require(is_finite_number(s) and s >= 0, f"anneal.{f}", "a finite number >= 0", s)
        if any(self.anneal.values()) and self.variant != "velocity":
            raise ValueError(f"anneal: velocity annealing of the rollouts needs variant 'velocity', not {self.variant!r}")
        if self.anneal_cap is not None:
            from crystalign.sampling import SamplerConfig

            self.anneal_cap = SamplerConfig(anneal_cap=self.anneal_cap).anneal_cap  # the sampler's check; inf: no cap
        with torch.random.fork_rng(devices=[]):  # a learnable schedule initialises weights: leave the caller's RNG alone
            for f in self.fields:
                build_noise_schedule(self.noise[f], where=f"noise.{f}")
        for key, cost in self.costs.items():
            field_name, _, kind = key.partition("_")
            if cost and field_name not in self.fields:
                raise ValueError(f"costs.{key}: field {field_name!r} is not reinforced (fields: {self.fields}); remove the cost or add the field")
            if cost and kind == "distillation" and self.variant != "score":
                raise ValueError(f"costs.{key}: denoiser distillation belongs to the 'score' variant, not {self.variant!r}")
