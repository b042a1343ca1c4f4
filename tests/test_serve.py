"""`lmforge serve` end to end: a real uvicorn server on tiny checkpoints, driven by the official openai client
(and raw HTTP where the client would hide the status): chat, streaming, completions, several models, n, stop
strings, seeds, logprobs, 32 parallel streams, client disconnects, and every error answered in OpenAI's shape."""

import os
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
try:
    import httpx
except ImportError:  # some openai builds ship the same client as httpx2
    httpx = pytest.importorskip("httpx2")

from lmforge import chat  # noqa: E402
from lmforge.checkpoint import load_model  # noqa: E402
from lmforge.generation import SamplingParams, generate  # noqa: E402
from lmforge.serve import ServeConfig, create_app, engine_threads, load_models, parse_model_spec  # noqa: E402
from tests import http_server  # noqa: E402

KEY = "sk-test-key"
HI = [{"role": "user", "content": "What is 2 + 3?"}]


class Server(http_server.Server):
    """The test server, with helpers to talk to it."""

    def client(self, api_key="none") -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.base + "/v1", api_key=api_key, max_retries=0, timeout=60)


def _error(resp) -> dict:
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    return body["error"]


@pytest.fixture(scope="module")
def checkpoints(tok, tmp_path_factory):
    return http_server.tiny_checkpoints(tok, tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(checkpoints):
    cfg = ServeConfig(model=[f"tiny={checkpoints / 'tiny'}", str(checkpoints / "long")], device="cpu",
                      max_batch=8, max_queue=64)
    with Server(create_app(load_models(cfg))) as srv:
        yield srv


@pytest.fixture(scope="module")
def busy_server(checkpoints):
    """One slot and a queue of one, behind an API key."""
    cfg = ServeConfig(model=[str(checkpoints / "long")], device="cpu", max_batch=1, max_queue=1, api_key=KEY)
    with Server(create_app(load_models(cfg), cfg.api_key)) as srv:
        yield srv


def _greedy(checkpoint, prompt_ids, max_new):
    """What `generate` says, decoded as the server decodes (no special tokens)."""
    model, tok, _ = load_model(checkpoint)
    out = generate(model, [prompt_ids], SamplingParams(max_new, 0.0), chat.stop_ids(tok), tok.special.pad)
    tokens = out.tokens[0]
    return tok.decode(tokens), tokens


def test_model_specs_and_listing(server):
    assert parse_model_spec("ppo=runs/x/sft") == ("ppo", "runs/x/sft")
    assert parse_model_spec("runs/x/sft/") == ("sft", "runs/x/sft/")
    assert parse_model_spec("gguf:/m/SmolLM2.gguf") == ("SmolLM2", "gguf:/m/SmolLM2.gguf")
    client = server.client()
    assert sorted(m.id for m in client.models.list()) == ["long", "tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    assert httpx.get(server.base + "/health").json()["status"] == "ok"


def test_chat_streamed_equals_non_streamed_greedy_and_generate(server, checkpoints, tok):
    client = server.client()
    full = client.chat.completions.create(model="long", messages=HI, temperature=0, max_tokens=24)
    text = full.choices[0].message.content
    ids = chat.render_prompt(tok, HI)
    expected, tokens = _greedy(checkpoints / "long", ids, 24)
    assert text == expected and full.choices[0].finish_reason in ("stop", "length")
    assert (full.usage.prompt_tokens, full.usage.completion_tokens) == (len(ids), len(tokens))
    assert full.usage.total_tokens == len(ids) + len(tokens)

    chunks = list(client.chat.completions.create(model="long", messages=HI, temperature=0, max_tokens=24,
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == len(tokens)  # usage in every response, streams too
    last = list(client.chat.completions.create(model="long", messages=HI, temperature=0, max_tokens=24, stream=True,
                                               stream_options={"include_usage": True}))[-1]
    assert last.choices == [] and last.usage.total_tokens == len(ids) + len(tokens)


def test_completions_continue_raw_text(server, checkpoints, tok):
    client = server.client()
    out = client.completions.create(model="tiny", prompt="The apple is", max_tokens=12, temperature=0, logprobs=1)
    ids = tok.document_ids("The apple is")[:-1]
    expected, tokens = _greedy(checkpoints / "tiny", ids, 12)
    assert out.choices[0].text == expected and out.object == "text_completion"
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == len(tokens)
    lp = out.choices[0].logprobs
    assert len(lp.token_logprobs) == len(tokens) - (out.choices[0].finish_reason == "stop")
    assert all(x <= 0 for x in lp.token_logprobs) and len(lp.tokens) == len(lp.text_offset)
    streamed = client.completions.create(model="tiny", prompt="The apple is", max_tokens=12, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == expected


def test_n_seed_and_logprobs(server):
    client = server.client()
    kw = dict(model="long", messages=HI, temperature=1.0, max_tokens=16, n=2, seed=1234, logprobs=True)
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.choices[0].message.content != a.choices[1].message.content  # choice i samples with seed + i
    assert a.usage.completion_tokens == sum(len(c.logprobs.content) + (c.finish_reason == "stop") for c in a.choices)
    for c in a.choices:
        assert c.logprobs.content and all(t.logprob <= 0 for t in c.logprobs.content)
        raw = bytes(b for t in c.logprobs.content for b in t.bytes)  # a token may hold part of a character
        assert raw.decode("utf-8", errors="replace") == c.message.content
    other = client.chat.completions.create(**{**kw, "seed": 99, "n": 1})
    assert other.choices[0].message.content != a.choices[0].message.content


def test_stop_string_cuts_the_text(server):
    client = server.client()
    full = client.completions.create(model="long", prompt="The apple is", max_tokens=40, temperature=0)
    text, stop = full.choices[0].text, "lazy"
    assert stop in text and full.choices[0].finish_reason == "length", text
    cut = text[:text.find(stop)]
    out = client.completions.create(model="long", prompt="The apple is", max_tokens=40, temperature=0,
                                    stop=[stop, "\x00never"])
    assert out.choices[0].text == cut and out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens < full.usage.completion_tokens
    streamed = list(client.completions.create(model="long", prompt="The apple is", max_tokens=40,
                                              temperature=0, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == cut
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_32_parallel_streams_all_complete(server, tok):
    client = server.client()
    reference = client.chat.completions.create(model="tiny", messages=HI, temperature=0, max_tokens=16)
    expected = reference.choices[0].message.content

    def one(i):
        chunks = list(client.chat.completions.create(model="tiny", messages=HI, max_tokens=16, stream=True,
                                                     temperature=0 if i % 2 == 0 else 1.0, seed=i))
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks[-1]

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(32)))
    assert all(last.choices[0].finish_reason in ("stop", "length") for _, last in results)
    assert all(text == expected for i, (text, _) in enumerate(results) if i % 2 == 0)  # batching changes nothing


def test_a_client_that_disconnects_cancels_its_request(server):
    engine = server.app.state.models["long"].engine
    submitted, submit = [], engine.submit
    engine.submit = lambda *a, **kw: submitted.append(submit(*a, **kw)) or submitted[-1]
    try:
        body = {"model": "long", "prompt": "The apple is", "max_tokens": 2000, "temperature": 0, "stream": True}
        with httpx.stream("POST", server.base + "/v1/completions", json=body, timeout=30) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            assert next(lines).startswith("data: ")
    finally:
        del engine.submit
    (req,) = submitted
    assert req.wait(20)
    assert req.finish_reason == "cancelled" and len(req.tokens) < 2000
    assert httpx.get(server.base + "/health").json()["models"]["long"]["running"] == 0


def test_bad_requests_get_openai_errors_and_the_server_stays_up(server):
    url = server.base + "/v1/chat/completions"
    resp = httpx.post(url, content=b'{"model": "tiny", "messages": [', headers={"Content-Type": "application/json"})
    assert resp.status_code == 400 and _error(resp)["type"] == "invalid_request_error"
    resp = httpx.post(url, json={"model": "tiny"})  # no messages
    assert resp.status_code == 400 and _error(resp)["param"] == "messages"

    client = server.client()
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-17", messages=HI)
    assert e.value.status_code == 404 and _error(e.value.response)["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=HI, max_tokens=1000)  # context is 64
    err = _error(e.value.response)
    assert err["code"] == "context_length_exceeded" and err["param"] == "max_tokens" and "64" in err["message"]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="word " * 100)  # the prompt alone overflows
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=HI, temperature=-1)
    resp = httpx.get(server.base + "/v1/nothing-here")
    assert resp.status_code == 404 and _error(resp)
    assert httpx.get(server.base + "/health").status_code == 200
    assert client.chat.completions.create(model="tiny", messages=HI, max_tokens=4).choices[0].message is not None


def test_api_key_is_required(busy_server):
    resp = httpx.post(busy_server.base + "/v1/completions", json={"model": "long", "prompt": "a"})
    assert resp.status_code == 401 and _error(resp)["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError) as e:
        busy_server.client("sk-wrong").models.list()
    assert e.value.status_code == 401 and _error(e.value.response)
    assert [m.id for m in busy_server.client(KEY).models.list()] == ["long"]
    assert httpx.get(busy_server.base + "/health").status_code == 200  # health needs no key


def test_an_overfull_queue_answers_429_with_retry_after(busy_server):
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "long", "prompt": "The apple is", "max_tokens": 300, "temperature": 0}

    def one(_):
        resp = httpx.post(busy_server.base + "/v1/completions", json=body, headers=headers, timeout=60)
        return resp.status_code, resp.headers.get("retry-after"), resp

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one, range(12)))
    statuses = [s for s, _, _ in results]
    assert statuses.count(200) >= 2 and statuses.count(429) >= 1 and set(statuses) <= {200, 429}, statuses
    for status, retry_after, resp in results:
        if status == 429:
            assert retry_after is not None and int(retry_after) >= 1
            assert _error(resp)["type"] == "rate_limit_exceeded"
        else:
            assert resp.json()["usage"]["completion_tokens"] >= 1
    with pytest.raises(openai.RateLimitError):  # the official client sees it too (no retries here)
        with ThreadPoolExecutor(6) as pool:
            client = busy_server.client(KEY)
            list(pool.map(lambda _: client.completions.create(**body), range(6)))
    assert httpx.get(busy_server.base + "/health").json()["status"] == "ok"


def test_a_non_streaming_client_that_gives_up_cancels_its_request(server):
    engine = server.app.state.models["long"].engine
    submitted, submit = [], engine.submit
    engine.submit = lambda *a, **kw: submitted.append(submit(*a, **kw)) or submitted[-1]
    try:
        body = {"model": "long", "prompt": "The apple is", "max_tokens": 2000, "temperature": 0}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.base + "/v1/completions", json=body, timeout=httpx.Timeout(5, read=0.3))
    finally:
        del engine.submit
    (req,) = submitted
    assert req.wait(20)
    assert req.finish_reason == "cancelled" and len(req.tokens) < 2000


def test_a_crashed_engine_answers_503_and_the_server_stays_up(checkpoints):
    import os
    import signal

    cfg = ServeConfig(model=[f"tiny={checkpoints / 'tiny'}", f"long={checkpoints / 'long'}"], device="cpu")
    with Server(create_app(load_models(cfg))) as srv:
        os.kill(srv.app.state.models["tiny"].engine._proc.pid, signal.SIGKILL)
        srv.app.state.models["tiny"].engine._reader.join(10)  # the reader sees the pipe close
        resp = httpx.post(srv.base + "/v1/chat/completions", json={"model": "tiny", "messages": HI})
        assert resp.status_code == 503 and _error(resp)["code"] == "engine_stopped"
        reply = srv.client().chat.completions.create(model="long", messages=HI, max_tokens=4)
        assert reply.usage.completion_tokens >= 1  # the other model still answers
        assert httpx.get(srv.base + "/health").status_code == 200


def test_engine_threads_spare_a_core_for_the_http_server(checkpoints):
    assert [engine_threads(0, 1, c) for c in (1, 2, 4, 8)] == [1, 1, 3, 7]
    assert engine_threads(0, 3, 8) == 2 and engine_threads(0, 5, 2) == 1 and engine_threads(4, 5, 2) == 4
    served = load_models(ServeConfig(model=[str(checkpoints / "long")], device="cpu"))  # threads=0: auto
    try:  # what the engine process itself reports
        assert served["long"].engine.threads == engine_threads(0, 1, len(os.sched_getaffinity(0)))
    finally:
        served["long"].engine.stop()
