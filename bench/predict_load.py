"""Steadiness under load: wall time of one crystalign command on a quiet machine, then beside busy processes.

On a small machine every OpenMP thread that spin-waits competes with any other busy process, which once made
`crystalign sample` 10-70x slower beside one busy Python loop. This runs COMMAND (default: `crystalign predict`
with its defaults) --repeats times quiet, then as often beside --busy processes running `while True: pass`, and
prints and writes (--json) the best and all times, their ratio, the thread settings and the machine.

``{out}`` in the command is replaced by a fresh temporary folder for every run (appended as ``--out {out}`` when
the command names no --out), so no run refuses to overwrite another's results.

Usage::

    python bench/predict_load.py                                   # crystalign predict --out {out}
    python bench/predict_load.py --json bench/results/sample_load.json -- \\
        crystalign sample --model perov_5 --composition SrTiO3 -n 256
    python bench/predict_load.py --env OMP_NUM_THREADS=1 -- crystalign sample --model perov_5 --composition SrTiO3 -n 256 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_COMMAND = ["crystalign", "predict"]


def machine() -> dict:
    """What the times depend on: CPUs usable by this process, the CPU model, the load before the runs."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        loadavg = Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        loadavg = None
    try:
        from importlib.metadata import version

        torch_version = version("torch")
    except Exception:  # noqa: BLE001 - only a record
        torch_version = None
    return {
        "host": platform.node(),
        "cpu": model,
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_count": os.cpu_count(),
        "loadavg_before": loadavg,
        "python": platform.python_version(),
        "torch": torch_version,
    }


def with_out(command: list[str], out: str) -> list[str]:
    if not any("{out}" in c for c in command) and "--out" not in command and "-o" not in command:
        command = [*command, "--out", "{out}"]
    return [c.replace("{out}", out) for c in command]


def background(wait: float = 0.0, extra: int = 0) -> float | None:
    """CPUs kept busy by other processes just before a run (the machine is only as quiet as its neighbours): with
    ``wait``, polls up to that many seconds for a moment when at most ``extra`` (our busy loops) + 0.3 are busy."""
    from crystalign.settings import busy_cpus

    deadline = time.monotonic() + wait
    while True:
        busy = busy_cpus(0.5)
        if busy is None or busy <= extra + 0.3 or time.monotonic() >= deadline:
            return busy


def niced(command: list[str], nice: int) -> list[str]:
    return ["nice", "-n", str(nice), *command] if nice else command


def run_once(command: list[str], env: dict, nice: int = 0) -> tuple[float, int, str]:
    """Seconds, exit code and the tail of the output of one run in a fresh output folder."""
    tmp = tempfile.mkdtemp(prefix="crystalign_load_")
    try:
        t0 = time.perf_counter()
        done = subprocess.run(niced(with_out(command, str(Path(tmp) / "out")), nice), env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return seconds, done.returncode, (done.stdout + done.stderr)[-800:]


def timed(command: list[str], env: dict, repeats: int, label: str, wait: float = 0.0, extra: int = 0, nice: int = 0):
    """Wall seconds of each run, and the busy CPUs measured just before it."""
    times, busy = [], []
    for i in range(repeats):
        busy.append(background(wait, extra))
        seconds, code, tail = run_once(command, env, nice)
        if code != 0:
            raise SystemExit(f"{label} run {i + 1}: exit code {code}\n{tail}")
        before = "?" if busy[-1] is None else f"{busy[-1]:.2f}"
        print(f"  {label} run {i + 1}: {seconds:.2f} s (busy CPUs before: {before})", flush=True)
        times.append(seconds)
    return times, busy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="*", help="the command to time (after --); default: crystalign predict")
    parser.add_argument("--repeats", type=int, default=2, help="runs per condition; the best is the figure")
    parser.add_argument("--busy", type=int, default=1, help="busy processes beside the command in the loaded runs")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="set for the command (repeatable)")
    parser.add_argument("--unset", action="append", default=[], metavar="KEY", help="remove from the command's environment")
    parser.add_argument("--no-quiet", action="store_true", help="skip the quiet runs (ratio then missing)")
    parser.add_argument(
        "--wait-quiet", type=float, default=0.0, metavar="S",
        help="on a shared machine: wait up to S seconds before each run until no other process is busy",
    )
    parser.add_argument(
        "--nice", type=int, default=0,
        help="run the command and the busy loops at this niceness (e.g. -10, as root): on a machine shared with "
        "other work, they then compete with each other as on a quiet machine, and the others' noise shrinks",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the result to this JSON file")
    args = parser.parse_args()

    command = args.command or DEFAULT_COMMAND
    if shutil.which(command[0]) is None and not Path(command[0]).exists():
        raise SystemExit(f"{command[0]}: not found (activate the environment that has crystalign)")
    env = dict(os.environ)
    for key in args.unset:
        env.pop(key, None)
    for item in args.env:
        key, _, value = item.partition("=")
        env[key] = value
    thread_env = {k: env.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    threads = command[command.index("--threads") + 1] if "--threads" in command[:-1] else "default"
    info = machine()
    print(f"{shlex.join(command)}  (threads {threads}, env {thread_env}, {info['usable_cpus']} usable CPUs, load {info['loadavg_before']})")

    quiet, quiet_busy = ([], []) if args.no_quiet else timed(command, env, args.repeats, "quiet", args.wait_quiet, 0, args.nice)
    busy = [subprocess.Popen(niced([sys.executable, "-c", "while True: pass"], args.nice)) for _ in range(args.busy)]
    try:
        time.sleep(0.5)  # the busy loops are running before the command starts
        loaded, loaded_busy = timed(command, env, args.repeats, f"beside {args.busy} busy", args.wait_quiet, args.busy, args.nice)
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()
    result = {
        "command": shlex.join(command),
        "threads": threads,
        "thread_env": thread_env,
        "busy_processes": args.busy,
        "nice": args.nice,
        "seconds_quiet": min(quiet) if quiet else None,
        "seconds_load": min(loaded),
        "ratio": round(min(loaded) / min(quiet), 2) if quiet else None,
        "runs_quiet": [round(t, 3) for t in quiet],
        "runs_load": [round(t, 3) for t in loaded],
        # CPUs busy just before each run (0.5 s sample; the loaded runs count the busy processes started here)
        "busy_cpus_before_quiet": [None if b is None else round(b, 2) for b in quiet_busy],
        "busy_cpus_before_load": [None if b is None else round(b, 2) for b in loaded_busy],
        "machine": info,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
