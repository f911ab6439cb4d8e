"""Shared machinery of the distillation losses: the batch contract, teacher rows at a temperature, token
pairing and reductions (the student side lives in :mod:`.losses_student`).

Everything public here is re-exported by :mod:`logitcache.distill.losses`; import it from there.

Shapes (see ``docs/losses.md``): ``B`` batch, ``Ts`` student loss-span rows (padded), ``Tt`` teacher loss-span
rows (padded), ``V`` student vocabulary, ``K`` cached top-K, ``P`` aligned pairs, ``C`` chunks. Row ``r`` of
either side is loss-span position ``r`` (row indices are relative to the start of each side's loss span).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = [
    "DistillBatch",
    "LossOutput",
    "MissingStatistic",
    "Reduction",
    "Tempered",
    "reduce_per_sequence",
    "require_lse",
    "teacher_logprobs_at",
    "token_pairs",
]

Reduction = Literal["token", "sequence"]
Pairing = Literal["index", "aligned"]
#: how teacher rows at tau != 1 are built: ``exact`` from the recorded ``logsumexp(logits / tau)`` (refuses a batch
#: without it), ``renormalize`` within the cached top-K (an approximation, chosen explicitly)
Tempered = Literal["exact", "renormalize"]


class MissingStatistic(ValueError):
    """A loss needs a row statistic (``logsumexp(logits / tau)``) the batch does not carry."""


def missing_lse_message(loss: str, tau: float, held: list[float] | None) -> str:
    """One line: the loss, the missing statistic, and both fixes."""
    have = ", ".join(f"{t:g}" for t in sorted(held)) if held else "none"
    return (
        f"{loss} at tau={tau:g} needs the teacher's logsumexp(logits/{tau:g}) recorded at capture (recorded "
        f"temperatures: {have}); re-capture with `logitcache generate ... --extra-temperatures {tau:g}`, or accept "
        f"the top-K renormalization explicitly with tempered='renormalize' "
        f"(--loss-config '{{\"{loss}\": {{\"tempered\": \"renormalize\"}}}}')"
    )


def require_lse(batch: DistillBatch, taus: list[float] | set[float], tempered: str, loss: str) -> None:
    """Raise :class:`MissingStatistic` when ``tempered == "exact"`` and a tau != 1 lacks its recorded lse."""
    if tempered not in ("exact", "renormalize"):
        raise ValueError(f"{loss}: tempered must be 'exact' or 'renormalize', got {tempered!r}")
    if tempered != "exact":
        return
    held = sorted(batch.teacher_lse) if batch.teacher_lse else []
    for tau in sorted(float(t) for t in taus):
        if tau != 1.0 and not (tau in held and 1.0 in held):
            raise MissingStatistic(missing_lse_message(loss, tau, held))

# A finite stand-in for -inf in log-domain computations whose gradients must never see inf - inf.
NEG = -1.0e30


@dataclass
class DistillBatch:
    """One padded batch: student logits over the loss span, the teacher's sparse cached rows, the alignment.

    Built by ``distill.batch.distill_batch`` from a collated batch and the student's logits (training, the loss
    tests and the loss benches alike: one padding path).

    Student side
      - ``student_logits`` float [B, Ts, V]: row j predicts student completion token j. Padded rows must be
        finite (zeros are fine); they are masked out.
      - ``student_mask`` bool [B, Ts]; ``student_targets`` long [B, Ts] (the student's tokenization of the
        completion, for ``ce``/``alm``; padding -100 or masked).
    Teacher side (one cached row per teacher loss-span position)
      - ``teacher_topk_ids`` long [B, Tt, K], ``teacher_topk_logprobs`` float [B, Tt, K]: sorted descending,
        log-softmax over the full teacher vocabulary at temperature 1; may contain -inf (an entry with
        logprob -inf is treated as absent).
      - ``teacher_target_ids`` long [B, Tt], ``teacher_target_logprobs`` float [B, Tt], ``teacher_mask`` bool
        [B, Tt].
      - ``teacher_lse``: optional {tau: float [B, Tt]} of ``logsumexp(logits / tau)`` recorded at capture.
        Exact tempered teacher rows need both ``tau`` and ``1.0``; without them a loss at tau != 1 refuses
        (unless its config says ``tempered="renormalize"``: renormalized within the top-K).
    Alignment (stage two; optional)
      - ``pairs`` long [B, P, 2]: (teacher row i, student row j) whose next tokens start at the same byte;
        ``pair_mask`` bool [B, P].
      - ``chunks`` long [B, C, 4]: half-open row ranges (t_start, t_end, s_start, s_end) covering identical
        bytes; ``chunk_mask`` bool [B, C].
    ``same_vocab``: teacher and student share one vocabulary (required by ``kl``).
    Sampled tail (optional, ``generate --tail-samples N``; None when the cache has none)
      - ``teacher_tail_ids`` long [B, Tt, N], ``teacher_tail_logprobs`` float [B, Tt, N]: draws from the teacher's
        distribution outside the row's top-K and their logprobs (``kl``/``rkl`` with ``tail="sampled"``).
    ``student_head``: the fused head (``distill.fused_head.FusedHead``, ``--fused-head``): the student's logits
    as hidden states and the LM head, never materialized. ``student_logits`` is then a zero-stride placeholder of
    shape [B, Ts, V] (zeros: its shape, dtype and device only); the losses reach the student through
    ``StudentStats``, which uses the head.
    """

    student_logits: Tensor
    student_mask: Tensor
    student_targets: Tensor
    teacher_topk_ids: Tensor
    teacher_topk_logprobs: Tensor
    teacher_target_ids: Tensor
    teacher_target_logprobs: Tensor
    teacher_mask: Tensor
    teacher_lse: dict[float, Tensor] | None = None
    pairs: Tensor | None = None
    pair_mask: Tensor | None = None
    chunks: Tensor | None = None
    chunk_mask: Tensor | None = None
    same_vocab: bool = False
    student_head: Any = None
    teacher_tail_ids: Tensor | None = None
    teacher_tail_logprobs: Tensor | None = None

    def __post_init__(self) -> None:
        self.validate()

    # ---- shape helpers -------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.student_logits.shape[0]

    @property
    def device(self) -> torch.device:
        return self.student_logits.device

    def validate(self) -> None:
        """Raise ``ValueError`` naming the offending field when shapes, dtypes or devices disagree."""
        z = self.student_logits
        if z.dim() != 3 or not z.is_floating_point():
            raise ValueError(f"student_logits must be a float [B, Ts, V] tensor, got {tuple(z.shape)} {z.dtype}")
        b, ts, _ = z.shape
        ids, lp = self.teacher_topk_ids, self.teacher_topk_logprobs
        if ids.dim() != 3 or lp.shape != ids.shape:
            raise ValueError(
                f"teacher_topk_ids {tuple(ids.shape)} and teacher_topk_logprobs {tuple(lp.shape)} must both be "
                "[B, Tt, K]"
            )
        tt = ids.shape[1]
        expect = {
            "student_mask": (b, ts),
            "student_targets": (b, ts),
            "teacher_topk_ids": (b, tt, ids.shape[2]),
            "teacher_target_ids": (b, tt),
            "teacher_target_logprobs": (b, tt),
            "teacher_mask": (b, tt),
        }
        for name, shape in expect.items():
            t = getattr(self, name)
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape}")
        for name in ("student_mask", "teacher_mask"):
            if getattr(self, name).dtype != torch.bool:
                raise ValueError(f"{name} must be bool")
        if ids.dtype not in (torch.int64, torch.int32) or self.student_targets.dtype not in (
            torch.int64,
            torch.int32,
        ):
            raise ValueError("teacher_topk_ids and student_targets must be integer tensors")
        if self.teacher_lse is not None:
            for tau, v in self.teacher_lse.items():
                if tuple(v.shape) != (b, tt):
                    raise ValueError(f"teacher_lse[{tau}] has shape {tuple(v.shape)}, expected {(b, tt)}")
        tids, tlps = self.teacher_tail_ids, self.teacher_tail_logprobs
        if (tids is None) != (tlps is None):
            raise ValueError("teacher_tail_ids and teacher_tail_logprobs come together (both or neither)")
        if tids is not None and tlps is not None and (
            tids.dim() != 3 or tuple(tids.shape[:2]) != (b, tt) or tlps.shape != tids.shape
        ):
            raise ValueError(f"teacher_tail_ids {tuple(tids.shape)} and teacher_tail_logprobs {tuple(tlps.shape)} "
                             f"must both be [B, Tt, N] with [B, Tt] = {(b, tt)}")
        for name, mname, width in (("pairs", "pair_mask", 2), ("chunks", "chunk_mask", 4)):
            t, m = getattr(self, name), getattr(self, mname)
            if t is None:
                continue
            if t.dim() != 3 or t.shape[0] != b or t.shape[2] != width:
                raise ValueError(f"{name} must be [B, *, {width}], got {tuple(t.shape)}")
            if m is None:
                setattr(self, mname, torch.ones(t.shape[:2], dtype=torch.bool, device=t.device))
            elif tuple(m.shape) != tuple(t.shape[:2]) or m.dtype != torch.bool:
                raise ValueError(f"{mname} must be bool {tuple(t.shape[:2])}, got {tuple(m.shape)} {m.dtype}")
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor) and v.device != z.device:
                raise ValueError(f"{f.name} is on {v.device}, student_logits on {z.device}: use one device")

    def to(self, device: torch.device | str) -> DistillBatch:
        """A copy with every tensor on ``device``."""
        kw = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                v = v.to(device)
            elif isinstance(v, dict):
                v = {k: t.to(device) for k, t in v.items()}
            kw[f.name] = v
        return DistillBatch(**kw)


@dataclass
class LossOutput:
    """What every loss returns.

    ``per_sequence`` [B]: the loss of each sequence, a mean over its ``count`` terms (tokens, pairs or chunks);
    0 where ``count`` is 0. ``count`` [B] float. ``value``: the batch reduction (see
    :func:`reduce_per_sequence`). ``parts``: named per-sequence sub-terms [B] (for logging).
    """

    per_sequence: Tensor
    count: Tensor
    value: Tensor
    parts: dict[str, Tensor] = field(default_factory=dict)


def reduce_per_sequence(per_sequence: Tensor, count: Tensor, reduction: Reduction) -> Tensor:
    """``token``: sum(per_seq * count) / sum(count) (every term weighs the same, as HF's token-mean CE);
    ``sequence``: mean of per_seq over sequences with count > 0 (as the ULD / MultiLevelOT code).
    Returns 0 (still attached to the graph) when nothing counts."""
    count = count.to(per_sequence.dtype)
    if reduction == "token":
        return (per_sequence * count).sum() / count.sum().clamp_min(1.0)
    if reduction == "sequence":
        has = (count > 0).to(per_sequence.dtype)
        return (per_sequence * has).sum() / has.sum().clamp_min(1.0)
    raise ValueError(f"unknown reduction {reduction!r}: use 'token' or 'sequence'")


def finish(per_sequence: Tensor, count: Tensor, reduction: Reduction, **parts: Tensor) -> LossOutput:
    per_sequence = torch.where(count > 0, per_sequence, torch.zeros_like(per_sequence))
    return LossOutput(per_sequence, count, reduce_per_sequence(per_sequence, count, reduction), dict(parts))


# ---- teacher side ------------------------------------------------------------------------------------


def teacher_logprobs_at(
    batch: DistillBatch, tau: float, tempered: Tempered = "exact", loss: str = "loss"
) -> tuple[Tensor, Tensor]:
    """The cached rows at temperature ``tau``: (logq [B, Tt, K] fp32, tail [B, Tt] fp32 >= 0).

    tau == 1: the cached logprobs; tail = 1 - sum(exp(top-K)). tau != 1 with ``teacher_lse`` holding both
    ``tau`` and ``1.0``: exact, ``(lp + lse_1) / tau - lse_tau``; without them ``tempered="exact"`` (default) raises
    :class:`MissingStatistic` (never a silent approximation). ``tempered="renormalize"``: renormalized within the
    top-K (tail 0), whether or not the lse is recorded (the explicit approximation). Absent entries (-inf) stay
    -inf; a row with no finite entry has tail 1 (tau == 1) or 0.
    """
    lp = batch.teacher_topk_logprobs
    cdt = torch.float64 if lp.dtype == torch.float64 else torch.float32
    lp = lp.to(cdt)
    finite = torch.isfinite(lp)
    tau = float(tau)
    if tau == 1.0:
        logq = torch.where(finite, lp, float("-inf"))
    elif tempered != "renormalize" and batch.teacher_lse and tau in batch.teacher_lse and 1.0 in batch.teacher_lse:
        l1 = batch.teacher_lse[1.0].to(cdt)[..., None]
        lt = batch.teacher_lse[tau].to(cdt)[..., None]
        logq = torch.where(finite, (lp + l1) / tau - lt, float("-inf"))
    else:
        require_lse(batch, [tau], tempered, loss)  # raises unless tempered == "renormalize"
        scaled = torch.where(finite, lp / tau, float("-inf"))
        norm = torch.logsumexp(scaled, dim=-1, keepdim=True)
        norm = torch.where(torch.isfinite(norm), norm, torch.zeros_like(norm))
        logq = scaled - norm
        return logq, torch.zeros(lp.shape[:2], dtype=cdt, device=lp.device)
    tail = (1.0 - torch.exp(logq).sum(-1)).clamp_min(0.0)
    return logq, tail


def gather_rows(x: Tensor, idx: Tensor) -> Tensor:
    """x [B, T, ...] indexed along dim 1 by idx [B, P] (clamped into range) -> [B, P, ...]."""
    idx = idx.clamp(0, max(x.shape[1] - 1, 0))
    if x.shape[1] == 0:
        return x.new_zeros((x.shape[0], idx.shape[1], *x.shape[2:]))
    shape = (*idx.shape, *x.shape[2:])
    return x.gather(1, idx.reshape(*idx.shape, *([1] * (x.dim() - 2))).expand(shape))


def token_pairs(batch: DistillBatch, pairing: Pairing) -> tuple[Tensor, Tensor, Tensor]:
    """Teacher rows ``ti`` [B, P], student rows ``sj`` [B, P] and ``valid`` [B, P] of the token-level terms.

    ``index``: row r with row r from the start of the completion, truncated to the shorter side (as the
    ULD and MultiLevelOT code do). ``aligned``: stage two's ``pairs`` (an error if absent). A pair is valid
    only when both its rows are valid.
    """
    tm, sm = batch.teacher_mask, batch.student_mask
    b = tm.shape[0]
    if pairing == "index":
        p = min(tm.shape[1], sm.shape[1])
        ar = torch.arange(p, device=tm.device).expand(b, p)
        return ar, ar, tm[:, :p] & sm[:, :p]
    if pairing == "aligned":
        if batch.pairs is None:
            raise ValueError("pairing='aligned' needs batch.pairs (stage two's alignment); use pairing='index'")
        ti, sj = batch.pairs[..., 0].long(), batch.pairs[..., 1].long()
        inside = (ti >= 0) & (ti < tm.shape[1]) & (sj >= 0) & (sj < sm.shape[1])
        ti, sj = ti.clamp(0, max(tm.shape[1] - 1, 0)), sj.clamp(0, max(sm.shape[1] - 1, 0))
        valid = batch.pair_mask & inside  # type: ignore[operator]
        if not (tm.shape[1] and sm.shape[1]):
            return ti, sj, torch.zeros_like(valid)
        return ti, sj, valid & tm.gather(1, ti) & sm.gather(1, sj)
    raise ValueError(f"unknown pairing {pairing!r}: use 'index' or 'aligned'")
