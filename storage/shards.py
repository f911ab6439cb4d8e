"""Atomic, checksummed shard folders: the mechanism shared by the cache and its alignment stores.

A *shard folder* ``PARENT/shard-NNNNNN/`` is complete iff it holds ``_COMPLETE.json`` (the marker). Locally it is
built under ``PARENT/.tmp-shard-NNNNNN-<random>/`` and renamed into place (atomic); on object stores its files
are uploaded to the final prefix and the marker is put last.

Several writers work on one folder at once (job-array tasks, dask workers), each on its own shards, so nothing
here ever deletes another writer's work in progress: opening a store cleans nothing; the writer of shard N
replaces only shard N's stale copy (an object-store prefix without a marker, left by a killed writer); and
``clean_incomplete`` (temporary folders and marker-less prefixes) runs only at finalization, when every shard
is complete and no writer can still be working.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any

from .fs import Location, upload_dir
from .manifest import FORMAT_NAME, SCHEMA_VERSION, SHARD_MARKER, shard_name


def shard_checksum(shard: Location, files: dict[str, int]) -> str:
    """sha256 over ``relpath NUL size NUL bytes`` of every data file of a shard, in sorted path order."""
    h = hashlib.sha256()
    for rel, size in sorted(files.items()):
        h.update(rel.encode() + b"\0" + str(size).encode() + b"\0")
        with shard.fs.open(shard.path(rel), "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return "sha256:" + h.hexdigest()


def json_checksum(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj`` (sorted keys, no spaces): a checksum over a manifest field."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def bytes_checksum(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def file_checksums(folder: Location) -> dict[str, str]:
    """``{relative path: sha256}`` of every file below ``folder`` (e.g. a tokenizer copy); empty if absent."""
    out = {}
    for rel in folder.files():
        h = hashlib.sha256()
        with folder.fs.open(folder.path(rel), "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        out[rel] = "sha256:" + h.hexdigest()
    return out


def check_file_checksums(folder: Location, expected: dict[str, str], where: str) -> list[str]:
    """Problems of ``folder``'s files against recorded ``{relative path: sha256}``: missing, changed, unexpected."""
    actual = file_checksums(folder)
    problems = [f"{where}/{rel}: missing" for rel in sorted(set(expected) - set(actual))]
    extra = sorted(set(actual) - set(expected))
    problems += [f"{where}/{rel}: unexpected file (not in the recorded checksums)" for rel in extra]
    problems += [
        f"{where}/{rel}: content changed (sha256 {actual[rel][7:19]}... != recorded {expected[rel][7:19]}...)"
        for rel in sorted(set(actual) & set(expected))
        if actual[rel] != expected[rel]
    ]
    return problems


def commit_shard(
    parent: Location, index: int, fill: Callable[[str], dict[str, Any]], schema_version: int = SCHEMA_VERSION
) -> dict[str, Any]:
    """Build shard ``index`` under ``parent``: ``fill(scratch_dir)`` writes its files and returns marker fields.

    The marker gets ``format``, ``schema_version``, ``name``, ``index``, ``files`` (relative path -> size),
    ``bytes``, ``checksum`` and ``written_at`` on top of what ``fill`` returned; it is returned too.
    """
    name = shard_name(index)
    if parent.is_local:
        os.makedirs(parent.root, exist_ok=True)
        scratch = os.path.join(parent.root, f".tmp-{name}-{uuid.uuid4().hex[:8]}")
        os.makedirs(scratch)
    else:
        scratch = tempfile.mkdtemp(prefix=f"logitcache-{name}-")
    try:
        extra = fill(scratch)
        local = Location.parse(scratch)
        files = local.files()
        marker = {
            "format": FORMAT_NAME,
            "schema_version": schema_version,
            "name": name,
            "index": index,
            **extra,
            "files": files,
            "bytes": sum(files.values()),
            "checksum": shard_checksum(local, files),
            "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if parent.is_local:
            local.write_json_atomic(marker, SHARD_MARKER)
            final = parent.path(name)
            if os.path.exists(final):  # a stale or concurrently rewritten copy: replace it
                shutil.rmtree(final)
            os.rename(scratch, final)
        else:
            dest = parent.child(name)
            dest.rm()
            upload_dir(scratch, dest)
            dest.write_json_atomic(marker, SHARD_MARKER)
    finally:
        if os.path.isdir(scratch):
            shutil.rmtree(scratch, ignore_errors=True)
    return marker


def complete_shards(parent: Location) -> list[int]:
    """Indices of the complete shard folders under ``parent``."""
    out = []
    for name in parent.listdir():
        if name.startswith("shard-") and parent.exists(name, SHARD_MARKER):
            out.append(int(name.removeprefix("shard-")))
    return sorted(out)


def clean_incomplete(parent: Location) -> None:
    """Remove temporary folders and marker-less shard prefixes left by killed writers."""
    for name in parent.listdir():
        if name.startswith(".tmp-") or not parent.exists(name, SHARD_MARKER):
            parent.rm(name)


def verify_shard_files(
    shard: Location, marker: dict[str, Any], expected_checksum: str, where: str, manifest_fix: str = ""
) -> list[str]:
    """Problems with a shard's files against its marker: missing, resized, unexpected, checksum mismatch.

    The files' checksum is compared with both the manifest's (``expected_checksum``) and the marker's record, so
    the message says which of the three disagrees: a damaged manifest entry (files and marker agree; rewrite the
    manifest with ``manifest_fix``), a damaged marker (files and manifest agree), or a corrupt shard.
    """
    problems = []
    actual = shard.files()
    actual.pop(SHARD_MARKER, None)
    expected = marker.get("files", {})
    for rel, size in expected.items():
        if rel not in actual:
            problems.append(f"{where}/{rel}: missing")
        elif actual[rel] != size:
            problems.append(f"{where}/{rel}: {actual[rel]} bytes, expected {size} (truncated or rewritten)")
    for rel in sorted(set(actual) - set(expected)):
        problems.append(f"{where}/{rel}: unexpected file not covered by the checksum")
    if problems:
        return problems
    checksum = shard_checksum(shard, expected)
    recorded = marker.get("checksum")
    if checksum == expected_checksum == recorded:
        return problems
    if checksum == recorded:
        problems.append(
            f"{where}: the manifest records checksum {expected_checksum} but the shard's files and its marker agree "
            f"on {checksum}: the manifest entry is damaged, not the shard; {manifest_fix or 'rewrite the manifest'}"
        )
    elif checksum == expected_checksum:
        problems.append(
            f"{where}/{SHARD_MARKER}: records checksum {recorded} but the shard's files match the manifest's "
            f"{checksum}: the marker is damaged, not the data; delete the shard and rerun the writer to rebuild it"
        )
    else:
        problems.append(
            f"{where}: checksum mismatch ({checksum} != {expected_checksum}); the shard is corrupt, "
            "delete it and rerun the writer to rebuild it"
        )
    return problems
