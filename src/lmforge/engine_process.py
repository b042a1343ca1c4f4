"""The continuous-batching engine in a process of its own, behind the client side of `Engine`'s API.

Why a process: a server that decodes on a thread shares one interpreter lock between its HTTP work (parsing,
chat templates, JSON) and the Python half of every forward pass (hundreds of small torch calls per step), and
each waits for the other. Measured on the 2-core CPU with the default run's PPO policy (benchmarks/
serve_throughput.py), the engine alone decodes 32 concurrent short chats at ~2,300 tokens/s, behind the HTTP
server on a thread at ~1,300. vLLM's V1 engine splits its API server and EngineCore the same way.

    parent (HTTP server)                              child (spawned: loads the model, owns the Engine)
    EngineProcess.submit / cancel ── messages ──►     read what came, Engine.step(), reply with the step's events
    reader thread: on_token(event) ◄── one message per step: ([(request id, TokenEvent), ...], running, waiting)

The parent holds only the tokenizer. Requests are checked in the parent with the engine's own rules
(`engine.check_request`), so a bad one is refused at once (HTTP 400); the queue bound counts the requests in
flight (at most max_batch running + max_queue waiting, else QueueFull: 429). If the child dies, every request
in flight ends with finish_reason "error" and later submits raise EngineStopped (503); the server stays up.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing as mp
import os
import threading
import traceback
from collections.abc import Callable, Sequence

from lmforge.engine import QueueFull, Request, TokenEvent, check_request
from lmforge.errors import LmforgeError
from lmforge.generation import SamplingParams
from lmforge.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class EngineStopped(RuntimeError):
    """The engine process has exited (crashed or stopped): it takes no more requests (a server answers 503)."""


def engine_threads(threads: int, n_models: int, cores: int | None = None) -> int:
    """torch threads for each engine process: `threads` if set, else the cores but one shared by the models, at
    least 1. The spared core is the HTTP server's: beside a busy server, an engine's OpenMP threads keep waiting
    for the one that shares its core (on 2 cores, 1 engine thread served 32 clients 20-40% faster than 2)."""
    if cores is None:  # the cores this process may run on
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return threads or max(1, (cores - 1) // max(1, n_models))


class EngineProcess:
    """An `Engine` for the checkpoint at `path`, run in a spawned process. Loads it now (raising LmforgeError
    with the child's message if it cannot); `start()` begins relaying events, `stop()` ends the process."""

    def __init__(self, path: str, device: str = "cpu", max_batch: int = 8, max_queue: int = 64,
                 waiting_served_ratio: float = 0.3, max_waiting_steps: int = 20, wait: bool = True,
                 threads: int = 0):
        ctx = mp.get_context("spawn")  # never fork a process that holds torch's thread pools
        self.path, self.max_batch, self.max_queue = path, max_batch, max_queue
        self._conn, child = ctx.Pipe()
        settings = {"max_batch": max_batch, "waiting_served_ratio": waiting_served_ratio,
                    "max_waiting_steps": max_waiting_steps}
        self._proc = ctx.Process(target=_child_main, args=(child, path, device, settings, threads), daemon=True,
                                 name="lmforge-engine")
        self._proc.start()
        child.close()  # the child's end lives in the child only, so its exit reads as EOF here
        self._requests: dict[str, Request] = {}
        self._lock = threading.Lock()  # guards _requests, _dead and sending on the pipe
        self._counter = itertools.count()
        self._running = self._waiting = 0
        self._dead = False
        self._reader: threading.Thread | None = None
        self.tok: Tokenizer | None = None
        self.threads = 0  # torch threads in the child, as it reports once loaded
        if wait:
            self.wait_loaded()

    def wait_loaded(self) -> None:
        """Wait for the child to load the model (several children load in parallel when created with
        wait=False); raise LmforgeError with its message if it could not."""
        if self.tok is not None:
            return
        try:
            kind, payload = self._conn.recv()
        except EOFError:
            self._proc.join(5)
            kind, payload = "error", (f"{self.path}: the engine process exited while loading (exit code "
                                      f"{self._proc.exitcode})")
        if kind == "error":
            self._dead = True
            self._proc.join(5)
            raise LmforgeError(payload)
        import tokenizers

        tok_json, tok_config, self.vocab_size, self.context, self.threads = payload
        self.tok = Tokenizer(tokenizers.Tokenizer.from_str(tok_json), tok_config, source=self.path)

    @property
    def num_running(self) -> int:
        return self._running

    @property
    def num_waiting(self) -> int:
        return self._waiting

    def submit(self, prompt: Sequence[int], params: SamplingParams | None = None,
               stop_ids: Sequence[int] | None = None, seed: int | None = None,
               on_token: Callable[[TokenEvent], None] | None = None, request_id: str | None = None
               ) -> Request:
        """As `Engine.submit`: ValueError for a request the model cannot serve, QueueFull past the bound."""
        params = params or SamplingParams()
        prompt = [int(t) for t in prompt]
        check_request(prompt, params, self.vocab_size, self.context)
        with self._lock:
            if self._dead:
                raise EngineStopped(f"the engine process for {self.path} has exited")
            if len(self._requests) >= self.max_batch + self.max_queue:
                raise QueueFull(f"{len(self._requests) - self.max_batch} requests already wait "
                                f"(max_queue={self.max_queue})")
            rid = request_id if request_id is not None else f"req-{next(self._counter)}"
            if rid in self._requests:
                raise ValueError(f"request id {rid!r} is already in use")
            # The parent's copy keeps the output as it arrives (tokens, finish reason, wait()); the child samples.
            req = self._requests[rid] = Request(rid, prompt, params, stop_ids or (), [], on_token)
            self._conn.send(("submit", rid, prompt, params, None if stop_ids is None else list(stop_ids), seed))
        return req

    def cancel(self, request_id: str) -> bool:
        """Stop a waiting or running request (its slot is reused at the child's next step)."""
        with self._lock:
            if request_id not in self._requests or self._dead:
                return False
            self._conn.send(("cancel", request_id))
            return True

    def start(self) -> None:
        """Begin handing the child's events to the requests' on_token callbacks (a reader thread)."""
        if self._reader is None:
            self._reader = threading.Thread(target=self._read, name="lmforge-engine-reader", daemon=True)
            self._reader.start()

    def stop(self, timeout: float = 10.0) -> None:
        """End the child (requests in flight end "cancelled") and the reader thread."""
        with self._lock:
            if not self._dead:
                try:
                    self._conn.send(("stop",))
                except OSError:
                    pass
        self._proc.join(timeout)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()
        if self._reader is not None:
            self._reader.join(timeout)
        self._fail_all("cancelled")
        self._conn.close()

    def _read(self) -> None:
        try:
            while True:
                events, self._running, self._waiting = self._conn.recv()
                for rid, ev in events:
                    with self._lock:
                        req = self._requests.get(rid)
                        if req is not None and ev.finished:
                            del self._requests[rid]
                    if req is not None:
                        self._deliver(req, ev)
        except (EOFError, OSError):
            pass
        if self._proc.exitcode not in (None, 0):
            log.error("the engine process exited with code %s", self._proc.exitcode)
        self._fail_all("error")

    def _deliver(self, req: Request, ev: TokenEvent) -> None:
        req._emit(ev)
        if req._cancel and not ev.finished:  # its on_token callback failed: the consumer is gone
            self.cancel(req.id)

    def _fail_all(self, reason: str) -> None:
        with self._lock:
            self._dead = True
            left = list(self._requests.values())
            self._requests.clear()
        self._running = self._waiting = 0
        for req in left:
            self._deliver(req, TokenEvent(None, 0.0, True, reason))


def _child_main(conn, path: str, device: str, settings: dict, threads: int = 0) -> None:
    """The engine process: load, report ("ready", ...) or ("error", message), then step and relay until told
    to stop or the parent goes away. threads > 0: torch's CPU threads in this process."""
    try:
        from lmforge.cli import keep_freed_memory

        keep_freed_memory()  # a spawned process: the parent's malloc settings are not inherited
        import torch

        if threads > 0:
            torch.set_num_threads(threads)
        from lmforge.checkpoint import load_causal_lm
        from lmforge.engine import Engine
        from lmforge.training import pick_device

        model, tok, _ = load_causal_lm(path, "lmforge serve", device=pick_device(device))
        # The parent bounds the queue; here every request it sends is accepted.
        engine = Engine(model, tok, max_queue=1 << 30, **settings)
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group; the parent reports it
        return
    except LmforgeError as e:
        conn.send(("error", str(e)))
        return
    except Exception as e:  # an unexpected failure still reaches the user as one line
        conn.send(("error", f"{path}: could not load the model: {type(e).__name__}: {e}"))
        return
    conn.send(("ready", (tok.hf.to_str(), tok.config, model.config.vocab_size, engine.context,
                         torch.get_num_threads())))

    out: list[tuple[str, TokenEvent]] = []
    try:
        while True:
            busy = engine.num_running or engine.num_waiting
            ready = conn.poll(0 if busy else None)  # idle: sleep until a message comes
            while ready:
                msg = conn.recv()
                if msg[0] == "submit":
                    _, rid, prompt, params, stop_ids, seed = msg
                    sink = lambda ev, rid=rid: out.append((rid, ev))
                    try:
                        engine.submit(prompt, params, stop_ids, seed, on_token=sink, request_id=rid)
                    except (ValueError, QueueFull) as e:  # checked in the parent already: should not happen
                        log.error("request %s refused by the engine: %s", rid, e)
                        out.append((rid, TokenEvent(None, 0.0, True, "error")))
                elif msg[0] == "cancel":
                    engine.cancel(msg[1])
                else:  # "stop"
                    engine.stop()
                    return
                ready = conn.poll(0)
            try:
                engine.step()
            except Exception:  # step() has already ended the requests it held with "error"
                traceback.print_exc()
            if out or busy:
                conn.send((out, engine.num_running, engine.num_waiting))
                out = []
    except (EOFError, OSError, KeyboardInterrupt):  # the parent is gone (or interrupted with it)
        return
