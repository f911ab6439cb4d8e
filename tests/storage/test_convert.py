"""``logitcache convert``: re-coding and cutting K keep every record, the output is a verified v2 cache with the
conversion recorded, a killed conversion leaves no complete-looking output and resumes shard by shard, and bad
requests are refused with one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cache_helpers import assert_records_equal, random_record, write_cache
from cli_helpers import one_line_error
from click.testing import CliRunner

from logitcache.cli import main
from logitcache.storage import CacheIncompleteError, ConfigMismatchError, LogitCache, verify_cache
from logitcache.storage.convert import convert_cache, cut_record


class _Tok:
    def save_pretrained(self, folder: str) -> None:
        Path(folder, "tokenizer.json").write_text('{"fake": true}')


@pytest.fixture
def source(tmp_path: Path) -> Path:
    rng = np.random.default_rng(7)
    shards = [[random_record(rng, 100 * s + i, k=8, vocab=400, temps=(1.0, 2.0)) for i in range(4)] for s in range(3)]
    shards[1] = []  # an empty shard converts too
    writer = write_cache(str(tmp_path / "src"), shards, k=8, vocab=400, temps=(1.0, 2.0),
                         metadata={"capture": {"mode": "score"}})
    writer.save_tokenizer(_Tok())
    writer.finalize()
    return tmp_path / "src"


def _records(path: Path) -> list:
    return list(LogitCache.open(path).iter_sequences())


@pytest.mark.parametrize("backend", ["zarr", "arrow"])
def test_convert_recodes_and_cuts_k(tmp_path: Path, source: Path, backend: str) -> None:
    out = tmp_path / "out"
    m = convert_cache(source, out, id_codec={"name": "rank"}, logprob_codec={"name": "fp16"}, top_k=3,
                      positions={"name": backend})
    assert m["schema_version"] == 2 and m["header"]["top_k"] == 3
    conv = m["header"]["metadata"]["convert"]
    assert conv["source"].endswith("src") and conv["top_k"] == 3 and conv["id_codec"] == {"name": "rank"}
    assert conv["source_header_checksum"].startswith("sha256:") and conv["source_schema_version"] == 2
    assert json.loads((out / "cache.json").read_text())["header"]["metadata"]["convert"] == conv
    assert m["header"]["metadata"]["capture"] == {"mode": "score"}  # capture fields carried over
    assert verify_cache(str(out)) == []
    before, after = _records(source), _records(out)
    assert len(before) == len(after) == 8
    for a, b in zip(before, after, strict=True):
        assert_records_equal(cut_record(a, 3), b, exact_logprobs=False)
        np.testing.assert_array_equal(a.rows.target_logprobs, b.rows.target_logprobs)  # targets stay exact
    assert LogitCache.open(out).has_tokenizer()
    assert (out / "tokenizer" / "tokenizer.json").read_text() == '{"fake": true}'


def test_convert_is_resumable_and_atomic(tmp_path: Path, source: Path) -> None:
    out = tmp_path / "out"
    seen: list[tuple[int, str]] = []

    def crash_after_first(index: int, what: str) -> None:
        seen.append((index, what))
        if index == 0:
            raise KeyboardInterrupt  # killed after shard 0 was committed

    with pytest.raises(KeyboardInterrupt):
        convert_cache(source, out, id_codec={"name": "rank"}, on_shard=crash_after_first)
    with pytest.raises(CacheIncompleteError):  # no manifest: never mistaken for a complete cache
        LogitCache.open(out)
    first = (out / "shards" / "shard-000000" / "_COMPLETE.json").read_text()
    seen.clear()
    convert_cache(source, out, id_codec={"name": "rank"}, on_shard=lambda i, w: seen.append((i, w)))
    assert seen == [(0, "skipped"), (1, "written"), (2, "written")]
    assert (out / "shards" / "shard-000000" / "_COMPLETE.json").read_text() == first  # not rewritten
    for a, b in zip(_records(source), _records(out), strict=True):
        assert_records_equal(a, b)  # fp32 source, fp32 output: exact
    assert verify_cache(str(out)) == []
    seen.clear()
    convert_cache(source, out, id_codec={"name": "rank"}, on_shard=lambda i, w: seen.append((i, w)))
    assert [w for _, w in seen] == ["skipped"] * 3  # a rerun of a finished conversion does nothing


def test_convert_refusals(tmp_path: Path, source: Path) -> None:
    out = tmp_path / "out"
    convert_cache(source, out, top_k=4)
    with pytest.raises(ConfigMismatchError, match="different config"):
        convert_cache(source, out, top_k=2)
    convert_cache(source, out, top_k=2, overwrite=True)
    assert LogitCache.open(out).top_k == 2
    with pytest.raises(ValueError, match=r"--top-k 9: must be in \[1, 8\]"):
        convert_cache(source, tmp_path / "o2", top_k=9)
    with pytest.raises(ValueError, match="OUT is the source cache"):
        convert_cache(source, source, top_k=2)


def test_convert_cli(tmp_path: Path, source: Path) -> None:
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["convert", str(source), str(out), "--id-codec", "rank", "--top-k", "4"])
    assert r.exit_code == 0, r.output
    assert "converted 3 shards" in r.output and "B/position" in r.output
    assert LogitCache.open(out).header.id_codec == {"name": "rank"}
    r = CliRunner().invoke(main, ["convert", str(source), str(tmp_path / "x"), "--id-codec", "zip"])
    one_line_error(r, "--id-codec", "zip", "rank")
    r = CliRunner().invoke(main, ["convert", str(source), str(tmp_path / "y"), "--top-k", "99"])
    one_line_error(r, "--top-k 99")
    r = CliRunner().invoke(main, ["convert", str(tmp_path / "missing"), str(tmp_path / "z")])
    one_line_error(r, "missing")
