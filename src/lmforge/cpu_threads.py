"""CPU threads that make room for other programs.

PyTorch splits each CPU op evenly over its OpenMP threads, then waits for the slowest. When another program keeps
one of the cores busy, the thread that shares that core holds every op back, and the other threads spin while they
wait, burning the CPU time the busy core's thread needed: on 2 cores, 2-thread pretraining ran at 0.37 of its
quiet speed beside one CPU-bound process, and 1 thread at 0.54 (`benchmarks/pretrain_throughput.py --compete 1
--busy-threads N`, BENCHMARKS.md "A busy machine"). So the training loops run inside `adaptive()` and call
`adapt()` between steps: at most every WINDOW_S seconds it measures how many CPUs other processes used (the busy
time of this process's CPUs in /proc/stat, less this process's own CPU time), and after CONFIRM windows that agree
runs on the CPUs they leave free; back on all of them the same way once they are free. Leaving `adaptive()` puts
back the thread count it found.

Off when OMP_NUM_THREADS is set (the user chose the thread count; torchrun sets it for its processes), with
LMFORGE_ADAPT_THREADS=0, where /proc/stat does not list this process's CPUs (other operating systems, some
containers), or with a single thread. /proc/stat does not see cgroup CPU quotas. Changing the thread count changes
how reductions are split, so a run on a busy machine rounds differently from a quiet one.
"""

from __future__ import annotations

import contextlib
import os
import time

import torch

WINDOW_S = 2.0   # seconds between measurements
CONFIRM = 2      # windows in a row that must agree before the thread count changes
STAT = "/proc/stat"


def threads_for(other_cpus: float, n_cpus: int, max_threads: int) -> int:
    """Threads to run when other processes use `other_cpus` of this process's `n_cpus` CPUs: one per CPU they leave
    free (a CPU more than half used by others counts as taken), at least 1, at most max_threads. With more CPUs
    than threads (hyper-threading: PyTorch runs one thread per physical core), others take the spare ones first."""
    return max(1, min(max_threads, int(n_cpus - other_cpus + 0.5)))


def cpu_busy_seconds(cpus: set[int], path: str = STAT) -> float | None:
    """Busy (user, nice, system, irq, softirq: not idle, iowait or steal) seconds of the given CPUs since boot, from
    /proc/stat's `cpuN` lines; None when the file cannot be read or does not list every one of them."""
    hz = os.sysconf("SC_CLK_TCK")
    busy, seen = 0, set()
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                name, *ticks = line.split()
                if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
                    continue
                user, nice, system, _idle, _iowait, irq, softirq = (int(t) for t in ticks[:7])
                busy += user + nice + system + irq + softirq
                seen.add(int(name[3:]))
    except (OSError, ValueError):
        return None
    return busy / hz if seen == cpus else None


class ThreadGovernor:
    """Measures other processes' CPU use and sets torch's thread count to the CPUs they leave free."""

    def __init__(self, enabled: bool | None = None):
        if enabled is None:
            enabled = "OMP_NUM_THREADS" not in os.environ and os.environ.get("LMFORGE_ADAPT_THREADS", "1") != "0"
        self.cpus = set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else set()
        self.allowed = enabled and bool(self.cpus) and cpu_busy_seconds(self.cpus) is not None
        self.other_cpus = 0.0  # the last measurement
        self.begin()

    def begin(self) -> None:
        """Start afresh from the thread count in use now (the most adapt() will use)."""
        self.max_threads = torch.get_num_threads()
        self.enabled = self.allowed and self.max_threads > 1
        self.last = self._sample() if self.enabled else None
        self.pending, self.agree = self.max_threads, 0

    def _sample(self) -> tuple[float, float, float] | None:
        busy = cpu_busy_seconds(self.cpus)
        return None if busy is None else (time.monotonic(), busy, time.process_time())

    def adapt(self) -> int:
        """Call between steps: cheap except once per window. Returns the thread count now in use."""
        if not self.enabled or time.monotonic() - self.last[0] < WINDOW_S:
            return torch.get_num_threads()
        sample = self._sample()
        if sample is None:
            return torch.get_num_threads()
        (t0, busy0, own0), (t1, busy1, own1) = self.last, sample
        self.last = sample
        self.other_cpus = max(0.0, ((busy1 - busy0) - (own1 - own0)) / (t1 - t0))
        want = threads_for(self.other_cpus, len(self.cpus), self.max_threads)
        self.agree = self.agree + 1 if want == self.pending else 1
        self.pending = want
        if self.agree >= CONFIRM and want != torch.get_num_threads():
            torch.set_num_threads(want)
        return torch.get_num_threads()

    def end(self) -> None:
        """Back to the thread count begin() found."""
        if self.enabled and torch.get_num_threads() != self.max_threads:
            torch.set_num_threads(self.max_threads)


_GOVERNOR: ThreadGovernor | None = None
_DEPTH = 0


def _governor() -> ThreadGovernor:
    global _GOVERNOR
    if _GOVERNOR is None:
        _GOVERNOR = ThreadGovernor()
    return _GOVERNOR


@contextlib.contextmanager
def adaptive():
    """Around a training loop on the CPU: adapt() inside it may lower the thread count; on leaving (an exception
    included) the count it found is back. Nested uses share the outermost's."""
    global _DEPTH
    gov = _governor()
    if _DEPTH == 0:
        gov.begin()
    _DEPTH += 1
    try:
        yield
    finally:
        _DEPTH -= 1
        if _DEPTH == 0:
            gov.end()


def adapt(device) -> int | None:
    """Between the steps of a loop on `device` (inside adaptive()): the process-wide ThreadGovernor's adapt() on
    the CPU. Returns the thread count while it is below the one adaptive() found (for the metrics), else None."""
    if torch.device(device).type != "cpu":
        return None
    gov = _governor()
    threads = gov.adapt()
    return threads if threads < gov.max_threads else None
