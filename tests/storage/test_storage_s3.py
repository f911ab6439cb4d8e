"""A real S3 round trip against moto's server mode on 127.0.0.1 (started by the test, no network)."""

from __future__ import annotations

import numpy as np
import pytest
from cache_helpers import assert_records_equal, random_record, write_cache
from ci_helpers import need_module
from s3_helpers import moto_s3

from logitcache.storage import CacheIncompleteError, CacheWriter, LogitCache, verify_cache

# both come with the dev extra (scripts/setup_env.sh): a skip here, a failure under CI (ci_helpers.need)
need_module("s3fs", "needs s3fs: pip install -e '.[dev]'")
need_module("moto.server", "needs moto's server mode: pip install -e '.[dev]'")


@pytest.fixture(scope="module")
def s3():
    yield from moto_s3("caches")


def test_s3_roundtrip(s3):
    rng = np.random.default_rng(0)
    shards = [[random_record(rng, i + 10 * s, n_completion=5) for i in range(4)] for s in range(2)]
    url = "s3://caches/run1"
    for backend in ("zarr", "arrow"):
        write_cache(f"{url}-{backend}", shards, backend=backend, storage_options=s3)
        cache = LogitCache.open(f"{url}-{backend}", storage_options=s3)
        for recs in shards:
            for r in recs:
                assert_records_equal(r, cache.get(r.sample_id))
        assert verify_cache(f"{url}-{backend}", storage_options=s3) == []


def test_s3_roundtrip_format_v2(s3):
    """Format v2 over S3: the rank codec's shard-level dictionary and the chunk checksums, both backends."""
    rng = np.random.default_rng(1)
    shards = [[random_record(rng, i + 10 * s, n_completion=5) for i in range(3)] for s in range(2)]
    for backend in ("zarr", "arrow"):
        url = f"s3://caches/v2-{backend}"
        write_cache(url, shards, backend=backend, storage_options=s3, id_codec={"name": "rank"},
                    logprob_codec="fp16r")
        cache = LogitCache.open(url, storage_options=s3)
        assert cache.schema_version == 2
        for recs in shards:
            for r in recs:
                assert_records_equal(r, cache.get(r.sample_id), exact_logprobs=False, atol=0.03)
        assert verify_cache(url, storage_options=s3) == []


def test_s3_shard_without_marker_is_ignored_then_rewritten(s3):
    """A killed writer's marker-less shard never reads as complete; its rewrite replaces it whole."""
    import s3fs

    from logitcache.storage import CacheHeader

    fs = s3fs.S3FileSystem(**s3)
    header = CacheHeader(top_k=8, vocab_size=1000, num_shards=1)
    CacheWriter("s3://caches/partial", header, storage_options=s3)
    fs.pipe_file("caches/partial/shards/shard-000000/stale.bin", b"half a shard")  # a killed writer
    w = CacheWriter("s3://caches/partial", header, storage_options=s3)  # opening deletes nothing (no races)
    assert w.complete_shards() == [] and fs.exists("caches/partial/shards/shard-000000/stale.bin")
    with pytest.raises(CacheIncompleteError):
        LogitCache.open("s3://caches/partial", storage_options=s3)
    rec = random_record(np.random.default_rng(1), 5)
    w.write_shard(0, [rec])
    assert not fs.exists("caches/partial/shards/shard-000000/stale.bin")
    w.finalize()
    assert_records_equal(rec, LogitCache.open("s3://caches/partial", storage_options=s3).get(5), exact_logprobs=False)
    assert verify_cache("s3://caches/partial", storage_options=s3) == []

