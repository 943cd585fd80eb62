"""Interpolant numerics checked against the math: derivatives, boundary values, loss minimisers, torus, coupling."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from crystalign.config import ConfigError
from crystalign.crystal import CrystalBatch
from crystalign.geometry import min_image
from crystalign.interpolants import (
    BIG_TIME,
    SMALL_TIME,
    ConstantEpsilon,
    EncoderDecoderPath,
    FieldInterpolant,
    Interpolants,
    LatentGammaEncoderDecoder,
    LatentGammaSqrt,
    LinearPath,
    MirrorPath,
    NoGamma,
    TrigonometricPath,
    VanishingEpsilon,
    field_from_config,
    min_perm_cost,
    min_perm_couple,
    min_perm_coupling,
    min_perm_permutation,
    sample_times,
    time_grid,
)
from crystalign.interpolants.paths import encoder_decoder_switch

DT = torch.float64
PATHS = [
    LinearPath(),
    TrigonometricPath(),
    EncoderDecoderPath(),
    EncoderDecoderPath(switch_time=0.3, power=1.5),
    EncoderDecoderPath(switch_time=0.7, power=0.75),
    MirrorPath(),
]
GAMMAS = [
    LatentGammaSqrt(a=0.0492),
    LatentGammaEncoderDecoder(),
    LatentGammaEncoderDecoder(a=2.0, switch_time=0.3, power=1.5),
]
PAPER_CONFIG = {
    "pos": {
        "path": "trig",
        "periodic": True,
        "gamma": {"kind": "sqrt", "a": 0.0492},
        "epsilon": {"kind": "vanishing", "c": 9.4, "mu": 0.197, "sigma": 0.04},
        "sde": True,
        "correct_com": True,
    },
    "cell": {"path": "linear"},
}


def _times(n: int = 41) -> torch.Tensor:
    t = torch.linspace(0.01, 0.99, n, dtype=DT)
    return t


def _autograd(fn, t: torch.Tensor) -> torch.Tensor:
    t = t.clone().requires_grad_(True)
    # "+ 0 * t" keeps constant schedules (Mirror) connected to the graph
    (grad,) = torch.autograd.grad((fn(t) + 0 * t).sum(), t)
    return grad


# ---------------------------------------------------------------------------------------------- paths
@pytest.mark.parametrize("path", PATHS, ids=repr)
def test_path_derivatives_match_autograd(path):
    t = _times()
    torch.testing.assert_close(path.d_alpha(t), _autograd(path.alpha, t), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(path.d_beta(t), _autograd(path.beta, t), rtol=1e-9, atol=1e-10)
    c = path(t)
    torch.testing.assert_close(c.alpha, path.alpha(t))
    torch.testing.assert_close(c.d_beta, path.d_beta(t))


@pytest.mark.parametrize("path", [p for p in PATHS if not isinstance(p, MirrorPath)], ids=repr)
def test_path_boundary_conditions(path):
    ends = torch.tensor([0.0, 1.0], dtype=DT)
    torch.testing.assert_close(path.alpha(ends), torch.tensor([1.0, 0.0], dtype=DT), atol=1e-12, rtol=0)
    torch.testing.assert_close(path.beta(ends), torch.tensor([0.0, 1.0], dtype=DT), atol=1e-12, rtol=0)


def test_mirror_keeps_x1():
    field = FieldInterpolant(MirrorPath())
    x0, x1 = torch.randn(5, 3, dtype=DT), torch.randn(5, 3, dtype=DT)
    s = field.interpolate(torch.rand(5, dtype=DT), x0, x1)
    torch.testing.assert_close(s.x_t, x1)
    assert torch.count_nonzero(s.v_plus) == 0


@pytest.mark.parametrize("s,p", [(0.5, 1.0), (0.3, 1.5), (0.7, 0.75)])
def test_encoder_decoder_is_pure_noise_at_switch(s, p):
    path = EncoderDecoderPath(switch_time=s, power=p)
    t = torch.tensor([s], dtype=DT)
    f, _ = encoder_decoder_switch(t, s, p)
    torch.testing.assert_close(f, torch.tensor([0.5], dtype=DT))
    assert path.alpha(t).abs().item() < 1e-12 and path.beta(t).abs().item() < 1e-12
    # both schedules are continuous through the switch
    near = torch.tensor([s - 1e-7, s + 1e-7], dtype=DT)
    assert path.alpha(near).abs().max() < 1e-10 and path.beta(near).abs().max() < 1e-10
    gamma = LatentGammaEncoderDecoder(a=2.0, switch_time=s, power=p)
    torch.testing.assert_close(gamma.gamma(t), torch.tensor([math.sqrt(2.0)], dtype=DT))


def test_encoder_decoder_defaults_reduce_to_closed_forms():
    t = _times()
    torch.testing.assert_close(LatentGammaEncoderDecoder().gamma(t), torch.sin(math.pi * t) ** 2)
    path = EncoderDecoderPath()
    torch.testing.assert_close(path.alpha(t) + path.beta(t), torch.cos(math.pi * t) ** 2)


def test_trig_path_is_variance_preserving():
    t = _times()
    c = TrigonometricPath()(t)
    torch.testing.assert_close(c.alpha**2 + c.beta**2, torch.ones_like(t))


@pytest.mark.parametrize("bad", [dict(switch_time=0.0), dict(switch_time=1.0), dict(power=0.4)])
def test_encoder_decoder_rejects_bad_parameters(bad):
    with pytest.raises(ValueError):
        EncoderDecoderPath(**bad)
    with pytest.raises(ValueError):
        LatentGammaEncoderDecoder(**bad)


# ---------------------------------------------------------------------------------------------- gamma, epsilon
@pytest.mark.parametrize("gamma", GAMMAS, ids=repr)
def test_gamma_derivative_and_boundaries(gamma):
    t = _times()
    torch.testing.assert_close(gamma.d_gamma(t), _autograd(gamma.gamma, t), rtol=1e-9, atol=1e-10)
    ends = torch.tensor([0.0, 1.0], dtype=DT)
    torch.testing.assert_close(gamma.gamma(ends), torch.zeros(2, dtype=DT), atol=1e-12, rtol=0)


def test_gamma_sqrt_closed_form_and_antithetic_flag():
    t = _times()
    g = LatentGammaSqrt(a=0.3)
    torch.testing.assert_close(g.gamma(t), torch.sqrt(0.3 * t * (1 - t)))
    assert g.requires_antithetic and not LatentGammaEncoderDecoder().requires_antithetic
    assert NoGamma().is_zero and not NoGamma().requires_antithetic


def test_epsilon_schedules():
    t = torch.tensor([0.0, 0.5, 1.0], dtype=DT)
    torch.testing.assert_close(ConstantEpsilon(2.5)(t), torch.full_like(t, 2.5))
    eps = VanishingEpsilon(c=9.4187, mu=0.19678, sigma=0.040028)(t)
    assert abs(eps[1].item() / 9.4187 - 1) < 2e-3  # the box is ~c a few sigma inside
    assert eps[0].item() < 0.1 and eps[2].item() < 0.1
    s = torch.sigmoid
    expect = 9.4187 * s((t - 0.19678) / 0.040028) * s((1 - 0.19678 - t) / 0.040028)
    torch.testing.assert_close(eps, expect)
    with pytest.raises(ValueError):
        ConstantEpsilon(-1.0)


# ---------------------------------------------------------------------------------------------- losses
def _field_sample(field: FieldInterpolant, n: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(n, 3, generator=g, dtype=DT)
    x1 = torch.rand(n, 3, generator=g, dtype=DT)
    t = SMALL_TIME + (BIG_TIME - SMALL_TIME) * torch.rand(n, generator=g, dtype=DT)
    return field.interpolate(t, x0, x1, generator=g)


def _grad_at(loss_fn, *points):
    params = [p.clone().requires_grad_(True) for p in points]
    grads = torch.autograd.grad(loss_fn(*params), params)
    return grads


NON_ANTITHETIC = {
    "ode_no_gamma": FieldInterpolant(LinearPath()),
    "ode_encdec_gamma": FieldInterpolant(TrigonometricPath(), LatentGammaEncoderDecoder(a=0.5)),
    "sde_encdec_gamma": FieldInterpolant(
        EncoderDecoderPath(), LatentGammaEncoderDecoder(), ConstantEpsilon(1.0), ode=False
    ),
}


@pytest.mark.parametrize("name", list(NON_ANTITHETIC))
def test_b_loss_minimised_at_velocity(name):
    field = NON_ANTITHETIC[name]
    s = _field_sample(field)
    assert not s.antithetic
    (grad,) = _grad_at(lambda b: field.b_loss(b, s), s.v_plus)
    assert grad.abs().max() < 1e-12
    # the loss is a shifted MSE, so the minimiser is exactly v (not v/2: the factor 2 is required)
    b = torch.randn_like(s.v_plus)
    torch.testing.assert_close(field.b_loss(b, s), ((b - s.v_plus) ** 2).mean() - (s.v_plus**2).mean())


def test_sde_non_antithetic_branch_has_factor_two():
    """A b-loss of mean(b^2) - mean(b v) would be minimised at v/2; ours at v."""
    field = NON_ANTITHETIC["sde_encdec_gamma"]
    assert field.uses_denoiser and not field.requires_antithetic
    s = _field_sample(field, seed=3)
    (grad_half,) = _grad_at(lambda b: field.b_loss(b, s), 0.5 * s.v_plus)
    assert grad_half.abs().max() > 1e-6
    assert field.b_loss(s.v_plus, s) < field.b_loss(0.5 * s.v_plus, s)
    # closed-form minimiser of the quadratic: argmin = v, at value -mean(v^2)
    torch.testing.assert_close(field.b_loss(s.v_plus, s), -(s.v_plus**2).mean())


@pytest.mark.parametrize("ode", [True, False])
def test_antithetic_b_loss_minimised_at_both_velocities(ode):
    eps = None if ode else VanishingEpsilon(c=9.4, mu=0.197, sigma=0.04)
    field = FieldInterpolant(TrigonometricPath(), LatentGammaSqrt(0.0492), eps, periodic=True, ode=ode)
    s = _field_sample(field)
    assert s.antithetic and s.v_minus is not None
    gp, gm = _grad_at(lambda bp, bm: field.b_loss(bp, s, bm), s.v_plus, s.v_minus)
    assert gp.abs().max() < 1e-12 and gm.abs().max() < 1e-12
    # swapping the two targets is not a minimiser
    gp, _ = _grad_at(lambda bp, bm: field.b_loss(bp, s, bm), s.v_minus, s.v_plus)
    assert gp.abs().max() > 1e-6
    with pytest.raises(ValueError, match="b_minus"):
        field.b_loss(s.v_plus, s)


def test_eta_loss_minimised_at_z():
    field = FieldInterpolant(TrigonometricPath(), LatentGammaSqrt(0.1), ConstantEpsilon(1.0), ode=False)
    s = _field_sample(field)
    (grad,) = _grad_at(lambda e: field.eta_loss(e, s), s.z)
    assert grad.abs().max() < 1e-12
    (grad_half,) = _grad_at(lambda e: field.eta_loss(e, s), 0.5 * s.z)
    assert grad_half.abs().max() > 1e-6
    with pytest.raises(ValueError, match="gamma"):
        FieldInterpolant(LinearPath()).eta_loss(s.z, _field_sample(FieldInterpolant(LinearPath())))


def test_velocity_target_is_time_derivative_of_the_interpolant():
    field = FieldInterpolant(EncoderDecoderPath(0.4, 1.2), LatentGammaEncoderDecoder(0.7, 0.4, 1.2))
    g = torch.Generator().manual_seed(1)
    x0, x1, z = (torch.randn(8, 3, generator=g, dtype=DT) for _ in range(3))
    t = torch.rand(8, generator=g, dtype=DT) * 0.9 + 0.05
    jac = _autograd(lambda tt: (field.interpolate(tt, x0, x1, z=z).x_t * torch.ones(8, 3, dtype=DT)).sum(-1), t)
    torch.testing.assert_close(field.interpolate(t, x0, x1, z=z).v_plus.sum(-1), jac)


def test_antithetic_pair_is_symmetric_about_the_mean():
    field = FieldInterpolant(LinearPath(), LatentGammaSqrt(0.2))
    g = torch.Generator().manual_seed(2)
    x0, x1 = torch.randn(6, 3, generator=g, dtype=DT), torch.randn(6, 3, generator=g, dtype=DT)
    t = torch.full((6,), 0.3, dtype=DT)
    s = field.interpolate(t, x0, x1, generator=g)
    torch.testing.assert_close(0.5 * (s.x_t + s.x_t_minus), 0.7 * x0 + 0.3 * x1)
    torch.testing.assert_close(0.5 * (s.v_plus + s.v_minus), x1 - x0)
    dg = LatentGammaSqrt(0.2).d_gamma(torch.tensor(0.3, dtype=DT))
    torch.testing.assert_close(s.v_plus - s.v_minus, 2 * dg * s.z)


# ---------------------------------------------------------------------------------------------- torus
def test_periodic_linear_target_is_shortest_displacement():
    field = FieldInterpolant(LinearPath(), periodic=True)
    g = torch.Generator().manual_seed(4)
    x0, x1 = torch.rand(200, 3, generator=g, dtype=DT), torch.rand(200, 3, generator=g, dtype=DT)
    t = torch.rand(200, generator=g, dtype=DT)
    s = field.interpolate(t, x0, x1)
    torch.testing.assert_close(s.v_plus, min_image(x1 - x0))
    assert s.v_plus.abs().max() <= 0.5
    assert (s.x_t >= 0).all() and (s.x_t < 1).all()


@pytest.mark.parametrize("path", [LinearPath(), TrigonometricPath()], ids=repr)
def test_periodic_interpolation_invariant_to_integer_shifts(path):
    field = FieldInterpolant(path, LatentGammaSqrt(0.05), periodic=True, correct_com=False)
    g = torch.Generator().manual_seed(5)
    x0, x1 = torch.rand(50, 3, generator=g, dtype=DT), torch.rand(50, 3, generator=g, dtype=DT)
    z = torch.randn(50, 3, generator=g, dtype=DT)
    t = torch.rand(50, generator=g, dtype=DT)
    shift = torch.randint(-3, 4, (50, 3), generator=g).to(DT)
    ref = field.interpolate(t, x0, x1, z=z)
    moved = field.interpolate(t, x0 + torch.randint(-2, 3, (50, 3), generator=g).to(DT), x1 + shift, z=z)
    for name in ("x_t", "x_t_minus", "v_plus", "v_minus"):
        a, b = getattr(ref, name), getattr(moved, name)
        # x_t may land on either side of the 0/1 seam within rounding
        torch.testing.assert_close(min_image(a - b), torch.zeros_like(a), atol=1e-12, rtol=0)
    for x in (ref.x_t, ref.x_t_minus):
        assert (x >= 0).all() and (x < 1).all()


def test_com_correction_zeroes_per_structure_mean():
    field = FieldInterpolant(TrigonometricPath(), LatentGammaSqrt(0.05), periodic=True, correct_com=True)
    n_atoms = torch.tensor([1, 3, 5, 2])
    batch = torch.repeat_interleave(torch.arange(4), n_atoms)
    g = torch.Generator().manual_seed(6)
    x0, x1 = torch.rand(11, 3, generator=g, dtype=DT), torch.rand(11, 3, generator=g, dtype=DT)
    t = torch.rand(4, generator=g, dtype=DT)[batch]
    s = field.interpolate(t, x0, x1, batch=batch, num_structures=4, generator=g)
    for v in (s.v_plus, s.v_minus):
        means = torch.zeros(4, 3, dtype=DT).index_add_(0, batch, v) / n_atoms[:, None]
        assert means.abs().max() < 1e-12
    with pytest.raises(ValueError, match="batch"):
        field.interpolate(t, x0, x1)


# ---------------------------------------------------------------------------------------------- validation, bundle
def test_field_interpolant_validation():
    with pytest.raises(ValueError, match="epsilon"):
        FieldInterpolant(LinearPath(), LatentGammaSqrt(0.1), ode=False)
    with pytest.raises(ValueError, match="gamma"):
        FieldInterpolant(LinearPath(), epsilon=ConstantEpsilon(1.0), ode=False)
    with pytest.raises(ValueError, match="epsilon"):
        FieldInterpolant(LinearPath(), LatentGammaSqrt(0.1), ConstantEpsilon(1.0), ode=True)
    with pytest.raises(ValueError, match="gamma"):
        FieldInterpolant(EncoderDecoderPath())


def test_config_builds_paper_interpolants_and_round_trips():
    si = Interpolants.from_config(PAPER_CONFIG)
    assert si.pos.periodic and si.pos.uses_denoiser and si.pos.requires_antithetic and si.pos.correct_com
    assert not si.cell.periodic and not si.cell.uses_denoiser and not si.cell.requires_antithetic
    assert si.active_loss_keys == ("pos_b", "pos_eta", "cell_b") and si.needs_minus_pass
    t = torch.tensor([0.5])
    torch.testing.assert_close(si.pos.gamma(t), torch.sqrt(0.0492 * t * (1 - t)))
    assert abs(si.pos.epsilon(t).item() / 9.4 - 1) < 2e-3 and si.cell.epsilon(t).item() == 0.0
    again = Interpolants.from_config(si.to_config())
    assert again.to_config() == si.to_config()


@pytest.mark.parametrize(
    "patch,key",
    [
        ({"pos": {**PAPER_CONFIG["pos"], "gamma": {"kind": "sqrt", "a": "big"}}}, "pos.gamma.a"),
        ({"pos": {**PAPER_CONFIG["pos"], "gamma": {"kind": "cube"}}}, "pos.gamma.kind"),
        ({"pos": {**PAPER_CONFIG["pos"], "gamma": {"kind": "sqrt", "b": 1}}}, "pos.gamma"),
        ({"pos": {**PAPER_CONFIG["pos"], "wobble": 1}}, "pos"),
        ({"pos": {**PAPER_CONFIG["pos"], "periodic": "yes"}}, "pos.periodic"),
        ({"cell": {"path": "spiral"}}, "cell.path.kind"),
        ({"cell": {"periodic": False}}, "cell"),
        ({"cell": {"path": "linear", "sde": True}}, "cell"),
        ({"pos": {**PAPER_CONFIG["pos"], "epsilon": {"kind": "vanishing", "sigma": -1}}}, "pos.epsilon"),
        ({"species": {"path": "linear"}}, "species"),
        ({"relative_costs": {"pos_b": 1, "pos_loss_z": 1}}, "pos_loss_z"),
        ({"relative_costs": {"pos_b": 1, "pos_eta": -1, "cell_b": 1}}, "pos_eta"),
        ({"relative_costs": {"pos_b": 1, "cell_b": 1}}, "pos_eta"),
        ({"relative_costs": {"pos_b": 1, "pos_eta": 1, "cell_b": 1, "cell_eta": 1}}, "cell_eta"),
    ],
)
def test_config_errors_name_the_key(patch, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        Interpolants.from_config({**PAPER_CONFIG, **patch})


def test_relative_costs_accepted_and_weighted():
    costs = {"pos_b": 0.24677, "pos_eta": 0.72315, "cell_b": 0.030073, "cell_eta": 0.0}
    si = Interpolants.from_config({**PAPER_CONFIG, "relative_costs": costs})
    losses = {"pos_b": torch.tensor(1.0), "pos_eta": torch.tensor(2.0), "cell_b": torch.tensor(3.0)}
    total = 0.24677 + 0.72315 + 0.030073  # the paper's rounded costs: 0.99999
    torch.testing.assert_close(si.total_loss(losses), torch.tensor((0.24677 + 2 * 0.72315 + 3 * 0.030073) / total))
    # costs are relative: any scale gives the same loss, and the defaults share the weight equally
    scaled = Interpolants.from_config({**PAPER_CONFIG, "relative_costs": {k: 7 * v for k, v in costs.items()}})
    torch.testing.assert_close(scaled.total_loss(losses), si.total_loss(losses))
    default = Interpolants.from_config(PAPER_CONFIG).relative_costs
    assert default == {k: 1 / 3 for k in ("pos_b", "pos_eta", "cell_b")}


def test_bundle_interpolates_crystal_batches_and_computes_losses():
    si = Interpolants.from_config(PAPER_CONFIG)
    g = torch.Generator().manual_seed(7)
    n_atoms = torch.tensor([2, 4, 3])
    species = torch.randint(1, 90, (9,), generator=g)

    def crystal():
        return CrystalBatch(species, torch.rand(9, 3, generator=g), torch.randn(3, 3, 3, generator=g), n_atoms)

    x0, x1 = crystal(), crystal()
    samples = si.interpolate(sample_times(3, generator=g), x0, x1, generator=g)
    assert samples["pos"].x_t.shape == (9, 3) and samples["cell"].x_t.shape == (3, 3, 3)
    assert samples["pos"].antithetic and not samples["cell"].antithetic
    assert si["pos"] is si.pos and samples["pos"].xt is samples["pos"].x_t
    minus = si.minus_states(samples)
    assert minus["pos"] is samples["pos"].x_t_minus and minus["cell"] is samples["cell"].x_t
    target_b = {k: s.v_plus for k, s in samples.items()}
    losses = si.losses(samples, target_b, eta={"pos": samples["pos"].z}, b_minus={"pos": samples["pos"].v_minus})
    assert set(losses) == {"pos_b", "pos_eta", "cell_b"}
    assert torch.isfinite(si.total_loss(losses))
    with pytest.raises(ValueError, match="eta"):
        si.losses(samples, target_b, b_minus={"pos": samples["pos"].v_minus})


def test_field_from_config_accepts_path_parameters():
    field = field_from_config(
        {"path": {"kind": "encoder_decoder", "switch_time": 0.4, "power": 2}, "gamma": {"kind": "encdec", "a": 0.5}},
        "pos",
    )
    assert isinstance(field.path, EncoderDecoderPath) and field.path.switch_time == 0.4 and field.path.power == 2.0


# ---------------------------------------------------------------------------------------------- times
@pytest.mark.parametrize("method", ["uniform", "sobol"])
def test_sample_times_range_and_seed(method):
    t = sample_times(4096, method, generator=torch.Generator().manual_seed(0), dtype=DT)
    assert t.shape == (4096,) and t.min() >= SMALL_TIME and t.max() <= BIG_TIME
    assert abs(t.mean().item() - 0.5) < 0.02
    again = sample_times(4096, method, generator=torch.Generator().manual_seed(0), dtype=DT)
    torch.testing.assert_close(t, again, rtol=0, atol=0)
    other = sample_times(4096, method, generator=torch.Generator().manual_seed(1), dtype=DT)
    assert not torch.equal(t, other)


def test_sobol_times_are_more_even_than_uniform():
    t = sample_times(1024, "sobol", generator=torch.Generator().manual_seed(0), dtype=DT)
    counts = torch.histc(t, bins=32, min=SMALL_TIME, max=BIG_TIME)
    assert counts.min() >= 28 and counts.max() <= 36


def test_time_grid():
    grid = time_grid(50, dtype=DT)
    assert grid[0].item() == SMALL_TIME and abs(grid[-1].item() - BIG_TIME) < 1e-15
    assert abs((grid[1] - grid[0]).item() - 0.0203673) < 1e-7


# ---------------------------------------------------------------------------------------------- coupling
def _coupling_inputs(n_atoms, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = int(n_atoms.sum())
    return torch.rand(n, 3, generator=g, dtype=DT), torch.rand(n, 3, generator=g, dtype=DT)


def _total_cost(x0, x1, n_atoms):
    out = []
    for a, b in zip(torch.split(x0, n_atoms.tolist()), torch.split(x1, n_atoms.tolist())):
        out.append(torch.diagonal(min_perm_cost(a, b)).sum())
    return torch.stack(out)


def test_coupling_is_a_per_structure_permutation_that_never_increases_cost():
    n_atoms = torch.tensor([1, 5, 8, 5, 3, 8, 8, 2])
    x0, x1 = _coupling_inputs(n_atoms)
    perm = min_perm_permutation(x0, x1, n_atoms)
    torch.testing.assert_close(min_perm_coupling(x0, x1, n_atoms), x0[perm])
    batch = torch.repeat_interleave(torch.arange(len(n_atoms)), n_atoms)
    assert torch.equal(batch[perm], batch)  # stays within its structure
    assert torch.equal(torch.sort(perm).values, torch.arange(len(perm)))  # a permutation
    before, after = _total_cost(x0, x1, n_atoms), _total_cost(x0[perm], x1, n_atoms)
    assert (after <= before + 1e-12).all() and (after < before - 1e-6).any()


def test_coupling_finds_the_brute_force_optimum():
    n_atoms = torch.tensor([4, 5])
    x0, x1 = _coupling_inputs(n_atoms, seed=1)
    perm = min_perm_permutation(x0, x1, n_atoms)
    after = _total_cost(x0[perm], x1, n_atoms)
    start = 0
    for k, n in enumerate(n_atoms.tolist()):
        cost = min_perm_cost(x0[start : start + n], x1[start : start + n])
        best = min(sum(cost[i, p[i]] for i in range(n)) for p in itertools.permutations(range(n)))
        assert abs(after[k].item() - float(best)) < 1e-12
        start += n


def test_coupling_recovers_a_shuffled_copy_across_the_seam():
    g = torch.Generator().manual_seed(2)
    x1 = torch.rand(6, 3, generator=g, dtype=DT)
    shuffle = torch.randperm(6, generator=g)
    x0 = (x1[shuffle] + 1e-3 * torch.randn(6, 3, generator=g, dtype=DT)) % 1.0
    perm = min_perm_permutation(x0, x1, torch.tensor([6]))
    torch.testing.assert_close(min_image(x0[perm] - x1), torch.zeros_like(x1), atol=1e-2, rtol=0)


def test_min_perm_couple_keeps_species_and_lattice():
    n_atoms = torch.tensor([3, 4])
    x0f, x1f = _coupling_inputs(n_atoms, seed=3)
    species = torch.tensor([8, 8, 22, 1, 1, 6, 7])
    lattice = torch.eye(3, dtype=DT).repeat(2, 1, 1)
    x0 = CrystalBatch(species, x0f, lattice, n_atoms)
    x1 = CrystalBatch(species, x1f, 2 * lattice, n_atoms)
    out = min_perm_couple(x0, x1)
    assert torch.equal(out.species, species) and torch.equal(out.lattice, lattice)
    assert (_total_cost(out.frac, x1f, n_atoms) <= _total_cost(x0f, x1f, n_atoms) + 1e-12).all()
