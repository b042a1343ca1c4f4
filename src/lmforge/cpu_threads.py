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

A loop that can split its batches does better than fewer threads when few CPUs are left (2 CPUs, one busy):
`lanes()` has it run the parts of each batch in one single-threaded Python thread per CPU (`run_lanes`), each
with its own forward and backward, the gradients summed by autograd. A lane shares its core with the other program
instead of holding up the other lanes at every op, so the process gets its fair share of the CPUs (2 of 3 runnable
threads on 2 cores) without spinning: `lmforge pretrain` at 0.65 of its quiet speed beside one CPU-bound process,
where 1 thread ran at 0.53 (BENCHMARKS.md "A busy machine"; measured on 2 CPUs only).

Off when OMP_NUM_THREADS is set (the user chose the thread count; torchrun sets it for its processes), with
LMFORGE_ADAPT_THREADS=0, where /proc/stat does not list this process's CPUs (other operating systems, some
containers), or with a single thread. /proc/stat does not see cgroup CPU quotas. Changing the thread count changes
how reductions are split, so a run on a busy machine rounds differently from a quiet one.
"""

from __future__ import annotations

import contextlib
import os
import time
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Callable

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
        self.pending, self.agree, self.free = self.max_threads, 0, self.max_threads

    def _sample(self) -> tuple[float, float, float] | None:
        busy = cpu_busy_seconds(self.cpus)
        return None if busy is None else (time.monotonic(), busy, time.process_time())

    def measure(self) -> int:
        """Call between steps: cheap except once per window. Returns the confirmed number of free CPUs' threads
        (max_threads while nothing else is busy)."""
        if not self.enabled or time.monotonic() - self.last[0] < WINDOW_S:
            return self.free
        sample = self._sample()
        if sample is None:
            return self.free
        (t0, busy0, own0), (t1, busy1, own1) = self.last, sample
        self.last = sample
        self.other_cpus = max(0.0, ((busy1 - busy0) - (own1 - own0)) / (t1 - t0))
        want = threads_for(self.other_cpus, len(self.cpus), self.max_threads)
        self.agree = self.agree + 1 if want == self.pending else 1
        self.pending = want
        if self.agree >= CONFIRM:
            self.free = want
        return self.free

    def adapt(self) -> int:
        """Between steps of a loop that runs one batch at a time: torch's thread count follows the free CPUs.
        Returns the thread count now in use."""
        self._use(self.measure())
        return torch.get_num_threads()

    def lanes(self) -> int:
        """After adapt(), in a loop that can split its batches: while other processes leave at most half of the
        CPUs free (2 CPUs, one busy), one single-threaded lane per thread begin() found; else 1 (no lanes). With
        more CPUs free, fewer threads lose little (15 of 16), and many small lanes would cost more than they save."""
        return self.max_threads if self.enabled and 2 * self.free <= self.max_threads else 1

    def _use(self, threads: int) -> None:
        if self.enabled and threads != torch.get_num_threads():
            torch.set_num_threads(threads)

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


def lanes(device) -> int:
    """After adapt(device), in a loop that can split its batches: the number of lanes to run each batch's parts in
    with run_lanes (1: run it whole, as usual). More than 1 only on the CPU while other programs leave at most half
    of its CPUs free."""
    if torch.device(device).type != "cpu":
        return 1
    return _governor().lanes()


def side_by_side(device) -> bool:
    """After adapt(device): whether two independent models' forward and backward passes (PPO's actor and critic)
    should run at once, each in its own single-threaded lane (run_lanes), rather than one after the other on every
    thread: when at most two CPUs are this process's to use. On two threads the lanes are faster (a 2-core machine:
    58 vs 66 ms for a cpu16 PPO epoch, BENCHMARKS.md; small ops scale poorly over OpenMP threads); with one CPU
    left free by other programs they take the process's fair share of the busy ones; with more CPUs free, two
    single-threaded lanes would leave the rest idle."""
    if torch.device(device).type != "cpu":
        return False
    gov = _governor()
    return gov.free <= 2 if gov.enabled else torch.get_num_threads() == 2


_POOL: tuple[ThreadPoolExecutor, int] | None = None  # the lanes' threads, and how many


def run_lanes(fn: Callable, parts: list) -> list:
    """fn(part) for every part, in up to one single-threaded Python thread per part (the lanes); results in order.
    torch releases the GIL inside its ops and autograd sums the gradients of concurrent backward passes into the
    same .grad (under a lock), so the parts' forward and backward passes run side by side."""
    global _POOL
    if len(parts) <= 1:
        return [fn(p) for p in parts]
    if _POOL is None or _POOL[1] < len(parts):
        if _POOL is not None:
            _POOL[0].shutdown()
        _POOL = ThreadPoolExecutor(max_workers=len(parts), thread_name_prefix="lmforge-lane"), len(parts)

    def one_thread(part):
        if torch.get_num_threads() != 1:  # each thread has its own OpenMP setting
            torch.set_num_threads(1)
        return fn(part)

    threads = torch.get_num_threads()
    if threads != 1:  # one thread per lane, the caller's count back afterwards (for the optimizer step)
        torch.set_num_threads(1)
    try:
        futures = [_POOL[0].submit(one_thread, p) for p in parts]
        wait(futures)  # every lane done (its backward too) before anything else, an error included
        return [f.result() for f in futures]
    finally:
        if threads != 1:
            torch.set_num_threads(threads)
