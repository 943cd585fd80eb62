r"""GRPO advantages, the PPO clipped surrogate, per-structure aggregation and the per-timestep loss.

Everything here is per timestep :math:`k` of a stored trajectory; the loop accumulates
``backward(loss_k / K)`` over the :math:`K` steps and takes one optimiser step per PPO epoch.

**GRPO.** Rewards of a group (the :math:`G` contiguous copies of one structure) are standardised with the
population std: :math:`A_i = (R_i - \bar R_g) / (\operatorname{std}_g(R) + \epsilon)`, the same at every step.

**PPO.** With :math:`r = \exp(\log\pi_\theta - \log\pi_\text{old})` the loss per sample is
:math:`-\min(rA,\ \operatorname{clip}(r, 1-\epsilon, 1+\epsilon)A)`. Logged, as in cleanrl:
``clip_fraction`` = mean of :math:`[|r-1| > \epsilon]`, ``approx_kl`` = mean of :math:`(r-1) - \ln r`
(an unbiased, non-negative estimator of :math:`\mathrm{KL}(\pi_\text{old}\|\pi_\theta)`), ``ratio_mean``.

**Position normalisation** (positions only; cell and per-structure actions are always joint). With
:math:`\Delta_{ia} = \sum_{xyz}(\log\pi_\theta - \log\pi_\text{old})` for atom :math:`a` of structure :math:`i`:

* ``none``: joint ratio :math:`r_i = \exp\sum_a \Delta_{ia}`, loss :math:`\operatorname{mean}_i \ell(r_i, A_i)`;
  KL and entropy summed over atoms, mean over structures
* ``per_structure_weight``: joint ratio, loss :math:`\operatorname{mean}_i \ell(r_i, A_i/N_i)`;
  KL and entropy averaged over atoms, mean over structures
* ``per_atom_surrogate``: per-atom ratio :math:`r_{ia} = \exp\Delta_{ia}`, loss
  :math:`\operatorname{mean}_i \operatorname{mean}_a \ell(r_{ia}, A_i)`; KL and entropy averaged over atoms, mean over
  structures

where :math:`\ell(r, A) = -\min(rA, \operatorname{clip}(r, 1-\epsilon, 1+\epsilon)A)`. With one atom per
structure all three coincide. Per-element tensors enter with their first dimension over "units" (atoms, or
structures when ``batch`` is None) and their trailing dimensions (xyz, 3×3) summed.

Example::

    adv = group_advantages(rewards, group_size=64)
    terms, stats = field_loss_terms("pos", logp_new, logp_old, adv, clip_eps=0.2, batch=step.batch,
                                    mode="per_atom_surrogate", kl=kl)
    loss, stats = timestep_loss(terms, {"pos_policy": 2.37, "pos_regularization": 1e-3})
"""

from __future__ import annotations

from typing import Literal, Mapping

import torch

from crystalign.ops import scatter_mean, scatter_sum

__all__ = [
    "POSITION_NORMALIZATIONS",
    "COST_FIELDS",
    "COST_KINDS",
    "group_advantages",
    "ppo_clip_loss",
    "policy_loss",
    "reduce_per_structure",
    "denoiser_distillation",
    "field_loss_terms",
    "validate_costs",
    "timestep_loss",
    "velocity_ratio",
]

PositionNormalization = Literal["none", "per_structure_weight", "per_atom_surrogate"]
POSITION_NORMALIZATIONS = ("none", "per_structure_weight", "per_atom_surrogate")
COST_FIELDS = ("pos", "cell")
COST_KINDS = ("policy", "regularization", "entropy", "distillation")


# ---------------------------------------------------------------------------------------------------------------
# GRPO
# ---------------------------------------------------------------------------------------------------------------
def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-8) -> torch.Tensor:
    r""":math:`A_i = (R_i - \operatorname{mean}_g R) / (\operatorname{std}_g R + \epsilon)` with population std.

    ``rewards`` (G_n·G,) with the members of each group contiguous; returns the same shape. A group whose
    rewards are all equal gets zero advantages (no signal, no NaN).
    """
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be 1-D with a length divisible by group_size={group_size}, got {tuple(rewards.shape)}")
    r = rewards.reshape(-1, group_size)
    mean = r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, unbiased=False, keepdim=True)
    return ((r - mean) / (std + eps)).reshape(-1)


# ---------------------------------------------------------------------------------------------------------------
# Aggregation helpers
# ---------------------------------------------------------------------------------------------------------------
def _units(values: torch.Tensor) -> torch.Tensor:
    """Sum trailing dimensions: per element (U, ...) -> per unit (U,)."""
    return values.reshape(values.shape[0], -1).sum(-1) if values.dim() > 1 else values


def _num_structures(batch: torch.Tensor | None, num_structures: int | None, n_units: int) -> int:
    if batch is None:
        return n_units
    if num_structures is None:
        raise ValueError("num_structures is required with a batch index (empty structures cannot be inferred)")
    if batch.shape[0] != n_units:
        raise ValueError(f"batch has {batch.shape[0]} entries for {n_units} units")
    return num_structures


def reduce_per_structure(
    values: torch.Tensor,
    batch: torch.Tensor | None = None,
    num_structures: int | None = None,
    reduce: Literal["sum", "mean"] = "sum",
) -> torch.Tensor:
    """Per-element ``values`` (U, ...) -> scalar: sum trailing dims, ``reduce`` units within each structure,
    then mean over structures. ``batch`` (U,) maps units to structures; None means units are structures."""
    per_unit = _units(values)
    b = _num_structures(batch, num_structures, per_unit.shape[0])
    if batch is None:
        return per_unit.mean()
    per_structure = scatter_sum(per_unit, batch, b) if reduce == "sum" else scatter_mean(per_unit, batch, b)
    return per_structure.mean()


# ---------------------------------------------------------------------------------------------------------------
# PPO
# ---------------------------------------------------------------------------------------------------------------
def ppo_clip_loss(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    clip_eps: float,
    batch: torch.Tensor | None = None,
    num_structures: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""Clipped surrogate :math:`-\min(rA, \operatorname{clip}(r, 1\pm\epsilon)A)` on per-sample joint log-probs (S,).

    The loss and the statistics are a plain mean over samples, or, with ``batch`` (S,) mapping samples to
    structures, a mean within each structure and then over structures. Statistics are detached 0-d tensors.
    """
    log_ratio = logp_new - logp_old
    ratio = torch.exp(log_ratio)
    surrogate = torch.maximum(-advantages * ratio, -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps))

    def mean(v: torch.Tensor) -> torch.Tensor:
        if batch is None:
            return v.mean()
        return scatter_mean(v, batch, _num_structures(batch, num_structures, v.shape[0])).mean()

    with torch.no_grad():
        stats = {
            "clip_fraction": mean(((ratio - 1.0).abs() > clip_eps).to(ratio.dtype)),
            "approx_kl": mean((ratio - 1.0) - log_ratio),
            "ratio_mean": mean(ratio),
        }
    return mean(surrogate), stats


def policy_loss(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    clip_eps: float,
    batch: torch.Tensor | None = None,
    num_structures: int | None = None,
    mode: PositionNormalization = "none",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO loss of one field from per-element log-probs (U, ...) and per-structure advantages (B,).

    ``batch`` (U,) maps units (atoms) to structures; None when units are structures (cell, scale actions), where
    every ``mode`` is the joint ratio. ``num_structures`` defaults to ``len(advantages)``. See the module
    docstring for the modes.
    """
    if mode not in POSITION_NORMALIZATIONS:
        raise ValueError(f"position normalisation must be one of {POSITION_NORMALIZATIONS}, got {mode!r}")
    # difference before summing: a sum of many log-probs loses the small per-atom differences in float32
    delta = _units(logp_new - logp_old)
    num_structures = advantages.shape[0] if num_structures is None else num_structures
    if batch is None:
        return ppo_clip_loss(delta, torch.zeros_like(delta), advantages, clip_eps)
    b = _num_structures(batch, num_structures, delta.shape[0])
    if mode == "per_atom_surrogate":
        return ppo_clip_loss(delta, torch.zeros_like(delta), advantages[batch], clip_eps, batch, b)
    joint = scatter_sum(delta, batch, b)
    if mode == "per_structure_weight":
        n_atoms = torch.bincount(batch, minlength=b).to(advantages.dtype).clamp_min(1)
        advantages = advantages / n_atoms
    return ppo_clip_loss(joint, torch.zeros_like(joint), advantages, clip_eps)


def denoiser_distillation(
    eta: torch.Tensor,
    eta_ref: torch.Tensor,
    batch: torch.Tensor | None = None,
    num_structures: int | None = None,
) -> torch.Tensor:
    r"""Denoiser distillation (score variant), squared norm over xyz:

    .. math:: D = \operatorname{mean}_i \operatorname{mean}_a \lVert\eta_\theta - \eta_\text{ref}\rVert^2
    """
    return reduce_per_structure((eta - eta_ref) ** 2, batch, num_structures, reduce="mean")


def velocity_ratio(
    b: torch.Tensor,
    b_ref: torch.Tensor,
    batch: torch.Tensor | None = None,
    num_structures: int | None = None,
) -> torch.Tensor:
    r"""Monitoring only (``pos_ratio`` of the original logs), detached: averaged over structures,

    .. math:: \operatorname{mean}_a\lVert b_\theta - b_\text{ref}\rVert \,/\, \operatorname{mean}_a\lVert b_\text{ref}\rVert
    """
    with torch.no_grad():
        diff = (b - b_ref).reshape(b.shape[0], -1).norm(dim=-1)
        ref = b_ref.reshape(b.shape[0], -1).norm(dim=-1)
        if batch is None:
            return (diff / ref.clamp_min(1e-12)).mean()
        n = _num_structures(batch, num_structures, diff.shape[0])
        return (scatter_mean(diff, batch, n) / scatter_mean(ref, batch, n).clamp_min(1e-12)).mean()


# ---------------------------------------------------------------------------------------------------------------
# One field, one timestep
# ---------------------------------------------------------------------------------------------------------------
def field_loss_terms(
    field: str,
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    clip_eps: float,
    batch: torch.Tensor | None = None,
    num_structures: int | None = None,
    mode: PositionNormalization = "none",
    kl: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    eta: torch.Tensor | None = None,
    eta_ref: torch.Tensor | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Loss terms of one field at one timestep, keyed ``<field>_<policy|regularization|entropy|distillation>``.

    * ``policy``: :func:`policy_loss` with ``mode`` (forced ``none`` for the cell: it is always joint)
    * ``regularization``: per-element ``kl`` summed over atoms for ``none``, else averaged, then mean over structures
    * ``entropy``: :math:`-H`, reduced like the KL (a positive cost rewards exploration)
    * ``distillation``: :func:`denoiser_distillation` from ``eta``/``eta_ref``

    Returns ``(terms, stats)``; stats are detached and prefixed with the field.
    """
    if field not in COST_FIELDS:
        raise ValueError(f"field must be one of {COST_FIELDS}, got {field!r}")
    if field == "cell":
        mode = "none"
    num_structures = advantages.shape[0] if num_structures is None else num_structures
    loss, ppo_stats = policy_loss(logp_new, logp_old, advantages, clip_eps, batch, num_structures, mode)
    terms = {f"{field}_policy": loss}
    reduce = "sum" if mode == "none" else "mean"
    if kl is not None:
        terms[f"{field}_regularization"] = reduce_per_structure(kl, batch, num_structures, reduce)
    if entropy is not None:
        terms[f"{field}_entropy"] = -reduce_per_structure(entropy, batch, num_structures, reduce)
    if eta is not None and eta_ref is not None:
        terms[f"{field}_distillation"] = denoiser_distillation(eta, eta_ref, batch, num_structures)
    stats = {f"{field}_{k}": v for k, v in ppo_stats.items()}
    return terms, stats


def validate_costs(costs: Mapping[str, float], normalize: bool = False) -> dict[str, float]:
    """Check keys ``<field>_<kind>`` (field in pos/cell, kind in policy/regularization/entropy/distillation) and
    values (finite, >= 0); with ``normalize`` divide by their sum so they sum to 1."""
    out: dict[str, float] = {}
    for key, value in costs.items():
        field, _, kind = key.partition("_")
        if field not in COST_FIELDS or kind not in COST_KINDS:
            raise ValueError(f"relative cost key {key!r} is not <field>_<kind> with field in {COST_FIELDS} "
                             f"and kind in {COST_KINDS}")
        value = float(value)
        if not (value >= 0.0 and value < float("inf")):
            raise ValueError(f"relative cost {key!r} must be a finite number >= 0, got {value}")
        out[key] = value
    if normalize:
        total = sum(out.values())
        if total <= 0.0:
            raise ValueError("cannot normalise relative costs that sum to 0")
        out = {k: v / total for k, v in out.items()}
    return out


def timestep_loss(
    terms: Mapping[str, torch.Tensor],
    costs: Mapping[str, float],
    normalize: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r""":math:`L_k = \sum_\text{key} c_\text{key}\,T_\text{key}` over the cost keys with a non-zero cost.

    A non-zero cost without a matching term is an error (e.g. ``pos_distillation`` outside the score variant);
    terms without a cost are only logged. Returns the scalar loss and detached stats (every term and ``loss``).
    """
    costs = validate_costs(costs, normalize)
    missing = sorted(k for k, c in costs.items() if c != 0.0 and k not in terms)
    if missing:
        raise ValueError(f"no loss term for cost key(s) {missing}; terms given: {sorted(terms)}")
    active = [(c, terms[k]) for k, c in costs.items() if c != 0.0]
    if not active:
        raise ValueError("every relative cost is zero: nothing to optimise")
    loss = sum(c * term for c, term in active)
    stats = {k: v.detach() for k, v in terms.items()}
    stats["loss"] = loss.detach()
    return loss, stats
