"""OMatG-IRL: rollout → reward → GRPO advantages → PPO epochs (method.md §3.12), resumable.

The variants differ only in their :class:`~crystalign.rl.policy.GaussianTransition`; rollout, log-probs,
KL, PPO and bookkeeping are shared here. The reference outputs (b_ref, η_ref) are stored during the
rollout and reused by every PPO epoch, and the backward pass runs per timestep so memory stays at one
step's graph. Trajectories can optionally be split into mini-batches (one optimiser step each).

Under ``torch.distributed`` GRPO groups are sharded across ranks: each rank rolls out and rewards its own
groups (advantages are group-local, so no communication), and gradients are averaged with all-reduce.

Example::

    policy = Policy.from_generator(Generator.load("perov_5"), RLConfig(variant="velocity"))
    trainer = RLTrainer(policy, reward=make_reward("energy"), config=cfg, compositions=train_batch)
    trainer.fit(out_dir="runs/rl")
"""

from __future__ import annotations

import copy
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
import torch.distributed as dist
from torch import nn

from crystalign.config import config_changes, is_finite_number, require, to_dict
from crystalign.crystal import CrystalBatch
from crystalign.data.splits import DataConfig
from crystalign.generator import Generator, check_seed
from crystalign.interpolants import FIELDS, time_grid
from crystalign.model.cspnet import build_edges
from crystalign.provenance import versions
from crystalign.rl.objective import (
    field_loss_terms,
    group_advantages,
    timestep_loss,
    validate_costs,
    velocity_ratio,
)
from crystalign.rl.policy import VARIANTS, FieldOutputs, GaussianTransition, Step, euler_step, make_transition
from crystalign.rl.scale import ScaleMLP
from crystalign.rl.schedules import build_noise_schedule

log = logging.getLogger(__name__)

NETWORK_VARIANTS = ("velocity", "score", "scaled_velocity")


class RLDivergedError(RuntimeError):
    """A run stopped by a reward-hacking guard (e.g. too many invalid structures)."""


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
        with torch.random.fork_rng(devices=[]):  # a learnable schedule initialises weights: leave the caller's RNG alone
            for f in self.fields:
                build_noise_schedule(self.noise[f], where=f"noise.{f}")
        for key, cost in self.costs.items():
            field_name, _, kind = key.partition("_")
            if cost and field_name not in self.fields:
                raise ValueError(f"costs.{key}: field {field_name!r} is not reinforced (fields: {self.fields}); remove the cost or add the field")
            if cost and kind == "distillation" and self.variant != "score":
                raise ValueError(f"costs.{key}: denoiser distillation belongs to the 'score' variant, not {self.variant!r}")


# ---------------------------------------------------------------------- the policy
class Policy(nn.Module):
    """Trainable part (network copy or ScaleMLP, learnable σ) + frozen reference generator.

    ``reference`` is frozen; ``net`` is a trainable copy of its network for the network variants;
    ``scale`` is the ScaleMLP for velocity annealing; ``transitions`` hold σ(t) per reinforced field.
    """

    def __init__(self, reference: Generator, config: RLConfig, scale_model: ScaleMLP | None = None):
        super().__init__()
        self.config = config
        self.variant = config.variant
        self.reference = reference
        reference.requires_grad_(False)
        reference.eval()
        self.net = copy.deepcopy(reference.net).requires_grad_(True) if config.variant in NETWORK_VARIANTS else None
        self.scale = ScaleMLP() if config.variant == "scale" else None
        # the score drift b - σ²/(2γ)·η needs each reinforced field's own denoiser and γ(t)
        gammas: dict[str, Any] = {}
        if config.variant == "score":
            for f in config.fields:
                ip = reference.interpolants[f]
                if not ip.uses_denoiser:
                    raise ValueError(
                        f"variant 'score' reinforces field {f!r}, but the base model learned it without a denoiser η "
                        f"and latent γ(t) (an ODE field): reinforce only its SDE fields "
                        f"{[g for g in FIELDS if reference.interpolants[g].uses_denoiser]}, or use variant 'velocity'"
                    )
                gammas[f] = ip.gamma_schedule
        if reference.config.sampling.anneal_pos or reference.config.sampling.anneal_cell:
            warnings.warn(
                "the base model samples with velocity annealing (sampling.anneal_pos/anneal_cell), which RL ignores: "
                "the policy starts from the un-annealed velocity field",
                stacklevel=2,
            )
        ref_noise = config.reference_noise or {}
        self.transitions = nn.ModuleDict(
            {
                f: make_transition(config.variant, f, config.noise[f], ref_noise.get(f), gamma=gammas.get(f), scale_model=scale_model)
                for f in config.fields
            }
        )

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith("reference.")]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("reference.")}

    def outputs(self, t: torch.Tensor, batch_like: CrystalBatch, pos: torch.Tensor, cell: torch.Tensor, edges):
        """Policy outputs per field at the states (``t`` (B,) per structure); the network variants call the
        trainable network once."""
        if self.net is not None:
            out = self.net(t, batch_like.species, pos, cell, batch_like.n_atoms, edges=edges)
            return {f: FieldOutputs.from_network(out, f) for f in FIELDS}, out
        assert self.scale is not None
        s = self.scale(t)
        return {f: FieldOutputs.from_scale(s, f) for f in FIELDS}, None


@dataclass
class Trajectory:
    """What a rollout stores per step: states, actions, old log-probs, reference outputs."""

    template: CrystalBatch
    times: list[float]
    pos: list[torch.Tensor] = field(default_factory=list)
    cell: list[torch.Tensor] = field(default_factory=list)
    actions: list[dict[str, torch.Tensor]] = field(default_factory=list)
    logp_old: list[dict[str, torch.Tensor]] = field(default_factory=list)
    ref: list[dict[str, FieldOutputs]] = field(default_factory=list)
    velocity_ratio: list[torch.Tensor] = field(default_factory=list)
    final: CrystalBatch | None = None


def rollout(
    policy: Policy,
    template: CrystalBatch,
    steps: int,
    generator: torch.Generator,
    store: bool = True,
    noise: bool = True,
    x0: CrystalBatch | None = None,
) -> Trajectory:
    """Integrate the policy from p_0 for the compositions of ``template`` (no gradients).

    ``noise=False`` gives the deterministic mean path (``rl sample --no-noise``).
    """
    ref_gen = policy.reference
    if x0 is None:
        x0 = ref_gen.base_sample(template.species, template.n_atoms, generator)
    ts = time_grid(steps, dtype=torch.float64).tolist()
    edges = build_edges(x0.n_atoms)
    traj = Trajectory(template=x0, times=ts)
    pos, cell = x0.frac, x0.lattice
    with torch.no_grad():
        for k in range(len(ts) - 1):
            t, dt = ts[k], ts[k + 1] - ts[k]
            step = Step.on_grid(t, dt, x0)
            raw_ref = ref_gen.net(step.t, x0.species, pos, cell, x0.n_atoms, edges=edges)
            ref = {f: FieldOutputs.from_network(raw_ref, f) for f in FIELDS}
            out, raw_out = policy.outputs(step.t, x0, pos, cell, edges)
            if raw_out is not None and "pos" in policy.transitions:
                traj.velocity_ratio.append(velocity_ratio(raw_out["pos_b"], raw_ref["pos_b"], x0.batch, x0.num_structures))
            state = {"pos": pos, "cell": cell}
            new, actions, logps = {}, {}, {}
            for f in FIELDS:
                if f in policy.transitions:
                    tr: GaussianTransition = policy.transitions[f]
                    if noise:
                        action, logp = tr.sample_action(step, out[f], ref[f], generator=generator)
                    else:
                        action, logp = tr.mean(step, out[f], ref[f]), None
                    new[f] = tr.next_state(state[f], action, step, ref[f])
                    actions[f], logps[f] = action, logp
                else:
                    new[f] = euler_step(state[f], ref[f].b, step, f)
            if store:
                traj.pos.append(pos)
                traj.cell.append(cell)
                traj.actions.append(actions)
                traj.logp_old.append(logps)
                traj.ref.append({f: ref[f].detach() for f in policy.transitions})
            pos, cell = new["pos"], new["cell"]
    traj.final = x0.replace(frac=pos, lattice=cell, ids=template.ids)
    return traj


# ---------------------------------------------------------------------- the trainer
def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class RLTrainer:
    """Runs OMatG-IRL iterations with checkpoint/resume, validation and reward-hacking guards.

    ``validation_reward`` defaults to ``reward``, or for a :class:`~crystalign.rewards.CompositeReward` to its
    monitoring copy: zero-weight terms are skipped in training and computed in validation (method.md §3.9).

    Monitoring keys of a history row (validation: the same with a ``val_`` prefix, without the group statistics):

    * ``reward_mean``, ``reward_std``; ``reward_std_within_group``: mean over GRPO groups of the population std.
    * ``invalid_fraction``: fraction failing the shared geometric check (volume, PBC distance, polar sine).
    * ``reward_invalid_fraction``: fraction the reward itself rejects, i.e. its ``valid`` info key is 0 (for a
      composite: a weighted term's ``<term>/valid`` is 0); absent when the reward reports no ``valid``.
    * ``rejected_fraction``: fraction invalid by the geometric check or by the reward. The guard
      ``max_invalid_fraction`` stops the run when a training batch exceeds it.
    * ``<key>_mean`` for every reward info key but ``valid``, NaN values skipped: 0/1 flags (keys whose values in
      the batch are all 0 or 1, e.g. ``invalid_geometry``, ``<term>/valid``) over all structures, other quantities
      over geometrically valid structures.
    * ``volume_per_atom_a3``: mean generated V/N (Å³/atom) over geometrically valid structures.
    * ``volume_per_atom_drift_vs_data``: mean over structures of V/N(generated) / V/N(dataset) − 1, where the
      dataset structure is the template the composition was taken from; over geometrically valid generated
      structures whose template holds a real cell (passes the check, at most 0.5 atoms/Å³), absent when none does
      (composition-only templates). It replaces ``volume_per_atom_drift``, which divided by the first validation
      pass's V/N, i.e. compared different compositions.
    * ``duplicate_fraction`` (with ``duplicate_check``), ``velocity_ratio``, PPO statistics and ``time_*_s``.
    """

    def __init__(
        self,
        policy: Policy,
        reward: Callable[[CrystalBatch], Any],
        config: RLConfig,
        compositions: CrystalBatch,
        validation: CrystalBatch | None = None,
        progress: bool = True,
        validation_reward: Callable[[CrystalBatch], Any] | None = None,
    ):
        from crystalign.rewards.composite import CompositeReward

        self.policy = policy
        self.reward = reward
        self.validation_reward = validation_reward or (reward.monitoring() if isinstance(reward, CompositeReward) else reward)
        self.config = config
        self.compositions = compositions
        self.validation = validation
        self.progress = progress
        if compositions.num_structures == 0:
            raise ValueError("no compositions to train on")
        self.rank, self.world = _dist()
        if config.num_groups % self.world:
            raise ValueError(f"num_groups={config.num_groups} must be divisible by the number of processes ({self.world})")
        self.optimizer = torch.optim.Adam(policy.trainable_parameters(), lr=config.lr)
        self.costs = validate_costs(config.costs, config.normalize_costs)
        self.iteration = 0
        self.history: list[dict[str, Any]] = []
        self.best_val: float = -math.inf
        self.generator = torch.Generator().manual_seed(config.seed * 1000 + self.rank)
        self.data_generator = torch.Generator().manual_seed(config.seed)  # identical on every rank
        self.reference_hash = policy.reference.model_hash()  # the base model's identity, checked on resume

    # ----------------------------------------------------------------- one iteration
    def sample_groups(self) -> CrystalBatch:
        cfg = self.config
        n = self.compositions.num_structures
        # distinct compositions per batch, as GRPO intends; repeats only when there are fewer than groups
        if cfg.num_groups <= n:
            idx = torch.randperm(n, generator=self.data_generator)[: cfg.num_groups]
        else:
            idx = torch.randint(n, (cfg.num_groups,), generator=self.data_generator)
        per_rank = cfg.num_groups // self.world
        mine = idx[self.rank * per_rank : (self.rank + 1) * per_rank]
        return self.compositions[mine].repeat_interleave(cfg.group_size)

    def _x0(self, template: CrystalBatch) -> CrystalBatch | None:
        if not self.config.share_x0:
            return None
        g = self.config.group_size
        one = self.policy.reference.base_sample(template.species, template.n_atoms, self.generator)[torch.arange(0, template.num_structures, g)]
        return one.repeat_interleave(g)

    def step(self) -> dict[str, Any]:
        cfg = self.config
        t0 = time.time()
        template = self.sample_groups()
        traj = rollout(self.policy, template, cfg.steps, self.generator, x0=self._x0(template))
        t_roll = time.time() - t0
        result = self.reward(traj.final)
        rewards = checked_rewards(result, traj.final.num_structures, self.reward)
        t_reward = time.time() - t0 - t_roll
        adv = group_advantages(rewards, cfg.group_size).to(device=traj.final.device, dtype=traj.final.dtype)
        stats = self.update(traj, adv)
        t_update = time.time() - t0 - t_roll - t_reward
        row = {"iteration": self.iteration + 1, **self._monitor(traj.final, rewards, result.info, cfg.group_size, template), **stats}
        row["velocity_ratio"] = float(torch.stack(traj.velocity_ratio).mean()) if traj.velocity_ratio else 0.0
        row.update(time_rollout_s=t_roll, time_reward_s=t_reward, time_update_s=t_update, time_total_s=time.time() - t0)
        if self.world > 1:
            # log the whole batch, not rank 0's shard; and the guard below must decide the same on every rank (one
            # that stops alone leaves the others waiting in the next all-reduce)
            row = _merge_rank_rows(row, self.world)
        if row["rejected_fraction"] > cfg.max_invalid_fraction:
            raise RLDivergedError(
                f"iteration {row['iteration']}: invalid fraction {row['rejected_fraction']:.2f} (geometry "
                f"{row['invalid_fraction']:.2f}, rejected by the reward {row.get('reward_invalid_fraction', 0.0):.2f}) "
                f"exceeds max_invalid_fraction={cfg.max_invalid_fraction}; the policy is producing broken structures "
                "(lower lr or raise the KL cost)"
            )
        return row

    def _minibatches(self, b: int) -> list[torch.Tensor]:
        mb = self.config.minibatch_trajectories
        if not mb or mb >= b:
            return [torch.arange(b)]
        perm = torch.randperm(b, generator=self.generator)
        return [perm[i : i + mb].sort().values for i in range(0, b, mb)]

    def _steps_per_backward(self, atoms_per_step: int, num_steps: int) -> int:
        """Timesteps evaluated in one batched forward/backward: as many as fit ``max_atoms_per_backward``
        (at least one, so large batches keep memory at one step's graph)."""
        budget = self.config.max_atoms_per_backward
        return max(1, min(num_steps, budget // max(atoms_per_step, 1))) if budget else 1

    def update(self, traj: Trajectory, adv: torch.Tensor) -> dict[str, float]:
        """``ppo_epochs`` passes over the stored trajectory; one optimiser step per mini-batch.

        Timesteps are independent terms of the loss, so a chunk of ``c`` of them is evaluated as one batch of
        ``c`` copies of the structures (each with its own time): every loss term is a mean over structures, so
        ``c`` times the chunk's loss equals the sum of its per-step losses. Exact, and far fewer, larger kernels.
        """
        cfg = self.config
        policy = self.policy
        tmpl = traj.template
        K = len(traj.pos)
        params = policy.trainable_parameters()
        sums: dict[str, Any] = {}  # tensors until the end: one device sync per statistic, not per chunk
        count = 0
        for _ in range(cfg.ppo_epochs):
            for sel in self._minibatches(tmpl.num_structures):
                sub = tmpl[sel]
                atom_sel = torch.nonzero(tmpl.atom_mask(sel)).squeeze(-1)
                chunk = self._steps_per_backward(sub.num_atoms, K)
                edges_of: dict[int, Any] = {}  # by chunk length: only the last chunk may be shorter
                self.optimizer.zero_grad(set_to_none=True)
                for k0 in range(0, K, chunk):
                    ks = range(k0, min(k0 + chunk, K))
                    c = len(ks)
                    big = CrystalBatch.cat([sub] * c) if c > 1 else sub
                    per_copy = dict(dtype=sub.dtype, device=sub.device)
                    step = Step(
                        t=torch.tensor([traj.times[k] for k in ks], **per_copy).repeat_interleave(sub.num_structures),
                        dt=torch.tensor([traj.times[k + 1] - traj.times[k] for k in ks], **per_copy).repeat_interleave(sub.num_structures),
                        batch=big.batch,
                    )
                    pos = torch.cat([traj.pos[k][atom_sel] for k in ks])
                    cell = torch.cat([traj.cell[k][sel] for k in ks])
                    if c not in edges_of:
                        edges_of[c] = build_edges(big.n_atoms)
                    out, _ = policy.outputs(step.t, big, pos, cell, edges_of[c])
                    big_adv = adv[sel].repeat(c)
                    terms: dict[str, torch.Tensor] = {}
                    for f, tr in policy.transitions.items():
                        rows = atom_sel if tr.per_atom_action else sel
                        ref = _cat_outputs([_select(traj.ref[k][f], atom_sel if f == "pos" else sel) for k in ks])
                        action = torch.cat([traj.actions[k][f][rows] for k in ks])
                        logp_old = torch.cat([traj.logp_old[k][f][rows] for k in ks])
                        logp_new = tr.log_prob(action, step, out[f], ref)
                        kl = tr.kl_to_reference(step, out[f], ref) if self.costs.get(f"{f}_regularization", 0.0) else None
                        ent = tr.entropy(step, like=action) if self.costs.get(f"{f}_entropy", 0.0) else None
                        distill = self.costs.get(f"{f}_distillation", 0.0) and policy.variant == "score"
                        t_terms, t_stats = field_loss_terms(
                            f, logp_new, logp_old, big_adv, cfg.clip_eps,
                            batch=tr.unit_batch(step), num_structures=big.num_structures,
                            mode=cfg.position_normalization, kl=kl, entropy=ent,
                            eta=out[f].eta if distill else None, eta_ref=ref.eta if distill else None,
                        )
                        terms.update(t_terms)
                        for key, v in t_stats.items():
                            _accumulate(sums, key, v, c)
                    loss, l_stats = timestep_loss(terms, self.costs, cfg.normalize_costs)
                    (loss * (c / K)).backward()
                    for key, v in l_stats.items():
                        _accumulate(sums, key, v, c)
                    count += c
                self._allreduce_grads(params)
                # the total norm (clipped only with grad_clip > 0); all ranks hold the same gradients, so all stop
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip else math.inf)
                if not torch.isfinite(grad_norm):
                    raise RLDivergedError(
                        f"iteration {self.iteration + 1}: non-finite policy gradients (e.g. a PPO ratio that overflowed); "
                        "the step is not taken and the last checkpoint holds the last good policy (lower lr or raise the KL cost)"
                    )
                _accumulate(sums, "grad_norm", grad_norm, K)
                self.optimizer.step()
        return {k: float(v) / max(count, 1) for k, v in sums.items()}

    def _allreduce_grads(self, params: list[nn.Parameter]) -> None:
        if self.world == 1:
            return
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        for p in params:
            if p.grad is None:  # every rank must send the same tensors
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        # one all-reduce of one flat buffer, not one per parameter tensor (tens of NCCL calls per step)
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.world
        for grad, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            grad.copy_(synced)

    def _monitor(
        self, final: CrystalBatch, rewards: torch.Tensor, info: dict[str, torch.Tensor], group_size: int | None,
        template: CrystalBatch | None = None,
    ) -> dict[str, Any]:
        """Reward statistics and reward-hacking guards (keys: see the class docstring); ``template`` holds the
        dataset structures the compositions came from."""
        final = final.to("cpu")  # monitoring only; rewards and their info may live on another device than the states
        report = final.validity()
        valid = report.valid
        rewards = rewards.cpu()
        row: dict[str, Any] = {
            "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std(unbiased=False)),
            "invalid_fraction": float(1.0 - valid.double().mean()),
        }
        rejected = ~valid
        if "valid" in info:
            by_reward = info["valid"].detach().cpu() == 0
            row["reward_invalid_fraction"] = float(by_reward.double().mean())
            rejected = rejected | by_reward
        row["rejected_fraction"] = float(rejected.double().mean())
        if group_size:
            row["reward_std_within_group"] = float(rewards.view(-1, group_size).std(dim=1, unbiased=False).mean())
        for key, value in info.items():
            if key == "valid":
                continue
            v = value.detach().double().cpu()
            finite = torch.isfinite(v)
            is_flag = bool(((v[finite] == 0) | (v[finite] == 1)).all())
            mask = finite if is_flag else finite & valid  # a flag counts every structure, e.g. invalid_geometry
            row[f"{key}_mean"] = float(v[mask].mean()) if bool(mask.any()) else float("nan")
        vpa = report.volume / final.n_atoms.to(report.volume.dtype)
        row["volume_per_atom_a3"] = float(vpa[valid].mean()) if bool(valid.any()) else float("nan")
        if template is not None:
            drift = volume_drift_vs_data(vpa, valid, template.to("cpu"))
            if drift is not None:
                row["volume_per_atom_drift_vs_data"] = drift
        if group_size and self.config.duplicate_check:
            row["duplicate_fraction"] = duplicate_fraction(final, group_size, valid)
        return row

    # ----------------------------------------------------------------- validation
    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        if self.validation is None or self.validation.num_structures == 0:
            return {}
        vc = self.config.validation
        compositions = self.validation[: vc.num_compositions]
        if self.world > 1:  # each rank validates its share of the compositions; the rows are merged below
            compositions = compositions[torch.arange(self.rank, compositions.num_structures, self.world)]
        template = compositions.repeat_interleave(vc.samples_per_composition)
        row: dict[str, Any] = {}
        if template.num_structures:
            g = torch.Generator().manual_seed(10_000 + self.config.seed + self.rank)  # the same x0 every validation
            traj = rollout(self.policy, template, self.config.steps, g, store=False)
            result = self.validation_reward(traj.final)
            row = self._monitor(traj.final, checked_rewards(result, traj.final.num_structures, self.validation_reward), result.info, None, template)
        row = {f"val_{k}": v for k, v in row.items()}
        # ranks can hold different numbers of validation compositions: weigh their means by their structures
        return _merge_rank_rows(row, self.world, weight=template.num_structures) if self.world > 1 else row

    # ----------------------------------------------------------------- checkpoints
    def _gather_rank_rngs(self) -> list[torch.Tensor]:
        """Every rank's rollout-noise generator state (empty in a single process)."""
        if self.world == 1:
            return []
        states: list[Any] = [None] * self.world
        dist.all_gather_object(states, self.generator.get_state())
        return states

    def state(self) -> dict[str, Any]:
        return {
            "format": "crystalign-rl",
            "format_version": 1,
            "config": to_dict(self.config),
            "iteration": self.iteration,
            "policy": self.policy.trainable_state(),
            "optimizer": self.optimizer.state_dict(),
            "history": self.history,
            "best_val": self.best_val,
            "rng": self.generator.get_state(),
            "data_rng": self.data_generator.get_state(),
            "reference": self.policy.reference.checkpoint_dict(),
            "reference_hash": self.reference_hash,
            "versions": versions(),
        }

    def load_state(self, state: dict[str, Any], where: str = "RL checkpoint") -> None:
        check_resume(state, self.config, self.reference_hash, where)
        missing, unexpected = self.policy.load_state_dict(state["policy"], strict=False)
        unexpected = [k for k in unexpected if not k.startswith("reference.")]
        if unexpected or [k for k in missing if not k.startswith("reference.")]:
            raise ValueError(f"RL checkpoint does not fit this policy (unexpected {unexpected[:5]})")
        self.optimizer.load_state_dict(state["optimizer"])
        self.iteration = int(state["iteration"])
        self.history = list(state["history"])
        self.best_val = float(state["best_val"])
        # each rank continues its own stream (rollout noise differs per rank); rank 0's where a checkpoint lacks them
        rank_rngs = state.get("rank_rngs") or []
        if len(rank_rngs) == self.world:
            self.generator.set_state(rank_rngs[self.rank])
        elif self.world == 1:
            self.generator.set_state(state["rng"])
        else:
            # resumed on another number of processes: one saved stream on every rank would repeat the same draws
            self.generator.manual_seed(self.config.seed * 1000 + self.rank + 7919 * int(state["iteration"]))
        self.data_generator.set_state(state["data_rng"])

    def fit(self, out_dir: str | Path, resume: bool = False, on_iteration: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
        """Run until ``config.iterations``; a checkpoint after every iteration makes a kill lose nothing."""
        from tqdm import tqdm

        from crystalign.io import save_torch, write_json

        from crystalign.model.checkpoint import read_checkpoint_file

        out = check_run_dir(out_dir, resume)
        last = out / "last.pt"
        if resume:
            self.load_state(read_checkpoint_file(last), where=str(last))
        vc = self.config.validation
        if vc.every and self.iteration == 0 and not self.history:
            # the untrained policy (stochastic, as it will be trained): the baseline of every validation curve
            self.history.append({"iteration": 0, **self.validate()})
        bar = tqdm(total=self.config.iterations, initial=self.iteration, desc="rl", unit="it", disable=not self.progress or self.rank != 0)
        while self.iteration < self.config.iterations:
            row = self.step()
            self.iteration += 1
            if vc.every and self.iteration % vc.every == 0:
                row.update(self.validate())
            self.history.append(row)
            rank_rngs = self._gather_rank_rngs()  # a collective: every rank, before rank 0 saves
            if self.rank == 0:
                improved = "val_reward_mean" in row and row["val_reward_mean"] > self.best_val
                if improved:
                    self.best_val = row["val_reward_mean"]
                state = {**self.state(), **({"rank_rngs": rank_rngs} if rank_rngs else {})}
                if improved:
                    save_torch(out / "best.pt", state)
                save_torch(last, state)
                write_json(out / "history.json", self.history)
            bar.update(1)
            bar.set_postfix(reward=f"{row['reward_mean']:.3f}", invalid=f"{row['rejected_fraction']:.2f}")
            if on_iteration is not None:
                on_iteration(row)
        bar.close()
        if self.rank == 0 and not last.exists():
            # a run of 0 iterations: still resumable, and recognised as a run by check_run_dir
            save_torch(last, self.state())
            write_json(out / "history.json", self.history)
        if self.rank == 0 and (not vc.every or not (out / "best.pt").exists()):
            # without validation there is no "best": best.pt is the final policy, refreshed by every resumed run
            save_torch(out / "best.pt", self.state())
        if self.world > 1:
            dist.barrier()  # rank 0's last checkpoint is on disk before any rank moves on (e.g. to resume from it)
        return self.history


# ---------------------------------------------------------------------- run folder and resume checks
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
    if _dist()[0] == 0:  # one rank probes: ranks sharing the folder would race on the probe file
        check_output_dir(out)
        remove_stale_parts(out)  # temporary files of a checkpoint write that a kill interrupted
        if resume and recover_first_checkpoint(out / "last.pt", out / "best.pt"):
            log.warning("%s: the run was stopped while writing its first checkpoint; resuming from best.pt", out)
    if resume and _dist()[1] > 1:
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


def coverage_summary(reference: Generator, compositions: CrystalBatch, limit: int = 3) -> str | None:
    """One summarised warning (or None) when training compositions lie outside the base model's training
    coverage, from the same per-composition checks as ``crystalign predict``."""
    from collections import Counter

    from crystalign.prediction import coverage_warnings

    per_structure = compositions.species.cpu().split(compositions.n_atoms.cpu().tolist())
    counts = Counter(tuple(sorted(s.tolist())) for s in per_structure)
    problems: Counter[str] = Counter()
    outside = 0
    for species, count in counts.items():
        found = coverage_warnings(reference, list(species))
        outside += count if found else 0
        for w in found:
            problems[w] += count
    if not problems:
        return None
    shown = "; ".join(f"{w} ({c}x)" for w, c in problems.most_common(limit))
    more = f"; and {len(problems) - limit} other problem(s)" if len(problems) > limit else ""
    return f"{outside} of {compositions.num_structures} training compositions lie outside the base model's training coverage: {shown}{more}"


def _accumulate(sums: dict[str, Any], key: str, value: Any, weight: int) -> None:
    value = value.detach().double() if torch.is_tensor(value) else float(value)
    sums[key] = sums.get(key, 0.0) + value * weight


def _merge_rank_rows(row: dict[str, Any], world: int, weight: float = 1.0) -> dict[str, Any]:
    """One log row for the whole batch from every rank's row (ranks hold equal shards of the GRPO groups):
    ``*_min``/``*_max`` take the extreme, other numbers the mean over ranks weighted by ``weight`` (each rank's
    number of structures: exact for means and fractions over all structures; for means over valid structures
    only, and for ``*_std``, the weighted mean of the ranks' values).
    Keys a rank lacks (e.g. no valid structure there) are merged over the ranks that have them; timings stay
    each rank's own."""
    rows: list[Any] = [None] * world
    dist.all_gather_object(rows, {**row, "__weight": weight})
    merged = dict(row)
    for key in dict.fromkeys(k for r in rows for k in r if k != "__weight"):  # every rank's keys, in order
        value = next(r[key] for r in rows if key in r)
        if key.startswith("time_") or key == "iteration" or isinstance(value, bool) or not isinstance(value, (int, float)):
            merged.setdefault(key, value)
            continue
        pairs = [(float(r[key]), float(r["__weight"])) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(float(r[key]))]
        if not pairs or sum(w for _, w in pairs) <= 0:
            merged[key] = float("nan")  # the same keys on every rank
            continue
        values = [v for v, _ in pairs]
        mean = sum(v * w for v, w in pairs) / sum(w for _, w in pairs)
        merged[key] = min(values) if key.endswith("_min") else max(values) if key.endswith("_max") else mean
    return merged


def checked_rewards(result: Any, num_structures: int, reward: Any) -> torch.Tensor:
    """The (B,) float64 rewards of ``result``, checked: a wrong count is an error naming the reward; a non-finite
    reward (a user metric that failed) would turn the whole group's advantages, and then every weight, into NaN:
    it becomes the batch's lowest finite reward and the structure counts as rejected by the reward."""
    rewards = result.rewards.to(torch.float64)
    name = getattr(reward, "name", type(reward).__name__)
    if rewards.shape != (num_structures,):
        raise ValueError(f"reward {name!r} returned {tuple(rewards.shape)} values for {num_structures} structures")
    finite = torch.isfinite(rewards)
    if bool(finite.all()):
        return rewards
    if not bool(finite.any()):
        raise RLDivergedError(f"reward {name!r} returned no finite value for the {num_structures} structures of this batch")
    log.warning("reward %r: %d non-finite value(s) replaced by the batch's lowest reward", name, int((~finite).sum()))
    valid = result.info.get("valid")
    valid = torch.ones_like(rewards) if valid is None else valid.to(rewards)
    result.info["valid"] = valid * finite.to(rewards)
    return torch.where(finite, rewards, rewards[finite].min())


def _select(ref: FieldOutputs, rows: torch.Tensor) -> FieldOutputs:
    pick = lambda v: None if v is None else v[rows]  # noqa: E731
    return FieldOutputs(b=pick(ref.b), eta=pick(ref.eta), s=pick(ref.s))


def _cat_outputs(parts: list[FieldOutputs]) -> FieldOutputs:
    if len(parts) == 1:
        return parts[0]
    cat = lambda vs: None if vs[0] is None else torch.cat(vs)  # noqa: E731
    return FieldOutputs(b=cat([p.b for p in parts]), eta=cat([p.eta for p in parts]), s=cat([p.s for p in parts]))


def volume_drift_vs_data(volume_per_atom: torch.Tensor, valid: torch.Tensor, template: CrystalBatch) -> float | None:
    """Mean of V/N(generated) / V/N(template) − 1 over valid generated structures whose template holds a real cell;
    None when no template does (composition-only templates carry a 1 Å^3 placeholder cell)."""
    from crystalign.rewards.energy import MAX_NUMBER_DENSITY

    ref = template.validity()
    ref_vpa = ref.volume / template.n_atoms.to(ref.volume.dtype)
    real = ref.valid & (ref_vpa >= 1.0 / MAX_NUMBER_DENSITY)
    if not bool(real.any()):
        return None
    use = real & valid
    return float((volume_per_atom[use] / ref_vpa[use]).mean() - 1.0) if bool(use.any()) else float("nan")


def duplicate_fraction(final: CrystalBatch, group_size: int, valid: torch.Tensor) -> float:
    """Fraction of valid structures that duplicate an earlier member of their group (benchmark matcher)."""
    from crystalign.matching import make_matcher

    matcher = make_matcher()
    structures = final.to_structures()
    dup = 0
    total = 0
    for g0 in range(0, len(structures), group_size):
        kept: list = []
        for i in range(g0, min(g0 + group_size, len(structures))):
            if not bool(valid[i]):
                continue
            total += 1
            s = structures[i]
            if any(matcher.fit(s, k) for k in kept):
                dup += 1
            else:
                kept.append(s)
    return dup / total if total else 0.0


# ---------------------------------------------------------------------- checkpoint loading
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
    """The contents of an RL checkpoint written by :class:`RLTrainer`, checked to be one."""
    from crystalign.model.checkpoint import read_checkpoint_file

    state = read_checkpoint_file(path, map_location)
    if not isinstance(state, dict) or state.get("format") != "crystalign-rl":
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path}: not a crystalign RL checkpoint (format: {found!r})")
    missing = [k for k in ("config", "reference", "policy") if not isinstance(state.get(k), dict)]
    if missing:
        raise ValueError(f"{path}: damaged RL checkpoint: no {', '.join(missing)} entry")
    return state


def make_policy(reference: Generator, config: RLConfig) -> Policy:
    """The policy of a new run: its trainable parts initialised from ``config.seed`` (without touching the
    caller's global RNG), its scale model loaded for the scaled-velocity variant, on ``config.device``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return Policy(reference, config, scale_model=load_scale_model(config.scale_model)).to(config.device)


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
