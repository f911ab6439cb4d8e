"""The fused, chunked student head (``--fused-head``) equals the unfused path for every loss: values to 1e-5 and
gradients (w.r.t. the hidden states, the head's weight and bias) at cosine >= 0.9999, through the same collation
training uses (``loss_helpers.collate_seqs``), with chunks smaller than the batch so that every pass crosses
chunk boundaries; soft-capped heads; autocast; and the real forward path (hook on a tiny model's decoder)."""

from __future__ import annotations

import pytest
import torch
from loss_helpers import collate_seqs, random_seqs

from logitcache.distill.batch import distill_batch, distill_batch_fused, student_forward
from logitcache.distill.losses import LOSSES, CombinedLoss

SPECS = ["ce", "kl", "rkl", "uld", "mlot", "alm", "ce:1,mlot:0.15", "ce:1,kl:0.5,uld:0.2,alm:0.3"]
CONFIGS = {
    "uld": {"top_ranks": 4},
    "mlot": {"k": 5},
}


def _setup(seed: int, dtype: torch.dtype, bias: bool, d: int = 6, v: int = 11):
    g = torch.Generator().manual_seed(seed)
    seqs = random_seqs(3, v, v, g, dtype=dtype)
    batch = collate_seqs(seqs, k=4, taus=(2.0,))
    hidden = torch.randn(batch.batch_size, batch.logits_to_keep, d, generator=g, dtype=dtype)
    head = torch.nn.Linear(d, v, bias=bias, dtype=dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(v, d, generator=g, dtype=dtype))
        if bias:
            head.bias.copy_(torch.randn(v, generator=g, dtype=dtype))
    return batch, hidden, head


def _run(spec: str, batch, hidden, head, fused: bool, softcap: float | None = None, chunk_rows: int = 2):
    head.zero_grad(set_to_none=True)
    h = hidden.detach().clone().requires_grad_(True)
    configs = {n: c for n, c in CONFIGS.items() if n in {t.split(":")[0] for t in spec.split(",")}}
    loss = CombinedLoss(spec, configs)
    if fused:
        db = distill_batch_fused(batch, h, head, same_vocab=True, softcap=softcap, chunk_rows=chunk_rows)
        assert db.student_head is not None and db.student_logits.stride() == (0, 0, 0)
    else:
        z = head(h)
        if softcap is not None:
            z = torch.tanh(z / softcap) * softcap
        db = distill_batch(batch, z, same_vocab=True)
    out = loss(db)
    out.total.backward()
    grads = [h.grad, head.weight.grad] + ([head.bias.grad] if head.bias is not None else [])
    return out, grads


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_fused_equals_unfused(spec: str, softcap: float | None) -> None:
    batch, hidden, head = _setup(0, torch.float64, bias=True)
    ref, gref = _run(spec, batch, hidden, head, fused=False, softcap=softcap)
    got, ggot = _run(spec, batch, hidden, head, fused=True, softcap=softcap)
    assert float(ref.total.detach()) != 0.0
    assert abs(float(got.total.detach()) - float(ref.total.detach())) <= 1e-5 * max(1.0, abs(float(ref.total.detach())))
    for name, c in ref.components.items():
        assert torch.allclose(got.components[name].per_sequence, c.per_sequence, atol=1e-5, rtol=1e-5), name
    for a, b in zip(ggot, gref):
        assert a is not None and b is not None and float(b.abs().sum()) > 0
        assert _cos(a, b) >= 0.9999
        assert torch.allclose(a, b, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("chunk_rows", [1, 3, 1000])
def test_chunk_size_does_not_change_results(chunk_rows: int) -> None:
    batch, hidden, head = _setup(1, torch.float32, bias=False)
    ref, gref = _run("ce:1,mlot:0.15,uld:0.1", batch, hidden, head, fused=False)
    got, ggot = _run("ce:1,mlot:0.15,uld:0.1", batch, hidden, head, fused=True, chunk_rows=chunk_rows)
    assert abs(float(got.total.detach()) - float(ref.total.detach())) <= 1e-5 * max(1.0, abs(float(ref.total.detach())))
    for a, b in zip(ggot, gref):
        assert _cos(a, b) >= 0.9999


def test_every_registered_loss_is_covered() -> None:
    assert set(LOSSES) <= {t.split(":")[0] for s in SPECS for t in s.split(",")}


def test_fused_under_autocast_matches_unfused_under_autocast() -> None:
    """bf16 autocast (train's GPU setting, here on CPU): both paths run the head matmul in bf16, softmax in fp32."""
    batch, hidden, head = _setup(2, torch.float32, bias=False, d=16, v=40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, gref = _run("ce:1,mlot:0.15", batch, hidden, head, fused=False)
        got, ggot = _run("ce:1,mlot:0.15", batch, hidden, head, fused=True)
    assert got.total.dtype == torch.float32
    assert abs(float(got.total.detach()) - float(ref.total.detach())) <= 2e-2 * max(1.0, abs(float(ref.total.detach())))
    for a, b in zip(ggot, gref):
        assert _cos(a, b) >= 0.999


def test_no_grad_path_gives_the_same_values() -> None:
    batch, hidden, head = _setup(3, torch.float64, bias=True)
    with torch.no_grad():
        ref = CombinedLoss("ce:1,mlot:0.15")(distill_batch(batch, head(hidden), same_vocab=True))
        got = CombinedLoss("ce:1,mlot:0.15")(distill_batch_fused(batch, hidden, head, same_vocab=True, chunk_rows=2))
    assert abs(float(got.total.detach()) - float(ref.total.detach())) <= 1e-9


def test_student_forward_fused_through_a_real_model() -> None:
    """The forward hook on a tiny Llama's decoder gives the hidden states its lm_head turns into its logits."""
    from logitcache.testing.tiny_models import tiny_llama, unigram_tokenizer

    model = tiny_llama(unigram_tokenizer(), seed=0).double()
    v = model.get_output_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(4)
    batch = collate_seqs(random_seqs(2, v, v, g), k=4, taus=(2.0,))
    res = []
    for fused in (False, True):
        model.zero_grad(set_to_none=True)
        db = student_forward(model, batch, same_vocab=True, fused=fused, head_chunk=3)
        out = CombinedLoss("ce:1,mlot:0.15")(db)
        out.total.backward()
        res.append((float(out.total.detach()), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (a, ga), (b, gb) = res
    assert abs(a - b) <= 1e-9 and len(ga) == len(gb) > 2
    for x, y in zip(ga, gb):
        assert _cos(x, y) >= 0.9999
