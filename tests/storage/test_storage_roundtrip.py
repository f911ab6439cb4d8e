"""Writer/reader round trips: property-tested over record shapes, both backends, codecs, and remote URLs."""

from __future__ import annotations

import numpy as np
import pytest
from cache_helpers import assert_records_equal, random_record, write_cache
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from logitcache.storage import LogitCache, verify_cache


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(0, 2**32 - 1),
    backend=st.sampled_from(["zarr", "arrow"]),
    shard_sizes=st.lists(st.integers(0, 4), min_size=1, max_size=3),
    k=st.sampled_from([1, 3, 8]),
    temps=st.sampled_from([(), (2.0,), (0.5, 2.0)]),
    big_vocab=st.booleans(),
)
def test_roundtrip_property(tmp_path_factory, seed, backend, shard_sizes, k, temps, big_vocab):
    rng = np.random.default_rng(seed)
    vocab = 262144 if big_vocab else 50
    sid = 0
    shards = []
    for size in shard_sizes:
        recs = []
        for _ in range(size):
            # include empty completions (0 rows) and one-position sequences
            n_comp = int(rng.choice([0, 1, int(rng.integers(2, 9))]))
            recs.append(random_record(rng, sid * 7 + 3, k=k, vocab=vocab, n_completion=n_comp, temps=temps))
            sid += 1
        shards.append(recs)
    if big_vocab:  # ids near 2^18 for a 262k vocabulary
        for recs in shards:
            for r in recs:
                r.rows.topk_ids[:] = np.clip(r.rows.topk_ids, 0, None) % 16 + (vocab - 16)
    path = str(tmp_path_factory.mktemp("c") / "cache")
    write_cache(path, shards, k=k, vocab=vocab, backend=backend, temps=temps)
    cache = LogitCache.open(path)
    flat = [r for recs in shards for r in recs]
    assert cache.num_sequences == len(flat)
    assert cache.num_positions == sum(r.rows.n for r in flat)
    for r in flat:
        assert_records_equal(r, cache.get(r.sample_id))
    for a, b in zip(flat, cache.iter_sequences(), strict=True):
        assert_records_equal(a, b)
    assert verify_cache(path) == []


@pytest.mark.parametrize("backend", ["zarr", "arrow"])
def test_fp16_codec_roundtrip_is_close(tmp_path, backend):
    rng = np.random.default_rng(0)
    recs = [random_record(rng, i, k=16, vocab=5000, n_completion=20) for i in range(10)]
    write_cache(str(tmp_path / "c"), [recs], k=16, vocab=5000, backend=backend, logprob_codec="fp16")
    cache = LogitCache.open(tmp_path / "c")
    for r in recs:
        assert_records_equal(r, cache.get(r.sample_id), exact_logprobs=False)


def test_iter_rows_streams_blocks(tmp_path):
    rng = np.random.default_rng(1)
    recs = [random_record(rng, i, n_completion=30) for i in range(20)]
    write_cache(str(tmp_path / "c"), [recs])
    cache = LogitCache.open(tmp_path / "c")
    blocks = list(cache.iter_rows(0, block_rows=64))
    assert [b.n for b in blocks] == [64] * 9 + [600 - 576]
    np.testing.assert_array_equal(
        np.concatenate([b.topk_ids for b in blocks]), np.concatenate([r.rows.topk_ids for r in recs])
    )


def test_memory_url_roundtrip():
    rng = np.random.default_rng(2)
    shards = [[random_record(rng, i + 10 * s) for i in range(5)] for s in range(2)]
    url = f"memory://logitcache-test-{rng.integers(1 << 30)}/cache"
    write_cache(url, shards)
    cache = LogitCache.open(url)
    for recs in shards:
        for r in recs:
            assert_records_equal(r, cache.get(r.sample_id))
    assert verify_cache(url) == []


def test_tokenizer_copy_roundtrip(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(["hello world", "hello there world"], trainers.BpeTrainer(special_tokens=["<unk>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>")
    rng = np.random.default_rng(3)
    w = write_cache(str(tmp_path / "c"), [[random_record(rng, 0)]])
    w.save_tokenizer(tok)
    w.finalize()
    cache = LogitCache.open(tmp_path / "c")
    assert cache.has_tokenizer()
    assert cache.load_tokenizer().encode("hello world") == tok.encode("hello world")
