"""Stage two end to end: the alignment store inside a tiny cache, resume, parallel parity, bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from cli_helpers import one_line_error
from click.testing import CliRunner
from gen_helpers import ascii_teacher, write_prompts

from logitcache.cli import main
from logitcache.pipeline.align_stage import (
    AlignConfig,
    align_sequence,
    load_student_tokenizer,
    run_align,
    student_store_key,
)
from logitcache.pipeline.generate_stage import GenerateConfig, run_generate
from logitcache.storage import ConfigMismatchError, LogitCache
from logitcache.storage.alignment_store import AlignmentStore
from logitcache.testing.tiny_models import unigram_tokenizer

STUDENT_TEMPLATE = "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}### assistant:"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("align")
    teacher = ascii_teacher(root / "teacher")
    data = write_prompts(root / "p.jsonl", 9)
    run_generate(
        GenerateConfig(model=str(teacher), data=str(data), out=str(root / "cache"), mode="score", top_k=4, shard_size=4)
    )
    tok = unigram_tokenizer()
    tok.chat_template = STUDENT_TEMPLATE
    tok.save_pretrained(root / "student")
    return root


def fresh_cache(built, tmp_path):
    shutil.copytree(built / "cache", tmp_path / "cache")
    return tmp_path / "cache"


def test_store_matches_the_per_sample_api(built, tmp_path):
    cache_path = fresh_cache(built, tmp_path)
    manifest = run_align(AlignConfig(cache=str(cache_path), student_tokenizer=str(built / "student"), workers=1))
    cache = LogitCache.open(cache_path)
    student = load_student_tokenizer(str(built / "student"))
    store = AlignmentStore.open(cache, student_store_key(student))
    assert manifest["stats"]["sequences"] == 9 and store.key == manifest["key"]
    for rec in cache.iter_sequences():
        got = store.get(rec.sample_id)
        want, _ = align_sequence(rec, student, STUDENT_TEMPLATE)
        assert got.student_prompt_text == want.student_prompt_text
        assert got.student_prompt_text.startswith("### user: Question")  # the student's own template
        np.testing.assert_array_equal(got.student_token_ids, want.student_token_ids)
        np.testing.assert_array_equal(got.pairs, want.pairs)
        np.testing.assert_array_equal(got.chunks, want.chunks)
        completion = rec.completion_text.encode()
        table = student.convert_ids_to_tokens(got.student_completion_ids.tolist())
        assert len(table) == len(got.student_offsets)
        # chunk sides cover identical bytes, and the end of the completion is a shared boundary
        t_offs = rec.token_byte_offsets[rec.prompt_len :] - len(rec.prompt_text.encode())
        t_starts = np.append(t_offs, len(completion))
        s_starts = np.append(got.student_offsets, len(completion))
        for t0, t1, s0, s1 in got.chunks:
            assert t_starts[t0] == s_starts[s0] and t_starts[t1] == s_starts[s1]
        assert got.chunks[-1][1] == got.teacher_end and got.teacher_end == rec.rows.n - 1  # score: EOS row
    vm = store.vocab_map()
    assert vm.shape == (cache.vocab_size,) and (vm >= -1).all()
    info = CliRunner().invoke(main, ["inspect", str(cache_path), "--json"])
    stores = json.loads(info.output)["alignments"]
    assert stores[0]["sequences"] == 9 and 0 < stores[0]["aligned_teacher_fraction"] <= 1


def test_interrupted_run_resumes_and_parallel_equals_serial(built, tmp_path):
    serial = fresh_cache(built, tmp_path / "a")
    run_align(AlignConfig(cache=str(serial), student_tokenizer=str(built / "student"), workers=1))
    par = fresh_cache(built, tmp_path / "b")
    m = run_align(AlignConfig(cache=str(par), student_tokenizer=str(built / "student"), workers=2))
    store_dir = par / "alignments" / m["key"]
    (store_dir / "manifest.json").unlink()  # as if killed before finalizing, with shard 1 lost
    shutil.rmtree(store_dir / "shards" / "shard-000001")
    (store_dir / "shards" / ".tmp-shard-000001-dead").mkdir()
    run_align(AlignConfig(cache=str(par), student_tokenizer=str(built / "student"), workers=1))
    a = AlignmentStore.open(LogitCache.open(serial), m["key"])
    b = AlignmentStore.open(LogitCache.open(par), m["key"])
    for sid in range(9):
        np.testing.assert_array_equal(a.get(sid).pairs, b.get(sid).pairs)
        np.testing.assert_array_equal(a.get(sid).student_token_ids, b.get(sid).student_token_ids)
    assert not (store_dir / "shards" / ".tmp-shard-000001-dead").exists()


def test_cache_not_finalized(built, tmp_path):
    cache_path = fresh_cache(built, tmp_path)
    (cache_path / "manifest.json").unlink()
    r = CliRunner().invoke(main, ["align", str(cache_path), "--student-tokenizer", str(built / "student")])
    one_line_error(r, "not finalized")


def test_student_tokenizer_that_cannot_load(built, tmp_path):
    cache_path = fresh_cache(built, tmp_path)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text("{not json")
    r = CliRunner().invoke(main, ["align", str(cache_path), "--student-tokenizer", str(tmp_path / "broken")])
    one_line_error(r, "--student-tokenizer", "broken")
    r = CliRunner().invoke(main, ["align", str(cache_path), "--student-tokenizer", str(tmp_path / "nothing")])
    one_line_error(r, "--student-tokenizer")


def test_student_whose_decoding_does_not_reproduce_the_text(built, tmp_path):
    from tokenizers import normalizers

    cache_path = fresh_cache(built, tmp_path)
    tok = unigram_tokenizer()
    tok.backend_tokenizer.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Replace(" ", "▁")])
    tok.save_pretrained(tmp_path / "lower")
    r = CliRunner().invoke(main, ["align", str(cache_path), "--student-tokenizer", str(tmp_path / "lower")])
    one_line_error(r, "sample ", "does not reproduce the text")  # parallel shards: any sample may fail first


def test_store_of_another_tokenizer_under_the_same_name(built, tmp_path):
    cache_path = fresh_cache(built, tmp_path)
    m = run_align(AlignConfig(cache=str(cache_path), student_tokenizer=str(built / "student"), workers=1))
    store_json = cache_path / "alignments" / m["key"] / "store.json"
    doc = json.loads(store_json.read_text())
    doc["header"]["student"]["tokenizer_fingerprint"] = "0" * 64
    store_json.write_text(json.dumps(doc))
    with pytest.raises(ConfigMismatchError, match="different student.*--overwrite"):
        run_align(AlignConfig(cache=str(cache_path), student_tokenizer=str(built / "student"), workers=1))
    run_align(AlignConfig(cache=str(cache_path), student_tokenizer=str(built / "student"), workers=1, overwrite=True))


def test_store_refuses_a_rewritten_cache(built, tmp_path):
    cache_path = fresh_cache(built, tmp_path)
    m = run_align(AlignConfig(cache=str(cache_path), student_tokenizer=str(built / "student"), workers=1))
    doc = json.loads((cache_path / "manifest.json").read_text())
    doc["shards"][0]["checksum"] = "sha256:" + "1" * 64
    (cache_path / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ConfigMismatchError, match="different cache content"):
        AlignmentStore.open(LogitCache.open(cache_path), m["key"])


def test_store_records_the_student_turn_end_not_its_eos(built, tmp_path):
    from logitcache.testing.tiny_tokenizers import byte_level_bpe

    cache_path = fresh_cache(built, tmp_path)
    tok = byte_level_bpe()
    tok.save_pretrained(tmp_path / "chat_student")
    m = run_align(AlignConfig(cache=str(cache_path), student_tokenizer=str(tmp_path / "chat_student"), workers=1))
    store = AlignmentStore.open(LogitCache.open(cache_path), m["key"])
    end = store.header["student_end_token"]
    assert end["text"] == "<|im_end|>" and end["id"] == tok.convert_tokens_to_ids("<|im_end|>")
    assert end["id"] != tok.eos_token_id  # the id train appends is the turn end, not the EOS
