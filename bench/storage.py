"""Storage benchmark: bytes/position, write and sequential-read throughput, and codec fidelity.

Builds a synthetic but realistic top-K cache (``storage.synthetic``: Zipf ids over a 262,144 vocabulary,
power-law probabilities, sorted rows; sequences of ``--seq-len`` positions with their token ids) and, for each
position backend x logprob codec, writes it with ``CacheWriter`` and reads it back sequentially with
``LogitCache.iter_rows``, all in this one process. Prints one table; medians over ``--repeats`` runs.

    python bench/storage.py                       # 1M positions, K=64 (the issue's figures)
    python bench/storage.py --positions 200000    # quicker

Targets (issue 2): default (int32 ids + fp16) <= 250 B/position; compact <= 175 B/position with mean KL <= 1e-4;
write >= 250k positions/s per process; sequential read >= 2M positions/s per process.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import numpy as np

from logitcache.storage import CacheHeader, CacheWriter, LogitCache
from logitcache.storage.codecs import LOGPROB_CODECS
from logitcache.storage.synthetic import synthetic_records


def renorm_kl(ref: np.ndarray, got: np.ndarray) -> float:
    """Mean over rows of KL(p_ref || p_got), both renormalized within the top-K."""
    lp = ref.astype(np.float64) - np.logaddexp.reduce(ref.astype(np.float64), axis=1, keepdims=True)
    lq = got.astype(np.float64) - np.logaddexp.reduce(got.astype(np.float64), axis=1, keepdims=True)
    p = np.exp(lp)
    return float(np.mean(np.sum(np.where(p > 0, p * (lp - lq), 0.0), axis=1)))


def build_shards(positions: int, k: int, vocab: int, seq_len: int, shards: int, prompt_len: int) -> list[list]:
    records = synthetic_records(positions, k=k, vocab=vocab, seq_len=seq_len, prompt_len=prompt_len)
    per = -(-len(records) // shards)
    return [records[i : i + per] for i in range(0, len(records), per)]


def run_case(root: str, shards: list[list], k: int, vocab: int, backend: str, codec: str) -> dict:
    path = os.path.join(root, f"{backend}-{codec}")
    shutil.rmtree(path, ignore_errors=True)
    header = CacheHeader(
        top_k=k, vocab_size=vocab, positions={"name": backend}, logprob_codec={"name": codec}, num_shards=len(shards)
    )
    t0 = time.perf_counter()
    writer = CacheWriter(path, header)
    for i, recs in enumerate(shards):
        writer.write_shard(i, recs)
    writer.finalize()
    t_write = time.perf_counter() - t0
    cache = LogitCache.open(path)
    t0 = time.perf_counter()
    decoded = [rows.topk_logprobs for s in cache.shards for rows in cache.iter_rows(s.index)]
    t_read = time.perf_counter() - t0
    n = cache.num_positions
    total = sum(s.bytes for s in cache.shards)
    pos_bytes = 0
    for s in cache.shards:
        files = cache.shard_location(s.index).files()
        pos_bytes += sum(v for rel, v in files.items() if rel.startswith("positions"))
    ref = np.concatenate([r.rows.topk_logprobs for recs in shards for r in recs])
    kl = renorm_kl(ref, np.concatenate(decoded))
    return {"write": n / t_write, "read": n / t_read, "bpp": total / n, "pos_bpp": pos_bytes / n, "kl": kl}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--positions", type=int, default=1_048_576)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=262144)
    ap.add_argument("--seq-len", type=int, default=512, help="positions per sequence")
    ap.add_argument("--prompt-len", type=int, default=64, help="prompt tokens per sequence (stored as token ids)")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backends", default="zarr,arrow")
    ap.add_argument("--codecs", default=",".join(LOGPROB_CODECS))
    ap.add_argument("--dir", default=None, help="scratch folder (default: a temporary one)")
    args = ap.parse_args()
    shards = build_shards(args.positions, args.k, args.vocab, args.seq_len, args.shards, args.prompt_len)
    root = args.dir or tempfile.mkdtemp(prefix="logitcache-bench-")
    print(
        f"{args.positions} positions, K={args.k}, vocab={args.vocab}, {len(shards)} shards, "
        f"{args.seq_len} positions/sequence; medians of {args.repeats} runs"
    )
    print(
        f"{'backend':<8}{'logprobs':<10}{'B/pos':>8}{'(arrays)':>10}{'write pos/s':>14}{'read pos/s':>14}"
        f"{'mean KL':>11}"
    )
    try:
        for backend in args.backends.split(","):
            for codec in args.codecs.split(","):
                runs = [run_case(root, shards, args.k, args.vocab, backend, codec) for _ in range(args.repeats)]
                med = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
                print(
                    f"{backend:<8}{codec:<10}{med['bpp']:>8.1f}{med['pos_bpp']:>10.1f}{med['write']:>14,.0f}"
                    f"{med['read']:>14,.0f}{med['kl']:>11.2e}"
                )
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
