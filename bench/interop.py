"""Interop benchmark: ``import`` and ``export`` throughput (positions/s, one process) and bytes/position per format.

Builds a synthetic cache of ``--positions`` positions (``storage.synthetic`` rows, K = ``--k``, sequences of
``--seq-len`` completion tokens after a 16-token prompt) over an ASCII byte-level BPE teacher tokenizer of about
``--vocab`` tokens (``logitcache.testing``), so every sequence decodes to text. Then, per format, times
``export`` of the cache and ``import`` of that export into a new cache (fp16 codec, zarr: the defaults), and
reports the size of each format's files next to ours. ``distillkit-lossy`` re-compresses the DistillKit export with
a lossy DistributionQuantizationConfig (1 exact value, a 4-term polynomial, 63 residuals at 4 bits) before
importing it. ``openai-logprobs`` (JSON per token) runs on the first ``--openai-positions`` positions only.
Rates are positions per second of *process CPU time* (``time.process_time``: all threads of this one process),
so that a busy shared machine does not distort them; wall-clock seconds are printed beside. ``read+rebuild`` is the
import without the cache write (source decoding, text and offset rebuilding, row checks); ``import`` is end to
end (including ``CacheWriter``'s fp16 + zarr shard writes). Medians over ``--repeats``.

    python bench/interop.py                          # 1M positions, K=64 (docs/benchmarks.md)
    python bench/interop.py --positions 200000       # quicker
    python bench/interop.py --formats topk-parquet,distillkit

Target (issue 17): import and export >= 500k positions/s per process on the Parquet formats.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from logitcache.interop.distillkit_codec import DistillKitConfig, compress_logprobs, decompress_logprobs
from logitcache.interop.export_stage import run_export
from logitcache.interop.import_stage import run_import
from logitcache.interop.interop_config import ExportConfig, ImportConfig
from logitcache.interop.rebuild import Counters, Rebuilder
from logitcache.interop.sources import open_source
from logitcache.storage import CacheHeader, CacheWriter, LogitCache, PositionRows, SequenceRecord
from logitcache.storage.synthetic import synthetic_rows
from logitcache.testing.tiny_models import bpe_tokenizer
from logitcache.tokenization import token_bytes_info


def teacher(folder: str, vocab: int) -> tuple[str, int]:
    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(letters, rng.integers(2, 9))) for _ in range(20000)]
    corpus = [" ".join(words[i : i + 50]) for i in range(0, len(words), 50)]
    tok = bpe_tokenizer(vocab, corpus, None, full_alphabet=False)
    tok.save_pretrained(folder)
    return folder, len(tok)


def build_cache(path: str, tok_dir: str, positions: int, k: int, seq_len: int) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    info = token_bytes_info(tok)
    vocab = info.size
    regular = np.flatnonzero(~info.added & (info.lengths > 0))
    ids, lps = synthetic_rows(positions, k=k, vocab=vocab, seed=0)
    rng = np.random.default_rng(1)
    seqs = list(range(0, positions, seq_len))
    shard_seqs = max(1, 131072 // seq_len)
    header = CacheHeader(top_k=k, vocab_size=vocab, num_shards=(len(seqs) + shard_seqs - 1) // shard_seqs,
                         metadata={"teacher": {"model": tok_dir}})
    w = CacheWriter(path, header)
    w.save_tokenizer(tok)
    records = []
    for sid, start in enumerate(seqs):
        stop = min(positions, start + seq_len)
        tokens = regular[rng.integers(0, len(regular), 16 + stop - start)].astype(np.int32)
        widths = info.lengths[tokens]
        text = b"".join(info.pieces[t] for t in tokens.tolist()).decode()
        offs = np.concatenate(([0], np.cumsum(widths)[:-1]))
        cut = int(offs[16])
        tgt = tokens[16:]
        hit = ids[start:stop] == tgt[:, None]
        tlp = np.where(hit.any(1), lps[start:stop][np.arange(stop - start), hit.argmax(1)], -np.inf)
        records.append(SequenceRecord(
            sid, f"doc-{sid}", text[:cut], text[cut:], tokens, offs, 16, "length",
            PositionRows(ids[start:stop], lps[start:stop], tgt, tlp),
            messages=[{"role": "user", "content": text[:cut]}],
        ))
        if len(records) == shard_seqs:
            w.write_shard(sid // shard_seqs, records)
            records = []
    if records:
        w.write_shard((len(seqs) - 1) // shard_seqs, records)
    w.finalize()


LOSSY = {"d": 0, "k": 64, "exact_k": 1, "exact_dtype": "float32", "polynomial_terms": [0, 1, 2, "sqrt"],
         "term_dtype": "float32", "residual_bins": [{"scale_dtype": "float16", "element_bits": 4, "num_elements": 63}],
         "delta_encoding": True, "error_diffusion": False, "normalize_t": False}


def make_lossy(folder: str, k: int) -> None:
    import yaml

    with open(os.path.join(folder, "compression_config.yaml"), encoding="utf-8") as f:
        exact = DistillKitConfig.from_dict(yaml.safe_load(f))
    cfg = DistillKitConfig.from_dict({**LOSSY, "d": exact.d, "k": k, "residual_bins": [
        {"scale_dtype": "float16", "element_bits": 4, "num_elements": k - 1}]})
    for name in os.listdir(folder):
        if not name.endswith(".parquet"):
            continue
        path = os.path.join(folder, name)
        t = pq.read_table(path)
        col = t.column("compressed_logprobs").combine_chunks()
        rows = col.flatten().flatten().to_numpy().reshape(-1, exact.logprob_bytes())
        comp = compress_logprobs(np.maximum(decompress_logprobs(rows, exact), -1e4), cfg)
        inner = pa.ListArray.from_arrays(pa.array(np.arange(len(comp) + 1, dtype=np.int32) * comp.shape[1]),
                                         pa.array(comp.reshape(-1), pa.uint8()))
        t = t.set_column(1, "compressed_logprobs", pa.ListArray.from_arrays(col.offsets, inner))
        pq.write_table(t, path)
    with open(os.path.join(folder, "compression_config.yaml"), "w") as f:
        yaml.safe_dump(cfg.to_dict(), f)


def read_rebuild(cfg: ImportConfig) -> int:
    """The import without writing: decode every block and rebuild every record; returns positions."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.teacher_tokenizer)
    src = open_source(cfg, tok)
    rb = Rebuilder(tok, cfg.completion_start, max(len(tok), src.info().min_vocab))
    counters, n = Counters(), 0
    for _, _, decode in src.blocks():
        for raw in decode()[0]:
            n += rb.record(raw, counters).rows.n
    return n


def size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--positions", type=int, default=1_000_000)
    ap.add_argument("--openai-positions", type=int, default=100_000)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--formats", default="topk-parquet,distillkit,distillkit-lossy,openai-logprobs",
                    help="comma-separated subset to run")
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="bench-interop-")
    try:
        tok_dir, vocab = teacher(os.path.join(root, "tok"), args.vocab)
        cache = os.path.join(root, "cache")
        build_cache(cache, tok_dir, args.positions, args.k, args.seq_len)
        small = os.path.join(root, "small")
        if "openai-logprobs" in args.formats:
            build_cache(small, tok_dir, args.openai_positions, args.k, args.seq_len)
        ours = size(os.path.join(cache, "shards"))
        results = {}
        for fmt in args.formats.split(","):
            src_cache = small if fmt == "openai-logprobs" else cache
            n = LogitCache.open(src_cache).num_positions
            ex, rr, im, wall, sz = [], [], [], [], 0
            for _ in range(args.repeats):
                out = os.path.join(root, "x")
                shutil.rmtree(out, ignore_errors=True)
                t0 = time.process_time()
                run_export(ExportConfig(cache=src_cache, format=fmt.replace("-lossy", ""), out=out))
                ex.append(n / (time.process_time() - t0))
                src = out
                if fmt == "distillkit-lossy":
                    make_lossy(out, args.k)
                if fmt == "openai-logprobs":
                    src = os.path.join(root, "all.jsonl")
                    with open(src, "wb") as f:
                        for name in sorted(os.listdir(out)):
                            if name.endswith(".jsonl"):
                                with open(os.path.join(out, name), "rb") as part:
                                    f.write(part.read())
                sz = size(src) - (size(os.path.join(out, "export_config.json")) if src == out else 0)
                dest = os.path.join(root, "imported")
                shutil.rmtree(dest, ignore_errors=True)
                cfg = ImportConfig(src=src, format=fmt.replace("-lossy", ""), teacher_tokenizer=tok_dir, out=dest,
                                   completion_start="token:16", shard_size=256)
                t0 = time.process_time()
                assert read_rebuild(cfg) == n
                rr.append(n / (time.process_time() - t0))
                t0, w0 = time.process_time(), time.perf_counter()
                run_import(cfg)
                im.append(n / (time.process_time() - t0))
                wall.append(time.perf_counter() - w0)
            results[fmt] = (statistics.median(ex), statistics.median(rr), statistics.median(im),
                            statistics.median(wall), sz / n, n)
        print(f"synthetic: {args.positions} positions, K={args.k}, teacher vocab {vocab}, seq len {args.seq_len}; "
              f"ours (fp16, zarr): {ours / LogitCache.open(cache).num_positions:.1f} B/position")
        print(f"{'format':<18}{'positions':>10}{'export pos/s':>14}{'read+rebuild':>14}{'import pos/s':>14}"
              f"{'import wall s':>15}{'B/position':>12}")
        for fmt, (e, r, i, w, b, n) in results.items():
            print(f"{fmt:<18}{n:>10}{e:>14,.0f}{r:>14,.0f}{i:>14,.0f}{w:>15.1f}{b:>12.1f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
