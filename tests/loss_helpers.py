"""Shared builders for the loss tests: random sequences with their FULL teacher distributions (so dense
references can be written from the formulas) and the sparse batch the losses see.

The batch is built the way training builds it: each sequence becomes an ``Example`` (the teacher's top-K rows
as the cache's ``PositionRows``, float32 like the cache; the student's targets behind a one-token prompt), the
examples go through ``collate``, and ``distill_batch`` gathers the student's rows out of per-position logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from logitcache.distill.batch import CollatedBatch, Example, collate, distill_batch
from logitcache.distill.losses import DistillBatch
from logitcache.storage import PositionRows


@dataclass
class Seq:
    """One sequence: full teacher log-distributions [Tt, Vt] (at tau 1), student logits [Ts, Vs]."""

    teacher_full: Tensor
    teacher_logits: Tensor
    student_logits: Tensor
    student_targets: Tensor
    teacher_targets: Tensor
    pairs: Tensor
    chunks: Tensor
    extra: dict = field(default_factory=dict)


def monotone_pairs(tt: int, ts: int, g: torch.Generator) -> Tensor:
    """Strictly monotone (i, j) pairs that always include (0, 0) and the shared end (tt-1, ts-1)."""
    n = min(tt, ts)
    if n == 0:
        return torch.zeros(0, 2, dtype=torch.long)
    m = int(torch.randint(1, n + 1, (1,), generator=g))
    ti = torch.sort(torch.randperm(max(tt - 1, 1), generator=g)[: m - 1]).values if tt > 1 else torch.zeros(0)
    sj = torch.sort(torch.randperm(max(ts - 1, 1), generator=g)[: m - 1]).values if ts > 1 else torch.zeros(0)
    k = min(len(ti), len(sj))
    pairs = torch.stack([ti[:k], sj[:k]], 1).long()
    pairs = torch.cat([pairs, torch.tensor([[tt - 1, ts - 1]])])
    pairs = torch.unique(pairs, dim=0)
    # keep strict monotonicity in both coordinates
    keep = [0]
    for r in range(1, len(pairs)):
        if pairs[r, 0] > pairs[keep[-1], 0] and pairs[r, 1] > pairs[keep[-1], 1]:
            keep.append(r)
    return pairs[keep]


def chunk_partition(tt: int, ts: int, g: torch.Generator) -> Tensor:
    """C consecutive non-empty chunks covering [0, tt) and [0, ts)."""
    c = int(torch.randint(1, min(tt, ts) + 1, (1,), generator=g)) if min(tt, ts) else 0
    if c == 0:
        return torch.zeros(0, 4, dtype=torch.long)

    def cuts(t: int) -> list[int]:
        inner = torch.sort(torch.randperm(t - 1, generator=g)[: c - 1] + 1).values.tolist() if t > 1 else []
        return [0, *inner, t]

    a, b = cuts(tt), cuts(ts)
    return torch.tensor([[a[i], a[i + 1], b[i], b[i + 1]] for i in range(c)], dtype=torch.long)


def make_seq(
    tt: int,
    ts: int,
    vt: int,
    vs: int,
    g: torch.Generator,
    dtype: torch.dtype = torch.float64,
    t_scale: float = 2.0,
    s_scale: float = 1.5,
) -> Seq:
    tl = torch.randn(tt, vt, generator=g, dtype=dtype) * t_scale
    sl = torch.randn(ts, vs, generator=g, dtype=dtype) * s_scale
    return Seq(
        teacher_full=torch.log_softmax(tl, -1),
        teacher_logits=tl,
        student_logits=sl,
        student_targets=torch.randint(0, vs, (ts,), generator=g),
        teacher_targets=torch.randint(0, vt, (tt,), generator=g),
        pairs=monotone_pairs(tt, ts, g),
        chunks=chunk_partition(tt, ts, g),
    )


def example_of(s: Seq, k: int, taus: tuple[float, ...] = (), sample_id: int = 0) -> Example:
    """The cache's view of a sequence: top-K rows (padded with id 0 / -inf when K > Vt), lse at (1, *taus)."""
    tt, vt = s.teacher_full.shape
    kk = min(k, vt)
    lp, ids = s.teacher_full.sort(-1, descending=True)
    lp, ids = lp[:, :kk], ids[:, :kk]
    if k > kk:
        lp = torch.cat([lp, torch.full((tt, k - kk), float("-inf"), dtype=lp.dtype)], 1)
        ids = torch.cat([ids, torch.zeros(tt, k - kk, dtype=ids.dtype)], 1)
    lse = {tau: torch.logsumexp(s.teacher_logits / tau, -1).numpy() for tau in (1.0, *taus)} if taus else {}
    rows = PositionRows(
        topk_ids=ids.numpy(),
        topk_logprobs=lp.numpy(),
        target_ids=s.teacher_targets.numpy(),
        target_logprobs=s.teacher_full.gather(1, s.teacher_targets[:, None])[:, 0].numpy(),
        extra_lse=lse,
    )
    targets = s.student_targets.numpy().astype(np.int64)
    return Example(
        sample_id=sample_id,
        input_ids=np.concatenate([[0], targets]),  # a one-token prompt: student row j sits at position j
        prompt_len=1,
        targets=targets,
        teacher=rows,
        pairs=s.pairs.numpy().astype(np.int64).reshape(-1, 2),
        chunks=s.chunks.numpy().astype(np.int64).reshape(-1, 4),
        teacher_token_ids=np.zeros(0, np.int64),
        teacher_prompt_len=0,
    )


def collate_seqs(seqs: list[Seq], k: int, taus: tuple[float, ...] = ()) -> CollatedBatch:
    temps = [1.0, *taus] if taus else []
    return collate([example_of(s, k, taus, i) for i, s in enumerate(seqs)], pad_id=0, k=k, temperatures=temps)


def forward_logits(seqs: list[Seq], batch: CollatedBatch) -> Tensor:
    """What a student forward would return for ``batch``: [B, logits_to_keep, V], each sequence's logits at the
    input positions of its rows (zeros elsewhere)."""
    first = batch.first_position
    v = seqs[0].student_logits.shape[1]
    z = torch.zeros(len(seqs), batch.logits_to_keep, v, dtype=seqs[0].student_logits.dtype)
    for b, s in enumerate(seqs):
        pos = batch.row_positions[b, : s.student_logits.shape[0]] - first
        z[b, pos] = s.student_logits
    return z


def make_batch(
    seqs: list[Seq], k: int, same_vocab: bool = False, grad: bool = True, taus=(2.0,)
) -> DistillBatch:
    """The ``DistillBatch`` the losses see, built as training builds it (``collate`` + ``distill_batch``).

    ``taus``: the recorded ``logsumexp(logits / tau)`` (1.0 added), by default what a default capture records
    (tau = 1, 2: ``mlot``'s tau_SD); ``()`` for a cache without row statistics.

    ``grad``: the student logits require grad, and ``batch.student_logits.grad`` is kept after a backward."""
    batch = collate_seqs(seqs, k, taus)
    z = forward_logits(seqs, batch).requires_grad_(grad)
    b = distill_batch(batch, z, same_vocab=same_vocab)
    if grad:
        b.student_logits.retain_grad()
    return b


def random_seqs(n, vt, vs, g, lengths=None, dtype=torch.float64, **kw) -> list[Seq]:
    out = []
    for i in range(n):
        if lengths is None:
            tt, ts = int(torch.randint(1, 7, (1,), generator=g)), int(torch.randint(1, 7, (1,), generator=g))
        else:
            tt, ts = lengths[i]
        out.append(make_seq(tt, ts, vt, vs, g, dtype, **kw))
    return out


def pad_more(b: DistillBatch, ts: int = 3, tt: int = 2, p: int = 2, c: int = 2) -> DistillBatch:
    """The same batch with extra padding on every padded axis (padding content is junk but finite)."""

    def grow(x: Tensor, n: int, value) -> Tensor:
        shape = list(x.shape)
        shape[1] = n
        return torch.cat([x, torch.full(shape, value, dtype=x.dtype)], 1)

    logits = torch.cat(
        [
            b.student_logits.detach(),
            torch.randn(b.batch_size, ts, b.student_logits.shape[2]).to(b.student_logits.dtype),
        ],
        1,
    )
    out = DistillBatch(
        student_logits=logits.requires_grad_(True),
        student_mask=grow(b.student_mask, ts, False),
        student_targets=grow(b.student_targets, ts, 1),
        teacher_topk_ids=grow(b.teacher_topk_ids, tt, 1),
        teacher_topk_logprobs=grow(b.teacher_topk_logprobs, tt, -1.0),
        teacher_target_ids=grow(b.teacher_target_ids, tt, 1),
        teacher_target_logprobs=grow(b.teacher_target_logprobs, tt, -0.5),
        teacher_mask=grow(b.teacher_mask, tt, False),
        teacher_lse=None if b.teacher_lse is None else {k: grow(v, tt, 0.3) for k, v in b.teacher_lse.items()},
        pairs=None if b.pairs is None else grow(b.pairs, p, 0),
        pair_mask=None if b.pair_mask is None else grow(b.pair_mask, p, False),
        chunks=None if b.chunks is None else grow(b.chunks, c, 0),
        chunk_mask=None if b.chunk_mask is None else grow(b.chunk_mask, c, False),
        same_vocab=b.same_vocab,
    )
    return out
