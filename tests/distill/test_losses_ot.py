"""uld and mlot against dense references written from the formulas (full teacher distribution, tiny
vocabularies, K = V), the Sinkhorn plan, the sparse-cache estimates, and memory of the detached plan."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from loss_helpers import make_batch, random_seqs

from logitcache.distill.losses import LOSSES, MLOTConfig, ULDConfig, sinkhorn_plan
from logitcache.distill.losses_ot import _sinkhorn_log, _sinkhorn_scaling, teacher_ranked_probs

ATOL = 1e-5


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def pairs_of(seq, pairing):
    if pairing == "aligned":
        return [tuple(p) for p in seq.pairs.tolist()]
    return [(r, r) for r in range(min(seq.teacher_full.shape[0], seq.student_logits.shape[0]))]


# ---- dense references ------------------------------------------------------------------------------------


def ref_uld(seq, pairs, tau=1.0) -> float:
    """ULD as in the paper: sort both full distributions, zero-pad the smaller vocabulary, L1 over all ranks."""
    t = torch.softmax(seq.teacher_logits / tau, -1)
    s = torch.softmax(seq.student_logits / tau, -1)
    w = max(t.shape[1], s.shape[1])
    vals = []
    for i, j in pairs:
        ti = torch.zeros(w, dtype=t.dtype)
        sj = torch.zeros(w, dtype=s.dtype)
        ti[: t.shape[1]] = torch.sort(t[i], descending=True).values
        sj[: s.shape[1]] = torch.sort(s[j], descending=True).values
        vals.append(float(sum(abs(ti[r] - sj[r]) for r in range(w))))
    return sum(vals) / len(vals)


def ref_mlot(seq, cfg: MLOTConfig, pairs) -> tuple[float, float, float]:
    """MultiLevelOT from the paper's formulas; k' = min(k, V_student), teacher columns zero-padded to k'."""

    def probs(tau):
        return torch.softmax(seq.teacher_logits / tau, -1), torch.softmax(seq.student_logits / tau, -1)

    vs = seq.student_logits.shape[1]
    k = min(cfg.k, vs)
    t_rank, s_rank = probs(cfg.rank_tau)
    t_order = torch.argsort(t_rank.sum(0), descending=True)[:k]
    s_order = torch.argsort(s_rank.sum(0), descending=True)[:k]

    def tk(tau):
        t = probs(tau)[0][:, t_order]
        return torch.nn.functional.pad(t, (0, k - t.shape[1]))

    def sk(tau):
        return probs(tau)[1][:, s_order]

    t_h, s_h, t_l, s_l = tk(cfg.tau_had), sk(cfg.tau_had), tk(cfg.tau_sl), sk(cfg.tau_sl)
    had = sum(float(sum(abs(t_h[i, m] - s_h[j, m]) for m in range(k))) for i, j in pairs) / len(pairs)
    sl = sum(float(-sum(t_l[i, m] * torch.log(s_l[j, m]) for m in range(k))) for i, j in pairs) / len(pairs)
    t_d, s_d = tk(cfg.tau_sd), sk(cfg.tau_sd)
    n, m_ = t_d.shape[0], s_d.shape[0]
    c = torch.zeros(n, m_, dtype=t_d.dtype)
    for i in range(n):
        for j in range(m_):
            c[i, j] = sum(abs(t_d[i, m] - s_d[j, m]) for m in range(k))
    plan = torch.exp(-c / cfg.sinkhorn_lambda)
    for _ in range(cfg.sinkhorn_iters):
        plan = plan / plan.sum(1, keepdim=True) / n  # rows sum to 1/n
        plan = plan / plan.sum(0, keepdim=True) / m_  # columns sum to 1/m
    sd = float((plan * c).sum())
    return had, sl, sd


# ---- uld ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pairing", ["index", "aligned"])
@pytest.mark.parametrize(("vt", "vs"), [(12, 12), (12, 17), (20, 9)])
def test_uld_dense_equal_when_k_equals_v(pairing, vt, vs):
    g = gen(20)
    seqs = random_seqs(3, vt, vs, g)
    batch = make_batch(seqs, vt)
    out = LOSSES["uld"](batch, ULDConfig(pairing=pairing))  # tail='bucket' (default)
    for b, s in enumerate(seqs):
        assert abs(float(out.per_sequence[b].detach()) - ref_uld(s, pairs_of(s, pairing))) < ATOL
    if vs <= vt:  # the student has no ranks beyond K: 'ignore' is exact too
        out = LOSSES["uld"](batch, ULDConfig(pairing=pairing, tail="ignore"))
        for b, s in enumerate(seqs):
            assert abs(float(out.per_sequence[b].detach()) - ref_uld(s, pairs_of(s, pairing))) < ATOL


def test_uld_temperature_and_lower_bounds():
    g = gen(21)
    seqs = random_seqs(3, 25, 25, g)
    full = make_batch(seqs, 25)
    out = LOSSES["uld"](full, ULDConfig(tau=2.0))
    for b, s in enumerate(seqs):
        assert abs(float(out.per_sequence[b].detach()) - ref_uld(s, pairs_of(s, "index"), tau=2.0)) < ATOL
    sparse = make_batch(seqs, 4)
    ign = LOSSES["uld"](sparse, ULDConfig(tail="ignore")).per_sequence
    bkt = LOSSES["uld"](sparse, ULDConfig(tail="bucket")).per_sequence
    for b, s in enumerate(seqs):
        dense = ref_uld(s, pairs_of(s, "index"))
        assert float(ign[b].detach()) <= float(bkt[b].detach()) + 1e-12 <= dense + 1e-9


def test_uld_top_ranks_truncates():
    g = gen(22)
    seqs = random_seqs(2, 10, 10, g)
    out = LOSSES["uld"](make_batch(seqs, 10), ULDConfig(top_ranks=3, tail="ignore"))
    for b, s in enumerate(seqs):
        t = torch.softmax(s.teacher_logits, -1).sort(-1, descending=True).values[:, :3]
        p = torch.softmax(s.student_logits, -1).sort(-1, descending=True).values[:, :3]
        pr = pairs_of(s, "index")
        ref = sum(float((t[i] - p[j]).abs().sum()) for i, j in pr) / len(pr)
        assert abs(float(out.per_sequence[b].detach()) - ref) < ATOL


# ---- mlot --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pairing", ["index", "aligned"])
@pytest.mark.parametrize(("vt", "vs", "k"), [(12, 12, 50), (15, 11, 6), (9, 14, 12), (30, 40, 8)])
@pytest.mark.parametrize("taus", [None, (1.5, 0.7, 3.0, 1.3)])
def test_mlot_dense_equal_when_k_equals_v(pairing, vt, vs, k, taus):
    g = gen(23)
    seqs = random_seqs(3, vt, vs, g, lengths=[(4, 6), (5, 2), (3, 3)])
    batch = make_batch(seqs, vt, taus=(2.0,) if taus is None else taus)
    cfg = MLOTConfig(k=k, pairing=pairing)
    if taus is not None:  # every temperature distinct, so a mix-up between them shows
        cfg = MLOTConfig(k=k, pairing=pairing, tau_had=taus[0], tau_sl=taus[1], tau_sd=taus[2], rank_tau=taus[3])
    out = LOSSES["mlot"](batch, cfg)
    for b, s in enumerate(seqs):
        had, sl, sd = ref_mlot(s, cfg, pairs_of(s, pairing))
        assert abs(float(out.parts["had"][b].detach()) - had) < ATOL
        assert abs(float(out.parts["sl"][b].detach()) - sl) < ATOL
        assert abs(float(out.parts["sd"][b].detach()) - sd) < ATOL
        assert abs(float(out.per_sequence[b].detach()) - (had + cfg.beta * sl + cfg.gamma * sd)) < ATOL


def test_mlot_temperature_with_recorded_lse_and_without():
    """tau_SD = 2 with K < V is exact when the cache recorded logsumexp(logits / 2), and K = V is exact
    without it (renormalizing within the top-K)."""
    g = gen(24)
    seqs = random_seqs(2, 12, 10, g, lengths=[(4, 5), (3, 3)])
    cfg = MLOTConfig(k=4, missing="zero")
    dense = [ref_mlot(s, cfg, pairs_of(s, "index")) for s in seqs]
    full = LOSSES["mlot"](make_batch(seqs, 12), cfg)
    for b in range(2):
        assert abs(float(full.parts["sd"][b].detach()) - dense[b][2]) < ATOL
    # with lse recorded, the tempered probabilities of *cached* entries are exact
    sparse = make_batch(seqs, 11, taus=(2.0,))
    fixed = torch.arange(4).expand(2, 4)
    tk = teacher_ranked_probs(sparse, fixed, torch.ones(2, 4, dtype=torch.bool), [2.0], "zero")[2.0]
    for b, s in enumerate(seqs):
        t2 = torch.softmax(s.teacher_logits / 2.0, -1)[:, :4]
        n = t2.shape[0]
        cached = torch.zeros_like(t2, dtype=torch.bool)
        for i in range(n):
            cached[i] = torch.isin(torch.arange(4), sparse.teacher_topk_ids[b, i])
        assert torch.allclose(tk[b, :n][cached], t2[cached], atol=1e-10)
        assert (tk[b, :n][~cached] == 0).all()


def test_mlot_missing_estimates():
    """A ranked id absent from a row's top-K: zero, bound = min(tail, smallest cached prob), half = bound/2."""
    lp = torch.log(torch.tensor([[[0.5, 0.2, 0.1]], [[0.6, 0.39, 0.005]]], dtype=torch.float64))
    ids = torch.tensor([[[3, 1, 2]], [[0, 1, 2]]])
    batch = make_batch(random_seqs(2, 5, 5, gen(25), lengths=[(1, 1), (1, 1)]), 3)
    batch = dataclasses.replace(batch, teacher_topk_logprobs=lp, teacher_topk_ids=ids)
    ranked = torch.tensor([[3, 0], [0, 4]])
    rv = torch.ones(2, 2, dtype=torch.bool)
    for missing, e0, e1 in (("zero", 0.0, 0.0), ("bound", 0.1, 0.005), ("half", 0.05, 0.0025)):
        tk = teacher_ranked_probs(batch, ranked, rv, [1.0], missing)[1.0]
        assert torch.allclose(tk[0, 0], torch.tensor([0.5, e0], dtype=torch.float64))
        assert torch.allclose(tk[1, 0], torch.tensor([0.6, e1], dtype=torch.float64))  # tail 0.005


def test_sinkhorn_plan_marginals_masks_and_rectangular():
    g = gen(26)
    cost = torch.rand(2, 5, 3, generator=g, dtype=torch.float64)
    rm = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    cm = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    plan = sinkhorn_plan(cost, rm, cm, lam=0.5, iters=200)
    assert torch.allclose(plan[0].sum(0)[:3], torch.full((3,), 1 / 3, dtype=torch.float64))
    assert torch.allclose(plan[0].sum(1)[:4], torch.full((4,), 1 / 4, dtype=torch.float64), atol=1e-6)
    assert plan[0, 4].abs().sum() == 0 and plan[1, :, 1:].abs().sum() == 0
    assert torch.allclose(plan[1, :2, 0], torch.full((2,), 0.5, dtype=torch.float64))
    empty = sinkhorn_plan(cost, torch.zeros_like(rm), cm)
    assert torch.isfinite(empty).all() and empty.abs().sum() == 0


@pytest.mark.parametrize("lam", [0.1, 0.5])
def test_sinkhorn_scaling_and_log_domain_agree(lam):
    g = gen(29)
    cost = (torch.rand(3, 6, 4, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    rm = torch.rand(3, 6, generator=g) > 0.3
    cm = torch.rand(3, 4, generator=g) > 0.3
    rm[2] = False  # a sequence with nothing valid
    valid = rm[:, :, None] & cm[:, None, :]
    n_r = rm.sum(1, keepdim=True).clamp_min(1).double()
    n_c = cm.sum(1, keepdim=True).clamp_min(1).double()
    c0 = torch.where(valid, cost, torch.zeros_like(cost))
    p1 = _sinkhorn_scaling(c0, valid, rm, cm, n_r, n_c, lam, 20)
    p2 = _sinkhorn_log(c0, valid, rm, cm, n_r, n_c, lam, 20)
    assert torch.allclose(p1, p2, atol=1e-12)
    (g1,) = torch.autograd.grad((p1 * cost).sum(), cost, retain_graph=True)
    (g2,) = torch.autograd.grad((p2 * cost).sum(), cost)
    assert torch.allclose(g1, g2, atol=1e-9)
    # a tiny lambda takes the log-domain path and stays finite
    tiny = sinkhorn_plan(cost, rm, cm, lam=1e-3, iters=20)
    assert torch.isfinite(tiny).all() and torch.allclose(tiny[:2].sum((1, 2)), torch.ones(2, dtype=torch.float64))


def _saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd keeps for backward."""
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def test_detached_plan_same_value_and_flat_memory():
    g = gen(27)
    seqs = random_seqs(2, 40, 40, g, lengths=[(24, 30), (30, 20)])
    batch = make_batch(seqs, 40)
    mem = {}
    for detach in (False, True):
        for n in (5, 40):
            cfg = MLOTConfig(k=10, sinkhorn_iters=n, detach_plan=detach)
            mem[detach, n] = _saved_bytes(lambda cfg=cfg: LOSSES["mlot"](batch, cfg).value)
        a = LOSSES["mlot"](batch, MLOTConfig(k=10, detach_plan=False))
        b = LOSSES["mlot"](batch, MLOTConfig(k=10, detach_plan=True))
        assert torch.allclose(a.per_sequence, b.per_sequence, atol=1e-12)
    assert mem[True, 5] == mem[True, 40]
    assert mem[False, 40] > mem[False, 5]


def test_mlot_gamma_zero_skips_sinkhorn_and_k_larger_than_vocab():
    g = gen(28)
    seqs = random_seqs(2, 6, 5, g, lengths=[(3, 4), (2, 2)])
    out = LOSSES["mlot"](make_batch(seqs, 64), MLOTConfig(gamma=0.0, k=50))
    assert float(out.parts["sd"].detach().abs().sum()) == 0
    for b, s in enumerate(seqs):
        had, sl, _ = ref_mlot(s, MLOTConfig(k=50), pairs_of(s, "index"))
        assert abs(float(out.per_sequence[b].detach()) - (had + 0.1 * sl)) < ATOL
