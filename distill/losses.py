"""Distillation losses on sparse cached teacher distributions: one calling convention, a registry by name,
and a weighted combination parsed from a spec such as ``"ce:1,mlot:0.15"``.

Every loss is ``fn(batch: DistillBatch, config=None, stats: StudentStats | None = None) -> LossOutput``:
``per_sequence`` [B] (a mean over the sequence's tokens / pairs / chunks), ``count`` [B] and ``value``
(the batch reduction chosen by ``config.reduction``: ``"token"`` weights every term equally, ``"sequence"``
averages sequences). Softmax and log-softmax run in float32 (float64 for float64 inputs). The maths, the
shapes and the sparse-cache approximations are written down in ``docs/losses.md``.

Registry (:data:`LOSSES`): ``ce``, ``kl`` (forward), ``rkl`` (reverse), ``uld``, ``mlot``, ``alm``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import Tensor

from logitcache.config import ConfigError

from .losses_alm import ALMConfig, alm_loss
from .losses_core import (
    NEG,
    DistillBatch,
    LossOutput,
    MissingStatistic,
    Pairing,
    Reduction,
    Tempered,
    finish,
    gather_rows,
    missing_lse_message,
    reduce_per_sequence,
    teacher_logprobs_at,
    token_pairs,
)
from .losses_ot import MLOTConfig, ULDConfig, mlot_loss, sinkhorn_plan, uld_loss
from .losses_student import StudentStats, gather_log_softmax, student_logprobs_at
from .losses_tail import sampled_tail_reverse_kl, tail_mass

__all__ = [
    "LOSSES",
    "ALMConfig",
    "CEConfig",
    "CombinedLoss",
    "CombinedOutput",
    "DistillBatch",
    "KLConfig",
    "LossEntry",
    "LossOutput",
    "MLOTConfig",
    "MissingStatistic",
    "StudentStats",
    "ULDConfig",
    "alm_loss",
    "ce_loss",
    "check_statistics",
    "exact_losses",
    "gather_log_softmax",
    "kl_loss",
    "loss_temperatures",
    "mlot_loss",
    "parse_loss_spec",
    "reduce_per_sequence",
    "required_temperatures",
    "sinkhorn_plan",
    "teacher_logprobs_at",
    "token_pairs",
    "uld_loss",
]


# ---- ce ----------------------------------------------------------------------------------------------


@dataclass
class CEConfig:
    """Cross-entropy on the student's own tokenization of the completion."""

    ignore_index: int = -100
    reduction: Reduction = "token"


def ce_loss(batch: DistillBatch, config: CEConfig | None = None, stats: StudentStats | None = None) -> LossOutput:
    """``-log s_j(y_j)`` per valid student row j (``student_mask`` and target != ignore_index).

    Shapes: student_logits [B, Ts, V], student_targets [B, Ts]. per_sequence: mean over valid rows; count:
    number of valid rows. Teacher rows are not used.
    """
    cfg = config or CEConfig()
    stats = stats or StudentStats(batch)
    y = batch.student_targets.long()
    v = batch.student_logits.shape[-1]
    valid = batch.student_mask & (y != cfg.ignore_index)
    if bool(((y < 0) | (y >= v))[valid].any()):
        raise ValueError(f"student_targets hold ids outside the student vocabulary [0, {v}) at valid rows")
    lp = student_logprobs_at(batch, stats, torch.where(valid, y, 0)[..., None], [1.0])[0][..., 0]
    nll = torch.where(valid, -lp, torch.zeros_like(lp))
    count = valid.sum(1).to(nll.dtype)
    return finish(nll.sum(1) / count.clamp_min(1.0), count, cfg.reduction)


# ---- kl ----------------------------------------------------------------------------------------------


@dataclass
class KLConfig:
    """KL between the teacher's cached row and the student's row (same tokenizer only).

    ``direction``: ``forward`` KL(t || s) or ``reverse`` KL(s || t). ``tail`` (the teacher mass outside the
    cached top-K): ``ignore`` sums over the cached ids only; ``renormalize`` renormalizes the teacher within
    the top-K (forward; the student keeps its full softmax) or both sides within the top-K (reverse);
    ``bucket`` adds one "everything else" category to both sides (a lower bound of the full KL, exact when
    the tail is 0). ``tau``: temperature of both sides. ``eps`` floors the teacher's tail bucket in reverse KL.
    ``tempered``: teacher rows at tau != 1 ``exact`` (needs the cache's lse at tau; refuses without) or
    ``renormalize`` within the top-K (the explicit approximation). ``sampled`` (tau = 1 only) estimates the tail
    from the cache's tail draws (``generate --tail-samples N``), unbiased (``distill.losses_tail``, docs/losses.md
    section 9); forward gathers the student at the K + N ids, reverse reads its full log-softmax of the paired rows
    (refused with ``--fused-head``).
    """

    direction: Literal["forward", "reverse"] = "forward"
    tail: Literal["ignore", "renormalize", "bucket", "sampled"] = "bucket"
    tau: float = 1.0
    tempered: Tempered = "exact"
    pairing: Pairing = "index"
    eps: float = 1e-8
    reduction: Reduction = "token"


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, stable at both ends (x is clamped to <= -1e-12)."""
    x = x.clamp(max=-1e-12)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def kl_loss(batch: DistillBatch, config: KLConfig | None = None, stats: StudentStats | None = None) -> LossOutput:
    """Per valid pair (teacher row i, student row j), the KL of ``config.direction`` over the cached ids.

    Shapes: teacher_topk_ids/logprobs [B, Tt, K] (ids index the shared vocabulary), student_logits
    [B, Ts, V]. Pairs from :func:`token_pairs` (``index``: row r with row r). Entries with logprob -inf are
    absent. per_sequence: mean over valid pairs; count: number of valid pairs.
    """
    cfg = config or KLConfig()
    if not batch.same_vocab:
        raise ValueError(
            "kl needs teacher and student to share one vocabulary (batch.same_vocab=False); "
            "use uld, mlot or alm across tokenizers"
        )
    if cfg.direction not in ("forward", "reverse"):
        raise ValueError(f"KLConfig.direction must be 'forward' or 'reverse', got {cfg.direction!r}")
    if cfg.tail not in ("ignore", "renormalize", "bucket", "sampled"):
        raise ValueError(f"KLConfig.tail must be 'ignore', 'renormalize', 'bucket' or 'sampled', got {cfg.tail!r}")
    if cfg.tail == "sampled":
        return _sampled_tail_kl(batch, cfg, stats)
    stats = stats or StudentStats(batch)
    b, ts, v = batch.student_logits.shape
    ti, sj, valid = token_pairs(batch, cfg.pairing)
    logq, tail = teacher_logprobs_at(batch, cfg.tau, cfg.tempered, "kl" if cfg.direction == "forward" else "rkl")
    logq, tail = gather_rows(logq, ti), gather_rows(tail, ti)  # [B, P, K], [B, P]
    ids = gather_rows(batch.teacher_topk_ids.long(), ti)
    present = torch.isfinite(logq) & valid[..., None]
    if bool(((ids < 0) | (ids >= v))[present].any()):
        raise ValueError(f"teacher ids fall outside the student vocabulary [0, {v}) although same_vocab=True")
    rows = (torch.arange(b, device=ids.device)[:, None] * ts + sj).reshape(-1)
    slp = stats.gather(rows, torch.where(present, ids, 0).reshape(rows.numel(), -1), cfg.tau)
    slp = torch.where(present, slp.view_as(logq), torch.zeros_like(logq))
    lq = torch.where(present, logq, torch.zeros_like(logq))
    q = torch.where(present, torch.exp(lq), torch.zeros_like(lq))
    s = torch.where(present, torch.exp(slp), torch.zeros_like(slp))
    # log of the student's mass on the cached ids, and of the rest (a finite sentinel where nothing is cached)
    s_in = torch.logsumexp(torch.where(present, slp, torch.full_like(slp, NEG)), -1)
    if cfg.direction == "forward":
        if cfg.tail == "renormalize":
            qs = q.sum(-1, keepdim=True)
            qn = q / qs.clamp_min(1e-30)
            d = (qn * (lq - torch.log(qs.clamp_min(1e-30)) - slp)).sum(-1)
        else:
            d = (q * (lq - slp)).sum(-1)
            if cfg.tail == "bucket":
                d = d + torch.xlogy(tail, tail) - tail * _log1mexp(s_in)
    else:
        # reverse KL weighs log-ratios by the student's probability: where a student logit is -inf that
        # probability is 0 and the term is 0 (0 log 0), so the log is masked to a finite value BEFORE the
        # product (a torch.where after it would still send 0 * inf = NaN into the gradient)
        alive = present & torch.isfinite(slp)
        slp_f = torch.where(alive, slp, torch.zeros_like(slp))
        if cfg.tail == "renormalize":
            q_in = torch.logsumexp(torch.where(present, lq, torch.full_like(lq, NEG)), -1, keepdim=True)
            zero = torch.zeros_like(lq)
            ls_n = torch.where(alive, slp_f - s_in[..., None], zero)  # log of the renormalized student
            lq_n = torch.where(present, lq - q_in, zero)
            d = (torch.where(alive, torch.exp(ls_n), zero) * (ls_n - lq_n)).sum(-1)
        else:
            d = (s * (slp_f - lq)).sum(-1)
            if cfg.tail == "bucket":
                log_s_tail = _log1mexp(s_in)
                s_tail = torch.exp(log_s_tail)
                d = d + s_tail * (log_s_tail - torch.log(tail.clamp_min(cfg.eps)))
    d = torch.where(valid, d, torch.zeros_like(d))
    count = valid.sum(1).to(d.dtype)
    return finish(d.sum(1) / count.clamp_min(1.0), count, cfg.reduction)


def _sampled_tail_kl(batch: DistillBatch, cfg: KLConfig, stats: StudentStats | None) -> LossOutput:
    """``kl_loss`` with ``tail="sampled"``: per valid pair, ``losses_tail``'s unbiased estimate from the top-K and
    the cached tail draws. Forward reads the student's logprobs at the K + N ids only (``StudentStats.gather``:
    chunked, and through ``--fused-head``); reverse needs the student's entropy over the whole vocabulary and reads
    its full log-softmax of the paired rows (a ``[pairs, V]`` copy; refused with the fused head, which never
    materializes the logits)."""
    if batch.teacher_tail_ids is None or batch.teacher_tail_logprobs is None:
        raise ValueError(f"kl tail='sampled': the batch has no tail draws; {_NO_DRAWS}")
    if cfg.tau != 1.0:
        raise ValueError(f"kl tail='sampled' needs tau = 1 (the draws are from the teacher at temperature 1), got "
                         f"{cfg.tau:g}")
    reverse = cfg.direction == "reverse"
    if reverse and batch.student_head is not None:
        raise ValueError("rkl tail='sampled' needs the student's full logits, which --fused-head never builds; "
                         "drop --fused-head or use kl (forward)")
    b, ts, v = batch.student_logits.shape
    ti, sj, valid = token_pairs(batch, cfg.pairing)
    top_ids, top_lp = gather_rows(batch.teacher_topk_ids.long(), ti), gather_rows(batch.teacher_topk_logprobs, ti)
    tail_ids = gather_rows(batch.teacher_tail_ids.long(), ti)
    tail_lp = gather_rows(batch.teacher_tail_logprobs, ti)
    # a draw of logprob -inf comes from a row whose tail mass is 0 (weight 0): a finite stand-in keeps the reverse
    # estimator's importance weight s / p finite, so no 0 * inf reaches the gradient
    tail_lp = torch.where(torch.isfinite(tail_lp), tail_lp, torch.zeros_like(tail_lp))
    live = valid[..., None]
    ids_ok = torch.where(live & torch.isfinite(top_lp), (top_ids >= 0) & (top_ids < v), True).all()
    if not bool(ids_ok & torch.where(live, (tail_ids >= 0) & (tail_ids < v), True).all()):
        raise ValueError(f"teacher ids fall outside the student vocabulary [0, {v}) although same_vocab=True")
    rows = (torch.arange(b, device=sj.device)[:, None] * ts + sj).reshape(-1)
    n, k, fdt = rows.numel(), top_ids.shape[-1], top_lp.dtype

    def flat(t: Tensor) -> Tensor:  # invalid pairs read id 0 / tail logprob 0 (finite stand-ins), masked below
        t = t.reshape(n, -1)
        return torch.where(valid.reshape(n, 1), t, torch.zeros_like(t))

    t_ids, t_lp, d_ids, d_lp = flat(top_ids), top_lp.reshape(n, k), flat(tail_ids), flat(tail_lp)
    if reverse:
        fdt = torch.promote_types(batch.student_logits.dtype, torch.float32)
        slp = torch.log_softmax(batch.student_logits.reshape(b * ts, v)[rows].to(fdt), dim=-1)
        d = sampled_tail_reverse_kl(slp, t_ids, t_lp.to(fdt), d_ids, d_lp.to(fdt))
    else:  # sampled_tail_forward_kl's formula on the gathered logprobs (tested equal to it)
        stats = stats or StudentStats(batch)
        ls = stats.gather(rows, torch.cat([t_ids, d_ids], 1), 1.0).view(n, -1).to(fdt)
        p = t_lp.exp()
        d = torch.where(p > 0, p * (t_lp - ls[:, :k]), torch.zeros_like(p)).sum(-1)
        m = tail_mass(t_lp)
        tail = (d_lp - ls[:, k:]).sum(-1) * (m / d_ids.shape[1])
        d = d + torch.where(m > 0, tail, torch.zeros_like(tail))
    d = d.view(b, -1)
    d = torch.where(valid, d, torch.zeros_like(d))
    count = valid.sum(1).to(d.dtype)
    return finish(d.sum(1) / count.clamp_min(1.0), count, cfg.reduction)


_NO_DRAWS = "recapture with `logitcache generate --tail-samples N` (e.g. 16), or use tail='bucket'"


# ---- registry, spec, combination ---------------------------------------------------------------------


@dataclass(frozen=True)
class LossEntry:
    """A registered loss: its function, its config dataclass and the config defaults of this name."""

    fn: Callable[..., LossOutput]
    config_cls: type
    defaults: Mapping[str, Any] = field(default_factory=dict)

    def make_config(self, **overrides: Any) -> Any:
        return self.config_cls(**{**self.defaults, **overrides})

    def __call__(self, batch: DistillBatch, config: Any = None, stats: StudentStats | None = None) -> LossOutput:
        """Run the loss; ``config=None`` uses this name's defaults (``rkl`` is reverse KL)."""
        return self.fn(batch, self.make_config() if config is None else config, stats)


LOSSES: dict[str, LossEntry] = {
    "ce": LossEntry(ce_loss, CEConfig),
    "kl": LossEntry(kl_loss, KLConfig, {"direction": "forward"}),
    "rkl": LossEntry(kl_loss, KLConfig, {"direction": "reverse"}),
    "uld": LossEntry(uld_loss, ULDConfig),
    "mlot": LossEntry(mlot_loss, MLOTConfig),
    "alm": LossEntry(alm_loss, ALMConfig),
}


def parse_loss_spec(spec: str) -> list[tuple[str, float]]:
    """``"ce:1,mlot:0.15"`` -> ``[("ce", 1.0), ("mlot", 0.15)]``. A term without ``:weight`` weighs 1.

    Raises ``ValueError`` naming the bad term: empty terms, unknown names, weights that are not finite
    non-negative numbers, repeated names.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"empty loss spec {spec!r}: expected e.g. 'ce:1,mlot:0.15'")
    out: list[tuple[str, float]] = []
    for pos, raw in enumerate(spec.split(","), start=1):
        term = raw.strip()
        if not term:
            raise ValueError(f"empty term #{pos} in loss spec {spec!r}")
        name, sep, w = (x.strip() for x in term.partition(":"))
        if name not in LOSSES:
            raise ValueError(f"unknown loss {name!r} in term {term!r}; known: {', '.join(sorted(LOSSES))}")
        if sep and ":" in w:
            raise ValueError(f"term {term!r} has more than one ':'")
        try:
            weight = float(w) if sep else 1.0
        except ValueError:
            raise ValueError(f"weight {w!r} of term {term!r} is not a number") from None
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"weight of term {term!r} must be a finite number >= 0")
        if any(n == name for n, _ in out):
            raise ValueError(f"loss {name!r} appears twice in {spec!r}")
        out.append((name, weight))
    return out


# ---- row statistics each loss needs --------------------------------------------------------------


def _config_of(name: str, config: Any) -> Any:
    entry = LOSSES[name]
    if config is None:
        return entry.make_config()
    if isinstance(config, Mapping):
        try:
            return entry.make_config(**config)
        except TypeError as e:
            raise ConfigError(f"--loss-config: {name}: {e}") from None
    return config


def loss_temperatures(name: str, config: Any = None) -> dict[str, float]:
    """The teacher temperatures other than 1 that loss ``name`` reads with ``config`` (``None``: its defaults),
    by config field; empty when the loss is exact on any cache (``ce``, ``alm``, tau = 1) or its config chooses
    ``tempered="renormalize"``. Every one needs ``lse@<tau>`` and ``lse@1`` in the cache to be exact."""
    cfg = _config_of(name, config)
    if getattr(cfg, "tempered", "renormalize") != "exact":
        return {}
    if isinstance(cfg, KLConfig | ULDConfig):
        fields = {"tau": cfg.tau}
    elif isinstance(cfg, MLOTConfig):
        fields = {"tau_had": cfg.tau_had, "tau_sl": cfg.tau_sl, "rank_tau": cfg.rank_tau}
        if cfg.gamma != 0.0:
            fields["tau_sd"] = cfg.tau_sd
    else:  # ce, alm: the realized tokens' logprobs only, exact at every tau
        return {}
    return {f: float(t) for f, t in fields.items() if float(t) != 1.0}


def _terms(spec: str | Sequence[tuple[str, float]]) -> list[str]:
    return [n for n, _ in (parse_loss_spec(spec) if isinstance(spec, str) else spec)]


def required_temperatures(
    spec: str | Sequence[tuple[str, float]], configs: Mapping[str, Any] | None = None
) -> set[float]:
    """The ``lse@<tau>`` statistics a cache must hold for ``spec`` (with ``configs``) to be exact: the losses'
    temperatures other than 1, plus 1.0 whenever there is one (the cached logprobs are normalized at tau = 1)."""
    configs = configs or {}
    taus = {t for n in _terms(spec) for t in loss_temperatures(n, configs.get(n)).values()}
    return taus | {1.0} if taus else set()


def check_statistics(
    spec: str | Sequence[tuple[str, float]],
    configs: Mapping[str, Any] | None,
    available: Sequence[float],
    tail_samples: int | None = None,
    fused_head: bool = False,
) -> None:
    """Raise ``ConfigError`` (one line: the loss, the missing statistic, the fix) when a loss of ``spec`` needs a
    row statistic that the cache (recording ``available`` temperatures and ``tail_samples`` tail draws per
    position; ``None``: not checked) lacks. Called before training starts."""
    configs = configs or {}
    have = {float(t) for t in available}
    for n in _terms(spec):
        cfg = _config_of(n, configs.get(n))
        if isinstance(cfg, KLConfig) and cfg.tail == "sampled":
            if cfg.tau != 1.0:
                raise ConfigError(f"--loss {n} (tail=sampled, tau={cfg.tau:g}): the tail draws are at temperature "
                                  "1; set tau to 1 or use tail='bucket'")
            if fused_head and cfg.direction == "reverse":
                raise ConfigError(f"--loss {n} (tail=sampled): reverse KL's estimator needs the student's full "
                                  "logits, which --fused-head never builds; drop --fused-head or use kl")
            if tail_samples is not None and tail_samples < 1:
                raise ConfigError(f"--loss {n} (tail=sampled): the cache has no tail draws (--tail-samples 0); "
                                  + _NO_DRAWS)
        for fname, tau in loss_temperatures(n, configs.get(n)).items():
            if not {tau, 1.0} <= have:
                raise ConfigError(f"--loss {n} ({fname}={tau:g}): " + missing_lse_message(n, tau, sorted(have)))


def exact_losses(available: Sequence[float]) -> list[str]:
    """The registered losses that are exact (with their default configs) on a cache recording ``available``."""
    have = {float(t) for t in available}
    return [n for n in LOSSES if required_temperatures([(n, 1.0)]) <= have]


@dataclass
class CombinedOutput:
    """``total`` = sum(weight * component.value); ``components`` by name (each a :class:`LossOutput`)."""

    total: Tensor
    components: dict[str, LossOutput]
    weights: dict[str, float]

    def log(self) -> dict[str, float]:
        """Scalars for logging: ``loss``, ``loss/<name>`` (unweighted) and ``loss/<name>/<part>``."""
        out = {"loss": float(self.total.detach())}
        for name, c in self.components.items():
            out[f"loss/{name}"] = float(c.value.detach())
            for part, v in c.parts.items():
                out[f"loss/{name}/{part}"] = float(reduce_per_sequence(v.detach(), c.count, "token"))
        return out


class CombinedLoss:
    """A weighted sum of registered losses, e.g. ``CombinedLoss("ce:1,mlot:0.15")``.

    ``configs`` maps a name to its config (or to a dict of overrides of that name's defaults). The terms
    share one :class:`StudentStats`, so vocabulary-wide student statistics are computed once per batch.
    With ``ce:1,mlot:alpha`` this is the paper's ``L_CE + alpha (L_HAD + beta L_SL + gamma L_SD)``.
    """

    def __init__(self, spec: str | Sequence[tuple[str, float]], configs: Mapping[str, Any] | None = None):
        self.terms = parse_loss_spec(spec) if isinstance(spec, str) else [(n, float(w)) for n, w in spec]
        for n, _ in self.terms:
            if n not in LOSSES:
                raise ValueError(f"unknown loss {n!r}; known: {', '.join(sorted(LOSSES))}")
        configs = dict(configs or {})
        unknown = set(configs) - {n for n, _ in self.terms}
        if unknown:
            raise ValueError(f"configs given for losses not in the spec: {sorted(unknown)}")
        self.configs: dict[str, Any] = {}
        for n, _ in self.terms:
            c = configs.get(n)
            entry = LOSSES[n]
            if c is None:
                c = entry.make_config()
            elif isinstance(c, Mapping):
                c = entry.make_config(**c)
            elif not isinstance(c, entry.config_cls):
                raise ValueError(f"config for {n!r} must be a {entry.config_cls.__name__} or a dict")
            else:
                c = replace(c)
            self.configs[n] = c

    def __call__(self, batch: DistillBatch) -> CombinedOutput:
        stats = StudentStats(batch)
        comps: dict[str, LossOutput] = {}
        total: Tensor | None = None
        for n, w in self.terms:
            out = LOSSES[n](batch, self.configs[n], stats)
            comps[n] = out
            total = out.value * w if total is None else total + out.value * w
        assert total is not None
        return CombinedOutput(total, comps, dict(self.terms))

    def __repr__(self) -> str:
        return "CombinedLoss(" + ",".join(f"{n}:{w:g}" for n, w in self.terms) + ")"
