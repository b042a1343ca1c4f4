"""`lmforge serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the continuous-batching engine.

    lmforge serve --model runs/lmforge/ppo --model sft=runs/lmforge/sft --port 8000 --api-key sk-local

Endpoints: POST /v1/chat/completions, POST /v1/completions (both with `stream`: server-sent events), GET
/v1/models, GET /health. Any OpenAI client works against http://HOST:PORT/v1.

Design:

* One continuous-batching engine per served model, started with the app and stopped with it: by default in a
  process of its own (`lmforge.engine_process`: HTTP work and the model's Python then do not share one
  interpreter lock), with `engine_process=false` on a thread of this one. The asyncio loop never runs the
  model. A request with n=k submits k engine requests (choice i gets seed + i when a seed is given, so the
  choices differ yet reproduce), and the engine batches them with everything else in flight.
* A `Job` is one HTTP request's engine requests. Their token events reach the loop through a `LoopRelay` (one
  wake-up of the loop for all events of a decode step) onto one asyncio.Queue; a `Choice` per engine request turns tokens into text
  (UTF-8 safe) and applies the stop strings: text that could still become a stop string is held back, and on
  a match the text is cut there, the engine request cancelled and the choice ends with finish_reason "stop".
  The same events feed the streaming (SSE chunks) and the non-streaming (one JSON body) answer.
* Whatever way a Job ends (finished, error, client gone: the stream is closed, or a non-streaming request sees
  http.disconnect), its unfinished engine requests are cancelled and free their batch rows at the next step.
* Errors are OpenAI's shape (`openai_api.py` holds the wire format: errors, the API-key check, request bodies,
  log-probs, SSE), {"error": {"message", "type", "param", "code"}}: invalid JSON or fields -> 400,
  prompt + max_tokens beyond the context -> 400, unknown model -> 404 (model_not_found), bad or missing API
  key -> 401, engine queue full -> 429 with Retry-After, a crashed engine process -> 503 (engine_stopped). The
  server stays up after every one of them.
* Chat requests are rendered with the model's own chat template and stop at its end-of-turn / EOS tokens
  (`chat.stop_ids`); completions continue raw text ([BOS] text, as `lmforge generate --raw`).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, StreamingResponse
from starlette.exceptions import HTTPException

from lmforge import chat
from lmforge.cli import Command, Flag
from lmforge.engine import Engine, QueueFull, TokenEvent
from lmforge.engine_process import EngineProcess, EngineStopped, engine_threads
from lmforge.errors import ConfigError, LmforgeError
from lmforge.generation import SamplingParams, Utf8Streamer
from lmforge.openai_api import (
    APIError,
    BearerAuth,
    ChatRequest,
    CompletionRequest,
    SamplingRequest,
    chat_logprobs,
    parse_body,
    sse,
    text_logprobs,
)
from lmforge.tokenizer import Tokenizer

log = logging.getLogger(__name__)


# ---- config and models ----

@dataclass
class ServeConfig:
    """`lmforge serve` settings."""
    model: list[str] = field(default_factory=list)  # checkpoint dirs, or NAME=DIR (repeatable); a bare DIR is named after its folder
    host: str = "127.0.0.1"         # address to bind (0.0.0.0 exposes the server to the network)
    port: int = 8000
    api_key: str = ""               # if set, requests need `Authorization: Bearer KEY` ("" = no auth)
    max_batch: int = 8              # requests decoded together per model
    max_queue: int = 64             # requests waiting per model before answering 429
    waiting_served_ratio: float = 0.3  # while decoding, waiting requests join once they are this x the running ones
    max_waiting_steps: int = 20     # ... or after this many decode steps (TGI's policy: batched prefills)
    engine_process: bool = True     # decode in a process of its own (False: on a thread of the server's process)
    threads: int = 0                # torch CPU threads per engine process (0: auto, engine_process.engine_threads)
    device: str = "auto"

    def validate(self) -> None:
        if not self.model:
            raise ConfigError("model", "is required (a checkpoint directory, or NAME=DIR)")
        if self.max_batch < 1:
            raise ConfigError("max_batch", "must be >= 1")
        if self.max_queue < 0:
            raise ConfigError("max_queue", "must be >= 0")
        if self.waiting_served_ratio < 0:
            raise ConfigError("waiting_served_ratio", "must be >= 0")
        if self.max_waiting_steps < 0:
            raise ConfigError("max_waiting_steps", "must be >= 0")
        if self.threads < 0:
            raise ConfigError("threads", "must be >= 0 (0: auto, the cores but one shared by the models)")
        if not 0 <= self.port < 65536:
            raise ConfigError("port", "must be in [0, 65535]")
        names = [name for name, _ in map(parse_model_spec, self.model)]
        if len(set(names)) != len(names):
            raise ConfigError("model", f"names must be unique, got {names}")


def parse_model_spec(spec: str) -> tuple[str, str]:
    """(name, path) of `NAME=DIR` or of a bare DIR (named after its folder; hf:DIR / gguf:FILE too)."""
    name, sep, path = spec.partition("=")
    if sep and name and "/" not in name and ":" not in name:
        return name, path
    bare = spec.split(":", 1)[1] if spec.startswith(("hf:", "gguf:")) else spec
    p = Path(bare.rstrip("/"))
    return (p.stem if p.suffix == ".gguf" else p.name) or spec, spec


@dataclass
class ServedModel:
    """One model the server answers for: its name, tokenizer and engine."""
    name: str
    engine: Engine | EngineProcess
    tok: Tokenizer
    created: int = field(default_factory=lambda: int(time.time()))


def load_models(cfg: ServeConfig) -> dict[str, ServedModel]:
    """Load every checkpoint of the config and build its (not yet started) engine: in a process of its own
    (`engine_process`, the default: see lmforge.engine_process) or on a thread of this one."""
    from lmforge.checkpoint import load_causal_lm
    from lmforge.training import pick_device

    device, out = pick_device(cfg.device), {}
    settings = {"max_batch": cfg.max_batch, "max_queue": cfg.max_queue,
                "waiting_served_ratio": cfg.waiting_served_ratio, "max_waiting_steps": cfg.max_waiting_steps}
    engines: dict[str, Engine | EngineProcess] = {}
    threads = engine_threads(cfg.threads, len(cfg.model))
    if cfg.threads and not cfg.engine_process:  # the engines decode on threads of this process
        import torch

        torch.set_num_threads(cfg.threads)
    try:
        for name, path in map(parse_model_spec, cfg.model):
            if cfg.engine_process:  # the children load in parallel
                engines[name] = EngineProcess(path, str(device), **settings, wait=False, threads=threads)
            else:
                model, tok, _ = load_causal_lm(path, "lmforge serve", device=device)
                engines[name] = Engine(model, tok, **settings)
                out[name] = ServedModel(name, engines[name], tok)
        for name, engine in engines.items():
            if isinstance(engine, EngineProcess):
                engine.wait_loaded()
                out[name] = ServedModel(name, engine, engine.tok)
    except BaseException:
        for engine in engines.values():
            engine.stop()
        raise
    return out


# ---- one request's decoding ----

class Choice:
    """One sampled answer: tokens -> text with stop strings applied; `sent` counts the characters released."""

    def __init__(self, index: int, request_id: str, tok: Tokenizer, stops: list[str]):
        self.index, self.request_id, self.tok, self.stops = index, request_id, tok, stops
        self.streamer = Utf8Streamer(tok)
        self.text, self.sent, self.tokens = "", 0, 0
        self.logprobs: list[tuple[int, float]] = []  # (token, logprob) of the tokens behind the text
        self.finish_reason: str | None = None
        self.by_stop_string = False

    def feed(self, ev: TokenEvent) -> tuple[str, list[tuple[int, float]]]:
        """Take one engine event; return the text now safe to release and the (token, logprob) it brought."""
        new: list[tuple[int, float]] = []
        if ev.token is not None:
            self.tokens += 1
            if not (ev.finished and ev.finish_reason == "stop"):  # the stop token itself has no text
                self.text += self.streamer.push(ev.token)
                new.append((ev.token, ev.logprob))
        if ev.finished:
            self.text += self.streamer.flush()
            self.finish_reason = {"cancelled": "stop"}.get(ev.finish_reason, ev.finish_reason)
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0]
        if hits:
            self.text, self.finish_reason, self.by_stop_string = self.text[:min(hits)], "stop", True
        end = len(self.text) if self.finish_reason else len(self.text) - self._held_back()
        piece, self.sent = self.text[self.sent:end], max(self.sent, end)
        self.logprobs += new
        return piece, new

    def _held_back(self) -> int:
        """Length of the longest tail of the text that may still grow into a stop string."""
        return max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)


class LoopRelay:
    """Runs callbacks from the engine thread on an event loop, with one wake-up for all the events that arrived
    since the loop's last turn instead of one per token (32 running requests would otherwise cost 32 wake-ups
    of the loop, each a system call and a contended GIL hand-over, per decode step)."""

    _of_loop: ClassVar[weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopRelay]] = weakref.WeakKeyDictionary()

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.calls, self.scheduled = loop, deque(), False

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> LoopRelay:
        if loop not in cls._of_loop:
            cls._of_loop[loop] = cls(loop)
        return cls._of_loop[loop]

    def post(self, fn: Callable[[Any], None], arg: Any) -> None:
        """Call fn(arg) on the loop (any thread). Raises RuntimeError once the loop is closed."""
        self.calls.append((fn, arg))
        if not self.scheduled:  # the drain resets the flag before it empties the deque: nothing is stranded
            self.scheduled = True
            self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        self.scheduled = False
        while self.calls:
            fn, arg = self.calls.popleft()
            fn(arg)


class Job:
    """The engine requests (n per prompt) of one HTTP request, their events gathered on one asyncio queue."""

    def __init__(self, sm: ServedModel, prompts: list[list[int]], body: SamplingRequest, max_new: int):
        self.sm, self.id = sm, uuid.uuid4().hex[:24]
        self.prompt_tokens = sum(len(p) for p in prompts)
        self.queue: asyncio.Queue[tuple[int, TokenEvent]] = asyncio.Queue()
        self.choices: list[Choice] = []
        loop, stops = asyncio.get_running_loop(), body.stop_strings()
        params = SamplingParams(max_new, body.temperature, body.top_k, body.top_p)
        try:
            for ids in prompts:
                for _ in range(body.n):
                    i = len(self.choices)
                    self.choices.append(Choice(i, f"{self.id}-{i}", sm.tok, stops))
                    sm.engine.submit(ids, params, seed=None if body.seed is None else body.seed + i,
                                     request_id=f"{self.id}-{i}", on_token=self._sender(loop, i))
        except QueueFull as e:
            self.cancel()
            raise APIError(429, f"The server is busy ({e}); retry later.", type="rate_limit_exceeded",
                           code="rate_limit_exceeded", headers={"Retry-After": "1"}) from None
        except ValueError as e:
            self.cancel()
            raise APIError(400, str(e)) from None
        except EngineStopped as e:
            self.cancel()
            raise APIError(503, f"{e}; restart the server.", type="server_error", code="engine_stopped") from None

    def _sender(self, loop: asyncio.AbstractEventLoop, i: int):
        relay = LoopRelay.of(loop)
        return lambda ev: relay.post(self.queue.put_nowait, (i, ev))

    def cancel(self) -> None:
        for c in self.choices:
            self.sm.engine.cancel(c.request_id)

    def usage(self) -> dict:
        done = sum(c.tokens for c in self.choices)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": done, "total_tokens": self.prompt_tokens + done}

    async def events(self) -> AsyncIterator[tuple[Choice, str, list[tuple[int, float]]]]:
        """(choice, released text, new logprobs) until every choice has finished; cancels what is left on exit
        (a client that went away closes this generator)."""
        try:
            left = len(self.choices)
            while left:
                i, ev = await self.queue.get()
                c = self.choices[i]
                if c.finish_reason is not None:  # events after a stop string ended it
                    continue
                piece, new = c.feed(ev)
                if c.finish_reason == "error":
                    raise APIError(500, "the engine failed while decoding this request", type="server_error")
                if c.finish_reason is not None:
                    left -= 1
                    if c.by_stop_string:
                        self.sm.engine.cancel(c.request_id)
                yield c, piece, new
        finally:
            self.cancel()


# ---- responses ----

async def _stream(job: Job, chunk, first: list[dict], include_usage: bool) -> AsyncIterator[str]:
    """SSE: `first` chunks, one chunk per event, then usage (on the last chunk, or its own chunk when the
    client asked with stream_options.include_usage), then [DONE]."""
    for c in first:
        yield sse(c)
    held = None  # the usage goes on the last chunk, so each chunk is sent once the next one exists
    try:
        async for choice, piece, new in job.events():
            if piece or new or choice.finish_reason:
                if held is not None:
                    yield sse(held)
                held = chunk(choice, piece, new)
    except APIError as e:
        yield sse(e.body())
        return
    if held is not None:
        if not include_usage:
            held["usage"] = job.usage()
        yield sse(held)
    if include_usage:
        yield sse({**chunk(None, "", []), "choices": [], "usage": job.usage()})
    yield sse("[DONE]")


async def _collect(job: Job, request: Request) -> None:
    """Run a job to its end for a non-streaming answer; a client that disconnects first cancels it."""
    async def drain():
        async for _ in job.events():
            pass

    async def gone():  # the body has been read: the next message is the client going away
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work, watch = asyncio.ensure_future(drain()), asyncio.ensure_future(gone())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
            job.cancel()
    if work.done() and not work.cancelled():
        work.result()  # re-raise an engine error
    else:
        raise APIError(499, "the client closed the connection")


# ---- the app ----

def create_app(models: dict[str, ServedModel], api_key: str = "") -> FastAPI:
    """The FastAPI app serving `models`; their engines start and stop with it (lifespan)."""

    @asynccontextmanager
    async def lifespan(app):
        for m in models.values():
            m.engine.start()
        try:
            yield
        finally:
            for m in models.values():
                m.engine.stop()

    app = FastAPI(title="lmforge", lifespan=lifespan)
    app.state.models = models
    if api_key:
        app.add_middleware(BearerAuth, api_key=api_key)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(HTTPException)
    async def _http_error(request, exc: HTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, str(exc.detail), type=kind).response()

    @app.exception_handler(Exception)
    async def _crash(request, exc: Exception):
        log.exception("unhandled error")
        return APIError(500, f"internal error: {type(exc).__name__}", type="server_error").response()

    def served(name: str) -> ServedModel:
        if name not in models:
            raise APIError(404, f"The model `{name}` does not exist (served: {', '.join(models)}).",
                           param="model", code="model_not_found")
        return models[name]

    def max_new(sm: ServedModel, prompts: list[list[int]], requested: int | None, param: str,
                default: int | None = None) -> int:
        """max_tokens checked against the context (unset: `default` or all the room left, within the room)."""
        n = max(len(p) for p in prompts)
        room, context = sm.engine.context - n, sm.engine.context
        if room < 1:
            raise APIError(400, f"This model's maximum context length is {context} tokens, and the prompt alone "
                           f"has {n}.", param=param, code="context_length_exceeded")
        requested = min(default or room, room) if requested is None else requested
        if requested > room:
            raise APIError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                           f"{n + requested} tokens ({n} in the prompt, {requested} for the completion).",
                           param="max_tokens", code="context_length_exceeded")
        return requested

    async def respond(job: Job, body: SamplingRequest, request: Request, head: dict, chunk, first, done):
        """An SSE stream of `chunk`s (after `first`), or one body of `done(choice)` for each choice."""
        if body.stream:
            include = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(_stream(job, chunk, first, include), media_type="text/event-stream")
        await _collect(job, request)
        return {**head, "usage": job.usage(), "choices": [done(c) for c in job.choices]}

    def model_card(m: ServedModel) -> dict:
        return {"id": m.name, "object": "model", "created": m.created, "owned_by": "lmforge",
                "context_length": m.engine.context}

    @app.get("/", include_in_schema=False)
    async def chat_page():  # a web chat over this API: web/chat.html (plain HTML/JS, no build step)
        return HTMLResponse((Path(__file__).parent / "web" / "chat.html").read_text(encoding="utf-8"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": {n: {"running": m.engine.num_running, "waiting": m.engine.num_waiting}
                                           for n, m in models.items()}}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card(m) for m in models.values()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str):
        return model_card(served(name))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await parse_body(request, ChatRequest)
        sm = served(body.model)
        if body.top_logprobs:
            raise APIError(400, "top_logprobs is not supported: the engine reports the chosen tokens' log-probs "
                           "only (logprobs=true)", param="top_logprobs")
        try:
            ids = chat.render_prompt(sm.tok, [m.as_dict() for m in body.messages])
        except LmforgeError as e:
            raise APIError(400, str(e), param="messages") from None
        job = Job(sm, [ids], body, max_new(sm, [ids], body.max_completion_tokens or body.max_tokens, "messages"))
        head = {"id": f"chatcmpl-{job.id}", "created": int(time.time()), "model": sm.name, "system_fingerprint": None}
        lp = (lambda pairs: chat_logprobs(sm.tok, pairs)) if body.logprobs else (lambda pairs: None)

        def chunk(c, piece, new):
            choices = [] if c is None else [{"index": c.index, "delta": {"content": piece} if piece else {},
                                             "logprobs": lp(new), "finish_reason": c.finish_reason}]
            return {**head, "object": "chat.completion.chunk", "choices": choices}
        first = [{**head, "object": "chat.completion.chunk", "choices": [
            {"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
             "finish_reason": None}]} for c in job.choices]
        done = lambda c: {"index": c.index, "message": {"role": "assistant", "content": c.text},  # noqa: E731
                          "logprobs": lp(c.logprobs), "finish_reason": c.finish_reason}
        return await respond(job, body, request, {**head, "object": "chat.completion"}, chunk, first, done)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await parse_body(request, CompletionRequest)
        sm = served(body.model)
        texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not texts:
            raise APIError(400, "prompt must not be empty", param="prompt")
        bos = [] if sm.tok.special.bos is None else [sm.tok.special.bos]
        prompts = [bos + sm.tok.encode(t) for t in texts]  # [BOS] text, as `lmforge generate --raw`
        if not all(prompts):
            raise APIError(400, "prompt must not be empty", param="prompt")
        requested = body.max_tokens if "max_tokens" in body.model_fields_set else None
        job = Job(sm, prompts, body, max_new(sm, prompts, requested, "prompt", default=16))
        head = {"id": f"cmpl-{job.id}", "object": "text_completion", "created": int(time.time()), "model": sm.name}
        lp = (lambda pairs, off=0: text_logprobs(sm.tok, pairs, off)) if body.logprobs is not None \
            else (lambda pairs, off=0: None)

        def chunk(c, piece, new):
            choices = [] if c is None else [{"index": c.index, "text": piece, "logprobs": lp(new, c.sent - len(piece)),
                                             "finish_reason": c.finish_reason}]
            return {**head, "choices": choices}
        done = lambda c: {"index": c.index, "text": c.text, "logprobs": lp(c.logprobs),  # noqa: E731
                          "finish_reason": c.finish_reason}
        return await respond(job, body, request, head, chunk, [], done)

    return app


def serve(cfg: ServeConfig) -> None:
    """Load the models and serve them until interrupted."""
    import uvicorn

    models = load_models(cfg)
    print(f"lmforge serve: {', '.join(models)} on http://{cfg.host}:{cfg.port}/v1"
          + (" (API key required)" if cfg.api_key else ""), flush=True)
    uvicorn.run(create_app(models, cfg.api_key), host=cfg.host, port=cfg.port, log_level="info")


COMMAND = Command(
    "lmforge serve", "Serve checkpoints over an OpenAI-compatible HTTP API (continuous batching).", ServeConfig,
    serve,
    flags=(Flag("--model", "model", "checkpoint directory or NAME=DIR (repeatable: several models)"),
           Flag("--host", "host", "address to bind [127.0.0.1]"), Flag("--port", "port"),
           Flag("--api-key", "api_key", "require `Authorization: Bearer KEY`"),
           Flag("--max-batch", "max_batch", "requests decoded together per model"),
           Flag("--max-queue", "max_queue", "waiting requests per model before 429")),
    examples=("lmforge serve --model runs/lmforge-tiny/ppo",
              "lmforge serve --model ppo=runs/lmforge-tiny/ppo --model sft=runs/lmforge-tiny/sft --port 8001 "
              "--api-key sk-local --max-batch 16"))
