"""RL monitoring on tiny networks and real reward components: zero-weight composite terms in validation only,
cRMSE terms with per-split references, invalidity counted from the reward's own ``valid`` key, and the volume
drift measured against the dataset cells of the same compositions."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from pymatgen.core import Lattice, Structure

from crystalign.cli.rl import build_rewards
from crystalign.crystal import CrystalBatch
from crystalign.generator import composition_batch
from crystalign.rewards import CallableReward, CompositeReward, NonCentrosymmetricReward, NonTriclinicReward
from crystalign.rl.rollout import Policy
from crystalign.rl.trainer import RLDivergedError, RLTrainer

from test_rl_loop import config, tiny_generator


def rocksalt_nacl() -> Structure:
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]).get_primitive_structure()


def cscl_type_nacl() -> Structure:
    return Structure.from_spacegroup("Pm-3m", Lattice.cubic(3.3), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def srtio3(a: float = 3.905) -> Structure:
    return Structure.from_spacegroup("Pm-3m", Lattice.cubic(a), ["Sr", "Ti", "O"], [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0]])


def cscl() -> Structure:
    return Structure.from_spacegroup("Pm-3m", Lattice.cubic(4.12), ["Cs", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def batch_of(structures) -> CrystalBatch:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CrystalBatch.from_structures(structures).to(dtype=torch.float32)


class Spy:
    """A real reward that records the batch sizes it is called with."""

    def __init__(self, reward):
        self.reward, self.name, self.sizes = reward, reward.name, []

    def __call__(self, batch):
        self.sizes.append(batch.num_structures)
        return self.reward(batch)


# ---------------------------------------------------------------------------------------------- fix 1: composites
def test_zero_weight_terms_are_computed_in_validation_only(tmp_path):
    watch = Spy(NonCentrosymmetricReward())
    reward = CompositeReward([("sym", NonTriclinicReward(), 1.0), ("watch", watch, 0.0)])
    cfg = config(iterations=2, group_size=4, num_groups=2)
    cfg.validation.every, cfg.validation.num_compositions = 1, 3
    trainer = RLTrainer(Policy(tiny_generator(), cfg), reward, cfg, composition_batch(["NaCl", "KBr"]).to(dtype=torch.float32),
                        validation=composition_batch(["SrTiO3", "CsCl", "LiF"]).to(dtype=torch.float32), progress=False)
    history = trainer.fit(tmp_path)
    assert watch.sizes == [3, 3, 3]  # the iteration-0 baseline and two validations; never a training batch of 8
    assert not reward.monitor
    for row in history:
        assert "val_watch/reward_mean" in row and "val_watch/non_centrosymmetric_mean" in row
        assert not any(k.startswith("watch/") for k in row)


def test_crmse_terms_of_a_composite_get_per_split_references():
    train, hold = batch_of([rocksalt_nacl()]), batch_of([cscl_type_nacl()])
    spec = {"kind": "composite", "terms": [
        {"kind": "crmse", "weight": 1.0},
        {"kind": "composite", "name": "inner", "weight": 0.5, "terms": [
            {"kind": "crmse", "weight": 1.0}, {"kind": "non_triclinic", "weight": 0.0}]},
        {"kind": "non_centrosymmetric", "weight": 0.0},
    ]}
    train_reward, val_reward = build_rewards(spec, train, hold)
    generated = train  # identical to the training reference, no match with the held-out one
    tr, va = train_reward(generated), val_reward(generated)
    assert tr.info["crmse/crmse"].tolist() == [0.0] and tr.info["inner/crmse/crmse"].tolist() == [0.0]
    assert va.info["crmse/crmse"].tolist() == [0.5] and va.info["inner/crmse/crmse"].tolist() == [0.5]  # stol
    assert tr.rewards.tolist() == [0.75] and va.rewards.tolist() == [0.0]
    # zero weights: skipped in training, computed in validation, at any depth
    for key in ("non_centrosymmetric/reward", "inner/non_triclinic/reward"):
        assert key not in tr.info and key in va.info
    assert va.info["inner/non_triclinic/non_triclinic"].tolist() == [1.0]
    assert not train_reward.monitor and val_reward.monitor
    assert val_reward.terms[2][1] is train_reward.terms[2][1]  # terms without references are shared, not rebuilt
    # no held-out split: validation keeps the training references
    _, same = build_rewards(spec, train, train[:0])
    assert same(generated).info["crmse/crmse"].tolist() == [0.0]


# ---------------------------------------------------------------------------------------------- fix 2: invalidity
def test_monitor_counts_structures_the_reward_rejects():
    base = srtio3()
    overlap = base.copy()
    overlap.replace(1, "Ti", coords=base[0].coords + np.array([0.1, 0, 0]), coords_are_cartesian=True)
    huge, large = base.copy(), base.copy()
    huge.scale_lattice(base.volume * 8)
    large.scale_lattice(base.volume * 1.5)
    batch = batch_of([base, overlap, huge, large])

    def below(limit):
        return lambda ss: [1.0 if s.volume < limit * base.volume else math.nan for s in ss]

    reward = CompositeReward([
        ("small", CallableReward(below(4.0), name="small"), 1.0),  # rejects the 8x cell (and the overlap)
        ("sym", NonTriclinicReward(), 0.0),
        ("tiny", CallableReward(below(1.2), name="tiny"), 0.0),  # zero weight: its rejections do not count
    ], monitor=True)
    result = reward(batch)
    assert result.info["valid"].tolist() == [1.0, 0.0, 0.0, 1.0]
    cfg = config()
    trainer = RLTrainer(Policy(tiny_generator(), cfg), reward, cfg, composition_batch(["SrTiO3"]), progress=False)
    row = trainer._monitor(batch, result.rewards, result.info, None)
    assert row["invalid_fraction"] == 0.25  # geometric check only, as before
    assert row["reward_invalid_fraction"] == 0.5 and row["rejected_fraction"] == 0.5
    # 0/1 flags are averaged over all structures (the overlap counts), quantities over valid geometries
    assert row["small/valid_mean"] == 0.5 and row["tiny/valid_mean"] == 0.25
    assert row["sym/non_triclinic_mean"] == 0.75
    assert row["sym/space_group_number_mean"] == 221.0


def test_guard_stops_a_run_whose_structures_the_reward_rejects(tmp_path):
    cfg = config(max_invalid_fraction=0.5)
    reject_all = CallableReward(lambda ss: [math.nan] * len(ss), name="reject")
    trainer = RLTrainer(Policy(tiny_generator(), cfg), reject_all, cfg, composition_batch(["NaCl"]).to(dtype=torch.float32),
                        progress=False)
    rows = []
    # every geometry is valid, so a guard on the geometric check alone would never fire
    with pytest.raises(RLDivergedError, match=r"invalid fraction 1\.00 \(geometry 0\.00, rejected by the reward 1\.00\)"):
        trainer.fit(tmp_path, on_iteration=rows.append)
    assert rows == []


# ---------------------------------------------------------------------------------------------- fix 3: volume drift
def test_volume_drift_compares_with_the_dataset_cells_of_the_same_compositions():
    template = batch_of([rocksalt_nacl(), srtio3(), cscl()])
    generated = template.replace(lattice=template.lattice * 1.1)  # every cell 1.331x its dataset volume
    cfg = config()
    trainer = RLTrainer(Policy(tiny_generator(), cfg), NonTriclinicReward(), cfg, template, progress=False)
    info = NonTriclinicReward()(generated).info
    row = trainer._monitor(generated, torch.zeros(3), info, None, template)
    assert row["volume_per_atom_drift_vs_data"] == pytest.approx(1.1**3 - 1, rel=1e-5)
    # the same cells in another mix of compositions: the same drift (a pooled baseline would change)
    mixed = torch.tensor([0, 0, 2])
    row = trainer._monitor(generated[mixed], torch.zeros(3), NonTriclinicReward()(generated[mixed]).info, None, template[mixed])
    assert row["volume_per_atom_drift_vs_data"] == pytest.approx(1.1**3 - 1, rel=1e-5)
    # composition-only templates hold no dataset cell (the 1-atom placeholder cell passes the geometric check)
    placeholder = composition_batch(["NaCl", "Fe"]).to(dtype=torch.float32)
    assert "volume_per_atom_drift_vs_data" not in trainer._monitor(generated[:2], torch.zeros(2), {}, None, placeholder)


def test_training_volume_drift_does_not_depend_on_the_validation_set(tmp_path):
    """Formerly the baseline was the first validation pass's V/N: training drifts changed with the validation set."""
    drifts = []
    for i, val in enumerate(([srtio3()], [cscl()])):
        cfg = config(iterations=2, lr=1e-12, group_size=4, num_groups=1)
        cfg.validation.every = 1
        trainer = RLTrainer(Policy(tiny_generator(), cfg), NonTriclinicReward(), cfg, batch_of([cscl(), rocksalt_nacl()]),
                            validation=batch_of(val), progress=False)
        history = trainer.fit(tmp_path / str(i))
        assert all("val_volume_per_atom_drift_vs_data" in row for row in history)  # against the held-out cells
        drifts.append([row["volume_per_atom_drift_vs_data"] for row in history[1:]])
    assert drifts[0] == drifts[1] and all(math.isfinite(d) for d in drifts[0])
