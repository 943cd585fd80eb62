"""Numerics of the RL policy and objective, checked against the math (float64, small toy networks)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from crystalign.config import ConfigError
from crystalign.crystal import CrystalBatch
from crystalign.geometry import min_image
from crystalign.rl.objective import (
    denoiser_distillation,
    field_loss_terms,
    group_advantages,
    policy_loss,
    ppo_clip_loss,
    reduce_per_structure,
    timestep_loss,
    validate_costs,
)
from crystalign.rl.policy import (
    FieldOutputs,
    Step,
    entropy,
    euler_step,
    kl_divergence,
    log_prob,
    make_transition,
)
from crystalign.rl.scale import ScaleMLP
from crystalign.rl.schedules import MLPNoise, SqrtNoise, build_noise_schedule

DTYPE = torch.float64
GAMMA_A = 0.049243  # base Trig-SDE-Gamma interpolant


class SqrtGamma:
    """gamma(t) = sqrt(a t (1-t)), with the ``gamma(t)`` method of the interpolant classes."""

    def gamma(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(GAMMA_A * t * (1.0 - t))


class ToyNet(nn.Module):
    """Periodic in the fractional coordinates, like the real network: one forward, the four field outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Linear(7, 6)
        self.cell = nn.Linear(10, 18)

    def forward(self, frac: torch.Tensor, lattice: torch.Tensor, t: torch.Tensor, batch: torch.Tensor):
        feats = torch.cat([torch.sin(2 * math.pi * frac), torch.cos(2 * math.pi * frac), t[batch, None]], -1)
        p = self.pos(feats)
        c = self.cell(torch.cat([lattice.reshape(-1, 9), t[:, None]], -1))
        b = lattice.shape[0]
        return {"pos_b": p[:, :3], "pos_eta": p[:, 3:], "cell_b": c[:, :9].reshape(b, 3, 3),
                "cell_eta": c[:, 9:].reshape(b, 3, 3)}


def _crystals(n_atoms=(2, 3, 1, 4), seed=0) -> CrystalBatch:
    g = torch.Generator().manual_seed(seed)
    n = sum(n_atoms)
    lattice = 4.0 * torch.eye(3, dtype=DTYPE) + 0.3 * torch.randn(len(n_atoms), 3, 3, generator=g, dtype=DTYPE)
    return CrystalBatch(species=torch.full((n,), 6), frac=torch.rand(n, 3, generator=g, dtype=DTYPE),
                        lattice=lattice, n_atoms=torch.tensor(n_atoms))


def _nets(seed=0):
    torch.manual_seed(seed)
    ref = ToyNet().to(DTYPE).requires_grad_(False)
    policy = ToyNet().to(DTYPE)
    with torch.no_grad():  # the policy is a perturbed copy of the reference, as after some training
        for p, q in zip(policy.parameters(), ref.parameters()):
            p.copy_(q + 0.1 * torch.randn_like(q))
    return ref, policy


def _transition(variant: str, field: str, noise=None, reference_noise=None, scale_model=None):
    noise = noise if noise is not None else {"kind": "constant", "a": 0.3}
    scale_model = scale_model or _trained_scale()
    return make_transition(variant, field, noise, reference_noise, gamma=SqrtGamma(), scale_model=scale_model).to(DTYPE)


def _trained_scale(seed=1) -> ScaleMLP:
    torch.manual_seed(seed)
    scale = ScaleMLP().to(DTYPE)
    with torch.no_grad():
        for p in scale.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return scale


def _outputs(variant, field, crystals, step, policy_net, ref_net, scale_net=None):
    """(policy outputs, reference outputs) of one field; the scale variant's policy is a ScaleMLP."""
    ref_out = ref_net(crystals.frac, crystals.lattice, step.t, crystals.batch)
    ref = FieldOutputs.from_network(ref_out, field)
    if variant == "scale":
        return FieldOutputs.from_scale(scale_net(step.t), field), ref
    return FieldOutputs.from_network(policy_net(crystals.frac, crystals.lattice, step.t, crystals.batch), field), ref


VARIANT_FIELDS = [(v, f) for v in ("velocity", "scaled_velocity", "score", "scale") for f in ("pos", "cell")]


# ------------------------------------------------------------------------------------------------ schedules
def test_sqrt_schedule_and_score_coefficient_match_the_table():
    # the table's columns are grid points k = 0, 1, 5, 10, 24, 40, 48 of linspace(1e-3, 0.999, 50)
    t = torch.linspace(1e-3, 0.999, 50, dtype=DTYPE)[[0, 1, 5, 10, 24, 40, 48]]
    s = SqrtNoise(0.1668100537)(t)
    assert s.tolist() == pytest.approx([5.27, 1.13, 0.49, 0.33, 0.17, 0.079, 0.025], rel=0.03)
    dt = 0.998 / 49
    assert (s * math.sqrt(dt)).tolist() == pytest.approx([0.75, 0.16, 0.070, 0.047, 0.024, 0.011, 0.0035], rel=0.03)
    coeff = s**2 / (2 * SqrtGamma().gamma(t))
    assert coeff.tolist() == pytest.approx([1982, 19.9, 1.8, 0.60, 0.13, 0.037, 0.009], rel=0.06)  # one-digit rounding


def test_mlp_noise_is_sigma0_at_init_and_stays_positive_below_ln2():
    sched = MLPNoise(sigma0=0.1).to(DTYPE)
    t = torch.linspace(1e-3, 0.999, 50, dtype=DTYPE)
    assert torch.allclose(sched(t), torch.full_like(t, 0.1), atol=1e-15)
    with torch.no_grad():
        sched.net[-1].bias.fill_(-50.0)  # softplus -> 0: unclamped sigma would be 0.1 - ln 2 < 0
    assert (sched(t) > 0).all() and torch.allclose(sched(t), torch.full_like(t, sched.min_sigma))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in sched.parameters():
            p.copy_(10 * torch.randn_like(p))
    assert (sched(t) >= sched.min_sigma).all()
    assert all(p.requires_grad for p in sched.parameters()) and sched.learnable


def test_build_noise_schedule_from_config():
    assert isinstance(build_noise_schedule({"kind": "sqrt", "a": 0.2}), SqrtNoise)
    assert build_noise_schedule({"kind": "ConstantNoiseSchedule", "a": 0.2})(0.5) == pytest.approx(0.2)
    mlp = build_noise_schedule({"kind": "mlp", "sigma0": 0.5, "learnable": False})
    assert not mlp.learnable and not any(p.requires_grad for p in mlp.parameters())
    assert build_noise_schedule({"kind": "constant", "a": 0.0}).is_zero
    with pytest.raises(ConfigError, match="kind"):
        build_noise_schedule({"kind": "cosine", "a": 1.0})
    with pytest.raises(ConfigError, match="'sigma'"):
        build_noise_schedule({"kind": "sqrt", "sigma": 1.0})


# ------------------------------------------------------------------------------------------------ ScaleMLP
def test_scale_mlp_parameter_counts_and_zero_output_at_init():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    shared, separate = ScaleMLP(), ScaleMLP(shared_trunk=False)
    assert count(shared) == 12_738
    assert count(separate) == 17_026
    t = torch.linspace(0.0, 1.0, 7)
    for model in (shared, separate):
        out = model(t)
        assert set(out) == {"pos_s", "cell_s"}
        assert all(v.shape == t.shape and torch.equal(v, torch.zeros_like(t)) for v in out.values())


# ------------------------------------------------------------------------------------------------ policy step
@pytest.mark.parametrize("variant,field", VARIANT_FIELDS)
def test_first_epoch_ratio_is_one_and_gradient_is_score_function(variant, field):
    crystals = _crystals()
    ref_net, policy_net = _nets()
    scale_net = _trained_scale(seed=3)
    # a learnable sigma must also get the plain score-function gradient
    noise = MLPNoise(0.3) if variant == "velocity" else {"kind": "sqrt", "a": 0.17}
    tr = _transition(variant, field, noise=noise)
    step = Step.on_grid(0.3, 0.02, crystals)
    out_old, ref = _outputs(variant, field, crystals, step, policy_net, ref_net, scale_net)
    action, logp_old = tr.sample_action(step, out_old.detach(), ref, torch.Generator().manual_seed(0))

    out_new, _ = _outputs(variant, field, crystals, step, policy_net, ref_net, scale_net)
    logp_new = tr.log_prob(action, step, out_new, ref)
    assert torch.equal(logp_new, logp_old)  # same parameters, same numbers

    adv = torch.tensor([1.3, -0.4, 0.7, -1.6], dtype=DTYPE)
    params = [p for m in (policy_net, scale_net, tr) for p in m.parameters() if p.requires_grad]
    batch = tr.unit_batch(step)
    n = torch.bincount(crystals.batch).to(DTYPE)
    for mode in ("none", "per_structure_weight", "per_atom_surrogate"):
        loss, stats = policy_loss(logp_new, logp_old, adv, clip_eps=0.2, batch=batch, mode=mode)
        assert stats["ratio_mean"] == 1.0 and stats["clip_fraction"] == 0.0 and stats["approx_kl"] == 0.0
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        # expected: -mean_i A_i * grad of the structure's (or atom's, averaged) log-prob
        per_unit = logp_new.reshape(logp_new.shape[0], -1).sum(-1)
        if batch is None:
            expected = -(adv * per_unit).mean()
        else:
            weight = {"none": adv, "per_structure_weight": adv / n, "per_atom_surrogate": adv / n}[mode]
            expected = -(weight[batch] * per_unit).sum() / len(adv)
        want = torch.autograd.grad(expected, params, retain_graph=True, allow_unused=True)
        for g, w in zip(grads, want):
            if w is None:
                assert g is None or torch.count_nonzero(g) == 0
            else:
                torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
        assert any(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("variant,field", VARIANT_FIELDS)
def test_closed_form_kl_and_entropy_match_monte_carlo(variant, field):
    crystals = _crystals(n_atoms=(2,), seed=4)
    ref_net, policy_net = _nets(seed=4)
    scale_net = _trained_scale(seed=5)
    tr = _transition(variant, field, noise={"kind": "sqrt", "a": 0.35}, reference_noise={"kind": "constant", "a": 0.6})
    step = Step.on_grid(0.4, 0.05, crystals)
    out, ref = _outputs(variant, field, crystals, step, policy_net, ref_net, scale_net)
    with torch.no_grad():
        kl = tr.kl_to_reference(step, out, ref).reshape(-1)
        ent = tr.entropy(step, tr.mean(step, out, ref)).reshape(-1)
        mean = tr.mean(step, out, ref).reshape(-1)
        mean_ref = tr.reference_mean(step, ref).reshape(-1)
        sigma, sigma_ref = float(tr.sigma(step)[0]), float(tr.sigma_ref(step)[0])
        dt = 0.05
    assert sigma != pytest.approx(sigma_ref) and not torch.allclose(mean, mean_ref)
    g = torch.Generator().manual_seed(1)
    m, chunks = 250_000, 4
    s1 = torch.zeros_like(mean); s2 = torch.zeros_like(mean); h = torch.zeros_like(mean)  # noqa: E702
    for _ in range(chunks):
        a = mean + sigma * math.sqrt(dt) * torch.randn(m, mean.numel(), generator=g, dtype=DTYPE)
        lp = log_prob(a, mean, torch.tensor(sigma, dtype=DTYPE), dt)
        w = lp - log_prob(a, mean_ref, torch.tensor(sigma_ref, dtype=DTYPE), dt)
        s1 += w.sum(0); s2 += (w**2).sum(0); h -= lp.sum(0)  # noqa: E702
    total = m * chunks
    mc = s1 / total
    se = torch.sqrt((s2 / total - mc**2) / total)
    assert ((mc - kl).abs() <= 5 * se + 1e-9).all(), (mc, kl, se)
    # the entropy's estimator: -log p has variance 1/2 per element
    assert ((h / total - ent).abs() <= 5 * math.sqrt(0.5 / total)).all()


def test_kl_formula_matches_the_method_document():
    b, b_ref, sigma, sigma_ref, dt = 0.7, -0.2, 0.3, 0.45, 0.02
    t = lambda v: torch.tensor(v, dtype=DTYPE)  # noqa: E731
    kl = kl_divergence(t(b * dt), t(sigma), t(b_ref * dt), t(sigma_ref), dt)
    expected = math.log(sigma_ref / sigma) + (sigma**2 + (b - b_ref) ** 2 * dt) / (2 * sigma_ref**2) - 0.5
    assert float(kl) == pytest.approx(expected, rel=1e-12)
    equal_sigma = kl_divergence(t(b * dt), t(sigma), t(b_ref * dt), t(sigma), dt)
    assert float(equal_sigma) == pytest.approx((b - b_ref) ** 2 * dt / (2 * sigma**2), rel=1e-12)
    assert float(entropy(t(sigma), dt)) == pytest.approx(0.5 * math.log(2 * math.pi * math.e * sigma**2 * dt))


@pytest.mark.parametrize("variant", ["velocity", "score", "scale"])
def test_log_prob_is_invariant_to_integer_lattice_shifts(variant):
    crystals = _crystals(seed=6)
    ref_net, policy_net = _nets(seed=6)
    scale_net = _trained_scale()
    # the first grid step is loud (sigma*sqrt(dt) ~ 0.75): positions cross the cell boundary
    tr = _transition(variant, "pos", noise={"kind": "sqrt", "a": 0.1668})
    step = Step.on_grid(1e-3, 0.998 / 49, crystals)
    out, ref = _outputs(variant, "pos", crystals, step, policy_net, ref_net, scale_net)
    x_next, action, logp_old = tr.advance(crystals.frac, step, out, ref, torch.Generator().manual_seed(2))
    assert ((x_next >= 0) & (x_next < 1)).all()

    shift = torch.randint(-3, 4, crystals.frac.shape, generator=torch.Generator().manual_seed(3)).to(DTYPE)
    shifted = crystals.replace(frac=crystals.frac + shift)  # same crystal, unwrapped coordinates
    out_s, ref_s = _outputs(variant, "pos", shifted, step, policy_net, ref_net, scale_net)
    torch.testing.assert_close(tr.log_prob(action, step, out_s, ref_s), logp_old, rtol=0, atol=1e-9)
    # the stored action also reproduces the same wrapped next state
    x_next_s = tr.next_state(shifted.frac, action, step, ref_s)
    assert min_image(x_next_s - x_next).abs().max() < 1e-12


@pytest.mark.parametrize("field", ["pos", "cell"])
def test_zero_noise_scale_policy_at_init_is_a_plain_euler_step(field):
    crystals = _crystals(seed=7)
    ref_net, _ = _nets(seed=7)
    tr = _transition("scale", field, noise={"kind": "constant", "a": 0.0})
    step = Step.on_grid(0.2, 0.03, crystals)
    out, ref = _outputs("scale", field, crystals, step, None, ref_net, ScaleMLP().to(DTYPE))
    x = crystals.frac if field == "pos" else crystals.lattice
    x_next, action, logp = tr.advance(x, step, out, ref)
    assert logp is None and torch.equal(action, torch.zeros(crystals.num_structures, dtype=DTYPE))
    assert torch.equal(x_next, euler_step(x, ref.b, step, field))
    with pytest.raises(ValueError, match="deterministic"):
        tr.log_prob(action, step, out, ref)


def test_zero_noise_velocity_policy_steps_with_its_own_mean():
    crystals = _crystals(seed=8)
    ref_net, policy_net = _nets(seed=8)
    tr = _transition("velocity", "pos", noise={"kind": "constant", "a": 0.0})
    step = Step.on_grid(0.5, 0.02, crystals)
    out, ref = _outputs("velocity", "pos", crystals, step, policy_net, ref_net)
    x_next, _, logp = tr.advance(crystals.frac, step, out, ref)
    assert logp is None
    torch.testing.assert_close(x_next, euler_step(crystals.frac, out.b, step, "pos"), rtol=0, atol=1e-14)


def test_score_drift_formula_with_per_structure_times():
    crystals = _crystals(seed=9)
    ref_net, policy_net = _nets(seed=9)
    tr = _transition("score", "pos", noise={"kind": "sqrt", "a": 0.2}, reference_noise={"kind": "constant", "a": 0.5})
    t = torch.tensor([0.1, 0.4, 0.7, 0.95], dtype=DTYPE)
    step = Step(t=t, dt=torch.full_like(t, 0.02), batch=crystals.batch)
    out, ref = _outputs("score", "pos", crystals, step, policy_net, ref_net)
    t_atom = t[crystals.batch, None]
    gamma = torch.sqrt(GAMMA_A * t_atom * (1 - t_atom))
    sigma = 0.2 * torch.sqrt((1 - t_atom) / t_atom)
    torch.testing.assert_close(tr.mean(step, out, ref), (out.b - sigma**2 / (2 * gamma) * out.eta) * 0.02)
    torch.testing.assert_close(tr.reference_mean(step, ref), (ref.b - 0.5**2 / (2 * gamma) * ref.eta) * 0.02)
    # the score action is the whole increment: x' = wrap(x + a)
    action, _ = tr.sample_action(step, out, ref, torch.Generator().manual_seed(0))
    assert min_image(tr.next_state(crystals.frac, action, step, ref) - crystals.frac - action).abs().max() < 1e-12


def test_velocity_scaled_and_scale_means_and_updates():
    crystals = _crystals(seed=11)
    ref_net, policy_net = _nets(seed=11)
    scale = _trained_scale(seed=12)
    step = Step.on_grid(0.3, 0.02, crystals)
    s = scale(step.t)
    out, ref = _outputs("velocity", "cell", crystals, step, policy_net, ref_net)
    lat = crystals.lattice
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731

    vel = _transition("velocity", "cell")
    a, _ = vel.sample_action(step, out, ref, g())
    torch.testing.assert_close(vel.mean(step, out, ref), (out.b - ref.b) * 0.02)
    torch.testing.assert_close(vel.next_state(lat, a, step, ref), lat + ref.b * 0.02 + a)

    scaled = _transition("scaled_velocity", "cell", scale_model=scale)
    k = (1 + s["cell_s"])[:, None, None]
    torch.testing.assert_close(scaled.mean(step, out, ref), k * (out.b - ref.b) * 0.02)
    torch.testing.assert_close(scaled.next_state(lat, a, step, ref), lat + k * ref.b * 0.02 + a)

    sc = _transition("scale", "pos")
    ref_pos = FieldOutputs.from_network(ref_net(crystals.frac, lat, step.t, crystals.batch), "pos")
    a, _ = sc.sample_action(step, FieldOutputs.from_scale(s, "pos"), ref_pos, g())
    assert a.shape == (crystals.num_structures,) and sc.unit_batch(step) is None
    torch.testing.assert_close(sc.mean(step, FieldOutputs.from_scale(s, "pos"), ref_pos), s["pos_s"] * 0.02)
    want = crystals.frac + ref_pos.b * 0.02 + a[crystals.batch, None] * ref_pos.b
    assert min_image(sc.next_state(crystals.frac, a, step, ref_pos) - want).abs().max() < 1e-12


def test_disabled_field_is_noise_free_euler():
    crystals = _crystals(seed=10)
    b = torch.randn(crystals.num_structures, 3, 3, dtype=DTYPE)
    step = Step.on_grid(0.5, 0.1, crystals)
    torch.testing.assert_close(euler_step(crystals.lattice, b, step, "cell"), crystals.lattice + 0.1 * b)
    bp = torch.randn(crystals.num_atoms, 3, dtype=DTYPE)
    x = euler_step(crystals.frac, bp, step, "pos")
    assert ((x >= 0) & (x < 1)).all() and min_image(x - crystals.frac - 0.1 * bp).abs().max() < 1e-12


# ------------------------------------------------------------------------------------------------ objective
def test_group_advantages_standardise_each_group():
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(4 * 8, generator=g, dtype=DTYPE) * 3 + 5
    rewards[16:24] = 2.5  # a degenerate group
    adv = group_advantages(rewards, group_size=8).reshape(4, 8)
    assert torch.isfinite(adv).all()
    assert torch.equal(adv[2], torch.zeros(8, dtype=DTYPE))
    live = adv[[0, 1, 3]]
    torch.testing.assert_close(live.mean(1), torch.zeros(3, dtype=DTYPE), rtol=0, atol=1e-12)
    torch.testing.assert_close(live.std(1, unbiased=False), torch.ones(3, dtype=DTYPE), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="divisible"):
        group_advantages(rewards[:30], group_size=8)


@pytest.mark.parametrize("log_r,adv,zero_grad", [
    (math.log(1.5), 1.0, True),     # too far up, already rewarded: clipped
    (math.log(0.5), -1.0, True),    # too far down, already penalised: clipped
    (math.log(1.5), -1.0, False),   # wrong direction: the pessimistic unclipped term keeps the gradient
    (math.log(0.5), 1.0, False),
    (math.log(1.1), 1.0, False),    # inside the trust region
])
def test_ppo_clip_gradient(log_r, adv, zero_grad):
    logp_new = torch.tensor([log_r], dtype=DTYPE, requires_grad=True)
    loss, stats = ppo_clip_loss(logp_new, torch.zeros(1, dtype=DTYPE), torch.tensor([adv], dtype=DTYPE), clip_eps=0.2)
    (grad,) = torch.autograd.grad(loss, logp_new)
    r = math.exp(log_r)
    assert float(loss.detach()) == pytest.approx(-min(r * adv, min(max(r, 0.8), 1.2) * adv))
    if zero_grad:
        assert grad.item() == 0.0
    else:
        assert grad.item() == pytest.approx(-adv * r)  # d(-rA)/dlog r
    assert float(stats["clip_fraction"]) == (1.0 if abs(r - 1) > 0.2 else 0.0)
    assert float(stats["approx_kl"]) == pytest.approx((r - 1) - log_r)


def _random_logps(n_atoms, seed):
    g = torch.Generator().manual_seed(seed)
    n = sum(n_atoms)
    batch = torch.repeat_interleave(torch.arange(len(n_atoms)), torch.tensor(n_atoms))
    logp_old = torch.randn(n, 3, generator=g, dtype=DTYPE)
    logp_new = logp_old + 0.15 * torch.randn(n, 3, generator=g, dtype=DTYPE)  # some ratios clip
    adv = torch.randn(len(n_atoms), generator=g, dtype=DTYPE)
    kl = torch.rand(n, 3, generator=g, dtype=DTYPE)
    return logp_new, logp_old, adv, kl, batch


def test_position_normalisation_modes_agree_with_one_atom_per_structure():
    logp_new, logp_old, adv, kl, batch = _random_logps([1] * 6, seed=0)
    losses, kls = [], []
    for mode in ("none", "per_structure_weight", "per_atom_surrogate"):
        terms, stats = field_loss_terms("pos", logp_new, logp_old, adv, 0.2, batch, mode=mode, kl=kl)
        losses.append(terms["pos_policy"]); kls.append(terms["pos_regularization"])  # noqa: E702
    assert 0 < float(stats["pos_clip_fraction"]) < 1
    torch.testing.assert_close(losses[0], losses[1]); torch.testing.assert_close(losses[0], losses[2])  # noqa: E702
    torch.testing.assert_close(kls[0], kls[1]); torch.testing.assert_close(kls[0], kls[2])  # noqa: E702


def test_position_normalisation_modes_documented_relations():
    n_atoms = [2, 5, 1, 3]
    logp_new, logp_old, adv, kl, batch = _random_logps(n_atoms, seed=1)
    n = torch.tensor(n_atoms, dtype=DTYPE)
    none, _ = policy_loss(logp_new, logp_old, adv, 0.2, batch, mode="none")
    weighted, _ = policy_loss(logp_new, logp_old, adv, 0.2, batch, mode="per_structure_weight")
    torch.testing.assert_close(weighted, policy_loss(logp_new, logp_old, adv / n, 0.2, batch, mode="none")[0])
    # per-atom surrogate by hand
    r = torch.exp((logp_new - logp_old).sum(-1))
    a = adv[batch]
    per_atom = -torch.minimum(r * a, r.clamp(0.8, 1.2) * a)
    want = torch.stack([per_atom[batch == i].mean() for i in range(len(n_atoms))]).mean()
    torch.testing.assert_close(policy_loss(logp_new, logp_old, adv, 0.2, batch, mode="per_atom_surrogate")[0], want)
    # at ratio 1 (first epoch) 'none' and 'per_atom_surrogate' both give -mean(A)
    for mode in ("none", "per_atom_surrogate"):
        assert float(policy_loss(logp_old, logp_old, adv, 0.2, batch, mode=mode)[0]) == pytest.approx(-float(adv.mean()))
    # KL: sum over atoms vs mean over atoms
    per_atom_kl = kl.sum(-1)
    sums = torch.stack([per_atom_kl[batch == i].sum() for i in range(len(n_atoms))])
    torch.testing.assert_close(reduce_per_structure(kl, batch, 4, "sum"), sums.mean())
    torch.testing.assert_close(reduce_per_structure(kl, batch, 4, "mean"), (sums / n).mean())
    assert float(none) != pytest.approx(float(weighted))


def test_denoiser_distillation():
    batch = torch.tensor([0, 0, 1])
    eta, eta_ref = torch.ones(3, 3, dtype=DTYPE), torch.zeros(3, 3, dtype=DTYPE)
    eta[2] = 2.0
    # structure 0: mean(3, 3) = 3; structure 1: 12
    assert float(denoiser_distillation(eta, eta_ref, batch, 2)) == pytest.approx(7.5)


def test_timestep_loss_assembles_and_validates_costs():
    terms = {"pos_policy": torch.tensor(2.0), "pos_regularization": torch.tensor(0.5), "pos_entropy": torch.tensor(-1.0)}
    loss, stats = timestep_loss(terms, {"pos_policy": 1.0, "pos_regularization": 0.1})
    assert float(loss) == pytest.approx(2.05) and set(stats) == set(terms) | {"loss"}
    loss, _ = timestep_loss(terms, {"pos_policy": 3.0, "pos_regularization": 1.0}, normalize=True)
    assert float(loss) == pytest.approx(0.75 * 2.0 + 0.25 * 0.5)
    assert validate_costs({"pos_policy": 3, "cell_policy": 1}, normalize=True) == {"pos_policy": 0.75, "cell_policy": 0.25}
    with pytest.raises(ValueError, match="pos_polcy"):
        validate_costs({"pos_polcy": 1.0})
    with pytest.raises(ValueError, match="species_policy"):
        validate_costs({"species_policy": 1.0})
    with pytest.raises(ValueError, match=">= 0"):
        validate_costs({"pos_policy": -1.0})
    with pytest.raises(ValueError, match="pos_distillation"):
        timestep_loss(terms, {"pos_policy": 1.0, "pos_distillation": 1e-3})
    timestep_loss(terms, {"pos_policy": 1.0, "pos_distillation": 0.0})  # a zero cost needs no term


def test_step_refuses_non_positive_step_sizes():
    batch = CrystalBatch(
        species=torch.tensor([11, 17]), frac=torch.rand(2, 3), lattice=torch.eye(3).unsqueeze(0) * 4.0, n_atoms=torch.tensor([2])
    )
    assert Step.on_grid(0.2, 0.1, batch).dt.tolist() == pytest.approx([0.1])
    for dt in (0.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="dt must be positive"):
            Step.on_grid(0.2, dt, batch)
    with pytest.raises(ValueError, match="dt must be positive"):
        Step(t=torch.tensor([0.2, 0.3]), dt=torch.tensor([0.1, 0.0]), batch=torch.tensor([0, 1]))
