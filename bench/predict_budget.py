"""Does per-query RL beat sampling more? `crystalign predict` at an equal MLIP budget.

Two ways to spend the same number of MLIP energy evaluations before relaxation:

  (a) ``best_of_n``: ``predict(..., rl_steps=0, n=N)``, N base-model samples, N = the RL run's count below;
  (b) ``tuned_best_of_n``: as (a) with the RL-tuned model of the base (``--tuned perov_5=perov_5_energy``);
  (c) ``rl``: ``predict(..., rl_steps=--rl-steps)``: n base samples, rl_steps iterations of rl_groups x
      rl_group_size trajectories, n samples of the reinforced policy, i.e. n + rl_steps * rl_groups * rl_group_size
      + n evaluations (704 with --rl-steps 20 and the other defaults of :class:`crystalign.prediction.PredictOptions`);
  (d) ``tuned_rl``: as (c), starting from the RL-tuned model.

(c) and (d) rank every rollout RL's reward scored with the candidates (predict's ``rank_rollouts``, on by default);
``rl_policy_only`` and ``tuned_rl_policy_only`` are the same runs ranking only the base and the final policy's
candidates (``rank_rollouts=False``), the ablation of that choice. ``rl_novelty`` and ``tuned_rl_novelty`` are (c) and
(d) with a reward cost of NOVELTY_EV eV/atom for a rollout that repeats a structure already found (``rl_novelty``).
``tuned_mixed_best_of_n`` is (b) with MIX_BASE of its candidates drawn from the untuned base model (predict's
``mix_base``): the tuned model's candidates are lower in energy, the base model's reach more basins.

``--methods`` picks the arms (default: all whose model exists); every arm is compared with (a).

Both relax their lowest-energy distinct candidates (default relax options). Per query and method the script
records the lowest trusted relaxed energy per atom, the MLIP calls it made (counted on the backend: energy
evaluations before relaxation, force calls during relaxation and after it), the structures relaxed and their FIRE
steps, the wall time per stage, and whether the known structure is ranked first / within the top 5:

  * perov_5: the first ``--count`` held-out structures of the dev split (seeded 90/10 of perov_5/val.csv), model
    perov_5, composition = the reference's formula, seed = the row index; benchmark StructureMatcher;
  * carbon: C<k> for each ``--carbon`` size with model carbon_24, seed = the size's position in the list; known
    allotropes diamond, lonsdaleite and AB graphite, matched with a supercell-tolerant StructureMatcher.

Carbon queries run first, then perov_5 (both methods per query before the next query). Resumable: queries already
in ``--out`` are skipped, so a killed run continues where it stopped.

    OMP_NUM_THREADS=1 python bench/predict_budget.py --count 20 --carbon 8 12 16 --threads 1 \\
        --out bench/results/predict_budget.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

TIE_EV = 1e-3  # |difference| below 1 meV/atom is a tie
METHODS = (
    "best_of_n", "rl", "tuned_best_of_n", "tuned_rl", "rl_policy_only", "tuned_rl_policy_only", "rl_novelty", "tuned_rl_novelty",
    "tuned_mixed_best_of_n",
)
MIX_BASE = 0.5  # tuned_mixed_best_of_n: the share of its candidates drawn from the untuned base model
NOVELTY_EV = 0.25  # the rl_novelty arms' cost of a repeated structure (eV/atom)
DEFAULT_METHODS = METHODS[:4]
ALLOTROPES = ("diamond", "lonsdaleite", "graphite")


# ---------------------------------------------------------------------- known carbon structures
def carbon_allotropes() -> dict[str, Any]:
    """Diamond (2 atoms), lonsdaleite (4 atoms) and AB-stacked graphite (4 atoms) as pymatgen Structures."""
    from ase.build import bulk
    from pymatgen.core import Lattice, Structure
    from pymatgen.io.ase import AseAtomsAdaptor

    diamond = AseAtomsAdaptor.get_structure(bulk("C", "diamond", a=3.567))
    # P6_3/mmc, C on 4f (1/3, 2/3, z), z = 1/16 for ideal tetrahedra
    lonsdaleite = Structure.from_spacegroup("P6_3/mmc", Lattice.hexagonal(2.51, 4.12), ["C"], [[1 / 3, 2 / 3, 0.0625]])
    # P6_3/mmc, C on 2b (0, 0, 1/4) and 2c (1/3, 2/3, 1/4)
    graphite = Structure.from_spacegroup("P6_3/mmc", Lattice.hexagonal(2.46, 6.71), ["C", "C"], [[0, 0, 0.25], [1 / 3, 2 / 3, 0.25]])
    refs = {"diamond": diamond, "lonsdaleite": lonsdaleite, "graphite": graphite}
    sizes = {name: len(s) for name, s in refs.items()}
    if sizes != {"diamond": 2, "lonsdaleite": 4, "graphite": 4}:
        raise RuntimeError(f"unexpected allotrope cells: {sizes}")
    return refs


def supercell_matcher():
    from pymatgen.analysis.structure_matcher import StructureMatcher

    return StructureMatcher(ltol=0.3, stol=0.5, angle_tol=10, primitive_cell=True, attempt_supercell=True, scale=True)


def check_allotrope_matcher(refs: dict[str, Any], matcher) -> dict[str, Any]:
    """The matcher finds supercells (also strained and rattled ones) of each allotrope and tells them apart."""
    import numpy as np

    checks: dict[str, Any] = {}
    np.random.seed(0)  # Structure.perturb draws from numpy's global stream
    for name, ref in refs.items():
        for label, scaling in (("2x2x2", [[2, 0, 0], [0, 2, 0], [0, 0, 2]]), ("non-diagonal", [[1, 1, 0], [-1, 1, 0], [0, 0, 2]])):
            sc = ref.copy()
            sc.make_supercell(scaling)
            sc.scale_lattice(sc.volume * 1.08)  # an MLIP's equilibrium volume differs from experiment
            sc.perturb(0.05, min_distance=0.0)
            checks[f"{name} {label} supercell ({len(sc)} atoms, +8 % volume, rattled)"] = bool(matcher.fit(sc, ref))
    from ase.build import bulk
    from pymatgen.core import Lattice, Structure
    from pymatgen.io.ase import AseAtomsAdaptor

    cubic = AseAtomsAdaptor.get_structure(bulk("C", "diamond", a=3.567, cubic=True))
    checks["diamond conventional cubic cell (8 atoms)"] = bool(matcher.fit(cubic, refs["diamond"]))
    for a in refs:
        for b in refs:
            if a < b:
                checks[f"{a} vs {b} (must be False)"] = bool(matcher.fit(refs[a], refs[b]))
    ok = all(v for k, v in checks.items() if "must be False" not in k) and not any(v for k, v in checks.items() if "must be False" in k)
    # not enforced, recorded: at stol 0.5 the stacking of graphite layers is not resolved
    aa = Structure(Lattice.hexagonal(2.46, 3.355), ["C", "C"], [[0, 0, 0], [1 / 3, 2 / 3, 0]])
    checks["info: AA-stacked graphite matches the AB graphite reference"] = bool(matcher.fit(aa, refs["graphite"]))
    if not ok:
        raise RuntimeError(f"the allotrope matcher failed its sanity check: {checks}")
    return checks


# ---------------------------------------------------------------------- MLIP call counting
class MLIPCounter:
    """Counts structures passed to the shared MLIP backend, per phase of predict (before, during, after relaxation).

    predict and its RL get the backend from :func:`crystalign.rewards.mlip.get_backend`'s cache, so wrapping that
    instance's methods sees every call; the phase switches when :func:`crystalign.prediction.relax_structures` starts
    and ends, and apart during the RL training (both patched in the prediction module, where predict looks them up).
    ``pre_relax`` counts the base samples, the RL policy's samples and predict's second evaluation of their union.
    """

    def __init__(self) -> None:
        import crystalign.prediction as prediction
        from crystalign.rewards.mlip import get_backend

        self.phase = "pre_relax"
        self.counts: dict[str, int] = {}
        self.seconds: dict[str, float] = {}
        backend = get_backend("sevenn")  # the instance predict(backend="sevenn") will get from the cache
        for method in ("energies", "energy_forces_stress"):
            setattr(backend, method, self._wrap(getattr(backend, method), method))
        prediction.relax_structures = self._phase(prediction.relax_structures, "relax", "post_relax")
        prediction._run_rl = self._phase(prediction._run_rl, "pre_relax_rl", "pre_relax")
        unique_ranked = prediction.unique_ranked

        def timed_unique_ranked(*args: Any, **kwargs: Any):  # duplicate removal (StructureMatcher), inside "relax" time
            t0 = time.time()
            try:
                return unique_ranked(*args, **kwargs)
            finally:
                key = f"{self.phase}:dedup_seconds"
                self.seconds[key] = self.seconds.get(key, 0.0) + time.time() - t0

        prediction.unique_ranked = timed_unique_ranked

    def _phase(self, fn: Callable, during: str, after: str) -> Callable:
        def in_phase(*args: Any, **kwargs: Any):
            self.phase = during
            try:
                return fn(*args, **kwargs)
            finally:
                self.phase = after

        return in_phase

    def _wrap(self, fn: Callable, method: str) -> Callable:
        def counted(atoms_list, *args: Any, **kwargs: Any):
            key = f"{self.phase}:{method}"
            self.counts[key] = self.counts.get(key, 0) + len(atoms_list)
            return fn(atoms_list, *args, **kwargs)

        return counted

    def reset(self) -> None:
        self.phase = "pre_relax"
        self.counts = {}
        self.seconds = {}


# ---------------------------------------------------------------------- one run
def relax_steps_from_records(folder: Path) -> dict[str, Any]:
    """FIRE steps per relaxed structure, from the relax/ records predict keeps (one extxyz per structure)."""
    from ase.io import read

    steps, statuses = [], []
    for path in sorted((folder / "relax").glob("*.extxyz")):
        info = read(path, format="extxyz").info
        statuses.append(str(info.get("relax_status", "unknown")))
        if "relax_steps" in info:
            steps.append(int(info["relax_steps"]))
    return {"relax_records": len(statuses), "relax_fire_steps": steps, "relax_fire_steps_total": sum(steps)}


#: the carbon cell sizes of the benchmark, in the order that gives their seeds
CARBON_SIZES = (8, 12, 16)


def run_one(
    query: dict[str, Any], method: str, n_equal: int, counter: MLIPCounter, matchers: dict[str, Any], rl_steps: int = 20,
    work_dir: Path | None = None,
) -> dict[str, Any]:
    from crystalign.prediction import predict

    model = query["tuned_model"] if method.startswith("tuned_") else query["model"]
    # predict's own --budget splits the evaluations: all candidates without RL, else n + RL iterations + n
    options: dict[str, Any] = {"model": model, "seed": query["seed"], "budget": n_equal, "rl_steps": 0 if method.endswith("best_of_n") else rl_steps}
    options["tuned"] = False  # each arm samples the model it names (predict would swap carbon_24 for carbon_24_energy)
    options["mix_base"] = MIX_BASE if method == "tuned_mixed_best_of_n" else 0.0  # arms fixed, whatever the cards say
    if method.endswith("_policy_only"):
        options["rank_rollouts"] = False
    if method.endswith("_novelty"):
        options["rl_novelty"] = NOVELTY_EV
    counter.reset()
    resumed = False
    with contextlib.ExitStack() as stack:
        if work_dir is None:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="predict_budget_"))
        else:  # kept, so a row stopped half-way resumes where predict stopped (a carbon arm runs for an hour)
            tmp = str(work_dir / f"{query['id'].replace('/', '_').replace(':', '_')}__{method}")
            resumed = Path(tmp).is_dir() and any(Path(tmp).iterdir())
            options["resume"] = resumed
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")
        t0 = time.time()
        res = predict(query["composition"], out=tmp, progress=False, **options)
        wall = time.time() - t0
        relax_info = relax_steps_from_records(Path(tmp))
        # the candidates predict refused to rank (relaxation not converged, ...), to see whether the known structure is among them
        from pymatgen.core import Structure

        untrusted = [(r, Structure.from_file(Path(tmp) / r["file"])) for r in res.candidates if not r.get("trusted")]
    summary = res.summary
    n, rl_steps, nominal = summary["n"], summary["rl_steps"], summary["mlip_energy_evaluations"]
    ranked = res.structures
    top = ranked[:5]
    row: dict[str, Any] = {
        "dataset": query["dataset"],
        "query": query["id"],
        "composition": query["composition"],
        "model": model,
        "seed": query["seed"],
        "method": method,
        # a resumed row's wall time and counted MLIP calls cover only the part after the restart
        "resumed": resumed,
        "n": n,
        "rl_steps": rl_steps,
        "best_energy_per_atom_ev": float(res.energies[0]) if res.energies else None,
        "top5_energies_per_atom_ev": [float(e) for e in res.energies[:5]],
        "top5_spacegroups": [r.get("spacegroup") for r in res.candidates if r.get("trusted")][:5],
        "n_ranked": len(ranked),
        "n_untrusted": summary.get("n_untrusted"),
        "rl_stopped": summary.get("rl_stopped"),
        "warnings": summary.get("warnings", []),
        "mlip_energy_evals_nominal": nominal,
        "mlip_energy_evals_counted_pre_relax": counter.counts.get("pre_relax:energies", 0) + counter.counts.get("pre_relax_rl:energies", 0),
        "mlip_energy_evals_counted_rl_training": counter.counts.get("pre_relax_rl:energies", 0),
        "mlip_calls_counted": dict(sorted(counter.counts.items())),
        "n_candidates": summary.get("n_candidates"),
        "n_rollout_candidates": summary.get("n_rollout_candidates"),
        "n_valid": summary.get("n_valid"),
        "n_distinct_before_relax": summary.get("n_distinct_before_relax"),
        "n_relaxed": summary.get("n_relaxed"),
        "n_relax_converged": summary.get("n_relax_converged"),
        "n_relax_not_converged": summary.get("n_relax_not_converged"),
        "n_relax_failed": summary.get("n_relax_failed"),
        "relax_force_calls_counted": counter.counts.get("relax:energy_forces_stress", 0),
        **relax_info,
        "base_energy_per_atom_ev_mean": summary.get("base_energy_per_atom_ev_mean"),
        "sampled_energy_per_atom_ev_mean": summary.get("sampled_energy_per_atom_ev_mean"),
        "stage_seconds": summary.get("stage_seconds"),
        "dedup_seconds": {k.split(":")[0]: round(v, 2) for k, v in sorted(counter.seconds.items())},
        "wall_s": wall,
    }
    if query["dataset"] == "carbon":
        found: dict[str, int | None] = {}
        for name, ref in matchers["allotropes"].items():
            found[name] = next((k + 1 for k, s in enumerate(top) if matchers["supercell"].fit(s, ref)), None)
        row["allotrope_rank_top5"] = found
        row["allotropes_found_top5"] = [name for name in ALLOTROPES if found[name] is not None]
        row["known_rank"] = min((r for r in found.values() if r is not None), default=None)
        row["known_among_untrusted"] = [
            {"allotrope": name, "energy_per_atom_ev": r["energy_per_atom_ev"], "reason": r.get("untrusted_reason")}
            for r, s in untrusted for name, ref in matchers["allotropes"].items() if matchers["supercell"].fit(s, ref)
        ]
    else:
        ref = query["reference"]
        row["known_rank"] = next((k + 1 for k, s in enumerate(ranked) if matchers["benchmark"].fit(s, ref)), None)
        row["known_among_untrusted"] = [
            {"energy_per_atom_ev": r["energy_per_atom_ev"], "reason": r.get("untrusted_reason")}
            for r, s in untrusted if matchers["benchmark"].fit(s, ref)
        ]
    row["known_top1"] = row["known_rank"] == 1
    row["known_top5"] = row["known_rank"] is not None and row["known_rank"] <= 5
    return row


# ---------------------------------------------------------------------- summary
def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per dataset: each arm against best-of-N on the queries both ran (lower best relaxed energy, ties within
    1 meV/atom), and each arm's means."""
    out: dict[str, Any] = {}
    for dataset in sorted({r["dataset"] for r in rows}):
        by_query: dict[str, dict[str, dict[str, Any]]] = {}
        for r in rows:
            if r["dataset"] == dataset:
                by_query.setdefault(r["query"], {})[r["method"]] = r
        versus: dict[str, Any] = {}
        per_method: dict[str, Any] = {}
        for m in METHODS:
            sel = [q[m] for q in by_query.values() if m in q]
            if not sel:
                continue
            stages: dict[str, list[float]] = {}
            for r in sel:
                for k, v in (r.get("stage_seconds") or {}).items():
                    stages.setdefault(k, []).append(v)
            per_method[m] = {
                "queries": len(sel),
                "no_trusted_answer": sum(r["best_energy_per_atom_ev"] is None for r in sel),
                "known_top1_fraction": _mean([float(r["known_top1"]) for r in sel]),
                "known_top5_fraction": _mean([float(r["known_top5"]) for r in sel]),
                "mean_best_energy_per_atom_ev": _mean([r["best_energy_per_atom_ev"] for r in sel]),
                "mean_wall_s": _mean([r["wall_s"] for r in sel]),
                "mean_stage_seconds": {k: _mean(v) for k, v in stages.items()},
                "mean_mlip_energy_evals_counted_pre_relax": _mean([r.get("mlip_energy_evals_counted_pre_relax") for r in sel]),
                "mean_n_relaxed": _mean([r.get("n_relaxed") for r in sel]),
                "mean_relax_force_calls": _mean([r.get("relax_force_calls_counted") for r in sel]),
            }
            if dataset == "carbon":
                per_method[m]["allotropes_found_top5"] = {q: q_rows[m]["allotropes_found_top5"] for q, q_rows in by_query.items() if m in q_rows}
            if m == "best_of_n":
                continue
            pairs = [q for q in by_query.values() if m in q and "best_of_n" in q]
            lower = higher = ties = no_answer = 0
            diffs = []
            for q in pairs:
                e_m, e_bon = q[m]["best_energy_per_atom_ev"], q["best_of_n"]["best_energy_per_atom_ev"]
                if e_m is None or e_bon is None:
                    no_answer += 1
                    continue
                d = e_m - e_bon
                diffs.append(d)
                lower += d < -TIE_EV
                higher += d > TIE_EV
                ties += abs(d) <= TIE_EV
            versus[m] = {
                "paired_queries": len(pairs),
                "lower_by_more_than_1_mev": lower,
                "best_of_n_lower_by_more_than_1_mev": higher,
                "ties_within_1_mev": ties,
                "pairs_without_answer": no_answer,
                "mean_minus_best_of_n_mev_per_atom": None if not diffs else 1000.0 * sum(diffs) / len(diffs),
                "known_top1": (sum(q[m]["known_top1"] for q in pairs), sum(q["best_of_n"]["known_top1"] for q in pairs)),
                "known_top5": (sum(q[m]["known_top5"] for q in pairs), sum(q["best_of_n"]["known_top5"] for q in pairs)),
            }
        out[dataset] = {"versus_best_of_n": versus, "methods": per_method}
    return out


# ---------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=20, help="held-out perov_5 structures (the first COUNT of the dev split)")
    ap.add_argument("--start", type=int, default=0, help="skip the first START of those (to split the queries over processes)")
    ap.add_argument("--carbon", type=int, nargs="*", default=list(CARBON_SIZES), help="carbon cell sizes C<k> for model carbon_24 (none: skip)")
    ap.add_argument("--out", default="bench/results/predict_budget.json", help="results JSON (also the resume state)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads of this process")
    ap.add_argument("--rl-steps", type=int, default=20, help="iterations of per-query RL in the RL arm (predict's default is 0)")
    ap.add_argument(
        "--work-dir", default=None,
        help="keep each (query, arm) predict run in a folder here, so an interrupted row resumes (default: temporary folders)",
    )
    ap.add_argument("--methods", nargs="*", default=None, choices=METHODS, help="arms to run (default: (a)-(d); the tuned_* arms need --tuned)")
    ap.add_argument(
        "--tuned", nargs="*", default=["perov_5=perov_5_energy", "carbon_24=carbon_24_energy"], metavar="BASE=TUNED",
        help="the RL-tuned model of each base model, for arms (b) and (d); a base without one skips them",
    )
    args = ap.parse_args()

    from crystalign.settings import configure_threads

    threads = configure_threads(args.threads)  # before torch is imported

    from crystalign.data.splits import DataConfig, load_training_data
    from crystalign.io import write_json
    from crystalign.matching import make_matcher
    from crystalign.prediction import PredictOptions

    from crystalign.generator import resolve_model

    tuned = dict(item.split("=", 1) for item in args.tuned)
    for base, name in list(tuned.items()):
        try:
            resolve_model(name)
        except FileNotFoundError:
            del tuned[base]
    methods = [m for m in (args.methods or DEFAULT_METHODS) if not m.startswith("tuned_") or tuned]
    defaults = PredictOptions()
    n_equal = defaults.n + args.rl_steps * defaults.rl_groups * defaults.rl_group_size + defaults.n

    queries: list[dict[str, Any]] = []
    if args.count > 0:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, hold, _ = load_training_data(DataConfig(dataset="perov_5", niggli=True))
        for i, ref in enumerate(hold[: args.count].to_structures()):
            if i < args.start:
                continue
            formula = ref.composition.formula.replace(" ", "")
            queries.append({"dataset": "perov_5", "id": f"perov_5/{i}:{formula}", "composition": formula, "model": "perov_5", "seed": i, "reference": ref})
    # a size's seed does not depend on which other sizes this process runs (C8, C12, C16 keep 0, 1, 2)
    carbon_seed = {size: k for k, size in enumerate(CARBON_SIZES)}
    carbon = [
        {"dataset": "carbon", "id": f"carbon/C{size}", "composition": f"C{size}", "model": "carbon_24", "seed": carbon_seed.get(size, size)}
        for size in args.carbon
    ]
    # the few carbon queries first: a run stopped early still has every carbon size and some perov_5 queries
    queries = carbon + queries

    allotropes = carbon_allotropes()
    supercell = supercell_matcher()
    matcher_checks = check_allotrope_matcher(allotropes, supercell)
    matchers = {"benchmark": make_matcher(), "supercell": supercell, "allotropes": allotropes}
    counter = MLIPCounter()

    out = Path(args.out)
    work_dir = Path(args.work_dir) if args.work_dir else None
    if work_dir is not None:
        work_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    if out.exists():
        rows = json.loads(out.read_text()).get("rows", [])
    done = {(r["query"], r["method"]) for r in rows}
    meta = {
        "args": vars(args),
        "threads": threads,
        "n_equal": n_equal,
        "defaults": {k: getattr(defaults, k) for k in ("n", "rl_steps", "rl_groups", "rl_group_size", "steps", "relax_top", "relax_steps", "fmax")},
        "allotrope_matcher_checks": matcher_checks,
    }
    print(json.dumps({"n_equal": n_equal, "queries": len(queries), "already_done": len(done), "threads": threads}), flush=True)
    for query in queries:
        query["tuned_model"] = tuned.get(query["model"])
        for method in methods:
            if method.startswith("tuned_") and query["tuned_model"] is None:
                continue
            if (query["id"], method) in done:
                continue
            row = run_one(query, method, n_equal, counter, matchers, rl_steps=args.rl_steps, work_dir=work_dir)
            rows.append(row)
            done.add((query["id"], method))
            write_json(out, {**meta, "summary": summarise(rows), "rows": rows})
            print(json.dumps(row), flush=True)
    summary = summarise(rows)
    write_json(out, {**meta, "summary": summary, "rows": rows})
    print(json.dumps(summary, indent=2), flush=True)


if __name__ == "__main__":
    main()
