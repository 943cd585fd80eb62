"""Statistics of a batch of generated structures for the RL history: rewards, validity, volume drift,
duplicates (the keys are listed in :class:`~crystalign.rl.trainer.RLTrainer`'s docstring)."""

from __future__ import annotations

from typing import Any

import torch

from crystalign.crystal import CrystalBatch


def batch_statistics(
    final: CrystalBatch, rewards: torch.Tensor, info: dict[str, torch.Tensor], group_size: int | None,
    template: CrystalBatch | None = None, duplicate_check: bool = True,
) -> dict[str, Any]:
    """Reward statistics and reward-hacking guards of one batch (keys: see ``RLTrainer``); ``template`` holds the
    dataset structures the compositions came from, ``duplicate_check`` adds ``duplicate_fraction`` per group."""
    final = final.to("cpu")  # monitoring only; rewards and their info may live on another device than the states
    report = final.validity()
    valid = report.valid
    rewards = rewards.cpu()
    row: dict[str, Any] = {
        "reward_mean": float(rewards.mean()),
        "reward_std": float(rewards.std(unbiased=False)),
        "invalid_fraction": float(1.0 - valid.double().mean()),
    }
    rejected = ~valid
    if "valid" in info:
        by_reward = info["valid"].detach().cpu() == 0
        row["reward_invalid_fraction"] = float(by_reward.double().mean())
        rejected = rejected | by_reward
    row["rejected_fraction"] = float(rejected.double().mean())
    if group_size:
        row["reward_std_within_group"] = float(rewards.view(-1, group_size).std(dim=1, unbiased=False).mean())
    for key, value in info.items():
        if key == "valid":
            continue
        v = value.detach().double().cpu()
        finite = torch.isfinite(v)
        is_flag = bool(((v[finite] == 0) | (v[finite] == 1)).all())
        mask = finite if is_flag else finite & valid  # a flag counts every structure, e.g. invalid_geometry
        row[f"{key}_mean"] = float(v[mask].mean()) if bool(mask.any()) else float("nan")
    vpa = report.volume / final.n_atoms.to(report.volume.dtype)
    row["volume_per_atom_a3"] = float(vpa[valid].mean()) if bool(valid.any()) else float("nan")
    if template is not None:
        drift = volume_drift_vs_data(vpa, valid, template.to("cpu"))
        if drift is not None:
            row["volume_per_atom_drift_vs_data"] = drift
    if group_size and duplicate_check:
        row["duplicate_fraction"] = duplicate_fraction(final, group_size, valid)
    return row


def volume_drift_vs_data(volume_per_atom: torch.Tensor, valid: torch.Tensor, template: CrystalBatch) -> float | None:
    """Mean of V/N(generated) / V/N(template) − 1 over valid generated structures whose template holds a real cell;
    None when no template does (composition-only templates carry a 1 Å^3 placeholder cell)."""
    from crystalign.rewards.energy import MAX_NUMBER_DENSITY

    ref = template.validity()
    ref_vpa = ref.volume / template.n_atoms.to(ref.volume.dtype)
    real = ref.valid & (ref_vpa >= 1.0 / MAX_NUMBER_DENSITY)
    if not bool(real.any()):
        return None
    use = real & valid
    return float((volume_per_atom[use] / ref_vpa[use]).mean() - 1.0) if bool(use.any()) else float("nan")


def duplicate_fraction(final: CrystalBatch, group_size: int, valid: torch.Tensor) -> float:
    """Fraction of valid structures that duplicate an earlier member of their group (benchmark matcher)."""
    from crystalign.matching import make_matcher

    matcher = make_matcher()
    structures = final.to_structures()
    dup = 0
    total = 0
    for g0 in range(0, len(structures), group_size):
        kept: list = []
        for i in range(g0, min(g0 + group_size, len(structures))):
            if not bool(valid[i]):
                continue
            total += 1
            s = structures[i]
            if any(matcher.fit(s, k) for k in kept):
                dup += 1
            else:
                kept.append(s)
    return dup / total if total else 0.0


def distinct_formula_fraction(batch: CrystalBatch) -> float:
    """Distinct reduced formulas per structure of a batch (1: all different): a de novo policy that collapses onto
    a few easy chemistries to hack its reward shows here first."""
    from math import gcd

    keys = set()
    for z in batch.species.cpu().split(batch.n_atoms.cpu().tolist()):
        elements, counts = torch.unique(z, return_counts=True)
        g = 0
        for c in counts.tolist():
            g = gcd(g, c)
        keys.add(tuple(zip(elements.tolist(), (c // max(g, 1) for c in counts.tolist()))))
    return len(keys) / max(batch.num_structures, 1)
