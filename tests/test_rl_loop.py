"""The RL loop end to end on real (tiny) networks: base-sampler equivalence, first-epoch ratio, learning,
resume, reward-hacking guard and 2-process distributed training."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch

from crystalign.distributions import BaseDistribution
from crystalign.generator import Generator, GeneratorConfig, composition_batch
from crystalign.geometry import min_image
from crystalign.model.cspnet import CSPNetConfig
from crystalign.rewards.base import RewardResult
from crystalign.rl.checkpoints import load_policy
from crystalign.rl.config import RLConfig
from crystalign.rl.rollout import Policy, rollout
from crystalign.rl.trainer import RLDivergedError, RLTrainer
from crystalign.sampling import SamplerConfig


def tiny_generator(seed: int = 0) -> Generator:
    torch.manual_seed(seed)
    cfg = GeneratorConfig(net=CSPNetConfig(hidden_dim=32, num_layers=2, num_freqs=8, time_dim=16))
    return Generator(cfg, BaseDistribution.from_preset("perov_5"))


def rocksalt_reward(batch) -> RewardResult:
    """Prefers the rock-salt arrangement of a 2-atom cell: Cl at (½,½,½) relative to Na."""
    rel = batch.frac[1::2] - batch.frac[0::2]
    dist2 = min_image(rel - 0.5).pow(2).sum(-1)
    return RewardResult(rewards=-dist2.double(), info={"rocksalt_distance": dist2.sqrt().double()})


def config(**kw) -> RLConfig:
    base = dict(variant="velocity", steps=6, group_size=8, num_groups=2, iterations=2, lr=1e-3, duplicate_check=False)
    base.update(kw)
    cfg = RLConfig(**base)
    cfg.validation.every = 0
    return cfg


def mean_path(policy, gen, template, steps: int):
    """The policy's noise-free rollout over ``steps`` time points and the x0 it started from (drawn from ``gen``'s
    base distribution, seed 0), to compare with a sampler integrating the same x0."""
    x0 = gen.base_sample(template.species, template.n_atoms, torch.Generator().manual_seed(0))
    return rollout(policy, template, steps, torch.Generator().manual_seed(1), store=False, noise=False, x0=x0).final, x0


def test_scale_policy_with_zero_noise_reproduces_base_sampler():
    gen = tiny_generator()
    policy = Policy(gen, config(variant="scale", fields=["pos", "cell"]))
    template = composition_batch(["SrTiO3", "KNbO3"], 2).to(dtype=torch.float32)
    rl, x0 = mean_path(policy, gen, template, 9)
    base = gen.sampler(steps=9).sample(x0)
    assert torch.allclose(rl.frac, base.frac, atol=1e-6)
    assert torch.allclose(rl.lattice, base.lattice, atol=1e-5)


def test_velocity_policy_at_init_with_zero_noise_reproduces_base_sampler():
    gen = tiny_generator()
    policy = Policy(gen, config(variant="velocity", fields=["pos"]))
    template = composition_batch(["SrTiO3"], 3).to(dtype=torch.float32)
    rl, x0 = mean_path(policy, gen, template, 7)
    base = gen.sampler(steps=7).sample(x0)
    assert torch.allclose(rl.frac, base.frac, atol=1e-6) and torch.allclose(rl.lattice, base.lattice, atol=1e-5)


@pytest.mark.parametrize("variant", ["velocity", "scale"])
def test_first_ppo_epoch_ratio_is_one(tmp_path, variant):
    gen = tiny_generator()
    cfg = config(variant=variant, ppo_epochs=1, iterations=1, costs={"pos_policy": 1.0, "pos_regularization": 0.0})
    comps = composition_batch(["NaCl", "KBr"], 1).to(dtype=torch.float32)
    trainer = RLTrainer(Policy(gen, cfg), rocksalt_reward, cfg, comps, progress=False)
    row = trainer.fit(tmp_path)[-1]
    assert row["pos_ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert row["pos_clip_fraction"] == 0.0
    assert row["pos_approx_kl"] == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("variant,fields", [("velocity", ["pos"]), ("velocity", ["pos", "cell"]), ("scale", ["pos", "cell"])])
def test_timesteps_batched_in_one_backward_give_the_per_step_gradient(variant, fields):
    """Batching timesteps into one forward/backward is exact: same gradient and statistics as one step at a time
    (structures of different sizes, every cost term active, two mini-batches)."""
    costs = {f"{f}_{k}": 1.0 for f in fields for k in ("policy", "regularization", "entropy")}
    comps = composition_batch(["SrTiO3", "NaCl", "KBr"], 1).to(dtype=torch.float32)
    results = []
    for budget in (0, 10_000, 13):  # one step per backward, all steps in one, chunks of 2 steps (13 // 6 atoms)
        gen = tiny_generator()
        cfg = config(variant=variant, fields=fields, steps=6, group_size=4, num_groups=2, costs=costs,
                     max_atoms_per_backward=budget, minibatch_trajectories=5)
        trainer = RLTrainer(Policy(gen, cfg), rocksalt_reward, cfg, comps, progress=False)
        template = trainer.sample_groups()
        traj = rollout(trainer.policy, template, cfg.steps, torch.Generator().manual_seed(3))
        adv = torch.linspace(-1.5, 1.5, template.num_structures)
        params = trainer.policy.trainable_parameters()
        trainer.optimizer.step = lambda: None  # keep the weights: compare the accumulated gradient of the last mini-batch
        stats = trainer.update(traj, adv)
        results.append((stats, [p.grad.clone() for p in params if p.grad is not None]))
    (ref_stats, ref_grads), *others = results
    assert ref_stats["pos_ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    for stats, grads in others:
        assert stats.keys() == ref_stats.keys()
        for key in ref_stats:
            assert stats[key] == pytest.approx(ref_stats[key], rel=1e-4, abs=1e-6), key
        assert len(grads) == len(ref_grads) > 0
        for g, g_ref in zip(grads, ref_grads):
            assert torch.allclose(g, g_ref, rtol=1e-4, atol=1e-6)


ROCKSALT_NACL_VOLUME = 5.64**3 / 4  # Å^3 per primitive 2-atom cell of rock-salt NaCl (a = 5.64 Å)


def volume_reward(batch) -> RewardResult:
    """Prefers the cell volume of the known rock-salt NaCl structure."""
    v = batch.lattice.det().abs().double()
    return RewardResult(rewards=-(v / ROCKSALT_NACL_VOLUME - 1).abs())


def rocksalt_volume_frequency(batch, tol: float = 0.1) -> float:
    return float(((batch.lattice.det().abs() / ROCKSALT_NACL_VOLUME - 1).abs() < tol).double().mean())


def test_reward_preferring_a_structure_raises_its_frequency(tmp_path):
    """A real learning test: after 10 PPO iterations, cells of the known NaCl volume become far more frequent."""
    gen = tiny_generator(seed=1)
    cfg = config(
        variant="velocity", fields=["cell"], steps=8, group_size=16, num_groups=2, iterations=10, lr=3e-3, ppo_epochs=2,
        noise={"pos": {"kind": "constant", "a": 0.3}, "cell": {"kind": "constant", "a": 0.3}},
        costs={"cell_policy": 1.0}, position_normalization="none",
    )
    comps = composition_batch(["NaCl"], 1).to(dtype=torch.float32)
    template = comps.repeat_interleave(256)
    policy = Policy(gen, cfg)
    before = rollout(policy, template, cfg.steps, torch.Generator().manual_seed(7), store=False).final
    history = RLTrainer(policy, volume_reward, cfg, comps, progress=False).fit(tmp_path)
    after = rollout(policy, template, cfg.steps, torch.Generator().manual_seed(7), store=False).final
    f_before, f_after = rocksalt_volume_frequency(before), rocksalt_volume_frequency(after)
    assert f_after > 3 * f_before and f_after > 0.15, (f_before, f_after)
    assert history[-1]["reward_mean"] > history[0]["reward_mean"]


def test_resume_after_kill_loses_no_iteration(tmp_path):
    comps = composition_batch(["NaCl", "KBr"], 1).to(dtype=torch.float32)

    def run(out, iterations, resume=False):
        cfg = config(iterations=iterations)
        trainer = RLTrainer(Policy(tiny_generator(), cfg), rocksalt_reward, cfg, comps, progress=False)
        trainer.fit(out, resume=resume)
        return trainer

    full = run(tmp_path / "full", 3)
    run(tmp_path / "part", 2)
    resumed = run(tmp_path / "part", 3, resume=True)
    assert [r["iteration"] for r in resumed.history] == [1, 2, 3]
    for a, b in zip(full.policy.trainable_state().values(), resumed.policy.trainable_state().values()):
        assert torch.equal(a, b)
    assert json.loads((tmp_path / "part" / "history.json").read_text())[-1]["reward_mean"] == pytest.approx(full.history[-1]["reward_mean"])
    policy, state = load_policy(tmp_path / "part" / "last.pt")
    assert state["iteration"] == 3


def test_invalid_fraction_guard_stops_run(tmp_path):
    # an untrained network with strong position noise puts atoms on top of each other
    cfg = config(noise={"pos": {"kind": "constant", "a": 3.0}, "cell": {"kind": "constant", "a": 0.1}}, max_invalid_fraction=0.05)
    comps = composition_batch(["SrTiO3"], 1).to(dtype=torch.float32)
    trainer = RLTrainer(Policy(tiny_generator(), cfg), volume_reward, cfg, comps, progress=False)
    with pytest.raises(RLDivergedError, match="invalid fraction"):
        trainer.fit(tmp_path)


def test_non_finite_rewards_never_reach_the_weights(tmp_path):
    """A user reward that returns NaN or inf for some structures: they count as rejected and score the batch's
    lowest reward; the group's advantages, the gradients and the weights stay finite."""
    comps = composition_batch(["NaCl", "KBr"], 1).to(dtype=torch.float32)

    def flaky(batch):
        out = rocksalt_reward(batch)
        out.rewards[::5] = float("nan")
        out.rewards[1] = float("inf")
        return out

    cfg = config(iterations=2)
    trainer = RLTrainer(Policy(tiny_generator(), cfg), flaky, cfg, comps, progress=False)
    history = trainer.fit(tmp_path / "run")
    assert all(math.isfinite(r["reward_mean"]) and math.isfinite(r["grad_norm"]) for r in history)
    assert history[-1]["reward_invalid_fraction"] == pytest.approx(5 / 16)  # rows 0, 1, 5, 10, 15
    assert all(torch.isfinite(v).all() for v in trainer.policy.trainable_state().values() if v.is_floating_point())

    def broken(batch):
        out = rocksalt_reward(batch)
        return RewardResult(rewards=torch.full_like(out.rewards, float("nan")))

    with pytest.raises(RLDivergedError, match="no finite value"):
        RLTrainer(Policy(tiny_generator(), cfg), broken, cfg, comps, progress=False).fit(tmp_path / "broken")

    def short(batch):
        return RewardResult(rewards=rocksalt_reward(batch).rewards[:3])

    with pytest.raises(ValueError, match="returned \\(3,\\) values for 16 structures"):
        RLTrainer(Policy(tiny_generator(), cfg), short, cfg, comps, progress=False).fit(tmp_path / "short")


def test_non_finite_gradients_stop_before_the_step(tmp_path):
    """Fault injection: one parameter's gradient turns NaN; the update raises before the optimiser moves."""
    comps = composition_batch(["NaCl"], 1).to(dtype=torch.float32)
    cfg = config(iterations=1)
    trainer = RLTrainer(Policy(tiny_generator(), cfg), rocksalt_reward, cfg, comps, progress=False)
    before = {k: v.clone() for k, v in trainer.policy.trainable_state().items()}
    next(p for p in trainer.policy.trainable_parameters()).register_hook(lambda g: g * float("nan"))
    with pytest.raises(RLDivergedError, match="non-finite policy gradients"):
        trainer.fit(tmp_path / "run")
    assert all(torch.equal(before[k], v) for k, v in trainer.policy.trainable_state().items())
    assert not (tmp_path / "run" / "last.pt").exists()


def test_score_variant_needs_sde_model():
    with pytest.raises(ValueError, match="SDE"):
        Policy(tiny_generator(), config(variant="score"))


SDE_POS = {"path": "trig", "periodic": True, "correct_com": True, "sde": True, "gamma": {"kind": "sqrt", "a": 0.049243},
           "epsilon": {"kind": "vanishing", "c": 9.4187, "mu": 0.19678, "sigma": 0.040028}}


def _generator(interpolants=None, **sampling) -> Generator:
    torch.manual_seed(0)
    extra = {"interpolants": interpolants} if interpolants else {}
    cfg = GeneratorConfig(net=CSPNetConfig(hidden_dim=32, num_layers=2, num_freqs=8, time_dim=16),
                          sampling=SamplerConfig(**sampling), **extra)
    return Generator(cfg, BaseDistribution.from_preset("perov_5"))


def test_score_variant_uses_each_fields_own_gamma_and_rejects_ode_fields():
    costs = {"pos_policy": 1.0, "cell_policy": 1.0}
    ode_cell = _generator({"pos": SDE_POS, "cell": {"path": "trig"}})
    with pytest.raises(ValueError, match="'cell'.*SDE fields \\['pos'\\]"):
        Policy(ode_cell, config(variant="score", fields=["pos", "cell"], costs=costs))
    Policy(ode_cell, config(variant="score", fields=["pos"]))  # its SDE field alone is fine
    sde_cell = {"path": "trig", "sde": True, "gamma": {"kind": "sqrt", "a": 0.5}, "epsilon": {"kind": "constant", "c": 1.0}}
    gen = _generator({"pos": SDE_POS, "cell": sde_cell})
    policy = Policy(gen, config(variant="score", fields=["pos", "cell"], costs=costs))
    t = torch.tensor([0.1, 0.3, 0.7], dtype=torch.float64)
    for f in ("pos", "cell"):
        assert torch.allclose(policy.transitions[f].parametrisation.gamma(t), gen.interpolants[f].gamma(t))
    assert not torch.allclose(gen.interpolants["pos"].gamma(t), gen.interpolants["cell"].gamma(t))


def test_base_velocity_annealing_is_ignored_with_a_warning():
    with pytest.warns(UserWarning, match="velocity annealing"):
        Policy(_generator(anneal_pos=10.0), config())


def test_groups_of_a_batch_are_distinct_compositions():
    formulas = ["NaCl", "KBr", "LiF", "CsI", "RbCl", "NaBr"]
    comps = composition_batch(formulas, 1).to(dtype=torch.float32)
    cfg = config(num_groups=6, group_size=2)
    trainer = RLTrainer(Policy(tiny_generator(), cfg), rocksalt_reward, cfg, comps, progress=False)
    for _ in range(20):
        batch = trainer.sample_groups()
        firsts = [s.composition.reduced_formula for s in batch[torch.arange(0, batch.num_structures, 2)].to_structures()]
        assert sorted(firsts) == sorted(formulas)


def _distributed_worker(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cfg = config(num_groups=4, iterations=2)
        cfg.validation.every, cfg.validation.num_compositions = 1, 3  # 3 compositions: shards of 2 and 1
        comps = composition_batch(["NaCl", "KBr", "LiF", "CsCl"], 1).to(dtype=torch.float32)
        trainer = RLTrainer(Policy(tiny_generator(), cfg), rocksalt_reward, cfg, comps, validation=comps, progress=False)
        trainer.fit(Path(out) / f"rank{rank}")
        flat = torch.cat([p.detach().flatten() for p in trainer.policy.trainable_parameters()])
        gathered = [torch.zeros_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        # the logged rows describe the whole batch: every rank logs the same statistics
        logged = [{k: v for k, v in r.items() if not k.startswith("time_")} for r in trainer.history]
        histories: list = [None] * world
        dist.all_gather_object(histories, logged)
        if rank == 0:
            moved = float((flat - torch.cat([p.detach().flatten() for p in Policy(tiny_generator(), cfg).trainable_parameters()])).abs().max())
            Path(out, "result.json").write_text(json.dumps({
                "max_diff": float((gathered[0] - gathered[1]).abs().max()), "moved": moved,
                "same_logs": histories[0] == histories[1],
                "validated": sum("val_reward_mean" in r for r in logged),
            }))
    finally:
        dist.destroy_process_group()


def test_distributed_two_processes_keep_weights_identical(tmp_path):
    import torch.multiprocessing as mp

    init_file = tmp_path / "dist_init"
    mp.start_processes(_distributed_worker, args=(2, str(init_file), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["max_diff"] == 0.0
    assert result["moved"] > 0.0  # the ranks agree on weights that did change
    assert result["same_logs"] and result["validated"] == 3  # the untrained baseline and 2 iterations


def _guard_worker(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)

    def rejected_on_rank_1(batch) -> RewardResult:  # rank 1's structures are all rejected by the reward
        n = batch.num_structures
        return RewardResult(rewards=torch.zeros(n, dtype=torch.float64), info={"valid": torch.full((n,), float(rank == 0), dtype=torch.float64)})

    try:
        cfg = config(num_groups=2, iterations=3, max_invalid_fraction=0.4)
        comps = composition_batch(["NaCl", "KBr"], 1).to(dtype=torch.float32)
        trainer = RLTrainer(Policy(tiny_generator(), cfg), rejected_on_rank_1, cfg, comps, progress=False)
        try:
            trainer.fit(Path(out) / f"rank{rank}")
        except RLDivergedError as err:
            Path(out, f"stopped{rank}").write_text(str(err))
    finally:
        dist.destroy_process_group()


def _resume_worker(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        comps = composition_batch(["NaCl", "KBr", "LiF", "CsCl"], 1).to(dtype=torch.float32)

        def weights_after(iterations: int, folder: str, resume: bool = False) -> torch.Tensor:
            cfg = config(num_groups=4, iterations=iterations)
            trainer = RLTrainer(Policy(tiny_generator(), cfg), rocksalt_reward, cfg, comps, progress=False)
            trainer.fit(Path(out) / folder, resume=resume)  # one run folder shared by the ranks, as under torchrun
            return torch.cat([p.detach().flatten() for p in trainer.policy.trainable_parameters()])

        straight = weights_after(3, "straight")
        weights_after(2, "stopped")
        resumed = weights_after(3, "stopped", resume=True)
        if rank == 0:
            Path(out, "result.json").write_text(json.dumps({"max_diff": float((straight - resumed).abs().max())}))
    finally:
        dist.destroy_process_group()


def test_distributed_resume_continues_every_ranks_noise(tmp_path):
    """Rank 1 must resume its own rollout-noise stream, not rank 0's: resumed == uninterrupted, bit for bit."""
    import torch.multiprocessing as mp

    mp.start_processes(_resume_worker, args=(2, str(tmp_path / "dist_init"), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    assert json.loads((tmp_path / "result.json").read_text())["max_diff"] == 0.0


def test_distributed_guard_stops_every_rank_together(tmp_path):
    """Half the batch rejected, all on rank 1: both ranks must stop (a rank left alone would wait forever)."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(_guard_worker, args=(2, str(tmp_path / "dist_init"), str(tmp_path)), nprocs=2, join=False, start_method="fork")
    deadline = time.time() + 120
    while not ctx.join(timeout=1):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("a rank hung after the other stopped")
    assert all((tmp_path / f"stopped{r}").exists() for r in range(2))
    assert "invalid fraction 0.50" in (tmp_path / "stopped0").read_text()
    assert (tmp_path / "stopped1").read_text() == (tmp_path / "stopped0").read_text()


def test_rl_cli_fit_sample_plot(tmp_path, data_root):
    """`rl fit` → `rl sample` (stochastic and --no-noise) → `rl plot-schedule`, on real perov_5 compositions."""
    import yaml
    from typer.testing import CliRunner

    from crystalign.cli import app
    from crystalign.io import save_torch

    save_torch(tmp_path / "base.pt", tiny_generator().checkpoint_dict())
    cfg = {
        "variant": "scale", "fields": ["pos", "cell"], "steps": 5, "group_size": 4, "num_groups": 2, "iterations": 2,
        "noise": {"pos": {"kind": "constant", "a": 0.1}, "cell": {"kind": "constant", "a": 0.1}},
        "costs": {"pos_policy": 1.0, "cell_policy": 1.0, "pos_regularization": 0.1},
        "reward": {"kind": "non_triclinic"}, "duplicate_check": False,
        "data": {"dataset": "perov_5", "max_structures": 40, "holdout_fraction": 0.1},
        "validation": {"every": 1, "num_compositions": 4},
    }
    (tmp_path / "rl.yaml").write_text(yaml.safe_dump(cfg))
    runner = CliRunner()
    out = tmp_path / "run"
    res = runner.invoke(app, ["rl", "fit", str(tmp_path / "rl.yaml"), "-b", str(tmp_path / "base.pt"), "--out", str(out), "--data-root", str(data_root)])
    assert res.exit_code == 0, res.output
    history = json.loads((out / "history.json").read_text())
    assert [r["iteration"] for r in history] == [0, 1, 2] and "val_reward_mean" in history[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == 2 and summary["seed"] == 0 and "torch" in summary["versions"]
    assert summary["base_model_hash"] == Generator.load(tmp_path / "base.pt").model_hash()
    assert (out / "best.pt").exists() and (out / "report.html").exists()
    for extra in ([], ["--no-noise"]):
        dest = tmp_path / f"samples{len(extra)}"
        res = runner.invoke(app, ["rl", "sample", str(out / "best.pt"), "-c", "SrTiO3", "-n", "3", "--out", str(dest), *extra])
        assert res.exit_code == 0, res.output
        assert len(json.loads((dest / "index.json").read_text())) == 3
    res = runner.invoke(app, ["rl", "plot-schedule", str(out / "best.pt"), "--out", str(tmp_path / "s.png")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    bad = runner.invoke(app, ["rl", "fit", str(tmp_path / "rl.yaml"), "-b", str(tmp_path / "missing.pt"), "--out", str(out)])
    assert bad.exit_code != 0 and "missing.pt" in bad.output


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_rl_iteration_on_cuda_matches_cpu(tmp_path):
    """The same seeds give the same rollout on CUDA as on CPU (random numbers are drawn on the CPU generator),
    and a full iteration (rollout, reward, batched update) runs on the GPU with the first-epoch ratio at 1."""
    comps = composition_batch(["NaCl", "KBr"], 1).to(dtype=torch.float32)
    finals = {}
    for device in ("cpu", "cuda"):
        cfg = config(iterations=1, device=device)
        policy = Policy(tiny_generator().to(device), cfg).to(device)
        trainer = RLTrainer(policy, rocksalt_reward, cfg, comps.to(device), progress=False)
        row = trainer.fit(tmp_path / device)[-1]
        assert row["pos_ratio_mean"] == pytest.approx(1.0, abs=1e-5)
        template = comps.to(device).repeat_interleave(4)
        finals[device] = rollout(policy, template, cfg.steps, torch.Generator().manual_seed(5), store=False).final
        policy_weights = [p.detach().cpu() for p in policy.trainable_parameters()]
        finals[device + "_weights"] = policy_weights
    torch.testing.assert_close(finals["cuda"].frac.cpu(), finals["cpu"].frac, atol=1e-4, rtol=1e-4)
    for a, b in zip(finals["cuda_weights"], finals["cpu_weights"]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)
