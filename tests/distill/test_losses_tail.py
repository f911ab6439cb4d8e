"""The sampled-tail KL estimators (``distill/losses_tail.py``) are unbiased: their exact expectation over the
draws, enumerated on small vocabularies, equals the dense KL, for the value and for the gradient w.r.t. the
student logits."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from logitcache.distill.losses_tail import sampled_tail_forward_kl, sampled_tail_reverse_kl, tail_mass


def _dense(lp: torch.Tensor, ls: torch.Tensor, reverse: bool) -> torch.Tensor:
    p, s = lp.exp(), ls.exp()
    return (s * (ls - lp)).sum(-1) if reverse else (p * (lp - ls)).sum(-1)


def _expected(lp: torch.Tensor, z: torch.Tensor, k: int, n: int, reverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """E over n iid draws from the teacher's tail of the estimate and of its gradient w.r.t. z (one row)."""
    fn = sampled_tail_reverse_kl if reverse else sampled_tail_forward_kl
    top_lp, top_i = lp.topk(k)
    tail = [v for v in range(lp.shape[0]) if v not in set(top_i.tolist())]
    m = 1 - top_lp.exp().sum()
    value = torch.zeros((), dtype=torch.float64)
    grad = torch.zeros_like(z)
    for draw in itertools.product(tail, repeat=n):
        q = torch.prod(torch.stack([lp[j].exp() / m for j in draw]))
        zz = z.clone().requires_grad_(True)
        ids = torch.tensor([list(draw)])
        est = fn(torch.log_softmax(zz, -1)[None], top_i[None], top_lp[None], ids, lp[ids])[0]
        est.backward()
        value = value + q * est.detach()
        grad = grad + q * zz.grad
    return value, grad


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    vocab=st.integers(3, 8),
    n=st.integers(1, 2),
    reverse=st.booleans(),
    spread=st.sampled_from([0.5, 2.0, 5.0]),
)
def test_expectation_equals_the_dense_kl(seed: int, vocab: int, n: int, reverse: bool, spread: float) -> None:
    g = torch.Generator().manual_seed(seed)
    k = int(torch.randint(1, vocab - 1, (1,), generator=g))  # at least two ids in the tail
    lp = torch.log_softmax(torch.randn(vocab, generator=g, dtype=torch.float64) * spread, -1)
    z = torch.randn(vocab, generator=g, dtype=torch.float64) * spread
    value, grad = _expected(lp, z, k, n, reverse)
    zz = z.clone().requires_grad_(True)
    dense = _dense(lp, torch.log_softmax(zz, -1), reverse)
    dense.backward()
    torch.testing.assert_close(value, dense.detach(), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(grad, zz.grad, rtol=1e-8, atol=1e-10)


def test_one_draw_is_not_the_dense_value_but_the_top_k_part_is_exact() -> None:
    """Precondition of the test above: the estimate of a single draw differs from the dense KL (else the
    expectation test could pass with a constant)."""
    lp = torch.log_softmax(torch.tensor([3.0, 1.0, 0.5, 0.0, -1.0], dtype=torch.float64), -1)
    ls = torch.log_softmax(torch.tensor([0.0, 1.0, 2.0, 0.0, 0.0], dtype=torch.float64), -1)
    top_lp, top_i = lp.topk(2)
    est = sampled_tail_forward_kl(ls[None], top_i[None], top_lp[None], torch.tensor([[4]]), lp[[4]][None])
    assert abs(float(est) - float(_dense(lp, ls, False))) > 1e-3
    full = sampled_tail_forward_kl(ls[None], torch.arange(5)[None], lp[None], torch.zeros(1, 0, dtype=torch.long),
                                   torch.zeros(1, 0, dtype=torch.float64))
    torch.testing.assert_close(full[0], _dense(lp, ls, False))  # the whole support cached: exact, no draws
    assert float(tail_mass(lp[None])[0]) == pytest.approx(0.0, abs=1e-12)


def test_refusals() -> None:
    lp = torch.log_softmax(torch.randn(1, 6, dtype=torch.float64), -1)
    top_lp, top_i = lp.topk(2)
    with pytest.raises(ValueError, match="same shape"):
        sampled_tail_forward_kl(lp, top_i, top_lp[:, :1], top_i, top_lp)
    with pytest.raises(ValueError, match="needs tail samples"):
        sampled_tail_reverse_kl(lp, top_i, top_lp, top_i[:, :0], top_lp[:, :0])
