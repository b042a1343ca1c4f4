"""Continuous batching engine: batched results equal each request alone, scheduling, limits, threads."""

import random
import threading

import pytest
import torch

from lmforge import chat
from lmforge.engine import Engine, QueueFull, sample
from lmforge.generation import SamplingParams, generate
from lmforge.model import Transformer
from tests.conftest import tiny_config

GREEDY = SamplingParams(max_new_tokens=8, temperature=0.0)


def _model(**kw):
    torch.manual_seed(0)
    return Transformer(tiny_config(**kw)).eval()


def _alone(model, prompt, params, stops=()):
    out = generate(model, [prompt], params, list(stops), pad_id=0)
    return out.tokens[0], out.logprobs[0]


def _prompts(n, lo, hi, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(3, 400) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def test_staggered_greedy_requests_equal_each_decoded_alone():
    model = _model()  # context 64: rows come and go, the cache moves both ways and fills up
    rng = random.Random(1)
    arrivals = [(0, [7, 8, 9], 50), (0, _prompts(1, 10, 10)[0], 20), (5, [5] * 30, 30)]  # (step, prompt, max new)
    arrivals += sorted((rng.randint(1, 60), p, rng.randint(1, 30)) for p in _prompts(12, 1, 24))
    eng = Engine(model, max_batch=4, max_queue=len(arrivals))
    shifts = []
    shift_rows = eng._shift_rows
    eng._shift_rows = lambda d: (shifts.append((d, eng.num_running)), shift_rows(d))

    reqs, step = [], 0
    while step <= 60 or eng.num_waiting or eng.num_running:
        for at, prompt, n in arrivals:
            if at == step:  # joins while others are mid-decode
                reqs.append(eng.submit(prompt, SamplingParams(n, 0.0), stop_ids=[]))
        assert eng.num_running <= 4
        eng.step()
        step += 1
    assert any(d > 0 for d, _ in shifts) and any(d < 0 and n > 1 for d, n in shifts)
    assert step < sum(n for _, _, n in arrivals) / 2  # requests really overlapped
    for req in reqs:
        tokens, logprobs = _alone(model, req.prompt, req.params)
        assert req.tokens == tokens
        assert req.logprobs == pytest.approx(logprobs, abs=1e-4)
        assert req.finish_reason == "length"


def test_seeded_sampled_request_is_the_same_alone_and_in_a_busy_batch():
    model = _model()
    prompt = [1, 17, 42, 99, 5]
    params = SamplingParams(max_new_tokens=20, temperature=0.9, top_k=50, top_p=0.95)
    eng = Engine(model, max_batch=6, seed=0)
    alone = eng.submit(prompt, params, stop_ids=[], seed=1234)
    eng.run_until_idle()

    others = _prompts(8, 2, 20, seed=3)
    for p in others[:3]:  # already decoding when the seeded request arrives
        eng.submit(p, SamplingParams(25, 1.0), stop_ids=[])
    eng.step()
    eng.step()
    busy = eng.submit(prompt, params, stop_ids=[], seed=1234)
    for p in others[3:]:
        eng.step()
        eng.submit(p, SamplingParams(10, 0.7, top_p=0.8), stop_ids=[])
    eng.run_until_idle()
    assert busy.tokens == alone.tokens and len(busy.tokens) == 20
    assert busy.logprobs == pytest.approx(alone.logprobs, abs=1e-4)
    other = eng.submit(prompt, params, stop_ids=[], seed=4321)
    eng.run_until_idle()
    assert other.tokens != alone.tokens


def test_sample_follows_the_filtered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0]])
    gen = torch.Generator().manual_seed(0)
    draws = {}
    for params in (SamplingParams(temperature=1.0), SamplingParams(temperature=0.5, top_k=2),
                   SamplingParams(temperature=1.0, top_p=0.7)):
        tokens, logps = sample(logits.expand(3000, 5), [params] * 3000, torch.rand(3000, generator=gen).tolist())
        expect = torch.log_softmax(logits[0] / params.temperature, -1)[tokens]
        assert torch.allclose(torch.tensor(logps), expect, atol=1e-5)
        draws[(params.top_k, params.top_p)] = torch.bincount(torch.tensor(tokens), minlength=5) / 3000
    assert torch.allclose(draws[(0, 1.0)], torch.softmax(logits[0], -1), atol=0.03)
    top2 = torch.softmax(logits[0, :2] / 0.5, -1)
    assert torch.allclose(draws[(2, 1.0)], torch.cat([top2, torch.zeros(3)]), atol=0.03)
    assert draws[(0, 0.7)][2:].sum() == 0 and draws[(0, 0.7)][1] > 0.2  # nucleus {0, 1}: p0 = 0.67 < 0.7
    greedy, _ = sample(logits.repeat(2, 1), [SamplingParams(temperature=0.0), SamplingParams(top_k=1)], [0.5, 0.9])
    assert greedy == [0, 0]
    # One batch of greedy, plain and filtered rows: each row's token and log-prob as if it were alone.
    mixed = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0), SamplingParams(temperature=0.5, top_p=0.7)]
    u = [0.3, 0.95, 0.9]
    tokens, logps = sample(logits.repeat(3, 1), mixed, u)
    for i, params in enumerate(mixed):
        alone_tok, alone_lp = sample(logits, [params], [u[i]])
        assert tokens[i] == alone_tok[0] and logps[i] == pytest.approx(alone_lp[0], abs=1e-6)
        assert logps[i] == pytest.approx(float(torch.log_softmax(logits[0] / (params.temperature or 1.0), -1)[tokens[i]]),
                                         abs=1e-5)


def test_cancel_frees_the_slot_and_others_finish():
    model = _model()
    eng = Engine(model, max_batch=2)
    a, b, c, d = (eng.submit(p, SamplingParams(30, 0.0), stop_ids=[]) for p in _prompts(4, 3, 10))
    for _ in range(3):
        eng.step()
    assert eng.num_running == 2 and eng.num_waiting == 2
    assert eng.cancel(a.id) and eng.cancel(d.id)
    assert not eng.cancel("no-such-request")
    eng.step()
    assert a.done and a.finish_reason == "cancelled" and len(a.tokens) == 3
    assert d.done and d.finish_reason == "cancelled" and d.tokens == []
    assert eng.num_running == 2 and eng.num_waiting == 0  # c took a's slot
    eng.run_until_idle()
    assert not eng.cancel(b.id)  # already finished
    for r in (b, c):
        assert r.finish_reason == "length" and r.tokens == _alone(model, r.prompt, r.params)[0]
    events = list(a)
    assert events[-1].finished and events[-1].token is None and len(events) == 4


def test_waiting_requests_join_together_per_the_waiting_served_ratio():
    model = _model()
    eng = Engine(model, max_batch=8, waiting_served_ratio=0.5, max_waiting_steps=3)
    long = [eng.submit(p, SamplingParams(40, 0.0), stop_ids=[]) for p in _prompts(4, 3, 6)]
    eng.step()
    assert eng.num_running == 4  # nothing ran: admitted at once
    late = eng.submit([5, 6, 7], SamplingParams(5, 0.0), stop_ids=[])
    for _ in range(3):  # 1 waiting < 0.5 x 4 running: held back for max_waiting_steps decode steps
        eng.step()
        assert eng.num_running == 4 and eng.num_waiting == 1
    eng.step()
    assert eng.num_running == 5 and eng.num_waiting == 0 and len(late.tokens) == 1
    pair = [eng.submit(p, SamplingParams(5, 0.0), stop_ids=[]) for p in _prompts(2, 2, 4, seed=3)]
    eng.step()  # 2 waiting >= 0.5 x 5 running is false, 2 < 3 free slots: wait
    assert eng.num_waiting == 2
    trio = eng.submit([9, 9], SamplingParams(5, 0.0), stop_ids=[])
    eng.step()  # 3 waiting fill the 3 free slots: no reason to wait
    assert eng.num_waiting == 0 and eng.num_running == 8
    eng.run_until_idle()
    for req in long + [late, trio] + pair:  # holding requests back changes when they run, not what they say
        assert req.tokens == _alone(model, req.prompt, req.params)[0]


def test_queue_bound_raises_queue_full():
    eng = Engine(_model(), max_batch=1, max_queue=2)
    eng.submit([1, 2, 3], GREEDY)
    eng.submit([1, 2, 3], GREEDY)
    with pytest.raises(QueueFull):
        eng.submit([1, 2, 3], GREEDY)
    eng.step()  # one request moves from the queue into the batch
    eng.submit([1, 2, 3], GREEDY)
    with pytest.raises(QueueFull):
        eng.submit([1, 2, 3], GREEDY)
    eng.run_until_idle()
    with pytest.raises(ValueError, match="already in use"):
        eng.submit([1], GREEDY, request_id="x"), eng.submit([1], GREEDY, request_id="x")


def test_too_long_or_malformed_requests_are_rejected():
    eng = Engine(_model(), max_batch=2)  # context 64
    with pytest.raises(ValueError, match="exceeds the model's context of 64"):
        eng.submit(list(range(1, 41)), SamplingParams(max_new_tokens=25))
    eng.submit(list(range(1, 41)), SamplingParams(max_new_tokens=24, temperature=0.0))  # exactly fits
    for prompt, params in [([], GREEDY), ([1, 400], GREEDY), ([1], SamplingParams(max_new_tokens=0)),
                           ([1], SamplingParams(temperature=-1.0)), ([1], SamplingParams(top_p=0.0))]:
        with pytest.raises(ValueError):
            eng.submit(prompt, params)
    assert eng.num_waiting == 1
    assert eng.run_until_idle() == 24


def test_stop_token_ends_with_stop_and_max_tokens_with_length(tok):
    model = _model()
    prompt = chat.render_prompt(tok, [{"role": "user", "content": "The apple is"}])
    free, _ = _alone(model, prompt, SamplingParams(12, 0.0))
    stop = free[4]
    expect = free[:free.index(stop) + 1]
    eng = Engine(model, tok, max_batch=4)
    assert eng.default_stop_ids == chat.stop_ids(tok)
    seen = []
    r_stop = eng.submit(prompt, SamplingParams(12, 0.0), stop_ids=[stop], on_token=seen.append)
    r_len = eng.submit(prompt, SamplingParams(6, 0.0), stop_ids=[])
    r_default = eng.submit(prompt, SamplingParams(12, 0.0))  # the tokenizer's end-of-turn and EOS
    eng.run_until_idle()
    assert r_stop.tokens == expect and r_stop.finish_reason == "stop"
    assert [e.token for e in seen] == expect and [e.finished for e in seen] == [False] * (len(expect) - 1) + [True]
    assert list(r_stop) == seen  # the queue holds the same events as the callback saw
    assert r_len.tokens == free[:6] and r_len.finish_reason == "length"
    ended = [i for i, t in enumerate(free) if t in chat.stop_ids(tok)]
    assert r_default.tokens == (free[:ended[0] + 1] if ended else free)
    assert r_default.finish_reason == ("stop" if ended else "length")


def test_background_thread_serves_32_concurrent_submitters():
    model = _model()
    prompts = _prompts(32, 1, 20, seed=7)
    results: dict[int, list[int]] = {}
    errors = []

    def client(i):
        try:
            req = eng.submit(prompts[i], SamplingParams(4 + i % 5, 0.0), stop_ids=[])
            results[i] = [ev.token for ev in req]  # streams until the finishing event
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    with Engine(model, max_batch=8, max_queue=32) as eng:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
    assert not errors and len(results) == 32
    for i, tokens in results.items():
        assert tokens == _alone(model, prompts[i], SamplingParams(4 + i % 5, 0.0))[0]


def test_stop_cancels_unfinished_requests():
    eng = Engine(_model(), max_batch=1)
    eng.start()
    reqs = [eng.submit([1, 2, 3], SamplingParams(60, 0.0), stop_ids=[]) for _ in range(3)]
    eng.stop()
    assert all(r.wait(1) for r in reqs)
    assert reqs[-1].finish_reason == "cancelled"


def test_batching_is_real_few_forward_calls():
    model = _model()
    calls = []
    forward = model.hidden_states

    def counting_forward(*args, **kw):
        calls.append(args[0].shape)
        return forward(*args, **kw)

    model.hidden_states = counting_forward
    eng = Engine(model, max_batch=8)
    reqs = [eng.submit(p, SamplingParams(16, 0.0), stop_ids=[]) for p in _prompts(8, 4, 12, seed=5)]
    eng.run_until_idle()
    assert all(len(r.tokens) == 16 for r in reqs)
    assert len(calls) <= 16 < 8 * 16 // 4  # one prefill, then one decode step for all 8 rows
    assert calls[1] == (8, 1)


def test_joining_requests_share_the_running_rows_forward():
    model = _model()  # 4 query heads over 2 key/value heads: grouped-query attention in the mixed step too
    eng = Engine(model, max_batch=8, waiting_served_ratio=0.0)
    running = [eng.submit(p, SamplingParams(12, 0.0), stop_ids=[]) for p in _prompts(3, 2, 5, seed=7)]
    eng.step()  # prefill alone
    shapes = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    joiners = [eng.submit(p, SamplingParams(12, 0.0), stop_ids=[]) for p in ([4, 5, 6, 7, 8, 9, 10, 11], [12, 13])]
    eng.step()  # 3 next tokens + the 2 prompts unpadded, one flattened sequence: one forward
    hook.remove()
    assert shapes == [(1, 3 + 8 + 2)]
    assert [len(r.tokens) for r in running + joiners] == [2, 2, 2, 1, 1]
    eng.run_until_idle()
    for req in running + joiners:
        tokens, logprobs = _alone(model, req.prompt, req.params)
        assert req.tokens == tokens
        assert req.logprobs == pytest.approx(logprobs, abs=1e-4)


def test_a_failing_step_ends_the_requests_it_was_admitting():
    eng = Engine(_model(), max_batch=4, waiting_served_ratio=0.0)
    running = eng.submit([1, 2, 3], SamplingParams(8, 0.0), stop_ids=[])
    eng.step()
    joiner = eng.submit([4, 5], SamplingParams(8, 0.0), stop_ids=[])

    def out_of_memory(*args):
        raise RuntimeError("out of memory")

    eng._decode_window = out_of_memory  # fails after the joiner left the queue, before it runs
    with pytest.raises(RuntimeError):
        eng.step()
    assert running.finish_reason == joiner.finish_reason == "error" and joiner.wait(0)
    assert eng.num_running == eng.num_waiting == 0


def test_failing_callback_cancels_only_its_request():
    eng = Engine(_model(), max_batch=4)

    def gone(ev):
        raise RuntimeError("client disconnected")

    bad = eng.submit([1, 2, 3], SamplingParams(20, 0.0), stop_ids=[], on_token=gone)
    good = eng.submit([4, 5, 6], SamplingParams(20, 0.0), stop_ids=[])
    eng.run_until_idle()
    assert bad.finish_reason == "cancelled" and len(bad.tokens) == 1
    assert good.finish_reason == "length" and len(good.tokens) == 20
