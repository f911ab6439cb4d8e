"""The losses under train's bf16 autocast, and reverse KL with -inf student logits.

Training on GPU wraps the forward and the losses in ``torch.autocast(dtype=bfloat16)``; autocast then runs every
matmul in bf16 unless the code opts out. The losses must not notice: their softmaxes, log-softmaxes and the
Sinkhorn iteration of ``mlot`` stay in fp32 (CPU autocast exercises the same mechanism, so these run anywhere).
"""

from __future__ import annotations

import pytest
import torch
from loss_helpers import make_batch, random_seqs

from logitcache.distill.losses import LOSSES, CombinedLoss, KLConfig, kl_loss, sinkhorn_plan


def autocast(enabled: bool = True) -> torch.autocast:
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


def test_autocast_runs_matmuls_in_bf16_here():
    """Precondition: on this torch, CPU autocast really lowers matmuls (else the tests below prove nothing)."""
    a = torch.rand(4, 4)
    with autocast():
        assert (a @ a).dtype == torch.bfloat16


def test_sinkhorn_marginals_under_autocast():
    g = torch.Generator().manual_seed(0)
    cost = torch.rand(2, 30, 25, generator=g) * 2
    rows = torch.ones(2, 30, dtype=torch.bool)
    cols = torch.ones(2, 25, dtype=torch.bool)
    rows[1, 20:] = False
    cols[1, 17:] = False
    ref = sinkhorn_plan(cost, rows, cols, lam=0.1, iters=200)
    with autocast():
        plan = sinkhorn_plan(cost, rows, cols, lam=0.1, iters=200)
    assert plan.dtype == torch.float32
    n_r = rows.sum(1, keepdim=True).float()
    n_c = cols.sum(1, keepdim=True).float()
    want_rows = torch.where(rows, 1.0 / n_r, torch.zeros_like(n_r))
    want_cols = torch.where(cols, 1.0 / n_c, torch.zeros_like(n_c))
    # precondition: 200 iterations converge in fp32 (the bound the autocast run must meet too)
    assert (ref.sum(2) - want_rows).abs().max() < 1e-6
    assert (plan.sum(2) - want_rows).abs().max() < 1e-6
    assert (plan.sum(1) - want_cols).abs().max() < 1e-6
    torch.testing.assert_close(plan, ref, rtol=1e-5, atol=1e-8)


def test_sinkhorn_bf16_cost_runs_in_fp32():
    g = torch.Generator().manual_seed(1)
    cost = (torch.rand(1, 12, 9, generator=g) * 2).to(torch.bfloat16)
    rows, cols = torch.ones(1, 12, dtype=torch.bool), torch.ones(1, 9, dtype=torch.bool)
    plan = sinkhorn_plan(cost, rows, cols, iters=200)
    assert plan.dtype == torch.float32
    assert (plan.sum(1) - 1 / 9).abs().max() < 1e-6
    assert (plan.sum(2) - 1 / 12).abs().max() < 1e-6


@pytest.mark.parametrize("logits_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_under_autocast_matches_full_precision(name, logits_dtype):
    """Every registered loss gives the same value and gradient with and without autocast: nothing inside it
    (softmax, log-softmax, cdist, Sinkhorn) is lowered to bf16. bf16 logits (a bf16 model's output) too."""
    same = name in ("kl", "rkl")
    g = torch.Generator().manual_seed(2)
    seqs = random_seqs(3, 40, 40 if same else 33, g, lengths=[(12, 12), (9, 10), (12, 11)], dtype=torch.float32)
    results = []
    for enabled in (False, True):
        b = make_batch(seqs, 8, same_vocab=same, grad=False)
        b.student_logits = b.student_logits.detach().to(logits_dtype).requires_grad_(True)
        with autocast(enabled):
            out = LOSSES[name](b)
            out.value.backward()
        assert out.value.dtype == torch.float32
        results.append((out.value.detach(), b.student_logits.grad.float()))
    (v0, g0), (v1, g1) = results
    assert torch.isfinite(v0) and torch.isfinite(g0).all()
    torch.testing.assert_close(v1, v0, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "spec, same", [("ce:1,mlot:0.15,uld:0.5,alm:1", False), ("ce:1,kl:0.5,rkl:0.5,mlot:0.1", True)]
)
def test_combined_loss_under_autocast_matches_full_precision(spec, same):
    """The shared student statistics (one pass for all terms) stay fp32 under autocast too, as train uses them."""
    g = torch.Generator().manual_seed(4)
    seqs = random_seqs(2, 40, 40 if same else 29, g, lengths=[(10, 11), (8, 7)], dtype=torch.float32)
    results = []
    for enabled in (False, True):
        b = make_batch(seqs, 8, same_vocab=same, grad=False)
        b.student_logits = b.student_logits.detach().to(torch.bfloat16).requires_grad_(True)
        with autocast(enabled):
            out = CombinedLoss(spec)(b)
            out.total.backward()
        results.append((out.total.detach(), b.student_logits.grad.float()))
    (v0, g0), (v1, g1) = results
    torch.testing.assert_close(v1, v0, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("tail", ["ignore", "renormalize", "bucket"])
def test_rkl_with_minus_inf_student_logit_is_finite(tail):
    """A student logit of -inf at a cached teacher id: probability 0, so its reverse-KL term is 0 (0 log 0), and
    the loss and gradient equal those with a logit so low that its probability underflows to 0 anyway."""
    g = torch.Generator().manual_seed(3)
    seqs = random_seqs(2, 30, 30, g, lengths=[(5, 5), (4, 4)], dtype=torch.float32)
    base = make_batch(seqs, 6, same_vocab=True, grad=False)
    victim = int(base.teacher_topk_ids[0, 1, 0])  # the teacher's top id at row 1: paired with student row 1
    outs = []
    for low in (float("-inf"), -1e4):
        b = make_batch(seqs, 6, same_vocab=True, grad=False)
        z = b.student_logits.detach().clone()
        z[0, 1, victim] = low
        b.student_logits = z.requires_grad_(True)
        out = kl_loss(b, KLConfig(direction="reverse", tail=tail))
        out.value.backward()
        outs.append((out.value.detach(), b.student_logits.grad))
    (v_inf, g_inf), (v_low, g_low) = outs
    assert torch.isfinite(v_inf), v_inf
    assert torch.isfinite(g_inf).all()
    torch.testing.assert_close(v_inf, v_low, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g_inf, g_low, rtol=1e-5, atol=1e-7)
