"""Helpers shared by storage tests: random but valid sequence records and small caches."""

from __future__ import annotations

import numpy as np

from logitcache.storage import CacheHeader, CacheWriter, PositionRows, SequenceRecord


def random_rows(rng: np.random.Generator, n: int, k: int, vocab: int, temps: tuple[float, ...] = ()) -> PositionRows:
    ids = np.stack([rng.choice(vocab, size=k, replace=False) for _ in range(n)]) if n else np.zeros((0, k))
    logits = rng.normal(size=(n, k)) * 3
    lps = np.sort(logits - np.log(np.exp(logits).sum(1, keepdims=True) + rng.uniform(0.01, 2, (n, 1))), axis=1)[:, ::-1]
    targets = np.where(rng.random(n) < 0.8, ids[:, 0] if n else 0, rng.integers(0, vocab, n))
    target_lps = np.where(targets == (ids[:, 0] if n else -1), lps[:, 0] if n else 0, -rng.uniform(3, 20, n))
    return PositionRows(ids, lps, targets, target_lps, {t: rng.normal(size=n) for t in temps})


def random_record(
    rng: np.random.Generator,
    sample_id: int,
    k: int = 8,
    vocab: int = 1000,
    n_prompt: int | None = None,
    n_completion: int | None = None,
    temps: tuple[float, ...] = (),
) -> SequenceRecord:
    n_prompt = int(rng.integers(1, 6)) if n_prompt is None else n_prompt
    n_completion = int(rng.integers(0, 12)) if n_completion is None else n_completion
    words = [f"w{rng.integers(0, 99)}é " for _ in range(n_prompt + n_completion)]
    prompt = "".join(words[:n_prompt])
    completion = "".join(words[n_prompt:])
    offsets = np.cumsum([0] + [len(w.encode()) for w in words])[:-1]
    return SequenceRecord(
        sample_id=sample_id,
        source_id=f"src-{sample_id}",
        prompt_text=prompt,
        completion_text=completion,
        token_ids=rng.integers(0, vocab, n_prompt + n_completion),
        token_byte_offsets=offsets,
        prompt_len=n_prompt,
        finish_reason="stop" if n_completion % 2 else "length",
        rows=random_rows(rng, n_completion, k, vocab, temps),
    )


def write_cache(
    path: str,
    shards: list[list[SequenceRecord]],
    k: int = 8,
    vocab: int = 1000,
    backend: str = "zarr",
    logprob_codec: str = "fp32",
    temps: tuple[float, ...] = (),
    storage_options: dict | None = None,
    **header_kw,
) -> CacheWriter:
    header = CacheHeader(
        top_k=k,
        vocab_size=vocab,
        positions={"name": backend},
        logprob_codec={"name": logprob_codec},
        extra_temperatures=list(temps),
        num_shards=len(shards),
        **header_kw,
    )
    writer = CacheWriter(path, header, storage_options=storage_options)
    for i, records in enumerate(shards):
        writer.write_shard(i, records)
    writer.finalize()
    return writer


def assert_records_equal(a: SequenceRecord, b: SequenceRecord, exact_logprobs: bool = True, atol: float = 1e-3) -> None:
    """Equal records; with ``exact_logprobs=False`` logprobs may differ by ``atol`` (codec or float noise)."""
    assert a.sample_id == b.sample_id and a.source_id == b.source_id
    assert a.prompt_text == b.prompt_text and a.completion_text == b.completion_text
    np.testing.assert_array_equal(a.token_ids, b.token_ids)
    np.testing.assert_array_equal(a.token_byte_offsets, b.token_byte_offsets)
    assert a.prompt_len == b.prompt_len and a.finish_reason == b.finish_reason
    np.testing.assert_array_equal(a.rows.topk_ids, b.rows.topk_ids)
    np.testing.assert_array_equal(a.rows.target_ids, b.rows.target_ids)
    if exact_logprobs:
        np.testing.assert_array_equal(a.rows.target_logprobs, b.rows.target_logprobs)
        np.testing.assert_array_equal(a.rows.topk_logprobs, b.rows.topk_logprobs)
    else:
        np.testing.assert_allclose(a.rows.target_logprobs, b.rows.target_logprobs, rtol=0, atol=atol)
        np.testing.assert_allclose(a.rows.topk_logprobs, b.rows.topk_logprobs, rtol=1e-3, atol=atol)
    assert sorted(a.rows.extra_lse) == sorted(b.rows.extra_lse)
    for t in a.rows.extra_lse:
        if exact_logprobs:
            np.testing.assert_array_equal(a.rows.extra_lse[t], b.rows.extra_lse[t])
        else:  # lse is float32 of magnitude ~10: compare at the same relative precision as the logprobs
            np.testing.assert_allclose(a.rows.extra_lse[t], b.rows.extra_lse[t], rtol=1e-5, atol=atol)
