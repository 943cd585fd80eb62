r"""Stochastic interpolants per data field: samples :math:`x_t`, velocity targets and the b / η losses.

For one field (fractional positions or the lattice matrix)

.. math::
    x_t = \alpha(t)\,x_0 + \beta(t)\,x_1 + \gamma(t)\,z,\qquad z \sim \mathcal N(0, I),\qquad
    v = \dot\alpha\,x_0 + \dot\beta\,x_1 + \dot\gamma\,z .

On the torus (``periodic=True``) the pair is first made minimum-image, :math:`x_0' = \mathrm{wrap}(x_0)`,
:math:`x_1' = \mathrm{unwrap}(x_0', x_1)`, the interpolant is built from :math:`(x_0', x_1')` and wrapped back to
:math:`[0, 1)`; :math:`v` is computed on the unwrapped pair, so for the linear path it is the shortest displacement.

The velocity :math:`b(t, x) = \mathbb E[v \mid x_t = x]` and the denoiser :math:`\eta(t, x) = \mathbb E[z \mid x_t = x]`
are learned by minimising (:math:`\bar{\mathbb E}` = mean over all elements of the field tensor)

.. math::
    L_b = \bar{\mathbb E}\big[b^2 - 2\,b\cdot v\big],\qquad L_\eta = \bar{\mathbb E}\big[\eta^2 - 2\,\eta\cdot z\big],

or, when :math:`\dot\gamma` is singular at the ends, with antithetic pairs :math:`x_t^\pm = I \pm \gamma z`,
:math:`v^\pm = \dot I \pm \dot\gamma z`:

.. math::
    L_b = \tfrac12\bar{\mathbb E}[(b^+)^2] + \tfrac12\bar{\mathbb E}[(b^-)^2]
          - \bar{\mathbb E}[b^+ v^+] - \bar{\mathbb E}[b^- v^-],\qquad b^\pm = b(t, x_t^\pm).

Every branch is minimised at the conditional expectation of its target (factor 2 everywhere, including the
non-antithetic SDE branch).

Example::

    pos = FieldInterpolant(TrigonometricPath(), LatentGammaSqrt(0.0492), VanishingEpsilon(9.4), periodic=True,
                           correct_com=True, ode=False)
    sample = pos.interpolate(t[batch].unsqueeze(-1), x0.frac, x1.frac, batch=batch, num_structures=B)
    loss = pos.b_loss(model_b(sample.x_t), sample, model_b(sample.x_t_minus))
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Mapping

import torch

from crystalign.config import ConfigError
from crystalign.geometry import unwrap, wrap
from crystalign.interpolants.epsilon import ConstantEpsilon, Epsilon, VanishingEpsilon
from crystalign.interpolants.gamma import Gamma, LatentGammaEncoderDecoder, LatentGammaSqrt, NoGamma
from crystalign.interpolants.paths import (
    EncoderDecoderPath,
    InterpolationPath,
    LinearPath,
    MirrorPath,
    PathCoefficients,
    TrigonometricPath,
)
from crystalign.ops import randn_on, scatter_mean

if TYPE_CHECKING:  # pragma: no cover
    from crystalign.crystal import CrystalBatch
    from crystalign.interpolants.species import MaskedSpecies

__all__ = [
    "SMALL_TIME",
    "BIG_TIME",
    "LOSS_KEYS",
    "FIELDS",
    "InterpolantSample",
    "FieldInterpolant",
    "Interpolants",
    "sample_times",
    "time_grid",
    "field_from_config",
]

#: Training and integration times are confined to [SMALL_TIME, BIG_TIME]: γ̇, ε/γ and some path derivatives
#: are singular at the ends.
SMALL_TIME = 1e-3
BIG_TIME = 0.999

#: Continuous fields of a CSP crystal, in model-output order.
FIELDS = ("pos", "cell")
#: Loss keys of the base model; ``<field>_b`` is the velocity loss, ``<field>_eta`` the denoiser loss, ``species``
#: the cross-entropy of the species logits (DNG models only).
LOSS_KEYS = ("pos_b", "pos_eta", "cell_b", "cell_eta", "species")


# ---------------------------------------------------------------------------------------------- times
def sample_times(
    num: int,
    method: Literal["uniform", "sobol"] = "uniform",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``num`` training times in [SMALL_TIME, BIG_TIME], one per structure.

    ``"sobol"`` draws a scrambled 1-D Sobol sequence (lower variance of the batch loss than i.i.d. uniform);
    its scrambling seed comes from ``generator``, so both methods are reproducible from one generator.
    """
    dtype = dtype or torch.get_default_dtype()
    gen_device = generator.device if generator is not None else torch.device("cpu")
    if method == "uniform":
        u = torch.rand(num, generator=generator, device=gen_device, dtype=dtype)
    elif method == "sobol":
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=gen_device))
        engine = torch.quasirandom.SobolEngine(dimension=1, scramble=True, seed=seed)
        u = engine.draw(num, dtype=torch.float64).reshape(num).to(dtype)
    else:
        raise ValueError(f"unknown time sampling method {method!r}; use 'uniform' or 'sobol'")
    return (SMALL_TIME + (BIG_TIME - SMALL_TIME) * u).to(device if device is not None else gen_device)


def time_grid(
    num_points: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Integration grid ``linspace(SMALL_TIME, BIG_TIME, num_points)`` (``num_points - 1`` steps)."""
    if num_points < 2:
        raise ValueError(f"an integration grid needs at least 2 points, got {num_points}")
    return torch.linspace(SMALL_TIME, BIG_TIME, num_points, device=device, dtype=dtype or torch.get_default_dtype())


# ---------------------------------------------------------------------------------------------- one field
@dataclass
class InterpolantSample:
    """Everything the losses need from one interpolation of one field.

    ``x0``/``x1`` are the pair the path was applied to (minimum-image on the torus), ``x_t`` the state the
    model sees and ``v_plus`` its velocity target (COM-corrected when requested). ``x_t_minus``/``v_minus``
    are the antithetic partners, present only when the interpolant requires them; ``z`` is ``None`` when the
    interpolant has no latent noise.
    """

    t: torch.Tensor
    x0: torch.Tensor
    x1: torch.Tensor
    x_t: torch.Tensor
    v_plus: torch.Tensor
    z: torch.Tensor | None = None
    x_t_minus: torch.Tensor | None = None
    v_minus: torch.Tensor | None = None

    @property
    def antithetic(self) -> bool:
        return self.x_t_minus is not None

    @property
    def xt(self) -> torch.Tensor:
        """Shorthand for ``x_t``."""
        return self.x_t

    @property
    def xt_minus(self) -> torch.Tensor | None:
        """Shorthand for ``x_t_minus``."""
        return self.x_t_minus


def _expand_time(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Append singleton dims so that a per-row time (R,) broadcasts against x (R, ...)."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.dim() > x.dim():
        raise ValueError(f"time of shape {tuple(t.shape)} has more dims than the field {tuple(x.shape)}")
    return t.reshape(*t.shape, *([1] * (x.dim() - t.dim())))


def _mean_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).mean()


class FieldInterpolant:
    """The stochastic interpolant of one continuous field (positions or lattice).

    Args:
        path: :math:`\\alpha, \\beta` schedule.
        gamma: latent noise scale; ``None`` means :class:`NoGamma`.
        epsilon: SDE diffusion coefficient; required for an SDE field, forbidden for an ODE field.
        periodic: interpolate on the unit torus (fractional coordinates).
        correct_com: subtract the per-structure mean of the velocity target (positions: the network cannot
            represent a rigid drift, it only sees fractional differences).
        ode: ``False`` makes the field an SDE field: it trains a denoiser η and samples with
            :math:`dx = [b - (\\varepsilon/\\gamma)\\eta]dt + \\sqrt{2\\varepsilon}\\,dW`.
    """

    def __init__(
        self,
        path: InterpolationPath,
        gamma: Gamma | None = None,
        epsilon: Epsilon | None = None,
        periodic: bool = False,
        correct_com: bool = False,
        ode: bool = True,
    ) -> None:
        if not isinstance(path, InterpolationPath):
            raise TypeError(f"path must be an InterpolationPath, got {type(path).__name__}")
        gamma = NoGamma() if gamma is None else gamma
        if not isinstance(gamma, Gamma):
            raise TypeError(f"gamma must be a Gamma, got {type(gamma).__name__}")
        if epsilon is not None and not isinstance(epsilon, Epsilon):
            raise TypeError(f"epsilon must be an Epsilon, got {type(epsilon).__name__}")
        if ode and epsilon is not None:
            raise ValueError("epsilon is only used by an SDE field; drop it or set ode=False")
        if not ode:
            if gamma.is_zero:
                raise ValueError("an SDE field needs a non-zero gamma (the denoiser drift is (epsilon/gamma)*eta)")
            if epsilon is None:
                raise ValueError("an SDE field needs an epsilon (diffusion coefficient)")
        if isinstance(path, EncoderDecoderPath) and gamma.is_zero:
            # alpha(s) = beta(s) = 0: without noise every x_t collapses to 0 at the switch time
            raise ValueError("the encoder-decoder path needs a non-zero gamma")
        self.path = path
        self._gamma = gamma
        self._epsilon = epsilon
        self._periodic = bool(periodic)
        self.correct_com = bool(correct_com)
        self.ode = bool(ode)

    # ------------------------------------------------------------------ accessors for samplers
    @property
    def periodic(self) -> bool:
        return self._periodic

    @property
    def requires_antithetic(self) -> bool:
        return self._gamma.requires_antithetic

    @property
    def uses_denoiser(self) -> bool:
        """True for an SDE field: a denoiser η is trained and used in the drift."""
        return not self.ode

    @property
    def gamma_schedule(self) -> Gamma:
        return self._gamma

    @property
    def epsilon_schedule(self) -> Epsilon | None:
        return self._epsilon

    def gamma(self, t: torch.Tensor) -> torch.Tensor:
        """:math:`\\gamma(t)` (zeros without latent noise)."""
        return self._gamma.gamma(t)

    def epsilon(self, t: torch.Tensor) -> torch.Tensor:
        """:math:`\\varepsilon(t)` (zeros for an ODE field)."""
        return torch.zeros_like(t) if self._epsilon is None else self._epsilon(t)

    def coefficients(self, t: torch.Tensor) -> PathCoefficients:
        return self.path(t)

    def correct(self, x: torch.Tensor) -> torch.Tensor:
        """Map a state back onto the field's domain: wrap on the torus, identity otherwise."""
        return wrap(x) if self._periodic else x

    # ------------------------------------------------------------------ interpolation
    def interpolate(
        self,
        t: torch.Tensor,
        x0: torch.Tensor,
        x1: torch.Tensor,
        z: torch.Tensor | None = None,
        batch: torch.Tensor | None = None,
        num_structures: int | None = None,
        generator: torch.Generator | None = None,
    ) -> InterpolantSample:
        """Draw :math:`x_t` (and :math:`x_t^-`) with velocity targets.

        Args:
            t: per-row times, shape (R,) or broadcastable to ``x0`` (the caller expands per-structure times to
                atoms, e.g. ``t[batch]``).
            x0, x1: base and data samples of equal shape (R, ...).
            z: latent noise; drawn from ``generator`` when ``None`` and the interpolant has a gamma.
            batch: (R,) structure index of each row, required with ``correct_com``.
            num_structures: number of structures (defaults to ``batch.max() + 1``).
        """
        if x0.shape != x1.shape:
            raise ValueError(f"x0 {tuple(x0.shape)} and x1 {tuple(x1.shape)} differ in shape")
        t = _expand_time(t, x0)
        if self._periodic:
            x0 = wrap(x0)
            x1 = unwrap(x0, x1)
        c = self.path(t)
        mean = c.alpha * x0 + c.beta * x1
        d_mean = c.d_alpha * x0 + c.d_beta * x1
        x_t_minus = v_minus = None
        if self._gamma.is_zero:
            z = None
            x_t, v_plus = mean, d_mean
        else:
            if z is None:
                z = randn_on(x0.shape, generator, like=x0)
            elif z.shape != x0.shape:
                raise ValueError(f"z {tuple(z.shape)} must have the shape of x0 {tuple(x0.shape)}")
            g, dg = self._gamma(t)
            x_t, v_plus = mean + g * z, d_mean + dg * z
            if self.requires_antithetic:
                x_t_minus, v_minus = mean - g * z, d_mean - dg * z
        if self.correct_com:
            v_plus = self._remove_com(v_plus, batch, num_structures)
            if v_minus is not None:
                v_minus = self._remove_com(v_minus, batch, num_structures)
        return InterpolantSample(
            t=t,
            x0=x0,
            x1=x1,
            x_t=self.correct(x_t),
            v_plus=v_plus,
            z=z,
            x_t_minus=None if x_t_minus is None else self.correct(x_t_minus),
            v_minus=v_minus,
        )

    @staticmethod
    def _remove_com(v: torch.Tensor, batch: torch.Tensor | None, num_structures: int | None) -> torch.Tensor:
        if batch is None:
            raise ValueError("correct_com needs the structure index `batch` of every row")
        if batch.shape[0] != v.shape[0]:
            raise ValueError(f"batch has {batch.shape[0]} rows, the field {v.shape[0]}")
        n = int(batch.max()) + 1 if num_structures is None else int(num_structures)
        return v - scatter_mean(v, batch, n)[batch]

    # ------------------------------------------------------------------ losses
    def b_loss(
        self, b_plus: torch.Tensor, sample: InterpolantSample, b_minus: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Velocity loss; ``b_plus = b(t, x_t)``, ``b_minus = b(t, x_t^-)`` (antithetic only).

        Non-antithetic: :math:`\\bar E[b^2 - 2 b v]`. Antithetic:
        :math:`\\tfrac12\\bar E[(b^+)^2] + \\tfrac12\\bar E[(b^-)^2] - \\bar E[b^+v^+] - \\bar E[b^-v^-]`.
        """
        _check_shape("b_plus", b_plus, sample.v_plus)
        if sample.antithetic:
            if b_minus is None:
                raise ValueError("this interpolant is antithetic: pass b_minus = b(t, sample.x_t_minus)")
            _check_shape("b_minus", b_minus, sample.v_minus)
            return (
                0.5 * (b_plus * b_plus).mean()
                + 0.5 * (b_minus * b_minus).mean()
                - _mean_dot(b_plus, sample.v_plus)
                - _mean_dot(b_minus, sample.v_minus)
            )
        if b_minus is not None:
            raise ValueError("b_minus given, but this sample has no antithetic partner")
        return (b_plus * b_plus - 2.0 * b_plus * sample.v_plus).mean()

    def eta_loss(self, eta: torch.Tensor, sample: InterpolantSample) -> torch.Tensor:
        """Denoiser loss :math:`\\bar E[\\eta^2 - 2\\eta z]` at :math:`x_t^+`; minimised at :math:`E[z \\mid x_t]`."""
        if sample.z is None:
            raise ValueError("the denoiser loss needs latent noise z; this interpolant has no gamma")
        _check_shape("eta", eta, sample.z)
        return (eta * eta - 2.0 * eta * sample.z).mean()

    # ------------------------------------------------------------------ config
    def to_config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {"path": self.path.to_config(), "periodic": self._periodic}
        if not self._gamma.is_zero:
            cfg["gamma"] = self._gamma.to_config()
        if self._epsilon is not None:
            cfg["epsilon"] = self._epsilon.to_config()
        cfg["sde"] = not self.ode
        cfg["correct_com"] = self.correct_com
        return cfg

    def __repr__(self) -> str:
        return (
            f"FieldInterpolant(path={self.path!r}, gamma={self._gamma!r}, epsilon={self._epsilon!r}, "
            f"periodic={self._periodic}, correct_com={self.correct_com}, ode={self.ode})"
        )


def _check_shape(name: str, pred: torch.Tensor, target: torch.Tensor | None) -> None:
    if target is None or pred.shape != target.shape:
        raise ValueError(f"{name} has shape {tuple(pred.shape)}, expected {None if target is None else tuple(target.shape)}")


# ---------------------------------------------------------------------------------------------- bundle
class Interpolants:
    """The position and lattice interpolants of a model with the relative cost of every loss, and for de novo
    (DNG) models the masked species flow (:class:`~crystalign.interpolants.species.MaskedSpecies`).

    ``relative_costs`` maps loss keys (:data:`LOSS_KEYS`) to weights >= 0. Every active loss (``<field>_b``
    always, ``<field>_eta`` for SDE fields) needs a cost; use 0 to switch one off. The costs are relative: they
    are normalised to sum to 1 (as the method requires), so the loss scale, and with it gradient clipping, does
    not depend on how they are written. Without costs the active losses share the weight equally.

    Example::

        si = Interpolants.from_config({"pos": {"path": "trig", "periodic": True}, "cell": {"path": "linear"}})
        samples = si.interpolate(t, x0, x1)           # x0, x1: CrystalBatch; t: (B,)
        total = si.total_loss(si.losses(samples, b_plus={"pos": bp, "cell": bc}))
    """

    def __init__(
        self,
        pos: FieldInterpolant,
        cell: FieldInterpolant,
        relative_costs: Mapping[str, float] | None = None,
        species: "MaskedSpecies | None" = None,
    ) -> None:
        self.pos = pos
        self.cell = cell
        #: the species flow of a DNG model; None for CSP (species given)
        self.species = species
        active = self.active_loss_keys
        if relative_costs is None:
            relative_costs = {key: 1.0 for key in active}  # normalised below
        self.relative_costs = _validate_costs(relative_costs, active)

    @property
    def fields(self) -> dict[str, FieldInterpolant]:
        return {"pos": self.pos, "cell": self.cell}

    def __getitem__(self, name: str) -> FieldInterpolant:
        """``interpolants["pos"]`` / ``interpolants["cell"]``."""
        if name not in FIELDS:
            raise KeyError(f"unknown field {name!r}; fields: {', '.join(FIELDS)}")
        return self.fields[name]

    @property
    def active_loss_keys(self) -> tuple[str, ...]:
        keys = []
        for name, field in self.fields.items():
            keys.append(f"{name}_b")
            if field.uses_denoiser:
                keys.append(f"{name}_eta")
        if self.species is not None:
            keys.append("species")
        return tuple(keys)

    @property
    def needs_minus_pass(self) -> bool:
        """Whether training needs a second model call at the antithetic states."""
        return any(f.requires_antithetic for f in self.fields.values())

    def interpolate(
        self,
        t: torch.Tensor,
        x0: "CrystalBatch",
        x1: "CrystalBatch",
        generator: torch.Generator | None = None,
    ) -> dict[str, InterpolantSample]:
        """Interpolate positions and lattices of two batches with equal atom counts; ``t`` is (B,)."""
        if not torch.equal(x0.n_atoms, x1.n_atoms):
            raise ValueError("x0 and x1 must have the same atom counts per structure")
        if t.shape != (x1.num_structures,):
            raise ValueError(f"t must have shape ({x1.num_structures},), one time per structure, got {tuple(t.shape)}")
        return {
            "pos": self.pos.interpolate(
                t[x1.batch], x0.frac, x1.frac, batch=x1.batch, num_structures=x1.num_structures, generator=generator
            ),
            "cell": self.cell.interpolate(t, x0.lattice, x1.lattice, generator=generator),
        }

    @staticmethod
    def minus_states(samples: Mapping[str, InterpolantSample]) -> dict[str, torch.Tensor]:
        """Inputs of the antithetic model call: ``x_t^-`` where a field has one, ``x_t`` otherwise."""
        return {k: (s.x_t_minus if s.antithetic else s.x_t) for k, s in samples.items()}

    def losses(
        self,
        samples: Mapping[str, InterpolantSample],
        b_plus: Mapping[str, torch.Tensor],
        eta: Mapping[str, torch.Tensor] | None = None,
        b_minus: Mapping[str, torch.Tensor] | None = None,
        species: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-key losses ``{"pos_b": ..., "pos_eta": ..., "cell_b": ...}`` for the active keys; a DNG model
        passes ``species=(logits, data species)``."""
        out = {}
        if self.species is not None:
            if species is None:
                raise ValueError("a DNG model trains its species: pass species=(logits, data species)")
            out["species"] = self.species.loss(*species)
        for name, field in self.fields.items():
            sample = samples[name]
            minus = b_minus.get(name) if (b_minus is not None and sample.antithetic) else None
            out[f"{name}_b"] = field.b_loss(b_plus[name], sample, minus)
            if field.uses_denoiser:
                if eta is None or name not in eta:
                    raise ValueError(f"{name} is an SDE field: pass its denoiser output in eta[{name!r}]")
                out[f"{name}_eta"] = field.eta_loss(eta[name], sample)
        return out

    def total_loss(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """:math:`\\sum_k c_k L_k` over the active keys."""
        missing = [k for k in self.active_loss_keys if k not in losses]
        if missing:
            raise ValueError(f"missing losses for {missing}")
        unknown = sorted(set(losses) - set(self.active_loss_keys))
        if unknown:
            raise ValueError(f"losses {unknown} are not active for these interpolants ({self.active_loss_keys})")
        return sum(self.relative_costs[k] * losses[k] for k in self.active_loss_keys)  # type: ignore[return-value]

    # ------------------------------------------------------------------ config
    @classmethod
    def from_config(cls, config: Mapping[str, Any], where: str = "interpolants") -> "Interpolants":
        """Build from a config mapping; every error names the offending key.

        Schema (``pos`` required; a missing ``cell`` means a plain linear ODE lattice)::

            pos / cell:
              path: linear | trig | encoder_decoder | mirror      # or {kind: encoder_decoder, switch_time, power}
              periodic: true for pos (the torus; the default), false for cell
              gamma: null | {kind: sqrt, a} | {kind: encoder_decoder, a, switch_time, power} | none
              epsilon: null | {kind: constant, c} | {kind: vanishing, c, mu, sigma}   # SDE fields only
              sde: false               # true: train a denoiser, sample with the SDE
              correct_com: false       # remove the per-structure mean of the velocity target
            species: {kind: mask, noise: 0.1}   # DNG models only: masked discrete flow matching of the species
            relative_costs: {pos_b, pos_eta, cell_b, cell_eta, species}   # optional, >= 0, active keys required
        """
        if not isinstance(config, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {type(config).__name__}")
        _reject_unknown(config, ("pos", "cell", "species", "relative_costs"), where)
        if "pos" not in config:
            raise ConfigError(f"{where}: missing required key 'pos'")
        pos_cfg = config["pos"]
        if isinstance(pos_cfg, Mapping):
            pos_cfg = {"periodic": True, **pos_cfg}  # fractional coordinates live on the torus
        pos = field_from_config(pos_cfg, f"{where}.pos")
        cell = field_from_config(config.get("cell", {"path": "linear"}), f"{where}.cell")
        # the samplers wrap positions after every step and never the lattice: the training paths must agree
        if not pos.periodic:
            raise ConfigError(f"{where}.pos.periodic: must be true (fractional coordinates are periodic; samplers wrap them)")
        if cell.periodic:
            raise ConfigError(f"{where}.cell.periodic: must be false (lattice vectors are not periodic)")
        costs = config.get("relative_costs")
        if costs is not None and not isinstance(costs, Mapping):
            raise ConfigError(f"{where}.relative_costs: expected a mapping, got {type(costs).__name__}")
        species = None
        if config.get("species") is not None:
            from crystalign.interpolants.species import MaskedSpecies

            species = MaskedSpecies.from_config(config["species"], f"{where}.species")
        try:
            return cls(pos, cell, costs, species=species)
        except ValueError as err:
            raise ConfigError(f"{where}.relative_costs: {err}") from None

    def to_config(self) -> dict[str, Any]:
        out = {"pos": self.pos.to_config(), "cell": self.cell.to_config(), "relative_costs": dict(self.relative_costs)}
        if self.species is not None:
            out["species"] = self.species.to_config()
        return out

    def __repr__(self) -> str:
        extra = f", species={self.species!r}" if self.species is not None else ""
        return f"Interpolants(pos={self.pos!r}, cell={self.cell!r}, relative_costs={self.relative_costs}{extra})"


def _validate_costs(costs: Mapping[str, Any], active: tuple[str, ...]) -> dict[str, float]:
    unknown = sorted(set(costs) - set(LOSS_KEYS))
    if unknown:
        raise ValueError(f"unknown loss key(s) {unknown}; allowed: {list(LOSS_KEYS)}")
    out = {}
    for key, value in costs.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"cost of {key!r} must be a finite number >= 0, got {value!r}")
        if key not in active and value != 0:
            why = "only DNG models train species" if key == "species" else "only SDE fields train eta"
            raise ValueError(f"{key!r} has cost {value} but that loss is not active ({why})")
        out[key] = float(value)
    missing = [k for k in active if k not in out]
    if missing:
        raise ValueError(f"no cost for active loss(es) {missing}; give each one (0 switches it off)")
    total = sum(out.values())
    if total <= 0:
        raise ValueError("all relative costs are zero")
    return {key: value / total for key, value in out.items()}


# ---------------------------------------------------------------------------------------------- config parsing
_PATHS: dict[str, type[InterpolationPath]] = {
    "linear": LinearPath,
    "trig": TrigonometricPath,
    "trigonometric": TrigonometricPath,
    "encoder_decoder": EncoderDecoderPath,
    "encdec": EncoderDecoderPath,
    "mirror": MirrorPath,
}
_GAMMAS: dict[str, type[Gamma]] = {
    "none": NoGamma,
    "sqrt": LatentGammaSqrt,
    "encoder_decoder": LatentGammaEncoderDecoder,
    "encdec": LatentGammaEncoderDecoder,
}
_EPSILONS: dict[str, type[Epsilon]] = {"constant": ConstantEpsilon, "vanishing": VanishingEpsilon}
_FIELD_KEYS = ("path", "periodic", "gamma", "epsilon", "sde", "correct_com")


def _reject_unknown(mapping: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(mapping) - set(allowed))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(allowed)}")


def _build(registry: Mapping[str, type], spec: Any, where: str) -> Any:
    """``"kind"`` or ``{"kind": ..., **params}`` -> instance, checking names and numeric types."""
    if isinstance(spec, str):
        spec = {"kind": spec}
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{where}: expected a name or a mapping with 'kind', got {type(spec).__name__}")
    if "kind" not in spec:
        raise ConfigError(f"{where}: missing 'kind' (one of {', '.join(registry)})")
    kind = spec["kind"]
    if kind not in registry:
        raise ConfigError(f"{where}.kind: unknown {kind!r}; allowed: {', '.join(registry)}")
    cls = registry[kind]
    params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    kwargs = {k: v for k, v in spec.items() if k != "kind"}
    _reject_unknown(kwargs, tuple(params), f"{where} ({kind})")
    for key, value in kwargs.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}.{key}: expected a number, got {type(value).__name__} {value!r}")
    try:
        return cls(**{k: float(v) for k, v in kwargs.items()})
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None


def field_from_config(config: Mapping[str, Any], where: str = "field") -> FieldInterpolant:
    """One :class:`FieldInterpolant` from a field config (schema: :meth:`Interpolants.from_config`)."""
    if not isinstance(config, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(config).__name__}")
    _reject_unknown(config, _FIELD_KEYS, where)
    if "path" not in config:
        raise ConfigError(f"{where}: missing required key 'path' (one of {', '.join(_PATHS)})")
    for key in ("periodic", "sde", "correct_com"):
        if key in config and not isinstance(config[key], bool):
            raise ConfigError(f"{where}.{key}: expected true/false, got {config[key]!r}")
    path = _build(_PATHS, config["path"], f"{where}.path")
    gamma = None if config.get("gamma") is None else _build(_GAMMAS, config["gamma"], f"{where}.gamma")
    epsilon = None if config.get("epsilon") is None else _build(_EPSILONS, config["epsilon"], f"{where}.epsilon")
    sde = config.get("sde", False)
    try:
        return FieldInterpolant(
            path,
            gamma=gamma,
            epsilon=epsilon,
            periodic=config.get("periodic", False),
            correct_com=config.get("correct_com", False),
            ode=not sde,
        )
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None
