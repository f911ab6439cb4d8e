"""Optional per-position tail draws (``tail_ids``/``tail_logprobs``, ``--tail-samples``): records, round trips,
header, convert, verify."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from cache_helpers import assert_records_equal, random_record, write_cache

from logitcache.storage import CacheHeader, LogitCache, SequenceRecord, verify_cache
from logitcache.storage.convert import convert_cache
from logitcache.storage.errors import CorruptCacheError
from logitcache.storage.verify import describe_cache

N, K, V = 3, 4, 300


def with_tail(rng: np.random.Generator, rec: SequenceRecord, n: int = N) -> SequenceRecord:
    rows = rec.rows
    ids = np.zeros((rows.n, n), np.int32)
    for r in range(rows.n):
        outside = np.setdiff1d(np.arange(V), rows.topk_ids[r])
        ids[r] = rng.choice(outside, size=n, replace=True)
    lps = -rng.uniform(5, 20, (rows.n, n))
    return dataclasses.replace(rec, rows=dataclasses.replace(rows, tail_ids=ids, tail_logprobs=lps))


def tail_shards(seed: int) -> list[list[SequenceRecord]]:
    rng = np.random.default_rng(seed)
    sizes = [(0, 3, 9), (1,), ()]  # empty completions, one row, several; and an empty shard
    sid, shards = 0, []
    for shard in sizes:
        recs = []
        for n in shard:
            recs.append(with_tail(rng, random_record(rng, sid, k=K, vocab=V, n_completion=n, temps=(1.0,))))
            sid += 1
        shards.append(recs)
    return shards


def assert_tail_equal(a: SequenceRecord, b: SequenceRecord) -> None:
    assert a.rows.tail_ids is not None and b.rows.tail_ids is not None
    np.testing.assert_array_equal(a.rows.tail_ids, b.rows.tail_ids)
    np.testing.assert_array_equal(a.rows.tail_logprobs, b.rows.tail_logprobs)
    assert b.rows.tail_ids.dtype == np.int32 and b.rows.tail_logprobs.dtype == np.float32


@pytest.mark.parametrize("backend", ["zarr", "arrow"])
def test_tail_roundtrip(tmp_path, backend):
    shards = tail_shards(0)
    path = str(tmp_path / "c")
    write_cache(path, shards, k=K, vocab=V, backend=backend, temps=(1.0,), tail_samples=N)
    cache = LogitCache.open(path)
    assert cache.header.tail_samples == N
    flat = [r for recs in shards for r in recs]
    assert sum(r.rows.n for r in flat) > 0
    for r in flat:
        got = cache.get(r.sample_id)
        assert_records_equal(r, got)
        assert_tail_equal(r, got)
        assert got.rows.tail_samples == N
    assert verify_cache(path) == []
    assert describe_cache(cache)["tail_samples"] == N
    header = json.loads((tmp_path / "c" / "cache.json").read_text())["header"]
    assert header["tail_samples"] == N
    marker = json.loads((tmp_path / "c" / "shards" / "shard-000000" / "_COMPLETE.json").read_text())
    assert {k: (v["dtype"], v["shape"]) for k, v in marker["parts"].items() if k.startswith("tail_")} == {
        "tail_ids": ("<i4", [N]),
        "tail_logprobs": ("<f4", [N]),
    }


def test_cache_without_draws_keeps_its_header_and_reads_none(tmp_path):
    rng = np.random.default_rng(1)
    recs = [random_record(rng, i, k=K, vocab=V, n_completion=3) for i in range(3)]
    write_cache(str(tmp_path / "c"), [recs], k=K, vocab=V)
    header = json.loads((tmp_path / "c" / "cache.json").read_text())["header"]
    assert "tail_samples" not in header  # headers (and fingerprints) of caches without draws are unchanged
    cache = LogitCache.open(tmp_path / "c")
    assert cache.header.tail_samples == 0
    assert all(r.rows.tail_ids is None and r.rows.tail_samples == 0 for r in cache.iter_sequences())


def test_header_validates_tail_samples():
    d = CacheHeader(top_k=K, vocab_size=V).to_dict()
    assert CacheHeader.from_dict({**d, "tail_samples": 0}).fingerprint() == CacheHeader.from_dict(d).fingerprint()
    assert CacheHeader.from_dict({**d, "tail_samples": 2}).fingerprint() != CacheHeader.from_dict(d).fingerprint()
    for bad in (-1, "4", True, 1.5):
        with pytest.raises(CorruptCacheError, match="tail_samples"):
            CacheHeader.from_dict({**d, "tail_samples": bad})
    with pytest.raises(ValueError, match="needs a tail"):
        CacheHeader(top_k=V, vocab_size=V, tail_samples=1)


def test_writer_refuses_rows_that_do_not_match_the_header(tmp_path):
    rng = np.random.default_rng(2)
    plain = random_record(rng, 0, k=K, vocab=V, n_completion=3)
    with pytest.raises(ValueError, match="carry 0 tail draws"):
        write_cache(str(tmp_path / "a"), [[plain]], k=K, vocab=V, tail_samples=N)
    with pytest.raises(ValueError, match=f"carry {N} tail draws"):
        write_cache(str(tmp_path / "b"), [[with_tail(rng, plain)]], k=K, vocab=V)


def test_rows_validate_draws():
    rng = np.random.default_rng(3)
    rows = with_tail(rng, random_record(rng, 0, k=K, vocab=V, n_completion=5)).rows
    with pytest.raises(ValueError, match="both or neither"):
        dataclasses.replace(rows, tail_logprobs=None)
    with pytest.raises(ValueError, match=r"must both be \[n, N\]"):
        dataclasses.replace(rows, tail_logprobs=rows.tail_logprobs[:, :2])
    part = rows.slice(1, 3)
    np.testing.assert_array_equal(part.tail_ids, rows.tail_ids[1:3])
    assert rows.tail_problem(V) is None


@pytest.mark.parametrize(
    "damage, what",
    [
        (lambda r: r.tail_ids.__setitem__((2, 1), r.topk_ids[2, 3]), "top-K"),
        (lambda r: r.tail_ids.__setitem__((2, 0), V), "outside"),
        (lambda r: r.tail_logprobs.__setitem__((2, 2), 0.5), "NaN or positive"),
        (lambda r: r.tail_logprobs.__setitem__((2, 2), np.nan), "NaN or positive"),
    ],
)
def test_verify_names_bad_draws(tmp_path, damage, what):
    rng = np.random.default_rng(4)
    rec = with_tail(rng, random_record(rng, 0, k=K, vocab=V, n_completion=5))
    assert rec.rows.tail_problem(V) is None
    damage(rec.rows)
    row, message = rec.rows.tail_problem(V)
    assert row == 2 and what in message
    path = str(tmp_path / "c")
    write_cache(path, [[rec]], k=K, vocab=V, tail_samples=N)
    problems = verify_cache(path)
    assert len(problems) == 1 and "row 2" in problems[0] and what in problems[0], problems


def test_convert_keeps_draws_and_drops_them_on_a_cut_k_or_on_request(tmp_path):
    shards = tail_shards(5)
    src = str(tmp_path / "src")
    write_cache(src, shards, k=K, vocab=V, temps=(1.0,), tail_samples=N)
    flat = {r.sample_id: r for recs in shards for r in recs}
    convert_cache(src, tmp_path / "same", logprob_codec={"name": "fp16"})
    out = LogitCache.open(tmp_path / "same")
    assert out.header.tail_samples == N and verify_cache(str(tmp_path / "same")) == []
    for r in out.iter_sequences():
        assert_tail_equal(flat[r.sample_id], r)
    for name, kw in (("cut", {"top_k": K - 1}), ("drop", {"drop_tail": True})):
        convert_cache(src, tmp_path / name, **kw)
        out = LogitCache.open(tmp_path / name)
        assert out.header.tail_samples == 0 and "tail_samples" not in out.header.to_dict()
        assert out.header.metadata["convert"]["tail_samples"] == 0
        assert all(r.rows.tail_ids is None for r in out.iter_sequences())
        assert verify_cache(str(tmp_path / name)) == []


def test_cli_convert_drop_tail_and_inspect(tmp_path):
    from click.testing import CliRunner

    from logitcache.cli import main

    src = str(tmp_path / "src")
    write_cache(src, tail_shards(6), k=K, vocab=V, temps=(1.0,), tail_samples=N)
    r = CliRunner().invoke(main, ["convert", src, str(tmp_path / "out"), "--drop-tail"])
    assert r.exit_code == 0, r.output
    assert LogitCache.open(tmp_path / "out").header.tail_samples == 0
    r = CliRunner().invoke(main, ["inspect", src, "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["tail_samples"] == N, r.output
