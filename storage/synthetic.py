"""Synthetic teacher top-K rows for measuring codecs and backends without a model.

``synthetic_rows`` imitates what stage one records for a 262k-vocabulary teacher:

* **ids**: K distinct token ids per row, drawn from a Zipf law (exponent ``zipf_a``, default 1.1) over the
  vocabulary with id = frequency rank, as in BPE vocabularies where merges of frequent strings get small ids.
  A repeated id is redrawn in place (close to weighted sampling without replacement), so frequent tokens are
  common in every row but a row's order is unrelated to id order.
* **logprobs**: per row a power law ``z_r = -alpha * ln(r)`` over the ranks of a notional full vocabulary (alpha
  uniform in [1.15, 3.2]) whose spacings ``z_r - z_{r+1}`` are jittered by Exponential(1) factors (the
  spacings of order statistics), and on half of the rows an extra top-1 margin (exponential, mean 2 nats) for
  confident positions. The log-softmax uses the exact top-K terms plus an integral estimate of the remaining
  ``vocab - K`` terms, so ``sum(exp(row)) < 1``. With K=64: top-1 probability 0.18 / 0.67 / 0.998 (5th
  percentile / median / 95th), tail mass beyond the top-64 1e-5 / 1.5e-3 / 0.2.
* **targets** (``synthetic_targets``): the realized next token, sampled from the row's distribution; with
  probability equal to the tail mass it is a token outside the top-K (a Zipf id not in the row) whose logprob is
  below the row's last one.

``synthetic_records`` packs such rows into whole cached sequences (benches of storage and the loader).

Everything is vectorized numpy: about 5 s per million rows of K=64 on one (busy) core. Meant for K much
smaller than the vocabulary (redrawing repeats slows down as K approaches it).
"""

from __future__ import annotations

import numpy as np

from .records import PositionRows, SequenceRecord

_TABLES: dict[tuple[int, float], np.ndarray] = {}
_TABLE_BITS = 20


def _zipf_edges(vocab: int, a: float) -> np.ndarray:
    """Inverse-CDF table: bucket ``b`` of ``2**20`` equal-probability buckets covers ids ``e[b] .. e[b+1]``."""
    key = (vocab, a)
    if key not in _TABLES:
        cdf = np.cumsum(np.arange(1, vocab + 1, dtype=np.float64) ** -a)
        cdf /= cdf[-1]
        grid = np.arange((1 << _TABLE_BITS) + 1, dtype=np.float64) / (1 << _TABLE_BITS)
        edges = np.minimum(np.searchsorted(cdf, grid, side="right"), vocab - 1).astype(np.int32)
        _TABLES[key] = edges
    return _TABLES[key]


def _zipf_draws(rng: np.random.Generator, shape: tuple[int, ...], vocab: int, a: float) -> np.ndarray:
    edges = _zipf_edges(vocab, a)
    x = rng.integers(0, 1 << 32, size=shape, dtype=np.uint32)
    b = x >> np.uint32(32 - _TABLE_BITS)
    lo = edges[b]
    frac = x & np.uint32((1 << (32 - _TABLE_BITS)) - 1)
    return lo + ((frac * (edges[b + 1] - lo + 1).astype(np.uint32)) >> np.uint32(32 - _TABLE_BITS)).astype(np.int32)


def _distinct_zipf(rng: np.random.Generator, n: int, k: int, vocab: int, a: float) -> np.ndarray:
    """``[n, k]`` int32: per row k distinct Zipf ids; a repeated id is redrawn in place until none is left."""
    out = np.empty((n, k), np.int32)
    pos = np.arange(k, dtype=np.int64)
    bits = max(1, (k - 1).bit_length())
    for start in range(0, n, 32768):
        ids = out[start : start + 32768]
        ids[...] = _zipf_draws(rng, ids.shape, vocab, a)
        rows = np.arange(ids.shape[0])
        while rows.size:
            key = (ids[rows].astype(np.int64) << bits) | pos  # sort by id, ties by slot: the first one survives
            key.sort(axis=1)
            r, c = np.nonzero((key[:, 1:] >> bits) == (key[:, :-1] >> bits))
            if r.size == 0:
                break
            ids[rows[r], key[r, c + 1] & ((1 << bits) - 1)] = _zipf_draws(rng, (r.size,), vocab, a)
            rows = rows[np.unique(r)]
    return out


def _round_bf16(x: np.ndarray) -> np.ndarray:
    """Round float32 to the nearest bfloat16 (ties to even), returned as float32."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    u = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return u.view(np.float32)


def synthetic_rows(
    n: int,
    k: int = 64,
    vocab: int = 262144,
    seed: int = 0,
    zipf_a: float = 1.1,
    bf16_logits: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Realistic top-K rows: ``(ids int32 [n, k], logprobs float32 [n, k])``, rows sorted by descending logprob.

    Ids are distinct within a row and lie in ``[0, vocab)``; logprobs are finite, ``< 0`` and their
    exponentials sum to less than one (up to float32 rounding). Deterministic for a given ``seed``.
    ``bf16_logits=True`` imitates teachers whose logits come out of a bfloat16 ``lm_head``: the logits (top
    one between 12 and 30) are rounded to bfloat16 before the float32 log-softmax, so a row's logprobs differ
    by multiples of coarse steps and the fp32 mantissas are no longer noise (the default keeps them noise,
    which is the pessimistic case for compression).
    """
    if not 1 <= k <= vocab:
        raise ValueError(f"need 1 <= k ({k}) <= vocab ({vocab})")
    rng = np.random.default_rng(seed)
    ids = _distinct_zipf(rng, n, k, vocab, zipf_a)

    # logits z_r = -alpha ln r built from their spacings, each scaled by an Exponential(1) factor (order
    # statistics of a smooth density have roughly exponential spacings), so rows come out sorted without a sort
    alpha = rng.uniform(1.15, 3.2, size=(n, 1)).astype(np.float32)
    spacing = np.log(np.arange(2, k + 1, dtype=np.float32) / np.arange(1, k, dtype=np.float32))
    z = np.empty((n, k), np.float32)
    z[:, 0] = rng.exponential(2.0, size=n) * (rng.random(n) < 0.5)  # extra margin on confident positions
    np.cumsum(-(alpha * spacing) * rng.standard_exponential((n, k - 1), dtype=np.float32), axis=1, out=z[:, 1:])
    off = rng.uniform(12.0, 30.0, size=n).astype(np.float32) if bf16_logits else np.zeros(n, np.float32)
    if bf16_logits:
        z = _round_bf16(z + off[:, None])
    # the notional rest of the vocabulary: sum_{r=k+1}^{vocab} r^-alpha ~ integral_{k+1/2}^{vocab+1/2} x^-alpha dx
    a1 = alpha[:, 0].astype(np.float64) - 1.0
    lo, hi = k + 0.5, vocab + 0.5
    tail_sum = (lo**-a1 - hi**-a1) / a1
    lse = off + np.log(np.exp(z - off[:, None]).sum(axis=1, dtype=np.float64) + tail_sum)
    logprobs = z - lse.astype(np.float32)[:, None]
    np.minimum(logprobs, -np.float32(1e-7), out=logprobs)
    return ids, logprobs


def synthetic_targets(
    ids: np.ndarray, logprobs: np.ndarray, vocab: int = 262144, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Realized next tokens for rows from ``synthetic_rows``: ``(target_ids int32 [n], target_logprobs f32 [n])``."""
    rng = np.random.default_rng(seed + 1)
    n, k = ids.shape
    p = np.exp(logprobs.astype(np.float64))
    cum = np.cumsum(p, axis=1)
    u = rng.random(n)
    j = (cum < u[:, None]).sum(axis=1)  # == k when the draw falls in the tail
    inside = j < k
    jj = np.minimum(j, k - 1)
    t_ids = ids[np.arange(n), jj].copy()
    t_lp = logprobs[np.arange(n), jj].copy()
    out = ~inside
    if out.any():
        cand = _distinct_zipf(rng, int(out.sum()), 1, vocab, 1.1)[:, 0]
        clash = (ids[out] == cand[:, None]).any(axis=1)
        cand[clash] = (cand[clash] + k) % vocab  # crude but keeps it outside the row in practice
        t_ids[out] = cand
        t_lp[out] = logprobs[out, -1] - rng.exponential(1.5, size=int(out.sum())).astype(np.float32)
    return t_ids.astype(np.int32), t_lp.astype(np.float32)


def synthetic_records(
    positions: int, k: int = 64, vocab: int = 262144, seq_len: int = 512, prompt_len: int = 16, seed: int = 0
) -> list[SequenceRecord]:
    """Sequences of ``seq_len`` loss-span rows from :func:`synthetic_rows` (the last one shorter), for benches.

    Each record's completion tokens are the rows' realized targets (row ``p`` predicts token ``p + 1``), its
    prompt ``prompt_len`` random ids; texts are placeholders (one byte per token) with matching byte offsets.
    """
    ids, lps = synthetic_rows(positions, k=k, vocab=vocab, seed=seed)
    t_ids, t_lps = synthetic_targets(ids, lps, vocab=vocab, seed=seed)
    rng = np.random.default_rng(seed)
    records: list[SequenceRecord] = []
    for sid, start in enumerate(range(0, positions, seq_len)):
        stop = min(positions, start + seq_len)
        tokens = np.concatenate([rng.integers(0, vocab, prompt_len), t_ids[start:stop]]).astype(np.int32)
        records.append(
            SequenceRecord(
                sample_id=sid,
                source_id=f"doc-{sid}",
                prompt_text="p" * prompt_len,
                completion_text="c" * (stop - start),
                token_ids=tokens,
                token_byte_offsets=np.arange(len(tokens)),
                prompt_len=prompt_len,
                finish_reason="length",
                rows=PositionRows(ids[start:stop], lps[start:stop], t_ids[start:stop], t_lps[start:stop]),
            )
        )
    return records
