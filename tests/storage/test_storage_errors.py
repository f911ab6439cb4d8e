"""Bad input and damage: every case names the file or field, and no damage reads as a sound cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from cache_helpers import random_record, write_cache
from proc_helpers import killed_when_parked

from logitcache.storage import (
    CacheHeader,
    CacheIncompleteError,
    CacheNotFoundError,
    CacheWriter,
    ConfigMismatchError,
    CorruptCacheError,
    LogitCache,
    SchemaVersionError,
    verify_cache,
)
from logitcache.storage.codecs import UnknownCodecError


@pytest.fixture
def cache_path(tmp_path):
    rng = np.random.default_rng(0)
    shards = [[random_record(rng, i + 10 * s, n_completion=6) for i in range(4)] for s in range(2)]
    path = tmp_path / "cache"
    write_cache(str(path), shards)
    return path


def test_missing_path(tmp_path):
    with pytest.raises(CacheNotFoundError, match="no such cache folder"):
        LogitCache.open(tmp_path / "nope")
    assert "no such cache folder" in verify_cache(tmp_path / "nope")[0]


def test_missing_manifest_means_incomplete(cache_path):
    (cache_path / "manifest.json").unlink()
    with pytest.raises(CacheIncompleteError, match="not finalized"):
        LogitCache.open(cache_path)


def test_folder_that_is_not_a_cache(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(CacheNotFoundError, match="not a logitcache cache"):
        LogitCache.open(tmp_path / "x")


def test_corrupt_manifest(cache_path):
    (cache_path / "manifest.json").write_text("{not json")
    with pytest.raises(CorruptCacheError, match=r"manifest.json: not valid JSON"):
        LogitCache.open(cache_path)


def test_newer_schema_version_names_the_version(cache_path):
    doc = json.loads((cache_path / "manifest.json").read_text())
    doc["schema_version"] = 99
    (cache_path / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(SchemaVersionError, match="schema_version 99 is newer.*reads schema version 99"):
        LogitCache.open(cache_path)


def test_unknown_codec(cache_path):
    doc = json.loads((cache_path / "manifest.json").read_text())
    doc["header"]["logprob_codec"] = {"name": "zfp-magic"}
    (cache_path / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(UnknownCodecError, match="zfp-magic"):
        LogitCache.open(cache_path)


def _largest_data_file(cache_path):
    files = [
        p for p in (cache_path / "shards" / "shard-000001").rglob("*") if p.is_file() and p.name != "_COMPLETE.json"
    ]
    return max(files, key=lambda p: p.stat().st_size)


def test_truncated_shard_is_reported(cache_path):
    f = _largest_data_file(cache_path)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    problems = verify_cache(cache_path)
    assert any("shard-000001" in p and "truncated" in p for p in problems), problems


def test_flipped_byte_fails_checksum(cache_path):
    f = _largest_data_file(cache_path)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    problems = verify_cache(cache_path)
    assert any("shard-000001" in p and "checksum mismatch" in p for p in problems), problems


def test_unsorted_rows_are_reported(tmp_path):
    rng = np.random.default_rng(5)
    rec = random_record(rng, 0, n_completion=4)
    rec.rows.topk_logprobs[1] = rec.rows.topk_logprobs[1][::-1].copy()
    write_cache(str(tmp_path / "c"), [[rec]])
    problems = verify_cache(tmp_path / "c")
    assert any("not sorted by descending logprob" in p for p in problems), problems


def test_refuses_non_empty_folder_unless_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    header = CacheHeader(top_k=4, vocab_size=100, num_shards=1)
    with pytest.raises(ConfigMismatchError, match="not empty.*--overwrite"):
        CacheWriter(tmp_path / "out", header)
    CacheWriter(tmp_path / "out", header, overwrite=True)
    assert not (tmp_path / "out" / "notes.txt").exists()


def test_refuses_cache_of_another_config_unless_overwrite(cache_path):
    other = CacheHeader(top_k=16, vocab_size=1000, num_shards=2, logprob_codec={"name": "fp32"})
    with pytest.raises(ConfigMismatchError, match=r"different config \(top_k"):
        CacheWriter(cache_path, other)
    w = CacheWriter(cache_path, other, overwrite=True)
    assert w.complete_shards() == []


def test_same_config_resumes(cache_path):
    header = CacheHeader(top_k=8, vocab_size=1000, num_shards=2, logprob_codec={"name": "fp32"})
    assert CacheWriter(cache_path, header).complete_shards() == [0, 1]


def test_finalize_names_missing_shards(tmp_path):
    w = CacheWriter(tmp_path / "c", CacheHeader(top_k=8, vocab_size=1000, num_shards=3))
    w.write_shard(1, [random_record(np.random.default_rng(0), 0)])
    with pytest.raises(Exception, match=r"2 of 3 shards are not written yet \(missing: 0, 2\)"):
        w.finalize()


def test_two_writers_on_one_cache_do_not_disturb_each_other(tmp_path):
    """Job-array tasks open the same cache concurrently: opening must not delete a shard in progress."""
    header = CacheHeader(top_k=8, vocab_size=1000, num_shards=2)
    a = CacheWriter(tmp_path / "c", header)
    in_progress = tmp_path / "c" / "shards" / ".tmp-shard-000000-abcd1234"
    in_progress.mkdir(parents=True)
    (in_progress / "sequences.parquet").write_bytes(b"being written")
    b = CacheWriter(tmp_path / "c", header)  # a second task starts
    assert in_progress.exists()
    rng = np.random.default_rng(0)
    a.write_shard(0, [random_record(rng, 0)])
    b.write_shard(1, [random_record(rng, 1)])
    b.finalize()
    assert not in_progress.exists()  # leftovers go at finalization, when every shard is complete
    assert LogitCache.open(tmp_path / "c").num_sequences == 2


KILL_SCRIPT = textwrap.dedent(
    """
    import sys, numpy as np
    sys.path.insert(0, {tests!r})
    from cache_helpers import random_record
    from logitcache.storage import CacheHeader, CacheWriter
    from logitcache.storage import writer as wmod
    header = CacheHeader(top_k=8, vocab_size=1000, num_shards=4, logprob_codec={{"name": "fp32"}})
    w = CacheWriter({path!r}, header)
    rng = np.random.default_rng(0)
    shards = [[random_record(rng, 1000 * s + i, n_completion=50) for i in range(200)] for s in range(4)]
    park = sys.argv[1:] == ["park"]
    original = wmod.pq.write_table
    def write_table(table, where, *a, **k):
        original(table, where, *a, **k)
        if park and ".tmp-shard-000001" in str(where):
            # shard 1's sequence table is on disk in its temporary folder, its marker is not: wait to be killed
            print("parked", where, flush=True)
            sys.stdin.readline()
    wmod.pq.write_table = write_table
    for s in range(4):
        if not w.is_complete(s):
            w.write_shard(s, shards[s])
            print("shard", s, flush=True)
    w.finalize()
    print("finalized", flush=True)
    """
)


def test_sigkill_mid_shard_then_rerun_finishes(tmp_path):
    path = str(tmp_path / "cache")
    script = KILL_SCRIPT.format(tests=os.path.dirname(os.path.dirname(__file__)), path=path)
    with killed_when_parked([sys.executable, "-c", script, "park"], "shard 1 was half-written") as seen:
        # precondition: the kill lands mid-shard (shard 1's table written under its temporary name)
        assert os.path.isfile(seen[-1].removeprefix("parked "))
    assert "shard 0" in seen
    with pytest.raises(CacheIncompleteError):
        LogitCache.open(path)
    shard_dirs = sorted(os.listdir(os.path.join(path, "shards")))
    assert "shard-000001" not in shard_dirs  # the half-written shard only exists under a temporary name
    assert any(d.startswith(".tmp-shard-000001") for d in shard_dirs)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert "shard 0" not in out and "finalized" in out  # shard 0 was skipped, the rest written
    cache = LogitCache.open(path)
    assert cache.num_sequences == 800
    assert sorted(cache.sample_ids().tolist()) == sorted(1000 * s + i for s in range(4) for i in range(200))
    assert not any(d.startswith(".tmp-") for d in os.listdir(os.path.join(path, "shards")))
    assert verify_cache(path) == []
