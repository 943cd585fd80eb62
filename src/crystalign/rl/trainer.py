"""OMatG-IRL training: rollout → reward → GRPO advantages → PPO epochs (method.md §3.12), resumable.

The variants differ only in their :class:`~crystalign.rl.policy.GaussianTransition`; log-probs, KL, PPO and
bookkeeping are shared here (the policy and its rollout: :mod:`crystalign.rl.rollout`; checkpoints and run
folders: :mod:`crystalign.rl.checkpoints`). The backward pass runs per timestep (or per chunk of timesteps) so
memory stays at one step's graph. Trajectories can optionally be split into mini-batches (one optimiser step each).

Under ``torch.distributed`` GRPO groups are sharded across ranks: each rank rolls out and rewards its own
groups (advantages are group-local, so no communication), and gradients are averaged with all-reduce.

Example::

    policy = make_policy(Generator.load("perov_5"), cfg)
    trainer = RLTrainer(policy, reward=make_reward("energy"), config=cfg, compositions=train_batch)
    trainer.fit(out_dir="runs/rl")
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from crystalign.config import to_dict
from crystalign.crystal import CrystalBatch
from crystalign.generator import Generator
from crystalign.model.cspnet import build_edges
from crystalign.provenance import versions
from crystalign.rl.checkpoints import FORMAT, FORMAT_VERSION, check_resume, check_run_dir, load_scale_model
from crystalign.rl.config import RLConfig
from crystalign.rl.distributed import merge_rank_rows, rank_and_world
from crystalign.rl.monitoring import batch_statistics, distinct_formula_fraction
from crystalign.rl.objective import field_loss_terms, group_advantages, timestep_loss, validate_costs
from crystalign.rl.policy import FieldOutputs, Step
from crystalign.rl.rollout import Policy, Trajectory, rollout

log = logging.getLogger(__name__)


class RLDivergedError(RuntimeError):
    """A run stopped by a reward-hacking guard (e.g. too many invalid structures)."""


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
    * ``distinct_formula_fraction`` (de novo base models): distinct reduced formulas per generated structure, so
      a policy collapsing onto a few easy chemistries is visible.
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
        self.rank, self.world = rank_and_world()
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
        self.last_rollout = (traj.final, result)  # for fit()'s on_rollout: the scored structures of this iteration
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
            row = merge_rank_rows(row, self.world)
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
                    # a DNG rollout's species at each stored step (the template's are the masked start)
                    species = torch.cat([traj.species[k][atom_sel] for k in ks]) if traj.species else None
                    out, _ = policy.outputs(step.t, big, pos, cell, edges_of[c], species=species)
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
        row = batch_statistics(final, rewards, info, group_size, template, duplicate_check=self.config.duplicate_check)
        if self.policy.reference.is_dng:
            row["distinct_formula_fraction"] = distinct_formula_fraction(final)
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
        return merge_rank_rows(row, self.world, weight=template.num_structures) if self.world > 1 else row

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
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
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

    def fit(
        self,
        out_dir: str | Path,
        resume: bool = False,
        on_iteration: Callable[[dict[str, Any]], None] | None = None,
        on_rollout: Callable[[int, CrystalBatch, Any], None] | None = None,
    ) -> list[dict[str, Any]]:
        """Run until ``config.iterations``; a checkpoint after every iteration makes a kill lose nothing.

        ``on_rollout(iteration, structures, reward_result)`` receives each iteration's scored rollouts (this process's
        share) before that iteration's checkpoint is written, so whatever it keeps is never behind a resumed run."""
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
            if on_rollout is not None:
                on_rollout(self.iteration, *self.last_rollout)
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


def _accumulate(sums: dict[str, Any], key: str, value: Any, weight: int) -> None:
    value = value.detach().double() if torch.is_tensor(value) else float(value)
    sums[key] = sums.get(key, 0.0) + value * weight


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


def make_policy(reference: Generator, config: RLConfig) -> Policy:
    """The policy of a new run: its trainable parts initialised from ``config.seed`` (without touching the
    caller's global RNG), its scale model loaded for the scaled-velocity variant, on ``config.device``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return Policy(reference, config, scale_model=load_scale_model(config.scale_model)).to(config.device)
