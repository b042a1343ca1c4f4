"""lmforge.cpu_threads: the thread count follows the cores other programs leave free."""

import multiprocessing as mp
import os
import time

import pytest
import torch

from lmforge import cpu_threads
from lmforge.cpu_threads import ThreadGovernor, threads_for


def test_threads_for_hand_values():
    assert threads_for(0.0, 2, 2) == 2          # a quiet machine: every core
    assert threads_for(0.3, 2, 2) == 2          # a little background work is not a taken core
    assert threads_for(0.67, 2, 2) == 1         # one CPU-bound rival beside 2 spinning threads gets ~2/3 of a core
    assert threads_for(1.0, 2, 2) == 1
    assert threads_for(2.0, 2, 2) == 1          # never fewer than one
    assert threads_for(1.0, 16, 16) == 15
    assert threads_for(3.6, 16, 8) == 8         # never more than the process started with
    assert threads_for(12.4, 16, 16) == 4


def _busy_loop():
    while True:
        pass


def _run_until(gov, want: int, seconds: float) -> int:
    """Matmuls (the training loop's work) with adapt() between them until the thread count is `want`."""
    a = torch.randn(256, 256)
    end = time.monotonic() + seconds
    while time.monotonic() < end and gov.adapt() != want:
        for _ in range(20):
            a = torch.tanh(a @ a)
    return torch.get_num_threads()


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2
                    or not os.path.exists("/proc/stat"), reason="needs Linux and 2 CPUs")
def test_a_busy_core_is_left_to_the_other_program_and_taken_back_when_it_stops(monkeypatch):
    n_cpus = len(os.sched_getaffinity(0))
    start = torch.get_num_threads()
    monkeypatch.setattr(cpu_threads, "WINDOW_S", 0.5)
    try:
        torch.set_num_threads(n_cpus)
        gov = ThreadGovernor(enabled=True)
        assert gov.enabled and gov.max_threads == n_cpus
        rival = mp.get_context("spawn").Process(target=_busy_loop, daemon=True)
        rival.start()
        try:
            assert _run_until(gov, n_cpus - 1, 20.0) == n_cpus - 1, f"others used {gov.other_cores:.2f} cores"
            assert gov.other_cores > 0.5
        finally:
            rival.terminate()
            rival.join()
        assert _run_until(gov, n_cpus, 20.0) == n_cpus, f"others used {gov.other_cores:.2f} cores"
        gov.restore()
        assert torch.get_num_threads() == n_cpus
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
