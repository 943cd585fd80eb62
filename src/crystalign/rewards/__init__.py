"""Rewards for inference-time RL: maps a CrystalBatch to per-structure rewards (maximised) and diagnostics.

MLIP packages (sevenn, chgnet, mace) are imported only when a backend is first used.

Example::

    from crystalign.rewards import make_reward
    reward = make_reward({"kind": "composite", "terms": [{"kind": "energy", "weight": 1.0}]})
    result = reward(batch)          # result.rewards (B,), result.info["energy/energy_per_atom_ev"]
"""

from crystalign.rewards.base import (
    CallableReward,
    Reward,
    RewardResult,
    available_rewards,
    make_reward,
    register_reward,
)
from crystalign.rewards.composite import CompositeReward
from crystalign.rewards.crmse import CRMSEReward
from crystalign.rewards.energy import EnergyReward, screened_energies
from crystalign.rewards.hull import EnergyAboveHullReward, ReferenceHull, build_hull
from crystalign.rewards.mlip import (
    ASECalculatorBackend,
    CHGNetBackend,
    MACEBackend,
    MLIPBackend,
    SevenNetBackend,
    get_backend,
)
from crystalign.rewards.references import load_structures
from crystalign.rewards.symmetry import NonCentrosymmetricReward, NonTriclinicReward

__all__ = [
    "ASECalculatorBackend",
    "CHGNetBackend",
    "CRMSEReward",
    "CallableReward",
    "CompositeReward",
    "EnergyAboveHullReward",
    "EnergyReward",
    "MACEBackend",
    "MLIPBackend",
    "NonCentrosymmetricReward",
    "NonTriclinicReward",
    "ReferenceHull",
    "Reward",
    "RewardResult",
    "SevenNetBackend",
    "available_rewards",
    "build_hull",
    "get_backend",
    "load_structures",
    "make_reward",
    "register_reward",
    "screened_energies",
]
