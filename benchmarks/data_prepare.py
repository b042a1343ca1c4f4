"""`lmforge data prepare` throughput: Hugging Face `tokenizers` in one process vs tiktoken in worker processes.

    python benchmarks/data_prepare.py                       # 200 MB corpus under /tmp/lmforge-bench, a few minutes
    python benchmarks/data_prepare.py --mb 50 --repeats 1   # quicker

The corpus is the project's own synthetic world (src/lmforge/world): fresh documents from several seeds, then
the same documents again in other orders until it reaches --mb (generating 200 MB fresh would take minutes).
The tokenizer is byte-level BPE with 4096 tokens trained on one seed's corpus, like the default run's.

Three runs of `prepare_data`, each a median of --repeats:
- tiktoken, default (one worker process per core): on the whole corpus.
- tiktoken, in-process (processes=0): on a --slice-mb slice.
- tokenizers, in-process: on the same slice (it is too slow for the whole corpus in a few minutes); its shards
  must equal the previous run's byte for byte. The same tokenizer with a ByteLevel post-processor (as GPT-2's
  tokenizer.json has): the ids are unchanged, but `Tokenizer.fast_encoder` declines it, so prepare takes the
  `tokenizers` path, as for an imported tokenizer.
MB are of UTF-8 document text (the manifest's bytes), 10^6 bytes. CPU-s/MB counts this process and its worker
processes, and "cores used" is CPU time over wall time: on a shared machine, where others' jobs take CPU, it says
how much of the machine a run got.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import time
from pathlib import Path

# Nothing heavy at module level: each worker process of prepare_data imports this file again (multiprocessing's
# spawn start), so lmforge.data (which imports torch) is imported inside main().


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def make_corpus(path: Path, mb: int, fresh_mb: int = 40) -> None:
    """~fresh_mb of world documents (seeds 1, 2, ...), then repeated in shuffled orders up to `mb` MB."""
    from lmforge.world.corpus import build_corpus

    docs, size, seed = [], 0, 0
    while size < min(fresh_mb, mb) * 1e6:
        seed += 1
        batch = build_corpus(random.Random(f"corpus-{seed}"), 1_500_000)
        docs += batch
        size += sum(len(d.encode()) + 2 for d in batch)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        written, rep = 0, 0
        while written < mb * 1e6:
            order = docs[:]
            random.Random(rep).shuffle(order)
            for d in order:
                f.write(d + "\n\n")
                written += len(d.encode()) + 2
                if written >= mb * 1e6:
                    break
            rep += 1
    tmp.replace(path)
    print(f"corpus: {path} ({written / 1e6:.0f} MB, {len(docs):,} distinct documents from {seed} seeds)")


def make_slice(corpus: Path, path: Path, mb: int) -> None:
    """The corpus's first documents, up to `mb` MB."""
    with open(corpus, "rb") as src, open(path, "wb") as dst:
        for line in src:
            dst.write(line)
            if dst.tell() >= mb * 1e6 and line == b"\n":
                break


def make_tokenizers(work: Path) -> tuple[Path, Path]:
    """(a 4096-token lmforge tokenizer, the same with a ByteLevel post-processor that keeps prepare on tokenizers)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import processors

    from lmforge.tokenizer import Tokenizer, train_tokenizer

    fast_dir, hf_dir = work / "tokenizer", work / "tokenizer-hf-path"
    if not (fast_dir / "tokenizer.json").is_file():
        sample = work / "seed0.txt"
        make_corpus(sample, 4, fresh_mb=4)
        fast_dir.mkdir(parents=True, exist_ok=True)
        train_tokenizer([sample], 4096, fast_dir)
    tok = Tokenizer.load(fast_dir)
    hf = HFTokenizer.from_str(tok.hf.to_str())
    hf.post_processor = processors.ByteLevel(trim_offsets=False)
    Tokenizer(hf, tok.config).save(hf_dir)
    other = Tokenizer.load(hf_dir)
    assert tok.fast_encoder() is not None and other.fast_encoder() is None
    text = "The 苹果 is red.  <|eos|> x"
    assert other.encode(text) == tok.encode(text)
    return fast_dir, hf_dir


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the worker processes)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def timed(inputs: list[Path], tok_dir: Path, out: Path, repeats: int, **kw) -> tuple[dict, list[dict]]:
    """prepare_data `repeats` times: the last manifest, and per run its MB/s, CPU seconds per MB and cores used."""
    from lmforge.data import prepare_data

    runs, m = [], {}
    for _ in range(repeats):
        shutil.rmtree(out, ignore_errors=True)
        c0 = cpu_seconds()
        m = prepare_data(inputs, tok_dir, out, **kw)
        cpu = cpu_seconds() - c0
        mb = sum(m["splits"][s]["bytes"] for s in ("train", "val")) / 1e6
        runs.append({"mb_s": m["mb_per_s"], "cpu_s_per_mb": cpu / mb, "cores": cpu / m["seconds"]})
    shutil.rmtree(out, ignore_errors=True)
    return m, runs


def report(name: str, m: dict, runs: list[dict]) -> float:
    """Print one line per path; returns the median MB/s."""
    mb = sum(m["splits"][s]["bytes"] for s in ("train", "val")) / 1e6
    tokens = sum(m["splits"][s]["tokens"] for s in ("train", "val"))
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    each = ", ".join(f"{r['mb_s']:.2f}" for r in runs)
    print(f"{name:<34} {mb:6.1f} MB {tokens / 1e6:5.1f}M tokens: median {med['mb_s']:5.2f} MB/s, "
          f"{med['mb_s'] * tokens / mb / 1e6:4.2f}M tokens/s, {med['cpu_s_per_mb']:.3f} CPU-s/MB, "
          f"{med['cores']:.2f} cores used (runs: {each} MB/s)", flush=True)
    return med["mb_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/lmforge-bench", help="corpus, tokenizer and outputs go here")
    ap.add_argument("--mb", type=int, default=200, help="corpus size")
    ap.add_argument("--slice-mb", type=int, default=20, help="the slice for the in-process runs")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    corpus, piece = work / f"corpus-{args.mb}MB.txt", work / f"slice-{args.slice_mb}MB.txt"
    if not corpus.is_file():
        make_corpus(corpus, args.mb)
    if not piece.is_file():
        make_slice(corpus, piece, args.slice_mb)
    fast_dir, hf_dir = make_tokenizers(work)
    load = os.getloadavg()[0]
    print(f"{os.cpu_count()} cores ({cpu_name()}), load average {load:.1f} before the runs; "
          f"corpus {corpus.stat().st_size / 1e6:.0f} MB, slice {piece.stat().st_size / 1e6:.0f} MB", flush=True)

    # The worker processes first: the machine is shared, and this is the figure that matters most.
    m_all, r_all = timed([corpus], fast_dir, work / "out-all", args.repeats)
    rss_all = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    workers = report(f"tiktoken, {os.cpu_count()} worker processes (all)", m_all, r_all)
    m_one, r_one = timed([piece], fast_dir, work / "out-one", args.repeats, processes=0)
    one = report("tiktoken, in-process (slice)", m_one, r_one)
    m_hf, r_hf = timed([piece], hf_dir, work / "out-hf", args.repeats, processes=0)
    hf = report("tokenizers, in-process (slice)", m_hf, r_hf)
    assert m_one["fingerprint"] == m_hf["fingerprint"], "tiktoken's shards differ from tokenizers'"
    print(f"shards identical (tokenizers vs tiktoken, slice): True; peak RSS of this process after the whole corpus "
          f"{rss_all:.0f} MiB; load average now {os.getloadavg()[0]:.1f}")
    print(json.dumps({"date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count(), "load_before": round(load, 1),
                      "mb_per_s": {"tiktoken_workers": round(workers, 2), "tiktoken_1_process": round(one, 2),
                                   "tokenizers": round(hf, 2)}}))

if __name__ == "__main__":
    main()
