"""Stage three's bad input: each case is one line naming the flag and the fix, exit status 2."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from cli_helpers import one_line_error
from click.testing import CliRunner
from train_helpers import build_setup

from logitcache.cli import main
from logitcache.testing.tiny_models import tiny_llama, unigram_tokenizer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return build_setup(tmp_path_factory.mktemp("train-errors"), n=12)


def train(setup, out, *extra, cache=None, student=None, max_steps=1):
    args = [
        "train",
        "--cache",
        str(cache or setup["cache"]),
        "--student",
        str(student or setup["student"]),
        "--out",
        str(out),
        "--max-steps",
        str(max_steps),
        "--batch-size",
        "2",
        "--eval-fraction",
        "0",
        *map(str, extra),
    ]
    return CliRunner().invoke(main, args)


def test_no_alignment_store_for_this_student(setup, tmp_path):
    other = unigram_tokenizer(vocab_size=150)
    other.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tiny_llama(other, seed=2).save_pretrained(tmp_path / "other")
    other.save_pretrained(tmp_path / "other")
    r = train(setup, tmp_path / "run", student=tmp_path / "other")
    one_line_error(r, "no alignment store for the student's tokenizer", "logitcache align")


def test_alignment_made_for_another_tokenizer(setup, tmp_path):
    from logitcache.storage.shards import bytes_checksum, json_checksum

    cache = tmp_path / "cache"
    shutil.copytree(setup["cache"], cache)
    store_json = next((cache / "alignments").glob("*/store.json"))
    doc = json.loads(store_json.read_text())
    doc["header"]["student"]["tokenizer_fingerprint"] = "f" * 64
    store_json.write_text(json.dumps(doc))
    manifest = store_json.with_name("manifest.json")
    m = json.loads(manifest.read_text())
    m["header"]["student"]["tokenizer_fingerprint"] = "f" * 64
    m["checksums"].update(header=json_checksum(m["header"]), **{"store.json": bytes_checksum(store_json.read_bytes())})
    manifest.write_text(json.dumps(m))  # resealed: a sound store made for another tokenizer
    one_line_error(train(setup, tmp_path / "run", cache=cache), "another tokenizer", "--overwrite")


def test_kl_across_vocabularies(setup, tmp_path):
    one_line_error(train(setup, tmp_path / "run", "--loss", "ce:1,kl:0.5"), "--loss kl", "uld, mlot or alm")


def test_bad_loss_spec(setup, tmp_path):
    one_line_error(train(setup, tmp_path / "run", "--loss", "ce:1,mlt:1"), "--loss", "unknown loss 'mlt'")


def test_resume_from_an_incompatible_config(setup, tmp_path):
    assert train(setup, tmp_path / "run").exit_code == 0
    r = train(setup, tmp_path / "run", "--lr", "0.1", "--resume")
    one_line_error(r, "--resume", "--lr")
    one_line_error(train(setup, tmp_path / "run"), "holds another run", "--resume")


def steps_logged(out):
    return [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()]


def test_resume_checks_the_data_by_content_not_by_path(setup, tmp_path):
    """A moved copy of the cache resumes; another cache at the run's own path is refused."""
    from gen_helpers import write_prompts

    from logitcache.pipeline.align_stage import AlignConfig, run_align
    from logitcache.pipeline.generate_stage import GenerateConfig, run_generate

    cache, out = tmp_path / "cache", tmp_path / "run"
    shutil.copytree(setup["cache"], cache)
    assert train(setup, out, cache=cache).exit_code == 0
    moved = tmp_path / "moved-cache"
    os.rename(cache, moved)
    r = train(setup, out, "--resume", cache=moved, max_steps=2)
    assert r.exit_code == 0, r.output
    assert steps_logged(out) == [1, 2]
    # regenerate: other prompts, the same teacher, K and shard size, aligned to the same student, at the old path
    data = write_prompts(tmp_path / "other.jsonl", 8)
    run_generate(
        GenerateConfig(model=str(setup["teacher"]), data=str(data), out=str(cache), mode="score", top_k=8, shard_size=4)
    )
    run_align(AlignConfig(cache=str(cache), student_tokenizer=str(setup["student"]), workers=1))
    r = train(setup, out, "--resume", cache=cache, max_steps=3)
    one_line_error(
        r, "--resume", "other data", "shards shard-000002 differ", "the alignment store differs", "--overwrite"
    )
    assert steps_logged(out) == [1, 2]  # refused before any step


def test_resume_of_a_run_without_a_data_identity_compares_the_path(setup, tmp_path):
    out = tmp_path / "run"
    assert train(setup, out).exit_code == 0
    (out / "inputs.json").unlink()  # as a run written before data identities
    moved = tmp_path / "moved-cache"
    shutil.copytree(setup["cache"], moved)
    one_line_error(train(setup, out, "--resume", cache=moved, max_steps=2), "--resume", "--cache")
    assert train(setup, out, "--resume", max_steps=2).exit_code == 0
    assert json.loads((out / "inputs.json").read_text())["cache"]["shards"]


def test_cache_that_fails_verify(setup, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(setup["cache"], cache)
    victim = max((cache / "shards" / "shard-000000").rglob("*"), key=lambda p: p.stat().st_size if p.is_file() else 0)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    one_line_error(train(setup, tmp_path / "run", cache=cache), "fails verify", "checksum mismatch")
