"""Export a cache to each foreign format and import it back: the same sequences, texts, offsets, split and rows.

The fixture cache is ``train_setup``'s (a tiny teacher's score-mode cache, 24 sequences, K = 8, fp16 codec).
Formats follow their published readers: DistillKit's columns and compression config (arcee-ai/DistillKit
``distillkit/sample_logits_vllm.py``, ``distillkit/sample_common.py: compressed_logit_schema``,
``distillkit/compression/compressor.py``), axolotl's KD fields (axolotl-ai-cloud/axolotl
``src/axolotl/integrations/kd/chat_template.py``: ``logprobs``, ``target_token_ids``, ``messages``), OpenAI chat
completion ``logprobs.content[].top_logprobs`` with ``token``/``bytes`` (vLLM's OpenAI server, and its
``token_id:N`` form that axolotl's legacy KD loader parses).
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from logitcache.interop.export_stage import run_export
from logitcache.interop.import_stage import run_import
from logitcache.interop.interop_config import ExportConfig, ImportConfig
from logitcache.storage import LogitCache, verify_cache


@pytest.fixture(scope="module")
def setup(train_setup):
    return train_setup


def _same(a: LogitCache, b: LogitCache, exact_rows: bool = True) -> None:
    ra, rb = list(a.iter_sequences()), list(b.iter_sequences())
    assert len(ra) == len(rb) == 24
    for x, y in zip(ra, rb):
        assert y.prompt_text == x.prompt_text and y.completion_text == x.completion_text
        np.testing.assert_array_equal(y.token_ids, x.token_ids)
        np.testing.assert_array_equal(y.token_byte_offsets, x.token_byte_offsets)
        assert y.prompt_len == x.prompt_len
        np.testing.assert_array_equal(y.rows.target_ids, x.rows.target_ids)
        # the cache's fp16 rows may hold ties in any order: compare each row as a set of (id, logprob)
        for i in range(x.rows.n):
            got = sorted(zip(y.rows.topk_ids[i].tolist(), y.rows.topk_logprobs[i].tolist()))
            want = sorted(zip(x.rows.topk_ids[i].tolist(), x.rows.topk_logprobs[i].tolist()))
            assert got == want if exact_rows else [g[0] for g in got] == [w[0] for w in want]


def _import(src, fmt, setup, out, **kw):
    return run_import(ImportConfig(src=str(src), format=fmt, teacher_tokenizer=str(setup["teacher"]), out=str(out),
                                   logprob_codec="fp32", shard_size=5, **kw))


@pytest.mark.parametrize("fmt", ["topk-parquet", "distillkit", "openai-logprobs"])
def test_export_then_import_gives_the_same_cache(setup, tmp_path, fmt):
    kw = {"distillkit_labels": True} if fmt == "distillkit" else {}
    run_export(ExportConfig(cache=str(setup["cache"]), format=fmt, out=str(tmp_path / "x"), **kw))
    src = tmp_path / "x" / "part-000000.jsonl" if fmt == "openai-logprobs" else tmp_path / "x"
    if fmt == "openai-logprobs":  # one file per shard: concatenate the parts into one source
        parts = sorted((tmp_path / "x").glob("part-*.jsonl"))
        src = tmp_path / "all.jsonl"
        src.write_bytes(b"".join(p.read_bytes() for p in parts))
    s = _import(src, fmt, setup, tmp_path / "c")
    cache = LogitCache.open(tmp_path / "c")
    assert verify_cache(str(tmp_path / "c")) == []
    _same(LogitCache.open(setup["cache"]), cache)
    prov = cache.header.metadata["import"]
    assert prov["format"] == fmt and prov["lossy"] is False and "lse@1" in prov["missing_statistics"]
    assert cache.header.extra_temperatures == []
    assert s["positions"] == LogitCache.open(setup["cache"]).num_positions


def test_distillkit_export_has_distillkits_schema_and_rows_for_every_position(setup, tmp_path):
    run_export(ExportConfig(cache=str(setup["cache"]), format="distillkit", out=str(tmp_path / "x")))
    t = pq.read_table(tmp_path / "x" / "data_0.parquet")
    assert t.column_names == ["input_ids", "compressed_logprobs", "bytepacked_indices"]
    assert str(t.schema.field("input_ids").type) == "list<element: uint64>"
    ids = t.column("input_ids").to_pylist()
    rows = t.column("compressed_logprobs").to_pylist()
    assert [len(r) for r in rows] == [len(i) - 1 for i in ids]  # vLLM prompt logprobs: positions 1..n-1
    assert (tmp_path / "x" / "compression_config.yaml").exists()


def test_distillkit_without_labels_splits_at_a_text_marker(setup, tmp_path):
    run_export(ExportConfig(cache=str(setup["cache"]), format="distillkit", out=str(tmp_path / "x")))
    _import(tmp_path / "x", "distillkit", setup, tmp_path / "c", completion_start="text:<|im_start|>assistant\n")
    _same(LogitCache.open(setup["cache"]), LogitCache.open(tmp_path / "c"))


def test_openai_token_id_form_round_trips(setup, tmp_path):
    run_export(ExportConfig(cache=str(setup["cache"]), format="openai-logprobs", out=str(tmp_path / "x"),
                            token_format="token_id"))
    first = json.loads((tmp_path / "x" / "part-000000.jsonl").read_text().splitlines()[0])
    entry = first["choices"][0]["logprobs"]["content"][0]
    assert entry["token"].startswith("token_id:") and len(entry["top_logprobs"]) == 8
    parts = sorted((tmp_path / "x").glob("part-*.jsonl"))
    src = tmp_path / "all.jsonl"
    src.write_bytes(b"".join(p.read_bytes() for p in parts))
    _import(src, "openai-logprobs", setup, tmp_path / "c")
    _same(LogitCache.open(setup["cache"]), LogitCache.open(tmp_path / "c"))
