"""Where data and caches live. Environment variables override the defaults; CLI options override both."""

from __future__ import annotations

import math
import os
from pathlib import Path

DATA_ROOT_ENV = "CRYSTALIGN_DATA_ROOT"
CACHE_ENV = "CRYSTALIGN_CACHE"


def data_root(override: str | os.PathLike | None = None) -> Path | None:
    """The local data root searched first for named datasets (``--data-root`` or $CRYSTALIGN_DATA_ROOT)."""
    value = override if override is not None else os.environ.get(DATA_ROOT_ENV)
    return Path(value).expanduser() if value else None


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """Download cache ($CRYSTALIGN_CACHE, else $XDG_CACHE_HOME/crystalign, else ~/.cache/crystalign)."""
    if override is not None:
        return Path(override).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "crystalign"


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_allocator(mmap_threshold: int = 32 << 20, trim_threshold: int = 512 << 20) -> bool:
    """Keep freed tensor buffers of up to ``mmap_threshold`` bytes in the heap (Linux/glibc only).

    By default glibc serves large blocks with fresh ``mmap`` pages and returns them on free, so every new
    (edges x hidden) activation pays a page fault per 4 KiB on first touch; how often depends on the heap's
    history (glibc adapts its threshold), which made CPU sampling speed drift by 20 % from run to run. Fixed
    thresholds make it both faster and steady; the price is that up to ``trim_threshold`` bytes of freed heap stay
    with the process. The ``crystalign`` command calls this; library users may. Returns whether it was applied;
    set ``CRYSTALIGN_NO_MALLOC_TUNING=1`` to leave the allocator alone.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux") or os.environ.get("CRYSTALIGN_NO_MALLOC_TUNING"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold))) and bool(mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)))


# ---------------------------------------------------------------------------------------------- CPU threads

#: the thread-count variables of the OpenMP runtime (PyTorch's CPU kernels), MKL and OpenBLAS (numpy)
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
#: how long an idle GNU OpenMP thread spins before it sleeps (~100 spins per microsecond), where a process runs 2
#: threads or more (the default on 3 cores or more, or --threads). Measured on 2 cores,
#: sampling 256 perov_5 structures with 2 threads: 1000 spins is as fast as libgomp's default (300000) on a quiet
#: machine, where PASSIVE alone (0 spins) is 1.5x slower; beside one busy process it is 2x slower than quiet, where
#: 10000 spins or more were 3.5-8x slower and the default 4x (up to 20x)
SPIN_COUNT = "1000"
_SET_HERE: dict[str, str] = {}  # values configure_threads wrote, so a second call does not take them for the user's
_DEFAULT: list[int] = []  # the default, measured once per process: two runs in one process use the same count


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. under taskset or a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def physical_cores(cpus: set[int] | None = None) -> int:
    """Distinct cores among ``cpus`` (default: the usable ones): hyperthreads of one core count once, as in
    PyTorch's own default thread count."""
    if cpus is None:
        try:
            cpus = os.sched_getaffinity(0)
        except AttributeError:
            return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        try:
            cores.add(Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


def cpu_quota() -> float | None:
    """CPUs' worth of time this process's cgroup may use (cgroup v2 ``cpu.max``, e.g. ``docker --cpus 2``), or None
    when unlimited or unknown: the affinity mask alone would then offer every core of the host."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else max(int(quota) / int(period), 0.01)
    except (OSError, ValueError):
        return None


def _cpu_times(cpus: set[int]) -> tuple[int, int] | None:
    """(busy, total) jiffies of ``cpus`` from /proc/stat, or None where there is none."""
    busy = total = 0
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        ticks = [int(x) for x in rest.split()[:8]]  # user nice system idle iowait irq softirq steal
        total += sum(ticks)
        busy += sum(ticks) - ticks[3] - ticks[4]
    return (busy, total) if total else None


def busy_cpus(interval: float = 0.05) -> float | None:
    """How many of the usable CPUs other processes keep busy, from /proc/stat over ``interval`` seconds while this
    process sleeps; None where /proc/stat is not available (not Linux)."""
    import time

    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:
        return None
    before = _cpu_times(cpus)
    time.sleep(interval)
    after = _cpu_times(cpus)
    if before is None or after is None or after[1] <= before[1]:
        return None
    return len(cpus) * (after[0] - before[0]) / (after[1] - before[1])


def default_threads() -> int:
    """The thread count the ``crystalign`` command uses without ``--threads`` or $OMP_NUM_THREADS: one per physical
    core that no other process keeps busy at start, less one core kept spare, at least 1 (at most the cgroup's CPU
    quota). Measured once per process (~50 ms); on 2 cores it is always 1.

    Why: a compute thread that shares its core with another busy process is descheduled for whole time slices
    while its siblings wait for it at every parallel region, and a busy process may start after this one did. The
    spare core takes it. Measured on 2 cores (whole commands, quiet -> beside one busy process): `crystalign predict` took 88 -> 82 s with 1 thread but 100 -> 348 s with 2 (PASSIVE, short spin);
    `sample -n 256` 6.7 -> 6.0 s with 1 thread, 5.7 -> 7.5 s with 2. (Sampled structures were bit-identical at
    1 and 2 threads.)
    """
    if not _DEFAULT:
        cores = physical_cores()
        quota = cpu_quota()
        if quota is not None:
            cores = min(cores, max(1, math.ceil(quota)))
        busy = busy_cpus()
        free = usable_cpus() - busy if busy is not None else cores
        _DEFAULT.append(max(1, min(cores, int(free + 0.5)) - 1))
    return _DEFAULT[0]


def configure_threads(n: int | None = None) -> int:
    """Choose the CPU threads of PyTorch, MKL and OpenBLAS, and make idle OpenMP threads sleep; returns the count.

    ``n``: threads per process, 1 to the usable CPUs (ValueError otherwise); None keeps $OMP_NUM_THREADS when you
    set it, else :func:`default_threads` (one per physical core not kept busy by another process, less a spare
    one). An explicit ``n`` overrides the environment, as command-line options do.

    Unless you set $OMP_WAIT_POLICY or $GOMP_SPINCOUNT, sets $OMP_WAIT_POLICY=PASSIVE and $GOMP_SPINCOUNT to
    :data:`SPIN_COUNT`: by default idle OpenMP threads spin for milliseconds, which on a machine with few cores
    steals the CPU from any other busy process, and from each other (2-thread `crystalign sample` beside one busy
    process ran 4x slower than quiet, up to 20x); with a short spin, then sleep, it stays within 2x. Sets $OMP_NUM_THREADS,
    $MKL_NUM_THREADS and $OPENBLAS_NUM_THREADS to the count (each unless you set it, or ``n`` is given), and calls
    ``torch.set_num_threads`` if torch is already imported.

    The OpenMP runtime reads the environment once, when torch is imported, so from Python call this first::

        import crystalign.settings
        crystalign.settings.configure_threads()      # or configure_threads(1)
        import torch, crystalign                     # now torch starts with these settings

    The ``crystalign`` command calls it (with ``--threads``) before it imports torch.
    """
    usable = usable_cpus()
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= usable):
        raise ValueError(f"threads must be between 1 and {usable} (the CPUs this process may use), got {n!r}")
    users = {k for k in THREAD_ENV if os.environ.get(k) and os.environ[k] != _SET_HERE.get(k)}
    if n is None:
        try:
            n = int(os.environ["OMP_NUM_THREADS"]) if "OMP_NUM_THREADS" in users else None
        except ValueError:  # not a number: the OpenMP runtime will say so; the default stands here
            n = None
        if n is None or n < 1:
            n = default_threads()
        keep = users
    else:
        keep = set()
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # other OpenMP runtimes: sleep when idle
        os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT  # GNU's (PyTorch's on Linux): after a short spin; overrides PASSIVE
    for key in THREAD_ENV:
        if key not in keep:
            os.environ[key] = _SET_HERE[key] = str(n)
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "set_num_threads"):
        torch.set_num_threads(n)
    return n
