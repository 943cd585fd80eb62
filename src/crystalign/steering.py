"""Steer a generator toward any objective from Python: inference-time RL (OMatG-IRL) in one call.

:func:`steer` takes a base model, a reward (a plain function of pymatgen Structures, a reward config or a
:class:`~crystalign.rewards.Reward`) and the compositions to train on, runs GRPO/PPO on the model's velocity
field, and returns a :class:`SteeredModel` that samples the reinforced policy. It is what ``crystalign rl fit``
does from a YAML config, for notebooks and scripts.

Example::

    import crystalign

    def density(structures):                        # higher is better; invalid structures never reach it
        return [s.density for s in structures]

    steered = crystalign.steer("perov_5", density, ["SrTiO3", "BaZrO3"], iterations=20, out="runs/dense")
    structures = steered.sample("SrTiO3", n=16)     # pymatgen Structures
    steered.history[-1]["reward_mean"]
    again = crystalign.SteeredModel.load("runs/dense/last.pt")
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch

from crystalign.crystal import CrystalBatch
from crystalign.generator import Generator, composition_batch, cpu_generator

if TYPE_CHECKING:  # pragma: no cover
    from pymatgen.core import Composition, Structure

    from crystalign.rewards import Reward
    from crystalign.rl.rollout import Policy


@dataclass
class SteeredModel:
    """A reinforced policy with its training history; ``checkpoint`` is its last RL checkpoint (None when the
    run kept no files)."""

    policy: "Policy"
    history: list[dict[str, Any]] = field(default_factory=list)
    checkpoint: Path | None = None

    @classmethod
    def load(cls, path: str | Path, map_location: str = "cpu") -> "SteeredModel":
        """From an RL checkpoint (``last.pt`` / ``best.pt`` of ``steer(out=...)``, ``rl fit`` or ``predict``)."""
        from crystalign.rl.checkpoints import load_policy

        policy, state = load_policy(path, map_location)
        return cls(policy, list(state.get("history", [])), Path(path))

    def sample_batch(
        self,
        template: CrystalBatch,
        *,
        steps: int | None = None,
        seed: int = 0,
        noise: bool = True,
        batch_size: int = 256,
        progress: bool | None = None,
    ) -> CrystalBatch:
        """One structure per entry of ``template`` (species and atom counts are used), on the policy's device.

        ``noise=True`` samples the stochastic policy as it was trained; ``False`` follows its mean path.
        ``steps`` (time points) defaults to the training value. Seeded: the same call gives the same structures;
        noise is drawn batch after batch, so the structures also depend on ``batch_size``.
        """
        from tqdm import tqdm

        from crystalign.rl.rollout import rollout

        steps = self.policy.config.steps if steps is None else int(steps)
        if steps < 2:
            raise ValueError(f"steps must be >= 2, got {steps}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        device = next(self.policy.reference.parameters()).device
        g = cpu_generator(seed)
        template = template.to(device=device, dtype=torch.float32)
        parts = []
        # progress None: a bar only on a terminal
        for part in tqdm(list(template.split(batch_size)), desc="sampling", unit="batch", disable=None if progress is None else not progress):
            parts.append(rollout(self.policy, part, steps, g, store=False, noise=noise).final)
        return CrystalBatch.cat(parts)

    def sample(
        self, compositions: "str | Composition | Sequence[str | Composition]", n: int = 1, **options: Any
    ) -> list["Structure"]:
        """``n`` structures of each composition (in order) as pymatgen Structures; options as :meth:`sample_batch`."""
        template = composition_batch(compositions, n, max_atoms=self.policy.reference.config.max_atoms)
        return self.sample_batch(template, **options).to("cpu").to_structures()

    def to(self, device: str | torch.device) -> "SteeredModel":
        self.policy.to(device)
        return self


def as_reward(reward: "Reward | Callable[[list[Structure]], Sequence[float]] | str | Mapping[str, Any]") -> "Reward":
    """A :class:`~crystalign.rewards.Reward` from a reward, a config (``"energy"``, ``{"kind": ...}``) or a plain
    function ``structures -> floats`` (higher is better)."""
    from crystalign.rewards import make_reward
    from crystalign.rewards.base import CallableReward, is_reward

    if isinstance(reward, (str, Mapping)) or is_reward(reward):
        return make_reward(reward)
    if callable(reward):  # a function of Structures, even an object that happens to have a `name`
        name = getattr(reward, "name", None)
        return CallableReward(reward, name=name if isinstance(name, str) else None)
    raise TypeError(f"reward must be a function of structures, a reward config or a Reward, got {type(reward).__name__}")


def steer(
    model: str | Path | Generator,
    reward: "Reward | Callable[[list[Structure]], Sequence[float]] | str | Mapping[str, Any]",
    compositions: "str | Composition | Sequence[str | Composition] | CrystalBatch",
    *,
    iterations: int = 20,
    out: str | Path | None = None,
    resume: bool = False,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = True,
    on_iteration: Callable[[dict[str, Any]], None] | None = None,
    on_rollout: Callable[[int, CrystalBatch, Any], None] | None = None,
    **rl_options: Any,
) -> SteeredModel:
    """Reinforce ``model`` (a shipped name, a checkpoint path or a :class:`Generator`) toward ``reward``.

    ``reward``: a function of a list of pymatgen Structures returning one number each (higher is better), a reward
    config (``"energy"``, ``{"kind": "symmetry", ...}``), or a crystalign reward (a class subclassing
    :class:`~crystalign.rewards.Reward` is called with a CrystalBatch instead).
    ``compositions``: formulas or pymatgen Compositions, or a :class:`CrystalBatch` (e.g. a dataset's structures: their compositions are
    used and volume drift is measured against their cells). Each iteration draws ``num_groups`` of them and
    samples ``group_size`` trajectories of each (GRPO groups).

    ``out``: a run folder with a checkpoint after every iteration (``last.pt``, ``history.json``);
    ``resume=True`` continues an interrupted run there, after checking that the compositions, the options and
    the reward's name are the run's (a Python function is known by its name only). Without ``out`` nothing is
    kept. ``on_rollout(iteration, structures, reward_result)`` sees every iteration's scored rollouts (e.g. to keep
    them as candidates: the reward already paid for them). ``seed`` fixes the policy's initialisation and every draw of the run.
    ``rl_options``: any :class:`~crystalign.rl.config.RLConfig` field, e.g. ``variant="score"``, ``steps=50``,
    ``group_size=8``, ``num_groups=4``, ``lr=1e-4``, ``fields=["pos", "cell"]``,
    ``noise={"pos": {"kind": "constant", "a": 0.1}, ...}``, ``num_threads=2``. A :class:`Generator` passed in
    is moved to ``device`` and frozen (it becomes the policy's reference).
    """
    import dataclasses

    from crystalign.rl.config import RLConfig, check_device
    from crystalign.rl.trainer import RLTrainer, make_policy

    if "reward" in rl_options or "iterations" in rl_options:
        raise TypeError("pass reward and iterations as steer()'s own arguments")
    # validation and data belong to `crystalign rl fit` (held-out compositions from a dataset config)
    known = {f.name for f in dataclasses.fields(RLConfig)} - {"reward", "iterations", "seed", "device", "validation", "data"}
    unknown = sorted(set(rl_options) - known)
    if unknown:
        raise TypeError(f"steer(): unknown RL option(s) {unknown}; RLConfig fields are {sorted(known)}")
    if resume and out is None:
        raise ValueError("steer(resume=True) needs the run folder: pass out=")
    dev = check_device(device)
    reward_obj = as_reward(reward)
    gen = model if isinstance(model, Generator) else Generator.load(model)
    gen.check_csp("steer()")
    if isinstance(compositions, CrystalBatch):
        comps = compositions
    else:
        try:
            comps = composition_batch(compositions, 1, max_atoms=gen.config.max_atoms)
        except (TypeError, ValueError) as err:
            raise type(err)(f"compositions: {err}") from None
    if comps.num_structures == 0:
        raise ValueError("compositions: give at least one formula")
    config = RLConfig(
        seed=seed, iterations=iterations, device=str(dev), reward=_reward_label(reward, reward_obj), **rl_options
    )
    # what the run trains on, so that resuming with other compositions is refused like any changed option
    config.data = dataclasses.replace(config.data, dataset=f"compositions sha256:{_compositions_digest(comps)}")
    config.validation.every = 0
    policy = make_policy(gen.to(dev), config)
    trainer = RLTrainer(policy, reward_obj, config, comps.to(device=dev, dtype=torch.float32), progress=progress)
    threads = torch.get_num_threads()
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    try:  # the caller's thread count is theirs again afterwards
        if out is None:
            with tempfile.TemporaryDirectory(prefix="crystalign-steer-") as tmp:
                history = trainer.fit(tmp, on_iteration=on_iteration, on_rollout=on_rollout)
            return SteeredModel(policy.eval(), history, None)
        history = trainer.fit(out, resume=resume, on_iteration=on_iteration, on_rollout=on_rollout)
        return SteeredModel(policy.eval(), history, Path(out) / "last.pt")
    finally:
        torch.set_num_threads(threads)


def _compositions_digest(comps: CrystalBatch) -> str:
    """sha256 (16 hex digits) of the species of each structure, in order."""
    import hashlib

    digest = hashlib.sha256()
    for n, z in zip(comps.n_atoms.tolist(), comps.species.cpu().split(comps.n_atoms.tolist())):
        digest.update(f"{n}:{','.join(map(str, z.tolist()))};".encode())
    return digest.hexdigest()[:16]


def _reward_label(spec: Any, reward: Any) -> Any:
    """What the checkpoint records as the reward: the config when it is plain data, else the reward's name (a
    Python function or object cannot be stored in a weights-only checkpoint)."""
    if isinstance(spec, str) or (isinstance(spec, Mapping) and _plain(spec)):
        return spec
    return str(getattr(reward, "name", type(reward).__name__))


def _plain(value: Any) -> bool:
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (str, int, float, bool))
