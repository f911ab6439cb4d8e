"""Optional per-position logit moments (``logit_mean``/``logit_std``): records, round trips, header, refusals."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from cache_helpers import assert_records_equal, random_record, write_cache

from logitcache.storage import CacheHeader, LogitCache, PositionRows, SequenceRecord, verify_cache
from logitcache.storage.errors import CorruptCacheError
from logitcache.storage.layout import decode_rows
from logitcache.storage.verify import describe_cache


def with_moments(rng: np.random.Generator, rec: SequenceRecord) -> SequenceRecord:
    n = rec.rows.n
    rows = dataclasses.replace(rec.rows, logit_mean=rng.normal(size=n), logit_std=rng.uniform(0.5, 4, n))
    return dataclasses.replace(rec, rows=rows)


def moment_shards(seed: int, temps: tuple[float, ...] = (1.0, 2.0)) -> list[list[SequenceRecord]]:
    rng = np.random.default_rng(seed)
    sizes = [(0, 3, 9), (1,), ()]  # empty completions, one row, several; and an empty shard
    sid = 0
    shards = []
    for shard in sizes:
        recs = []
        for n in shard:
            recs.append(with_moments(rng, random_record(rng, sid, k=4, vocab=300, n_completion=n, temps=temps)))
            sid += 1
        shards.append(recs)
    return shards


def assert_moments_equal(a: PositionRows, b: PositionRows) -> None:
    assert a.logit_mean is not None and b.logit_mean is not None
    np.testing.assert_array_equal(a.logit_mean, b.logit_mean)
    np.testing.assert_array_equal(a.logit_std, b.logit_std)
    assert b.logit_mean.dtype == np.float32 and b.logit_std.dtype == np.float32


@pytest.mark.parametrize("backend", ["zarr", "arrow"])
def test_moments_roundtrip(tmp_path, backend):
    shards = moment_shards(0)
    path = str(tmp_path / "c")
    write_cache(path, shards, k=4, vocab=300, backend=backend, temps=(1.0, 2.0), logit_moments=True)
    cache = LogitCache.open(path)
    assert cache.header.logit_moments is True
    flat = [r for recs in shards for r in recs]
    assert sum(r.rows.n for r in flat) > 0
    for r in flat:
        got = cache.get(r.sample_id)
        assert_records_equal(r, got)
        assert_moments_equal(r.rows, got.rows)
    for a, b in zip(flat, cache.iter_sequences(), strict=True):
        assert_moments_equal(a.rows, b.rows)
    assert verify_cache(path) == []
    info = describe_cache(cache)
    assert info["row_statistics"] == ["lse@1", "lse@2", "logit_mean", "logit_std"]
    header = json.loads((tmp_path / "c" / "cache.json").read_text())["header"]
    assert header["logit_moments"] is True
    marker = json.loads((tmp_path / "c" / "shards" / "shard-000000" / "_COMPLETE.json").read_text())
    assert {k: v["dtype"] for k, v in marker["parts"].items() if k.startswith("logit_")} == {
        "logit_mean": "<f4",
        "logit_std": "<f4",
    }


def test_cache_without_moments_keeps_its_header_and_reads_none(tmp_path):
    rng = np.random.default_rng(1)
    recs = [random_record(rng, i, k=4, vocab=300, n_completion=3, temps=(1.0,)) for i in range(3)]
    write_cache(str(tmp_path / "c"), [recs], k=4, vocab=300, temps=(1.0,))
    header = json.loads((tmp_path / "c" / "cache.json").read_text())["header"]
    assert "logit_moments" not in header  # a header written before the flag existed looks exactly the same
    cache = LogitCache.open(tmp_path / "c")
    assert cache.header.logit_moments is False
    assert all(r.rows.logit_mean is None and r.rows.logit_std is None for r in cache.iter_sequences())
    assert "logit_mean" not in describe_cache(cache)["row_statistics"]


def test_fingerprint_unchanged_without_moments_and_changed_with_them():
    d = {"top_k": 4, "vocab_size": 300, "id_codec": {"name": "int32"}, "logprob_codec": {"name": "fp16"},
         "positions": {"name": "zarr"}, "extra_temperatures": [1.0, 2.0], "num_shards": 1, "metadata": {}}
    old = CacheHeader.from_dict(d)  # a header dict as code before logit moments wrote it
    assert old.to_dict() == d
    assert CacheHeader.from_dict({**d, "logit_moments": False}).fingerprint() == old.fingerprint()
    on = CacheHeader.from_dict({**d, "logit_moments": True})
    assert on.fingerprint() != old.fingerprint()
    assert on.differences(old) == ["logit_moments (True != None)"]


def test_header_rejects_a_non_boolean_flag():
    d = CacheHeader(top_k=4, vocab_size=300).to_dict()
    with pytest.raises(CorruptCacheError, match="logit_moments"):
        CacheHeader.from_dict({**d, "logit_moments": "yes"})


def test_writer_refuses_rows_that_do_not_match_the_header(tmp_path):
    rng = np.random.default_rng(2)
    plain = random_record(rng, 0, k=4, vocab=300, n_completion=3)
    with pytest.raises(ValueError, match="lack logit moments"):
        write_cache(str(tmp_path / "a"), [[plain]], k=4, vocab=300, logit_moments=True)
    with pytest.raises(ValueError, match="carry logit moments"):
        write_cache(str(tmp_path / "b"), [[with_moments(rng, plain)]], k=4, vocab=300)


def test_rows_validate_moments():
    rng = np.random.default_rng(3)
    rows = random_record(rng, 0, k=4, vocab=300, n_completion=5).rows
    with pytest.raises(ValueError, match="both or neither"):
        dataclasses.replace(rows, logit_mean=np.zeros(5))
    with pytest.raises(ValueError, match="logit_std has 4 rows"):
        dataclasses.replace(rows, logit_mean=np.zeros(5), logit_std=np.zeros(4))
    full = dataclasses.replace(rows, logit_mean=np.arange(5.0), logit_std=np.arange(5.0) + 1)
    assert full.has_moments and not rows.has_moments
    part = full.slice(1, 3)
    np.testing.assert_array_equal(part.logit_mean, [1.0, 2.0])
    both = PositionRows.concat([full, part], 4)
    np.testing.assert_array_equal(both.logit_std, [1, 2, 3, 4, 5, 2, 3])
    with pytest.raises(ValueError, match="some parts carry logit moments"):
        PositionRows.concat([full, rows], 4)
    empty = PositionRows.empty(4, (1.0,), moments=True)
    assert empty.has_moments and empty.logit_std.shape == (0,)


def test_old_readers_ignore_the_extra_arrays(tmp_path):
    """Code that predates the flag reads every part a shard lists and decodes those it knows: the same rows."""
    shards = moment_shards(4)
    write_cache(str(tmp_path / "c"), shards, k=4, vocab=300, temps=(1.0, 2.0), logit_moments=True)
    cache = LogitCache.open(tmp_path / "c")
    parts = cache.position_reader(0).read(list(cache.part_specs(0)), 0, cache.shards[0].positions)
    assert {"logit_mean", "logit_std"} <= set(parts)
    old = decode_rows(parts, cache.id_codec, cache.lp_codec, [1.0, 2.0], 4)  # no moments argument: old code
    new = cache.read_rows(0, 0, cache.shards[0].positions)
    np.testing.assert_array_equal(old.topk_ids, new.topk_ids)
    np.testing.assert_array_equal(old.topk_logprobs, new.topk_logprobs)
    np.testing.assert_array_equal(old.extra_lse[2.0], new.extra_lse[2.0])
    assert old.logit_mean is None and new.logit_mean is not None


def test_collate_accepts_rows_with_moments():
    from logitcache.distill.batch import Example, collate

    rng = np.random.default_rng(5)
    rec = with_moments(rng, random_record(rng, 0, k=4, vocab=300, n_completion=4, temps=(1.0,)))
    ex = Example(
        sample_id=0,
        input_ids=np.arange(6, dtype=np.int64),
        prompt_len=2,
        targets=np.arange(2, 6, dtype=np.int64),
        teacher=rec.rows,
        pairs=np.zeros((4, 2), np.int64),
        chunks=np.zeros((0, 4), np.int64),
        teacher_token_ids=rec.token_ids,
        teacher_prompt_len=rec.prompt_len,
    )
    batch = collate([ex], pad_id=0, k=4, temperatures=[1.0])
    assert batch.teacher_topk_ids.shape == (1, 4, 4)
    np.testing.assert_array_equal(batch.teacher_lse[1.0][0].numpy(), rec.rows.extra_lse[1.0])
