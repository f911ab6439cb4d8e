"""DistillKit's lossy codec, a mismatched tokenizer, truncated sources, streaming and resume of ``import``.

The lossy fixtures are compressed with ``compress_logprobs``, a transcription of DistillKit's
``compress_monotonic_logprobs`` (arcee-ai/DistillKit ``distillkit/compression/monotonic_logprobs.py``, polynomial
fit + residual bins + delta encoding) with a config shaped like its published ``compression_config.yaml``
(``DistributionQuantizationConfig`` in ``distillkit/compression/config.py``); bit packing follows
``distillkit/compression/bitpack.py`` (MSB first).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from logitcache.config import ConfigError
from logitcache.interop.distillkit_codec import (
    DistillKitConfig,
    _pack_windows64,
    _unpack_windows64,
    compress_logprobs,
    decompress_logprobs,
    pack_bits,
    unpack_bits,
)
from logitcache.interop.export_stage import run_export
from logitcache.interop.import_stage import run_import
from logitcache.interop.interop_config import ExportConfig, ImportConfig
from logitcache.interop.sources import _lists, _prompt_lens
from logitcache.storage import LogitCache, verify_cache
from logitcache.testing.tiny_models import unigram_tokenizer

LOSSY = {
    "d": 201, "k": 8, "exact_k": 2, "exact_dtype": "float32", "polynomial_terms": [0, 1, 2, "sqrt"],
    "term_dtype": "float32", "residual_bins": [{"scale_dtype": "float16", "element_bits": 4, "num_elements": 6}],
    "delta_encoding": True, "error_diffusion": False, "normalize_t": False,
}


@pytest.fixture(scope="module")
def setup(train_setup):
    return train_setup


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 64), st.integers(0, 2**31 - 1))
def test_bit_unpacking_inverts_packing(bits, count, seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 2**bits, size=(5, count), dtype=np.uint64).astype(np.int64)
    packed = pack_bits(x, bits)
    assert packed.shape == (5, (count * bits + 7) // 8)
    np.testing.assert_array_equal(unpack_bits(packed, bits, count), x)



@settings(max_examples=60, deadline=None)
@given(st.integers(9, 25), st.integers(1, 70), st.integers(0, 8), st.integers(0, 2**31 - 1))
def test_32bit_unpacking_matches_the_64bit_windows_and_a_bitwise_reference(bits, count, extra, seed):
    """The 32-bit word path (9..25 bits) against the previous 64-bit one and a per-bit reference, on random bytes
    (not only packed ones: trailing bits and spare bytes set)."""
    rng = np.random.default_rng(seed)
    buf = rng.integers(0, 256, size=(7, (count * bits + 7) // 8 + extra), dtype=np.uint8)
    got = unpack_bits(buf, bits, count)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, _unpack_windows64(buf, bits, count))
    flat = np.unpackbits(buf, axis=1)[:, : count * bits].reshape(7, count, bits).astype(np.int64)
    np.testing.assert_array_equal(got, (flat << np.arange(bits - 1, -1, -1)).sum(axis=2))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 25), st.integers(1, 70), st.integers(0, 2**31 - 1))
def test_32bit_packing_matches_the_64bit_windows(bits, count, seed):
    """The 32-bit word packer (up to 25 bits) writes the bytes the previous 64-bit one wrote, out-of-range bits
    masked off the same way."""
    x = np.random.default_rng(seed).integers(0, 2**31, size=(6, count), dtype=np.int64)
    np.testing.assert_array_equal(pack_bits(x, bits), _pack_windows64(x, bits))


def _prompt_lens_per_row(table, field, offs):
    """The previous per-sequence implementation of `sources._prompt_lens`, kept as the reference."""
    if field not in table.column_names:
        return [None] * (len(offs) - 1)
    m_offs, flat = _lists(table.column(field))
    vals = flat.to_numpy(zero_copy_only=False)
    out = []
    for i in range(len(m_offs) - 1):
        v = vals[m_offs[i] : m_offs[i + 1]]
        trained = (v != -100) & (v != 0) if v.size and set(np.unique(v).tolist()) <= {0, 1} else v != -100
        hit = np.flatnonzero(trained)
        out.append(int(hit[0]) if hit.size else len(v))
    return out


@settings(max_examples=80, deadline=None)
@given(st.lists(st.lists(st.sampled_from([-100, -100, 0, 1, 5, 17]), max_size=12), min_size=1, max_size=9),
       st.booleans())
def test_vectorized_prompt_lens_match_the_per_row_rule(masks, sliced):
    """Labels (-100), 0/1 masks, mixed and empty rows, and a table sliced from a larger one (offsets not from 0)."""
    table = pa.table({"labels": pa.array([[9], *masks] if sliced else masks, pa.list_(pa.int64()))})
    if sliced:
        table = table.slice(1)
    offs = np.arange(len(masks) + 1)
    assert _prompt_lens(table, "labels", offs) == _prompt_lens_per_row(table, "labels", offs)
    assert _prompt_lens(table, "nope", offs) == [None] * len(masks)

def test_lossy_distillkit_rows_decode_close_to_the_originals():
    rng = np.random.default_rng(0)
    lps = np.sort(np.log(rng.dirichlet(np.ones(50), size=200))[:, :8], axis=1)[:, ::-1].astype(np.float32)
    cfg = DistillKitConfig.from_dict(LOSSY)
    buf = compress_logprobs(lps, cfg)
    assert buf.shape == (200, cfg.logprob_bytes()) and not cfg.lossless
    out = decompress_logprobs(buf, cfg)
    np.testing.assert_array_equal(out[:, :2], lps[:, :2])  # exact_k values are stored exactly
    assert np.abs(out - lps).max() < 0.5  # the polynomial + 4-bit residuals: lossy, but close


def _lossy_capture(setup, folder):
    """The fixture cache exported as DistillKit, then recompressed with the lossy config."""
    run_export(ExportConfig(cache=str(setup["cache"]), format="distillkit", out=str(folder),
                            distillkit_config=None))
    cfg = DistillKitConfig.from_dict(LOSSY)
    for path in folder.glob("data_*.parquet"):
        t = pq.read_table(path)
        exact = DistillKitConfig.from_dict(yaml.safe_load((folder / "compression_config.yaml").read_text()))
        rows = np.stack([np.asarray(r, np.uint8) for seq in t.column("compressed_logprobs").to_pylist()
                         for r in seq])
        lps = np.maximum(decompress_logprobs(rows, exact), -1e4)
        comp = compress_logprobs(lps, cfg)
        offs = t.column("compressed_logprobs").combine_chunks().offsets
        inner = pa.ListArray.from_arrays(pa.array(np.arange(len(comp) + 1, dtype=np.int32) * comp.shape[1]),
                                         pa.array(comp.reshape(-1), pa.uint8()))
        t = t.set_column(1, "compressed_logprobs", pa.ListArray.from_arrays(offs, inner))
        pq.write_table(t, path)
    (folder / "compression_config.yaml").write_text(yaml.safe_dump(LOSSY))


def test_lossy_distillkit_capture_imports_and_says_it_is_lossy(setup, tmp_path):
    _lossy_capture(setup, tmp_path / "dk")
    run_import(ImportConfig(src=str(tmp_path / "dk"), format="distillkit", teacher_tokenizer=str(setup["teacher"]),
                            out=str(tmp_path / "c"), completion_start="text:<|im_start|>assistant\n"))
    assert verify_cache(str(tmp_path / "c")) == []
    cache = LogitCache.open(tmp_path / "c")
    prov = cache.header.metadata["import"]
    assert prov["lossy"] is True and prov["compression_config"]["exact_k"] == 2
    ref = {r.sample_id: r for r in LogitCache.open(setup["cache"]).iter_sequences()}
    got = list(cache.iter_sequences())
    assert sum(r.rows.n for r in got) == sum(r.rows.n for r in ref.values())
    for r in got:
        np.testing.assert_array_equal(r.token_ids, ref[r.sample_id].token_ids)
        assert r.completion_text == ref[r.sample_id].completion_text


def test_a_mismatched_tokenizer_names_the_first_sequence(setup, tmp_path):
    run_export(ExportConfig(cache=str(setup["cache"]), format="topk-parquet", out=str(tmp_path / "x")))
    other = tmp_path / "other"
    unigram_tokenizer().save_pretrained(other)
    with pytest.raises(ConfigError, match=r"^sequence 0 \(data_0.parquet:0\): .*--teacher-tokenizer") as e:
        run_import(ImportConfig(src=str(tmp_path / "x"), format="topk-parquet", teacher_tokenizer=str(other),
                                out=str(tmp_path / "c")))
    assert "\n" not in str(e.value)


def test_a_mismatched_tokenizer_is_refused_for_distillkit_by_its_vocabulary_size(setup, tmp_path):
    run_export(ExportConfig(cache=str(setup["cache"]), format="distillkit", out=str(tmp_path / "x")))
    other = tmp_path / "other"
    unigram_tokenizer().save_pretrained(other)
    with pytest.raises(ConfigError, match=r"compression_config.yaml: d = 201.*--teacher-tokenizer"):
        run_import(ImportConfig(src=str(tmp_path / "x"), format="distillkit", teacher_tokenizer=str(other),
                                out=str(tmp_path / "c")))


def test_truncated_parquet_and_jsonl_are_one_line_errors(setup, tmp_path):
    run_export(ExportConfig(cache=str(setup["cache"]), format="topk-parquet", out=str(tmp_path / "x")))
    path = tmp_path / "x" / "data_0.parquet"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ConfigError, match="data_0.parquet: cannot read as Parquet .*truncated"):
        run_import(ImportConfig(src=str(tmp_path / "x"), format="topk-parquet", teacher_tokenizer=str(setup["teacher"]),
                                out=str(tmp_path / "c")))
    run_export(ExportConfig(cache=str(setup["cache"]), format="openai-logprobs", out=str(tmp_path / "o")))
    src = tmp_path / "o" / "part-000000.jsonl"
    data = src.read_bytes()
    src.write_bytes(data[: len(data) - 40])  # the last line cut
    with pytest.raises(ConfigError, match=r"line 4: not JSON .*truncated"):
        run_import(ImportConfig(src=str(src), format="openai-logprobs", teacher_tokenizer=str(setup["teacher"]),
                                out=str(tmp_path / "c2")))


def test_import_streams_blocks_and_resumes_without_decoding_done_shards(setup, tmp_path, monkeypatch):
    import logitcache.interop.sources as sources

    monkeypatch.setattr(sources, "BLOCK_ROWS", 3)  # several blocks per file: streamed, never whole
    run_export(ExportConfig(cache=str(setup["cache"]), format="topk-parquet", out=str(tmp_path / "x")))
    cfg = ImportConfig(src=str(tmp_path / "x"), format="topk-parquet", teacher_tokenizer=str(setup["teacher"]),
                       out=str(tmp_path / "c"), shard_size=3, logprob_codec="fp32")
    decoded: list[int] = []
    real = sources.ParquetSource._decode

    def spy(self, path, h, rg, lo, cnt, start):
        decoded.append(start)
        if len(decoded) == 5:
            raise KeyboardInterrupt  # killed in the middle of the fifth block
        return real(self, path, h, rg, lo, cnt, start)

    monkeypatch.setattr(sources.ParquetSource, "_decode", spy)
    with pytest.raises(KeyboardInterrupt):
        run_import(cfg)
    assert not (tmp_path / "c" / "manifest.json").exists()
    first_run = list(decoded)
    decoded.clear()
    monkeypatch.setattr(sources.ParquetSource, "_decode", lambda self, *a: (decoded.append(a[-1]), real(self, *a))[1])
    run_import(cfg)
    # blocks [0, 3) and [3, 4) belong to the two shards written before the kill: not decoded again
    assert first_run == [0, 3, 4, 7, 8] and decoded[0] == 4
    out = LogitCache.open(tmp_path / "c")
    assert [r.sample_id for r in out.iter_sequences()] == list(range(24))
    assert verify_cache(str(tmp_path / "c")) == []
