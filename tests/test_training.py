"""The shared training loop: schedule values, early stop with a checkpoint, exact continuation."""

import json
import math

import pytest
import torch

from lmforge import training
from lmforge.errors import LmforgeError
from lmforge.training import (LoopHooks, NonFiniteGuard, OptimConfig, clip_and_step, lr_at, step_generator,
                               train_loop)


def test_lr_schedule_hand_values():
    cfg = OptimConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=4, max_steps=14)
    assert [lr_at(s, cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, cfg) == pytest.approx(1.0)
    assert lr_at(9, cfg) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(14, cfg) == pytest.approx(0.1)


def _run(tmp_path, stop_step=0, resume_state=None):
    """Least squares on data drawn from step_generator; returns (losses, saves, model)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
    w = torch.tensor([[1.0, -2.0, 0.5, 3.0]])
    saves = []

    def micro_batch(step, micro, dist):
        x = torch.randn(8, 4, generator=step_generator(0, step, micro))
        return x, x @ w.T

    def loss(m, batch):
        x, y = batch
        return ((m(x) - y) ** 2).mean(), {}, len(x)

    def save(m, state, final):
        saves.append((state["step"], final, {**state, "model": {k: v.clone() for k, v in m.state_dict().items()}}))

    cfg = OptimConfig(lr=0.05, warmup_steps=2, max_steps=10, grad_accum=2)
    hist = train_loop(model, cfg, LoopHooks(micro_batch, loss, save), tmp_path, torch.device("cpu"),
                      resume_state=resume_state, log_every=1, progress=False, stop_step=stop_step)
    return [h["loss"] for h in hist], saves, model


def test_stop_step_saves_and_resume_continues_exactly(tmp_path):
    full, full_saves, full_model = _run(tmp_path / "a")
    assert [(s, f) for s, f, _ in full_saves] == [(10, True)]
    first, saves, _ = _run(tmp_path / "b", stop_step=4)
    assert len(first) == 4 and [(s, f) for s, f, _ in saves] == [(4, False)]
    rest, _, model = _run(tmp_path / "b", resume_state=saves[0][2])
    assert first + rest == full  # bit-exact: same data, schedule and optimizer state
    assert torch.equal(model.weight, full_model.weight)


def _guarded_run(tmp_path, bad_steps, bad="nan_loss", max_skipped=3, save_every=2, saves=None):
    """Least squares where the steps in `bad_steps` (1-based) get a NaN loss or, with bad="inf_grad", a finite
    loss whose gradient is infinite. Returns (history, saves, model, snapshots of the weights before each step)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    w = torch.tensor([[1.0, -2.0, 0.5, 3.0]])
    saves, before = [] if saves is None else saves, {}

    def micro_batch(step, micro, dist):
        x = torch.randn(8, 4, generator=step_generator(0, step, micro))
        return step + 1, x, x @ w.T

    def loss(m, batch):
        step, x, y = batch
        before.setdefault(step, m.weight.detach().clone())
        value = ((m(x) - y) ** 2).mean()
        if step in bad_steps:
            value = value * float("nan") if bad == "nan_loss" else value + (m.weight - m.weight.detach()).abs().sum().sqrt()
        return value, {}, len(x)

    def save(m, state, final):
        saves.append((state["step"], m.weight.detach().clone()))

    cfg = OptimConfig(lr=0.05, warmup_steps=2, max_steps=10, max_skipped_steps=max_skipped)
    hist = train_loop(model, cfg, LoopHooks(micro_batch, loss, save), tmp_path, torch.device("cpu"), log_every=1,
                      progress=False, save_every=save_every)
    return hist, saves, model, before


@pytest.mark.parametrize("bad", ["nan_loss", "inf_grad"])
def test_a_non_finite_step_is_skipped_and_counted(tmp_path, bad):
    hist, _, model, before = _guarded_run(tmp_path, {4, 5}, bad)
    assert len(hist) == 10 and torch.isfinite(model.weight).all()
    assert torch.equal(before[5], before[4]) and torch.equal(before[6], before[4])  # steps 4 and 5 changed nothing
    assert not torch.equal(before[4], before[3])
    assert [h.get("skipped_steps", 0) for h in hist] == [0, 0, 0, 1, 2, 2, 2, 2, 2, 2]
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[4])["skipped_steps"] == 2
    if bad == "inf_grad":
        assert math.isfinite(hist[3]["loss"]) and not math.isfinite(hist[3]["grad_norm"])


def test_too_many_bad_steps_in_a_row_stop_with_the_last_checkpoint_intact(tmp_path):
    saves = []
    with pytest.raises(LmforgeError, match=r"3 steps in a row \(up to step 7\) had a non-finite loss"):
        _guarded_run(tmp_path, {5, 6, 7, 8, 9, 10}, saves=saves)
    # saved at steps 2, 4 and 6 (step 6 was skipped: the weights are step 4's), never after the stop
    assert [s for s, _ in saves] == [2, 4, 6] and torch.equal(saves[2][1], saves[1][1])
    assert all(torch.isfinite(w).all() for _, w in saves)


def test_clip_and_step_skips_a_non_finite_gradient():
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w0 = model.weight.detach().clone()
    model.weight.grad = torch.tensor([[float("inf"), 1.0]])
    model.bias.grad = torch.tensor([1.0])
    norm, _ = clip_and_step(model, opt, OptimConfig(lr=0.1, warmup_steps=0), 0)
    assert not math.isfinite(norm) and torch.equal(model.weight, w0) and model.weight.grad is None
    guard = NonFiniteGuard(2, "updates")
    assert guard.check(True, 1) and not guard.check(False, 2) and guard.check(True, 3) and not guard.check(False, 4)
    with pytest.raises(LmforgeError, match=r"2 updates in a row \(up to step 5\)"):
        guard.check(False, 5)
    assert guard.skipped == 3


def test_the_global_batch_is_kept_across_processes():
    from lmforge.distributed import local_grad_accum

    assert [local_grad_accum(8, n) for n in (1, 2, 4, 8)] == [8, 4, 2, 1]
    with pytest.raises(LmforgeError, match=r"config key 'optim.grad_accum' \(2\) must be a multiple of the number of processes \(4\)"):
        local_grad_accum(2, 4)


def test_the_cpu_peak_is_measured_once_per_process_and_thread_count(monkeypatch):
    calls = []

    def measure(n: int = 1024, seconds: float = 0.5) -> float:
        calls.append(n)
        return 1e11 * len(calls)

    monkeypatch.setattr(training, "measure_cpu_matmul_peak", measure)
    monkeypatch.setattr(training, "_CPU_PEAK", {})
    monkeypatch.setattr(training, "_CPU_PEAK_REMEASURED", set())
    cpu = torch.device("cpu")
    assert training.device_peak_flops(cpu) == 1e11
    assert training.device_peak_flops(cpu) == 1e11 and len(calls) == 1  # the next stage reuses it
    assert training.raise_cpu_peak() == 2e11  # a step beat it: measured again, the larger kept
    assert training.raise_cpu_peak() == 2e11 and len(calls) == 2  # but only once, not at every fast step
    assert training.device_peak_flops(cpu) == 2e11
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        assert training.device_peak_flops(cpu) == 3e11 and len(calls) == 3  # another thread count: its own
    finally:
        torch.set_num_threads(threads)
