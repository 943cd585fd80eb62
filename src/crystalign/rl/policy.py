r"""The RL policy: one Gaussian Euler–Maruyama step per field, with a pluggable parametrisation of its mean.

For a field with state :math:`x` (``pos`` (N,3) fractional, or ``cell`` (B,3,3)), left grid time :math:`t` and step
:math:`\Delta t`, the policy draws an **action** :math:`a`, the raw (unwrapped) increment, from

.. math::  \pi_\theta(a \mid x) = \mathcal N\big(a;\ \mu_\theta,\ \sigma(t)^2 \Delta t\, I\big),
           \qquad a = \mu_\text{old} + \sigma(t)\sqrt{\Delta t}\,\xi,\quad \xi \sim \mathcal N(0, I),

and the next state is :math:`x' = \operatorname{wrap}(x + \delta(a))` (identity instead of wrap for the cell). The
density is Euclidean on the covering space: the state wraps, the stored action does not, so log-probs are exact
and unchanged when :math:`x` is shifted by integer lattice vectors. Only the parametrisation differs per variant:

* **velocity**: :math:`\mu_\theta = (b_\theta - b_\text{ref})\Delta t`, :math:`\mu_\text{ref} = 0`,
  :math:`x' - x = b_\text{ref}\Delta t + a`
* **scaled_velocity**: :math:`\mu_\theta = (1+s(t))(b_\theta - b_\text{ref})\Delta t`, :math:`\mu_\text{ref} = 0`,
  :math:`x' - x = (1+s(t))\,b_\text{ref}\Delta t + a`
* **score**: :math:`\mu_\theta = d_\theta\Delta t` with :math:`d = b - \tfrac{\sigma^2}{2\gamma(t)}\eta`,
  :math:`\mu_\text{ref} = d_\text{ref}\Delta t` (built with :math:`\sigma_\text{ref}`), :math:`x' - x = a`
* **scale**: one scalar per structure, :math:`\mu_\theta = s_\theta(t)\Delta t`, :math:`\mu_\text{ref} = 0`,
  :math:`x' - x = b_\text{ref}\Delta t + a\,b_\text{ref}`

In the scaled-velocity variant :math:`s(t)` is a frozen, pre-learned :class:`~crystalign.rl.scale.ScaleMLP`. In the
scale variant the Jacobian :math:`\lVert b_\text{ref}\rVert` of :math:`a \mapsto a\,b_\text{ref}` is the same for
every policy, so it cancels in PPO ratios and is left out of the log-prob.

Per-element quantities (``pos``: (N,3); ``cell``: (B,3,3); scale variant: (B,)), with
:math:`v = \sigma^2\Delta t` and :math:`v_\text{ref} = \sigma_\text{ref}^2\Delta t`:

.. math::
    \log\pi(a) &= -\tfrac12\big[\ln(2\pi v) + (a-\mu)^2 / v\big] \\
    \mathrm{KL}(\pi_\theta\,\|\,\pi_\text{ref}) &= \ln\frac{\sigma_\text{ref}}{\sigma}
        + \frac{\sigma^2\Delta t + (\mu_\theta - \mu_\text{ref})^2}{2\sigma_\text{ref}^2\Delta t} - \frac12 \\
    H(\pi_\theta) &= \tfrac12\ln(2\pi e\, \sigma^2\Delta t)

The entropy is that of the per-step Gaussian, the same density as the log-prob. It differs from the
``½ln(2πσ²) + ½`` of the original description by the constant ``½ln Δt``, so its gradient is identical.

A disabled field takes the noise-free Euler step :func:`euler_step` with :math:`b_\text{ref}`; a zero noise schedule
(:attr:`NoiseSchedule.is_zero`) makes :meth:`GaussianTransition.sample_action` return the deterministic mean and no
log-prob.

Example::

    policy = make_transition("velocity", "pos", noise={"kind": "sqrt", "a": 0.1668})
    step = Step.on_grid(t=0.3, dt=0.02, crystals=batch)
    action, logp_old = policy.sample_action(step, FieldOutputs.from_network(out_old, "pos"), ref)
    frac_next = policy.next_state(batch.frac, action, step, ref)
"""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
from torch import nn

from crystalign.geometry import wrap
from crystalign.ops import randn_on
from crystalign.rl.scale import ScaleMLP
from crystalign.rl.schedules import NoiseSchedule, build_noise_schedule
from crystalign.sampling import cap_speed

if TYPE_CHECKING:  # pragma: no cover
    from crystalign.crystal import CrystalBatch

__all__ = [
    "FIELDS",
    "VARIANTS",
    "Step",
    "FieldOutputs",
    "Parametrisation",
    "Velocity",
    "ScaledVelocity",
    "Score",
    "Scale",
    "GaussianTransition",
    "make_transition",
    "log_prob",
    "kl_divergence",
    "entropy",
    "euler_step",
]

FIELDS = ("pos", "cell")
VARIANTS = ("velocity", "scaled_velocity", "score", "scale")

_LOG_2PI = math.log(2.0 * math.pi)


# ---------------------------------------------------------------------------------------------------------------
# Gaussian densities on the unwrapped increment
# ---------------------------------------------------------------------------------------------------------------
def log_prob(action: torch.Tensor, mean: torch.Tensor, sigma: torch.Tensor, dt: torch.Tensor | float) -> torch.Tensor:
    r"""Per-element Gaussian log-density of the increment:

    .. math:: \log\mathcal N(a;\ \mu,\ \sigma^2\Delta t) = -\tfrac12\big[\ln(2\pi\sigma^2\Delta t) + (a-\mu)^2/(\sigma^2\Delta t)\big]

    All arguments broadcast against each other; the result has their broadcast shape.
    """
    var = sigma**2 * dt
    return -0.5 * (_LOG_2PI + torch.log(var) + (action - mean) ** 2 / var)


def kl_divergence(
    mean: torch.Tensor,
    sigma: torch.Tensor,
    mean_ref: torch.Tensor,
    sigma_ref: torch.Tensor,
    dt: torch.Tensor | float,
) -> torch.Tensor:
    r"""Per-element :math:`\mathrm{KL}(\pi\,\|\,\pi_r)` of the step Gaussians :math:`\mathcal N(\mu, \sigma^2\Delta t)`, :math:`\mathcal N(\mu_r, \sigma_r^2\Delta t)`:

    .. math:: \ln\frac{\sigma_r}{\sigma} + \frac{\sigma^2\Delta t + (\mu - \mu_r)^2}{2\sigma_r^2\Delta t} - \frac12

    With :math:`\mu = b\Delta t` this is :math:`\ln(\sigma_r/\sigma) + (\sigma^2 + (b-b_r)^2\Delta t)/(2\sigma_r^2) - \frac12`.
    """
    var_ref = sigma_ref**2 * dt
    return torch.log(sigma_ref / sigma) + (sigma**2 * dt + (mean - mean_ref) ** 2) / (2.0 * var_ref) - 0.5


def entropy(sigma: torch.Tensor, dt: torch.Tensor | float) -> torch.Tensor:
    r"""Per-element entropy of the step Gaussian, :math:`\tfrac12\ln(2\pi e\,\sigma^2\Delta t)`."""
    return 0.5 * (_LOG_2PI + 1.0 + torch.log(sigma**2 * dt))


# ---------------------------------------------------------------------------------------------------------------
# Step context and network outputs
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Step:
    """One integration step: left times ``t`` (B,), step sizes ``dt`` (B,), atom→structure index ``batch`` (N,).

    Times are per structure so that schedules, :math:`\\gamma(t)` and :math:`s(t)` are (B,) tensors that expand
    to any field; on the usual shared grid every entry is the same.
    """

    t: torch.Tensor
    dt: torch.Tensor
    batch: torch.Tensor

    def __post_init__(self) -> None:
        if self.t.dim() != 1 or self.dt.shape != self.t.shape:
            raise ValueError(
                f"Step: t and dt must both have shape (B,), got {tuple(self.t.shape)} and {tuple(self.dt.shape)}"
            )
        # on an accelerator, reading the check back would synchronise every integration step: there the steps
        # come from on_grid (checked below) or from a strictly increasing time grid
        if self.dt.device.type == "cpu" and bool((self.dt <= 0).any()):
            raise ValueError("Step: dt must be positive")

    @classmethod
    def on_grid(cls, t: float, dt: float, crystals: "CrystalBatch") -> "Step":
        """The same ``t`` and ``dt`` for every structure of ``crystals`` (in its dtype and device)."""
        if not dt > 0:
            raise ValueError(f"Step: dt must be positive, got {dt}")
        b = crystals.num_structures
        kw = dict(dtype=crystals.dtype, device=crystals.device)
        return cls(t=torch.full((b,), float(t), **kw), dt=torch.full((b,), float(dt), **kw), batch=crystals.batch)

    @property
    def num_structures(self) -> int:
        return self.t.shape[0]

    def per_element(self, value: torch.Tensor, like: torch.Tensor, per_atom: bool) -> torch.Tensor:
        """Expand a per-structure ``value`` (B,) so it broadcasts against ``like``.

        ``per_atom``: ``like`` is indexed by atom ((N,3) positions), so rows are gathered with ``batch``;
        otherwise by structure ((B,3,3) cells or (B,) scalar actions).
        """
        if per_atom:
            value = value[self.batch]
        return value.reshape(-1, *([1] * (like.dim() - 1)))


@dataclass
class FieldOutputs:
    """Network outputs for one field: velocity ``b``, denoiser ``eta`` (same shape as the field) and the
    per-structure speed ``s`` (B,) of a ScaleMLP. Unused entries stay None."""

    b: torch.Tensor | None = None
    eta: torch.Tensor | None = None
    s: torch.Tensor | None = None

    @classmethod
    def from_network(cls, out: Mapping[str, torch.Tensor], field: str) -> "FieldOutputs":
        """From the base network's ``{"pos_b", "pos_eta", "cell_b", "cell_eta"}`` dict."""
        _check_field(field)
        return cls(b=out[f"{field}_b"], eta=out.get(f"{field}_eta"))

    @classmethod
    def from_scale(cls, out: Mapping[str, torch.Tensor], field: str) -> "FieldOutputs":
        """From :class:`~crystalign.rl.scale.ScaleMLP`'s ``{"pos_s", "cell_s"}`` dict."""
        _check_field(field)
        return cls(s=out[f"{field}_s"])

    def detach(self) -> "FieldOutputs":
        return FieldOutputs(*(None if v is None else v.detach() for v in (self.b, self.eta, self.s)))


def _check_field(field: str) -> None:
    if field not in FIELDS:
        raise ValueError(f"field must be one of {FIELDS}, got {field!r}")


def _need(value: torch.Tensor | None, what: str, variant: str) -> torch.Tensor:
    if value is None:
        raise ValueError(f"the {variant} parametrisation needs {what}")
    return value


# ---------------------------------------------------------------------------------------------------------------
# Parametrisations: the only thing the variants differ in
# ---------------------------------------------------------------------------------------------------------------
class Parametrisation(nn.Module, ABC):
    """How the action mean and the state update are built from network outputs.

    ``sigma`` arguments are the per-structure noise levels (B,), only used by the score drift; ``field`` is
    ``"pos"`` (elements indexed by atom) or ``"cell"`` (indexed by structure).
    """

    name: str = ""
    #: the action is one scalar per structure (B,) instead of one value per field element
    per_structure_action: bool = False

    @abstractmethod
    def mean(self, out: FieldOutputs, ref: FieldOutputs, sigma: torch.Tensor, step: Step, field: str) -> torch.Tensor:
        """Action mean under the policy whose outputs are ``out``."""

    @abstractmethod
    def reference_mean(self, ref: FieldOutputs, sigma_ref: torch.Tensor, step: Step, field: str) -> torch.Tensor:
        """Action mean of the frozen reference policy."""

    @abstractmethod
    def displacement(self, action: torch.Tensor, ref: FieldOutputs, step: Step, field: str) -> torch.Tensor:
        """:math:`x' - x` before wrapping."""


class Velocity(Parametrisation):
    r"""Velocity RL relative to the base: :math:`\mu_\theta = k(t)(b_\theta - b_\text{ref})\Delta t`,
    :math:`x' = x + k(t)\,b_\text{ref}\Delta t + a`, with speed :math:`k(t) = 1 + s\,t`: the base sampler's
    constant velocity annealing (``anneal`` = s, 0 for plain Euler) with its cap (``anneal_cap``, see
    :func:`crystalign.sampling.cap_speed`), so the policy is reinforced on the path it will be sampled with."""

    name = "velocity"

    def __init__(self, anneal: float = 0.0, anneal_cap: float | None = None) -> None:
        super().__init__()
        self.anneal = float(anneal)
        self.anneal_cap = anneal_cap

    def speed(self, step: Step, field: str) -> torch.Tensor | float:
        return annealed_speed(step, self.anneal, self.anneal_cap)

    def _k_dt(self, step: Step, like: torch.Tensor, field: str) -> torch.Tensor:
        return step.per_element(self.speed(step, field) * step.dt, like, field == "pos")

    def mean(self, out, ref, sigma, step, field):
        b, b_ref = _need(out.b, "b", self.name), _need(ref.b, "b_ref", self.name)
        return self._k_dt(step, b, field) * (b - b_ref)

    def reference_mean(self, ref, sigma_ref, step, field):
        return torch.zeros_like(_need(ref.b, "b_ref", self.name))

    def displacement(self, action, ref, step, field):
        b_ref = _need(ref.b, "b_ref", self.name)
        return self._k_dt(step, b_ref, field) * b_ref + action


class ScaledVelocity(Velocity):
    r"""Velocity RL with a frozen, pre-learned annealing: speed :math:`k(t) = 1 + s(t)` from a ScaleMLP."""

    name = "scaled_velocity"

    def __init__(self, scale_model: ScaleMLP) -> None:
        super().__init__()
        self.scale_model = scale_model.requires_grad_(False)

    def speed(self, step: Step, field: str) -> torch.Tensor:
        with torch.no_grad():
            return 1.0 + self.scale_model(step.t)[f"{field}_s"]


class Score(Parametrisation):
    r"""Score-based drift :math:`d = b - \frac{\sigma(t)^2}{2\gamma(t)}\eta`; :math:`\mu = d\,\Delta t`, :math:`x' = x + a`.

    ``gamma`` is the base interpolant's :math:`\gamma(t)`: a callable on a time tensor, or an object with a
    ``gamma(t)`` method (:class:`~crystalign.interpolants.gamma.Gamma`). The reference drift uses
    :math:`\sigma_\text{ref}`, i.e. the reference policy is the base model sampled with the reference noise.
    """

    name = "score"

    def __init__(self, gamma: Callable[[torch.Tensor], torch.Tensor] | Any) -> None:
        super().__init__()
        self.gamma = gamma.gamma if hasattr(gamma, "gamma") else gamma
        if not callable(self.gamma):
            raise TypeError("Score: gamma must be callable on a time tensor or have a gamma(t) method")

    def drift(self, out: FieldOutputs, sigma: torch.Tensor, step: Step, field: str) -> torch.Tensor:
        r""":math:`b - \sigma^2/(2\gamma(t))\,\eta` per element."""
        b, eta = _need(out.b, "b", self.name), _need(out.eta, "eta", self.name)
        coeff = sigma**2 / (2.0 * self.gamma(step.t))
        return b - step.per_element(coeff, b, field == "pos") * eta

    def mean(self, out, ref, sigma, step, field):
        d = self.drift(out, sigma, step, field)
        return step.per_element(step.dt, d, field == "pos") * d

    def reference_mean(self, ref, sigma_ref, step, field):
        return self.mean(ref, ref, sigma_ref, step, field)

    def displacement(self, action, ref, step, field):
        return action


class Scale(Parametrisation):
    r"""Velocity annealing: a scalar action per structure :math:`a \sim \mathcal N(s_\theta(t)\Delta t, \sigma^2\Delta t)`,
    :math:`x' = x + b_\text{ref}\Delta t + a\,b_\text{ref}`; the noise acts along :math:`b_\text{ref}`."""

    name = "scale"
    per_structure_action = True

    def mean(self, out, ref, sigma, step, field):
        s = _need(out.s, "s (ScaleMLP output)", self.name)
        return s.expand_as(step.t) * step.dt

    def reference_mean(self, ref, sigma_ref, step, field):
        return torch.zeros_like(step.t)

    def displacement(self, action, ref, step, field):
        b_ref = _need(ref.b, "b_ref", self.name)
        per_atom = field == "pos"
        return (step.per_element(step.dt, b_ref, per_atom) + step.per_element(action, b_ref, per_atom)) * b_ref


# ---------------------------------------------------------------------------------------------------------------
# The transition
# ---------------------------------------------------------------------------------------------------------------
class GaussianTransition(nn.Module):
    """One Gaussian Euler–Maruyama step of one field, for any :class:`Parametrisation`.

    ``noise`` is :math:`\\sigma(t)` of the policy; ``reference_noise`` that of the KL reference (default: the same
    schedule, or a frozen copy of its initial state when it is learnable, so the reference does not move).
    Registered as a module so learnable schedules reach the optimiser through ``parameters()``.

    Shapes: ``pos`` actions are (N,3) (scale variant: (B,)), ``cell`` actions (B,3,3) (scale: (B,)). Log-prob,
    KL and entropy are per action element; :mod:`crystalign.rl.objective` aggregates them.
    """

    def __init__(
        self,
        field: str,
        parametrisation: Parametrisation,
        noise: NoiseSchedule,
        reference_noise: NoiseSchedule | None = None,
    ) -> None:
        super().__init__()
        _check_field(field)
        self.field = field
        self.parametrisation = parametrisation
        self.noise = noise
        if reference_noise is None:
            reference_noise = noise
            if noise.learnable:
                reference_noise = copy.deepcopy(noise)
        if reference_noise is not noise:
            reference_noise.requires_grad_(False)
        self.reference_noise = reference_noise

    # -- helpers -------------------------------------------------------------------------------------------------
    @property
    def per_atom(self) -> bool:
        """Whether field elements are indexed by atom (positions)."""
        return self.field == "pos"

    @property
    def periodic(self) -> bool:
        return self.field == "pos"

    @property
    def per_atom_action(self) -> bool:
        """Whether the action's first dimension runs over atoms (else over structures)."""
        return self.per_atom and not self.parametrisation.per_structure_action

    def unit_batch(self, step: Step) -> torch.Tensor | None:
        """Structure index of the action's first dimension, as :mod:`~crystalign.rl.objective` expects it:
        ``step.batch`` for per-atom actions, None when the action is already per structure."""
        return step.batch if self.per_atom_action else None

    def sigma(self, step: Step) -> torch.Tensor:
        """Policy noise level per structure (B,), at the left time."""
        return self.noise(step.t)

    def sigma_ref(self, step: Step) -> torch.Tensor:
        """Reference noise level per structure (B,)."""
        return self.reference_noise(step.t)

    def _expand(self, value: torch.Tensor, step: Step, like: torch.Tensor) -> torch.Tensor:
        return step.per_element(value, like, self.per_atom_action)

    # -- means ---------------------------------------------------------------------------------------------------
    def mean(self, step: Step, out: FieldOutputs, ref: FieldOutputs) -> torch.Tensor:
        """Action mean :math:`\\mu_\\theta` under the policy outputs ``out`` (gradients flow through ``out``)."""
        return self.parametrisation.mean(out, ref, self.sigma(step), step, self.field)

    def reference_mean(self, step: Step, ref: FieldOutputs) -> torch.Tensor:
        return self.parametrisation.reference_mean(ref, self.sigma_ref(step), step, self.field)

    # -- rollout -------------------------------------------------------------------------------------------------
    def sample_action(
        self,
        step: Step,
        out: FieldOutputs,
        ref: FieldOutputs,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Draw :math:`a = \\mu_\\text{old} + \\sigma\\sqrt{\\Delta t}\\,\\xi`; return ``(action, logp_old)``, detached.

        ``logp_old`` is per element and computed by :func:`log_prob` itself, so re-evaluating it with the same
        parameters reproduces it bit for bit (PPO ratio exactly 1 in the first epoch). With a zero noise
        schedule the action is the mean and ``logp_old`` is None.
        """
        with torch.no_grad():
            mean = self.mean(step, out, ref)
            if self.noise.is_zero:
                return mean, None
            sigma = self._expand(self.sigma(step), step, mean)
            dt = self._expand(step.dt, step, mean)
            xi = randn_on(mean.shape, generator, like=mean)
            action = mean + sigma * torch.sqrt(dt) * xi
            return action, log_prob(action, mean, sigma, dt)

    def next_state(self, x: torch.Tensor, action: torch.Tensor, step: Step, ref: FieldOutputs) -> torch.Tensor:
        """:math:`x' = \\operatorname{wrap}(x + \\delta(a))` for positions, :math:`x + \\delta(a)` for the cell."""
        x_next = x + self.parametrisation.displacement(action, ref, step, self.field)
        return wrap(x_next) if self.periodic else x_next

    def advance(
        self,
        x: torch.Tensor,
        step: Step,
        out: FieldOutputs,
        ref: FieldOutputs,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """:meth:`sample_action` then :meth:`next_state`: returns ``(x_next, action, logp_old)``."""
        action, logp = self.sample_action(step, out, ref, generator)
        return self.next_state(x, action, step, ref), action, logp

    # -- update --------------------------------------------------------------------------------------------------
    def log_prob(self, action: torch.Tensor, step: Step, out: FieldOutputs, ref: FieldOutputs) -> torch.Tensor:
        """Per-element :math:`\\log\\pi_\\theta(a\\mid x)` of a stored action; differentiable in ``out`` and sigma."""
        if self.noise.is_zero:
            raise ValueError("a zero noise schedule is deterministic: there is no log-prob to train on")
        mean = self.mean(step, out, ref)
        return log_prob(action, mean, self._expand(self.sigma(step), step, mean), self._expand(step.dt, step, mean))

    def kl_to_reference(self, step: Step, out: FieldOutputs, ref: FieldOutputs) -> torch.Tensor:
        """Per-element closed-form :math:`\\mathrm{KL}(\\pi_\\theta\\,\\|\\,\\pi_\\text{ref})` at the visited state."""
        if self.noise.is_zero or self.reference_noise.is_zero:
            raise ValueError("the KL to the reference needs non-zero policy and reference noise")
        mean = self.mean(step, out, ref)
        mean_ref = self.reference_mean(step, ref)
        sigma = self._expand(self.sigma(step), step, mean)
        sigma_ref = self._expand(self.sigma_ref(step), step, mean)
        return kl_divergence(mean, sigma, mean_ref, sigma_ref, self._expand(step.dt, step, mean))

    def entropy(self, step: Step, like: torch.Tensor) -> torch.Tensor:
        """Per-element entropy :math:`\\tfrac12\\ln(2\\pi e\\sigma^2\\Delta t)`, shaped like the action ``like``."""
        sigma = self._expand(self.sigma(step), step, like)
        return entropy(sigma, self._expand(step.dt, step, like)).expand_as(like)


def annealed_speed(step: Step, anneal: float, anneal_cap: float | None) -> torch.Tensor | float:
    """The base sampler's velocity multiplier at ``step``: 1 + s t, capped (1 without annealing)."""
    return cap_speed(1.0 + anneal * step.t, step.t, step.dt, anneal_cap) if anneal else 1.0


def euler_step(
    x: torch.Tensor, b: torch.Tensor, step: Step, field: str, anneal: float = 0.0, anneal_cap: float | None = None
) -> torch.Tensor:
    """Noise-free Euler step :math:`x + (1 + s\\,t)\\,b\\,\\Delta t` (wrapped for positions): how a disabled field
    moves (``anneal`` = s, the base sampler's velocity annealing of the field, bounded by ``anneal_cap``)."""
    _check_field(field)
    speed_dt = annealed_speed(step, anneal, anneal_cap) * step.dt
    x_next = x + step.per_element(speed_dt, b, field == "pos") * b
    return wrap(x_next) if field == "pos" else x_next


def make_transition(
    variant: str,
    field: str,
    noise: NoiseSchedule | Mapping[str, Any],
    reference_noise: NoiseSchedule | Mapping[str, Any] | None = None,
    gamma: Callable[[torch.Tensor], torch.Tensor] | Any | None = None,
    scale_model: ScaleMLP | None = None,
    anneal: float = 0.0,
    anneal_cap: float | None = None,
) -> GaussianTransition:
    """Build the transition of one field for ``variant`` in :data:`VARIANTS`.

    ``gamma`` (base interpolant's :math:`\\gamma`) is required by ``score``; ``scale_model`` (frozen, pre-learned
    :math:`s(t)`) by ``scaled_velocity``; ``anneal`` (constant velocity annealing s, speed 1 + s t, bounded by
    ``anneal_cap``) is used by ``velocity`` only (:class:`~crystalign.rl.config.RLConfig` refuses it with the others). Noise schedules may be
    given as config dicts.
    """
    if variant == "velocity":
        param: Parametrisation = Velocity(anneal, anneal_cap)
    elif variant == "scaled_velocity":
        if scale_model is None:
            raise ValueError("the scaled_velocity variant needs a (pre-learned) scale_model")
        param = ScaledVelocity(scale_model)
    elif variant == "score":
        if gamma is None:
            raise ValueError("the score variant needs the base interpolant's gamma(t)")
        param = Score(gamma)
    elif variant == "scale":
        param = Scale()
    else:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    noise = build_noise_schedule(noise, where=f"{field}.noise")
    if reference_noise is not None:
        reference_noise = build_noise_schedule(reference_noise, where=f"{field}.reference_noise")
    return GaussianTransition(field, param, noise, reference_noise)
