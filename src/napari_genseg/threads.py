"""CPU threads for inference: a default that does not collapse next to other busy processes.

torch's default intra-op thread count is the number of physical cores. Its OpenMP (libgomp)
workers spin while they wait at the barrier after every parallel region; when other processes
hold the cores, a spinning worker burns its time slice while its sibling is descheduled, and a
run with all cores next to busy processes was 3-5x slower than with one thread
(``benchmarks/threads.py`` prints the numbers; README "Threads").

Two levers, both used by ``genseg``:

* ``prefer_passive_wait`` (called by the CLI before torch is imported): OMP_WAIT_POLICY=PASSIVE
  unless the user chose a policy, so waiting workers sleep instead of spinning (OpenMP 4.5
  specification, section 4.8). With it, all cores are the default: throughput next to busy
  processes stays ahead of one thread.
* without passive waiting (torch imported before the policy could be set, e.g. inside napari or
  a script, or another policy chosen): ``default_threads`` = the CPUs this process may use
  (``os.sched_getaffinity``) minus the busy ones, at least 1. "Busy" is the larger of the 1-minute
  load average and the CPU use of the whole machine over the last 0.2 s (``/proc/stat``, Linux).

``--threads N`` overrides both counts.
"""

from __future__ import annotations

import os
import sys
import time

__all__ = [
    "available_cpus",
    "busy_cpus",
    "prefer_passive_wait",
    "passive_wait",
    "default_threads",
    "configure_threads",
]


def prefer_passive_wait() -> bool:
    """Set OMP_WAIT_POLICY=PASSIVE for this process when no policy is set and torch (hence its
    OpenMP runtime) is not loaded yet; returns whether passive waiting is in effect."""
    if "OMP_WAIT_POLICY" not in os.environ and "torch" not in sys.modules:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return passive_wait()


def passive_wait() -> bool:
    """True when OMP_WAIT_POLICY says PASSIVE (read by the OpenMP runtime when torch loads)."""
    return os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE"


def available_cpus() -> int:
    """CPUs this process may run on (affinity mask / cgroup-pinned set), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _cpu_times() -> tuple[int, int] | None:
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    vals = [int(v) for v in fields[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
    return sum(vals[:8]), idle


def busy_cpus(window_s: float = 0.2) -> float | None:
    """How many CPUs' worth of work the whole machine is doing: max(1-minute load average, CPU
    use over the last ``window_s`` seconds from /proc/stat). None when neither is available."""
    out = []
    try:
        out.append(os.getloadavg()[0])
    except (AttributeError, OSError):
        pass
    a = _cpu_times()
    if a is not None:
        time.sleep(window_s)
        b = _cpu_times()
        total, idle = b[0] - a[0], b[1] - a[1]
        if total > 0:
            ncpu = os.cpu_count() or 1
            out.append(ncpu * (1.0 - idle / total))
    return max(out) if out else None


def default_threads() -> int:
    """Thread count for inference when none is given (see the module docstring): torch's default
    (capped by the CPUs this process may use) with passive waiting, else the CPUs not busy."""
    import torch

    cap = max(1, min(torch.get_num_threads(), available_cpus()))
    if passive_wait():
        return cap
    busy = busy_cpus()
    if busy is None:
        return max(1, cap // 2)
    free = int(available_cpus() - busy + 0.5)
    return max(1, min(cap, free))


_TORCH_DEFAULT: int | None = None


def configure_threads(n: int | None = None) -> int:
    """Set torch's intra-op threads to ``n`` (None: ``default_threads()``, measured against
    torch's own default, not a count set earlier in this process; 0: torch's own default);
    returns the count set. Raises ValueError for n < 0."""
    import torch

    global _TORCH_DEFAULT
    if _TORCH_DEFAULT is None:
        _TORCH_DEFAULT = torch.get_num_threads()
    if n is None:
        current = torch.get_num_threads()
        torch.set_num_threads(_TORCH_DEFAULT)
        try:
            n = default_threads()
        finally:
            torch.set_num_threads(current)
    n = int(n) or _TORCH_DEFAULT
    if n < 1:
        raise ValueError(f"thread count must be >= 0, not {n}")
    torch.set_num_threads(n)
    return n
