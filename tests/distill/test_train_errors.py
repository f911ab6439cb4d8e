"""Stage three's bad input: each case is one line naming the flag and the fix, exit status 2."""

from __future__ import annotations

import json
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


def train(setup, out, *extra, cache=None, student=None):
    args = [
        "train",
        "--cache",
        str(cache or setup["cache"]),
        "--student",
        str(student or setup["student"]),
        "--out",
        str(out),
        "--max-steps",
        "1",
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


def test_cache_that_fails_verify(setup, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(setup["cache"], cache)
    victim = max((cache / "shards" / "shard-000000").rglob("*"), key=lambda p: p.stat().st_size if p.is_file() else 0)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    one_line_error(train(setup, tmp_path / "run", cache=cache), "fails verify", "checksum mismatch")
