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


def test_out_url_is_refused(setup, tmp_path, monkeypatch):
    """An object-store --out would have been written to a local folder named `s3:`; it is refused instead."""
    monkeypatch.chdir(tmp_path)
    r = train(setup, "s3://bucket/x")
    one_line_error(r, "--out s3://bucket/x", "not a URL", "then upload it")
    assert list(tmp_path.iterdir()) == []  # no ./s3:/bucket/x, nothing at all
    from logitcache.config import ConfigError
    from logitcache.distill.train_config import TrainConfig

    for url in ("gs://b/run", "file:///tmp/run", "memory://run"):
        with pytest.raises(ConfigError, match="--out"):
            TrainConfig(cache="c", student="s", out=url)
    TrainConfig(cache="c", student="s", out="runs/s3-like:name")  # a colon in a folder name is no URL


def test_another_students_unfinished_store_does_not_block_training(setup, tmp_path):
    """The pre-check verifies the cache and this student's store, not an `align` still running for another."""
    from logitcache.storage import verify_cache

    cache = tmp_path / "cache"
    shutil.copytree(setup["cache"], cache)
    (store,) = (cache / "alignments").iterdir()
    other = cache / "alignments" / "0123456789abcdef"
    shutil.copytree(store, other)
    (other / "manifest.json").unlink()  # as an align killed (or still running) for another student leaves it
    assert verify_cache(cache, level="checksums")  # precondition: the whole-cache verify names it
    r = train(setup, tmp_path / "run", cache=cache)
    assert r.exit_code == 0, r.output
    # ... while a fault in this student's own store still stops it
    victim = next((store / "shards" / "shard-000000").glob("*.parquet"))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    one_line_error(train(setup, tmp_path / "run2", cache=cache), "fails verify", store.name, "checksum mismatch")


def test_kl_with_teacher_ids_beyond_the_students_vocabulary(tmp_path):
    """A same-tokenizer student with fewer logits than the teacher (a padded teacher vocabulary): `kl` would index
    its logits with teacher ids past their end; one line instead of a traceback from inside the loss."""
    from gen_helpers import ascii_teacher, write_prompts
    from transformers import AutoTokenizer

    from logitcache.pipeline.align_stage import AlignConfig, run_align
    from logitcache.pipeline.generate_stage import GenerateConfig, run_generate
    from logitcache.storage import LogitCache

    student = ascii_teacher(tmp_path / "student")
    tok = AutoTokenizer.from_pretrained(student)
    teacher = tmp_path / "teacher"
    tiny_llama(tok, extra_vocab=300, seed=3).save_pretrained(teacher)  # same tokenizer, 300 padded logits more
    tok.save_pretrained(teacher)
    cache = tmp_path / "cache"
    data = write_prompts(tmp_path / "p.jsonl", 4)
    run_generate(GenerateConfig(model=str(teacher), data=str(data), out=str(cache), mode="score", top_k=8))
    run_align(AlignConfig(cache=str(cache), student_tokenizer=str(student), workers=1))
    c = LogitCache.open(cache)
    ids = [r.rows.topk_ids for r in c.iter_sequences()]
    assert max(int(i.max()) for i in ids) >= len(tok)  # precondition: the teacher ranks padded ids in its top-k
    r = CliRunner().invoke(
        main,
        ["train", "--cache", str(cache), "--student", str(student), "--out", str(tmp_path / "run"), "--max-steps",
         "1", "--batch-size", "4", "--eval-fraction", "0", "--loss", "ce:1,kl:0.5"],
    )  # fmt: skip
    one_line_error(r, "topk_ids value", f"outside the student's vocabulary [0, {len(tok)})", "--loss kl")


def test_invalid_yaml_config(setup, tmp_path):
    bad = tmp_path / "train.yaml"
    bad.write_text(f"cache: {setup['cache']}\nmax_steps: [3\n")
    r = CliRunner().invoke(main, ["train", "--config", str(bad)])
    one_line_error(r, f"--config {bad}", "line 3, column 1")
    assert len(r.output.strip().splitlines()) == 1, r.output
