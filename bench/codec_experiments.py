"""Codec experiments behind the numbers in ``storage/codecs.py``: compressed bytes/position of candidate
transforms and compressor settings, KL of the lossy logprob codecs, and throughput.

    python bench/codec_experiments.py [rows=200000] [ids|lp|targets|compact|speed|parquet|table ...]

Sizes are Blosc-compressed 4096-row chunks, as the Zarr backend stores them (``table`` also writes a real Zarr
store and a Parquet file with the helpers of ``storage.codecs``). Rows come from ``storage.synthetic``.
"""

from __future__ import annotations

import sys
import time

import numcodecs
import numpy as np
from numcodecs import Blosc

from logitcache.storage.synthetic import synthetic_rows, synthetic_targets

numcodecs.blosc.use_threads = False  # as zarr does
CHUNK = 4096
WHOLE = 1 << 20  # blocksize: the whole chunk
SH = {"no": Blosc.NOSHUFFLE, "byte": Blosc.SHUFFLE, "bit": Blosc.BITSHUFFLE}


def csize(a: np.ndarray, clevel: int = 1, shuffle: str = "byte", blocksize: int = WHOLE) -> float:
    """Compressed bytes per row: Blosc zstd on 4096-row chunks as zarr would (typesize = itemsize)."""
    c = Blosc(cname="zstd", clevel=clevel, shuffle=SH[shuffle], blocksize=blocksize, typesize=a.dtype.itemsize)
    a = np.ascontiguousarray(a)
    tot = sum(len(c.encode(a[s : s + CHUNK].view(np.uint8).reshape(-1))) for s in range(0, a.shape[0], CHUNK))
    return tot / a.shape[0]


def best(a: np.ndarray, levels: tuple[int, ...] = (1, 9), shuffles: tuple[str, ...] = ("no", "byte", "bit")) -> str:
    res = {(lv, sh): csize(a, lv, sh) for lv in levels for sh in shuffles}
    (lv, sh), v = min(res.items(), key=lambda kv: kv[1])
    row = "  ".join(f"{s}{lv2}={res[(lv2, s)]:.1f}" for s in shuffles for lv2 in levels)
    return f"best {sh}/{lv}: {v:.2f} B/row | {row}"


def kl_rows(lp: np.ndarray, dec: np.ndarray) -> np.ndarray:
    p = lp.astype(np.float64)
    q = dec.astype(np.float64)
    p = p - np.logaddexp.reduce(p, axis=1, keepdims=True)
    q = q - np.logaddexp.reduce(q, axis=1, keepdims=True)
    pp = np.exp(p)
    with np.errstate(invalid="ignore"):
        t = np.where(pp > 0, pp * (p - q), 0.0)
    return t.sum(axis=1)


def ids_experiments(ids: np.ndarray) -> None:
    print("== ids")
    u = ids.view(np.uint32)
    print("int32            ", best(ids))
    lo16, hi = (u & 0xFFFF).astype(np.uint16), (u >> 16).astype(np.uint8)
    print("split lo16       ", best(lo16))
    print("split hi8        ", best(hi))
    b = ids.astype("<u4").view(np.uint8).reshape(ids.shape[0], ids.shape[1], 4)
    planes = [np.ascontiguousarray(b[:, :, i]) for i in range(3)]
    for i, p in enumerate(planes):
        print(f"byteplane{i}       ", best(p))
    # sorted ids + delta + permutation
    order = np.argsort(ids, axis=1, kind="stable")
    s = np.take_along_axis(ids, order, axis=1)
    d = np.diff(s, axis=1, prepend=0).astype(np.int32)
    print("sorted-delta i32 ", best(d))
    inv = np.argsort(order, axis=1).astype(np.uint8)
    print("perm u8          ", best(inv))
    # entropy bound (iid per symbol, empirical)
    _, cnt = np.unique(ids, return_counts=True)
    pr = cnt / cnt.sum()
    print(f"empirical iid entropy: {-(pr * np.log2(pr)).sum() * ids.shape[1] / 8:.1f} B/row")


def lp_experiments(lp: np.ndarray) -> None:
    print("== logprobs")
    print("fp32 raw         ", best(lp))
    b32 = lp.view(np.uint32)
    d32 = np.diff(b32, axis=1, prepend=np.uint32(0))
    print("fp32 bitdelta    ", best(d32))
    h = lp.astype(np.float16)
    print("fp16 raw         ", best(h))
    b16 = h.view(np.uint16)
    d16 = np.diff(b16, axis=1, prepend=np.uint16(0))
    print("fp16 bitdelta    ", best(d16))
    kl = kl_rows(lp, h.astype(np.float32))
    print(f"fp16 KL mean {kl.mean():.3g} p99 {np.quantile(kl, 0.99):.3g} max {kl.max():.3g}")


def targets_experiments(ti: np.ndarray, tl: np.ndarray) -> None:
    print("== targets")
    print("target id i32    ", best(ti))
    print("target lp f32    ", best(tl))


def compander(kind: str, s: float, gmax: float):
    """(forward g->u in [0,1], inverse u->g) for gap g >= 0."""
    if kind == "exp":
        z = 1 - np.exp(-gmax / s)
        return (lambda g: (1 - np.exp(-g / s)) / z), (lambda u: -s * np.log1p(-u * z))
    if kind == "sqrt":
        return (lambda g: np.sqrt(g / gmax)), (lambda u: gmax * u * u)
    if kind == "pow":  # u = (g/gmax)^(1/s)
        return (lambda g: (g / gmax) ** (1 / s)), (lambda u: gmax * u**s)
    if kind == "log":  # mu-law-like: u = log1p(g/s)/log1p(gmax/s)
        z = np.log1p(gmax / s)
        return (lambda g: np.log1p(g / s) / z), (lambda u: s * np.expm1(u * z))
    if kind == "uni":
        return (lambda g: g / gmax), (lambda u: gmax * u)
    raise ValueError(kind)


def u8c(lp: np.ndarray, kind: str, s: float, gmax: float = 32.0, levels: int = 254):
    fwd, inv = compander(kind, s, gmax)
    top = lp[:, :1].astype(np.float64)
    g = np.clip(top - lp, 0, gmax)
    q = np.rint(fwd(g) * levels).astype(np.uint8)
    dec = (top.astype(np.float16).astype(np.float64) - inv(q / levels)).astype(np.float32)
    return q, dec


def compact_experiments(lp: np.ndarray) -> None:
    print("== compact")
    for kind, s in [("uni", 0), ("sqrt", 0), ("pow", 3), ("log", 0.5), ("log", 1), ("log", 2), ("exp", 2.5),
                    ("exp", 3), ("exp", 3.5), ("exp", 4), ("exp", 5), ("exp", 6)]:
        for gmax in (24.0, 32.0):
            q, dec = u8c(lp, kind, s, gmax)
            kl = kl_rows(lp, dec)
            dq = np.diff(q, axis=1, prepend=np.uint8(0))
            print(f"{kind:4s} s={s:<4} gmax={gmax:<4} KL mean {kl.mean():.3g} p99 {np.quantile(kl, .99):.3g} "
                  f"max {kl.max():.3g} | codes bit {csize(q, 1, 'bit'):.1f} no {csize(q, 1, 'no'):.1f} "
                  f"| row deltas bit {csize(dq, 1, 'bit'):.1f} no {csize(dq, 1, 'no'):.1f} "
                  f"| deltas without column 0 bit {csize(dq[:, 1:], 1, 'bit'):.1f}")
    top = lp[:, 0]
    print("top f16          ", best(top.astype(np.float16)))
    print("top f32          ", best(top))


def speed_experiments(ids: np.ndarray, lp: np.ndarray) -> None:
    print("== compressor settings (4096-row chunks): B/row, compress MB/s, decompress MB/s")
    h = lp.astype(np.float16).view(np.uint16)
    arrays = {
        "ids i32": ids,
        "fp16 delta": np.diff(h, axis=1, prepend=np.uint16(0)),
        "u8c delta": np.diff(u8c(lp, "exp", 4.0)[0], axis=1, prepend=np.uint8(0)),
        "fp32 delta": np.diff(lp.view(np.uint32), axis=1, prepend=np.uint32(0)),
    }
    for name, a in arrays.items():
        a = np.ascontiguousarray(a[:65536])
        mb = a.nbytes / 1e6
        for sh in ("byte", "bit"):
            for lv in (1, 3, 5, 7, 9):
                for bs in (0, 1 << 18, 1 << 20):
                    c = Blosc(cname="zstd", clevel=lv, shuffle=SH[sh], blocksize=bs, typesize=a.dtype.itemsize)
                    nbytes, te, td = _timed_chunks(c, a)
                    size = nbytes / a.shape[0]
                    print(f"{name:11s} {sh:4s} clevel={lv} bs={bs >> 10:5d}K  {size:6.1f} B/row  "
                          f"enc {mb / te:7.1f} MB/s  dec {mb / td:7.1f} MB/s")


def parquet_experiments(ids: np.ndarray, lp: np.ndarray) -> None:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    print("== parquet (FixedSizeBinary per row, one row group): B/row, write s, read s")
    h = lp.astype(np.float16).view(np.uint16)
    ti, tl = synthetic_targets(ids, lp)
    arrays = {
        "ids i32": ids,
        "fp16 delta": np.diff(h, axis=1, prepend=np.uint16(0)),
        "u8c delta": np.diff(u8c(lp, "exp", 4.0)[0], axis=1, prepend=np.uint8(0)),
        "target id": ti,
        "target lp": tl,
    }
    for name, a in arrays.items():
        a = np.ascontiguousarray(a)
        if a.ndim == 1:
            col = pa.array(a)
        else:
            col = pa.Array.from_buffers(pa.binary(a.shape[1] * a.itemsize), a.shape[0], [None, pa.py_buffer(a)])
        t = pa.table({"x": col})
        for lv in (1, 3, 9):
            for bss in (False, True):
                buf = io.BytesIO()
                t0 = time.perf_counter()
                try:
                    pq.write_table(t, buf, compression="zstd", compression_level=lv, use_dictionary=False,
                                   write_statistics=False, use_byte_stream_split=bss, row_group_size=65536)
                except Exception as e:
                    print(f"{name:11s} zstd{lv} bss={bss}: {type(e).__name__}: {e}")
                    continue
                tw = time.perf_counter() - t0
                t0 = time.perf_counter()
                pq.read_table(io.BytesIO(buf.getvalue()))
                tr = time.perf_counter() - t0
                print(f"{name:11s} zstd{lv} bss={bss!s:5s} {buf.tell() / a.shape[0]:6.1f} B/row  "
                      f"write {a.nbytes / 1e6 / tw:6.0f} MB/s  read {a.nbytes / 1e6 / tr:6.0f} MB/s")


def _numcodecs_blosc(dtype: np.dtype) -> Blosc:
    from logitcache.storage.codecs import zarr_compressor_for

    z = zarr_compressor_for(dtype)
    sh = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}[z.shuffle.value]
    return Blosc(cname=z.cname.value, clevel=z.clevel, shuffle=sh, blocksize=z.blocksize, typesize=z.typesize)


def _blosc_bytes(a: np.ndarray) -> tuple[int, float, float]:
    """`_timed_chunks` with the compressor the cache's zarr backend uses for ``a``'s dtype."""
    return _timed_chunks(_numcodecs_blosc(a.dtype), a)


def _timed_chunks(c: Blosc, a: np.ndarray) -> tuple[int, float, float]:
    """(compressed bytes, encode s, decode s) of ``a`` cut into ``CHUNK``-row chunks, each compressed by ``c``."""
    a = np.ascontiguousarray(a)
    chunks = [a[s : s + CHUNK].view(np.uint8).reshape(-1) for s in range(0, a.shape[0], CHUNK)]
    t = time.perf_counter()
    enc = [c.encode(x) for x in chunks]
    te = time.perf_counter() - t
    t = time.perf_counter()
    for e in enc:
        c.decode(e)
    td = time.perf_counter() - t
    return sum(len(e) for e in enc), te, td


def _zarr_disk_bytes(parts: dict[str, np.ndarray]) -> int:
    import os
    import tempfile

    import zarr

    from logitcache.storage.codecs import zarr_compressor_for

    with tempfile.TemporaryDirectory() as d:
        root = zarr.open_group(zarr.storage.LocalStore(d), mode="w", zarr_format=3)
        for name, arr in parts.items():
            tail = arr.shape[1:]
            a = root.create_array(name, shape=arr.shape, dtype=arr.dtype, chunks=(CHUNK, *tail),
                                  shards=(65536, *tail), compressors=zarr_compressor_for(arr.dtype), fill_value=0)
            a[...] = arr
        return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs)


def _parquet_bytes(parts: dict[str, np.ndarray]) -> int:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from logitcache.storage.codecs import parquet_write_kwargs

    cols = {}
    for name, a in parts.items():
        a = np.ascontiguousarray(a)
        cols[name] = pa.array(a) if a.ndim == 1 else pa.Array.from_buffers(
            pa.binary(a.shape[1] * a.itemsize), a.shape[0], [None, pa.py_buffer(a)])
    buf = io.BytesIO()
    pq.write_table(pa.table(cols), buf, row_group_size=65536, **parquet_write_kwargs(parts))
    return buf.tell()


def table_experiments(n: int) -> None:
    from logitcache.storage.codecs import ID_CODECS, LOGPROB_CODECS

    for bf16 in (False, True):
        ids, lp = synthetic_rows(n, bf16_logits=bf16)
        ti, tl = synthetic_targets(ids, lp)
        print(f"== final table, {n} rows, bf16_logits={bf16} (B/pos after blosc as zarr_compressor_for says)")
        base = {"target_ids": ti, "target_logprobs": tl}
        idc = ID_CODECS["int32"]()
        t = time.perf_counter()
        id_parts = idc.encode(ids)
        id_enc = time.perf_counter() - t
        t = time.perf_counter()
        idc.decode(id_parts, ids.shape[1])
        id_dec = time.perf_counter() - t
        sizes = {}
        for name, a in {**{f"ids.{k}": v for k, v in id_parts.items()}, **base}.items():
            b, te, td = _blosc_bytes(a)
            sizes[name] = b / n
            print(f"  part {name:22s} {a.dtype!s:8s} {b / n:7.1f} B/pos  blosc enc {n / te:10.0f} rows/s "
                  f"dec {n / td:10.0f} rows/s")
        print(f"  int32 transform: enc {n / max(id_enc, 1e-9):.3g} dec {n / max(id_dec, 1e-9):.3g} rows/s")
        for name, cls in LOGPROB_CODECS.items():
            c = cls()
            t = time.perf_counter()
            parts = c.encode(lp)
            te = time.perf_counter() - t
            t = time.perf_counter()
            dec = c.decode(parts, lp.shape[1])
            td = time.perf_counter() - t
            kl = kl_rows(lp, dec)
            lp_b, bte, btd = 0.0, 0.0, 0.0
            for pn, a in parts.items():
                b, e1, d1 = _blosc_bytes(a)
                lp_b += b / n
                bte += e1
                btd += d1
                print(f"  part {name}.{pn:17s} {a.dtype!s:8s} {b / n:7.1f} B/pos")
            allparts = {**{f"ids.{k}": v for k, v in id_parts.items()}, **{f"lp.{k}": v for k, v in parts.items()},
                        **base}
            total = sizes["ids.ids"] + lp_b + sizes["target_ids"] + sizes["target_logprobs"]
            disk = _zarr_disk_bytes(allparts) / n
            pqb = _parquet_bytes(allparts) / n
            print(f"  {name:5s} total {total:6.1f} B/pos (zarr on disk {disk:6.1f}, parquet {pqb:6.1f}) | KL mean "
                  f"{kl.mean():.2g} p99 {np.quantile(kl, .99):.2g} max {kl.max():.2g} | transform enc "
                  f"{n / te:.3g} dec {n / td:.3g} rows/s | +blosc enc {n / (te + bte):.3g} dec {n / (td + btd):.3g}"
                  " rows/s")


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    what = sys.argv[2:] or ["ids", "lp", "targets"]
    t = time.time()
    ids, lp = synthetic_rows(n)
    ti, tl = synthetic_targets(ids, lp)
    print(f"generated {n} rows in {time.time() - t:.1f}s")
    if "ids" in what:
        ids_experiments(ids)
    if "lp" in what:
        lp_experiments(lp)
    if "targets" in what:
        targets_experiments(ti, tl)
    if "compact" in what:
        compact_experiments(lp)
    if "speed" in what:
        speed_experiments(ids, lp)
    if "parquet" in what:
        parquet_experiments(ids, lp)
    if "table" in what:
        table_experiments(n)
