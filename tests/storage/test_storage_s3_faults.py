"""Object-store faults against moto's S3 server on 127.0.0.1: stale listings across processes, missing
credentials, an unreachable endpoint, a bucket that does not exist. No network; every retry is turned off so a
refused connection fails in well under a second."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from cache_helpers import random_record, write_cache
from cli_helpers import one_line_error
from s3_helpers import free_port, moto_s3

from logitcache.storage import CacheError, CacheHeader, CacheNotFoundError, CacheWriter, LogitCache, verify_cache

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

FAST = {"config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"}, "connect_timeout": 2}}


@pytest.fixture(scope="module")
def s3():
    yield from moto_s3("faults")


@pytest.fixture()
def no_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """An environment in which botocore finds no credentials anywhere (and never asks an instance endpoint)."""
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "FSSPEC_S3"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")


_WRITE_SHARDS = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    sys.path.insert(0, sys.argv[3])
    from cache_helpers import random_record
    from logitcache.storage import CacheWriter
    w = CacheWriter.resume(sys.argv[1], storage_options=json.loads(sys.argv[2]))
    for i in (0, 1, 2):
        w.write_shard(i, [random_record(np.random.default_rng(i), i)])
    """
)


def test_shards_written_by_another_process_are_seen(s3, tmp_path):
    """The align rerun fault: a listing cached before other processes wrote shards must not decide completeness."""
    from pathlib import Path

    url = "s3://faults/listing"
    writer = CacheWriter(url, CacheHeader(top_k=8, vocab_size=1000, num_shards=3), storage_options=s3)
    assert writer.complete_shards() == []  # this process now holds a listing of shards/ (s3fs caches it)
    assert writer.loc.fs.ls(writer.loc.path()), "precondition: the listing is cached"
    tests_dir = str(Path(__file__).resolve().parents[1])
    subprocess.run([sys.executable, "-c", _WRITE_SHARDS, url, json.dumps(s3), tests_dir], check=True, timeout=120)
    assert writer.complete_shards() == [0, 1, 2]
    manifest = writer.finalize()
    assert manifest["num_shards"] == 3
    assert verify_cache(url, storage_options=s3) == []


_WRITE_STORE_SHARDS = textwrap.dedent(
    """
    import json, sys
    from logitcache.storage import LogitCache
    from logitcache.storage.alignment_store import AlignmentWriter
    opts = json.loads(sys.argv[2])
    w = AlignmentWriter(LogitCache.open(sys.argv[1], storage_options=opts), "abcd", {"student": {"spec": "s"}})
    for i in (1, 2):
        w.write_shard(i, [], {"sequences": 0})
    """
)


def test_align_finalize_sees_shards_of_worker_processes(s3):
    """The reported fault itself: `cannot finalize, shards [...] are not aligned yet` after workers wrote them."""
    from logitcache.storage.alignment_store import AlignmentWriter

    url = "s3://faults/aligned"
    rng = np.random.default_rng(2)
    write_cache(url, [[random_record(rng, i)] for i in range(3)], storage_options=s3)
    writer = AlignmentWriter(LogitCache.open(url, storage_options=s3), "abcd", {"student": {"spec": "s"}})
    writer.write_shard(0, [], {"sequences": 0})  # done before the kill
    assert writer.complete_shards() == [0]  # the rerun's coordinator lists (and caches) before dispatching work
    subprocess.run([sys.executable, "-c", _WRITE_STORE_SHARDS, url, json.dumps(s3)], check=True, timeout=120)
    assert writer.complete_shards() == [0, 1, 2]
    assert [s["index"] for s in writer.finalize()["shards"]] == [0, 1, 2]


def test_stores_listing_is_fresh(s3):
    """``list_stores`` (what train and verify read) sees a store another process created after a first listing."""
    import s3fs

    from logitcache.storage.alignment_store import list_stores

    url = "s3://faults/stores"
    rng = np.random.default_rng(0)
    write_cache(url, [[random_record(rng, 0)]], storage_options=s3)
    cache = LogitCache.open(url, storage_options=s3)
    other = s3fs.S3FileSystem(skip_instance_cache=True, **s3)  # another process's client: no shared cache
    other.pipe_file("faults/stores/alignments/abcd/store.json", b"{}")
    assert list_stores(cache) == ["abcd"]  # this process now holds a listing of alignments/
    other.pipe_file("faults/stores/alignments/efgh/store.json", b"{}")
    assert list_stores(cache) == ["abcd", "efgh"]


def test_missing_credentials_are_one_line(s3, no_credentials):
    opts = {"client_kwargs": s3["client_kwargs"], "skip_instance_cache": True, **FAST}
    with pytest.raises(CacheError) as err:
        LogitCache.open("s3://faults/listing", storage_options=opts)
    msg = str(err.value)
    assert msg.startswith("s3://faults/listing: no usable credentials") and "AWS_ACCESS_KEY_ID" in msg
    assert "\n" not in msg
    with pytest.raises(CacheError, match="no usable credentials"):  # generate --out opens a writer
        CacheWriter("s3://faults/new", CacheHeader(top_k=8, vocab_size=1000), storage_options=opts)
    assert "no usable credentials" in verify_cache("s3://faults/listing", storage_options=opts)[0]


def test_unreachable_endpoint_is_one_line(s3):
    opts = {
        "key": "test",
        "secret": "test",
        "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{free_port()}", "region_name": "us-east-1"},
        "skip_instance_cache": True,
        **FAST,
    }
    with pytest.raises(CacheError) as err:
        LogitCache.open("s3://faults/x", storage_options=opts)
    assert "cannot connect to the endpoint" in str(err.value) and "AWS_ENDPOINT_URL" in str(err.value)


def test_missing_bucket_is_named(s3):
    with pytest.raises(CacheNotFoundError, match="bucket 'no-such-bucket' does not exist"):
        LogitCache.open("s3://no-such-bucket/cache", storage_options=s3)


def test_refused_credentials_are_classified():
    """What a server that checks signatures answers (moto accepts any key, so the error is built here)."""
    from botocore.exceptions import ClientError

    from logitcache.storage.fs import remote_error

    refused = ClientError({"Error": {"Code": "InvalidAccessKeyId", "Message": "bad key"}}, "HeadObject")
    wrapped = PermissionError("Access Denied")
    wrapped.__cause__ = refused
    err = remote_error("s3://b/c", "s3", wrapped)
    assert err is not None and "the credentials were refused" in str(err) and "AWS_SECRET_ACCESS_KEY" in str(err)
    assert remote_error("s3://b/c", "s3", ValueError("a bug")) is None


def test_cli_reports_unreachable_endpoint_in_one_line(s3, no_credentials):
    from click.testing import CliRunner

    from logitcache.cli import main

    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}", "AWS_ACCESS_KEY_ID": "k"}
    env["AWS_SECRET_ACCESS_KEY"] = "s"
    for command in (["inspect", "s3://faults/cli"], ["verify", "s3://faults/cli"], ["show", "s3://faults/cli"]):
        result = CliRunner().invoke(main, command, env=env)
        if command[0] == "verify":  # verify reports problems (exit 1), one line each
            assert result.exit_code == 1 and "cannot connect to the endpoint" in result.output, result.output
        else:
            one_line_error(result, "s3://faults/cli: cannot connect to the endpoint", "AWS_ENDPOINT_URL")
