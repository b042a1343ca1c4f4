"""The shared training loop: schedule values, early stop with a checkpoint, exact continuation."""

import json
import math
import threading
import time

import pytest
import torch

from lmforge import cpu_threads, training
from lmforge.errors import LmforgeError
from lmforge.training import (LoopHooks, NonFiniteGuard, OptimConfig, clip_and_step, lr_at, split_rows,
                               step_generator, train_loop)


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


def test_split_rows_hand_values():
    x = torch.arange(10).view(5, 2)
    y = torch.tensor([[1, 2], [-100, -100], [3, -100], [-100, -100], [4, 5]])  # 5 counted labels: rows 2, 0, 1, 0, 2
    parts = split_rows((x, y), 2, labels=y)
    assert [p[0].tolist() for p, _ in parts] == [x[:3].tolist(), x[3:].tolist()]
    assert [w for _, w in parts] == [3 / 5, 2 / 5]
    # a part without a counted label joins the one before (its own mean would be 0/0): every row runs once
    parts = split_rows((x, y), 5, labels=y)
    assert [p[1].tolist() for p, _ in parts] == [y[:2].tolist(), y[2:4].tolist(), y[4:].tolist()]
    assert [w for _, w in parts] == [0.4, 0.2, 0.4]
    z = torch.tensor([[-100], [-100], [7], [8]])  # an empty first part takes in the next
    assert [(p[1].tolist(), w) for p, w in split_rows((x[:4], z), 4, labels=z)] == [([[-100], [-100], [7]], 0.5), ([[8]], 0.5)]
    # a dict: row tensors split, the rest (a scale, a 0-d tensor) kept; a summed loss weighs 1 per part
    batch = {"input_ids": x, "labels": y, "scale": 0.25, "t": torch.tensor(3.0)}
    parts = split_rows(batch, 3)
    assert [len(p["input_ids"]) for p, _ in parts] == [2, 2, 1] and all(w == 1.0 for _, w in parts)
    assert all(p["scale"] == 0.25 and p["t"] is batch["t"] for p, _ in parts)
    assert split_rows(batch, 1) == [(batch, 1.0)] and len(split_rows((x[:1], y[:1]), 4, labels=y[:1])) == 1


def test_run_lanes_runs_the_parts_side_by_side_on_one_thread_each():
    start = torch.get_num_threads()
    meet = threading.Barrier(2, timeout=10)  # both parts must be running at once to pass it
    seen = []

    def part(i):
        meet.wait()
        seen.append((threading.get_ident(), torch.get_num_threads()))
        return i * 10

    assert cpu_threads.run_lanes(part, [1, 2]) == [10, 20]
    assert len({ident for ident, _ in seen}) == 2 and {n for _, n in seen} == {1}
    assert torch.get_num_threads() == start  # the caller's count is back

    finished = []

    def failing(i):
        if i == 0:
            raise ValueError("part 0")
        time.sleep(0.2)
        finished.append(i)

    with pytest.raises(ValueError, match="part 0"):
        cpu_threads.run_lanes(failing, [0, 1])
    assert finished == [1]  # the error surfaces only after every lane is done (no backward left running)


def _lm_run(tmp_path, monkeypatch, accum: int, checkpointing: bool = False):
    """A tiny causal LM trained 4 steps with the pretraining loss (mean over counted labels, some rows masked out).
    Returns the history and each step's gradients (as clipping sees them)."""
    from lmforge.model import ModelConfig, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    num_key_value_heads=2, intermediate_size=64, max_position_embeddings=16))
    model.gradient_checkpointing = checkpointing

    def micro_batch(step, micro, dist):
        g = step_generator(0, step, micro)
        x = torch.randint(0, 64, (5, 16), generator=g)
        y = torch.where(torch.rand(5, 16, generator=g) < 0.4, torch.randint(0, 64, (5, 16), generator=g), -100)
        return x, y

    def loss(m, b):  # a metric that combines as the loss does: a mean over the counted labels
        return m(b[0], labels=b[1]), {"label_mean": b[1][b[1] != -100].double().mean()}, b[0].numel()

    grads, clip = [], torch.nn.utils.clip_grad_norm_

    def clip_and_record(params, *args, **kwargs):
        params = list(params)
        grads.append([p.grad.clone() for p in params])
        return clip(params, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_and_record)
    cfg = OptimConfig(lr=0.01, warmup_steps=1, max_steps=4, grad_accum=accum)
    hooks = LoopHooks(micro_batch, loss, lambda m, state, final: None, split=lambda b, n: split_rows(b, n, labels=b[1]))
    hist = train_loop(model, cfg, hooks, tmp_path, torch.device("cpu"), log_every=1, progress=False)
    return hist, grads


@pytest.mark.parametrize("accum", [1, 2])
def test_lanes_train_as_the_whole_batch_does(tmp_path, monkeypatch, accum, request):
    whole, grads_w = _lm_run(tmp_path / "w", monkeypatch, accum)
    request.getfixturevalue("busy_cpu")  # from here on: 2 CPUs, one busy
    split, grads_s = _lm_run(tmp_path / "s", monkeypatch, accum)
    assert torch.get_num_threads() == 2  # the loop ran 1 thread per lane and put back the count it found
    assert all(h["cpu_lanes"] == 2 and h["cpu_threads"] == 1 for h in split) and not any("cpu_lanes" in h for h in whole)
    for a, b in zip(whole, split):  # the same steps (AdamW makes later steps differ by rounding only)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6) and b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
        assert b["label_mean"] == pytest.approx(a["label_mean"], rel=1e-12) and b["tokens_per_s"] > 0
    for gw, gs in zip(grads_w[0], grads_s[0]):  # the first step's gradients: the parts' sum is the whole's
        torch.testing.assert_close(gs, gw, atol=1e-7, rtol=1e-5)


def test_no_lanes_with_gradient_checkpointing(tmp_path, monkeypatch, busy_cpu):
    """Its recompute saves and restores the global RNG state, which two lanes would overwrite (dropout masks)."""
    hist, _ = _lm_run(tmp_path, monkeypatch, 1, checkpointing=True)
    assert not any("cpu_lanes" in h for h in hist) and all(h["cpu_threads"] == 1 for h in hist)
