"""Alignment stores: stage two's per-student-tokenizer output, kept inside the cache it aligns.

Layout (``docs/format.md``)::

    CACHE/alignments/<student tokenizer fingerprint>/
        store.json                       header: student tokenizer, chat template, the cache it was built from
        tokenizer/                       a copy of the student tokenizer (so training needs nothing else)
        vocab_map.parquet                exact-string map teacher id -> student id (-1: none), stored once
        shards/shard-NNNNNN/alignment.parquet + _COMPLETE.json   one per cache shard, same sequence order
        manifest.json                    written last: complete

Shard folders follow the cache's rules (``storage.shards``): atomic, checksummed, a rerun rewrites only the
missing ones. The store depends on the cache's identity: its header records the cache's header fingerprint
and shard checksums, and ``AlignmentStore.open`` refuses a store built from different cache content.

Integrity: the manifest records each shard's checksum (as the cache's does) and, under ``checksums``, those of
its header, ``store.json``, ``vocab_map.parquet`` and the tokenizer copy's files; ``storage.verify_alignment``
checks them all and, at level ``full``, every decoded record against the cache. A rerun of the writer treats a
shard whose files fail their marker's checksum as missing and rewrites it, so ``align`` repairs a damaged store.

Row conventions of ``pairs``/``chunks`` (teacher and student loss-span rows, end-of-text rows) are defined by
``logitcache.pipeline.byte_alignment``; this module only persists them.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import CacheError, CacheIncompleteError, CacheNotFoundError, ConfigMismatchError, CorruptCacheError
from .fs import Location
from .manifest import (
    ALIGNMENT_SCHEMA_VERSION,
    FORMAT_NAME,
    MANIFEST_FILE,
    SHARDS_DIR,
    TOKENIZER_DIR,
    check_schema,
    shard_name,
)
from .reader import LogitCache
from .shards import (
    bytes_checksum,
    clean_incomplete,
    commit_shard,
    complete_shards,
    file_checksums,
    json_checksum,
    verify_shard_files,
)

ALIGNMENTS_DIR = "alignments"
STORE_FILE = "store.json"
ALIGNMENT_FILE = "alignment.parquet"
VOCAB_MAP_FILE = "vocab_map.parquet"

SCHEMA = pa.schema(
    [
        ("sample_id", pa.int64()),
        ("student_prompt_text", pa.large_string()),
        ("student_token_ids", pa.list_(pa.int32())),
        ("student_prompt_len", pa.int32()),
        ("student_offsets", pa.list_(pa.int64())),
        ("pairs", pa.list_(pa.int32())),
        ("chunks", pa.list_(pa.int32())),
        ("teacher_end", pa.int32()),
        ("student_end", pa.int32()),
    ]
)


def store_key(tokenizer_fingerprint: str) -> str:
    """The folder name of a student tokenizer's alignment store: its fingerprint's first 16 hex digits.

    The one place this rule lives: stage two writes ``alignments/<key>/`` and stage three looks it up by it.
    """
    return tokenizer_fingerprint[:16]


@dataclass
class AlignmentRecord:
    """Stage two's output for one cached sequence.

    ``student_token_ids`` is the student's tokenization of its own rendering of the prompt followed by the
    completion; ``student_offsets`` are the completion tokens' UTF-8 byte starts relative to the completion
    start. ``pairs`` int32 ``[P, 2]`` and ``chunks`` int32 ``[C, 4]`` index teacher and student loss-span rows;
    ``teacher_end``/``student_end`` are the end-of-text rows (-1: none).
    """

    sample_id: int
    student_prompt_text: str
    student_token_ids: np.ndarray
    student_prompt_len: int
    student_offsets: np.ndarray
    pairs: np.ndarray
    chunks: np.ndarray
    teacher_end: int
    student_end: int

    @property
    def student_completion_ids(self) -> np.ndarray:
        return self.student_token_ids[self.student_prompt_len :]


def _table(records: list[AlignmentRecord]) -> pa.Table:
    return pa.table(
        {
            "sample_id": pa.array([r.sample_id for r in records], pa.int64()),
            "student_prompt_text": pa.array([r.student_prompt_text for r in records], pa.large_string()),
            "student_token_ids": pa.array(
                [np.asarray(r.student_token_ids, np.int32) for r in records], pa.list_(pa.int32())
            ),
            "student_prompt_len": pa.array([r.student_prompt_len for r in records], pa.int32()),
            "student_offsets": pa.array(
                [np.asarray(r.student_offsets, np.int64) for r in records], pa.list_(pa.int64())
            ),
            "pairs": pa.array([np.asarray(r.pairs, np.int32).reshape(-1) for r in records], pa.list_(pa.int32())),
            "chunks": pa.array([np.asarray(r.chunks, np.int32).reshape(-1) for r in records], pa.list_(pa.int32())),
            "teacher_end": pa.array([r.teacher_end for r in records], pa.int32()),
            "student_end": pa.array([r.student_end for r in records], pa.int32()),
        },
        schema=SCHEMA,
    )


class _Columns:
    """A shard's alignment table as numpy arrays (list columns as flat values + offsets), read once."""

    LISTS = (("student_token_ids", np.int32), ("student_offsets", np.int64), ("pairs", np.int32), ("chunks", np.int32))

    def __init__(self, table: pa.Table) -> None:
        self.n = table.num_rows
        self.scalars = {
            c: table.column(c).to_numpy() for c in ("sample_id", "student_prompt_len", "teacher_end", "student_end")
        }
        self.prompts = table.column("student_prompt_text").to_pylist()
        self.lists: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for name, dtype in self.LISTS:
            col = table.column(name).combine_chunks()
            self.lists[name] = (
                np.asarray(col.values.to_numpy(zero_copy_only=False), dtype=dtype),
                np.asarray(col.offsets.to_numpy(), dtype=np.int64),
            )

    def _list(self, name: str, i: int) -> np.ndarray:
        values, offsets = self.lists[name]
        return values[offsets[i] : offsets[i + 1]]

    def record(self, i: int) -> AlignmentRecord:
        return AlignmentRecord(
            sample_id=int(self.scalars["sample_id"][i]),
            student_prompt_text=self.prompts[i],
            student_token_ids=self._list("student_token_ids", i),
            student_prompt_len=int(self.scalars["student_prompt_len"][i]),
            student_offsets=self._list("student_offsets", i),
            pairs=self._list("pairs", i).reshape(-1, 2),
            chunks=self._list("chunks", i).reshape(-1, 4),
            teacher_end=int(self.scalars["teacher_end"][i]),
            student_end=int(self.scalars["student_end"][i]),
        )


def cache_identity(cache: LogitCache) -> dict[str, Any]:
    """What an alignment store records about the cache it was built from."""
    return {"header_fingerprint": cache.header.fingerprint(), "shards": {s.name: s.checksum for s in cache.shards}}


def merge_alignment_stats(a: dict[str, Any], b: dict[str, Any], keep_worst: int = 10) -> dict[str, Any]:
    """Sum numeric stats; merge the ``worst`` lists ([score, sample_id] pairs, lowest first)."""
    out: dict[str, Any] = {}
    for key in sorted(set(a) | set(b)):
        if key == "worst":
            out[key] = sorted(a.get(key, []) + b.get(key, []))[:keep_worst]
        else:
            out[key] = a.get(key, 0) + b.get(key, 0)
    return out


def list_stores(cache: LogitCache) -> list[str]:
    """Keys (student tokenizer fingerprints) of the alignment stores of ``cache`` that have a header."""
    parent = cache.loc.child(ALIGNMENTS_DIR)
    return [name for name in parent.listdir() if parent.exists(name, STORE_FILE)]


class AlignmentWriter:
    """Create or resume the alignment store ``key`` of ``cache`` with ``header`` (see the module docstring)."""

    def __init__(self, cache: LogitCache, key: str, header: dict[str, Any], overwrite: bool = False) -> None:
        self.cache = cache
        self.loc = cache.loc.child(ALIGNMENTS_DIR, key)
        self.header = {**header, "cache": cache_identity(cache)}
        if self.loc.exists(STORE_FILE):
            try:
                doc = self.loc.read_json(STORE_FILE)
            except (ValueError, UnicodeDecodeError) as e:
                raise CorruptCacheError(f"{self.loc.url_of(STORE_FILE)}: unreadable ({e}); delete the folder") from e
            check_schema(doc, self.loc.url_of(STORE_FILE))
            old = {k: v for k, v in doc["header"].items() if k != "runtime"}
            new = {k: v for k, v in self.header.items() if k != "runtime"}
            if old != new:
                diffs = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
                if not overwrite:
                    raise ConfigMismatchError(
                        f"{self.loc.url}: an alignment store with different {', '.join(diffs)} exists here; pass "
                        "--overwrite to rebuild it"
                    )
                for name in self.loc.listdir():
                    self.loc.rm(name)
        if not self.loc.exists(STORE_FILE):
            self.loc.fs.makedirs(self.loc.root, exist_ok=True)
            self.loc.write_json_atomic(
                {
                    "format": FORMAT_NAME,
                    "schema_version": ALIGNMENT_SCHEMA_VERSION,
                    "kind": "alignment",
                    "header": self.header,
                },
                STORE_FILE,
            )

    def complete_shards(self, check: bool = True) -> list[int]:
        """Shards with a marker; with ``check``, only those whose files also pass the marker's checksum (the
        others are rewritten by the next ``write_shard``, which replaces a stale copy)."""
        parent = self.loc.child(SHARDS_DIR)
        done = complete_shards(parent)
        if not check:
            return done
        sound = []
        for index in done:
            shard = parent.child(shard_name(index))
            try:
                marker = shard.read_json("_COMPLETE.json")
                if not verify_shard_files(shard, marker, marker.get("checksum", ""), shard_name(index)):
                    sound.append(index)
            except (ValueError, UnicodeDecodeError, FileNotFoundError):
                continue
        return sound

    def write_shard(self, index: int, records: list[AlignmentRecord], stats: dict[str, Any]) -> dict[str, Any]:
        def fill(scratch: str) -> dict[str, Any]:
            pq.write_table(_table(records), os.path.join(scratch, ALIGNMENT_FILE), compression="zstd")
            return {"sequences": len(records), "stats": stats}

        return commit_shard(self.loc.child(SHARDS_DIR), index, fill, ALIGNMENT_SCHEMA_VERSION)

    def save_vocab_map(self, teacher_to_student: np.ndarray) -> None:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, VOCAB_MAP_FILE)
            pq.write_table(
                pa.table({"student_id": pa.array(np.asarray(teacher_to_student, np.int32))}), path, compression="zstd"
            )
            with open(path, "rb") as f:
                self.loc.write_bytes_atomic(f.read(), VOCAB_MAP_FILE)

    def save_tokenizer(self, tokenizer: Any) -> None:
        """A copy of the student tokenizer, written like the cache's teacher copy (atomic, marker last)."""
        from .writer import save_tokenizer_copy

        save_tokenizer_copy(self.loc, tokenizer)

    def finalize(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        done = self.complete_shards(check=False)
        expected = [s.index for s in self.cache.shards]
        missing = sorted(set(expected) - set(done))
        if missing:
            raise CacheError(f"{self.loc.url}: cannot finalize, shards {missing[:10]} are not aligned yet")
        clean_incomplete(self.loc.child(SHARDS_DIR))
        for name in self.loc.listdir():
            if name.startswith(".tmp-"):
                self.loc.rm(name)
        markers = [self.loc.read_json(SHARDS_DIR, shard_name(i), "_COMPLETE.json") for i in expected]
        stats: dict[str, Any] = {}
        for m in markers:
            stats = merge_alignment_stats(stats, m["stats"])
        manifest = {
            "format": FORMAT_NAME,
            "schema_version": ALIGNMENT_SCHEMA_VERSION,
            "kind": "alignment",
            "header": self.header,
            "shards": [{k: m[k] for k in ("name", "index", "sequences", "bytes", "checksum")} for m in markers],
            "stats": stats,
            **(extra or {}),
            "checksums": {
                "header": json_checksum(self.header),
                STORE_FILE: bytes_checksum(self.loc.read_bytes(STORE_FILE)),
                VOCAB_MAP_FILE: bytes_checksum(self.loc.read_bytes(VOCAB_MAP_FILE))
                if self.loc.exists(VOCAB_MAP_FILE)
                else None,
                TOKENIZER_DIR: file_checksums(self.loc.child(TOKENIZER_DIR))
                if self.loc.exists(TOKENIZER_DIR, "_COMPLETE")
                else None,
            },
            "finalized_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        self.loc.write_json_atomic(manifest, MANIFEST_FILE)
        return manifest


class AlignmentStore:
    """A finalized alignment store of ``cache``; ``AlignmentStore.open(cache, key)``."""

    def __init__(self, cache: LogitCache, loc: Location, manifest: dict[str, Any]) -> None:
        self.cache = cache
        self.loc = loc
        self.manifest = manifest
        self.header = manifest["header"]
        self.key = loc.root.rstrip("/").rsplit("/", 1)[-1]
        self._columns: dict[int, _Columns] = {}
        self._rows: dict[int, dict[int, int]] = {}

    @staticmethod
    def open(cache: LogitCache, key: str) -> AlignmentStore:
        loc = cache.loc.child(ALIGNMENTS_DIR, key)
        if not loc.exists(STORE_FILE):
            raise CacheNotFoundError(f"{loc.url}: no alignment store for this student tokenizer")
        if not loc.exists(MANIFEST_FILE):
            raise CacheIncompleteError(f"{loc.url}: alignment store is not finalized; rerun `logitcache align`")
        try:
            manifest = loc.read_json(MANIFEST_FILE)
        except (ValueError, UnicodeDecodeError) as e:
            raise CorruptCacheError(f"{loc.url_of(MANIFEST_FILE)}: not valid JSON ({e})") from e
        check_schema(manifest, loc.url_of(MANIFEST_FILE))
        if manifest["header"].get("cache") != cache_identity(cache):
            raise ConfigMismatchError(
                f"{loc.url}: this alignment store was built from different cache content (the cache was rewritten "
                "since); rerun `logitcache align` with --overwrite"
            )
        return AlignmentStore(cache, loc, manifest)

    def columns(self, index: int) -> _Columns:
        if index not in self._columns:
            path = self.loc.child(SHARDS_DIR, shard_name(index))
            try:
                table = path.read_parquet(ALIGNMENT_FILE)
            except Exception as e:
                raise CorruptCacheError(f"{path.url_of(ALIGNMENT_FILE)}: unreadable ({type(e).__name__}: {e})") from e
            if len(self._columns) >= 4:  # a few shards at a time: bounded memory
                self._columns.pop(next(iter(self._columns)))
            self._columns[index] = cols = _Columns(table)
            self._rows[index] = {int(s): i for i, s in enumerate(cols.scalars["sample_id"])}
        return self._columns[index]

    def get(self, sample_id: int) -> AlignmentRecord:
        shard, _ = self.cache.locate(sample_id)
        cols = self.columns(shard)
        return cols.record(self._rows[shard][int(sample_id)])

    def iter_shard(self, index: int) -> list[AlignmentRecord]:
        cols = self.columns(index)
        return [cols.record(i) for i in range(cols.n)]

    def vocab_map(self) -> np.ndarray:
        return self.loc.read_parquet(VOCAB_MAP_FILE).column("student_id").to_numpy()

    def tokenizer_path(self) -> str:
        return self.loc.path(TOKENIZER_DIR)


def describe_store(manifest: dict[str, Any]) -> dict[str, Any]:
    """The numbers ``logitcache inspect`` shows for one alignment store (from its manifest alone)."""
    s = manifest["stats"]
    return {
        "student": manifest["header"]["student"]["spec"],
        "student_tokenizer": manifest["header"]["student"]["tokenizer_fingerprint"][:16],
        "sequences": s.get("sequences", 0),
        "aligned_teacher_fraction": s.get("pairs", 0) / max(s.get("teacher_rows", 0), 1),
        "mean_chunk_teacher_tokens": s.get("chunk_teacher_rows", 0) / max(s.get("chunks", 0), 1),
        "mean_chunk_student_tokens": s.get("chunk_student_rows", 0) / max(s.get("chunks", 0), 1),
        "vocab_map_coverage": (manifest.get("vocab_map") or {}).get("coverage"),
        "worst": [{"sample_id": int(sid), "aligned_fraction": frac} for frac, sid in s.get("worst", [])[:5]],
    }


def describe_stores(cache: LogitCache) -> list[dict[str, Any]]:
    """``describe_store`` for every alignment store of ``cache`` (unfinished ones are listed as such)."""
    out = []
    for key in list_stores(cache):
        loc = cache.loc.child(ALIGNMENTS_DIR, key)
        if not loc.exists(MANIFEST_FILE):
            out.append({"key": key, "finalized": False})
            continue
        out.append({"key": key, "finalized": True, **describe_store(loc.read_json(MANIFEST_FILE))})
    return out
