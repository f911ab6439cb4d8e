"""The storage commands of the CLI: inspect, verify, show, and one-line errors with exit status 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
from cache_helpers import random_record, write_cache
from click.testing import CliRunner

from logitcache import __version__
from logitcache.cli import main


@pytest.fixture
def cache(tmp_path):
    rng = np.random.default_rng(0)
    shards = [[random_record(rng, i + 10 * s, n_completion=6) for i in range(3)] for s in range(2)]
    write_cache(
        str(tmp_path / "c"), shards, metadata={"teacher": {"model": "tiny-teacher"}, "capture": {"mode": "score"}}
    )
    return tmp_path / "c"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_version():
    r = run("--version")
    assert r.exit_code == 0 and __version__ in r.output


def test_inspect_table_and_json(cache):
    r = run("inspect", cache)
    assert r.exit_code == 0, r.output
    assert "tiny-teacher" in r.output and "shard-000001" in r.output and "B/position" in r.output
    info = json.loads(run("inspect", cache, "--json").output)
    assert info["sequences"] == 6 and info["positions"] == 36 and info["shards"] == 2
    assert set(info["summary"]["tail_mass_quantiles"]) == {"p50", "p90", "p99"}


def test_verify_ok_and_damaged(cache):
    r = run("verify", cache)
    assert r.exit_code == 0 and "OK" in r.output
    victim = next(p for p in (cache / "shards" / "shard-000000").rglob("*.parquet"))
    victim.write_bytes(victim.read_bytes()[:-10])
    r = run("verify", cache)
    assert r.exit_code == 1
    assert "problem: shard-000000/sequences.parquet" in r.output


def test_show_without_tokenizer_prints_ids(cache):
    r = run("show", cache, "--sample", 11, "--positions", 3)
    assert r.exit_code == 0, r.output
    assert "sample 11" in r.output and "rank" in r.output and "no tokenizer copy" in r.output


def test_user_errors_are_one_line(tmp_path, cache):
    r = run("inspect", tmp_path / "missing")
    assert r.exit_code == 2 and r.output.strip().count("\n") == 0
    assert r.output.startswith("error:") and "no such cache folder" in r.output
    r = run("show", cache, "--sample", 999)
    assert r.exit_code == 2 and "no sample with id 999" in r.output


def test_verify_level_option_is_the_one_the_error_messages_name(cache):
    """train and the loader tell users to run `logitcache verify CACHE --level full|checksums`: it must exist."""
    for level in ("checksums", "full"):
        r = CliRunner().invoke(main, ["verify", str(cache), "--level", level])
        assert r.exit_code == 0, r.output
        assert r.output.strip().endswith("OK")
    r = CliRunner().invoke(main, ["verify", str(cache), "--level", "everything"])
    assert r.exit_code == 2 and "--level" in r.output
