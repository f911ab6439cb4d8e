"""Loader benchmark (issue 6): cached positions/s that stage three's data path delivers, per process.

Builds a synthetic local cache (``storage.synthetic``: Zipf ids over a 262,144 vocabulary, power-law logprobs,
K=64, int32 ids + fp16 logprobs, zarr) of ``--positions`` positions in sequences of ``--seq-len`` completion
positions, plus a matching alignment store with trivial identity alignments (the student tokenization is the
teacher's: pair ``(i, i)`` and one chunk per token, which is the densest, i.e. most expensive, alignment a real
store can have). Then, interleaved over ``--repeats`` rounds (a fresh ``LogitCache.open`` each time, OS page
cache warm), one pass over every cached position with the paths below. ``iter_rows`` and ``iter_shard`` time
their one pass, opening included. The others are endless training streams: they run two passes and time the
second (steady state; ``_second_pass``), so that each timed pass holds exactly one read of every shard whether or
not the stream reads the next shard ahead (a read-ahead stream reads the next pass's first shard during the last
one); closing the stream or ``Prefetcher`` afterwards is not timed. The cache has ``--shards 16`` shards of 256
sequences (``generate``'s default shard size), more than ``LogitCache`` keeps open (8) and ``AlignmentStore``
keeps decoded (4), so the second pass still reads most shards' sequence and alignment tables again, as a
training run over a real cache does.

- ``iter_rows``: the raw reader, ``LogitCache.iter_rows`` over every shard (decoded ``PositionRows`` blocks);
- ``iter_shard``: ``LogitCache.iter_shard`` (per-sequence ``SequenceRecord`` objects);
- ``stream``: ``distill.data.ExampleStream`` (records joined with their alignment; ``make_example``);
- ``collate main``: the same plus ``collate`` into padded batches of ``--batch-size``, in the main thread;
- ``collate thread``: the same on a fresh thread (the work ``Prefetcher`` does, without its queue). The two
  differ when the machine is oversubscribed: ``collate`` allocates with ``torch.full``, an OpenMP-parallel fill
  that in the main thread waits for torch's second OpenMP worker; on a loaded 2-core VM that costs ~1-8 ms per
  call (see docs/benchmarks.md). ``--threads 1`` (the default) avoids it; ``--threads 0`` shows it;
- ``prefetcher``: ``Prefetcher`` (the stream and ``collate`` on its background thread), as ``run_train`` uses
  it; the consumer only takes batches;
- ``prefetcher seq``: the same with ``ExampleStream(read_ahead=False)``: each shard is read when the stream
  reaches it, in the prefetch thread, instead of on the read-ahead thread while the previous shard is yielded;
- ``paced`` / ``paced seq``: ``Prefetcher`` (with / without read-ahead) feeding a consumer that asks for
  ``--pace`` positions/s (default 600,000, about what a 124M student on one H100 consumes): it sleeps
  ``positions / pace`` after each batch, with the GIL released, like a training step waiting on a GPU. The
  sleeps alone take ``positions / pace`` (1.75 s for 1M positions at the default); the rest is time the step
  waited for the loader (at a shard boundary, unless the next shard was read ahead).

Positions are teacher rows (``teacher_mask.sum()`` for batches). Prints one table of medians and the ratio to
the raw reader. ``--profile`` then runs ``collate thread`` once more under cProfile and prints the top entries.

    python bench/loader.py                    # 1M positions, K=64, 256 positions/sequence, batch 8
    python bench/loader.py --profile          # plus a cProfile of the loader
    python bench/loader.py --positions 200000 --repeats 3

Target (issue 6): >= 1M positions/s per process from a local cache.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import itertools
import os
import pstats
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch

from logitcache.distill.data import ExampleStream, Prefetcher, collate
from logitcache.storage import CacheHeader, CacheWriter, LogitCache
from logitcache.storage.alignment_store import AlignmentRecord, AlignmentStore, AlignmentWriter
from logitcache.storage.synthetic import synthetic_records

STORE_KEY = "identity00000000"  # stands in for a student tokenizer fingerprint (16 hex chars)


def build_cache(
    root: str, positions: int, k: int, vocab: int, seq_len: int, prompt_len: int, shards: int, id_codec: str = "int32"
) -> str:
    """A synthetic cache plus an identity alignment store; returns the cache path."""
    records = synthetic_records(positions, k=k, vocab=vocab, seq_len=seq_len, prompt_len=prompt_len, seed=0)
    per = -(-len(records) // shards)
    groups = [records[i : i + per] for i in range(0, len(records), per)]
    path = os.path.join(root, "cache")
    header = CacheHeader(
        top_k=k, vocab_size=vocab, positions={"name": "zarr"}, logprob_codec={"name": "fp16"}, num_shards=len(groups),
        id_codec={"name": id_codec},
    )
    writer = CacheWriter(path, header)
    for i, recs in enumerate(groups):
        writer.write_shard(i, recs)
    writer.finalize()

    cache = LogitCache.open(path)
    aw = AlignmentWriter(cache, STORE_KEY, {"student": {"spec": "identity", "tokenizer_fingerprint": STORE_KEY}})
    for i, recs in enumerate(groups):
        als = []
        for r in recs:
            n = r.rows.n
            idx = np.arange(n, dtype=np.int32)
            als.append(
                AlignmentRecord(
                    sample_id=r.sample_id,
                    student_prompt_text=r.prompt_text,
                    student_token_ids=r.token_ids,
                    student_prompt_len=r.prompt_len,
                    student_offsets=np.arange(n, dtype=np.int64),
                    pairs=np.stack([idx, idx], axis=1),
                    chunks=np.stack([idx, idx + 1, idx, idx + 1], axis=1),
                    teacher_end=-1,
                    student_end=-1,
                )
            )
        aw.write_shard(i, als, {"sequences": len(als)})
    aw.finalize()
    return path


def _open(path: str) -> tuple[LogitCache, AlignmentStore]:
    cache = LogitCache.open(path)
    return cache, AlignmentStore.open(cache, STORE_KEY)


Result = tuple[int, float]  # positions, seconds


def run_iter_rows(path: str, batch: int) -> Result:
    t0 = time.perf_counter()
    cache = LogitCache.open(path)
    n = sum(rows.n for s in cache.shards for rows in cache.iter_rows(s.index))
    return n, time.perf_counter() - t0


def run_iter_shard(path: str, batch: int) -> Result:
    t0 = time.perf_counter()
    cache = LogitCache.open(path)
    n = sum(rec.rows.n for rec in cache.iter_sequences())
    return n, time.perf_counter() - t0


def _stream(path: str, read_ahead: bool = True) -> tuple[ExampleStream, int]:
    cache, store = _open(path)
    return ExampleStream(cache, store, max_length=None, eos_id=None, read_ahead=read_ahead), cache.num_sequences


def _second_pass(counts: Iterator[int], n: int) -> Result:
    """Take ``2n`` items (positions each) of an endless stream; count and time the second ``n``: one pass in
    steady state. Timing the first pass instead would charge a read-ahead stream with the next pass's first shard
    (read during the last shard) and credit it nothing for its own first one."""
    for _ in range(n):
        next(counts)
    t0 = time.perf_counter()
    total = sum(next(counts) for _ in range(n))
    return total, time.perf_counter() - t0


def run_stream(path: str, batch: int) -> Result:
    stream, n = _stream(path)
    it = iter(stream)
    try:
        return _second_pass((ex.teacher.n for ex in it), n)
    finally:
        it.close()  # waits for a read-ahead in flight (untimed), so none runs into the next case


def run_stream_collate(path: str, batch: int) -> Result:
    stream, n = _stream(path)
    it = iter(stream)

    def batches() -> Iterator[int]:
        while True:
            b = collate(list(itertools.islice(it, batch)), 0, stream.cache.top_k, [])
            yield int(b.teacher_mask.sum())

    try:
        return _second_pass(batches(), n // batch)
    finally:
        it.close()


def _in_thread(fn: Callable[[], Result]) -> Result:
    """Run ``fn`` on a fresh thread (where ``Prefetcher`` does its work) and return its result."""
    out: list[Result] = []
    th = threading.Thread(target=lambda: out.append(fn()))
    th.start()
    th.join()
    return out[0]


def run_stream_collate_thread(path: str, batch: int) -> Result:
    return _in_thread(lambda: run_stream_collate(path, batch))


def run_prefetcher(path: str, batch: int, read_ahead: bool = True, pace: float = 0.0) -> Result:
    stream, n = _stream(path, read_ahead)
    loader = Prefetcher(stream, batch, pad_id=0, depth=4)

    def batches() -> Iterator[int]:
        while True:
            b, _, _ = next(loader)
            positions = int(b.teacher_mask.sum())
            if pace:
                time.sleep(positions / pace)  # a training step that waits on a GPU (GIL released)
            yield positions

    try:
        return _second_pass(batches(), n // batch)
    finally:
        loader.close()  # untimed: joins the prefetch thread (and the read-ahead)


def run_prefetcher_sequential(path: str, batch: int) -> Result:
    return run_prefetcher(path, batch, read_ahead=False)


PACE = 600_000.0  # positions/s that the paced consumer asks for (--pace)


def run_paced(path: str, batch: int) -> Result:
    return run_prefetcher(path, batch, pace=PACE)


def run_paced_sequential(path: str, batch: int) -> Result:
    return run_prefetcher(path, batch, read_ahead=False, pace=PACE)


CASES: list[tuple[str, Callable[[str, int], Result]]] = [
    ("iter_rows", run_iter_rows),
    ("iter_shard", run_iter_shard),
    ("stream", run_stream),
    ("collate main", run_stream_collate),
    ("collate thread", run_stream_collate_thread),
    ("prefetcher", run_prefetcher),
    ("prefetcher seq", run_prefetcher_sequential),
    ("paced", run_paced),
    ("paced seq", run_paced_sequential),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--positions", type=int, default=1_048_576)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=262144)
    ap.add_argument("--seq-len", type=int, default=256, help="completion positions per sequence")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--shards", type=int, default=16, help="of 256 sequences by default (generate's default)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cases", default=",".join(name for name, _ in CASES))
    ap.add_argument("--profile", action="store_true", help="cProfile one stream+collate pass (on a thread) afterwards")
    ap.add_argument("--dir", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--pace", type=float, default=600_000, help="positions/s the paced consumer asks for")
    ap.add_argument("--id-codec", default="int32", help="id codec(s) of the cache: int32, rank (format v2), or "
                    "int32,rank (one cache each, their rounds interleaved)")
    args = ap.parse_args()
    global PACE
    PACE = args.pace
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    chosen = [(name, fn) for name, fn in CASES if name in args.cases.split(",")]
    root = args.dir or tempfile.mkdtemp(prefix="logitcache-bench-loader-")
    try:
        t0 = time.perf_counter()
        codecs = args.id_codec.split(",")
        paths = {}
        for c in codecs:
            os.makedirs(os.path.join(root, c), exist_ok=True)
            paths[c] = build_cache(
                os.path.join(root, c), args.positions, args.k, args.vocab, args.seq_len, args.prompt_len, args.shards, c
            )
        build_s = time.perf_counter() - t0
        path = paths[codecs[0]]
        cache = LogitCache.open(path)
        n_pos = cache.num_positions
        runs = [(name if len(codecs) == 1 else f"{name} {c}", fn, paths[c]) for name, fn in chosen for c in codecs]
        for _, fn, p in runs:  # warm-up (imports, page cache)
            fn(p, args.batch_size)
        times: dict[str, list[float]] = {name: [] for name, _, _ in runs}
        counted: dict[str, int] = {}
        for _ in range(args.repeats):
            for name, fn, p in runs:
                counted[name], sec = fn(p, args.batch_size)
                times[name].append(sec)
        chosen = [(name, fn) for name, fn, _ in runs]
        print(
            f"\n{n_pos:,} positions in {cache.num_sequences} sequences x {args.seq_len} positions, K={args.k}, "
            f"vocab {args.vocab}, {len(cache.shards)} shards (zarr, {args.id_codec} ids + fp16), "
            f"batch {args.batch_size}, "
            f"{torch.get_num_threads()} torch thread(s); "
            f"build {build_s:.0f} s; median of {args.repeats} interleaved rounds; "
            f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores\n"
        )
        base = statistics.median(times[chosen[0][0]]) / max(counted[chosen[0][0]], 1)
        ref = "time/pos vs " + chosen[0][0]
        print(f"| {'path':<20} | {'positions':>10} | {'seconds':>8} | {'positions/s':>12} | {ref:>22} |")
        print(f"|{'-' * 22}|{'-' * 11}:|{'-' * 9}:|{'-' * 13}:|{'-' * 23}:|")
        for name, _ in chosen:
            sec = statistics.median(times[name])
            per = sec / max(counted[name], 1)
            print(
                f"| {name:<20} | {counted[name]:>10,} | {sec:8.2f} | {counted[name] / sec:>12,.0f} | "
                f"{per / base:>22.2f} |"
            )
        if args.profile:
            prof = cProfile.Profile()

            def profiled() -> Result:  # on a thread, like Prefetcher: cProfile sees only the thread it runs in
                prof.enable()
                try:
                    return run_stream_collate(path, args.batch_size)
                finally:
                    prof.disable()

            _in_thread(profiled)
            for key in ("tottime", "cumulative"):
                buf = io.StringIO()
                pstats.Stats(prof, stream=buf).sort_stats(key).print_stats(22)
                text = buf.getvalue()
                print(f"\ncProfile of stream+collate on a thread, sorted by {key}:\n" + text[text.find("   ncalls") :])
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
