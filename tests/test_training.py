"""The shared training loop: schedule values, early stop with a checkpoint, exact continuation."""

import math

import pytest
import torch

from lmforge.training import LoopHooks, OptimConfig, lr_at, step_generator, train_loop


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
