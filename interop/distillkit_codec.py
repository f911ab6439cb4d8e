"""DistillKit's logprob compression, decoded (and encoded) exactly as its published code does it.

Reference: arcee-ai/DistillKit, ``distillkit/compression/`` (``config.py``: ``DistributionQuantizationConfig``;
``bitpack.py``: ``pack_to_bytes``/``unpack_from_bytes``; ``monotonic_logprobs.py``: ``compress_/
decompress_monotonic_logprobs``; ``compressor.py``: ``LogprobCompressor``), and ``distillkit/sample_logits_vllm.py``
(the capture: columns ``input_ids`` list<uint64>, ``compressed_logprobs`` and ``bytepacked_indices``
list<list<uint8>>, one row per position 1..n-1 from vLLM's prompt logprobs, ``compression_config.yaml`` beside
the ``data_*.parquet`` files).

A row of ``compressed_logprobs`` is the concatenation of: ``exact_k`` values in ``exact_dtype`` (raw little-endian
bytes), the polynomial coefficients in ``term_dtype``, then per residual bin a scale in ``scale_dtype`` and the bin's
quantized elements bit-packed MSB first; after decoding, ``delta_encoding`` undoes the differences with a float32
cumulative sum. ``bytepacked_indices`` holds the K ids in ``ceil(log2(d))`` bits each, MSB first.

Trade-offs: bit unpacking is done in numpy with unaligned big-endian 64-bit windows (one gather per element, no
per-bit expansion), which is what makes a million positions a second possible; the float arithmetic is done
with torch, in the same dtypes and order as DistillKit (float16/bfloat16 promotion rules included), so the decoded
values are bit-identical to ``LogprobCompressor.decompress_to_sparse``. The encoder (``compress_logprobs``) follows
``compress_monotonic_logprobs`` (naive and error-diffusion quantization, SVD least squares); ``export`` uses it
with an exact float32 config by default, the tests with lossy configs to build fixtures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from logitcache.config import ConfigError

_DTYPES = {"float16": 16, "bfloat16": 16, "float32": 32, "float64": 64}


@dataclass
class QuantBin:
    scale_dtype: str
    element_bits: int
    num_elements: int


@dataclass
class DistillKitConfig:
    """DistillKit's ``DistributionQuantizationConfig`` (field names and defaults as published)."""

    d: int
    k: int
    exact_k: int
    exact_dtype: str = "float32"
    polynomial_terms: list[int | str] | None = None
    term_dtype: str = "float32"
    residual_bins: list[QuantBin] = field(default_factory=list)
    delta_encoding: bool = True
    error_diffusion: bool = False
    normalize_t: bool = False

    @staticmethod
    def from_dict(d: dict[str, Any], source: str = "compression_config.yaml") -> DistillKitConfig:
        try:
            cfg = DistillKitConfig(
                d=int(d["d"]),
                k=int(d["k"]),
                exact_k=int(d["exact_k"]),
                exact_dtype=str(d.get("exact_dtype", "float32")),
                polynomial_terms=[t if isinstance(t, str) else int(t) for t in d["polynomial_terms"]]
                if d.get("polynomial_terms")
                else None,
                term_dtype=str(d.get("term_dtype", "float32")),
                residual_bins=[
                    QuantBin(str(b["scale_dtype"]), int(b["element_bits"]), int(b["num_elements"]))
                    for b in d.get("residual_bins") or []
                ],
                delta_encoding=bool(d.get("delta_encoding", True)),
                error_diffusion=bool(d.get("error_diffusion", False)),
                normalize_t=bool(d.get("normalize_t", False)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{source}: not a DistillKit compression config ({type(e).__name__}: {e})") from e
        for name in [cfg.exact_dtype, cfg.term_dtype, *(b.scale_dtype for b in cfg.residual_bins)]:
            if name not in _DTYPES:
                raise ConfigError(f"{source}: unsupported dtype {name!r} (known: {', '.join(_DTYPES)})")
        for t in cfg.polynomial_terms or []:
            if isinstance(t, str) and t not in ("sqrt", "exp"):
                raise ConfigError(f"{source}: unknown polynomial term {t!r} (known: integers, sqrt, exp)")
        if cfg.k < cfg.exact_k or sum(b.num_elements for b in cfg.residual_bins) > cfg.k - cfg.exact_k:
            raise ConfigError(f"{source}: inconsistent k / exact_k / residual_bins")
        if any(not 1 <= b.element_bits <= 64 for b in cfg.residual_bins):
            raise ConfigError(f"{source}: element_bits must be in [1, 64]")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return {
            "d": self.d,
            "k": self.k,
            "exact_k": self.exact_k,
            "exact_dtype": self.exact_dtype,
            "polynomial_terms": self.polynomial_terms,
            "term_dtype": self.term_dtype,
            "residual_bins": [
                {"scale_dtype": b.scale_dtype, "element_bits": b.element_bits, "num_elements": b.num_elements}
                for b in self.residual_bins
            ],
            "delta_encoding": self.delta_encoding,
            "error_diffusion": self.error_diffusion,
            "normalize_t": self.normalize_t,
        }

    @property
    def index_bits(self) -> int:
        """``ceil(log2(d))`` computed as DistillKit does (float32 log2)."""
        return math.ceil(float(np.log2(np.float32(self.d))))

    def logprob_bytes(self) -> int:
        n = self.exact_k * _DTYPES[self.exact_dtype] // 8
        n += len(self.polynomial_terms or []) * _DTYPES[self.term_dtype] // 8
        for b in self.residual_bins:
            n += _DTYPES[b.scale_dtype] // 8 + (b.num_elements * b.element_bits + 7) // 8
        return n

    def index_bytes(self) -> int:
        return (self.k * self.index_bits + 7) // 8

    @property
    def lossless(self) -> bool:
        """Whether float32 logprobs survive exactly: every value stored exactly in float32/64, no deltas."""
        return self.exact_k == self.k and self.exact_dtype in ("float32", "float64") and not self.delta_encoding


def exact_config(k: int, d: int) -> DistillKitConfig:
    """The lossless config ``export`` writes by default: K exact float32 values, no polynomial, no residuals."""
    return DistillKitConfig(d=d, k=k, exact_k=k, exact_dtype="float32", residual_bins=[], delta_encoding=False)


def vocab_size_for(tokenizer: Any) -> int:
    """DistillKit's ``d`` for a tokenizer: ``max(len(vocab) + 1, max(vocab.values()))`` (sample_logits_vllm.py)."""
    vocab = tokenizer.get_vocab()
    return max(len(vocab) + 1, max(vocab.values()))


# ---- bit packing -----------------------------------------------------------------------------------------------


def unpack_bits(buf: np.ndarray, bits: int, count: int) -> np.ndarray:
    """``unpack_from_bytes``: ``count`` unsigned ``bits``-bit integers per row of ``buf`` (uint8 ``[N, M]``), MSB
    first; returns ``[N, count]`` integers (uint8 for 1, 2, 4 and 8 bits, int32 for 9..25 bits, else int64).

    Whole blocks at once: an element of at most 25 bits lies inside the big-endian 32-bit word that starts at its
    first byte, so one strided gather of those (unaligned) words, a shift and a mask decode every row together;
    wider elements use 64-bit words (`_unpack_windows64`)."""
    n, m = buf.shape
    if count * bits > m * 8:
        raise ValueError(f"{count} elements of {bits} bits need {count * bits} bits, rows hold {m * 8}")
    if count == 0:
        return np.zeros((n, 0), np.int64)
    if 8 % bits == 0:  # 1, 2, 4, 8 bits: elements never straddle a byte; shift whole columns
        per = 8 // bits
        shifts = np.arange(8 - bits, -1, -bits, dtype=np.uint8)
        parts = (buf[:, :, None] >> shifts) & np.uint8((1 << bits) - 1) if per > 1 else buf[:, :, None]
        out = parts.reshape(n, m * per)
        return out[:, :count] if out.shape[1] == count else np.ascontiguousarray(out[:, :count])
    if bits > 57:  # a 64-bit window cannot hold an element that straddles 9 bytes: expand to bits
        flat = np.unpackbits(buf, axis=1)[:, : count * bits].reshape(n, count, bits).astype(np.uint64)
        weights = np.left_shift(np.uint64(1), np.arange(bits - 1, -1, -1, dtype=np.uint64))
        return (flat * weights).sum(axis=2, dtype=np.uint64).astype(np.int64)
    if bits > 25:
        return _unpack_windows64(buf, bits, count)
    padded = np.zeros((n, m + 4), np.uint8)
    padded[:, :m] = buf
    windows = np.ndarray((n, m + 1), dtype=">u4", buffer=padded, strides=(m + 4, 1))  # unaligned BE words
    start = np.arange(count, dtype=np.int64) * bits
    w = windows[:, start // 8].astype(np.uint32)
    np.right_shift(w, (32 - (start % 8) - bits).astype(np.uint32), out=w)
    np.bitwise_and(w, np.uint32((1 << bits) - 1), out=w)
    return w.view(np.int32)


def _unpack_windows64(buf: np.ndarray, bits: int, count: int) -> np.ndarray:
    """`unpack_bits` through 64-bit big-endian windows (any ``bits`` <= 57), as int64."""
    n, m = buf.shape
    padded = np.empty((n, m + 8), np.uint8)
    padded[:, :m] = buf
    padded[:, m:] = 0
    windows = np.ndarray((n, m + 1), dtype=">u8", buffer=padded, strides=(m + 8, 1))  # unaligned BE windows
    start = np.arange(count, dtype=np.int64) * bits
    w = windows[:, start // 8].astype(np.uint64)
    np.right_shift(w, (64 - (start % 8) - bits).astype(np.uint64), out=w)
    np.bitwise_and(w, np.uint64((1 << bits) - 1), out=w)
    return w.view(np.int64)


def pack_bits(x: np.ndarray, bits: int) -> np.ndarray:
    """``pack_to_bytes``: integers ``[N, C]`` (masked to ``bits``) into uint8 ``[N, ceil(C * bits / 8)]``, MSB first.

    Elements are OR-ed into unaligned big-endian words (32-bit up to 25 bits, else 64-bit), in passes over elements
    far enough apart that their words do not overlap (no per-bit expansion)."""
    if bits > 25:
        return _pack_windows64(x, bits)
    x = np.asarray(x).astype(np.uint32) & np.uint32((1 << bits) - 1)
    n, count = x.shape
    m = (count * bits + 7) // 8
    padded = np.zeros((n, m + 4), np.uint8)
    windows = np.ndarray((n, m + 1), dtype=">u4", buffer=padded, strides=(m + 4, 1))
    start = np.arange(count, dtype=np.int64) * bits
    shift = (32 - (start % 8) - bits).astype(np.uint32)
    step = -(-32 // bits)  # elements this far apart start >= 4 bytes apart: their words are disjoint
    for g in range(min(step, count)):
        j = np.arange(g, count, step)
        windows[:, start[j] // 8] |= x[:, j] << shift[j]
    return padded[:, :m].copy()


def _pack_windows64(x: np.ndarray, bits: int) -> np.ndarray:
    """`pack_bits` through 64-bit big-endian windows (any ``bits``; per-bit above 57)."""
    x = np.asarray(x).astype(np.uint64) & np.uint64((1 << bits) - 1)
    n, count = x.shape
    m = (count * bits + 7) // 8
    if bits > 57:
        shifts = np.arange(bits - 1, -1, -1, dtype=np.uint64)
        expanded = ((x[..., None] >> shifts) & np.uint64(1)).astype(np.uint8).reshape(n, -1)
        return np.packbits(expanded, axis=1)
    padded = np.zeros((n, m + 8), np.uint8)
    windows = np.ndarray((n, m + 1), dtype=">u8", buffer=padded, strides=(m + 8, 1))
    start = np.arange(count, dtype=np.int64) * bits
    shift = (64 - (start % 8) - bits).astype(np.uint64)
    step = -(-72 // bits)  # elements this far apart start >= 9 bytes apart: their windows are disjoint
    for g in range(min(step, count)):
        j = np.arange(g, count, step)
        windows[:, start[j] // 8] |= x[:, j] << shift[j]
    return padded[:, :m].copy()


# ---- logprobs ----------------------------------------------------------------------------------------------------


def _torch_dtype(name: str) -> Any:
    import torch

    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
            "float64": torch.float64}[name]


def _view(buf: np.ndarray, name: str, count: int) -> Any:
    """Little-endian raw bytes ``[N, count * size]`` as a torch tensor of dtype ``name`` ``[N, count]``."""
    import torch

    t = torch.from_numpy(np.require(buf, requirements=["C", "W"]))
    return t.view(_torch_dtype(name)).reshape(buf.shape[0], count)


def _terms(terms: list[int | str], t: int, dtype: Any, normalize_t: bool) -> Any:
    """``polynomial_terms`` of monotonic_logprobs.py: the design matrix ``[t, len(terms)]``."""
    import torch

    pts = torch.linspace(0, 1, steps=t, dtype=dtype) if normalize_t else torch.arange(t, dtype=dtype)
    return torch.stack([pts**i if isinstance(i, int) else getattr(torch, i)(pts) for i in terms], dim=-1)


def decompress_logprobs(buf: np.ndarray, cfg: DistillKitConfig) -> np.ndarray:
    """``decompress_monotonic_logprobs(bytes, cfg)`` with ``out_dtype=None``: float32 ``[N, k]`` of the values
    DistillKit's trainer sees (cast from the exact dtype it computes in)."""
    import torch

    if buf.ndim != 2 or buf.shape[1] < cfg.logprob_bytes():
        raise ValueError(f"compressed_logprobs rows hold {buf.shape[-1]} bytes, the config needs {cfg.logprob_bytes()}")
    n = buf.shape[0]
    out_dtype = _torch_dtype(cfg.exact_dtype)
    pos = 0
    if cfg.exact_k > 0:
        nb = cfg.exact_k * _DTYPES[cfg.exact_dtype] // 8
        exact = _view(buf[:, pos : pos + nb], cfg.exact_dtype, cfg.exact_k)
        pos += nb
    else:
        exact = torch.empty((n, 0), dtype=out_dtype)
    coeffs = None
    if cfg.polynomial_terms:
        nt = len(cfg.polynomial_terms)
        nb = nt * _DTYPES[cfg.term_dtype] // 8
        coeffs = _view(buf[:, pos : pos + nb], cfg.term_dtype, nt)
        pos += nb
    residuals = []
    for b in cfg.residual_bins:
        sb = _DTYPES[b.scale_dtype] // 8
        scale = _view(buf[:, pos : pos + sb], b.scale_dtype, 1)
        pos += sb
        pb = (b.num_elements * b.element_bits + 7) // 8
        qi = unpack_bits(buf[:, pos : pos + pb], b.element_bits, b.num_elements)
        pos += pb
        # dequantize(): (q + quant_min) as float32, times the scale (float32 * float16 promotes to float32)
        if b.element_bits == 1:
            residuals.append((torch.from_numpy(qi.astype(np.float32)) * 2.0 - 1.0) * scale)
        elif b.element_bits <= 24:  # small integers are exact in float32: same values without int64 tensors
            residuals.append(torch.from_numpy(qi.astype(np.float32) - np.float32(2 ** (b.element_bits - 1))) * scale)
        else:
            q = torch.from_numpy(qi.astype(np.int64)) + -(2 ** (b.element_bits - 1))
            residuals.append(q.to(torch.float32) * scale)
    approx_terms = cfg.k - cfg.exact_k
    filled = sum(b.num_elements for b in cfg.residual_bins)
    if residuals:
        residual = torch.cat(residuals, dim=-1)
        if filled < approx_terms:
            residual = torch.nn.functional.pad(residual, (0, approx_terms - filled))
    else:
        residual = torch.zeros((n, approx_terms), dtype=out_dtype)
    if coeffs is not None and cfg.polynomial_terms:
        x = _terms(cfg.polynomial_terms, approx_terms, _torch_dtype(cfg.term_dtype), cfg.normalize_t)
        fit = torch.sum(x.to(coeffs.dtype) * coeffs.unsqueeze(-2), dim=-1)
        approx = fit + residual.to(out_dtype)
    else:
        approx = residual.to(out_dtype)
    values = torch.cat([exact.to(out_dtype), approx], dim=-1)
    if cfg.delta_encoding:
        values = torch.cumsum(values.float(), dim=-1).to(out_dtype)
    return values.to(torch.float32).numpy()


def _lstsq(a: Any, b: Any) -> Any:
    import torch

    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    spinv = torch.zeros_like(s)
    spinv[s > 1e-5] = 1 / s[s > 1e-5]
    return vh.transpose(-1, -2) @ (spinv.unsqueeze(-1) * (u.transpose(-1, -2) @ b))


def _quantize(values: Any, b: QuantBin, err: Any) -> tuple[Any, Any, Any]:
    """``quantize_naive`` / ``error_diffuse_and_quantize`` (``err`` not None: error diffusion)."""
    import torch

    max_abs = torch.amax(torch.abs(values), dim=-1, keepdim=True)
    max_q = 1.0 if b.element_bits == 1 else 2 ** (b.element_bits - 1)
    scale = torch.where(max_abs == 0, torch.ones_like(max_abs), max_abs / max_q)
    scale = scale.to(_torch_dtype(b.scale_dtype)).to(values.dtype)
    scaled = values / scale
    qmin, qmax = (0, 1) if b.element_bits == 1 else (-(2 ** (b.element_bits - 1)), 2 ** (b.element_bits - 1) - 1.0)
    if err is None:
        q = (torch.round(scaled).clamp(qmin, qmax) - qmin).to(torch.long)
        return scale, q, None
    q = torch.zeros_like(scaled, dtype=torch.long)
    for i in range(scaled.shape[-1]):
        cur = scaled[..., i] + err
        qi = torch.clamp(torch.round(cur), qmin, qmax)
        err = cur - qi
        q[..., i] = (qi - qmin).to(torch.long)
    return scale, q, err


def compress_logprobs(logprobs: np.ndarray, cfg: DistillKitConfig) -> np.ndarray:
    """``compress_monotonic_logprobs``: float32 ``[N, k]`` sorted descending -> uint8 ``[N, logprob_bytes]``."""
    import torch

    lp = torch.from_numpy(np.ascontiguousarray(logprobs, dtype=np.float32))
    n = lp.shape[0]
    if cfg.delta_encoding:
        work = lp.to(torch.float64) if cfg.error_diffusion else lp
        deltas = torch.cat([lp[..., :1].to(work.dtype), work[..., 1:] - work[..., :-1]], dim=-1)
        if cfg.error_diffusion:
            out = torch.zeros_like(deltas, dtype=torch.float32)
            e = torch.zeros_like(deltas[..., 0])
            for i in range(deltas.shape[-1]):
                cur = deltas[..., i] + e
                q = cur.to(torch.float32)
                e = cur - q.to(torch.float64)
                out[..., i] = q
            lp = out
        else:
            lp = deltas.to(torch.float32)
    chunks = []
    if cfg.exact_k > 0:
        chunks.append(lp[..., : cfg.exact_k].to(_torch_dtype(cfg.exact_dtype)).contiguous().view(torch.uint8)
                      .reshape(n, -1))
    if cfg.polynomial_terms:
        vals = lp[..., cfg.exact_k : cfg.k]
        x = _terms(cfg.polynomial_terms, vals.shape[-1], torch.float32, cfg.normalize_t).unsqueeze(0)
        coeffs = _lstsq(x, vals.unsqueeze(-1)).squeeze(-1).to(_torch_dtype(cfg.term_dtype))
        approx = torch.sum(x.to(coeffs.dtype) * coeffs.unsqueeze(-2), dim=-1).to(torch.float32)
        residual = vals - approx
        chunks.append(coeffs.contiguous().view(torch.uint8).reshape(n, -1))
    else:
        residual = lp[..., cfg.exact_k : cfg.k]
    cur, err = 0, (torch.zeros(n, dtype=residual.dtype) if cfg.error_diffusion else None)
    for b in cfg.residual_bins:
        scale, q, err = _quantize(residual[..., cur : cur + b.num_elements], b, err)
        chunks.append(scale.to(_torch_dtype(b.scale_dtype)).contiguous().view(torch.uint8).reshape(n, -1))
        chunks.append(torch.from_numpy(pack_bits(q.numpy(), b.element_bits)))
        cur += b.num_elements
    return torch.cat(chunks, dim=-1).numpy() if chunks else np.zeros((n, 0), np.uint8)
