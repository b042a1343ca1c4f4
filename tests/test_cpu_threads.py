"""lmforge.cpu_threads: the thread count (or the lanes) follow the CPUs other programs leave free."""

import multiprocessing as mp
import os
import time

import pytest
import torch

from lmforge import cpu_threads
from lmforge.cpu_threads import ThreadGovernor, cpu_busy_seconds, threads_for


def test_threads_for_hand_values():
    assert threads_for(0.0, 2, 2) == 2          # a quiet machine: every CPU
    assert threads_for(0.3, 2, 2) == 2          # a little background work is not a taken CPU
    assert threads_for(0.67, 2, 2) == 1         # one CPU-bound rival beside 2 spinning threads gets ~2/3 of a CPU
    assert threads_for(1.0, 2, 2) == 1
    assert threads_for(2.0, 2, 2) == 1          # never fewer than one
    assert threads_for(1.0, 16, 16) == 15
    assert threads_for(3.6, 16, 8) == 8         # never more than the process started with
    assert threads_for(12.4, 16, 16) == 4


def test_busy_seconds_are_read_from_the_process_cpus_lines(tmp_path):
    hz = os.sysconf("SC_CLK_TCK")
    stat = tmp_path / "stat"
    stat.write_text("cpu  900 9 90 9000 90 9 9 9 0 0\n"
                    "cpu0 100 1 10 1000 10 1 1 7 0 0\n"      # user nice system idle iowait irq softirq steal ...
                    "cpu1 200 2 20 2000 20 2 2 7 0 0\n"
                    "cpu12 400 4 40 4000 40 4 4 7 0 0\n"
                    "intr 123 4 5\nctxt 999\nbtime 1\n")
    assert cpu_busy_seconds({0, 12}, str(stat)) == pytest.approx((113 + 452) / hz)  # not idle, iowait or steal
    assert cpu_busy_seconds({1}, str(stat)) == pytest.approx(226 / hz)
    assert cpu_busy_seconds({0, 3}, str(stat)) is None         # a CPU of ours missing (renumbered in a container)
    assert cpu_busy_seconds({0}, str(tmp_path / "missing")) is None


def _busy_loop():
    while True:
        pass


def _run_until(done, seconds: float) -> int:
    """Matmuls (a training loop's work) with adapt() between them until done(threads) or the time is up."""
    a = torch.randn(256, 256)
    end = time.monotonic() + seconds
    while time.monotonic() < end and not done(torch.get_num_threads()):
        for _ in range(20):
            a = torch.tanh(a @ a)
        cpu_threads.adapt("cpu")
    return torch.get_num_threads()


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2
                    or cpu_busy_seconds(set(os.sched_getaffinity(0))) is None, reason="needs /proc/stat and 2 CPUs")
def test_a_busy_cpu_is_left_to_the_other_program_and_taken_back_when_it_stops(monkeypatch):
    n_cpus = len(os.sched_getaffinity(0))
    start = torch.get_num_threads()
    monkeypatch.setattr(cpu_threads, "WINDOW_S", 0.5)
    monkeypatch.setattr(cpu_threads, "_GOVERNOR", ThreadGovernor(enabled=True))
    try:
        torch.set_num_threads(n_cpus)
        with cpu_threads.adaptive():
            assert cpu_threads._GOVERNOR.max_threads == n_cpus
            rival = mp.get_context("spawn").Process(target=_busy_loop, daemon=True)
            rival.start()
            try:
                assert _run_until(lambda n: n < n_cpus, 20.0) < n_cpus
                assert cpu_threads._GOVERNOR.other_cpus > 0.5
                # a loop that can split its batches runs one single-threaded lane per CPU instead
                assert cpu_threads.lanes("cpu") == n_cpus and torch.get_num_threads() == 1
                assert cpu_threads.lanes("cuda") == 1  # only the CPU has lanes
            finally:
                rival.terminate()
                rival.join()
            # all of them again, unless the machine is still busy with other work (then fewer is right)
            back = _run_until(lambda n: n == n_cpus, 20.0)
            assert back == n_cpus or cpu_threads._GOVERNOR.other_cpus >= 0.5
            if back == n_cpus:
                assert cpu_threads.lanes("cpu") == 1 and torch.get_num_threads() == n_cpus
            rival = mp.get_context("spawn").Process(target=_busy_loop, daemon=True)
            rival.start()
            try:
                assert _run_until(lambda n: n < n_cpus, 20.0) < n_cpus
            finally:
                rival.terminate()
                rival.join()
        assert torch.get_num_threads() == n_cpus  # leaving adaptive() puts back the count it found
    finally:
        torch.set_num_threads(start)


def test_off_when_the_user_chose_the_threads_or_turned_it_off(monkeypatch):
    start = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        monkeypatch.setenv("LMFORGE_ADAPT_THREADS", "1")
        assert not ThreadGovernor().enabled
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setenv("LMFORGE_ADAPT_THREADS", "0")
        assert not ThreadGovernor().enabled
        torch.set_num_threads(1)  # nothing to give up
        assert not ThreadGovernor(enabled=True).enabled
    finally:
        torch.set_num_threads(start)


def test_two_models_side_by_side_on_two_threads_or_a_busy_machine(monkeypatch, busy_cpu):
    """side_by_side: PPO's actor and critic in two single-threaded lanes whenever at most two CPUs are free (a
    2-thread CPU, quiet or busy; a larger one that other programs keep busy); never on a GPU nor with more CPUs
    free."""
    assert not cpu_threads.side_by_side("cuda")
    busy_cpu.begin()  # 2 threads, one CPU measured free
    busy_cpu.adapt()
    assert torch.get_num_threads() == 1 and cpu_threads.side_by_side("cpu")
    many = ThreadGovernor(enabled=True)  # a 16-thread machine: lanes only once at most 2 CPUs are free
    many.enabled, many.max_threads = True, 16
    monkeypatch.setattr(cpu_threads, "_GOVERNOR", many)
    for free, want in ((16, False), (8, False), (2, True), (1, True)):
        many.free = free
        assert cpu_threads.side_by_side("cpu") is want, free
    quiet = ThreadGovernor(enabled=False)  # the user chose the threads (OMP_NUM_THREADS): torch's count decides
    monkeypatch.setattr(cpu_threads, "_GOVERNOR", quiet)
    for threads, want in ((1, False), (2, True), (4, False)):
        monkeypatch.setattr(torch, "get_num_threads", lambda t=threads: t)
        assert cpu_threads.side_by_side("cpu") is want, threads
