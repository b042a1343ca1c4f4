"""Human judges: a local web page where people rank candidates (or vote between two answers), saved as they go.

    lmforge label --judge human --input candidates.jsonl --out ranked.jsonl [--port 8008] [--labelers 2]

The page (web/rank.html, plain HTML/JS) shows one prompt at a time with its candidates in a random order; a
person orders them by dragging or with the keyboard, may tie neighbours, add a comment or skip. Each
submission is appended to the output the moment it arrives, in the seed's ranked format plus who and when:

    {"input": ..., "choices": [{"text": ..., "rank": 1}, ...], "labeler": "ana", "time": "2026-12-01T20:00:00Z",
     "id": "<item id>", "comment": "..."}

and acknowledged only after an fsync, so a crash loses nothing that was acknowledged; a line cut short by a
crash during the write (never acknowledged) is removed at the next start. Skips go to OUT.skipped.jsonl. A
restart reads both files and resumes where everyone stopped.

With several labellers (`labelers` = N rankings wanted per prompt, each by a different person), a prompt is
leased to one labeller at a time (the lease lapses after `lease_seconds` without a submission), so the N
rankings are independent; `lmforge label agreement` then measures how often people agree (InstructGPT
reports ~73% pairwise agreement between its labellers).

The same page in "vote" mode shows two answers side by side for A/B preference votes (`lmforge eval --judge
human`): a vote is a ranking of two, written in the same format.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse

from lmforge.errors import LmforgeError
from lmforge.preferences import kendall_tau
from lmforge.records import append_jsonl_durably, prepare_append


@dataclass
class Item:
    """One thing to judge: a prompt (and its conversation, if any) with its candidates, in file order."""
    id: str
    input: str
    candidates: list[str]
    messages: list[dict] | None = None
    extra: dict = field(default_factory=dict)  # fields copied to every output record (e.g. which policies)


def item_ids(records: list[tuple[str, list[str]]]) -> list[str]:
    """Stable ids from each (input, candidates): the same file gives the same ids after a restart, and repeated
    records get distinct ones (#2, #3, ...)."""
    seen: dict[str, int] = {}
    out = []
    for text, cands in records:
        h = hashlib.sha1(json.dumps([text, cands], ensure_ascii=False).encode()).hexdigest()[:16]
        seen[h] = seen.get(h, 0) + 1
        out.append(h if seen[h] == 1 else f"{h}#{seen[h]}")
    return out


def ranks_from_groups(groups: list[list[int]], k: int) -> list[int]:
    """Competition ranks of k candidates from their order, best first, as groups of tied candidate indices:
    [[2], [0, 3], [1]] -> ranks [2, 4, 1, 2]. Every index 0..k-1 must appear exactly once."""
    flat = [i for g in groups for i in g]
    if sorted(flat) != list(range(k)) or any(not g for g in groups):
        raise ValueError(f"the order must list each of the {k} candidates exactly once")
    ranks, place = [0] * k, 1
    for g in groups:
        for i in g:
            ranks[i] = place
        place += len(g)
    return ranks


def _read_done(path: Path) -> list[dict]:
    out = []
    if path.exists():
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise LmforgeError(f"{path}:{lineno}: not a JSON line; this file is not a labelling output "
                                   "(choose another --out)") from None
            if not isinstance(rec, dict) or "id" not in rec or "labeler" not in rec:
                raise LmforgeError(f"{path}:{lineno}: a record without 'id' and 'labeler'; this file is not a "
                                   "labelling output (choose another --out)")
            out.append(rec)
    return out


class LabelSession:
    """Who has judged what, which prompt each labeller sees next, and the durable output (thread-safe)."""

    def __init__(self, items: list[Item], out: str | Path, labelers: int = 1, lease_seconds: float = 600.0,
                 mode: str = "rank", seed: int = 0):
        if labelers < 1:
            raise ValueError("labelers must be at least 1")
        self.items, self.by_id = items, {it.id: it for it in items}
        self.out, self.skips = Path(out), Path(str(out) + ".skipped.jsonl")
        self.labelers, self.lease_seconds, self.mode, self.seed = labelers, lease_seconds, mode, seed
        self._lock = threading.Lock()
        for p in (self.out, self.skips):
            if prepare_append(p, "labelling output"):
                print(f"{p}: removed a last line cut short by a crash (it had not been acknowledged)")
        self.done: dict[str, list[str]] = {it.id: [] for it in items}    # item -> labellers who ranked it
        self.skipped: dict[str, set[str]] = {it.id: set() for it in items}
        for rec in _read_done(self.out):
            if rec["id"] in self.done and rec["labeler"] not in self.done[rec["id"]]:
                self.done[rec["id"]].append(rec["labeler"])
        for rec in _read_done(self.skips):
            if rec["id"] in self.skipped:
                self.skipped[rec["id"]].add(rec["labeler"])
        self._leases: dict[str, tuple[str, float]] = {}  # item -> (labeller, expiry)

    # ---- queries ----

    def progress(self) -> dict:
        """Rankings done / wanted (N per prompt), skips, and rankings per labeller."""
        per: dict[str, int] = {}
        for names in self.done.values():
            for n in names:
                per[n] = per.get(n, 0) + 1
        return {"done": sum(min(len(v), self.labelers) for v in self.done.values()),
                "total": self.labelers * len(self.items), "skipped": sum(map(len, self.skipped.values())),
                "per_labeler": dict(sorted(per.items()))}

    def remaining(self, labeler: str) -> int:
        """Prompts `labeler` may still rank (some may be leased to others for now)."""
        labeler = _check_name(labeler)
        with self._lock:
            return sum(labeler not in self.done[i.id] and labeler not in self.skipped[i.id]
                       and len(self.done[i.id]) < self.labelers for i in self.items)

    def next_task(self, labeler: str) -> dict | None:
        """The next prompt for `labeler` (leased to them), with its candidates shuffled; None when nothing is free
        for them now (`remaining` tells whether others hold what is left). The same labeller gets the same order
        back after a reload."""
        labeler = _check_name(labeler)
        now = time.monotonic()
        with self._lock:
            for item in self.items:
                if labeler in self.done[item.id] or labeler in self.skipped[item.id]:
                    continue
                if len(self.done[item.id]) >= self.labelers:
                    continue
                holder = self._leases.get(item.id)
                if holder and holder[0] != labeler and holder[1] > now:
                    continue
                for other, (who, _) in list(self._leases.items()):  # one lease per labeller at a time
                    if who == labeler and other != item.id:
                        del self._leases[other]
                self._leases[item.id] = (labeler, now + self.lease_seconds)
                order = list(range(len(item.candidates)))
                random.Random(f"{self.seed}|{item.id}|{labeler}").shuffle(order)
                return {"id": item.id, "input": item.input, "messages": item.messages,
                        "candidates": [{"key": i, "text": item.candidates[i]} for i in order]}
        return None

    # ---- updates ----

    def submit(self, labeler: str, item_id: str, groups: list[list[int]], comment: str = "") -> bool:
        """Record a ranking (best first, tied candidates grouped). Returns False if this labeller had already
        ranked this prompt (a resubmission after a lost reply: kept once)."""
        labeler = _check_name(labeler)
        item = self.by_id.get(item_id)
        if item is None:
            raise KeyError(item_id)
        ranks = ranks_from_groups(groups, len(item.candidates))
        if self.mode == "vote" and len(item.candidates) != 2:
            raise ValueError("a vote compares exactly two answers")
        with self._lock:
            if labeler in self.done[item_id]:
                return False
            rec = {"input": item.input, "choices": [{"text": t, "rank": r} for t, r in zip(item.candidates, ranks)]}
            if item.messages is not None:
                rec["messages"] = item.messages
            rec.update(item.extra)
            rec.update({"labeler": labeler, "time": _now(), "id": item_id})
            if comment.strip():
                rec["comment"] = comment.strip()
            append_jsonl_durably(self.out, rec)
            self.done[item_id].append(labeler)
            self._leases.pop(item_id, None)
        return True

    def skip(self, labeler: str, item_id: str, comment: str = "") -> None:
        """`labeler` will not rank this prompt (it goes to someone else, if anyone else is wanted)."""
        labeler = _check_name(labeler)
        if item_id not in self.by_id:
            raise KeyError(item_id)
        with self._lock:
            if labeler in self.skipped[item_id] or labeler in self.done[item_id]:
                return
            rec = {"id": item_id, "labeler": labeler, "time": _now()}
            if comment.strip():
                rec["comment"] = comment.strip()
            append_jsonl_durably(self.skips, rec)
            self.skipped[item_id].add(labeler)
            self._leases.pop(item_id, None)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _check_name(labeler: str) -> str:
    labeler = (labeler or "").strip()
    if not labeler or len(labeler) > 64:
        raise ValueError("a labeller name (1 to 64 characters) is required")
    return labeler


# ---- the web app ----

def create_label_app(session: LabelSession, title: str = "lmforge: rank the answers"):
    """A FastAPI app: GET / (the page), GET /api/task?labeler=NAME, POST /api/submit, POST /api/skip,
    GET /api/progress. Errors are {"error": message} with status 400 / 404. A task of null with remaining > 0
    means the prompts left for this labeller are leased to others for now: the page asks again every 2 s."""
    app = FastAPI(title=title)
    page = (Path(__file__).parent.parent / "web" / "rank.html").read_text(encoding="utf-8")

    def bad(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    async def body_of(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError("the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ValueError("the body must be a JSON object")
        return body

    @app.get("/", include_in_schema=False)
    async def index():
        return HTMLResponse(page.replace("{{MODE}}", session.mode).replace("{{TITLE}}", title))

    @app.get("/api/progress")
    async def progress():
        return session.progress()

    @app.get("/api/task")
    async def task(labeler: str = ""):
        try:
            t = session.next_task(labeler)
            left = 0 if t is not None else session.remaining(labeler)
        except ValueError as e:
            return bad(400, str(e))
        # task null with remaining > 0: what is left is with other labellers for now; ask again shortly
        return {"mode": session.mode, "task": t, "remaining": left, "progress": session.progress()}

    @app.post("/api/submit")
    async def submit(request: Request):
        try:
            b = await body_of(request)
            groups = b.get("groups")
            if not isinstance(groups, list) or not all(isinstance(g, list) and all(isinstance(i, int) for i in g)
                                                       for g in groups):
                raise ValueError("'groups' must be a list of lists of candidate keys")
            new = session.submit(str(b.get("labeler", "")), str(b.get("id", "")), groups, str(b.get("comment", "")))
        except KeyError:
            return bad(404, "no such prompt")
        except ValueError as e:
            return bad(400, str(e))
        return {"ok": True, "duplicate": not new, "progress": session.progress()}

    @app.post("/api/skip")
    async def skip(request: Request):
        try:
            b = await body_of(request)
            session.skip(str(b.get("labeler", "")), str(b.get("id", "")), str(b.get("comment", "")))
        except KeyError:
            return bad(404, "no such prompt")
        except ValueError as e:
            return bad(400, str(e))
        return {"ok": True, "progress": session.progress()}

    return app


def serve_label_page(session: LabelSession, host: str, port: int, what: str = "rank") -> None:
    """Serve the page until every wanted ranking is in (then stop by itself) or Ctrl-C; a restart resumes."""
    import uvicorn

    p = session.progress()
    print(f"lmforge label: open http://{host}:{port}/ to {what} ({p['done']}/{p['total']} done, saved to "
          f"{session.out}); Ctrl-C stops, a restart resumes", flush=True)
    if p["done"] < p["total"]:
        server = uvicorn.Server(uvicorn.Config(create_label_app(session), host=host, port=port, log_level="warning"))
        stop = threading.Event()

        def stop_when_complete() -> None:
            while not stop.wait(0.5):
                q = session.progress()
                if q["done"] >= q["total"]:
                    time.sleep(1.0)  # let the last page load its "nothing left" view
                    server.should_exit = True
                    return

        watcher = threading.Thread(target=stop_when_complete, daemon=True)
        watcher.start()
        try:
            server.run()
        finally:
            stop.set()
    p = session.progress()
    print(f"lmforge label: {p['done']}/{p['total']} rankings in {session.out}"
          + (f", {p['skipped']} skipped" if p["skipped"] else ""), flush=True)


# ---- agreement between labellers ----

def pairwise_agreement(a: list[int], b: list[int]) -> float:
    """Fraction of candidate pairs two rankings order the same way (a tie agrees only with a tie)."""
    pairs = [(i, j) for i in range(len(a)) for j in range(i + 1, len(a))]
    sign = lambda r, i, j: (r[i] > r[j]) - (r[i] < r[j])  # noqa: E731
    return sum(sign(a, i, j) == sign(b, i, j) for i, j in pairs) / len(pairs)


def agreement(records: list[dict]) -> dict:
    """Inter-labeller agreement over the prompts ranked by two or more labellers (records in the ranked format
    with 'labeler'): every pair of labellers on a prompt counts once."""
    by_prompt: dict[str, dict[str, dict[str, int]]] = {}
    for rec in records:
        texts = [c["text"] for c in rec["choices"]]
        key = rec.get("id") or json.dumps([rec["input"], sorted(texts)], ensure_ascii=False)
        by_prompt.setdefault(key, {})[str(rec["labeler"])] = {c["text"]: int(c["rank"]) for c in rec["choices"]}
    agree, taus, n_pairs, prompts = [], [], 0, 0
    for per_labeler in by_prompt.values():
        names = sorted(per_labeler)
        if len(names) < 2:
            continue
        prompts += 1
        for x in range(len(names)):
            for y in range(x + 1, len(names)):
                ra, rb = per_labeler[names[x]], per_labeler[names[y]]
                texts = sorted(ra)
                if sorted(rb) != texts or len(texts) < 2:
                    continue
                a, b = [ra[t] for t in texts], [rb[t] for t in texts]
                n_pairs += 1
                agree.append(pairwise_agreement(a, b))
                tau = kendall_tau(a, b)  # nan when one labeller tied every answer
                if not math.isnan(tau):
                    taus.append(tau)
    return {"prompts": prompts, "labeler_pairs": n_pairs,
            "pairwise_agreement": sum(agree) / len(agree) if agree else None,
            "kendall_tau_b": sum(taus) / len(taus) if taus else None}
