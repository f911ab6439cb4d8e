"""Unbiased KL estimators from a top-K cache plus samples of the teacher's tail (issue 16).

``generate --tail-samples N`` stores, per position, beyond the top-K, ``N`` ids drawn with
replacement from the teacher's *tail* ``q(v) = p(v) / m`` for ``v`` outside the top-K, where
``m = 1 - sum_K p`` (known from the cached logprobs: they are normalized over the full vocabulary), together with
their logprobs ``log p(j_n)``. The proposal probability of a draw is ``p(j_n) / m``: the stored logprob and ``m``
give it, nothing else is needed. ``kl``/``rkl`` with ``tail="sampled"`` call these functions
(``distill.losses``), and ``bench/tail_fidelity.py`` measures them on real models.

Forward KL, ``KL(p || s) = sum_v p(v) (log p(v) - log s(v))``::

    sum_K p (lp - ls) + (m / N) sum_n (lp(j_n) - ls(j_n))

is unbiased for the full KL and, being linear in ``ls``, so is its gradient w.r.t. the student logits
(``s * sum(p_hat) - p_hat`` with ``p_hat = p`` on the top-K plus ``m / N`` per draw).

Reverse KL, ``KL(s || p) = sum_v s(v) log s(v) - sum_v s(v) log p(v)``: the student's entropy term is exact (the
student's full row is at hand); the cross term over the tail is importance-sampled with the same draws::

    sum_v s log s - sum_K s lp - (m / N) sum_n s(j_n) lp(j_n) / p(j_n)

Unbiased too, but its variance grows where the student puts mass on ids the teacher finds unlikely (weights
``s / p``), which is reverse KL's own failure mode; prefer forward KL with a sampled tail.

Shapes: ``student_logprobs [R, V]`` (log-softmax over the student's vocabulary, same ids as the teacher's),
``top_ids``/``top_logprobs [R, K]``, ``tail_ids``/``tail_logprobs [R, N]``; returns the per-row estimate ``[R]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["sampled_tail_forward_kl", "sampled_tail_reverse_kl", "tail_mass"]


def tail_mass(top_logprobs: Tensor) -> Tensor:
    """``m = 1 - sum_K exp(lp)`` per row, clamped at 0 (float64 sum: rows whose top-K holds almost all mass)."""
    return (1.0 - top_logprobs.double().exp().sum(-1)).clamp_min(0.0).to(top_logprobs.dtype)


def _check(student_logprobs: Tensor, top_ids: Tensor, top_logprobs: Tensor, tail_ids: Tensor,
           tail_logprobs: Tensor) -> None:
    r = student_logprobs.shape[0]
    if top_ids.shape != top_logprobs.shape or tail_ids.shape != tail_logprobs.shape:
        raise ValueError(f"ids and logprobs must have the same shape: top {tuple(top_ids.shape)} vs "
                         f"{tuple(top_logprobs.shape)}, tail {tuple(tail_ids.shape)} vs {tuple(tail_logprobs.shape)}")
    if top_ids.shape[0] != r or tail_ids.shape[0] != r:
        raise ValueError(f"rows differ: student {r}, top-K {top_ids.shape[0]}, tail {tail_ids.shape[0]}")


def _terms(student_logprobs: Tensor, ids: Tensor, logprobs: Tensor) -> tuple[Tensor, Tensor]:
    """The teacher's logprobs at ``ids`` (``-inf`` where absent) and the student's logprobs there."""
    ls = student_logprobs.gather(-1, ids.long())
    return logprobs, ls


def sampled_tail_forward_kl(
    student_logprobs: Tensor, top_ids: Tensor, top_logprobs: Tensor, tail_ids: Tensor, tail_logprobs: Tensor
) -> Tensor:
    """Unbiased estimate of ``KL(p || s)`` per row (see the module docstring)."""
    _check(student_logprobs, top_ids, top_logprobs, tail_ids, tail_logprobs)
    lp, ls = _terms(student_logprobs, top_ids, top_logprobs)
    p = lp.exp()
    top = torch.where(p > 0, p * (lp - ls), torch.zeros_like(p)).sum(-1)
    n = tail_ids.shape[-1]
    if n == 0:
        return top
    m = tail_mass(top_logprobs)
    tl, ts = _terms(student_logprobs, tail_ids, tail_logprobs)
    tail = (tl - ts).sum(-1) * (m / n)
    return top + torch.where(m > 0, tail, torch.zeros_like(tail))


def sampled_tail_reverse_kl(
    student_logprobs: Tensor, top_ids: Tensor, top_logprobs: Tensor, tail_ids: Tensor, tail_logprobs: Tensor
) -> Tensor:
    """Unbiased estimate of ``KL(s || p)`` per row (see the module docstring). Needs ``N >= 1`` unless the
    top-K holds all of the teacher's mass (then it is exact)."""
    _check(student_logprobs, top_ids, top_logprobs, tail_ids, tail_logprobs)
    s_all = student_logprobs.exp()
    entropy_term = torch.where(s_all > 0, s_all * student_logprobs, torch.zeros_like(s_all)).sum(-1)
    lp, ls = _terms(student_logprobs, top_ids, top_logprobs)
    present = lp > float("-inf")  # -inf: absent; masked BEFORE the product (0 * -inf would NaN the gradient)
    cross_top = (ls.exp() * torch.where(present, lp, torch.zeros_like(lp))).sum(-1)
    m = tail_mass(top_logprobs)
    n = tail_ids.shape[-1]
    if n == 0:
        if bool((m > 0).any()):
            raise ValueError("reverse KL with a tail of nonzero mass needs tail samples (N >= 1)")
        return entropy_term - cross_top
    tl, ts = _terms(student_logprobs, tail_ids, tail_logprobs)
    weight = ts.exp() / tl.exp()  # s(j) / p(j): importance weight of the draw, times m / N below
    cross_tail = (weight * tl).sum(-1) * (m / n)
    return entropy_term - cross_top - torch.where(m > 0, cross_tail, torch.zeros_like(cross_tail))
