"""Throughput of `lmforge serve` through HTTP: requests/s and generated tokens/s at 1, 8 and 32 concurrent clients.

Starts `lmforge serve` on a checkpoint (default: the default run's PPO policy) in a subprocess. For each
concurrency C, C clients on one asyncio loop send chat requests back to back (temperature 1, a fixed seed per
request, max_tokens 64) for a fixed time; tokens are counted from the responses' usage. Each repeat measures
every concurrency in turn, so a slow phase of a shared machine hits all of them; the ratio of aggregate
tokens/s at the highest concurrency to one client is the median of the repeats' ratios (continuous batching
decodes concurrent requests together, so it is far above 1; serial decoding gives ~1).

The clients share the server's CPU, so by default they speak plain HTTP/1.1 over asyncio streams (keep-alive,
~1% of a core for all of them, as vLLM's benchmark uses aiohttp); `--client openai` uses the official
AsyncOpenAI client instead, whose own work (~0.35 core at 32 clients) then competes with the server's.

    python benchmarks/serve_throughput.py --model runs/lmforge/ppo
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

PROMPTS = ["What is 23 + 45?", "What color is the banana?", "Translate into Chinese\nred apple",
           "Write 'cat' in uppercase.", "Reverse the word order\ncat dog bird", "大象是大的还是小的?"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, port: int, max_batch: int, extra: list[str]) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "lmforge.cli", "serve", "--model", f"policy={model}", "--port",
                             str(port), f"max_batch={max_batch}", "max_queue=1024", "device=cpu", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("the server did not come up")


def request_body(i: int, k: int, max_tokens: int) -> dict:
    return {"model": "policy", "temperature": 1.0, "max_tokens": max_tokens, "seed": i * 1000 + k,
            "messages": [{"role": "user", "content": PROMPTS[(i + k) % len(PROMPTS)]}]}


async def http_client(port: int, i: int, stop_at: float, max_tokens: int, done: dict) -> None:
    """One client: POST /v1/chat/completions on one keep-alive connection until stop_at."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    k = 0
    while time.perf_counter() < stop_at:
        body = json.dumps(request_body(i, k, max_tokens)).encode()
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        if not head[0].startswith("HTTP/1.1 200"):
            raise SystemExit(f"the server answered {head[0]!r}")
        length = next(int(h.split(":", 1)[1]) for h in head if h.lower().startswith("content-length:"))
        reply = json.loads(await reader.readexactly(length))
        done["requests"] += 1
        done["tokens"] += reply["usage"]["completion_tokens"]
        k += 1
    writer.close()


async def openai_client(port: int, i: int, stop_at: float, max_tokens: int, done: dict) -> None:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
    k = 0
    while time.perf_counter() < stop_at:
        r = await client.chat.completions.create(**request_body(i, k, max_tokens))
        done["requests"] += 1
        done["tokens"] += r.usage.completion_tokens
        k += 1
    await client.close()


def run_clients(port: int, clients: int, seconds: float, max_tokens: int, kind: str) -> tuple[float, float]:
    """(requests/s, completion tokens/s) of `clients` concurrent clients sending requests for `seconds`."""
    one = http_client if kind == "http" else openai_client

    async def all_of_them() -> dict:
        done = {"requests": 0, "tokens": 0}
        stop_at = time.perf_counter() + seconds
        await asyncio.gather(*(one(port, i, stop_at, max_tokens, done) for i in range(clients)))
        return done

    t0 = time.perf_counter()
    done = asyncio.run(all_of_them())
    wall = time.perf_counter() - t0
    return done["requests"] / wall, done["tokens"] / wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="runs/lmforge/ppo")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--seconds", type=float, default=8.0, help="per measurement")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--client", choices=["http", "openai"], default="http")
    p.add_argument("--server-args", nargs="*", default=[], help="extra KEY=VALUE settings for lmforge serve")
    args = p.parse_args()
    if not Path(args.model).is_dir():
        raise SystemExit(f"{args.model}: not a checkpoint directory (run `lmforge run` first, or pass --model)")
    port = free_port()
    server = start_server(args.model, port, max(args.clients), args.server_args)
    try:
        run_clients(port, max(args.clients), 3.0, args.max_tokens, args.client)  # warm-up
        runs: dict[int, list[tuple[float, float]]] = {c: [] for c in args.clients}
        for r in range(args.repeats):
            for c in args.clients:
                runs[c].append(run_clients(port, c, args.seconds, args.max_tokens, args.client))
            print(f"repeat {r + 1}: " + ", ".join(f"{c} clients {runs[c][-1][1]:.0f} tokens/s" for c in args.clients),
                  flush=True)
        lo, hi = min(args.clients), max(args.clients)
        for c in args.clients:
            print(f"{c:>3} clients: {statistics.median(x[0] for x in runs[c]):7.2f} requests/s, "
                  f"{statistics.median(x[1] for x in runs[c]):8.1f} tokens/s (medians)")
        ratio = statistics.median(h[1] / l[1] for h, l in zip(runs[hi], runs[lo]))
        print(json.dumps({"model": args.model, "client": args.client,
                          "tokens_per_s": {c: round(statistics.median(x[1] for x in v), 1) for c, v in runs.items()},
                          "requests_per_s": {c: round(statistics.median(x[0] for x in v), 2) for c, v in runs.items()},
                          f"ratio_{hi}_vs_{lo}": round(ratio, 2)}))
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
