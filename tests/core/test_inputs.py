"""Stage one's input readers: JSONL, Parquet, CSV and a `datasets` folder give the same records."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from logitcache.inputs import InputError, InputFields, read_inputs, shard_ranges, shards_for_task

ROWS = [{"q": "What is 2+2?", "a": "4", "uid": "x1"}, {"q": "Café?", "a": "Oui 🙂", "uid": "x2"}]
FIELDS = InputFields(prompt="q", response="a", id="uid")


def _same(records):
    assert [(r.sample_id, r.source_id, r.prompt, r.response) for r in records] == [
        (0, "x1", "What is 2+2?", "4"),
        (1, "x2", "Café?", "Oui 🙂"),
    ]


def test_jsonl_parquet_csv_and_datasets_folder_agree(tmp_path):
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS), "utf-8")
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    (tmp_path / "d.csv").write_text("q,a,uid\nWhat is 2+2?,4,x1\nCafé?,Oui 🙂,x2\n", "utf-8")
    folder = tmp_path / "ds"  # the layout of datasets' save_to_disk: Arrow stream files
    folder.mkdir()
    table = pa.Table.from_pylist(ROWS)
    with pa.ipc.new_stream(folder / "data-00000-of-00001.arrow", table.schema) as w:
        w.write_table(table)
    for path in ("d.jsonl", "d.parquet", "d.csv", "ds"):
        _same(read_inputs(str(tmp_path / path), FIELDS, "score"))


def test_chat_messages_and_limit(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"hi {i}"}], "response": "yo"} for i in range(5)]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recs = read_inputs(str(tmp_path / "m.jsonl"), InputFields(), "score", limit=3)
    assert len(recs) == 3 and recs[2].messages == [{"role": "user", "content": "hi 2"}] and recs[2].prompt is None


def test_unknown_format_and_missing_file(tmp_path):
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(InputError, match="unknown format"):
        read_inputs(str(tmp_path / "d.txt"), InputFields(), "generate")
    with pytest.raises(InputError, match="no such file"):
        read_inputs(str(tmp_path / "nope.jsonl"), InputFields(), "generate")


def test_shard_ranges_and_job_array_split_are_a_partition():
    ranges = shard_ranges(23, 5)
    assert ranges == [(0, 5), (5, 10), (10, 15), (15, 20), (20, 23)]
    tasks = [shards_for_task(len(ranges), 3, i) for i in range(3)]
    assert sorted(s for t in tasks for s in t) == list(range(5))
