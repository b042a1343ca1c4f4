"""CPU threads that make room for other programs.

PyTorch splits each CPU op evenly over its OpenMP threads, then waits for the slowest. When another program keeps
one of the cores busy, the thread that shares that core holds every op back, and the other threads spin while they
wait, burning the CPU time the busy core's thread needed: on 2 cores, 2-thread pretraining ran at 0.37 of its
quiet speed beside one CPU-bound process, and 1 thread at 0.54 (`benchmarks/pretrain_throughput.py --compete 1
--busy-threads N`, BENCHMARKS.md "A busy machine"). So the training loops call `adapt()` once per step: every
few seconds it measures how many cores other processes used (the busy time of this process's CPUs in /proc/stat,
less this process's own CPU time) and runs on the cores that are left, back on all of them once they are free.

Off when OMP_NUM_THREADS is set (the user chose the thread count), with LMFORGE_ADAPT_THREADS=0, on other
operating systems (no /proc/stat), or when PyTorch starts with a single thread. Changing the thread count changes
how reductions are split, so a run on a busy machine rounds differently from a quiet one.
"""

from __future__ import annotations

import os
import time

import torch

WINDOW_S = 2.0   # seconds between measurements
CONFIRM = 2      # windows in a row that must agree before the thread count changes


def threads_for(other_cores: float, n_cpus: int, max_threads: int) -> int:
    """Threads to run when other processes use `other_cores` of this process's `n_cpus` CPUs: one per core they
    leave free (a core more than half used by others counts as taken), at least 1, at most max_threads."""
    free = n_cpus - other_cores
    return max(1, min(max_threads, int(free + 0.5)))


def _cpu_busy_seconds(cpus: set[int]) -> float | None:
    """Busy (non-idle, non-iowait, non-steal) seconds of the given CPUs since boot, from /proc/stat."""
    hz = os.sysconf("SC_CLK_TCK")
    busy = 0
    try:
        with open("/proc/stat", encoding="ascii") as f:
            for line in f:
                if not line.startswith("cpu") or line.startswith("cpu "):
                    continue
                name, *ticks = line.split()
                if int(name[3:]) in cpus:
                    user, nice, system, _idle, _iowait, irq, softirq = (int(t) for t in ticks[:7])
                    busy += user + nice + system + irq + softirq
    except (OSError, ValueError):
        return None
    return busy / hz


class ThreadGovernor:
    """Measures other processes' CPU use every WINDOW_S seconds and sets torch's thread count to the free cores."""

    def __init__(self, enabled: bool | None = None):
        if enabled is None:
            enabled = "OMP_NUM_THREADS" not in os.environ and os.environ.get("LMFORGE_ADAPT_THREADS", "1") != "0"
        self.cpus = set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else set()
        self.max_threads = torch.get_num_threads()
        self.enabled = enabled and self.max_threads > 1 and bool(self.cpus) and self._sample() is not None
        self.last = self._sample() if self.enabled else None
        self.pending, self.agree = self.max_threads, 0
        self.other_cores = 0.0  # the last measurement

    def _sample(self) -> tuple[float, float, float] | None:
        busy = _cpu_busy_seconds(self.cpus)
        return None if busy is None else (time.monotonic(), busy, time.process_time())

    def adapt(self) -> int:
        """Call between steps: cheap except once per window. Returns the thread count now in use."""
        if not self.enabled:
            return torch.get_num_threads()
        now = time.monotonic()
        if now - self.last[0] < WINDOW_S:
            return torch.get_num_threads()
        sample = self._sample()
        if sample is None:
            return torch.get_num_threads()
        (t0, busy0, own0), (t1, busy1, own1) = self.last, sample
        self.last = sample
        self.other_cores = max(0.0, ((busy1 - busy0) - (own1 - own0)) / (t1 - t0))
        want = threads_for(self.other_cores, len(self.cpus), self.max_threads)
        self.agree = self.agree + 1 if want == self.pending else 1
        self.pending = want
        if self.agree >= CONFIRM and want != torch.get_num_threads():
            torch.set_num_threads(want)
        return torch.get_num_threads()

    def restore(self) -> None:
        """Back to the thread count the process started with."""
        if self.enabled and torch.get_num_threads() != self.max_threads:
            torch.set_num_threads(self.max_threads)
        self.pending, self.agree = self.max_threads, 0


_GOVERNOR: ThreadGovernor | None = None


def adapt() -> int:
    """The process-wide ThreadGovernor's adapt() (created on first use). Training loops on the CPU call it once per
    step; returns the thread count in use."""
    global _GOVERNOR
    if _GOVERNOR is None:
        _GOVERNOR = ThreadGovernor()
    return _GOVERNOR.adapt()


def start_threads() -> int:
    """The thread count the process started with (what adapt() returns to)."""
    return _GOVERNOR.max_threads if _GOVERNOR is not None else torch.get_num_threads()


def restore() -> None:
    """At the end of a training loop: the process's own thread count again, for whatever the caller does next."""
    if _GOVERNOR is not None:
        _GOVERNOR.restore()
