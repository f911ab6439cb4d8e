"""Optimal-transport losses across tokenizers: ``uld`` (Boizard et al.) and ``mlot`` (MultiLevelOT, Cui et
al.), on sparse cached teacher rows. Formulas, shapes and approximations: ``docs/losses.md``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .losses_core import (
    NEG,
    DistillBatch,
    LossOutput,
    Pairing,
    Reduction,
    Tempered,
    finish,
    gather_rows,
    require_lse,
    teacher_logprobs_at,
    token_pairs,
)
from .losses_student import StudentStats, student_logprobs_at

__all__ = ["MLOTConfig", "ULDConfig", "mlot_loss", "sinkhorn_plan", "teacher_ranked_probs", "uld_loss"]


# ---- uld ---------------------------------------------------------------------------------------------


@dataclass
class ULDConfig:
    """ULD: L1 distance between the descending-sorted teacher and student probabilities (the closed form of
    W1 under a uniform ground cost), summed over the top ranks.

    ``top_ranks``: compare ranks 1..R, R = min(K, top_ranks) (None: all K cached ranks); the student's top R
    come from ``torch.topk`` (no full sort). ``tail``: ``ignore`` drops ranks beyond R; ``bucket`` adds
    ``|t_rest - s_rest|`` with the remaining mass of each side (a lower bound of the dropped ranks' L1; exact
    when the teacher's remaining mass is 0). ``tau``: temperature of both sides. ``tempered``: teacher rows at
    tau != 1 ``exact`` (needs the cache's lse at tau; refuses without) or ``renormalize`` within the top-K.
    """

    tau: float = 1.0
    tempered: Tempered = "exact"
    top_ranks: int | None = None
    tail: Literal["ignore", "bucket"] = "bucket"
    pairing: Pairing = "index"
    reduction: Reduction = "token"


def uld_loss(batch: DistillBatch, config: ULDConfig | None = None, stats: StudentStats | None = None) -> LossOutput:
    """Per valid pair (teacher row i, student row j): ``sum_r |sort(t_i)_r - sort(s_j)_r|`` over r <= R.

    Shapes: teacher rows [B, Tt, K], student_logits [B, Ts, V]; pairs [B, P] from :func:`token_pairs`.
    When V < R the student's sorted vector is zero-padded (as ULD pads the smaller vocabulary).
    per_sequence: mean over valid pairs; count: number of valid pairs.
    """
    cfg = config or ULDConfig()
    if cfg.tail not in ("ignore", "bucket"):
        raise ValueError(f"ULDConfig.tail must be 'ignore' or 'bucket', got {cfg.tail!r}")
    stats = stats or StudentStats(batch)
    z = batch.student_logits
    v = z.shape[-1]
    ti, sj, valid = token_pairs(batch, cfg.pairing)
    logq, _ = teacher_logprobs_at(batch, cfg.tau, cfg.tempered, "uld")
    k = logq.shape[-1]
    r = k if cfg.top_ranks is None else max(1, min(k, int(cfg.top_ranks)))
    q = torch.exp(logq).sort(dim=-1, descending=True).values[..., :r]  # [B, Tt, R]
    rs = min(r, v)
    sids = stats.topk(rs)  # [B, Ts, Rs], no grad
    (slp,) = student_logprobs_at(batch, stats, sids, [cfg.tau])
    sp = gather_rows(torch.exp(slp), sj)  # [B, P, Rs]
    tq = gather_rows(q, ti)  # [B, P, R]
    if rs < r:
        sp = torch.nn.functional.pad(sp, (0, r - rs))
    d = (tq - sp).abs().sum(-1)
    if cfg.tail == "bucket":
        t_rest = (1.0 - tq.sum(-1)).clamp_min(0.0)
        s_rest = (1.0 - sp.sum(-1)).clamp_min(0.0)
        d = d + (t_rest - s_rest).abs()
    d = torch.where(valid, d, torch.zeros_like(d))
    count = valid.sum(1).to(d.dtype)
    return finish(d.sum(1) / count.clamp_min(1.0), count, cfg.reduction)


# ---- mlot --------------------------------------------------------------------------------------------


@dataclass
class MLOTConfig:
    """MultiLevelOT: ``L_HAD + beta L_SL + gamma L_SD`` (its weight alpha is the spec weight, e.g.
    ``ce:1,mlot:0.15``). Defaults from the paper: beta 0.1, gamma 0.1, tau_SL 1, tau_SD 2, lambda 0.1,
    N 20, k 50 (tau of L_HAD and of the ranking: 1, as in the released code).

    ``missing``: the value given to a ranked teacher id absent from a row's cached top-K: ``zero``;
    ``bound`` = min(row tail mass, smallest cached prob of the row) (an upper bound of the true value);
    ``half`` = bound / 2 (default ``zero``: the most faithful on real models, see docs/losses.md).
    ``detach_plan``: treat the Sinkhorn plan as a constant (no backprop through the
    N iterations; memory flat in N). ``pairing`` applies to the token-level terms (HAD, SL); L_SD always
    uses every valid teacher row x every valid student row. ``tempered``: teacher rows at tau != 1 (tau_SD = 2 by
    default) ``exact`` from the cache's recorded lse (refuses a cache without it) or ``renormalize`` within the
    top-K (the explicit approximation: L_SD off by 36-99% at K = 256-16 on Gemma-3 -> SmolLM2).
    """

    beta: float = 0.1
    gamma: float = 0.1
    k: int = 50
    tau_had: float = 1.0
    tau_sl: float = 1.0
    tau_sd: float = 2.0
    rank_tau: float = 1.0
    sinkhorn_lambda: float = 0.1
    sinkhorn_iters: int = 20
    detach_plan: bool = False
    missing: Literal["zero", "bound", "half"] = "zero"
    tempered: Tempered = "exact"
    pairing: Pairing = "index"
    reduction: Reduction = "token"


def sinkhorn_plan(
    cost: Tensor, row_mask: Tensor, col_mask: Tensor, lam: float = 0.1, iters: int = 20, detach: bool = False
) -> Tensor:
    """Entropic OT plan of ``exp(-cost / lam)`` after ``iters`` alternating row / column normalizations
    (the paper's iteration, ending with a column normalization).

    cost [B, n, m]; row_mask [B, n], col_mask [B, m]. Marginals are uniform over the valid rows (1/n_valid)
    and columns (1/m_valid), so the plan has mass 1 and ``<P, C>`` is a mean cost (the paper's square
    doubly-stochastic plan has mass T: ours is the paper's value / T). Invalid rows/columns get 0.
    Runs as matrix-vector scalings of the kernel when ``max(cost) / lam <= 50`` (always for MultiLevelOT's
    costs, which are <= 2, at lambda 0.1), else in the log domain. ``detach``: no autograd through the
    iterations (the caller treats the plan as a constant).

    Always computed in float32 (float64 for float64 costs), with autocast off: under train's bf16 autocast the
    matrix-vector products would otherwise run in bf16 and the marginals drift by ~1e-3 instead of ~1e-7.
    """
    with _full_precision(cost), torch.set_grad_enabled(torch.is_grad_enabled() and not detach):
        cost = cost.to(_compute_dtype(cost.dtype))
        c = cost.detach() if detach else cost
        valid = row_mask[:, :, None] & col_mask[:, None, :]
        n_r = row_mask.sum(1, keepdim=True).clamp_min(1).to(c.dtype)
        n_c = col_mask.sum(1, keepdim=True).clamp_min(1).to(c.dtype)
        c0 = torch.where(valid, c, torch.zeros_like(c))
        if c0.numel() == 0 or float(c0.detach().abs().amax()) / lam <= 50.0:
            return _sinkhorn_scaling(c0, valid, row_mask, col_mask, n_r, n_c, lam, iters)
        return _sinkhorn_log(c0, valid, row_mask, col_mask, n_r, n_c, lam, iters)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _full_precision(t: Tensor) -> torch.autocast:
    """A context with autocast off on ``t``'s device (cpu, cuda, ...): matmuls and cdist run in the inputs' dtype."""
    return torch.autocast(t.device.type, enabled=False)


def _bmv(m: Tensor, x: Tensor) -> Tensor:
    """Batched matrix-vector product [B, n, m] x [B, m] -> [B, n] (a loop of ``mv``: bmm with one column is
    ~10x slower on CPU)."""
    return torch.stack([m[i] @ x[i] for i in range(m.shape[0])]) if m.shape[0] else m.new_zeros(m.shape[:2])


def _sinkhorn_scaling(c, valid, row_mask, col_mask, n_r, n_c, lam, iters) -> Tensor:
    """P = diag(u) K diag(v) with u = a / (K v), v = b / (K^T u): no exp inside the loop, and autograd only
    keeps the kernel once plus two vectors per iteration."""
    kern = torch.where(valid, torch.exp(-c / lam), torch.zeros_like(c))
    kern_t = kern.transpose(1, 2).contiguous()
    a = torch.where(row_mask, 1.0 / n_r, torch.zeros_like(n_r))  # [B, n]
    b = torch.where(col_mask, 1.0 / n_c, torch.zeros_like(n_c))  # [B, m]
    v = col_mask.to(c.dtype)
    u = a
    for _ in range(iters):
        kv = _bmv(kern, v)
        u = torch.where(kv > 0, a / torch.where(kv > 0, kv, torch.ones_like(kv)), torch.zeros_like(kv))
        ktu = _bmv(kern_t, u)
        v = torch.where(ktu > 0, b / torch.where(ktu > 0, ktu, torch.ones_like(ktu)), torch.zeros_like(ktu))
    return u[:, :, None] * kern * v[:, None, :]


def _sinkhorn_log(c, valid, row_mask, col_mask, n_r, n_c, lam, iters) -> Tensor:
    """The same iteration in the log domain with finite sentinels (any lambda, any cost range)."""
    has = valid.flatten(1).any(1)
    # a sequence with no valid cell runs on a dummy all-valid problem; its plan is zeroed at the end
    rm = row_mask | ~has[:, None]
    cm = col_mask | ~has[:, None]
    full = rm[:, :, None] & cm[:, None, :]
    n_r = rm.sum(1, keepdim=True).clamp_min(1).to(c.dtype)
    n_c = cm.sum(1, keepdim=True).clamp_min(1).to(c.dtype)
    log_a = torch.where(rm, -torch.log(n_r), torch.full_like(n_r, NEG))
    log_b = torch.where(cm, -torch.log(n_c), torch.full_like(n_c, NEG))
    log_k = torch.where(full, -c / lam, torch.full_like(c, NEG))
    g = torch.zeros_like(log_b)
    f = torch.zeros_like(log_a)
    for _ in range(iters):
        f = log_a - torch.logsumexp(log_k + g[:, None, :], dim=2)
        g = log_b - torch.logsumexp(log_k + f[:, :, None], dim=1)
    plan = torch.exp(log_k + f[:, :, None] + g[:, None, :])
    return torch.where(valid, plan, torch.zeros_like(plan))


def teacher_ranked_probs(
    batch: DistillBatch,
    ranked: Tensor,
    rank_valid: Tensor,
    taus: list[float],
    missing: str,
    tempered: Tempered = "exact",
) -> dict[float, Tensor]:
    """Teacher probabilities at the sequence-ranked ids: {tau: [B, Tt, k]}.

    ``ranked`` [B, k] teacher ids, ``rank_valid`` [B, k] (False for a padded rank with no cached mass; its
    column is 0). A ranked id absent from a row's top-K gets the ``missing`` estimate of that row.
    Built by scattering the cached entries into rank slots: O(B Tt K), nothing vocabulary-wide per row.
    """
    ids = batch.teacher_topk_ids.long()
    b, tt, kk = ids.shape
    k = ranked.shape[1]
    width = max(int(ids.max()) + 1 if ids.numel() else 1, int(ranked.max()) + 1 if ranked.numel() else 1)
    rank_of = torch.full((b, width), k, dtype=torch.long, device=ids.device)
    rank_of.scatter_(1, ranked, torch.arange(k, device=ids.device).expand(b, k))
    slot = rank_of.gather(1, ids.clamp_min(0).reshape(b, -1)).view(b, tt, kk)  # k = not ranked
    out = {}
    for tau in taus:
        logq, tail = teacher_logprobs_at(batch, tau, tempered, "mlot")
        present = torch.isfinite(logq)
        p = torch.where(present, torch.exp(logq), torch.zeros_like(logq))
        tk = torch.zeros(b, tt, k + 1, dtype=p.dtype, device=p.device).scatter_add_(2, slot, p)[..., :k]
        seen = torch.zeros(b, tt, k + 1, dtype=p.dtype, device=p.device)
        seen = seen.scatter_add_(2, slot, present.to(p.dtype))[..., :k] > 0
        if missing == "zero":
            est = torch.zeros_like(tail)
        else:
            pmin = torch.where(present, p, torch.full_like(p, math.inf)).min(-1).values
            est = torch.minimum(tail, torch.where(torch.isfinite(pmin), pmin, torch.zeros_like(pmin)))
            if missing == "half":
                est = est * 0.5
            elif missing != "bound":
                raise ValueError(f"MLOTConfig.missing must be 'zero', 'bound' or 'half', got {missing!r}")
        tk = torch.where(seen, tk, est[..., None]) * rank_valid[:, None, :].to(p.dtype)
        out[tau] = tk
    return out


def mlot_loss(batch: DistillBatch, config: MLOTConfig | None = None, stats: StudentStats | None = None) -> LossOutput:
    """MultiLevelOT on sparse cached teacher rows.

    Ranking (no gradient): teacher ids by ``sum_i t(i)`` over the valid teacher rows (accumulated from the
    cached entries), student ids by ``sum_j s(j)`` over the valid student rows; the top k' = min(k, V) of
    each, one ordering per sequence. ``t^k`` [B, Tt, k'], ``s^k`` [B, Ts, k'].
    ``L_HAD`` = mean over pairs of ``sum_l |t^k_l(i) - s^k_l(j)|`` (tau_had); ``L_SL`` = mean over pairs of
    ``-sum_l t^k_l(i) log s^k_l(j)`` (tau_sl); ``L_SD`` = ``<P, C>`` with ``C[i, j] = sum_l |t^k_l(i) -
    s^k_l(j)|`` over valid teacher rows i x valid student rows j (tau_sd, rectangular) and P the Sinkhorn
    plan (:func:`sinkhorn_plan`). per_sequence = HAD + beta SL + gamma SD; count: number of valid pairs;
    ``parts``: had, sl, sd.
    """
    cfg = config or MLOTConfig()
    stats = stats or StudentStats(batch)
    z = batch.student_logits
    b, ts, v = z.shape
    taus = sorted({float(cfg.tau_had), float(cfg.tau_sl), float(cfg.tau_sd)})
    # the teacher side only at the temperatures in use (tau_SD not when gamma = 0): refuse before any work
    t_taus = sorted({float(cfg.tau_had), float(cfg.tau_sl), *([float(cfg.tau_sd)] if cfg.gamma != 0.0 else [])})
    require_lse(batch, {*t_taus, float(cfg.rank_tau)}, cfg.tempered, "mlot")
    stats.prepare(taus, rank_tau=cfg.rank_tau)
    k = max(1, min(int(cfg.k), v))
    # student ranking and probabilities at the ranked ids, every row, all temperatures in one fused call
    s_ranked = torch.topk(stats.rank_sums(cfg.rank_tau), k, dim=-1).indices  # [B, k]
    slps = student_logprobs_at(batch, stats, s_ranked[:, None, :].expand(b, ts, k), taus)
    slp = dict(zip(taus, slps))
    # teacher ranking from the cached entries
    with torch.no_grad():
        logq_r, _ = teacher_logprobs_at(batch, cfg.rank_tau, cfg.tempered, "mlot")
        mass = torch.where(torch.isfinite(logq_r), torch.exp(logq_r), torch.zeros_like(logq_r))
        mass = mass * batch.teacher_mask[..., None]
        ids = batch.teacher_topk_ids.long().clamp_min(0)
        width = max(int(ids.max()) + 1 if ids.numel() else 1, k)
        acc = torch.zeros(b, width, dtype=mass.dtype, device=mass.device)
        acc.scatter_add_(1, ids.reshape(b, -1), mass.reshape(b, -1))
        top = torch.topk(acc, k, dim=-1)
        t_ranked, rank_valid = top.indices, top.values > 0
        tk = teacher_ranked_probs(batch, t_ranked, rank_valid, t_taus, cfg.missing, cfg.tempered)
    # token-level terms over pairs
    ti, sj, valid = token_pairs(batch, cfg.pairing)
    count = valid.sum(1).to(slps[0].dtype)
    zero = torch.zeros(valid.shape, dtype=slps[0].dtype, device=z.device)
    had_t = (gather_rows(tk[cfg.tau_had], ti) - gather_rows(torch.exp(slp[cfg.tau_had]), sj)).abs().sum(-1)
    sl_t = -(gather_rows(tk[cfg.tau_sl], ti) * gather_rows(slp[cfg.tau_sl], sj)).sum(-1)
    had = torch.where(valid, had_t, zero).sum(1) / count.clamp_min(1.0)
    sl = torch.where(valid, sl_t, zero).sum(1) / count.clamp_min(1.0)
    # sequence-level Sinkhorn distance over all valid teacher rows x all valid student rows
    if cfg.gamma != 0.0:
        t_sd = tk[cfg.tau_sd]
        s_sd = torch.exp(slp[cfg.tau_sd])
        s_sd = torch.where(batch.student_mask[..., None], s_sd, torch.zeros_like(s_sd))
        with _full_precision(s_sd):  # cdist and the plan in fp32 under autocast too
            cost = torch.cdist(t_sd.to(s_sd.dtype), s_sd, p=1)  # [B, Tt, Ts]
        plan = sinkhorn_plan(
            cost, batch.teacher_mask, batch.student_mask, cfg.sinkhorn_lambda, cfg.sinkhorn_iters, cfg.detach_plan
        )
        sd = (plan * cost).sum((1, 2))
    else:
        sd = torch.zeros_like(had)
    total = had + cfg.beta * sl + cfg.gamma * sd
    return finish(total, count, cfg.reduction, had=had, sl=sl, sd=sd)
