"""The loader's content checks: what ``train`` refuses to use of a shard, checked when the shard is read.

A cache written by a buggy writer (or doctored and resealed with fresh checksums) passes ``--verify checksums``;
before this module such rows trained silently (NaN or positive logprobs, unsorted rows, ids outside the
vocabulary) or ended in a traceback deep in a loss (a ``prompt_len`` that disagrees with the row count, teacher
ids outside a same-vocabulary student's logits). ``read_checked_shard`` reads one cache shard and its alignment
records and checks, per shard and vectorized (one reduction per field over the decoded arrays, no per-sequence
Python): the sequence table (``row_count == len(token_ids) - prompt_len``, rows contiguous, token ids in
``[0, vocab)``), the rows (top-k and target ids in ``[0, vocab)``, logprobs not NaN and ``<= 0``, top-k rows
sorted descending, recorded lse not NaN, tail draws in range, outside
their row's top-K, logprobs ``<= 0``), and the alignment records (one per sequence in the cache's order,
student ids in the student's vocabulary, pairs and chunks inside both sides' row counts and on the same bytes).
With a student of the teacher's vocabulary (``kl``/``rkl``), teacher top-k ids must also index its logits.

A problem stops the run with one line (``CorruptCacheError``) naming the shard, the sample, the field and the fix
(``logitcache verify CACHE --level full``). The checks cost a few passes over the decoded arrays per shard, on the
read-ahead thread (numpy releases the GIL); ``bench/loader.py`` measures them (docs/decisions.md, stage three).

The alignment is also checked against the cache's byte offsets, vectorized: each pair joins two rows whose
tokens start at the same completion byte, each chunk's two sides start and end at the same bytes (a moved chunk
boundary, which keeps every index in range, shows here). What stays with ``verify --level full``: the offsets
themselves against the text, chunks tiling the rows, pairs strictly increasing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from logitcache.storage import LogitCache, PositionRows, SequenceRecord
from logitcache.storage.alignment_store import AlignmentRecord, AlignmentStore
from logitcache.storage.errors import CorruptCacheError

__all__ = ["StudentLimits", "read_checked_shard"]

BLOCK_ROWS = 65536  # as LogitCache.iter_shard


@dataclass(frozen=True)
class StudentLimits:
    """What the student model can index: ``vocab`` rows of embeddings and logits (None: unchecked); with
    ``same_vocab`` (a ``kl``/``rkl`` run) the losses index its logits with the teacher's top-k ids too."""

    vocab: int | None = None
    same_vocab: bool = False


def _fail(cache: LogitCache, where: str, sample_id: int | None, what: str) -> CorruptCacheError:
    sample = f" sample {sample_id}:" if sample_id is not None else ""
    return CorruptCacheError(
        f"{where}:{sample} {what}; the cache's content is damaged (its checksums can be fresh: a faulty writer); "
        f"run `logitcache verify {cache.loc.url} --level full` and regenerate or realign what it names"
    )


def _list(table: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    col = table.column(name).combine_chunks()
    return np.asarray(col.values.to_numpy(zero_copy_only=False)), np.asarray(col.offsets.to_numpy(), np.int64)


def _outside(values: np.ndarray, limit: int) -> int:
    """Index of the first value outside ``[0, limit)``, or -1 (one unsigned max pass in the common case)."""
    if values.size == 0:
        return -1
    u = values.view(np.uint32) if values.dtype == np.int32 else values.astype(np.int64).view(np.uint64)
    if int(u.max()) < limit:
        return -1
    return int(np.flatnonzero(u >= limit)[0])


def _check_table(cache: LogitCache, index: int, table: pa.Table, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Row ranges, counts and token ids of one sequence table; returns (row starts, sample ids)."""
    sids = table.column("sample_id").to_numpy()
    starts = table.column("row_start").to_numpy().astype(np.int64)
    counts = table.column("row_count").to_numpy().astype(np.int64)
    plens = table.column("prompt_len").to_numpy().astype(np.int64)
    ids, offsets = _list(table, "token_ids")
    lens = np.diff(offsets)
    bad = np.flatnonzero((plens < 0) | (plens > lens) | (counts != lens - plens))
    if bad.size:
        i = int(bad[0])
        raise _fail(cache, where, int(sids[i]), f"row_count {counts[i]} != len(token_ids) {lens[i]} - prompt_len "
                    f"{plens[i]}")
    expected = np.concatenate([[0], np.cumsum(counts)[:-1]]) if len(counts) else counts
    bad = np.flatnonzero(starts != expected)
    if bad.size:
        i = int(bad[0])
        raise _fail(cache, where, int(sids[i]), f"row_start {starts[i]} != {expected[i]} (rows not contiguous)")
    total, positions = int(counts.sum()), cache._info(index).positions
    if total != positions:
        raise _fail(cache, where, None, f"the sequences hold {total} rows but the shard {positions}")
    j = _outside(ids, cache.vocab_size)
    if j >= 0:
        i = int(np.searchsorted(offsets, j, "right") - 1)
        raise _fail(cache, where, int(sids[i]), f"token_ids value {ids[j]} outside [0, {cache.vocab_size})")
    return starts, sids


def _check_rows(
    cache: LogitCache, rows: PositionRows, first: int, starts: np.ndarray, sids: np.ndarray, where: str,
    limits: StudentLimits,
) -> None:  # fmt: skip
    """Rows ``[first, first + rows.n)`` of the shard; on a problem, name the sequence holding the first bad row."""

    def fail(row: int, what: str) -> CorruptCacheError:
        i = int(np.searchsorted(starts, first + row, "right") - 1)
        return _fail(cache, where, int(sids[i]), f"{what} (row {first + row - int(starts[i])} of the sequence)")

    vocab, k = cache.vocab_size, max(rows.k, 1)
    for name, values, limit in (("topk_ids", rows.topk_ids, vocab), ("target_ids", rows.target_ids, vocab)):
        flat = values.reshape(-1)
        j = _outside(flat, limit)
        if j >= 0:
            raise fail(j // k if name == "topk_ids" else j, f"{name} value {flat[j]} outside [0, {limit})")
    if limits.same_vocab and limits.vocab is not None and limits.vocab < vocab:
        j = _outside(rows.topk_ids.reshape(-1), limits.vocab)
        if j >= 0:
            raise fail(j // k, f"topk_ids value {rows.topk_ids.reshape(-1)[j]} outside the student's vocabulary "
                       f"[0, {limits.vocab}) (--loss kl/rkl index the student's logits with teacher ids)")
    lps = rows.topk_logprobs
    for name, values in (("topk_logprobs", lps), ("target_logprobs", rows.target_logprobs)):
        if values.size and not values.max() <= 0:  # NaN propagates through max: one pass for both
            bad = np.flatnonzero(~(values.reshape(len(values), -1) <= 0).all(axis=1))
            raise fail(int(bad[0]), f"{name} NaN or positive (logprobs must be <= 0)")
    if lps.shape[1] > 1 and lps.size:
        flat = lps.reshape(-1)  # one contiguous comparison (3x faster than per-row slices), row boundaries masked
        up = flat[1:] > flat[:-1]
        up[k - 1 :: k] = False
        if up.any():
            raise fail(int(np.flatnonzero(up)[0]) // k, "topk_logprobs not sorted descending")
    for tau, lse in rows.extra_lse.items():
        nan = np.isnan(lse)
        if nan.any():
            raise fail(int(np.flatnonzero(nan)[0]), f"lse@{tau:g} NaN")
    tail = rows.tail_problem(vocab)
    if tail is not None:
        raise fail(*tail)
    if rows.tail_ids is not None and rows.tail_ids.size and limits.same_vocab and limits.vocab is not None:
        bad = np.flatnonzero((rows.tail_ids >= limits.vocab).any(axis=1))
        if bad.size:
            raise fail(int(bad[0]), f"tail_ids value outside the student's vocabulary [0, {limits.vocab})")


def _check_alignments(
    cache: LogitCache, store: AlignmentStore, index: int, table: pa.Table, sids: np.ndarray, limits: StudentLimits
) -> None:
    """The store's records of shard ``index``: one per sequence in order, ids and row indices in range."""
    cols = store.columns(index)
    where = f"alignments/{store.key}/shards/{cache._info(index).name}"
    a_sids = cols.scalars["sample_id"]
    if cols.n != len(sids) or not np.array_equal(a_sids, sids):
        raise _fail(cache, where, None, f"its {cols.n} records are not the cache shard's {len(sids)} sequences in "
                    "order")
    ids, id_off = cols.lists["student_token_ids"]
    plen = cols.scalars["student_prompt_len"].astype(np.int64)
    n_ids = np.diff(id_off)
    bad = np.flatnonzero((plen < 0) | (plen > n_ids))
    if bad.size:
        i = int(bad[0])
        raise _fail(cache, where, int(sids[i]), f"student_prompt_len {plen[i]} outside [0, {n_ids[i]}]")
    if limits.vocab is not None:
        j = _outside(ids, limits.vocab)
        if j >= 0:
            i = int(np.searchsorted(id_off, j, "right") - 1)
            raise _fail(cache, where, int(sids[i]), f"student_token_ids value {ids[j]} outside the student's "
                        f"vocabulary [0, {limits.vocab})")
    nt = table.column("row_count").to_numpy().astype(np.int64)
    n_s = n_ids - plen
    ns = n_s + int(bool(store.header.get("student_end_row", True)))
    s_vals, s_off = cols.lists["student_offsets"]
    bad = np.flatnonzero(np.diff(s_off) != n_s)
    if bad.size:
        i = int(bad[0])
        raise _fail(cache, where, int(sids[i]), f"{np.diff(s_off)[i]} student_offsets for {n_s[i]} student completion "
                    "tokens")
    # byte where each row's token starts, relative to the completion; a row index at the end gives the completion's
    # length (padded arrays keep every such index in bounds: the value there is replaced)
    t_vals, t_off = _list(table, "token_byte_offsets")
    t_vals = np.append(t_vals.astype(np.int64, copy=False), [0, 0])
    s_vals = np.append(s_vals.astype(np.int64, copy=False), [0, 0])
    t_first = t_off[:-1] + table.column("prompt_len").to_numpy().astype(np.int64)  # row 0's token, per sequence
    pbytes = pc.binary_length(table.column("prompt_text")).to_numpy().astype(np.int64)
    nbytes = pc.binary_length(table.column("completion_text")).to_numpy().astype(np.int64)
    for name, width in (("pairs", 2), ("chunks", 4)):
        values, off = cols.lists[name]
        if off[-1] - off[0] == 0:
            continue
        v = values[off[0] : off[-1]].reshape(-1, width)
        rec = np.repeat(np.arange(cols.n), np.diff(off) // width)
        t_rows, s_rows, end = nt[rec], ns[rec], nbytes[rec]
        strict = int(name == "pairs")  # pairs index rows (< n); chunk bounds are row boundaries (<= n)
        t_max, s_max = t_rows - strict, s_rows - strict
        bad = np.zeros(len(v), bool)
        for c in range(width):  # one column at a time (1-D passes); a negative value wraps to a huge unsigned one
            bad |= v[:, c].view(np.uint32) > (t_max if c < width // 2 else s_max)
        if bad.any():
            r = int(np.flatnonzero(bad)[0])
            i = int(rec[r])
            raise _fail(cache, where, int(sids[i]), f"{name} entry {v[r].tolist()} outside teacher rows [0, {nt[i]}) "
                        f"x student rows [0, {ns[i]})")
        t_base, s_base, s_n = t_first[rec], s_off[rec], n_s[rec]
        t_shift = end + pbytes[rec]  # the end value, before the prompt's bytes are taken off
        for c in range(width // 2):
            t_col, s_col = v[:, c], v[:, width // 2 + c]
            tb = np.where(t_col < t_rows, t_vals[t_base + t_col], t_shift)  # absolute bytes (+ prompt bytes)
            sb = np.where(s_col < s_n, s_vals[s_base + s_col], end)
            bad |= tb - t_shift + end != sb
        if bad.any():
            r = int(np.flatnonzero(bad)[0])
            i = int(rec[r])
            half = width // 2
            t_at = [int(t_vals[t_first[i] + x] - pbytes[i]) if x < nt[i] else int(nbytes[i]) for x in v[r, :half]]
            s_at = [int(s_vals[s_off[i] + x]) if x < n_s[i] else int(nbytes[i]) for x in v[r, half:]]
            raise _fail(cache, where, int(sids[i]), f"{name} entry {v[r].tolist()} joins teacher bytes {t_at} with "
                        f"student bytes {s_at} (the store disagrees with the cache's byte offsets)")


def read_checked_shard(
    cache: LogitCache, store: AlignmentStore, index: int, limits: StudentLimits
) -> tuple[list[SequenceRecord], dict[int, AlignmentRecord]]:
    """Shard ``index``'s records (as ``LogitCache.iter_shard`` reads them) and alignments, after the checks."""
    where = cache._info(index).name
    table = cache.sequence_table(index)
    starts, sids = _check_table(cache, index, table, where)
    _check_alignments(cache, store, index, table, sids, limits)
    records = list(
        cache.iter_shard(
            index, BLOCK_ROWS, on_block=lambda block, s: _check_rows(cache, block, s, starts, sids, where, limits)
        )
    )
    aligned = {a.sample_id: a for a in store.iter_shard(index)}
    return records, aligned
