"""ce / kl, the batch contract, the registry, spec parsing, CombinedLoss, and the properties every loss must
have (gradcheck, padding / batching invariance, no NaN or inf on edge cases)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from loss_helpers import make_batch, make_seq, pad_more, random_seqs

from logitcache.distill.losses import (
    LOSSES,
    ALMConfig,
    CEConfig,
    CombinedLoss,
    DistillBatch,
    KLConfig,
    MissingStatistic,
    MLOTConfig,
    ULDConfig,
    gather_log_softmax,
    parse_loss_spec,
    teacher_logprobs_at,
)

ATOL = 1e-5


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def index_pairs(seq) -> list[tuple[int, int]]:
    n = min(seq.teacher_full.shape[0], seq.student_logits.shape[0])
    return [(r, r) for r in range(n)]


def aligned_pairs(seq) -> list[tuple[int, int]]:
    return [tuple(p) for p in seq.pairs.tolist()]


# ---- dense references, written from the formulas ---------------------------------------------------------


def ref_ce(seq) -> float:
    lp = torch.log_softmax(seq.student_logits, -1)
    return float(-lp[torch.arange(len(seq.student_targets)), seq.student_targets].mean())


def ref_kl(seq, direction: str, tau: float, pairs) -> float:
    t = torch.softmax(seq.teacher_logits / tau, -1)
    s = torch.softmax(seq.student_logits / tau, -1)
    vals = []
    for i, j in pairs:
        total = 0.0
        for v in range(t.shape[1]):
            a, b = (t[i, v], s[j, v]) if direction == "forward" else (s[j, v], t[i, v])
            if a > 0:
                total += float(a * (torch.log(a) - torch.log(b)))
        vals.append(total)
    return sum(vals) / len(vals)


# ---- spec, registry, combined ----------------------------------------------------------------------------


def test_parse_loss_spec_ok():
    assert parse_loss_spec("ce:1,mlot:0.15") == [("ce", 1.0), ("mlot", 0.15)]
    assert parse_loss_spec(" ce , uld:0.5 ") == [("ce", 1.0), ("uld", 0.5)]
    assert parse_loss_spec("rkl:0") == [("rkl", 0.0)]


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("", "empty loss spec"),
        ("ce:1,,uld:1", "empty term #2"),
        ("ce:1,foo:2", "'foo'"),
        ("ce:abc", "'abc'"),
        ("ce:-1", "'ce:-1'"),
        ("ce:nan", "'ce:nan'"),
        ("ce:1,ce:2", "'ce' appears twice"),
        ("ce:1:2", "more than one"),
    ],
)
def test_parse_loss_spec_errors(spec, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
        parse_loss_spec(spec)


def test_registry_names_and_defaults():
    assert set(LOSSES) == {"ce", "kl", "rkl", "uld", "mlot", "alm"}
    assert LOSSES["rkl"].make_config().direction == "reverse"
    assert LOSSES["kl"].make_config().direction == "forward"
    m = LOSSES["mlot"].make_config()
    assert (m.beta, m.gamma, m.tau_sl, m.tau_sd, m.sinkhorn_lambda, m.sinkhorn_iters, m.k) == (
        0.1,
        0.1,
        1.0,
        2.0,
        0.1,
        20,
        50,
    )


def test_combined_loss_total_and_components():
    g = gen(1)
    seqs = random_seqs(3, 11, 11, g)
    batch = make_batch(seqs, 11, same_vocab=True)
    comb = CombinedLoss("ce:1,kl:0.5,mlot:0.15,uld:0.2,alm:0.3", configs={"mlot": {"k": 6}})
    out = comb(batch)
    expect = sum(w * LOSSES[n](batch, comb.configs[n]).value for n, w in comb.terms)
    assert torch.allclose(out.total, expect, atol=1e-9)
    assert set(out.components) == {"ce", "kl", "mlot", "uld", "alm"}
    assert comb.configs["mlot"].k == 6
    logs = out.log()
    assert {"loss", "loss/ce", "loss/mlot/had", "loss/mlot/sl", "loss/mlot/sd"} <= set(logs)
    out.total.backward()
    assert torch.isfinite(batch.student_logits.grad).all()
    with pytest.raises(ValueError, match="not in the spec"):
        CombinedLoss("ce:1", configs={"uld": {}})


# ---- ce ----------------------------------------------------------------------------------------------------


def test_ce_matches_dense_and_torch():
    g = gen(2)
    seqs = random_seqs(3, 9, 13, g)
    batch = make_batch(seqs, 9)
    out = LOSSES["ce"](batch)
    for b, s in enumerate(seqs):
        assert abs(float(out.per_sequence[b].detach()) - ref_ce(s)) < ATOL
    z = batch.student_logits.detach()
    tgt = torch.where(batch.student_mask, batch.student_targets, -100)
    tok = torch.nn.functional.cross_entropy(z.reshape(-1, 13), tgt.reshape(-1), ignore_index=-100)
    assert abs(float(out.value.detach()) - float(tok)) < ATOL  # reduction 'token' == HF token mean
    seq_mean = LOSSES["ce"](batch, CEConfig(reduction="sequence")).value
    assert abs(float(seq_mean.detach()) - sum(ref_ce(s) for s in seqs) / 3) < ATOL


def test_ce_rejects_out_of_vocab_target():
    g = gen(3)
    batch = make_batch(random_seqs(1, 5, 5, g, lengths=[(2, 2)]), 5)
    batch.student_targets[0, 0] = 99
    with pytest.raises(ValueError, match="outside the student vocabulary"):
        LOSSES["ce"](batch)


# ---- kl ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("tail", ["ignore", "renormalize", "bucket"])
@pytest.mark.parametrize("pairing", ["index", "aligned"])
def test_kl_dense_equal_when_k_equals_v(direction, tail, pairing):
    g = gen(4)
    v = 14
    seqs = random_seqs(3, v, v, g)
    batch = make_batch(seqs, v, same_vocab=True)
    out = LOSSES["kl"](batch, KLConfig(direction=direction, tail=tail, pairing=pairing))
    for b, s in enumerate(seqs):
        pairs = index_pairs(s) if pairing == "index" else aligned_pairs(s)
        assert abs(float(out.per_sequence[b].detach()) - ref_kl(s, direction, 1.0, pairs)) < ATOL


def ref_kl_bucket(seq, direction: str, tau: float, pairs, k: int, eps: float = 1e-8) -> float:
    """KL at ``tau`` over the teacher row's top-k ids plus one bucket holding every other id, on both sides."""
    t = torch.softmax(seq.teacher_logits / tau, -1)
    s = torch.softmax(seq.student_logits / tau, -1)
    vals = []
    for i, j in pairs:
        ids = seq.teacher_full[i].argsort(descending=True)[:k]  # the cached ids (top-k at tau 1)
        ti, sj = t[i, ids], s[j, ids]
        t_tail, s_tail = 1 - ti.sum(), 1 - sj.sum()
        if direction == "forward":
            vals.append(float((ti * (ti / sj).log()).sum() + t_tail * (t_tail / s_tail).log()))
        else:
            vals.append(float((sj * (sj / ti).log()).sum() + s_tail * (s_tail / t_tail.clamp_min(eps)).log()))
    return sum(vals) / len(vals)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_kl_temperature_exact_with_lse_and_renormalized_without(direction):
    g = gen(5)
    v, k, tau = 12, 5, 2.0
    seqs = random_seqs(2, v, v, g)
    full = make_batch(seqs, v, same_vocab=True)  # K = V: renormalizing within the top-K is exact
    out = LOSSES["kl"](full, KLConfig(direction=direction, tau=tau))
    for b, s in enumerate(seqs):
        assert abs(float(out.per_sequence[b].detach()) - ref_kl(s, direction, tau, index_pairs(s))) < ATOL
    # K < V with lse recorded at capture: the tempered cached entries and the tail bucket are exact
    exact = make_batch(seqs, k, same_vocab=True, taus=(tau,))
    logq, tail = teacher_logprobs_at(exact, tau)
    for b, s in enumerate(seqs):
        dense = torch.log_softmax(s.teacher_logits / tau, -1)
        n = s.teacher_full.shape[0]
        ids = exact.teacher_topk_ids[b, :n]
        assert torch.allclose(logq[b, :n], dense.gather(1, ids), atol=1e-10)
        assert torch.allclose(tail[b, :n], 1 - dense.exp().gather(1, ids).sum(-1), atol=1e-10)
    out = LOSSES["kl"](exact, KLConfig(direction=direction, tau=tau, tail="bucket"))
    bare = make_batch(seqs, k, same_vocab=True, taus=())
    with pytest.raises(MissingStatistic, match=r"at tau=2 needs the teacher's logsumexp\(logits/2\).*renormalize"):
        LOSSES["kl"](bare, KLConfig(direction=direction, tau=tau))  # never a silent approximation
    renorm = LOSSES["kl"](bare, KLConfig(direction=direction, tau=tau, tail="bucket", tempered="renormalize"))
    for b, s in enumerate(seqs):
        ref = ref_kl_bucket(s, direction, tau, index_pairs(s), k)
        assert abs(float(out.per_sequence[b].detach()) - ref) < ATOL
        assert ref < ref_kl(s, direction, tau, index_pairs(s))  # coarse-graining: below the full KL
        # without lse the rows are renormalized within the top-K (tail 0): a different number
        assert abs(float(renorm.per_sequence[b].detach()) - ref) > 1e-3


def test_kl_tail_options_bound_the_full_kl():
    """K < V: the tail bucket is a lower bound of the full forward KL (coarse-graining), and so is 'ignore'
    plus nothing else in general not; check the bucket bound and that all options stay finite."""
    g = gen(6)
    v = 30
    seqs = random_seqs(4, v, v, g, lengths=[(5, 5)] * 4)
    batch = make_batch(seqs, 6, same_vocab=True)
    bucket = LOSSES["kl"](batch, KLConfig(tail="bucket")).per_sequence.detach()
    rbucket = LOSSES["rkl"](batch, KLConfig(direction="reverse", tail="bucket")).per_sequence.detach()
    for b, s in enumerate(seqs):
        assert float(bucket[b]) <= ref_kl(s, "forward", 1.0, index_pairs(s)) + 1e-9
        assert float(rbucket[b]) <= ref_kl(s, "reverse", 1.0, index_pairs(s)) + 1e-9
    for tail in ("ignore", "renormalize"):
        for d in ("forward", "reverse"):
            assert torch.isfinite(LOSSES["kl"](batch, KLConfig(direction=d, tail=tail)).per_sequence).all()


def test_kl_requires_same_vocab():
    g = gen(7)
    batch = make_batch(random_seqs(1, 6, 6, g), 6, same_vocab=False)
    with pytest.raises(ValueError, match="same_vocab"):
        LOSSES["kl"](batch)


# ---- student-side primitive ------------------------------------------------------------------------------


def test_gather_log_softmax_matches_autograd_reference():
    g = gen(8)
    z = torch.randn(7, 19, generator=g, dtype=torch.float64, requires_grad=True)
    rows = torch.tensor([0, 3, 3, 6])
    ids = torch.randint(0, 19, (4, 5), generator=g)
    out1, out2 = gather_log_softmax(z, [(rows, ids, 1.0), (torch.arange(7), ids[:1].expand(7, 5), 2.0)])
    ref1 = torch.log_softmax(z, -1)[rows].gather(1, ids)
    ref2 = torch.log_softmax(z / 2, -1).gather(1, ids[:1].expand(7, 5))
    assert torch.allclose(out1, ref1) and torch.allclose(out2, ref2)
    w1, w2 = torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randn(7, 5, generator=g, dtype=torch.float64)
    (ga,) = torch.autograd.grad((out1 * w1).sum() + (out2 * w2).sum(), z)
    (gb,) = torch.autograd.grad((ref1 * w1).sum() + (ref2 * w2).sum(), z)
    assert torch.allclose(ga, gb)
    assert torch.autograd.gradcheck(lambda x: gather_log_softmax(x, [(rows, ids, 0.7)])[0], (z,), fast_mode=True)


# ---- properties of every loss ----------------------------------------------------------------------------

SMALL_CONFIGS = {
    "ce": CEConfig(),
    "kl": KLConfig(),
    "rkl": KLConfig(direction="reverse"),
    "uld": ULDConfig(),
    "mlot": MLOTConfig(k=5),
    "alm": ALMConfig(tau=2.0),
}


def _with_logits(batch: DistillBatch, z: torch.Tensor) -> DistillBatch:
    return dataclasses.replace(batch, student_logits=z)


@pytest.mark.parametrize("name", list(SMALL_CONFIGS))
def test_gradcheck_float64(name):
    g = gen(9)
    seqs = random_seqs(2, 7, 7, g, lengths=[(4, 3), (2, 4)])
    batch = make_batch(seqs, 5, same_vocab=True, grad=False)
    cfg = SMALL_CONFIGS[name]
    z = batch.student_logits.clone().requires_grad_(True)
    # fast_mode: the Jacobian is checked along random directions (2 evaluations instead of one per input)
    fn = lambda x: LOSSES[name](_with_logits(batch, x), cfg).per_sequence  # noqa: E731
    assert torch.autograd.gradcheck(fn, (z,), fast_mode=True)
    if name == "ce":  # and one full Jacobian check, on the cheapest loss
        assert torch.autograd.gradcheck(fn, (z,))


@pytest.mark.parametrize("name", list(SMALL_CONFIGS))
@pytest.mark.parametrize("pairing", ["index", "aligned"])
def test_padding_and_batching_invariance(name, pairing):
    g = gen(10)
    seqs = random_seqs(4, 9, 9, g, lengths=[(3, 5), (6, 2), (1, 1), (5, 5)])
    cfg = SMALL_CONFIGS[name]
    if hasattr(cfg, "pairing"):
        cfg = dataclasses.replace(cfg, pairing=pairing)
    together = LOSSES[name](make_batch(seqs, 6, same_vocab=True), cfg).per_sequence
    padded = LOSSES[name](pad_more(make_batch(seqs, 6, same_vocab=True)), cfg).per_sequence
    alone = torch.stack([LOSSES[name](make_batch([s], 6, same_vocab=True), cfg).per_sequence[0] for s in seqs])
    assert torch.allclose(together, alone, atol=1e-9), (together, alone)
    assert torch.allclose(together, padded, atol=1e-9), (together, padded)


def _edge_batches():
    g = gen(11)
    out = {}
    # -inf inside the cached rows and exact zero-probability teacher entries
    seqs = random_seqs(2, 8, 8, g, lengths=[(4, 4), (3, 5)])
    b = make_batch(seqs, 8, same_vocab=True)
    b.teacher_topk_logprobs[0, 0, 5:] = float("-inf")
    b.teacher_topk_logprobs[1, :, 3:] = float("-inf")
    b.teacher_target_logprobs[0, 1] = float("-inf")
    out["neg_inf"] = b
    # empty loss span in one sequence, and a batch where every span is empty
    b = make_batch(random_seqs(2, 8, 8, g, lengths=[(3, 4), (2, 2)]), 8, same_vocab=True)
    b.student_mask[1] = False
    b.teacher_mask[1] = False
    out["one_empty"] = b
    b = make_batch(random_seqs(2, 8, 8, g, lengths=[(3, 4), (2, 2)]), 8, same_vocab=True)
    b.student_mask[:] = False
    b.teacher_mask[:] = False
    out["all_empty"] = b
    b = make_batch(random_seqs(2, 8, 8, g, lengths=[(3, 4), (2, 2)]), 8, same_vocab=True)
    b.student_mask[0] = False  # teacher rows but no student rows
    out["student_empty"] = b
    out["one_position"] = make_batch(random_seqs(2, 8, 8, g, lengths=[(1, 1), (1, 1)]), 8, same_vocab=True)
    # K larger than the student vocabulary (and than the teacher vocabulary: padded with -inf)
    out["k_gt_v"] = make_batch(random_seqs(2, 6, 6, g, lengths=[(3, 4), (4, 2)]), 64, same_vocab=True)
    # very different lengths
    out["lengths"] = make_batch(random_seqs(2, 10, 10, g, lengths=[(2, 40), (37, 3)]), 6, same_vocab=True)
    # peaked teacher rows (probability 1 up to float precision) and a near-deterministic student
    seqs = random_seqs(2, 8, 8, g, lengths=[(3, 3), (2, 4)], t_scale=60.0, s_scale=40.0)
    out["peaked"] = make_batch(seqs, 4, same_vocab=True)
    return out


EDGE = _edge_batches()


@pytest.mark.parametrize("case", list(EDGE))
@pytest.mark.parametrize("name", list(SMALL_CONFIGS))
def test_no_nan_or_inf(case, name):
    batch = EDGE[case]
    batch.student_logits.grad = None
    for cfg in (SMALL_CONFIGS[name], LOSSES[name].make_config()):
        out = LOSSES[name](batch, cfg)
        assert torch.isfinite(out.per_sequence).all(), (case, name, out.per_sequence)
        assert torch.isfinite(out.value)
        (grad,) = torch.autograd.grad(out.value, batch.student_logits)
        assert torch.isfinite(grad).all(), (case, name)
        if case == "all_empty":
            assert float(out.value.detach()) == 0.0 and float(grad.abs().sum()) == 0.0


def test_float32_and_bfloat16_logits_upcast():
    g = gen(12)
    seqs = random_seqs(2, 16, 16, g, dtype=torch.float32)
    b32 = make_batch(seqs, 8, same_vocab=True)
    b16 = dataclasses.replace(b32, student_logits=b32.student_logits.detach().bfloat16().requires_grad_(True))
    for name, cfg in SMALL_CONFIGS.items():
        o32 = LOSSES[name](b32, cfg)
        o16 = LOSSES[name](b16, cfg)
        assert o16.value.dtype == torch.float32
        v16, v32 = float(o16.value.detach()), float(o32.value.detach())
        assert abs(v16 - v32) < 0.05 * (1 + abs(v32))
        (grad,) = torch.autograd.grad(o16.value, b16.student_logits)
        assert grad.dtype == torch.bfloat16


def test_batch_contract_errors():
    g = gen(13)
    b = make_batch([make_seq(3, 4, 6, 6, g)], 6)
    with pytest.raises(ValueError, match="teacher_mask"):
        dataclasses.replace(b, teacher_mask=b.teacher_mask[:, :2])
    with pytest.raises(ValueError, match="student_mask must be bool"):
        dataclasses.replace(b, student_mask=b.student_mask.long())
    with pytest.raises(ValueError, match="pairing='aligned' needs"):
        LOSSES["uld"](dataclasses.replace(b, pairs=None, pair_mask=None), ULDConfig(pairing="aligned"))
    with pytest.raises(ValueError, match="chunks"):
        LOSSES["alm"](dataclasses.replace(b, chunks=None, chunk_mask=None))
