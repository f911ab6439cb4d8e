"""``--tail-samples`` in stage one: the hf backend's draws from outside the top-K (distribution, logprobs,
determinism), generate mode's tokens unchanged by them, config refusals, and a CLI capture into a cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cli_helpers import one_line_error
from click.testing import CliRunner
from gen_helpers import write_prompts

from logitcache.cli import main
from logitcache.config import ConfigError
from logitcache.pipeline.backend_hf import _tail_draws, generate_rows, score_rows
from logitcache.pipeline.generate_config import GenerateConfig
from logitcache.storage import LogitCache, verify_cache
from logitcache.testing.tiny_models import bpe_tokenizer, tiny_llama

K, N = 8, 5
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Question: what is two plus two? Answer: four.", "hi"]


@pytest.fixture(scope="module")
def tok():
    return bpe_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_llama(tok, extra_vocab=16, seed=0)


@pytest.fixture(scope="module")
def seqs(tok) -> list[np.ndarray]:
    return [np.asarray(tok(t).input_ids) for t in TEXTS]


def _full_logprobs(model, ids: np.ndarray, p: int) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.as_tensor(ids, dtype=torch.long)[None]).logits[0].float()
    return logits.log_softmax(-1)[p - 1 : len(ids) - 1]


def test_draws_follow_the_tail_distribution():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 12, generator=gen) * 2
    logits[2, 5:] = float("-inf")  # row 2: its tail (outside the top 5) is all -inf
    lse = torch.logsumexp(logits, -1)
    top_i = torch.topk(logits, 5, dim=-1).indices
    ids, lps = _tail_draws(logits, top_i, lse, 40_000, gen)
    assert ids.shape == lps.shape == (3, 40_000)
    for r in range(2):
        assert not torch.isin(ids[r], top_i[r]).any()
        p = (logits[r] - lse[r]).exp()
        p[top_i[r]] = 0
        q = p / p.sum()
        freq = torch.bincount(ids[r], minlength=12).double() / ids.shape[1]
        assert torch.allclose(freq, q.double(), atol=0.01), (freq, q)  # 40k draws: sd <= 0.0025
        torch.testing.assert_close(lps[r], (logits[r] - lse[r])[ids[r]])
    assert not torch.isin(ids[2], top_i[2]).any() and torch.isneginf(lps[2]).all()


def test_score_rows_draws_outside_the_top_k_with_exact_logprobs(model, seqs):
    plens = [max(1, len(s) // 3) for s in seqs]
    rows = score_rows(model, seqs, plens, k=K, chunk_positions=4, tail_samples=N, seed=11)
    assert sum(r.n for r in rows) > 0
    for s, p, r in zip(seqs, plens, rows):
        assert r.tail_ids is not None and r.tail_ids.shape == r.tail_logprobs.shape == (r.n, N)
        assert r.tail_problem(2**31 - 1) is None  # outside the row's top-K, logprobs <= 0 and not NaN
        ref = _full_logprobs(model, s, p)
        np.testing.assert_allclose(r.tail_logprobs, ref.gather(1, torch.as_tensor(r.tail_ids).long()), atol=1e-5)
    again = score_rows(model, seqs, plens, k=K, chunk_positions=4, tail_samples=N, seed=11)
    other = score_rows(model, seqs, plens, k=K, chunk_positions=4, tail_samples=N, seed=12)
    plain = score_rows(model, seqs, plens, k=K, chunk_positions=4)
    for a, b, d in zip(rows, again, plain):
        np.testing.assert_array_equal(a.tail_ids, b.tail_ids)
        np.testing.assert_array_equal(a.topk_ids, d.topk_ids)  # the draws change no other column
        assert d.tail_ids is None
    assert any(not np.array_equal(a.tail_ids, c.tail_ids) for a, c in zip(rows, other))
    empty = score_rows(model, [seqs[0]], [len(seqs[0])], k=K, tail_samples=N)[0]
    assert empty.n == 0 and empty.tail_ids is not None and empty.tail_ids.shape == (0, N)


def test_generate_tokens_do_not_depend_on_the_draws(model, tok, seqs):
    prompts = [s[: max(2, len(s) // 2)] for s in seqs]
    kw = dict(k=K, max_new_tokens=8, temperature=1.0, seed=5)
    got = generate_rows(model, tok, prompts, tail_samples=N, **kw)
    plain = generate_rows(model, tok, prompts, **kw)
    assert sum(g.rows.n for g in got) > 0
    for g, p, pr in zip(got, plain, prompts):
        np.testing.assert_array_equal(g.completion_ids, p.completion_ids)
        assert g.rows.tail_ids is not None and g.rows.tail_ids.shape == (g.rows.n, N) and p.rows.tail_ids is None
        assert g.rows.tail_problem(2**31 - 1) is None
        if g.rows.n:
            ref = _full_logprobs(model, np.concatenate([pr, g.completion_ids]), len(pr))
            lp = ref.gather(1, torch.as_tensor(g.rows.tail_ids).long())
            np.testing.assert_allclose(g.rows.tail_logprobs, lp, atol=1e-4)


def cfg(**kw):
    return GenerateConfig(model="m", data="d.jsonl", out="o", dtype="float32", **kw)


def test_config_refusals_and_identity():
    assert cfg().tail_samples == 0 and "tail_samples" not in cfg().identity()
    assert cfg(tail_samples=4).identity()["tail_samples"] == 4
    with pytest.raises(ConfigError, match="--tail-samples: must be >= 0"):
        cfg(tail_samples=-1)
    with pytest.raises(ConfigError, match="--tail-samples.*--backend vllm"):
        cfg(tail_samples=4, backend="vllm")


def test_vllm_refusal_is_one_line(tmp_path):
    data = write_prompts(tmp_path / "d.jsonl", 2)
    r = CliRunner().invoke(main, ["generate", "--model", "m", "--data", str(data), "--out", str(tmp_path / "c"),
                                  "--backend", "vllm", "--tail-samples", "4"])
    one_line_error(r, "--tail-samples", "--backend vllm")


@pytest.mark.parametrize("mode", ["score", "generate"])
def test_cli_records_draws(ascii_teacher_folder, tmp_path, mode):
    data = write_prompts(tmp_path / "d.jsonl", 3)
    base = ["generate", "--model", str(ascii_teacher_folder), "--data", str(data), "--mode", mode, "--top-k", "4",
            "--max-new-tokens", "6"]
    r = CliRunner().invoke(main, [*base, "--out", str(tmp_path / "on"), "--tail-samples", "3"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, [*base, "--out", str(tmp_path / "again"), "--tail-samples", "3"])
    assert r.exit_code == 0, r.output
    on, again = LogitCache.open(str(tmp_path / "on")), LogitCache.open(str(tmp_path / "again"))
    assert on.header.tail_samples == 3 and on.header.metadata["capture"]["tail_samples"] == 3
    a, b = on.read_rows(0, 0, on.num_positions), again.read_rows(0, 0, again.num_positions)
    assert a.n > 0 and a.tail_ids is not None and a.tail_ids.shape == (a.n, 3)
    np.testing.assert_array_equal(a.tail_ids, b.tail_ids)  # seeded from --seed, shard and batch
    assert verify_cache(str(tmp_path / "on")) == []


def test_top_k_covering_the_vocabulary_has_no_tail_to_sample(ascii_teacher_folder, tmp_path):
    data = write_prompts(tmp_path / "d.jsonl", 2)
    r = CliRunner().invoke(main, ["generate", "--model", str(ascii_teacher_folder), "--data", str(data), "--out",
                                  str(tmp_path / "c"), "--mode", "score", "--top-k", "200", "--tail-samples", "2"])
    one_line_error(r, "--tail-samples", "whole vocabulary (200)")
