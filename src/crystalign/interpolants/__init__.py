"""Stochastic interpolants per field: paths (α, β), latent noise γ, SDE diffusion ε, losses and coupling.

Example::

    from crystalign.interpolants import Interpolants, sample_times
    si = Interpolants.from_config({"pos": {"path": "trig", "periodic": True}, "cell": {"path": "linear"}})
    samples = si.interpolate(sample_times(len(x1)), x0, x1)
"""

from crystalign.interpolants.coupling import min_perm_cost, min_perm_couple, min_perm_coupling, min_perm_permutation
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
from crystalign.interpolants.species import MASK, MaskedSpecies
from crystalign.interpolants.stochastic import (
    BIG_TIME,
    FIELDS,
    LOSS_KEYS,
    SMALL_TIME,
    FieldInterpolant,
    InterpolantSample,
    Interpolants,
    field_from_config,
    sample_times,
    time_grid,
)

__all__ = [
    "BIG_TIME",
    "FIELDS",
    "LOSS_KEYS",
    "SMALL_TIME",
    "ConstantEpsilon",
    "EncoderDecoderPath",
    "Epsilon",
    "FieldInterpolant",
    "Gamma",
    "InterpolantSample",
    "Interpolants",
    "InterpolationPath",
    "LatentGammaEncoderDecoder",
    "LatentGammaSqrt",
    "LinearPath",
    "MASK",
    "MaskedSpecies",
    "MirrorPath",
    "NoGamma",
    "PathCoefficients",
    "TrigonometricPath",
    "VanishingEpsilon",
    "field_from_config",
    "min_perm_cost",
    "min_perm_couple",
    "min_perm_coupling",
    "min_perm_permutation",
    "sample_times",
    "time_grid",
]
