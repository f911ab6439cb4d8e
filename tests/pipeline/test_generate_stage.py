"""Stage one end to end on a tiny random teacher: content, determinism, resume, dask, job arrays."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from cache_helpers import assert_records_equal
from gen_helpers import generate_args, write_prompts
from proc_helpers import killed_when_parked

from logitcache.pipeline.generate_stage import GenerateConfig, finalize_cache, run_generate
from logitcache.storage import LogitCache, verify_cache


@pytest.fixture(scope="module")
def teacher(ascii_teacher_folder):
    return ascii_teacher_folder


@pytest.fixture(scope="module")
def prompts(prompts_file):
    return prompts_file


def cfg(teacher, prompts, out, **kw):
    base = dict(
        model=str(teacher),
        data=str(prompts),
        out=str(out),
        top_k=8,
        shard_size=4,
        batch_size=3,
        max_new_tokens=10,
        logprob_codec="fp32",
        id_field="id",
    )
    return GenerateConfig(**{**base, **kw})


def assert_caches_equal(a, b, atol=None):
    """Same sequences, tokens and top-k ids; logprobs bit-equal, or within ``atol`` across process layouts."""
    ca, cb = LogitCache.open(a), LogitCache.open(b)
    assert sorted(ca.sample_ids().tolist()) == sorted(cb.sample_ids().tolist())
    for sid in ca.sample_ids().tolist():
        assert_records_equal(ca.get(sid), cb.get(sid), exact_logprobs=atol is None, atol=atol or 0.0)


def test_score_mode_rows_equal_a_direct_forward(teacher, prompts, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    summary = run_generate(cfg(teacher, prompts, tmp_path / "c", mode="score"))
    assert summary["finalized"] and summary["sequences"] == 10
    assert verify_cache(tmp_path / "c") == []
    cache = LogitCache.open(tmp_path / "c")
    model = AutoModelForCausalLM.from_pretrained(teacher).eval()
    tok = AutoTokenizer.from_pretrained(teacher)
    for sid in (0, 7):
        rec = cache.get(sid)
        assert rec.source_id == f"q{sid}" and rec.finish_reason == "score"
        assert rec.prompt_text.startswith("<|im_start|>user\nQuestion") and rec.prompt_text.endswith("assistant\n")
        assert rec.completion_text == f"It is {2 * sid}. The answer is {2 * sid}!"
        assert rec.token_ids[-1] == tok.eos_token_id  # --score-eos: the cache teaches stopping
        with torch.no_grad():
            logits = model(torch.as_tensor(rec.token_ids[None], dtype=torch.long)).logits[0].float()
        lp = torch.log_softmax(logits, -1)[rec.prompt_len - 1 : -1]
        top = lp.topk(8, dim=-1)
        np.testing.assert_allclose(rec.rows.topk_logprobs, top.values.numpy(), atol=1e-5)
        np.testing.assert_array_equal(rec.rows.topk_ids, top.indices.numpy())
        exact = lp.gather(1, torch.as_tensor(rec.token_ids[rec.prompt_len :], dtype=torch.long)[:, None])[:, 0]
        np.testing.assert_allclose(rec.rows.target_logprobs, exact.numpy(), atol=1e-6)
        full = (rec.prompt_text + rec.completion_text).encode()
        pieces = [full[a:b] for a, b in zip(rec.token_byte_offsets, [*rec.token_byte_offsets[1:], len(full)])]
        assert b"".join(pieces) == full
    assert cache.has_tokenizer() and cache.load_tokenizer().eos_token_id == tok.eos_token_id
    meta = cache.header.metadata
    assert meta["teacher"]["vocab_size"] == cache.vocab_size and meta["capture"]["mode"] == "score"
    assert meta["input"]["samples"] == 10 and len(meta["input"]["fingerprint"]) == 16


def test_generate_mode_is_reproducible_and_well_formed(teacher, prompts, tmp_path):
    run_generate(cfg(teacher, prompts, tmp_path / "a", seed=3))
    run_generate(cfg(teacher, prompts, tmp_path / "b", seed=3))
    assert_caches_equal(tmp_path / "a", tmp_path / "b")
    cache = LogitCache.open(tmp_path / "a")
    reasons = set()
    for rec in cache.iter_sequences():
        reasons.add(rec.finish_reason)
        assert rec.rows.n == len(rec.token_ids) - rec.prompt_len <= 10
        np.testing.assert_array_equal(rec.rows.target_ids, rec.token_ids[rec.prompt_len :])
    assert reasons <= {"stop", "length"} and cache.num_positions > 0
    run_generate(cfg(teacher, prompts, tmp_path / "c", seed=4))
    other = LogitCache.open(tmp_path / "c")
    assert any(other.get(s).completion_text != cache.get(s).completion_text for s in range(10))


def test_job_array_plus_finalize_equals_one_run(teacher, prompts, tmp_path):
    run_generate(cfg(teacher, prompts, tmp_path / "one"))
    for i in range(3):
        summary = run_generate(cfg(teacher, prompts, tmp_path / "arr", num_shards=3, shard_index=i))
        assert summary["shards_mine"] == 1
    finalize_cache(str(tmp_path / "arr"))  # idempotent: the last task already finalized
    assert_caches_equal(tmp_path / "one", tmp_path / "arr")


def test_two_dask_workers_equal_one(teacher, prompts, tmp_path):
    run_generate(cfg(teacher, prompts, tmp_path / "one"))
    summary = run_generate(cfg(teacher, prompts, tmp_path / "two", workers=2))
    assert summary["finalized"] and summary["sequences"] == 10
    # dask workers run torch single-threaded: matmul reduction order differs, so logprobs agree to ~1e-6
    assert_caches_equal(tmp_path / "one", tmp_path / "two", atol=1e-5)


#: ``logitcache ARGS`` that parks (blocks on stdin) right after shard 2's sequence table is on disk in its
#: temporary folder, before the shard is committed: the test kills it there, with no timing involved
PARKED_GENERATE = """
import sys
from logitcache.storage import writer as wmod

original = wmod.pq.write_table


def write_table(table, where, *args, **kwargs):
    original(table, where, *args, **kwargs)
    if ".tmp-shard-000002" in str(where):
        print("parked", where, flush=True)
        sys.stdin.readline()


wmod.pq.write_table = write_table
from logitcache.cli import main

main(sys.argv[1:], prog_name="logitcache")
"""


def test_sigkill_then_rerun_has_no_duplicates_or_gaps(teacher, tmp_path):
    data = write_prompts(tmp_path / "p.jsonl", 24)
    args = generate_args(teacher, data, "--top-k", 8, "--shard-size", 2, "--max-new-tokens", 6,
                         "--logprob-codec", "fp32")
    cli = [sys.executable, "-m", "logitcache.cli", *args]
    out = tmp_path / "killed"
    parked = [sys.executable, "-c", PARKED_GENERATE, *args, "--out", str(out)]
    with killed_when_parked(parked, "shard 2 was written", stderr=subprocess.DEVNULL) as lines:
        # precondition: killed mid-run, with shards 0 and 1 committed and shard 2 half-written
        parked_in = lines[-1].removeprefix("parked ")
        assert os.path.exists(parked_in)
        shard_dirs = sorted(os.listdir(out / "shards"))
        assert [d for d in shard_dirs if d.startswith("shard-")] == ["shard-000000", "shard-000001"], shard_dirs
        assert not (out / "manifest.json").exists()
    assert not (out / "manifest.json").exists()
    rerun = subprocess.run([*cli, "--out", str(out)], check=True, capture_output=True, text=True)
    assert "shards 2 already done" in rerun.stdout, rerun.stdout  # the committed shards are kept, not redone
    subprocess.run([*cli, "--out", str(tmp_path / "clean")], check=True, capture_output=True)
    assert sorted(LogitCache.open(out).sample_ids().tolist()) == list(range(24))
    assert_caches_equal(out, tmp_path / "clean")


def test_id_codec_rank_writes_the_same_rows_as_int32(teacher, prompts, tmp_path):
    """`generate --id-codec rank` (format v2) stores the same rows as the default int32 ids; a cache made
    before the flag existed (no `id_codec` in its config) still resumes under the default."""
    import json

    run_generate(cfg(teacher, prompts, tmp_path / "a", mode="score"))
    run_generate(cfg(teacher, prompts, tmp_path / "b", mode="score", id_codec="rank"))
    assert LogitCache.open(tmp_path / "b").header.id_codec == {"name": "rank"}
    assert verify_cache(tmp_path / "b") == []
    assert_caches_equal(tmp_path / "a", tmp_path / "b")
    doc = json.loads((tmp_path / "a" / "cache.json").read_text())
    doc["header"]["metadata"]["config"].pop("id_codec")  # what a pre-v2 cache.json holds
    (tmp_path / "a" / "cache.json").write_text(json.dumps(doc))
    (tmp_path / "a" / "manifest.json").unlink()
    summary = run_generate(cfg(teacher, prompts, tmp_path / "a", mode="score"))
    assert summary["finalized"]
