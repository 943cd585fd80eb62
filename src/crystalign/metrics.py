"""Crystal-structure-prediction metrics: match rate, RMSE, cRMSE, METRe and validity.

Generated structures are paired with references **by index**: with ``k`` samples per reference,
``generated[i * k + j]`` is sample ``j`` of reference ``i`` (samples of one reference are contiguous).

A pair can match only if both structures pass the shared validity check
(:func:`crystalign.geometry.check_validity`) and have the same reduced composition (so integer
multiples of a cell still match); it is then compared with ``StructureMatcher.get_rms_dist`` under
the benchmark tolerances (:func:`crystalign.matching.make_matcher`). That returns the RMS
displacement normalised by (V/N)^(1/3); a pair matches when it returns a value.

* ``match_rate``: matched pairs / generated structures.
* ``rmse``: mean normalised RMS over matched pairs (``None`` when nothing matched).
* ``crmse``: mean over all pairs, every miss (invalid, wrong composition, no match, timeout, error)
  counted as ``stol`` = 0.5.
* ``metre_*``: a reference counts as matched if a generated structure matches it, keeping the best
  RMS; the denominator is the number of references. ``metre="samples"`` (default) looks at the
  reference's own ``k`` samples (equal to the plain metrics for ``k = 1``); ``metre="any"`` at every
  generated structure of the same reduced composition (METRe for polymorph splits such as carbon_24,
  where a generated structure may find another reference's polymorph; up to #references x #generated
  comparisons).
* ``valid_rate``: generated structures that pass the validity check / generated structures.

Matching runs in worker processes, each pair under a time limit. A pair that runs out of time is a
miss, is counted in ``timeouts`` and listed in ``timed_out_pairs``; it is never dropped.

Long evaluations are resumable: with ``checkpoint=PATH`` (see :func:`csp_metrics`) every pair the matcher
finishes is appended to a JSON-lines file, and a later call with the same inputs matches only the pairs not
in it. The first line is the header ``{"format": "crystalign.csp_metrics checkpoint", "version": 1,
"fingerprint": {...}}`` (sha256 of the generated and reference structures, their numbers, k, tolerances,
timeout, METRe mode); every further line is one pair, e.g. ``{"pair": 12, "status": "matched", "rms": 0.031}``
(a METRe cross pair has ``"cross": [generated, reference]`` instead of ``"pair"``) with status ``matched``,
``miss``, ``timeout`` or ``error`` (``rms`` null unless matched; errors and timeouts add a ``message``).
Pairs never sent to the matcher (invalid, other composition) are not recorded: they are recomputed.

Example::

    from crystalign.metrics import csp_metrics
    result = csp_metrics(generated_structures, reference_structures, k=1, timeout=60)
    print(result.summary()); json_dict = result.to_dict()
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import numbers
import os
import signal
import threading
import time
import warnings
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch

from crystalign.geometry import check_validity
from crystalign.io import write_text
from crystalign.matching import BENCHMARK_TOLERANCES, make_matcher

if TYPE_CHECKING:  # pragma: no cover
    from pymatgen.core import Structure

    from crystalign.crystal import CrystalBatch

#: What METRe compares a reference with: its own k samples, or any generated structure (polymorph splits).
METRE_MODES = ("samples", "any")

#: Default per-pair time limit in seconds (generous: a timeout changes the metric, it is a miss).
DEFAULT_TIMEOUT_S = 60.0

# A worker whose soft alarm did not fire (stuck inside one long C call) is killed this many seconds
# after its pair's limit, or after as long again as the limit itself, whichever is longer.
_HARD_GRACE_S = 5.0

#: The keys every ``CSPMetrics.to_dict()`` starts with, in this order.
SUMMARY_KEYS = ("match_rate", "rmse", "crmse", "valid_rate", "n", "timeouts")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used for this evaluation (other inputs, or not a checkpoint)."""


def default_workers() -> int:
    """min(2, CPU count): matching is CPU-bound and machines are often shared."""
    return max(1, min(2, os.cpu_count() or 1))


@dataclass
class CSPMetrics:
    """CSP metrics of generated structures against references, with per-pair details.

    Per-pair lists have one entry per generated structure (pair ``p`` = reference ``p // k``).
    """

    match_rate: float
    rmse: float | None
    crmse: float
    valid_rate: float
    n: int
    timeouts: int
    k: int
    n_references: int
    metre_match_rate: float
    metre_rmse: float | None
    metre_crmse: float
    metre: str
    metre_timeouts: int  # cross pairs of metre="any" that ran out of time (misses)
    errors: int
    invalid_references: int
    tolerances: dict[str, float]
    # per pair
    matched: list[bool] = field(repr=False)
    rms: list[float | None] = field(repr=False)
    valid: list[bool] = field(repr=False)  # the generated structure passes the validity check
    timed_out: list[bool] = field(repr=False)
    same_composition: list[bool] = field(repr=False)
    error: list[str | None] = field(repr=False)  # why matching failed (exceptions, worker deaths)
    # per reference
    reference_valid: list[bool] = field(repr=False)
    best_rms: list[float | None] = field(repr=False)  # best RMS over the samples METRe looks at
    # how the result was obtained, not part of it (so not in to_dict): matcher results read from a checkpoint
    resumed_pairs: int = field(default=0, repr=False, compare=False)

    @property
    def timed_out_pairs(self) -> list[int]:
        return [i for i, t in enumerate(self.timed_out) if t]

    def to_dict(self, details: bool = False) -> dict[str, Any]:
        """JSON-ready summary (``SUMMARY_KEYS`` first); ``details`` adds one record per pair."""
        out: dict[str, Any] = {
            "match_rate": self.match_rate,
            "rmse": self.rmse,
            "crmse": self.crmse,
            "valid_rate": self.valid_rate,
            "n": self.n,
            "timeouts": self.timeouts,
            "k": self.k,
            "n_references": self.n_references,
            "metre_match_rate": self.metre_match_rate,
            "metre_rmse": self.metre_rmse,
            "metre_crmse": self.metre_crmse,
            "metre": self.metre,
            "metre_timeouts": self.metre_timeouts,
            "errors": self.errors,
            "invalid_references": self.invalid_references,
            "timed_out_pairs": self.timed_out_pairs,
            "tolerances": dict(self.tolerances),
        }
        if details:
            out["pairs"] = [
                {
                    "index": i,
                    "reference": i // self.k,
                    "matched": self.matched[i],
                    "rms": self.rms[i],
                    "valid": self.valid[i],
                    "same_composition": self.same_composition[i],
                    "timed_out": self.timed_out[i],
                    "error": self.error[i],
                }
                for i in range(self.n)
            ]
        return out

    def summary(self) -> str:
        """A short human-readable report."""

        def num(x: float | None) -> str:
            return "n/a (no matches)" if x is None else f"{x:.4f}"

        n_matched = sum(self.matched)
        n_ref_matched = sum(r is not None for r in self.best_rms)
        lines = [
            f"{self.n} generated vs {self.n_references} references (k = {self.k})",
            f"  match rate   {100 * self.match_rate:6.2f} %  ({n_matched}/{self.n})",
            f"  RMSE         {num(self.rmse)}  (matched pairs, normalised by (V/N)^1/3)",
            f"  cRMSE        {num(self.crmse)}  (misses count as stol = {self.tolerances['stol']})",
            f"  valid        {100 * self.valid_rate:6.2f} %  ({sum(self.valid)}/{self.n})",
            f"  timeouts     {self.timeouts}",
        ]
        if self.k > 1 or self.metre == "any":
            lines += [
                f"  METRe match  {100 * self.metre_match_rate:6.2f} %  ({n_ref_matched}/{self.n_references} references, "
                f"{'any generated structure' if self.metre == 'any' else 'own samples'})",
                f"  METRe RMSE   {num(self.metre_rmse)}",
                f"  METRe cRMSE  {num(self.metre_crmse)}",
            ]
        if self.metre_timeouts:
            lines.append(f"  METRe timeouts {self.metre_timeouts} (cross pairs, counted as misses)")
        if self.errors:
            lines.append(f"  errors       {self.errors} (counted as misses)")
        if self.invalid_references:
            lines.append(f"  invalid references: {self.invalid_references} (their pairs cannot match)")
        if self.timeouts:
            shown = ", ".join(map(str, self.timed_out_pairs[:20]))
            more = " ..." if self.timeouts > 20 else ""
            lines.append(f"  timed-out pairs (counted as misses): {shown}{more}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- API


def structure_validity(structures: Sequence["Structure | None"]) -> list[bool]:
    """The shared validity check for pymatgen Structures; ``None`` or empty structures are invalid.

    Reads the stored fractional coordinates, so collapsed or non-finite cells are judged, not raised on.
    """
    ok = [s is not None and len(s) > 0 for s in structures]
    present = [s for s, good in zip(structures, ok) if good]
    if not present:
        return ok
    frac, lattice, n_atoms = [], [], []
    for s in present:
        frac.append(np.asarray([site.frac_coords for site in s], dtype=np.float64).reshape(-1, 3))
        lattice.append(np.asarray(s.lattice.matrix, dtype=np.float64))
        n_atoms.append(len(s))
    report = check_validity(
        torch.from_numpy(np.concatenate(frac)),
        torch.from_numpy(np.stack(lattice)),
        torch.tensor(n_atoms, dtype=torch.long),
    )
    flags = iter(report.valid.tolist())
    return [bool(next(flags)) if good else False for good in ok]


def csp_metrics(
    generated: "Sequence[Structure | None] | CrystalBatch",
    references: "Sequence[Structure] | CrystalBatch",
    *,
    k: int | None = None,
    n_workers: int | None = None,
    timeout: float | None = DEFAULT_TIMEOUT_S,
    matcher_kwargs: dict[str, float] | None = None,
    progress: bool = True,
    start_method: str | None = None,
    metre: str = "samples",
    checkpoint: str | os.PathLike | None = None,
) -> CSPMetrics:
    """Match rate, RMSE, cRMSE, METRe and validity of ``generated`` against ``references``.

    Args:
        generated: ``k * len(references)`` structures, sample ``j`` of reference ``i`` at ``i * k + j``.
            ``None`` entries (unreadable or failed generations) count as invalid.
        references: the reference structures.
        k: samples per reference; inferred from the lengths when ``None``.
        n_workers: matching processes (default ``min(2, cpu)``); 0 matches in this process (the time
            limit then needs the main thread and cannot interrupt a stuck C call).
        timeout: per-pair limit in seconds, ``None`` for none. Pairs over it are misses, reported in
            ``timeouts``/``timed_out_pairs``.
        matcher_kwargs: overrides of the benchmark tolerances (stol 0.5, ltol 0.3, angle_tol 10).
        progress: show a progress bar (on a terminal) while matching.
        start_method: multiprocessing start method; default ``fork`` where available (workers start
            instantly and only run pymatgen), else the platform default.
        metre: which generated structures METRe compares with a reference: ``"samples"`` its own
            ``k`` samples, ``"any"`` every generated structure of the same reduced composition.
        checkpoint: a JSON-lines file that makes the run resumable. Every pair the matcher finishes is
            appended to it at once, so a kill loses only the pairs in flight. If the file exists, its pairs
            are taken as they are and only the rest are matched (``resumed_pairs`` says how many were
            reused); the result equals an uninterrupted run's. The file records a fingerprint of the
            inputs (the structures, k, tolerances, timeout, METRe mode); a file made for other inputs
            raises a :class:`CheckpointError` (a ``ValueError``) naming it and what differs. A torn last
            line (killed mid-write) is dropped. Timed-out pairs stay recorded as timeouts: delete the file
            to retry them. The file is left in place: remove it once the result is saved.

    Example::

        result = csp_metrics(samples, refs, k=4)
        print(result.match_rate, result.metre_match_rate, result.timeouts)
        # resumable: rerun the same call after an interruption
        result = csp_metrics(samples, refs, k=4, checkpoint="metrics.partial.jsonl")
    """
    gen = _as_structures(generated, "generated")
    ref = _as_structures(references, "references")
    if k is not None and (isinstance(k, bool) or not isinstance(k, numbers.Integral)):
        raise TypeError(f"k must be an integer (samples per reference), got {type(k).__name__} {k!r}")
    if not ref:
        raise ValueError("no reference structures given")
    if not gen:
        raise ValueError("no generated structures given")
    if k is None:
        if len(gen) < len(ref):
            raise ValueError(
                f"{len(gen)} generated structures for {len(ref)} references: every reference needs at least one "
                "sample (generated structure i*k + j is sample j of reference i)"
            )
        if len(gen) % len(ref):
            raise ValueError(
                f"{len(gen)} generated structures is not a multiple of {len(ref)} references; pass k explicitly"
            )
        k = len(gen) // len(ref)
    if k < 1 or len(gen) != k * len(ref):
        raise ValueError(f"expected k * n_references = {k} * {len(ref)} = {k * len(ref)} generated structures, got {len(gen)}")
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be positive seconds or None, got {timeout}")
    if metre not in METRE_MODES:
        raise ValueError(f"metre must be one of {METRE_MODES}, got {metre!r}")
    kwargs = dict(BENCHMARK_TOLERANCES)
    kwargs.update(matcher_kwargs or {})
    stol = float(kwargs["stol"])

    gen_valid = structure_validity(gen)
    ref_valid = structure_validity(ref)
    n = len(gen)
    same_comp = [False] * n
    tasks = []
    for p in range(n):
        i = p // k
        if not (gen_valid[p] and ref_valid[i]):
            continue
        same_comp[p] = _same_reduced_composition(gen[p], ref[i])
        if same_comp[p]:
            tasks.append((p, gen[p], ref[i]))
    if metre == "any":  # cross pairs (p, i): every other valid generated structure of i's reduced composition
        by_comp: dict[Any, list[int]] = {}
        for p in range(n):
            if gen_valid[p]:
                by_comp.setdefault(_reduced_composition(gen[p]), []).append(p)
        for i, r in enumerate(ref):
            if ref_valid[i]:
                tasks += [((p, i), gen[p], r) for p in by_comp.get(_reduced_composition(r), []) if p // k != i]

    rms: list[float | None] = [None] * n
    timed_out = [False] * n
    error: list[str | None] = [None] * n
    cross: dict[tuple[int, int], tuple[str, float | None]] = {}
    results: dict[Any, tuple[str, float | None, str | None]] = {}
    store = None
    if checkpoint is not None:
        store = _Checkpoint(Path(checkpoint), _fingerprint(gen, ref, k, kwargs, timeout, metre))
        keys = {p for p, _, _ in tasks}
        results = {p: r for p, r in store.results.items() if p in keys}
    todo = [task for task in tasks if task[0] not in results]
    if todo:
        n_workers = default_workers() if n_workers is None else n_workers
        bar = _progress_bar(len(tasks), progress, initial=len(tasks) - len(todo))

        def on_done(p, result: tuple[str, float | None, str | None]) -> None:
            if store is not None:
                store.append(p, result)
            bar.update(1)

        try:
            results.update(_match_all(todo, kwargs, timeout, n_workers, start_method, on_done=on_done))
        finally:
            bar.close()
            if store is not None:
                store.close()
    for p, (status, value, message) in results.items():
        if isinstance(p, tuple):
            cross[p] = (status, value)
            continue
        rms[p] = value if status == "ok" else None
        timed_out[p] = status == "timeout"
        error[p] = message if status == "error" else None
    result = _aggregate(gen_valid, ref_valid, same_comp, rms, timed_out, error, k, stol, kwargs, metre, cross)
    result.resumed_pairs = len(tasks) - len(todo)
    return result


# ---------------------------------------------------------------------------------------------- internals


def _as_structures(items, what: str) -> list:
    from pymatgen.core import Structure

    if hasattr(items, "to_structures"):
        return items.to_structures()
    if isinstance(items, Structure):  # iterating it would give its sites
        raise TypeError(f"{what}: give a list of Structures (or a CrystalBatch), not a single Structure")
    return list(items)


def _reduced_composition(s: "Structure"):
    try:
        return s.composition.reduced_composition
    except Exception:  # exotic species or zero amounts: a key equal to nothing else
        return object()


def _same_reduced_composition(a: "Structure", b: "Structure") -> bool:
    return _reduced_composition(a) == _reduced_composition(b)


def _aggregate(gen_valid, ref_valid, same_comp, rms, timed_out, error, k, stol, tolerances, metre, cross) -> CSPMetrics:
    n = len(gen_valid)
    n_ref = len(ref_valid)
    matched = [r is not None for r in rms]
    matched_rms = [r for r in rms if r is not None]
    found: list[list[float]] = [[r for r in rms[i * k : (i + 1) * k] if r is not None] for i in range(n_ref)]
    for (_, i), (status, value) in cross.items():
        if status == "ok" and value is not None:
            found[i].append(value)
    best: list[float | None] = [min(group) if group else None for group in found]
    best_found = [r for r in best if r is not None]
    return CSPMetrics(
        match_rate=len(matched_rms) / n,
        rmse=float(np.mean(matched_rms)) if matched_rms else None,
        crmse=float(np.mean([stol if r is None else r for r in rms])),
        valid_rate=sum(gen_valid) / n,
        n=n,
        timeouts=sum(timed_out),
        k=k,
        n_references=n_ref,
        metre_match_rate=len(best_found) / n_ref,
        metre_rmse=float(np.mean(best_found)) if best_found else None,
        metre_crmse=float(np.mean([stol if r is None else r for r in best])),
        metre=metre,
        metre_timeouts=sum(status == "timeout" for status, _ in cross.values()),
        errors=sum(e is not None for e in error),
        invalid_references=n_ref - sum(ref_valid),
        tolerances={key: float(v) for key, v in tolerances.items()},
        matched=matched,
        rms=rms,
        valid=list(gen_valid),
        timed_out=timed_out,
        same_composition=same_comp,
        error=error,
        reference_valid=list(ref_valid),
        best_rms=best,
    )


def _progress_bar(total: int, enabled: bool, initial: int = 0):
    from tqdm.auto import tqdm

    # disable=None: only on a terminal, so logs and --json pipes stay clean
    return tqdm(total=total, initial=initial, desc="matching", unit="pair", disable=None if enabled else True, leave=False)


# ---------------------------------------------------------------------------------------------- checkpoint

_CHECKPOINT_FORMAT = "crystalign.csp_metrics checkpoint"
_CHECKPOINT_VERSION = 1
# what each fingerprint entry stands for, in the message that refuses a checkpoint of other inputs
_FINGERPRINT_NAMES = {
    "generated_sha256": "the generated structures",
    "references_sha256": "the reference structures",
    "n_generated": "the number of generated structures",
    "n_references": "the number of references",
    "k": "k",
    "tolerances": "the matcher tolerances",
    "timeout": "the per-pair timeout",
    "metre": "the METRe mode",
}


def _structures_sha256(structures: Sequence["Structure | None"]) -> str:
    """sha256 of the species, cells and fractional coordinates, in order (``None`` entries included)."""
    digest = hashlib.sha256()
    for s in structures:
        if s is None:
            digest.update(b"none\n")
            continue
        digest.update(json.dumps([site.species_string for site in s]).encode() + b"\n")
        digest.update(np.ascontiguousarray(s.lattice.matrix, dtype=np.float64).tobytes())
        digest.update(np.ascontiguousarray(s.frac_coords, dtype=np.float64).reshape(-1, 3).tobytes())
    return digest.hexdigest()


def _fingerprint(gen, ref, k: int, tolerances: dict, timeout: float | None, metre: str) -> dict[str, Any]:
    """Everything a pair's recorded result depends on; a checkpoint is reused only if all of it is equal."""
    return {
        "generated_sha256": _structures_sha256(gen),
        "references_sha256": _structures_sha256(ref),
        "n_generated": len(gen),
        "n_references": len(ref),
        "k": k,
        "tolerances": {key: float(v) for key, v in sorted(tolerances.items())},
        "timeout": None if timeout is None else float(timeout),
        "metre": metre,
    }


class _Checkpoint:
    """Finished pairs of one evaluation in a JSON-lines file (format in the module docstring).

    The header is written atomically; each pair line goes out in one unbuffered write, so a kill tears at
    most the last line, which is dropped (and cut off the file) on load.
    """

    def __init__(self, path: Path, fingerprint: dict[str, Any]):
        self.path = path
        self.results: dict[Any, tuple[str, float | None, str | None]] = {}
        self._fh = None
        if not path.exists():
            write_text(path, json.dumps(self._header(fingerprint)) + "\n")
            return
        data = path.read_bytes()
        lines = data.split(b"\n")
        torn = lines.pop()  # after the last newline: empty, or a line cut short by a kill
        if not lines:
            raise CheckpointError(f"{path}: not a csp_metrics checkpoint (no complete header line); delete it to start over")
        self._check_header(lines[0], fingerprint)
        for number, line in enumerate(lines[1:], start=2):
            key, result = self._parse(line, number)
            self.results[key] = result
        if torn:  # appending after it would glue the next record onto the fragment
            with open(path, "r+b") as fh:
                fh.truncate(len(data) - len(torn))

    @staticmethod
    def _header(fingerprint: dict[str, Any]) -> dict[str, Any]:
        return {"format": _CHECKPOINT_FORMAT, "version": _CHECKPOINT_VERSION, "fingerprint": fingerprint}

    def _check_header(self, line: bytes, fingerprint: dict[str, Any]) -> None:
        try:
            header = json.loads(line)
        except ValueError:
            header = None
        if not isinstance(header, dict) or header.get("format") != _CHECKPOINT_FORMAT:
            raise CheckpointError(f"{self.path}: not a csp_metrics checkpoint (unexpected first line); delete it to start over")
        if header.get("version") != _CHECKPOINT_VERSION:
            raise CheckpointError(
                f"{self.path}: checkpoint format version {header.get('version')}, this crystalign writes "
                f"{_CHECKPOINT_VERSION}; delete it to start over"
            )
        saved = header.get("fingerprint") or {}
        # through JSON, so tuples, ints and floats compare as they were saved
        current = json.loads(json.dumps(fingerprint))
        differ = [key for key in current if saved.get(key) != current[key]]
        if differ:
            what = []
            for key in differ:
                name = _FINGERPRINT_NAMES.get(key, key)
                if key.endswith("sha256"):
                    what.append(name)
                else:
                    what.append(f"{name} ({saved.get(key)} there, {current[key]} now)")
            raise CheckpointError(
                f"{self.path} is the checkpoint of another evaluation: {', '.join(what)} "
                f"{'differs' if len(what) == 1 else 'differ'}. Run with the inputs it was made for, or delete it to "
                "start over"
            )

    def _parse(self, line: bytes, number: int) -> tuple[Any, tuple[str, float | None, str | None]]:
        try:
            rec = json.loads(line)
            key = tuple(int(x) for x in rec["cross"]) if "cross" in rec else int(rec["pair"])
            status, rms = rec["status"], rec.get("rms")
            if status not in ("matched", "miss", "timeout", "error") or (rms is None) == (status == "matched"):
                raise ValueError(f"status {status!r} with rms {rms!r}")
            message = rec.get("message")
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{self.path}, line {number}: not a pair record ({exc}); delete the file to start over") from None
        internal = "ok" if status in ("matched", "miss") else status
        return key, (internal, None if rms is None else float(rms), message)

    def append(self, key, result: tuple[str, float | None, str | None]) -> None:
        status, rms, message = result
        rec: dict[str, Any] = {"cross": list(key)} if isinstance(key, tuple) else {"pair": key}
        if status == "ok":
            rec.update(status="miss" if rms is None else "matched", rms=rms)
        else:
            rec.update(status=status, rms=None)
            if message is not None:
                rec["message"] = message
        if self._fh is None:
            self._fh = open(self.path, "ab", buffering=0)  # unbuffered: each record is one write() call
        self._fh.write((json.dumps(rec) + "\n").encode())
        self.results[key] = result

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class _PairTimeout(BaseException):
    """Raised by SIGALRM. A BaseException so that ``except Exception`` inside pymatgen cannot swallow it."""


def _raise_timeout(signum, frame):
    raise _PairTimeout()


def _get_rms(matcher, gen: "Structure", ref: "Structure") -> float | None:
    """The benchmark comparison: normalised RMS if the structures match, else None."""
    result = matcher.get_rms_dist(gen, ref)
    return None if result is None else float(result[0])


def _match_one(matcher, gen, ref, timeout: float | None, use_alarm: bool) -> tuple[str, float | None, str | None]:
    """(status, rms, message) with status "ok" (rms None = no match), "timeout" or "error"."""
    start = time.monotonic()
    try:
        try:
            if use_alarm and timeout is not None:
                signal.setitimer(signal.ITIMER_REAL, timeout)
            value = _get_rms(matcher, gen, ref)
        finally:
            if use_alarm and timeout is not None:
                signal.setitimer(signal.ITIMER_REAL, 0)
    except _PairTimeout:
        return "timeout", None, f"exceeded {timeout} s"
    except Exception as exc:  # the benchmark counts matcher failures as misses; we also say why
        if use_alarm and timeout is not None and time.monotonic() - start >= timeout:
            # the alarm fired inside C code (spglib, numpy), which can turn it into another exception
            return "timeout", None, f"exceeded {timeout} s"
        return "error", None, f"{type(exc).__name__}: {exc}"
    return "ok", value, None


_READY = "ready"
_MAX_START_FAILURES = 3


def _worker_main(conn: Connection, matcher_kwargs: dict, timeout: float | None) -> None:
    # the parent owns Ctrl-C and shuts workers down itself
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGALRM, _raise_timeout)
    warnings.simplefilter("ignore")
    matcher = make_matcher(**matcher_kwargs)
    # the parent starts a pair's clock only after this, so slow start-up (spawn imports) is not billed
    conn.send(_READY)
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        p, gen, ref = task
        conn.send((p, *_match_one(matcher, gen, ref, timeout, use_alarm=True)))


def _match_all(tasks, matcher_kwargs, timeout, n_workers, start_method, on_done: Callable[[Any, tuple], None]) -> dict:
    """Results of all ``tasks``; ``on_done(key, result)`` is called as each pair finishes."""
    if n_workers <= 0:
        return _match_in_process(tasks, matcher_kwargs, timeout, on_done)
    return _WorkerPool(n_workers, matcher_kwargs, timeout, start_method).run(tasks, on_done)


def _match_in_process(tasks, matcher_kwargs, timeout, on_done) -> dict:
    use_alarm = timeout is not None and threading.current_thread() is threading.main_thread()
    if timeout is not None and not use_alarm:
        warnings.warn("n_workers=0 outside the main thread: the per-pair time limit is not enforced", stacklevel=3)
    matcher = make_matcher(**matcher_kwargs)
    previous = signal.signal(signal.SIGALRM, _raise_timeout) if use_alarm else None
    results = {}
    try:
        for p, gen, ref in tasks:
            results[p] = _match_one(matcher, gen, ref, timeout, use_alarm)
            on_done(p, results[p])
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    return results


@dataclass
class _Worker:
    process: Any
    conn: Connection
    ready: bool = False
    pair: Any = None  # task key: a pair index, or (generated, reference) for METRe cross pairs
    started: float = 0.0


class _WorkerPool:
    """Worker processes fed one pair at a time, so a stuck worker can be killed and replaced.

    Each worker enforces the limit itself with SIGALRM (and survives the timeout); a worker that does
    not answer ``_HARD_GRACE_S`` after the limit (stuck in C code) or dies is replaced, and its pair is
    recorded as a timeout or an error.
    """

    def __init__(self, n_workers: int, matcher_kwargs: dict, timeout: float | None, start_method: str | None):
        if start_method is None and "fork" in mp.get_all_start_methods():
            start_method = "fork"
        self.ctx = mp.get_context(start_method)
        self.n_workers = n_workers
        self.matcher_kwargs = matcher_kwargs
        self.timeout = timeout
        self.hard_limit = None if timeout is None else timeout + max(_HARD_GRACE_S, timeout)
        self.workers: list[_Worker] = []
        self.start_failures = 0

    def _start(self) -> _Worker:
        parent, child = self.ctx.Pipe(duplex=True)
        proc = self.ctx.Process(target=_worker_main, args=(child, self.matcher_kwargs, self.timeout), daemon=True)
        with warnings.catch_warnings():  # fork with threads alive is fine here: workers never use torch
            warnings.simplefilter("ignore", DeprecationWarning)
            proc.start()
        child.close()
        return _Worker(proc, parent)

    def _stop(self, worker: _Worker) -> None:
        worker.conn.close()
        worker.process.kill()
        worker.process.join(timeout=5)

    def _replace(self, idx: int) -> None:
        self._stop(self.workers[idx])
        self.workers[idx] = self._start()

    def run(self, tasks, on_done: Callable[[Any, tuple], None]) -> dict:
        pending = deque(p for p, _, _ in tasks)
        payload = {p: (gen, ref) for p, gen, ref in tasks}
        self.results: dict[Any, tuple[str, float | None, str | None]] = {}
        self.on_done = on_done
        try:
            self.workers = [self._start() for _ in range(min(self.n_workers, len(tasks)))]
            while pending or any(w.pair is not None for w in self.workers):
                for idx, w in enumerate(self.workers):
                    if w.ready and w.pair is None and pending:
                        p = pending.popleft()
                        try:
                            w.conn.send((p, *payload[p]))
                        except OSError:  # died while idle: the pair never started, queue it again
                            pending.appendleft(p)
                            self._replace(idx)
                            continue
                        w.pair, w.started = p, time.monotonic()
                listening = [w for w in self.workers if w.pair is not None or not w.ready]
                wait_s = None
                busy = [w for w in listening if w.pair is not None]
                if self.hard_limit is not None and busy:
                    wait_s = max(0.0, min(w.started + self.hard_limit for w in busy) - time.monotonic())
                ready = set(wait([w.conn for w in listening], timeout=wait_s))
                now = time.monotonic()
                for idx, w in enumerate(self.workers):
                    if w.conn in ready:
                        try:
                            msg = w.conn.recv()
                        except (EOFError, OSError):
                            self._died(idx)
                            continue
                        if msg == _READY:
                            w.ready = True
                        else:
                            self._finish(w, tuple(msg[1:]))
                    elif w.pair is not None and self.hard_limit is not None and now - w.started > self.hard_limit:
                        self._finish(w, ("timeout", None, f"exceeded {self.timeout} s (process killed)"))
                        self._replace(idx)
        finally:
            self._shutdown()
        return self.results

    def _finish(self, worker: _Worker, result) -> None:
        self.results[worker.pair] = result
        self.on_done(worker.pair, result)
        worker.pair = None

    def _died(self, idx: int) -> None:
        w = self.workers[idx]
        w.process.join(timeout=1)
        if w.pair is not None:  # a pair that kills its worker is a miss with a reason, never retried
            self._finish(w, ("error", None, f"matching process died (exit code {w.process.exitcode})"))
        elif not w.ready:
            self.start_failures += 1
            if self.start_failures > _MAX_START_FAILURES:
                raise RuntimeError(f"matching processes fail to start (exit code {w.process.exitcode})")
        self._replace(idx)

    def _shutdown(self) -> None:
        for w in self.workers:
            if w.pair is not None:  # interrupted mid-pair (error or Ctrl-C): nothing to wait for
                w.process.kill()
                continue
            try:
                w.conn.send(None)
            except OSError:
                pass
        deadline = time.monotonic() + 2.0
        for w in self.workers:
            w.process.join(timeout=max(0.0, deadline - time.monotonic()))
            if w.process.is_alive():
                w.process.kill()
                w.process.join(timeout=5)
            w.conn.close()
        self.workers = []
