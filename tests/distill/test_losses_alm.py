"""alm against a dense reference written from the formula (chunk likelihoods, binarised f-divergence)."""

from __future__ import annotations

import math

import pytest
import torch
from loss_helpers import make_batch, random_seqs

from logitcache.distill.losses import LOSSES, ALMConfig

ATOL = 1e-5


def ref_alm(seq, cfg: ALMConfig) -> float:
    slp = torch.log_softmax(seq.student_logits, -1)
    tlp = seq.teacher_full
    vals, weights = [], []
    for t0, t1, s0, s1 in seq.chunks.tolist():
        lt = sum(float(tlp[i, seq.teacher_targets[i]]) for i in range(t0, t1))
        ls = sum(float(slp[j, seq.student_targets[j]]) for j in range(s0, s1))
        a = math.exp(lt / cfg.tau - cfg.eps)
        b = math.exp(ls / cfg.tau - cfg.eps)
        if cfg.divergence == "binary_kl":
            d = a * math.log(a / b) + (1 - a) * math.log((1 - a) / (1 - b))
        elif cfg.divergence == "binary_ce":
            d = -(a * math.log(b) + (1 - a) * math.log(1 - b))
        elif cfg.divergence == "reverse_binary_kl":
            d = b * math.log(b / a) + (1 - b) * math.log((1 - b) / (1 - a))
        else:
            d = abs(lt - ls)
        vals.append(d)
        weights.append(1.0 if cfg.chunk_weight == "chunk" else float(s1 - s0))
    return sum(v * w for v, w in zip(vals, weights)) / sum(weights)


@pytest.mark.parametrize("divergence", ["binary_kl", "binary_ce", "reverse_binary_kl", "abs_log"])
@pytest.mark.parametrize("tau", [1.0, 100.0])
@pytest.mark.parametrize("chunk_weight", ["chunk", "tokens"])
def test_alm_matches_dense(divergence, tau, chunk_weight):
    g = torch.Generator().manual_seed(30)
    seqs = random_seqs(3, 10, 13, g, lengths=[(5, 6), (2, 4), (6, 3)])
    cfg = ALMConfig(divergence=divergence, tau=tau, chunk_weight=chunk_weight)
    for k in (10, 2):  # alm uses only the realized tokens: exact for any K
        out = LOSSES["alm"](make_batch(seqs, k), cfg)
        for b, s in enumerate(seqs):
            assert abs(float(out.per_sequence[b].detach()) - ref_alm(s, cfg)) < ATOL


def test_alm_zero_when_student_matches_teacher_and_invalid_chunks_skipped():
    g = torch.Generator().manual_seed(31)
    (s,) = random_seqs(1, 8, 8, g, lengths=[(4, 4)])
    s.student_logits = s.teacher_logits.clone()
    s.student_targets = s.teacher_targets.clone()
    s.chunks = torch.tensor([[0, 1, 0, 1], [1, 3, 1, 3], [3, 4, 3, 4]])
    batch = make_batch([s], 8)
    assert abs(float(LOSSES["alm"](batch).per_sequence[0].detach())) < 1e-9
    batch.chunks[0, 1] = torch.tensor([3, 2, 1, 3])  # empty teacher range -> invalid
    batch.student_mask[0, 3] = False  # chunk 2 now has a masked row -> invalid
    out = LOSSES["alm"](batch)
    assert float(out.count[0]) == 1.0
