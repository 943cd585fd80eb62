"""The policy (trainable network copy or ScaleMLP, learnable σ, frozen reference) and its rollout.

The reference outputs (b_ref, η_ref) are stored during the rollout and reused by every PPO epoch.

Example::

    policy = Policy(Generator.load("perov_5"), RLConfig(variant="velocity"))
    traj = rollout(policy, composition_batch(["SrTiO3"], 8), steps=50, generator=torch.Generator().manual_seed(0))
    traj.final  # CrystalBatch of the sampled structures
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from crystalign.crystal import CrystalBatch
from crystalign.generator import Generator
from crystalign.interpolants import FIELDS, time_grid
from crystalign.model.cspnet import build_edges
from crystalign.rl.config import RLConfig
from crystalign.rl.objective import velocity_ratio
from crystalign.rl.policy import FieldOutputs, GaussianTransition, Step, euler_step, make_transition
from crystalign.rl.scale import ScaleMLP

NETWORK_VARIANTS = ("velocity", "score", "scaled_velocity")


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
        if (reference.config.sampling.anneal_pos or reference.config.sampling.anneal_cell) and not any(config.anneal.values()):
            warnings.warn(
                "the base model samples with velocity annealing (sampling.anneal_pos/anneal_cell), which this RL run "
                "does not use (set anneal: {pos: S} to roll out with it): the policy starts from the un-annealed path",
                stacklevel=2,
            )
        ref_noise = config.reference_noise or {}
        self.transitions = nn.ModuleDict(
            {
                f: make_transition(
                    config.variant, f, config.noise[f], ref_noise.get(f), gamma=gammas.get(f), scale_model=scale_model,
                    anneal=config.anneal.get(f, 0.0), anneal_cap=config.anneal_cap,
                )
                for f in config.fields
            }
        )

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith("reference.")]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("reference.")}

    def outputs(
        self, t: torch.Tensor, batch_like: CrystalBatch, pos: torch.Tensor, cell: torch.Tensor, edges,
        species: torch.Tensor | None = None,
    ):
        """Policy outputs per field at the states (``t`` (B,) per structure); the network variants call the
        trainable network once. ``species``: the current tokens of a DNG rollout (default ``batch_like``'s)."""
        if self.net is not None:
            species = batch_like.species if species is None else species
            out = self.net(t, species, pos, cell, batch_like.n_atoms, edges=edges)
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
    #: the species tokens at each step of a DNG rollout (empty for CSP, whose species are the template's)
    species: list[torch.Tensor] = field(default_factory=list)
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

    A de novo (DNG) base model also generates the species: they start masked and are integrated passively by the
    frozen base model (its species logits, the policy's network only sees them), as OMatG-IRL does; positions
    and lattice are reinforced as for CSP.
    """
    ref_gen = policy.reference
    if x0 is None:
        x0 = ref_gen.base_sample(template.species, template.n_atoms, generator)
    ts = time_grid(steps, dtype=torch.float64).tolist()
    edges = build_edges(x0.n_atoms)
    traj = Trajectory(template=x0, times=ts)
    pos, cell = x0.frac, x0.lattice
    species_flow = ref_gen.interpolants.species
    species = torch.zeros_like(x0.species) if species_flow is not None else x0.species  # DNG: all masked at t = 0
    allowed = ref_gen.element_mask() if species_flow is not None else None  # as the base sampler: trained elements
    with torch.no_grad():
        for k in range(len(ts) - 1):
            t, dt = ts[k], ts[k + 1] - ts[k]
            step = Step.on_grid(t, dt, x0)
            raw_ref = ref_gen.net(step.t, species, pos, cell, x0.n_atoms, edges=edges)
            ref = {f: FieldOutputs.from_network(raw_ref, f) for f in FIELDS}
            out, raw_out = policy.outputs(step.t, x0, pos, cell, edges, species=species)
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
                    new[f] = euler_step(
                        state[f], ref[f].b, step, f, anneal=policy.config.anneal.get(f, 0.0), anneal_cap=policy.config.anneal_cap
                    )
            if store:
                traj.pos.append(pos)
                traj.cell.append(cell)
                traj.actions.append(actions)
                traj.logp_old.append(logps)
                traj.ref.append({f: ref[f].detach() for f in policy.transitions})
                if species_flow is not None:
                    traj.species.append(species)
            pos, cell = new["pos"], new["cell"]
            if species_flow is not None:
                species = species_flow.step(
                    species, raw_ref["species_b"], t, dt, last=k == len(ts) - 2, generator=generator, allowed=allowed
                )
    traj.final = x0.replace(frac=pos, lattice=cell, species=species, ids=template.ids)
    return traj
