"""Integrators for the learned fields: ODE Euler / Heun, SDE Euler–Maruyama, velocity annealing.

The velocity is scaled either by a constant annealing factor, (1 + s·t)·b, or by a learned schedule
(:class:`~crystalign.schedule.VelocitySchedule`), [1 + s(t)]·b; never both. ``anneal_cap`` c bounds the factor of
an annealed field by c·(1 − t)/Δt: on a linear path (1 − t)·b is the way left to the model's estimate of the final
structure, so a capped step never goes more than the fraction c of that way, where an uncapped (1 + s·t) step
late in the integration overshoots it.

One network call per step returns every field (pos and cell), unlike the reference which calls the
network once per field on identical inputs. Edges are built once per batch and reused across steps.

Time runs on ``linspace(SMALL_TIME, BIG_TIME, steps)``: ``steps`` time points, ``steps - 1`` updates
(method.md §2.5). Positions are wrapped onto the torus before every model call and after every step.

Example::

    sampler = Sampler(net, interpolants, SamplerConfig(steps=50))
    x1 = sampler.sample(x0)                      # x0: CrystalBatch drawn from the base distribution
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Literal, Mapping

import torch

from crystalign.crystal import CrystalBatch
from crystalign.geometry import wrap
from crystalign.interpolants import FIELDS, time_grid
from crystalign.model.cspnet import build_edges
from crystalign.ops import randn_on

if TYPE_CHECKING:  # pragma: no cover
    from crystalign.schedule import VelocitySchedule


@dataclass
class SamplerConfig:
    """How to integrate. ``anneal_*`` is the velocity-annealing factor s in (1 + s·t)·b; ``anneal_cap`` (None or
    inf: no cap; inf overrides a model's default cap) bounds the multiplier of every annealed field by
    c·(1 − t)/Δt, see the module docstring (a field that is not annealed keeps plain Euler steps)."""

    steps: int = 50
    method: Literal["euler", "heun", "sde"] = "euler"
    anneal_pos: float = 0.0
    anneal_cell: float = 0.0
    anneal_cap: float | None = None

    def __post_init__(self) -> None:
        if self.steps < 2:
            raise ValueError(f"steps must be >= 2 time points, got {self.steps}")
        if self.method not in ("euler", "heun", "sde"):
            raise ValueError(f"method must be 'euler', 'heun' or 'sde', got {self.method!r}")
        if self.anneal_cap is not None:
            cap = self.anneal_cap
            if isinstance(cap, bool) or not isinstance(cap, (int, float)) or math.isnan(cap) or cap <= 0:
                raise ValueError(f"anneal_cap must be a number > 0 (the fraction of the way left per step; inf: no cap), got {cap!r}")
            if math.isinf(cap):
                self.anneal_cap = None  # inf (a way to lift a model's default cap) is no cap: recorded as null

    def follow_policy(self, anneal: Mapping[str, float] | None = None, steps: int | None = None, anneal_cap: float | None = None) -> None:
        """Make this the mean path of a velocity-based RL policy: Euler with its rollouts' constant annealing
        (``{"pos": s, "cell": c}``, none by default) and cap, at its ``steps`` time points (None: keep these)."""
        anneal = anneal or {}
        self.method, self.anneal_pos, self.anneal_cell = "euler", anneal.get("pos", 0.0), anneal.get("cell", 0.0)
        self.anneal_cap = anneal_cap
        if steps is not None:
            self.steps = steps


def cap_speed(speed, t, dt, cap: float | None):
    """A velocity multiplier (float or tensor) bounded by ``cap``·(1 − t)/Δt (None: unbounded); the sampler's and
    the RL rollouts' one definition of the cap."""
    if cap is None:
        return speed
    bound = cap * (1.0 - t) / dt
    return torch.minimum(torch.as_tensor(speed, dtype=bound.dtype), bound) if torch.is_tensor(bound) else min(speed, bound)


class FieldNet:
    """Calls the network once for all fields on a batch whose atom counts do not change.

    Caches the intra-crystal edge list so that integration does not rebuild it at every step. A DNG sampler passes
    the current (partly masked) species at every call; CSP species stay those given here.
    """

    def __init__(self, net: torch.nn.Module, species: torch.Tensor, n_atoms: torch.Tensor):
        self.net = net
        self.species = species
        self.n_atoms = n_atoms
        self.edges = build_edges(n_atoms)

    def __call__(
        self, t: float | torch.Tensor, frac: torch.Tensor, lattice: torch.Tensor, species: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        b = self.n_atoms.numel()
        t_vec = torch.as_tensor(t, dtype=frac.dtype, device=frac.device).expand(b) if not torch.is_tensor(t) or t.dim() == 0 else t
        species = self.species if species is None else species
        return self.net(t_vec, species, wrap(frac), lattice, self.n_atoms, edges=self.edges)


def drift(
    out: dict[str, torch.Tensor],
    field: str,
    t: float,
    interpolant,
    multiplier: float = 1.0,
    stochastic: bool = False,
) -> torch.Tensor:
    """Drift of one field: m·b (m: the annealing multiplier at t), minus (ε/γ)·η for the SDE of a field with a denoiser."""
    b = out[f"{field}_b"] * multiplier if multiplier != 1.0 else out[f"{field}_b"]
    if stochastic and interpolant.uses_denoiser:
        tt = torch.tensor(t, dtype=b.dtype)
        b = b - (interpolant.epsilon(tt) / interpolant.gamma(tt)).item() * out[f"{field}_eta"]
    return b


class Sampler:
    """Integrate x0 (base distribution sample) to t ≈ 1 with the learned velocity (and denoiser)."""

    def __init__(
        self, net: torch.nn.Module, interpolants, config: SamplerConfig | None = None, schedule: "VelocitySchedule | None" = None,
        elements: torch.Tensor | None = None,
    ):
        self.net = net
        #: DNG models: (100,) bool mask of the elements the species flow may draw (None: any)
        self.elements = elements
        self.interpolants = interpolants
        self.config = config or SamplerConfig()
        #: learned velocity multipliers 1 + s(t); replaces constant annealing
        self.schedule = schedule
        if schedule is not None and (self.config.anneal_pos or self.config.anneal_cell):
            raise ValueError(
                "a learned velocity schedule and constant annealing (--anneal-pos/--anneal-cell) both scale the "
                "velocity: drop the annealing, or turn the schedule off (--no-schedule)"
            )
        if self.config.method == "sde" and not any(interpolants[f].uses_denoiser for f in FIELDS):
            # without a denoiser there is no SDE to integrate: 'sde' would silently be Euler
            raise ValueError(
                "method 'sde' needs a model trained with a denoiser η (an SDE interpolant: `sde: true` with a "
                "gamma); this model learned an ODE: use 'euler' or 'heun'"
            )

    def multipliers(self, ts: list[float]) -> dict[str, list[float]]:
        """Velocity multiplier per field at each time point: 1 + s(t) (schedule) or 1 + s·t (constant annealing),
        at most ``anneal_cap``·(1 − t)/Δt for an annealed field (Δt: the step from t; the last point reuses the
        last step's)."""
        if self.schedule is not None:
            mult = self.schedule.multipliers(ts)
        else:
            anneal = {"pos": self.config.anneal_pos, "cell": self.config.anneal_cell}
            mult = {f: [1.0 + anneal[f] * t for t in ts] for f in FIELDS}
        cap = self.config.anneal_cap
        if cap is None:
            return mult
        dts = [b - a for a, b in zip(ts, ts[1:])]
        dts.append(dts[-1])
        return {f: [cap_speed(m, t, dt, cap) for m, t, dt in zip(ms, ts, dts)] if any(m != 1.0 for m in ms) else ms for f, ms in mult.items()}

    @torch.no_grad()
    def sample(
        self,
        x0: CrystalBatch,
        generator: torch.Generator | None = None,
        trajectory: bool = False,
        callback: Callable[[int, int], None] | None = None,
    ) -> CrystalBatch | tuple[CrystalBatch, list[CrystalBatch]]:
        """Integrate every structure of ``x0``; returns the final batch (and the trajectory if asked).

        A DNG model (species flow) also integrates the species from ``x0.species`` (all MASK for new crystals),
        with the logits of the same network call; their draws come from ``generator`` too."""
        cfg = self.config
        fnet = FieldNet(self.net, x0.species, x0.n_atoms)
        ts = time_grid(cfg.steps, dtype=torch.float64).tolist()
        species_flow = self.interpolants.species
        species = x0.species
        state = {"pos": wrap(x0.frac), "cell": x0.lattice.clone()}
        traj = [x0.replace(frac=state["pos"].clone(), lattice=state["cell"].clone())] if trajectory else []
        stochastic = cfg.method == "sde"
        mult = self.multipliers(ts)
        for k in range(len(ts) - 1):
            t, dt = ts[k], ts[k + 1] - ts[k]
            out = fnet(t, state["pos"], state["cell"], species)
            drifts = {f: drift(out, f, t, self.interpolants[f], mult[f][k], stochastic) for f in FIELDS}
            if cfg.method == "heun":
                pred = {f: state[f] + drifts[f] * dt for f in FIELDS}
                out2 = fnet(ts[k + 1], pred["pos"], pred["cell"], species)
                d2 = {f: drift(out2, f, ts[k + 1], self.interpolants[f], mult[f][k + 1]) for f in FIELDS}
                new = {f: state[f] + 0.5 * (drifts[f] + d2[f]) * dt for f in FIELDS}
            else:
                new = {f: state[f] + drifts[f] * dt for f in FIELDS}
                if stochastic:
                    for f in FIELDS:
                        ip = self.interpolants[f]
                        if ip.uses_denoiser:
                            eps = float(ip.epsilon(torch.tensor(t, dtype=torch.float64)))
                            noise = randn_on(new[f].shape, generator, like=new[f])
                            new[f] = new[f] + (2.0 * eps * dt) ** 0.5 * noise
            new["pos"] = wrap(new["pos"])
            state = new
            if species_flow is not None:
                species = species_flow.step(
                    species, out["species_b"], t, dt, last=k == len(ts) - 2, generator=generator, allowed=self.elements
                )
            if trajectory:
                traj.append(x0.replace(frac=state["pos"].clone(), lattice=state["cell"].clone(), species=species))
            if callback is not None:
                callback(k + 1, len(ts) - 1)
        final = x0.replace(frac=state["pos"], lattice=state["cell"], species=species)
        return (final, traj) if trajectory else final
