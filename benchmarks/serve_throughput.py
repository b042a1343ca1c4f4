"""Throughput of `lmforge serve` through HTTP: requests/s and generated tokens/s at 1, 8 and 32 concurrent clients.

Starts `lmforge serve` on a checkpoint (default: the default run's PPO policy) in a subprocess, then for each
concurrency C runs C client threads with the official `openai` client, each sending chat requests back to back
(temperature 1, a fixed seed per request, max_tokens 64) for a fixed time; tokens are counted from the responses'
usage. Medians over the repeats, and the ratio of aggregate tokens/s at the highest concurrency to one client
(continuous batching decodes concurrent requests together, so the ratio is far above 1; serial decoding gives ~1).

    python benchmarks/serve_throughput.py --model runs/lmforge/ppo
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

PROMPTS = ["What is 23 + 45?", "What color is the banana?", "Translate into Chinese\nred apple",
           "Write 'cat' in uppercase.", "Reverse the word order\ncat dog bird", "大象是大的还是小的?"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, port: int, max_batch: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "lmforge.cli", "serve", "--model", f"policy={model}", "--port",
                             str(port), f"max_batch={max_batch}", "max_queue=1024", "device=cpu"],
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


def run_clients(port: int, clients: int, seconds: float, max_tokens: int) -> tuple[float, float]:
    """(requests/s, completion tokens/s) of `clients` threads sending requests back to back for `seconds`."""
    from openai import OpenAI

    done = {"requests": 0, "tokens": 0}
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def worker(i: int) -> None:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
        k = 0
        while time.perf_counter() < stop_at:
            r = client.chat.completions.create(model="policy", temperature=1.0, max_tokens=max_tokens, seed=i * 1000 + k,
                                               messages=[{"role": "user", "content": PROMPTS[(i + k) % len(PROMPTS)]}])
            k += 1
            with lock:
                done["requests"] += 1
                done["tokens"] += r.usage.completion_tokens

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return done["requests"] / wall, done["tokens"] / wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="runs/lmforge/ppo")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--seconds", type=float, default=10.0, help="per measurement")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=64)
    args = p.parse_args()
    if not Path(args.model).is_dir():
        raise SystemExit(f"{args.model}: not a checkpoint directory (run `lmforge run` first, or pass --model)")
    port = free_port()
    server = start_server(args.model, port, max(args.clients))
    try:
        run_clients(port, max(args.clients), 3.0, args.max_tokens)  # warm-up
        rows = {}
        for c in args.clients:
            runs = [run_clients(port, c, args.seconds, args.max_tokens) for _ in range(args.repeats)]
            rows[c] = (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs))
            print(f"{c:>3} clients: {rows[c][0]:7.2f} requests/s, {rows[c][1]:8.1f} tokens/s", flush=True)
        lo, hi = min(args.clients), max(args.clients)
        print(json.dumps({"model": args.model, "tokens_per_s": {c: round(v[1], 1) for c, v in rows.items()},
                          "requests_per_s": {c: round(v[0], 2) for c, v in rows.items()},
                          f"ratio_{hi}_vs_{lo}": round(rows[hi][1] / rows[lo][1], 2)}))
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
