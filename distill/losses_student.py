"""Student side of the distillation losses: log-softmax values at a few ids per row, computed in fp32 without
ever materializing a [B, Ts, V] log-softmax, with ONE fused dense backward pass per temperature shared by all
the loss terms of a batch (:class:`StudentStats`). Re-exported by :mod:`logitcache.distill.losses`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .losses_core import DistillBatch

__all__ = ["StudentStats", "gather_log_softmax", "student_logprobs_at"]

# Elements of one chunk of the vocabulary-wide passes (rows x V): ~2 MB temporaries (fp32), cache friendly.
_CHUNK_ELEMS = 1 << 19


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs, float64 for float64 (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- student side: log-softmax gathered at a few ids, gradient computed in one fused, chunked pass -----


def _row_chunks(n: int, v: int):
    step = max(1, _CHUNK_ELEMS // max(v, 1))
    for s in range(0, n, step):
        yield s, min(n, s + step)


def _softmax_rows(zc: Tensor, tau: float) -> Tensor:
    """softmax(zc / tau) over the last dim (torch's fused kernel: faster than exp + sum on CPU)."""
    return torch.softmax(zc / tau if tau != 1.0 else zc, dim=-1)


@torch.no_grad()
def _lse_and_rank_sums(
    logits: Tensor, taus: Sequence[float], rank_tau: float | None, row_weight: Tensor | None
) -> tuple[dict[float, Tensor], Tensor | None]:
    """One chunked pass over ``logits`` [N, V]: ``logsumexp(z / tau)`` per row for every tau, and (if
    ``rank_tau``) ``sum_rows row_weight[n, g] * softmax(z_n / rank_tau)`` as [G, V] where row_weight is [N, G].

    The log-normalizer comes from the fused softmax: ``lse = max(z) / tau - log(max(softmax(z / tau)))``."""
    n, v = logits.shape
    cdt = _compute_dtype(logits.dtype)
    taus = [float(t) for t in taus]
    all_taus = sorted(set(taus) | ({float(rank_tau)} if rank_tau is not None else set()))
    lses = {tau: torch.empty(n, dtype=cdt, device=logits.device) for tau in all_taus}
    sums = None
    if rank_tau is not None:
        assert row_weight is not None
        sums = torch.zeros(row_weight.shape[1], v, dtype=cdt, device=logits.device)
    for s, e in _row_chunks(n, v):
        zc = logits[s:e].to(cdt)
        m = zc.amax(-1)
        for tau in all_taus:
            p = _softmax_rows(zc, tau)
            lses[tau][s:e] = m / tau - torch.log(p.amax(-1))
            if sums is not None and tau == rank_tau:
                sums.addmm_(row_weight[s:e].to(cdt).T, p)
    return {t: lses[t] for t in taus}, sums


class GradientPushes:
    """Sparse gradients pushed by the gathers of one batch: per-row gradient sums per temperature and the
    (flat index, grad) entries; shared by :class:`_HubState` (dense logits) and the fused head (chunked)."""

    def __init__(self, n: int, cdt: torch.dtype, device: torch.device):
        self.n, self.cdt, self.device = n, cdt, device
        self.lses: dict[float, Tensor] = {}
        self.clear()

    def clear(self) -> None:
        self.gsum: dict[float, Tensor] = {}
        self.sparse: list[tuple[Tensor, Tensor]] = []

    def push(self, rows: Tensor, flat: Tensor, g: Tensor, tau: float) -> None:
        g = g.to(self.cdt) / tau
        acc = self.gsum.get(tau)
        if acc is None:
            acc = self.gsum[tau] = torch.zeros(self.n, dtype=self.cdt, device=self.device)
        acc.index_add_(0, rows, g.sum(1))
        self.sparse.append((flat.reshape(-1), g.reshape(-1)))


class _HubState(GradientPushes):
    """Sparse gradients pushed by the gathers of one batch, turned into ONE dense gradient of the logits.

    Every loss term asks for log-softmax values at a few ids per row; their gradients are sparse apart
    from the softmax part, which only depends on the per-row sum of the incoming gradients. So the gathers
    only record (flat index, grad) and the per-row sums, and the hub's backward makes a single chunked pass
    over the vocabulary per temperature: ``grad = sum_tau (scatter(g_tau) - softmax(z / tau) * gsum_tau) / tau``.
    Several losses on one :class:`StudentStats` therefore cost one dense backward pass, not one each.
    """

    def __init__(self, n: int, v: int, dtype: torch.dtype, device: torch.device):
        super().__init__(n, _compute_dtype(dtype), device)
        self.v = v

    def dense_grad(self, logits: Tensor) -> Tensor:
        """[N, V] gradient (in the logits' dtype) of everything pushed since the last call; clears the state."""
        taus = [t for t in self.gsum if bool(self.gsum[t].any())]
        grad = torch.empty(self.n, self.v, dtype=self.cdt, device=self.device)
        for s, e in _row_chunks(self.n, self.v):
            zc = logits[s:e].to(self.cdt)
            out = grad[s:e]
            if not taus:
                out.zero_()
            for i, tau in enumerate(taus):
                p = _softmax_rows(zc, tau)
                if i == 0:
                    torch.mul(p, self.gsum[tau][s:e, None], out=out).neg_()
                else:
                    out.addcmul_(p, self.gsum[tau][s:e, None], value=-1.0)
        flat = grad.view(-1)
        for idx, g in self.sparse:
            flat.index_add_(0, idx, g)
        self.clear()
        return grad if grad.dtype == logits.dtype else grad.to(logits.dtype)


class _Hub(torch.autograd.Function):
    """Identity-free anchor: its output (a scalar 0) feeds every gather; its backward runs after all of them
    (autograd's topological order) and returns the accumulated dense gradient of the logits."""

    @staticmethod
    def forward(ctx, logits: Tensor, state: _HubState) -> Tensor:  # type: ignore[override]
        ctx.state = state
        ctx.save_for_backward(logits)
        return logits.new_zeros((), dtype=state.cdt)

    @staticmethod
    def backward(ctx, _g: Tensor):  # type: ignore[override]
        (logits,) = ctx.saved_tensors
        return ctx.state.dense_grad(logits.reshape(ctx.state.n, ctx.state.v)).view_as(logits), None


class _Gather(torch.autograd.Function):
    """out[m, i] = z[rows[m], ids[m, i]] / tau - lse_tau[rows[m]]; backward pushes into the hub state."""

    @staticmethod
    def forward(ctx, anchor, flat_logits, state, rows, ids, tau):  # type: ignore[override]
        flat = rows[:, None] * state.v + ids
        ctx.state, ctx.tau = state, tau
        ctx.save_for_backward(rows, flat)
        vals = flat_logits.take(flat).to(state.cdt)
        return (vals / tau if tau != 1.0 else vals) - state.lses[tau][rows][:, None]

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        rows, flat = ctx.saved_tensors
        ctx.state.push(rows, flat, g, ctx.tau)
        return g.new_zeros(()), None, None, None, None, None


class _SparseLogSoftmax:
    """Gathers of ``log softmax(logits / tau)`` [N, V] at (rows, ids) sharing one hub (one dense backward)."""

    def __init__(self, logits: Tensor):
        self.logits = logits
        n, v = logits.shape[0], logits.shape[-1]
        self.state = _HubState(n, v, logits.dtype, logits.device)
        self.anchor: Tensor | None = None

    def set_lses(self, lses: Mapping[float, Tensor]) -> None:
        for t, val in lses.items():
            self.state.lses.setdefault(float(t), val.reshape(-1).detach().to(self.state.cdt))

    def gather(self, rows: Tensor, ids: Tensor, tau: float) -> Tensor:
        tau = float(tau)
        if tau not in self.state.lses:
            self.set_lses(_lse_and_rank_sums(self.flat().detach(), [tau], None, None)[0])
        rows = rows.reshape(-1).long()
        ids = ids.reshape(rows.numel(), -1).long()
        if not (torch.is_grad_enabled() and self.logits.requires_grad):
            vals = self.flat().detach().take(rows[:, None] * self.state.v + ids).to(self.state.cdt)
            return (vals / tau if tau != 1.0 else vals) - self.state.lses[tau][rows][:, None]
        if self.anchor is None:
            self.anchor = _Hub.apply(self.logits, self.state)
        return _Gather.apply(self.anchor, self.flat().detach(), self.state, rows, ids, tau)

    def flat(self) -> Tensor:
        return self.logits.reshape(self.state.n, self.state.v)


def gather_log_softmax(
    logits: Tensor, requests: Sequence[tuple[Tensor, Tensor, float]], lses: Mapping[float, Tensor] | None = None
) -> list[Tensor]:
    """Student log-probabilities at a few ids per row, at one or more temperatures, in fp32 (fp64 for fp64).

    ``logits`` [N, V]; each request is ``(rows [M], ids [M, k], tau)`` and yields [M, k] with
    ``log softmax(logits[rows] / tau)[ids]``. ``lses`` may supply ``logsumexp(logits / tau)`` [N] (no grad);
    missing ones are computed in one chunked pass. Gradients flow to ``logits`` only, through one fused
    dense pass for all requests (nothing vocabulary-wide is kept for backward but the logits themselves).
    """
    g = _SparseLogSoftmax(logits)
    if lses:
        g.set_lses(lses)
    need = sorted({float(r[2]) for r in requests} - set(g.state.lses))
    if need:
        g.set_lses(_lse_and_rank_sums(logits.detach(), need, None, None)[0])
    return [g.gather(rows, ids, tau) for rows, ids, tau in requests]


class StudentStats:
    """Per-batch student state shared by the terms of a :class:`CombinedLoss`: no-grad vocabulary-wide
    statistics (``lse(tau)`` [B, Ts]; ``rank_sums(tau)`` [B, V], the sum over valid rows of softmax(z / tau))
    computed in as few passes as possible, and one gradient hub so that all terms together cost a single
    dense backward pass over the logits per temperature."""

    def __init__(self, batch: DistillBatch):
        self.batch = batch
        self._lse: dict[float, Tensor] = {}
        self._rank: dict[float, Tensor] = {}
        #: the fused head (``--fused-head``): hidden states and the LM head instead of logits (``.fused_head``)
        self.head = batch.student_head
        if self.head is not None:
            self.sparse: Any = self.head
        else:
            z = batch.student_logits
            self.sparse = _SparseLogSoftmax(z.reshape(-1, z.shape[-1]) if z.shape[-1] else z.reshape(0, 0))

    def prepare(self, taus: Sequence[float] = (), rank_tau: float | None = None) -> None:
        z = self.batch.student_logits
        b, ts, v = z.shape
        need = sorted({float(t) for t in taus} - set(self._lse))
        rt = None if rank_tau is None or float(rank_tau) in self._rank else float(rank_tau)
        if not need and rt is None:
            return
        w = None
        if rt is not None:
            eye = torch.eye(b, dtype=torch.float32, device=z.device)
            w = (eye[:, None, :] * self.batch.student_mask[:, :, None]).reshape(b * ts, b)
        if self.head is not None:
            lses, sums = self.head.lse_and_rank_sums(need, rt, w)
        else:
            lses, sums = _lse_and_rank_sums(z.detach().reshape(b * ts, v), need, rt, w)
        for t, val in lses.items():
            self._lse[t] = val.view(b, ts)
        self.sparse.set_lses(lses)
        if rt is not None:
            self._rank[rt] = sums  # type: ignore[assignment]

    def lse(self, tau: float) -> Tensor:
        self.prepare([tau])
        return self._lse[float(tau)]

    def rank_sums(self, tau: float) -> Tensor:
        self.prepare((), rank_tau=tau)
        return self._rank[float(tau)]

    def topk(self, r: int) -> Tensor:
        """The ids of each row's ``r`` largest student logits, sorted descending: [B, Ts, r] (no grad)."""
        b, ts, _ = self.batch.student_logits.shape
        if self.head is not None:
            return self.head.topk(r).view(b, ts, r)
        with torch.no_grad():
            return torch.topk(self.batch.student_logits.detach(), r, dim=-1, sorted=True).indices

    def gather(self, rows: Tensor, ids: Tensor, tau: float) -> Tensor:
        """log softmax(student_logits / tau) at flat rows (b * Ts + j) [M] and ids [M, k] -> [M, k]."""
        self.prepare([tau])
        return self.sparse.gather(rows, ids, tau)


def student_logprobs_at(batch: DistillBatch, stats: StudentStats, ids: Tensor, taus: Sequence[float]) -> list[Tensor]:
    """``log softmax(student_logits / tau)`` at ``ids`` [B, Ts, k] for every tau: list of [B, Ts, k]."""
    b, ts, v = batch.student_logits.shape
    stats.prepare(taus)
    rows = torch.arange(b * ts, device=ids.device)
    flat_ids = ids.reshape(b * ts, -1).clamp(0, max(v - 1, 0))
    return [stats.gather(rows, flat_ids, t).view(b, ts, -1) for t in taus]
