"""Position-array codecs: lossless or quantizing *transforms* of the top-K ids and logprobs of cached rows.

A codec turns one ``[n, K]`` field into named *parts*: numpy arrays with leading dimension ``n`` and a fixed
dtype. The backend stores each part as its own array (Zarr: ``<field>.<part>`` with the Blosc compressor from
``zarr_compressor_for``; Parquet: a ``FixedSizeBinary`` or flat column with ``parquet_write_kwargs``). The
codec makes the data predictable; the backend's compressor does the entropy coding. Codecs are stateless,
described by ``config()`` (a JSON dict with ``"name"``, stored in the manifest) and rebuilt by
``id_codec_from_config`` / ``logprob_codec_from_config``.

Ids (int32 ``[n, K]``, vocabulary 262,144 = 18 bits):

``int32`` (default, lossless)   part ``ids`` int32, stored as is; Blosc byte-shuffle + zstd does the rest.
                                Zipf ids in probability order are ~iid, so nothing beyond an entropy coder helps:
                                the empirical iid entropy is 98 B/row (K=64), int32 stores 107. Tried and
                                dropped: uint16 low + uint8 high parts 105 B (-2%), three byte planes 106 B,
                                ids sorted per row + deltas + uint8 permutation 120 B.
``rank`` (format v2, lossless)  part ``ranks`` uint16 ``[n, K]`` (uint32 past 65,536 distinct ids) and the
                                shard-level part ``dict`` int32 ``[D]``: the shard's distinct ids, most frequent
                                first. Real rows are not iid Zipf draws over the whole vocabulary: they reuse a
                                few thousand ids, so ranks are small. Real-row caches (``bench/storage.py
                                --real``): SmolLM2 (49k vocab) 104 -> 93 B/row, Gemma 3 (262k) 118 -> 91 B/row
                                at K=64; the shard's iid entropy under its own frequencies is 87 B, so an entropy
                                coder (ANS) over the same model would win <= 5%, at a decode cost far from 2M
                                rows/s. Tried on real rows and dropped: ids as references into the previous
                                row's top-K (only 19-20% of ids recur at the next position: 100 B), column-major
                                chunks (no gain), bit shuffle (-0.7 B), zstd level 9 (no gain).

Logprobs (float32 ``[n, K]``, rows sorted descending, ``<= 0``, ``-inf`` allowed):

``fp32`` (lossless)             part ``f32delta`` uint32: the float bit patterns differenced along the row
                                (mod 2**32). For values ``<= 0`` sorted descending the patterns increase, so
                                the deltas are small (156 vs 178 B/row raw); exact for any input, NaN payloads
                                and ``-0.0`` included.
``fp16`` (default)              part ``f16delta`` uint16: the same on float16 bit patterns. Decodes to exactly
                                ``x.astype(float16).astype(float32)`` (``-0.0``, ``-inf`` kept); the delta is
                                worth -30% against raw float16 (50.7 vs 72.7 B/row).
``u8c`` (compact)               parts ``top`` float32 ``[n]`` (the row's first value, kept exactly, clamped to
                                ``<= 0``) and ``codes`` uint8 ``[n, K]`` (row-differenced). Each gap
                                ``g = top - x`` is companded ``u = (1 - exp(-g/s)) / (1 - exp(-G/s))`` and
                                rounded to one of 255 levels (code 255 = ``-inf``), with ``s = scale = 4`` and
                                ``G = max_gap = 32`` (larger gaps clamp to G: relative probability < 1e-14).
                                Differencing the codes along the row: 20.5 vs 36.1 B/row; the exact float32
                                ``top`` costs 1.7 B/row more than a float16 one.

Why this compander: the error that matters is KL(p || q) of the renormalized rows, ~``Var_p(e) / 2`` for
log-domain errors ``e``, so an entry's error counts with its probability ``p ∝ exp(-g)``. Quantization theory
puts the optimal step density at ``(density * weight)**(1/3)``, i.e. steps growing like ``exp(g/3)`` for
roughly uniform gaps; ``s = 4`` measured best (mean KL 1.6e-5 vs 2.2e-5 at s=3, 1.7e-5 at s=5, 3.4e-5 for
mu-law/log, 6.0e-5 for sqrt, 2.1e-4 uniform). Steps are 0.016 nats at the top, 0.1 nats at g = 7.4
(relative probability 6e-4) and 1 nat at g = 16.6 (6e-8). A monotone quantizer keeps decoded rows sorted;
decoded values are ``top - gap_hat <= 0``; the row's first value decodes exactly; reconstructing at the code
(no offset) is optimal. Adversarial rows (all errors near half a step) reach 6.3e-5 per row at K=64, 1.2e-4 at K=256.

Measured (``bench/codec_experiments.py table``) on ``storage.synthetic`` rows: K=64, vocab 262,144, Zipf ids,
power-law logprobs, 131,072 rows; Blosc as ``zarr_compressor_for`` returns, 4096-row chunks (a real Zarr
store with 65,536-row shards measures the same to 0.1 B); targets = target id int32 (1.6 B) + target logprob
float32 (3.6 B). "bf16": logits rounded to bfloat16 before the float32 log-softmax, as teachers with a
bfloat16 ``lm_head`` produce them; the default keeps float32 mantissas random, the pessimistic case. Budgets
(<= 250 B/pos default, <= 175 compact with mean KL <= 1e-4) hold with room. Throughput: logprob
transform + Blosc on one core of a busy 2-core VM (ids alone: Blosc 1.0M rows/s encode, 3.6M decode).

=============  =====  ==============  =======  ======  =======  ========  ========  ========  ========
ids + lp       ids    logprob parts   targets  total   total    mean KL   max KL    encode    decode
codec          B/pos  B/pos (bf16)    B/pos    B/pos   bf16     renorm.   per row   rows/s    rows/s
=============  =====  ==============  =======  ======  =======  ========  ========  ========  ========
int32 + fp32   107.0  156.3 (46.5)    5.2      268.6   158.5    0         0         1.2M      4.3M
int32 + fp16   107.0  50.7 (34.2)     5.2      163.0   146.2    9.2e-8    5.6e-7    1.7M      2.5M
int32 + u8c    107.0  3.6 + 20.4      5.2      136.2   135.4    1.6e-5    5.0e-5    1.0M      1.3M
=============  =====  ==============  =======  ======  =======  ========  ========  ========  ========

Compressors (``bench/codec_experiments.py speed``): Blosc zstd, byte shuffle for multi-byte parts and bit
shuffle for uint8 (byte shuffle beats bit shuffle by 3% on ids and by 14% on bf16-derived fp32), ``clevel=1``
and ``blocksize`` = the whole chunk (1 MiB cap). Whole-chunk blocks buy 3-6% over Blosc's automatic ones;
clevels 3-7 gain at most 2% more, clevel 9 (zstd level 22) 1-6%, but compresses 40-100x slower (4-12 MB/s vs
400-1400 MB/s). Decompression runs at 1-3 GB/s at every level. Parquet (``parquet_write_kwargs``): zstd
level 1 with BYTE_STREAM_SPLIT, which on ``FixedSizeBinary`` K-vectors acts as a byte shuffle (ids 113 vs 129
B/row, fp16 deltas 47 vs 63, u8c codes 20 vs 22 without it); totals 165.7 (fp16), 281.1 (fp32), 142.0 (u8c).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np

from .errors import CacheError

if TYPE_CHECKING:
    from zarr.codecs import BloscCodec

#: Blosc settings for every position part: zstd level 1 over whole-chunk blocks (see the module docstring).
ZARR_CLEVEL = 1
ZARR_BLOCKSIZE = 1 << 20
PARQUET_ZSTD_LEVEL = 1


class UnknownCodecError(CacheError, ValueError):
    """A codec config names a codec this version does not know."""


class IdCodec(Protocol):
    name: str
    lossless: bool

    def encode(self, ids: np.ndarray) -> dict[str, np.ndarray]: ...

    def decode(self, parts: dict[str, np.ndarray], k: int) -> np.ndarray: ...

    def config(self) -> dict[str, Any]: ...


class LogprobCodec(Protocol):
    name: str
    lossless: bool

    def encode(self, logprobs: np.ndarray) -> dict[str, np.ndarray]: ...

    def decode(self, parts: dict[str, np.ndarray], k: int) -> np.ndarray: ...

    def config(self) -> dict[str, Any]: ...


def _rows(a: np.ndarray, dtype: type, what: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 2:
        raise ValueError(f"{what}: expected a 2-D [n, K] array, got shape {a.shape}")
    return np.ascontiguousarray(a, dtype=dtype)


def _part(parts: Mapping[str, np.ndarray], name: str, codec: str, k: int | None, dtype: type) -> np.ndarray:
    if name not in parts:
        raise ValueError(f"codec {codec!r}: missing part {name!r} (have {sorted(parts)})")
    a = np.ascontiguousarray(parts[name], dtype=dtype)
    if k is None:
        return a.reshape(-1)
    if a.ndim != 2 or a.shape[1] != k:
        raise ValueError(f"codec {codec!r}: part {name!r} has shape {a.shape}, expected [n, {k}]")
    return a


def _row_delta(bits: np.ndarray) -> np.ndarray:
    """Differences along each row of an unsigned array (wrapping), first column kept."""
    out = bits.copy()
    np.subtract(bits[:, 1:], bits[:, :-1], out=out[:, 1:])
    return out


def _row_undelta(deltas: np.ndarray) -> np.ndarray:
    return np.cumsum(deltas, axis=1, dtype=deltas.dtype)


class Int32Ids:
    """Token ids as int32, lossless for every int32 value."""

    name: ClassVar[str] = "int32"
    lossless: ClassVar[bool] = True

    def encode(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        a = np.asarray(ids)
        if a.dtype != np.int32 and a.size:
            if a.dtype.kind not in "iu":
                raise ValueError(f"int32 id codec: ids must be integers, got dtype {a.dtype}")
            if a.min() < -(2**31) or a.max() >= 2**31:
                raise ValueError(f"int32 id codec: ids outside the int32 range ({a.min()} .. {a.max()})")
        return {"ids": _rows(a, np.int32, "int32 id codec")}

    def decode(self, parts: dict[str, np.ndarray], k: int) -> np.ndarray:
        return _part(parts, "ids", self.name, k, np.int32)

    def config(self) -> dict[str, Any]:
        return {"name": self.name}


class Fp32Logprobs:
    """Lossless float32: bit patterns differenced along the row."""

    name: ClassVar[str] = "fp32"
    lossless: ClassVar[bool] = True

    def encode(self, logprobs: np.ndarray) -> dict[str, np.ndarray]:
        lp = _rows(logprobs, np.float32, "fp32 logprob codec")
        return {"f32delta": _row_delta(lp.view(np.uint32))}

    def decode(self, parts: dict[str, np.ndarray], k: int) -> np.ndarray:
        return _row_undelta(_part(parts, "f32delta", self.name, k, np.uint32)).view(np.float32)

    def config(self) -> dict[str, Any]:
        return {"name": self.name}


class Fp16Logprobs:
    """float16 values (round to nearest), bit patterns differenced along the row."""

    name: ClassVar[str] = "fp16"
    lossless: ClassVar[bool] = False

    def encode(self, logprobs: np.ndarray) -> dict[str, np.ndarray]:
        lp = _rows(logprobs, np.float32, "fp16 logprob codec")
        with np.errstate(over="ignore"):  # below -65504 is -inf in float16
            half = lp.astype(np.float16)
        return {"f16delta": _row_delta(half.view(np.uint16))}

    def decode(self, parts: dict[str, np.ndarray], k: int) -> np.ndarray:
        return _row_undelta(_part(parts, "f16delta", self.name, k, np.uint16)).view(np.float16).astype(np.float32)

    def config(self) -> dict[str, Any]:
        return {"name": self.name}


class Fp16rLogprobs:
    """float16 rounded to ``10 - drop`` mantissa bits (format v2): the bit patterns shifted right by ``drop``,
    differenced along the row.

    Values are rounded once, from float32 to ``10 - drop`` mantissa bits (nearest, ties away from zero), then
    cast to float16, whose low ``drop`` pattern bits are then zero and are not stored. Rounding is monotone, so
    rows stay sorted; ``-inf`` and ``-0.0`` are kept; below -65504 is ``-inf``, as in ``fp16``. ``drop = 1``
    is still fp16-grade on real rows (``bench/storage.py --real``): mean KL ~8e-7 vs 1.8e-7 for ``fp16``, ~42 vs
    50 B/position (SmolLM2 rows, K = 64); ``drop = 2``: ~35 B, 3e-6.
    """

    name: ClassVar[str] = "fp16r"
    lossless: ClassVar[bool] = False

    def __init__(self, drop: int = 1) -> None:
        if not (isinstance(drop, int) and 0 <= drop <= 6):
            raise ValueError(f"fp16r logprob codec: drop ({drop!r}) must be an integer in [0, 6]")
        self.drop = drop

    def encode(self, logprobs: np.ndarray) -> dict[str, np.ndarray]:
        lp = _rows(logprobs, np.float32, "fp16r logprob codec")
        if self.drop:  # one rounding, float32 -> 10 - drop mantissa bits (half away from zero on the magnitude)
            keep = 13 + self.drop  # float32 mantissa bits to clear
            u = lp.view(np.uint32)
            rounded = ((u + np.uint32(1 << (keep - 1))) & np.uint32(~((1 << keep) - 1) & 0xFFFFFFFF)).view(np.float32)
            lp = np.where(np.isfinite(lp), rounded, lp)  # -inf and NaN as they are
        with np.errstate(over="ignore"):  # below -65504 is -inf in float16
            bits = lp.astype(np.float16).view(np.uint16)
        return {"f16r": _row_delta((bits >> self.drop).astype(np.uint16))}

    def decode(self, parts: dict[str, np.ndarray], k: int) -> np.ndarray:
        bits = _row_undelta(_part(parts, "f16r", self.name, k, np.uint16))
        if self.drop:
            bits = (bits << self.drop).astype(np.uint16)
        return bits.view(np.float16).astype(np.float32)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "drop": self.drop}


class U8cLogprobs:
    """Compact: exact row maximum + uint8 exponentially companded gaps to it (see the module docstring).

    ``scale`` (s) sets how fast the step grows with the gap, ``max_gap`` (G) where codes stop; 255 levels
    (codes 0..254) cover ``[0, G]`` and code 255 is ``-inf``. NaN is stored as ``-inf``.
    """

    name: ClassVar[str] = "u8c"
    lossless: ClassVar[bool] = False
    LEVELS: ClassVar[int] = 254
    NEG_INF: ClassVar[int] = 255

    def __init__(self, scale: float = 4.0, max_gap: float = 32.0) -> None:
        if not (scale > 0 and max_gap > 0 and np.isfinite(scale) and np.isfinite(max_gap)):
            raise ValueError(f"u8c logprob codec: scale ({scale}) and max_gap ({max_gap}) must be finite and > 0")
        self.scale = float(scale)
        self.max_gap = float(max_gap)
        self._norm = -np.expm1(-self.max_gap / self.scale)  # 1 - exp(-G/s)
        u = np.arange(self.LEVELS + 1, dtype=np.float64) / self.LEVELS
        gaps = -self.scale * np.log1p(-u * self._norm)
        gaps[0] = 0.0
        self._gap_lut = np.append(gaps, np.inf).astype(np.float32)  # code -> gap, float32 [256]

    def encode(self, logprobs: np.ndarray) -> dict[str, np.ndarray]:
        lp = _rows(logprobs, np.float32, "u8c logprob codec")
        n, k = lp.shape
        first = lp[:, 0] if k else np.zeros(n, np.float32)
        first = np.where(np.isnan(first), np.float32(-np.inf), first)
        finite = (lp > -np.inf) & (first[:, None] > -np.inf)  # False for -inf and NaN
        with np.errstate(invalid="ignore"):
            gap = np.clip(first[:, None] - lp, 0.0, self.max_gap)  # NaN where not finite
            u = -np.expm1(gap / np.float32(-self.scale)) * np.float32(self.LEVELS / self._norm)
        codes = np.rint(np.where(finite, u, self.NEG_INF)).astype(np.uint8)
        top = np.where(first > 0, np.float32(0), first).astype(np.float32)  # a positive max -> 0, -0.0 kept
        return {"top": top, "codes": _row_delta(codes)}

    def decode(self, parts: dict[str, np.ndarray], k: int) -> np.ndarray:
        codes = _row_undelta(_part(parts, "codes", self.name, k, np.uint8))
        top = _part(parts, "top", self.name, None, np.float32)
        if top.shape[0] != codes.shape[0]:
            raise ValueError(f"codec 'u8c': part 'top' has {top.shape[0]} rows, 'codes' has {codes.shape[0]}")
        return top[:, None] - self._gap_lut[codes]

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "scale": self.scale, "max_gap": self.max_gap}


class RankIds:
    """Lossless: ids replaced by their rank in a per-shard frequency dictionary (format v2).

    Parts: ``ranks`` uint16 ``[n, K]`` (uint32 when the shard uses more than 65,536 distinct ids), and the
    *shard-level* part ``dict`` int32 ``[D]``: the distinct ids of the shard, most frequent first (ties by id).
    Decoding is one gather, ``dict[ranks]``. Real teacher rows put most of their mass on a few thousand ids, so
    ranks are small and skewed, which Blosc's byte shuffle + zstd turns into ~11 bits per id instead of int32's 13
    (docs/benchmarks.md, "Format v2"). Random access costs one extra read per shard (the dictionary, cached).
    """

    name: ClassVar[str] = "rank"
    lossless: ClassVar[bool] = True
    #: parts with one entry per dictionary item, not per row (stored once per shard; docs/format.md)
    shard_parts: ClassVar[tuple[str, ...]] = ("dict",)
    DECODE_ROWS: ClassVar[int] = 4096

    def encode(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        a = np.asarray(ids)
        if a.ndim != 2:
            raise ValueError(f"rank id codec: expected a 2-D [n, K] array, got shape {a.shape}")
        if a.size and (a.dtype.kind not in "iu" or a.min() < 0 or a.max() >= 2**31):
            raise ValueError("rank id codec: ids must be integers in [0, 2**31)")
        if a.size == 0:
            return {"ranks": np.zeros(a.shape, np.uint16), "dict": np.zeros(0, np.int32)}
        step = self.DECODE_ROWS  # slices: no whole-shard intp copies (see decode)
        width = int(a.max()) + 1
        counts = np.zeros(width, np.int64)  # O(n + max id): ids are below the vocabulary size
        for start in range(0, a.shape[0], step):
            counts += np.bincount(a[start : start + step].reshape(-1), minlength=width)
        present = np.flatnonzero(counts)
        table = present[np.lexsort((present, -counts[present]))]  # most frequent first, ties by id
        dtype = np.uint16 if len(table) <= 1 << 16 else np.uint32
        rank_of = np.zeros(width, dtype)
        rank_of[table] = np.arange(len(table), dtype=dtype)
        ranks = np.empty(a.shape, dtype)
        for start in range(0, a.shape[0], step):
            np.take(rank_of, a[start : start + step].astype(np.intp), out=ranks[start : start + step])
        return {"ranks": ranks, "dict": table.astype(np.int32)}

    def decode(self, parts: dict[str, np.ndarray], k: int) -> np.ndarray:
        if "ranks" not in parts or "dict" not in parts:
            raise ValueError(f"codec 'rank': missing part 'ranks' or 'dict' (have {sorted(parts)})")
        ranks = np.asarray(parts["ranks"])
        table = np.ascontiguousarray(parts["dict"], dtype=np.int32).reshape(-1)
        if ranks.ndim != 2 or ranks.shape[1] != k or ranks.dtype.kind != "u":
            raise ValueError(
                f"codec 'rank': part 'ranks' has shape {ranks.shape} {ranks.dtype}, expected [n, {k}] unsigned"
            )
        if ranks.size and int(ranks.max()) >= len(table):
            raise ValueError(
                f"codec 'rank': a rank ({int(ranks.max())}) is outside the dictionary ({len(table)} ids)"
            )
        # in slices: numpy gathers with intp indices, and a whole block's intp copy (8 bytes per id, tens of MB)
        # would be a fresh mmap every call (page faults: 2-3x slower than the gather itself)
        out = np.empty(ranks.shape, np.int32)
        for start in range(0, ranks.shape[0], self.DECODE_ROWS):
            stop = start + self.DECODE_ROWS
            np.take(table, ranks[start:stop].astype(np.intp), out=out[start:stop])
        return out

    def config(self) -> dict[str, Any]:
        return {"name": self.name}


ID_CODECS: dict[str, type] = {Int32Ids.name: Int32Ids, RankIds.name: RankIds}
#: id codecs that need format v2 (schema_version 2): their caches are refused by v1-only readers by version
V2_ID_CODECS = frozenset({RankIds.name})


def shard_parts(codec: Any) -> tuple[str, ...]:
    """Names of a codec's shard-level parts (one array per shard, not per row); empty for row-only codecs."""
    return tuple(getattr(codec, "shard_parts", ()))
LOGPROB_CODECS: dict[str, type] = {c.name: c for c in (Fp16Logprobs, Fp32Logprobs, Fp16rLogprobs, U8cLogprobs)}


def _from_config(kind: str, registry: dict[str, type], cfg: Mapping[str, Any]) -> Any:
    name = cfg.get("name") if isinstance(cfg, Mapping) else None
    if name not in registry:
        raise UnknownCodecError(f"unknown {kind} codec {name!r}; known {kind} codecs: {', '.join(sorted(registry))}")
    params = {key: v for key, v in cfg.items() if key != "name"}
    try:
        return registry[name](**params)
    except TypeError as e:
        raise ValueError(f"{kind} codec {name!r}: bad config {dict(cfg)} ({e})") from e


def id_codec_from_config(cfg: Mapping[str, Any]) -> IdCodec:
    """Rebuild an id codec from its ``config()``; raises ``UnknownCodecError`` for an unknown name."""
    return _from_config("id", ID_CODECS, cfg)


def logprob_codec_from_config(cfg: Mapping[str, Any]) -> LogprobCodec:
    """Rebuild a logprob codec from its ``config()``; raises ``UnknownCodecError`` for an unknown name."""
    return _from_config("logprob", LOGPROB_CODECS, cfg)


def zarr_compressor_for(dtype: np.dtype | type, clevel: int = ZARR_CLEVEL) -> BloscCodec:
    """The Zarr v3 compressor for a position part of this dtype (chunks of ~4096 rows).

    Blosc zstd over whole-chunk blocks; byte shuffle for multi-byte types, bit shuffle for 1-byte ones.
    """
    from zarr.codecs import BloscCodec

    size = np.dtype(dtype).itemsize
    shuffle = "bitshuffle" if size == 1 else "shuffle"
    return BloscCodec(cname="zstd", clevel=clevel, shuffle=shuffle, typesize=size, blocksize=ZARR_BLOCKSIZE)


def parquet_column_options(dtype: np.dtype | type) -> dict[str, Any]:
    """Parquet settings for a position column holding a part of this dtype (1-D flat or ``FixedSizeBinary``)."""
    return {
        "compression": "zstd",
        "compression_level": PARQUET_ZSTD_LEVEL,
        "byte_stream_split": np.dtype(dtype).kind in "iuf",
    }


def parquet_write_kwargs(columns: Mapping[str, np.dtype | type | np.ndarray]) -> dict[str, Any]:
    """Keyword arguments for ``pyarrow.parquet.write_table`` over position columns ``{name: dtype or array}``."""
    opts = {name: parquet_column_options(a.dtype if isinstance(a, np.ndarray) else a) for name, a in columns.items()}
    return {
        "compression": {name: o["compression"] for name, o in opts.items()},
        "compression_level": {name: o["compression_level"] for name, o in opts.items()},
        "use_byte_stream_split": [name for name, o in opts.items() if o["byte_stream_split"]],
        "use_dictionary": False,
        "write_statistics": False,
    }
