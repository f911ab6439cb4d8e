"""``kl``/``rkl`` with ``tail="sampled"``: through the collation training uses, the loss equals
``losses_tail``'s dense reference (value and gradient); refusals without draws; the loader carries and checks
the draws; a tiny same-tokenizer training run on a cache captured with ``--tail-samples``."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from cli_helpers import one_line_error
from click.testing import CliRunner
from gen_helpers import ascii_teacher, write_prompts
from loss_helpers import Seq, example_of, forward_logits, random_seqs

from logitcache.cli import main
from logitcache.config import ConfigError
from logitcache.distill.batch import Example, collate, distill_batch
from logitcache.distill.losses import CombinedLoss, KLConfig, check_statistics, kl_loss
from logitcache.distill.losses_tail import sampled_tail_forward_kl, sampled_tail_reverse_kl

K, N, V = 4, 3, 20


def with_draws(ex: Example, s: Seq, g: torch.Generator) -> Example:
    """``ex`` with ``N`` draws per row from the teacher's distribution outside the cached top-K."""
    full = s.teacher_full
    p = full.exp().clone()
    p.scatter_(1, torch.as_tensor(ex.teacher.topk_ids).long(), 0.0)
    ids = torch.multinomial(p, N, replacement=True, generator=g)
    rows = dataclasses.replace(ex.teacher, tail_ids=ids.numpy(), tail_logprobs=full.gather(1, ids).numpy())
    return dataclasses.replace(ex, teacher=rows)


def batch_of(seqs: list[Seq], g: torch.Generator, draws: bool = True):
    exs = [example_of(s, K, (), i) for i, s in enumerate(seqs)]
    if draws:
        exs = [with_draws(e, s, g) for e, s in zip(exs, seqs)]
    collated = collate(exs, pad_id=0, k=K, temperatures=[])
    z = forward_logits(seqs, collated).requires_grad_(True)
    batch = distill_batch(collated, z, same_vocab=True)
    batch.student_logits.retain_grad()
    return exs, collated, batch


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_equals_the_dense_reference_through_collation(direction):
    g = torch.Generator().manual_seed(0)
    seqs = random_seqs(4, V, V, g, lengths=[(3, 5), (6, 2), (1, 1), (5, 5)])
    exs, collated, batch = batch_of(seqs, g)
    assert collated.teacher_tail_ids is not None and tuple(collated.teacher_tail_ids.shape) == (4, 6, N)
    assert batch.teacher_tail_logprobs is not None and batch.teacher_tail_logprobs.dtype == torch.float64
    out = kl_loss(batch, KLConfig(direction=direction, tail="sampled"))
    out.value.backward()
    fn = sampled_tail_forward_kl if direction == "forward" else sampled_tail_reverse_kl
    total, grads = 0.0, []
    for s, e in zip(seqs, exs):
        p = min(e.teacher.n, s.student_logits.shape[0])  # pairing "index": row r with row r
        z = s.student_logits[:p].clone().requires_grad_(True)
        r = e.teacher
        ref = fn(torch.log_softmax(z, -1), *(torch.as_tensor(a[:p]) for a in (
            r.topk_ids, r.topk_logprobs.astype(np.float64), r.tail_ids, r.tail_logprobs.astype(np.float64))))
        total = total + ref.sum()
        grads.append(z)
    count = sum(min(e.teacher.n, s.student_logits.shape[0]) for s, e in zip(seqs, exs))
    (total / count).backward()  # reduction "token": the mean over all valid pairs of the batch
    torch.testing.assert_close(out.value, total / count, rtol=1e-5, atol=1e-6)  # float32-stored teacher values
    for b, z in enumerate(grads):  # student row j of sequence b is batch row j (index pairing, a 1-token prompt)
        torch.testing.assert_close(batch.student_logits.grad[b, : z.shape[0]], z.grad, rtol=1e-5, atol=1e-7)
        assert float(z.grad.abs().sum()) > 0
    # the sampled tail is not the bucket: the estimates differ (the draws carry information the bucket lacks)
    bucket = kl_loss(batch, KLConfig(direction=direction, tail="bucket"))
    assert abs(float(bucket.value.detach()) - float(out.value.detach())) > 1e-6


def test_refused_without_draws_and_at_another_temperature():
    g = torch.Generator().manual_seed(1)
    seqs = random_seqs(2, V, V, g)
    _, collated, batch = batch_of(seqs, g, draws=False)
    assert collated.teacher_tail_ids is None and batch.teacher_tail_ids is None
    with pytest.raises(ValueError, match="--tail-samples"):
        kl_loss(batch, KLConfig(tail="sampled"))
    with pytest.raises(ConfigError, match=r"--loss kl \(tail=sampled\).*--tail-samples 0.*--tail-samples N"):
        check_statistics("ce:1,kl:1", {"kl": {"tail": "sampled"}}, [1.0, 2.0], tail_samples=0)
    with pytest.raises(ConfigError, match=r"--loss rkl \(tail=sampled, tau=2\)"):
        check_statistics("rkl:1", {"rkl": {"tail": "sampled", "tau": 2.0}}, [1.0, 2.0], tail_samples=4)
    check_statistics("ce:1,kl:1", {"kl": {"tail": "sampled"}}, [], tail_samples=4)
    check_statistics("kl:1", {"kl": {"tail": "sampled"}}, [], tail_samples=4, fused_head=True)
    with pytest.raises(ConfigError, match=r"--loss rkl \(tail=sampled\).*--fused-head"):
        check_statistics("rkl:1", {"rkl": {"tail": "sampled"}}, [], tail_samples=4, fused_head=True)
    check_statistics("ce:1,kl:1", {}, [], tail_samples=0)  # no sampled tail asked: nothing needed
    _, _, with_tail = batch_of(seqs, g)
    with pytest.raises(ValueError, match="tau = 1"):
        kl_loss(with_tail, KLConfig(tail="sampled", tau=2.0))
    out = CombinedLoss("ce:1,rkl:1", {"rkl": {"tail": "sampled"}})(with_tail)
    assert torch.isfinite(out.total)


def test_collated_padding_is_finite_and_masked():
    g = torch.Generator().manual_seed(2)
    seqs = random_seqs(3, V, V, g, lengths=[(1, 4), (6, 6), (2, 1)])
    _, collated, batch = batch_of(seqs, g)
    assert bool(torch.isfinite(collated.teacher_tail_logprobs).all())
    out = kl_loss(batch, KLConfig(direction="reverse", tail="sampled"))
    out.value.backward()
    assert bool(torch.isfinite(batch.student_logits.grad).all())


def test_train_on_a_same_tokenizer_cache_with_draws(tmp_path):
    from logitcache.pipeline.align_stage import AlignConfig, run_align
    from logitcache.pipeline.generate_stage import GenerateConfig, run_generate
    from logitcache.storage import LogitCache

    teacher = ascii_teacher(tmp_path / "teacher")
    student = ascii_teacher(tmp_path / "student", seed=5)  # same tokenizer, other weights
    data = write_prompts(tmp_path / "p.jsonl", 6)
    for name, n in (("draws", 4), ("plain", 0)):
        run_generate(GenerateConfig(model=str(teacher), data=str(data), out=str(tmp_path / name), mode="score",
                                    top_k=8, tail_samples=n))
        run_align(AlignConfig(cache=str(tmp_path / name), student_tokenizer=str(student), workers=1))
    assert LogitCache.open(tmp_path / "draws").header.tail_samples == 4

    def train(cache: str, out: str, *extra: str):
        return CliRunner().invoke(main, [
            "train", "--cache", str(tmp_path / cache), "--student", str(student), "--out", str(tmp_path / out),
            "--max-steps", "2", "--batch-size", "2", "--eval-fraction", "0", "--loss", "ce:1,kl:1",
            "--loss-config", '{"kl": {"tail": "sampled"}}', *extra])  # fmt: skip

    r = train("draws", "run")
    assert r.exit_code == 0, r.output
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert any('"loss/kl"' in ln for ln in lines), lines
    r = train("draws", "online", "--teacher", str(teacher))  # online rows come with fresh draws
    assert r.exit_code == 0, r.output
    r = train("plain", "run2")
    one_line_error(r, "--loss kl (tail=sampled)", "--tail-samples")


def test_loader_checks_refuse_bad_draws(tmp_path):
    """distill.integrity (what train checks per shard): draws inside the top-K, positive/NaN logprobs, ids past a
    same-vocabulary student's logits are refused with one line naming the sample and the field."""
    from cache_helpers import random_record, write_cache

    from logitcache.distill.integrity import StudentLimits, _check_rows
    from logitcache.storage import CorruptCacheError, LogitCache

    rng = np.random.default_rng(0)
    write_cache(str(tmp_path / "c"), [[random_record(rng, 0, k=K, vocab=300, n_completion=2)]], k=K, vocab=300)
    cache = LogitCache.open(tmp_path / "c")
    rows = random_record(rng, 1, k=K, vocab=300, n_completion=3).rows
    rows = dataclasses.replace(rows, topk_ids=np.tile(np.arange(K), (3, 1)), target_ids=np.zeros(3),
                               tail_ids=np.tile(np.arange(K, K + N), (3, 1)), tail_logprobs=np.full((3, N), -9.0))
    starts, sids = np.array([0, 2]), np.array([70, 71])
    _check_rows(cache, rows, 0, starts, sids, "shard-000009", StudentLimits())  # sound: no error
    for field, value, what in (("tail_ids", rows.topk_ids[2, 1], "top-K"), ("tail_logprobs", np.nan, "NaN")):
        bad = dataclasses.replace(rows, **{field: getattr(rows, field).copy()})
        getattr(bad, field)[2, 0] = value
        with pytest.raises(CorruptCacheError, match=rf"sample 71: {field} .*{what}.*\(row 0 of the sequence\)"):
            _check_rows(cache, bad, 0, starts, sids, "shard-000009", StudentLimits())
    with pytest.raises(CorruptCacheError, match=r"sample 70: tail_ids value outside the student's vocabulary"):
        _check_rows(cache, rows, 0, starts, sids, "shard-000009", StudentLimits(vocab=K + 1, same_vocab=True))


def test_fused_head_forward_equals_unfused_and_reverse_is_refused():
    """kl (forward) with tail='sampled' reads only gathered logprobs, so ``--fused-head`` gives the same value and
    gradients; rkl needs the full student row, which the fused head never builds: refused, naming the flag."""
    from logitcache.distill.batch import distill_batch_fused

    g = torch.Generator().manual_seed(3)
    seqs = random_seqs(3, V, V, g)
    exs = [with_draws(example_of(s, K, (), i), s, g) for i, s in enumerate(seqs)]
    collated = collate(exs, pad_id=0, k=K, temperatures=[])
    hidden = torch.randn(collated.batch_size, collated.logits_to_keep, 6, generator=g, dtype=torch.float64)
    head = torch.nn.Linear(6, V, bias=False, dtype=torch.float64)
    results = []
    for fused in (False, True):
        head.zero_grad(set_to_none=True)
        h = hidden.clone().requires_grad_(True)
        if fused:
            db = distill_batch_fused(collated, h, head, same_vocab=True, chunk_rows=2)
        else:
            db = distill_batch(collated, head(h), same_vocab=True)
        out = kl_loss(db, KLConfig(tail="sampled"))
        out.value.backward()
        results.append((out.value.detach(), h.grad, head.weight.grad))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="--fused-head"):
        kl_loss(db, KLConfig(direction="reverse", tail="sampled"))
