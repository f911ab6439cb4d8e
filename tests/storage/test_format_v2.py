"""Format v2: the ``rank`` id codec (property round trips), schema versions (new caches are v2, v1 caches read and
resume as v1, v1-only code refuses v2 by version), shard-level parts on both backends, and per-chunk checksums
(verify names the damaged shard, part and chunk; a damaged chunk never decodes into garbage)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from cache_helpers import assert_records_equal, random_record, write_cache
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from logitcache.storage import CacheHeader, CacheWriter, CorruptCacheError, LogitCache, SchemaVersionError, verify_cache
from logitcache.storage import manifest as manifest_mod
from logitcache.storage.codecs import Fp16rLogprobs, RankIds, id_codec_from_config

FIXTURES = Path(__file__).parent / "fixtures"


# --- the rank codec -----------------------------------------------------------------------------------------


@st.composite
def id_rows(draw: st.DrawFn) -> np.ndarray:
    """[n, K] rows of distinct ids (as a teacher's top-K), K up to 64, vocab up to 262,144, n may be 0 or 1."""
    vocab = draw(st.sampled_from([64, 1000, 50_000, 262_144]))
    k = draw(st.integers(1, 64))
    n = draw(st.sampled_from([0, 1, draw(st.integers(2, 40))]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    skew = draw(st.sampled_from(["uniform", "zipf", "edges"]))
    rows = []
    for _ in range(n):
        if skew == "uniform":
            rows.append(rng.choice(vocab, size=k, replace=False))
        elif skew == "zipf":  # a few frequent ids, the rest spread: what real rows look like
            pool = np.unique(np.minimum(rng.zipf(1.3, size=4 * k), vocab) - 1)
            extra = rng.choice(vocab, size=k, replace=False)
            both = np.unique(np.concatenate([pool, extra]))  # sorted, distinct, at least k of them
            rows.append(both[:k])
        else:  # ids at the ends of the vocabulary
            rows.append(np.concatenate([np.arange(k // 2), vocab - 1 - np.arange(k - k // 2)]))
    out = np.stack(rows).astype(np.int32) if rows else np.zeros((0, k), np.int32)
    return np.ascontiguousarray(out[:, rng.permutation(k)]) if n else out


@settings(max_examples=150, deadline=None)
@given(ids=id_rows())
def test_rank_codec_round_trip(ids: np.ndarray) -> None:
    codec = id_codec_from_config({"name": "rank"})
    parts = codec.encode(ids)
    assert set(parts) == {"ranks", "dict"}
    assert parts["ranks"].shape == ids.shape and parts["ranks"].dtype.kind == "u"
    table = parts["dict"]
    assert table.dtype == np.int32 and len(np.unique(table)) == len(table) == len(np.unique(ids))
    counts = np.array([(ids == v).sum() for v in table[:50]])
    assert (np.diff(counts) <= 0).all()  # most frequent first
    out = codec.decode({name: np.array(a) for name, a in parts.items()}, ids.shape[1])
    assert out.dtype == np.int32 and out.shape == ids.shape
    np.testing.assert_array_equal(out, ids)


@settings(max_examples=30, deadline=None)
@given(ids=hnp.arrays(np.int32, st.tuples(st.integers(0, 5), st.integers(1, 9)), elements=st.integers(0, 2**31 - 1)))
def test_rank_codec_any_nonnegative_int32(ids: np.ndarray) -> None:
    if ids.size and int(ids.max()) > 1 << 24:  # bincount over the id range: keep it to vocabulary-sized ids
        ids = ids % (1 << 24)
    codec = RankIds()
    np.testing.assert_array_equal(codec.decode(codec.encode(ids), ids.shape[1]), ids)


def test_rank_codec_wide_dictionary_uses_uint32() -> None:
    ids = np.arange(70_000 * 2, dtype=np.int32).reshape(-1, 2)  # 140,000 distinct ids
    parts = RankIds().encode(ids)
    assert parts["ranks"].dtype == np.uint32
    np.testing.assert_array_equal(RankIds().decode(parts, 2), ids)


def test_rank_codec_refuses_bad_input_and_bad_parts() -> None:
    codec = RankIds()
    with pytest.raises(ValueError, match="integers"):
        codec.encode(np.array([[-1, 2]]))
    with pytest.raises(ValueError, match="2-D"):
        codec.encode(np.array([1, 2]))
    parts = codec.encode(np.array([[5, 9]], np.int32))
    with pytest.raises(ValueError, match="outside the dictionary"):
        codec.decode({"ranks": np.array([[0, 7]], np.uint16), "dict": parts["dict"]}, 2)
    with pytest.raises(ValueError, match="missing part"):
        codec.decode({"ranks": parts["ranks"]}, 2)


# --- the fp16r logprob codec ----------------------------------------------------------------------------------


def _round_mantissa(x: np.ndarray, bits: int) -> np.ndarray:
    """Reference: float64 rounding of each value to ``bits`` mantissa bits, ties away from zero."""
    m, e = np.frexp(x.astype(np.float64))  # x = m * 2**e, 0.5 <= |m| < 1
    scale = 2.0 ** (bits + 1)
    return np.ldexp(np.sign(m) * np.floor(np.abs(m) * scale + 0.5) / scale, e)


@settings(max_examples=80, deadline=None)
@given(
    x=hnp.arrays(np.float32, st.tuples(st.integers(0, 6), st.integers(1, 64)),
                 elements=st.floats(-60000, 0, width=32) | st.just(-np.inf)),
    drop=st.integers(0, 4),
)
def test_fp16r_rounds_once_and_keeps_order(x: np.ndarray, drop: int) -> None:
    x = np.ascontiguousarray(np.sort(x, axis=1)[:, ::-1])
    codec = Fp16rLogprobs(drop)
    out = codec.decode({k: np.array(v) for k, v in codec.encode(x).items()}, x.shape[1])
    assert out.dtype == np.float32 and out.shape == x.shape
    assert (out <= 0).all() and not np.isnan(out).any()
    assert (out[:, 1:] <= out[:, :-1]).all()  # still sorted (-inf included)
    np.testing.assert_array_equal(np.isneginf(out), np.isneginf(x))
    normal = np.isfinite(x) & (np.abs(x) >= 2.0**-14)  # float16 normal range: one rounding, to 10 - drop bits
    expected = _round_mantissa(x[normal], 10 - drop)
    np.testing.assert_array_equal(out[normal].astype(np.float64), expected)


def test_fp16r_drop0_is_fp16_and_config() -> None:
    from logitcache.storage.codecs import Fp16Logprobs, logprob_codec_from_config

    x = -np.sort(np.random.default_rng(0).exponential(3, (200, 16)), axis=1).astype(np.float32)
    a = Fp16rLogprobs(0)
    np.testing.assert_array_equal(a.decode(a.encode(x), 16), Fp16Logprobs().decode(Fp16Logprobs().encode(x), 16))
    assert logprob_codec_from_config({"name": "fp16r"}).config() == {"name": "fp16r", "drop": 1}
    with pytest.raises(ValueError, match="drop"):
        Fp16rLogprobs(7)


# --- caches -------------------------------------------------------------------------------------------------


def _shards(seed: int, sizes: list[int], k: int = 8, vocab: int = 300, temps: tuple[float, ...] = (1.0, 2.0)):
    rng = np.random.default_rng(seed)
    sid = 0
    out = []
    for size in sizes:
        recs = []
        for _ in range(size):
            recs.append(random_record(rng, sid, k=k, vocab=vocab, n_completion=int(rng.integers(0, 30)), temps=temps))
            sid += 1
        out.append(recs)
    return out


@pytest.mark.parametrize("backend", ["zarr", "arrow"])
def test_v2_cache_round_trip_with_rank_ids(tmp_path: Path, backend: str) -> None:
    shards = _shards(1, [6, 0, 1])  # an empty shard and a one-sequence shard
    path = str(tmp_path / "c")
    write_cache(path, shards, k=8, vocab=300, backend=backend, temps=(1.0, 2.0), id_codec={"name": "rank"})
    doc = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert doc["schema_version"] == 2 and json.loads((tmp_path / "c" / "cache.json").read_text())["schema_version"] == 2
    marker = json.loads((tmp_path / "c" / "shards" / "shard-000000" / "_COMPLETE.json").read_text())
    assert marker["schema_version"] == 2 and marker["chunk_checksums"] == "crc32c"
    assert set(marker["tables"]) == {"topk_ids.dict"} and "topk_ids.ranks" in marker["parts"]
    cache = LogitCache.open(path)
    flat = [r for recs in shards for r in recs]
    for r in flat:
        assert_records_equal(r, cache.get(r.sample_id))
    for a, b in zip(flat, cache.iter_sequences(), strict=True):
        assert_records_equal(a, b)
    assert verify_cache(path) == []


@pytest.mark.parametrize("name", ["v1-zarr-fp32", "v1-arrow-fp16"])
def test_v1_fixture_reads_and_verifies(name: str) -> None:
    """Caches written by the v1 code (commit 42c7159) read as before: same records, verify clean."""
    path = FIXTURES / name
    assert json.loads((path / "manifest.json").read_text())["schema_version"] == 1
    rng = np.random.default_rng(1234)  # how the fixtures were made (tests/storage/fixtures/README.md)
    expected = [random_record(rng, 10 + i, k=4, vocab=50, temps=(1.0, 2.0)) for i in range(3)]
    cache = LogitCache.open(path)
    assert cache.schema_version == 1 and cache.num_sequences == 3
    for a, b in zip(expected, cache.iter_sequences(), strict=True):
        assert_records_equal(a, b, exact_logprobs=name.endswith("fp32"))
    assert verify_cache(path) == []


def test_v1_cache_resumes_as_v1(tmp_path: Path) -> None:
    import shutil

    path = tmp_path / "c"
    shutil.copytree(FIXTURES / "v1-zarr-fp32", path)
    os.remove(path / "manifest.json")
    shutil.rmtree(path / "shards" / "shard-000001")
    writer = CacheWriter.resume(str(path))
    assert writer.schema_version == 1 and writer.complete_shards() == [0]
    writer.write_shard(1, [])
    writer.finalize()
    assert json.loads((path / "manifest.json").read_text())["schema_version"] == 1
    marker = json.loads((path / "shards" / "shard-000001" / "_COMPLETE.json").read_text())
    assert marker["schema_version"] == 1 and "tables" not in marker and "chunk_checksums" not in marker
    assert verify_cache(str(path)) == []


def test_v2_cache_refused_by_v1_only_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "c")
    write_cache(path, _shards(2, [2]), k=8, vocab=300, temps=(1.0, 2.0), id_codec={"name": "rank"})
    monkeypatch.setattr(manifest_mod, "SCHEMA_VERSION", 1)  # what v1-only code has
    with pytest.raises(SchemaVersionError, match="schema_version 2 is newer.*reads schema version 2"):
        LogitCache.open(path)


# --- damaged chunks -----------------------------------------------------------------------------------------


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def test_verify_names_a_damaged_coded_chunk_and_reads_refuse_it(tmp_path: Path) -> None:
    shards = _shards(3, [12])
    path = tmp_path / "c"
    header = CacheHeader(top_k=8, vocab_size=300, id_codec={"name": "rank"}, extra_temperatures=[1.0, 2.0],
                         positions={"name": "zarr", "chunk_rows": 16, "shard_rows": 64}, num_shards=1)
    writer = CacheWriter(str(path), header)
    writer.write_shard(0, shards[0])
    writer.finalize()
    n = LogitCache.open(path).num_positions
    assert n > 48  # several chunks, so naming the right one means something
    shard_file = path / "shards" / "shard-000000" / "positions.zarr" / "topk_ids.ranks" / "c" / "0" / "0"
    assert shard_file.exists()
    _flip(shard_file, 5)  # inside the first coded chunk (the Zarr shard index sits at the end of the file)
    problems = verify_cache(str(path), level="checksums")
    assert any("checksum mismatch" in p for p in problems), problems
    assert any("part topk_ids.ranks, chunk 0 (rows 0:16)" in p for p in problems), problems
    assert not any("chunk 1 " in p for p in problems), problems
    full = verify_cache(str(path))
    assert any("part topk_ids.ranks, chunk 0" in p for p in full), full
    cache = LogitCache.open(path)
    with pytest.raises(CorruptCacheError, match="rows 0:"):
        cache.read_rows(0, 0, 16)
    np.testing.assert_array_equal(  # the undamaged chunks still read
        cache.read_rows(0, 16, 32).topk_ids, np.concatenate([r.rows.topk_ids for r in shards[0]])[16:32]
    )


def test_verify_names_a_damaged_dictionary(tmp_path: Path) -> None:
    path = tmp_path / "c"
    write_cache(str(path), _shards(4, [5]), k=8, vocab=300, temps=(1.0, 2.0), id_codec={"name": "rank"})
    target = path / "shards" / "shard-000000" / "positions.zarr" / "topk_ids.dict" / "c" / "0"
    _flip(target, 3)
    problems = verify_cache(str(path), level="checksums")
    assert any("shard-level part topk_ids.dict cannot be decoded" in p for p in problems), problems
    with pytest.raises(CorruptCacheError):
        LogitCache.open(path).read_rows(0, 0, 1)


def test_verify_names_a_damaged_parquet_column_chunk(tmp_path: Path) -> None:
    """Arrow backend: page CRCs (format v2) make a damaged column chunk fail; verify names the part."""
    import pyarrow.parquet as pq

    path = tmp_path / "c"
    write_cache(str(path), _shards(5, [6]), k=8, vocab=300, backend="arrow", temps=(1.0, 2.0),
                id_codec={"name": "rank"})
    f = path / "shards" / "shard-000000" / "positions.parquet"
    col = pq.ParquetFile(f).metadata.row_group(0)
    names = [col.column(i).path_in_schema for i in range(col.num_columns)]
    meta = col.column(names.index("topk_ids.ranks"))
    start = meta.data_page_offset
    _flip(f, start + meta.total_compressed_size - 8)  # inside that column's data page, past its header
    problems = verify_cache(str(path), level="checksums")
    assert any("part topk_ids.ranks, chunk 0" in p for p in problems), problems
    assert not any("part topk_logprobs" in p for p in problems), problems
    with pytest.raises(CorruptCacheError):
        LogitCache.open(path).read_rows(0, 0, 4)
