"""The engine in its own process: same tokens as in-process, cancellation, limits, and a child that dies."""

import os
import signal

import pytest

from lmforge.checkpoint import load_model
from lmforge.engine import Engine, QueueFull
from lmforge.engine_process import EngineProcess, EngineStopped
from lmforge.errors import LmforgeError
from lmforge.generation import SamplingParams
from tests import http_server


@pytest.fixture(scope="module")
def checkpoint(tok, tmp_path_factory):
    return http_server.tiny_checkpoints(tok, tmp_path_factory.mktemp("engine-process")) / "long"


@pytest.fixture(scope="module")
def engine(checkpoint):
    eng = EngineProcess(str(checkpoint), max_batch=4, max_queue=2)
    eng.start()
    yield eng
    eng.stop()


def test_tokens_equal_the_in_process_engine(engine, checkpoint):
    model, tok, _ = load_model(checkpoint)
    local = Engine(model, tok, max_batch=4)
    assert engine.tok.fingerprint() == tok.fingerprint() and engine.context == 2048
    prompts = [[5, 6, 7], [9] * 12, [30, 31]]
    jobs = [(p, SamplingParams(12, t), seed) for p in prompts for t, seed in ((0.0, None), (1.0, 7))]
    remote = [engine.submit(p, params, seed=seed) for p, params, seed in jobs[:4]]  # 4 run, 2 may wait
    remote += [engine.submit(p, params, seed=seed) for p, params, seed in jobs[4:]]
    mine = [local.submit(p, params, seed=seed) for p, params, seed in jobs]
    local.run_until_idle()
    for r, m in zip(remote, mine):
        assert r.wait(30)
        assert r.tokens == m.tokens and r.finish_reason == m.finish_reason
        assert r.logprobs == pytest.approx(m.logprobs, abs=1e-5)


def test_limits_and_cancel(engine):
    with pytest.raises(ValueError, match="context"):
        engine.submit([1] * 10, SamplingParams(2040, 0.0))
    with pytest.raises(ValueError, match="prompt token ids"):
        engine.submit([10**6], SamplingParams(4, 0.0))
    events = []
    reqs = [engine.submit([5, 6], SamplingParams(1500, 0.0), stop_ids=[], on_token=events.append) for _ in range(6)]
    with pytest.raises(QueueFull):  # 4 running + 2 waiting
        engine.submit([5, 6], SamplingParams(4, 0.0))
    for r in reqs:
        assert engine.cancel(r.id)
    for r in reqs:
        assert r.wait(30) and r.finish_reason == "cancelled" and len(r.tokens) < 1500
    assert sum(ev.finished for ev in events) == 6
    assert engine.submit([5], SamplingParams(3, 0.0)).wait(30)  # the slots are free again


def test_a_dead_engine_process_fails_its_requests_and_refuses_new_ones(checkpoint):
    eng = EngineProcess(str(checkpoint), max_batch=2)
    eng.start()
    try:
        req = eng.submit([5, 6], SamplingParams(2000, 0.0), stop_ids=[])
        while not req.tokens:
            req.wait(0.01)
        os.kill(eng._proc.pid, signal.SIGKILL)
        assert req.wait(30) and req.finish_reason == "error"
        with pytest.raises(EngineStopped):
            eng.submit([5], SamplingParams(2, 0.0))
    finally:
        eng.stop()


def test_a_checkpoint_that_does_not_load_is_one_error(tmp_path):
    with pytest.raises(LmforgeError, match="nowhere"):
        EngineProcess(str(tmp_path / "nowhere"))


def test_threads_sets_the_engine_process_torch_threads_and_keeps_its_tokens(checkpoint):
    """`lmforge serve threads=1`: the child decodes on one torch thread (the default is torch's choice), and
    greedy tokens are those of the in-process engine."""
    model, tok, _ = load_model(checkpoint)
    local = Engine(model, tok, max_batch=2)
    want = local.submit([5, 6, 7], SamplingParams(10, 0.0))
    local.run_until_idle()
    eng = EngineProcess(str(checkpoint), max_batch=2, threads=1)
    try:
        eng.start()
        assert eng.threads == 1
        got = eng.submit([5, 6, 7], SamplingParams(10, 0.0))
        assert got.wait(30) and got.tokens == want.tokens
    finally:
        eng.stop()
