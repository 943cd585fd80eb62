"""`crystalign predict`: the shipped model, the real MLIP, bad input, interruption and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch
from typer.testing import CliRunner

from crystalign.cli import app
from crystalign.data import read_structures
from crystalign.prediction import CoverageWarning, predict

# a loose force threshold lets 3 FIRE steps converge: only converged relaxations are ranked as answers
FAST = dict(n=4, rl_steps=2, steps=6, relax_steps=3, fmax=5.0, rl_group_size=2, rl_groups=2)


def test_predict_api_ranks_unique_candidates(tmp_path):
    result = predict("SrTiO3", out=str(tmp_path / "p"), progress=False, **FAST)
    assert result.structures, "no valid candidate"
    assert result.energies == sorted(result.energies)
    assert all(s.composition.reduced_formula == "SrTiO3" for s in result.structures)
    out = tmp_path / "p"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == 4 and summary["rl_steps"] == 2 and len(summary["rl_history"]) == 2
    assert summary["seed"] == 0 and "torch" in summary["versions"] and summary["model_hash"]
    assert (out / "report.html").exists() and (out / "candidates.extxyz").exists()
    for row in summary["candidates"]:
        assert (out / row["file"]).exists()
        assert row["relax"]["status"] in ("converged", "not_converged", "failed")
        assert row["trusted"] == (row["relax"]["status"] == "converged")
    # every relaxation is accounted for
    counted = summary["n_relax_converged"] + summary["n_relax_not_converged"] + summary["n_relax_failed"]
    assert counted == summary["n_relaxed"] >= 1
    # one stated tolerance for the space-group labels; both tolerances and the symmetrised cell of each answer
    best = summary["candidates"][0]
    assert summary["symprec"] == 0.1 and set(best["spacegroups"]) == {"0.01", "0.1"}
    assert best["spacegroup"] == best["spacegroups"]["0.1"] and best["symmetry_note"]
    assert (out / best["conventional_file"]).exists()
    assert summary["mlip"]["name"] == "sevenn" and "sevenn" in summary["versions"] and "ase" in summary["versions"]
    assert summary["options"]["relax_steps"] == summary["relax_steps"] == 3  # a cap given is the cap used
    html = (out / "report.html").read_text()
    assert "SrTiO3" in html and "data:image/png;base64" in html


def test_duplicate_scan_stops_at_the_candidates_it_will_relax(perov_val_csv):
    """predict relaxes the relax_top lowest DISTINCT candidates; the scan for them must not compare every pair
    (n²/2 matches: hours for 700 carbon cells), and must give the same first ones as a full scan."""
    import numpy as np

    from crystalign.prediction import unique_ranked

    distinct = read_structures(perov_val_csv).batch.to_structures()[:12]
    # each structure twice (a copy shifted by a lattice translation), energies interleaved, one invalid
    shifted = [s.copy() for s in distinct]
    for s in shifted:
        s.translate_sites(list(range(len(s))), [0.5, 0.0, 0.0])
    structures = [s.copy() for s in distinct] + shifted
    energies = np.array([float(k) for k in range(12)] + [k + 0.5 for k in range(12)])
    valid = np.ones(24, dtype=bool)
    valid[3] = False
    full = unique_ranked(structures, energies, valid)
    assert full[:3] == [0, 1, 2] and 15 in full and 3 not in full and len(full) == 12  # the copy stands in for 3
    assert unique_ranked(structures, energies, valid, limit=5) == full[:5]
    assert unique_ranked(structures, energies, valid, limit=50) == full


def test_unconverged_candidates_are_never_the_answer(tmp_path):
    """One FIRE step converges nothing: every candidate is listed apart as untrusted, with the reason, and the
    command gives no ranked answer."""
    args = ["predict", "SrTiO3", "-n", "2", "--rl-steps", "0", "--steps", "6", "--relax-steps", "1", "--out", str(tmp_path / "p")]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 1, res.output
    assert "no trustworthy structure among 2 candidates" in res.output and "relaxation did not converge" in res.output
    summary = json.loads((tmp_path / "p" / "summary.json").read_text())
    assert summary["answer"] == "none" and summary["n_unique"] == 0
    assert summary["candidates"] and all(not r["trusted"] and r["rank"] is None for r in summary["candidates"])
    assert all("relaxation did not converge (largest force" in r["untrusted_reason"] for r in summary["candidates"])


def test_predict_warns_outside_training_coverage(tmp_path, mp20_sample_csv):
    import pandas as pd

    formula = str(pd.read_csv(mp20_sample_csv)["pretty_formula"].iloc[0])  # GaTe: 2 atoms per cell, perov_5 saw only 5
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        predict(formula, out=str(tmp_path / "p"), progress=False, n=2, rl_steps=0, steps=4, relax=False, force=True)
    messages = [str(w.message) for w in caught if issubclass(w.category, CoverageWarning)]
    assert any("outside the training range" in m or "never appear" in m for m in messages)
    summary = json.loads((tmp_path / "p" / "summary.json").read_text())
    assert summary["warnings"][: len(messages)] == messages  # the report says it up front
    # without force the query is refused before any work, and leaves nothing behind
    with pytest.raises(ValueError, match=f"{formula}: .*cannot produce this composition; pass --force"):
        predict(formula, out=str(tmp_path / "q"), progress=False, n=2, rl_steps=0, steps=4, relax=False)
    assert not (tmp_path / "q").exists()


def test_a_cell_outside_the_training_range_picks_formula_units_inside_it(tmp_path):
    """carbon_24 saw 6-24 atoms per cell: "C" alone (one atom) samples the -z auto cells instead and says so."""
    with pytest.warns(CoverageWarning, match=r"C has 1 atom\(s\) per cell, outside model carbon_24's training range 6–24: sampling C6, "):
        result = predict("C", model="carbon_24", out=str(tmp_path / "p"), progress=False, n=1, rl_steps=0, steps=4, relax=False)
    assert result.summary["cells"] == ["C6", "C10", "C13", "C17", "C20", "C24"]
    assert all(len(s) >= 6 for s in result.structures)
    # the default cap grows with the largest cell beyond the 400 steps every cell gets
    assert result.summary["relax_steps"] == 20 * 24 and result.summary["options"]["relax_steps"] is None


def test_predict_samples_the_rl_tuned_model_where_its_card_says_it_found_lower_energies(tmp_path):
    """carbon_24_energy's card says it relaxed to lower energies than carbon_24 at an equal MLIP budget: predict on
    carbon_24 draws its candidates from it and says so; --no-tuned keeps the base. perov_5_energy makes no such
    claim, so perov_5 samples itself, and a checkpoint path is taken as given."""
    from crystalign.generator import Generator, resolve_model
    from crystalign.prediction import candidate_model

    assert candidate_model("carbon_24") == "carbon_24_energy"
    assert candidate_model("perov_5") == "perov_5" and candidate_model("carbon_24_energy") == "carbon_24_energy"
    path = str(resolve_model("carbon_24"))
    assert candidate_model(path) == path
    res = CliRunner().invoke(app, ["predict", "C8", "-m", "carbon_24", "-n", "2", "--steps", "4", "--no-relax", "--out", str(tmp_path / "p")])
    assert res.exit_code == 0, res.output
    assert "candidates from carbon_24_energy, the RL-tuned model of carbon_24" in res.output
    summary = json.loads((tmp_path / "p" / "summary.json").read_text())
    assert summary["model"] == "carbon_24_energy" and summary["requested_model"] == "carbon_24"
    assert summary["model_hash"] == Generator.load("carbon_24_energy").model_hash()
    plain = predict("C8", model="carbon_24", tuned=False, out=str(tmp_path / "q"), progress=False, n=2, rl_steps=0, steps=4, relax=False)
    assert plain.summary["model"] == "carbon_24" and plain.summary["model_hash"] == Generator.load("carbon_24").model_hash()


def test_mix_base_draws_a_share_of_the_candidates_from_the_untuned_base(tmp_path):
    """--mix-base 0.5 on perov_5_energy: half the candidates are perov_5's own samples (its default sampler, seed + 1),
    the rest the tuned model's; a model with no base to mix in, or a share outside [0, 1), is refused."""
    from crystalign.generator import Generator, composition_batch
    from crystalign.prediction import _read_extxyz, mixed_counts

    assert mixed_counts(32, 0.5) == (16, 16) and mixed_counts(32, 0.0) == (32, 0) and mixed_counts(2, 0.1) == (1, 1)
    res = CliRunner().invoke(app, ["predict", "SrTiO3", "-m", "perov_5_energy", "--mix-base", "0.5", "-n", "6", "--steps", "4", "--no-relax", "--out", str(tmp_path / "p")])
    assert res.exit_code == 0, res.output
    assert "3 candidates per cell from perov_5, the base of perov_5_energy (--mix-base)" in res.output
    summary = json.loads((tmp_path / "p" / "summary.json").read_text())
    assert summary["mix_base"] == {"share": 0.5, "model": "perov_5", "n_per_cell": 3} and summary["n_candidates"] == 6
    candidates = _read_extxyz(tmp_path / "p" / "base.extxyz")
    template = composition_batch(["SrTiO3"], 3).to(dtype=torch.float32)
    for model, seed, rows in (("perov_5_energy", 0, slice(0, 15)), ("perov_5", 1, slice(15, 30))):
        expected = Generator.load(model).sample(template, seed=seed, steps=4)
        torch.testing.assert_close(candidates.frac[rows].float(), expected.frac.float(), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="model perov_5 was not RL-tuned from a base model"):
        predict("SrTiO3", model="perov_5", mix_base=0.5, out=str(tmp_path / "q"), progress=False, n=2, relax=False)
    assert not (tmp_path / "q").exists()
    with pytest.raises(ValueError, match=r"--mix-base must be a share in \[0, 1\), got 1.0"):
        predict("SrTiO3", model="perov_5_energy", mix_base=1.0, out=str(tmp_path / "r"), progress=False, n=2, relax=False)


def test_a_composition_the_model_cannot_cover_is_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match=r"SrPO3: element\(s\) P never appear in model perov_5's training data"):
        predict("SrPO3", out=str(tmp_path / "p"), progress=False, n=2, rl_steps=0, relax=False)
    # LiFePO4: 7 atoms, and no multiple of 7 lies in perov_5's range of 5 atoms per cell
    with pytest.raises(ValueError, match=r"LiFePO4: no cell of this composition has a size in model perov_5's training range of 5–5"):
        predict("LiFePO4", out=str(tmp_path / "p"), progress=False, n=2, rl_steps=0, relax=False)
    assert not (tmp_path / "p").exists()


def test_formula_units_scan_cell_sizes(tmp_path):
    """-z samples -n candidates of each cell size and ranks them together; RL draws its groups from all sizes."""
    from crystalign.prediction import cell_formulas

    # a budget of 21 MLIP evaluations: 3 base + 3 policy candidates per size (12), then as many RL iterations of
    # 2 groups of 2 as the other 9 pay for (2, not the 10 asked for)
    result = predict("C", model="carbon_24", formula_units="6,8", out=str(tmp_path / "p"), progress=False, n=3, rl_steps=10,
                     budget=21, rl_group_size=2, rl_groups=2, steps=4, relax=False)
    assert result.summary["cells"] == ["C6", "C8"]
    # 3 per size from the base model, 3 per size from the RL policy, and the 2 x 4 rollouts RL's reward scored
    assert result.summary["n_candidates"] == 20 and result.summary["n_rollout_candidates"] == 8
    # every answer says where it was sampled, and the report shows it
    rows = json.loads((tmp_path / "p" / "summary.json").read_text())["candidates"]
    assert rows and {r["source"] for r in rows} <= {"base", "rl policy", "rl rollout 1", "rl rollout 2"}
    assert "sampled by" in (tmp_path / "p" / "report.html").read_text()
    assert result.summary["rl_steps"] == 2 and len(json.loads((tmp_path / "p" / "summary.json").read_text())["rl_history"]) == 2
    assert result.summary["mlip_energy_evaluations"] == 20 and result.summary["budget"] == 21
    # without RL the budget is the number of candidates, split evenly over the cell sizes
    plain = predict("C", model="carbon_24", formula_units="6,8", out=str(tmp_path / "q"), progress=False, budget=7, steps=4, relax=False)
    assert plain.summary["n"] == 3 and plain.summary["n_candidates"] == 6 and plain.summary["mlip_energy_evaluations"] == 6
    sizes = sorted(len(s) for s in read_structures(tmp_path / "p" / "base.extxyz").batch.to_structures())
    assert sizes == [6, 6, 6, 8, 8, 8]
    assert all(s.composition.reduced_formula == "C" for s in result.structures)
    # the energies stored with the rollouts are the potential's energies of those very structures
    from crystalign.prediction import _read_rollouts
    from crystalign.rewards import EnergyReward
    from crystalign.rewards.mlip import get_backend

    rollouts = _read_rollouts(tmp_path / "p" / "rl_rollouts", 2)
    assert [(r[0], r[1].num_structures) for r in rollouts] == [("rl rollout 1", 4), ("rl rollout 2", 4)]
    again = EnergyReward(get_backend("sevenn").load())(rollouts[1][1]).info["energy_per_atom_ev"].double()
    torch.testing.assert_close(again, rollouts[1][2], equal_nan=True, atol=1e-5, rtol=0)
    # the ablation ranks the base and policy candidates only, from the same RL run
    policy_only = predict("C", model="carbon_24", formula_units="6,8", out=str(tmp_path / "r"), progress=False, n=3, rl_steps=10,
                          budget=21, rl_group_size=2, rl_groups=2, steps=4, relax=False, rank_rollouts=False)
    assert policy_only.summary["n_candidates"] == 12 and policy_only.summary["n_rollout_candidates"] == 0
    assert not (tmp_path / "r" / "rl_rollouts").exists()
    # auto: the multiples inside the model's training range of cell sizes, spread evenly, at most six
    assert cell_formulas("C", "auto", {"n_atoms_min": 6, "n_atoms_max": 24}) == ["C6", "C10", "C13", "C17", "C20", "C24"]
    assert cell_formulas("SrTiO3", "2,1,2", None) == ["SrTiO3", "Sr2Ti2O6"]
    assert cell_formulas("Sr2Ti2O6", "", None) == ["Sr2Ti2O6"]


def test_rl_that_trips_its_guard_falls_back_to_the_base_candidates(tmp_path):
    """The carbon model cannot make a perovskite: every RL structure is rejected, the guard stops RL, and predict
    still ranks the base candidates, says why, and records it."""
    from crystalign.prediction import RLStoppedWarning

    with pytest.warns(RLStoppedWarning, match="inference-time RL stopped .*max_invalid_fraction"):
        result = predict("Sr2Ti2O6", model="carbon_24", out=str(tmp_path / "p"), progress=False, n=4, rl_steps=2,
                         rl_group_size=2, rl_groups=2, steps=4, relax=False, force=True)
    assert "max_invalid_fraction" in result.summary["rl_stopped"]
    assert result.summary["n_candidates"] == 4  # the base samples only
    assert json.loads((tmp_path / "p" / "summary.json").read_text())["rl_stopped"] == result.summary["rl_stopped"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["Xx3O"], "unknown or unsupported element Xx"),
        ([""], "cannot parse"),
        (["Sr0TiO3"], "zero count"),
        (["SrTiO3", "-n", "0"], "positive number"),
        (["AmO2", "--no-relax", "--rl-steps", "0", "--force"], "does not support element"),
        (["SrTiO3", "--mlip-model", "no-such-7net"], "no-such-7net does not exist"),
        (["SrTiO3", "-z", "0,1"], "comma list of positive integers"),
        (["SrTiO3", "--budget", "0"], "--budget must be a positive number of MLIP energy evaluations"),
        (["SrTiO3", "-n", "4", "--budget", "8"], "give -n or --budget, not both"),
        (["SrTiO3", "--budget", "95", "--rl-steps", "5"], "--budget 95 is smaller than one RL iteration's groups after the candidates: 32 base + 32 policy candidates + 4 groups of 8 = 96"),
        (["SrTiO3", "-z", "1,2,4", "--budget", "2", "--no-relax"], "--budget 2 is smaller than one candidate per cell size (3 cell sizes)"),
        (["SrTi2O5", "-z", "auto"], "no multiple of SrTi2O5 (8 atoms)"),
        (["SrTiO3", "--rl-steps", "2", "--rl-novelty", "-0.1"], "--rl-novelty must be >= 0 eV/atom"),
        (["SrTiO3", "--rl-steps", "2", "--rl-novelty", "0.2", "--no-rank-rollouts"], "it needs --rank-rollouts"),
        (["SrTIO3"], "did you mean Ti"),
        pytest.param(["SrTiO3", "--device", "cuda"], "CUDA is not available",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the request is valid")),
    ],
)
def test_predict_bad_input(tmp_path, args, message):
    res = CliRunner().invoke(app, ["predict", *args, "--out", str(tmp_path / "deep" / "er" / "p")])
    assert res.exit_code != 0
    assert message in res.output
    assert not (tmp_path / "deep").exists()  # a refused query leaves no empty folders behind


def test_multi_fidelity_mlip_takes_its_modal(tmp_path):
    args = ["predict", "SrTiO3", "-n", "2", "--rl-steps", "0", "--steps", "3", "--no-relax", "--mlip-model", "7net-mf-0"]
    res = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "none")])
    assert res.exit_code != 0 and "needs modal= one of ['PBE', 'R2SCAN'] (--modal on the command line)" in res.output
    res = CliRunner().invoke(app, [*args, "--modal", "PBE", "--out", str(tmp_path / "pbe")])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "pbe" / "summary.json").read_text())
    assert summary["options"]["mlip_modal"] == "PBE" and summary["n_candidates"] == 2
    # a modal for a model without modals would be recorded but not used
    res = CliRunner().invoke(app, [*args[:-2], "--modal", "PBE", "--out", str(tmp_path / "plain")])
    assert res.exit_code != 0 and "has no modals" in res.output and not (tmp_path / "plain").exists()


def test_unwritable_output_fails_before_any_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    t0 = time.time()
    res = CliRunner().invoke(app, ["predict", "SrTiO3", "--out", str(blocker / "sub")])
    assert res.exit_code != 0 and "not writable" in res.output
    assert time.time() - t0 < 5  # no model or MLIP was loaded


def test_existing_output_needs_resume(tmp_path):
    out = tmp_path / "p"
    predict("SrTiO3", out=str(out), progress=False, n=2, rl_steps=0, steps=4, relax=False)
    with pytest.raises(FileExistsError, match="--resume"):
        predict("SrTiO3", out=str(out), progress=False, n=2, rl_steps=0, steps=4, relax=False)
    with pytest.raises(ValueError, match="options differ from the interrupted run in n;"):
        predict("SrTiO3", out=str(out), progress=False, n=3, rl_steps=0, steps=4, relax=False, resume=True)
    # a run folder written before an option existed resumes: the option had its default value there
    state = json.loads((out / "state.json").read_text())
    del state["options"]["mlip_model"]
    (out / "state.json").write_text(json.dumps(state))
    again = predict("SrTiO3", out=str(out), progress=False, n=2, rl_steps=0, steps=4, relax=False, resume=True)
    assert again.summary["n_candidates"] == 2


def test_ctrl_c_keeps_partial_results_and_resume_finishes(tmp_path):
    out = tmp_path / "p"
    cmd = [sys.executable, "-m", "crystalign.cli", "predict", "SrTiO3", "-n", "4", "--rl-steps", "12", "--steps", "6", "--no-relax",
           "--rl-novelty", "0.25", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 240
    while time.time() < deadline and not (out / "rl" / "last.pt").exists():
        time.sleep(0.2)
    assert (out / "rl" / "last.pt").exists(), "the run never reached the RL stage"
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 130, output
    assert "--resume" in output
    base = (out / "base.extxyz").read_bytes()
    import torch

    done = torch.load(out / "rl" / "last.pt", weights_only=True)["iteration"]
    assert 1 <= done < 12
    res = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert (out / "base.extxyz").read_bytes() == base  # finished stages are not redone
    summary = json.loads((out / "summary.json").read_text())
    assert [r["iteration"] for r in summary["rl_history"]] == list(range(1, 13))
    # every iteration's scored rollouts are kept across the kill, once each
    assert sorted(p.name for p in (out / "rl_rollouts").iterdir()) == [f"{i:04d}.extxyz" for i in range(1, 13)]
    assert summary["n_rollout_candidates"] == 12 * 32
    # the novelty archive is rebuilt on resume: it never shrinks across the kill (a fresh archive would restart
    # from the base candidates alone)
    sizes = [r["archive_size_mean"] for r in summary["rl_history"]]
    assert sizes == sorted(sizes) and sizes[done] >= sizes[done - 1], sizes


def test_relaxation_reports_convergence_and_a_failure_keeps_the_unrelaxed_geometry(tmp_path, perov_val_csv):
    """Real SevenNet forces; a calculator that starts failing part-way stands in for an MLIP crash."""
    import numpy as np
    from ase.calculators.calculator import Calculator, all_changes

    from crystalign.data import read_structures
    from crystalign.prediction import relax_structures
    from crystalign.rewards.mlip import ASECalculatorBackend, get_backend

    batch = read_structures(perov_val_csv).batch[:2]
    kick = torch.randn(batch.frac.shape, generator=torch.Generator().manual_seed(0), dtype=batch.frac.dtype)
    batch = batch.replace(frac=(batch.frac + 0.03 * kick) % 1.0)  # off the minimum
    sevenn = get_backend("sevenn")
    inner = sevenn.ase_calculator()

    class FailsAfter(Calculator):
        implemented_properties = ["energy", "free_energy", "forces", "stress"]

        def __init__(self, calls):
            super().__init__()
            self.calls = calls

        def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
            self.calls -= 1
            if self.calls < 0:
                raise RuntimeError("simulated MLIP failure")
            super().calculate(atoms, properties, system_changes)
            probe = atoms.copy()
            probe.calc = inner
            e = probe.get_potential_energy()
            self.results = {"energy": e, "free_energy": e, "forces": probe.get_forces(), "stress": probe.get_stress()}

    relaxed, records = relax_structures(batch, sevenn, 2, 1e-4, tmp_path / "short", progress=False)
    assert [r["status"] for r in records] == ["not_converged"] * 2 and all(r["steps"] == 2 for r in records)
    # resuming (every file present) returns exactly what the fresh run returned, records included
    resumed, resumed_records = relax_structures(batch, sevenn, 2, 1e-4, tmp_path / "short", progress=False)
    assert torch.equal(resumed.frac, relaxed.frac) and torch.equal(resumed.lattice, relaxed.lattice)
    assert resumed_records == records
    # the recorded fmax covers the atomic forces of the returned structure (the cell filter adds the stress terms)
    atoms = relaxed.to_atoms()[0]
    atoms.calc = inner
    assert records[0]["fmax_ev_per_a"] >= np.sqrt((atoms.get_forces() ** 2).sum(-1)).max() - 1e-3 > 1e-4
    with pytest.warns(UserWarning, match="simulated MLIP failure"):
        failed, records = relax_structures(batch[:1], ASECalculatorBackend(FailsAfter(5)), 100, 0.01, tmp_path / "crash", progress=False)
    assert records[0]["status"] == "failed" and "simulated MLIP failure" in records[0]["error"]
    assert torch.allclose(failed.frac, batch[:1].frac.to(failed.dtype), atol=1e-6)
    assert torch.allclose(failed.lattice, batch[:1].lattice.to(failed.dtype), atol=1e-6)
    # a resumed run reads the same records back from the per-structure files
    _, again = relax_structures(batch[:1], ASECalculatorBackend(FailsAfter(0)), 100, 0.01, tmp_path / "crash", progress=False)
    assert again == records


def test_no_valid_candidate_is_a_failure_that_says_why(tmp_path):
    """Cells three times larger than anything the perov_5 model saw: nothing valid comes out, and predict says so
    with a non-zero exit instead of reporting 'best nan'."""
    res = CliRunner().invoke(app, ["predict", "SrTiO3", "-z", "3", "-n", "2", "--rl-steps", "0", "--no-relax", "--out", str(tmp_path / "p")])
    assert res.exit_code == 1, res.output
    assert "Sr3Ti3O9: no trustworthy structure among 2 candidates" in res.output and "nan" not in res.output
    assert (tmp_path / "p" / "report.html").exists()  # the report still shows what was sampled


def test_a_model_with_a_learned_schedule_samples_with_it_unless_told_not_to(tmp_path):
    annealed = predict("SrTiO3", model="perov_5_annealed", out=str(tmp_path / "a"), progress=False, n=2, relax=False)
    record = annealed.summary["schedule"]
    assert annealed.summary["steps"] == record["steps"] == 20 and record["model_hash"] == annealed.summary["model_hash"]
    plain = predict("SrTiO3", model="perov_5_annealed", out=str(tmp_path / "b"), progress=False, n=2, relax=False, schedule=False)
    assert plain.summary["schedule"] is None and plain.summary["steps"] == 50
    assert annealed.summary["rl_steps"] == 0  # per-query RL is opt-in
