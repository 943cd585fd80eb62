r"""A learned velocity-annealing schedule as a sampler setting: :math:`x' = x + [1 + s(t)]\,b\,\Delta t`.

The schedule is the ScaleMLP :math:`s_\theta(t)` that velocity-annealing RL (``variant: scale``) learns for a
frozen base model. It belongs to that model: it records the model's hash and the number of time points it was
learned for, and it is stored inside the model's checkpoint once attached (``crystalign rl attach-schedule``),
so ``sample``, ``predict`` and the Python API use it by default.

Example::

    schedule = VelocitySchedule.from_rl_checkpoint("runs/rl_scale/best.pt")
    gen.schedule = schedule.checked_for(gen)                  # or Generator.load a model that carries one
    m = schedule.multipliers([0.0, 0.5, 1.0])                # {"pos": [...], "cell": [...]} = 1 + s(t)
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from crystalign.rl.scale import FIELDS, ScaleMLP

FORMAT = "crystalign-velocity-schedule"


@dataclass
class VelocitySchedule:
    """Frozen :math:`s(t)` per field, the base model it was learned for, and the step count it was learned at."""

    scale: ScaleMLP
    steps: int
    model_hash: str
    source: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 2:
            raise ValueError(f"velocity schedule: steps must be an integer >= 2 time points, got {self.steps!r}")
        self.scale = self.scale.requires_grad_(False).eval()

    # ----------------------------------------------------------------------------------------------- values
    def values(self, ts: Sequence[float] | torch.Tensor) -> dict[str, list[float]]:
        """:math:`s(t)` per field at the times ``ts``; a ValueError if any is not finite (a damaged schedule)."""
        w = next(self.scale.parameters())
        t = torch.as_tensor(ts, dtype=w.dtype, device=w.device)
        with torch.no_grad():
            out = self.scale(t)
        values = {f: out[f"{f}_s"].detach().cpu().double().tolist() for f in FIELDS}
        for f, vals in values.items():
            bad = [tt for tt, v in zip(t.tolist(), vals) if not math.isfinite(v)]
            if bad:
                raise ValueError(f"velocity schedule: s(t) of {f} is not finite at t = {bad[0]:.4g} (a damaged schedule)")
        return values

    def multipliers(self, ts: Sequence[float] | torch.Tensor) -> dict[str, list[float]]:
        """The velocity multipliers :math:`1 + s(t)` per field at the times ``ts``."""
        return {f: [1.0 + v for v in vals] for f, vals in self.values(ts).items()}

    def weights_sha256(self) -> str:
        h = hashlib.sha256()
        for k, v in sorted(self.scale.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def record(self) -> dict[str, Any]:
        """What samples.json and summaries record of the schedule used."""
        return {"steps": self.steps, "model_hash": self.model_hash, "weights_sha256": self.weights_sha256(), "source": self.source}

    def checked_for(self, generator: Any, where: str = "velocity schedule") -> "VelocitySchedule":
        """This schedule, if it was learned for ``generator``'s network; a ValueError naming both hashes otherwise."""
        have = generator.model_hash()
        if have != self.model_hash:
            raise ValueError(
                f"{where}: learned for another model (model hash {self.model_hash}, this model's is {have}); "
                "learn a schedule for this model with `crystalign rl fit` (variant: scale)"
            )
        return self

    # ------------------------------------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "state_dict": {k: v.detach().cpu() for k, v in self.scale.state_dict().items()},
            "shared_trunk": self.scale.shared_trunk,
            "steps": self.steps,
            "model_hash": self.model_hash,
            "source": dict(self.source),
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "velocity schedule") -> "VelocitySchedule":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{where}: not a crystalign velocity schedule")
        missing = [k for k in ("state_dict", "steps", "model_hash") if k not in data]
        if missing:
            raise ValueError(f"{where}: damaged velocity schedule: no {', '.join(missing)}")
        scale = ScaleMLP(shared_trunk=bool(data.get("shared_trunk", True)))
        try:
            scale.load_state_dict(data["state_dict"])
        except RuntimeError as err:
            raise ValueError(f"{where}: velocity schedule weights do not fit: {str(err).splitlines()[-1].strip()}") from None
        steps = data["steps"]
        schedule = cls(scale, int(steps) if isinstance(steps, int) else steps, str(data["model_hash"]), dict(data.get("source") or {}))
        schedule.values([0.0, 0.5, 1.0])  # a non-finite schedule is refused when loaded, not mid-sampling
        return schedule

    @classmethod
    def from_rl_checkpoint(cls, path: str | Path) -> "VelocitySchedule":
        """The s(t) a velocity-annealing RL run learned (its best.pt or last.pt), with its base model's hash."""
        from crystalign.generator import Generator
        from crystalign.rl.checkpoints import read_rl_checkpoint

        state = read_rl_checkpoint(path)
        config = state["config"]
        if config.get("variant") != "scale":
            raise ValueError(f"{path}: a {config.get('variant')!r} RL checkpoint has no learned s(t) (train one with variant: scale)")
        weights = {k.removeprefix("scale."): v for k, v in state["policy"].items() if k.startswith("scale.")}
        reference = Generator.from_checkpoint_dict(state["reference"], where=f"{path}:reference")
        scale = ScaleMLP(shared_trunk=not any(k.startswith("nets.") for k in weights))
        try:
            scale.load_state_dict(weights)
        except RuntimeError as err:
            raise ValueError(f"{path}: learned s(t) does not fit: {str(err).splitlines()[-1].strip()}") from None
        source = {
            "rl_checkpoint": Path(path).name,
            "iteration": state.get("iteration"),
            "reward": config.get("reward"),
            "noise": config.get("noise"),
        }
        schedule = cls(scale, int(config.get("steps", 50)), reference.model_hash(), source)
        schedule.values([0.0, 0.5, 1.0])
        return schedule
