"""Write a cache: one writer per shard, whole shards only, manifest last.

``CacheWriter`` opens (or creates, or resumes) a cache folder for one capture config. Each shard is written by
``ShardWriter`` in one go: records are buffered in memory (a shard is the unit of work, tens to hundreds of MB),
then the position parts, the sequence table and the completion marker are written into a temporary folder that
is renamed into place (local), or straight to the final prefix with the marker last (object stores). A killed
writer therefore never leaves a shard that reads as complete, and a rerun skips complete shards and rewrites
the rest. ``finalize`` merges the shard markers into ``manifest.json`` and is idempotent, so a Slurm job array
can call it from any task once every shard exists.

Refusals: a folder that holds a cache with a different identity (see ``CacheHeader.identity``), or a non-empty
folder that is not a cache, is refused unless ``overwrite=True``, which wipes it first.

Integrity of the metadata: ``finalize`` records checksums of the manifest's header, of ``cache.json`` and of each
file of the ``tokenizer/`` copy (``manifest["checksums"]``; ``verify`` checks them). A ``cache.json`` that is
unreadable, or whose bytes disagree with the recorded checksum, is restored by ``CacheWriter.resume`` (so by
``logitcache finalize``) from the manifest's header copy when that copy passes its checksum; a rerun of
``generate`` says so instead of advising ``--overwrite``, which would delete a sound cache.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
import uuid
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from .backends import make_backend
from .codecs import id_codec_from_config, logprob_codec_from_config
from .errors import CacheError, ConfigMismatchError, CorruptCacheError
from .fs import Location, upload_dir
from .layout import encode_rows, part_specs, sequence_table, split_shard_parts, table_specs
from .manifest import (
    FORMAT_NAME,
    HEADER_FILE,
    MANIFEST_FILE,
    SCHEMA_VERSION,
    SEQUENCES_FILE,
    SHARD_MARKER,
    SHARDS_DIR,
    TAIL_BINS,
    TOKENIZER_DIR,
    TOKENIZER_MARKER,
    CacheHeader,
    check_schema,
    empty_stats,
    merge_stats,
    shard_name,
    summarize,
)
from .records import PositionRows, SequenceRecord
from .shards import bytes_checksum, clean_incomplete, commit_shard, complete_shards, file_checksums, json_checksum


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("logitcache", "zarr", "pyarrow", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


class CacheWriter:
    """Create or resume the cache at ``url`` for ``header``; see the module docstring for the rules."""

    def __init__(
        self,
        url: str | os.PathLike[str],
        header: CacheHeader,
        *,
        overwrite: bool = False,
        storage_options: dict[str, Any] | None = None,
        _header_restored: bool = False,
    ) -> None:
        self.loc = Location.parse(url, storage_options)
        self._header_restored = _header_restored
        #: the schema this writer writes: new caches get the newest (2); a v1 cache being resumed stays v1
        self.schema_version = SCHEMA_VERSION
        self.header = header
        self.id_codec = id_codec_from_config(header.id_codec)
        self.lp_codec = logprob_codec_from_config(header.logprob_codec)
        opts = {k: v for k, v in header.positions.items() if k != "name"}
        self.backend = make_backend(header.positions.get("name", "zarr"), **opts)
        self._prepare(overwrite)

    @staticmethod
    def resume(url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> CacheWriter:
        """Open an existing (possibly unfinished) cache for writing with the header in its ``cache.json``."""
        loc = Location.parse(url, storage_options)
        copy = intact_manifest_header(loc)
        if not loc.exists(HEADER_FILE) and copy is None:
            raise CacheError(f"{loc.url}: no cache.json here; start the cache with `logitcache generate` first")
        try:
            doc = loc.read_json(HEADER_FILE)
            damaged = header_file_damaged(loc)
        except (ValueError, UnicodeDecodeError, FileNotFoundError) as e:
            if copy is None:
                raise CorruptCacheError(f"{loc.url_of(HEADER_FILE)}: {header_file_advice(loc, e)}") from e
            damaged = True
        if damaged and copy is not None:  # restore the header file from the manifest's checksummed copy
            doc = {"format": FORMAT_NAME, "schema_version": _manifest_version(loc), "header": copy}
            loc.write_json_atomic(doc, HEADER_FILE)
        check_schema(doc, loc.url_of(HEADER_FILE))
        return CacheWriter(
            url,
            CacheHeader.from_dict(doc["header"], loc.url_of(HEADER_FILE)),
            storage_options=storage_options,
            _header_restored=damaged and copy is not None,  # finalize records the restored file's checksum
        )

    # -- opening -----------------------------------------------------------------------------------------
    def _prepare(self, overwrite: bool) -> None:
        loc = self.loc
        exists = loc.exists()  # a fresh look (object stores: no cached listing)
        entries = loc.listdir() if exists else []
        if exists and not loc.fs.isdir(loc.root):
            raise CacheError(f"{loc.url}: exists and is a file, not a folder; choose another --out path")
        if entries and HEADER_FILE not in entries:
            if not overwrite:
                raise ConfigMismatchError(
                    f"{loc.url}: folder is not empty and holds no logitcache cache; "
                    "choose an empty folder or pass --overwrite to delete its contents"
                )
            self._wipe()
        elif HEADER_FILE in entries:
            try:
                doc = loc.read_json(HEADER_FILE)
            except (ValueError, UnicodeDecodeError) as e:
                if not overwrite:
                    raise CorruptCacheError(f"{loc.url_of(HEADER_FILE)}: {header_file_advice(loc, e)}") from e
                doc = None
            if doc is not None and not overwrite and not self._header_restored and header_file_damaged(loc):
                raise CorruptCacheError(f"{loc.url_of(HEADER_FILE)}: {header_file_advice(loc)}")
            if doc is not None:
                check_schema(doc, loc.url_of(HEADER_FILE))
                existing = CacheHeader.from_dict(doc["header"], loc.url_of(HEADER_FILE))
                diffs = existing.differences(self.header)
                if not diffs:
                    self.schema_version = int(doc["schema_version"])
                if diffs and not overwrite:
                    raise ConfigMismatchError(
                        f"{loc.url}: holds a cache with a different config ({'; '.join(diffs[:3])}"
                        f"{'; ...' if len(diffs) > 3 else ''}); pass --overwrite to replace it or choose another path"
                    )
                if diffs:
                    self._wipe()
                else:  # resume under the header on disk (it may predate fields that compare leniently)
                    runtime = self.header.metadata.get("runtime")
                    self.header = dataclasses.replace(
                        existing, metadata={**existing.metadata, **({"runtime": runtime} if runtime else {})}
                    )
            else:
                self._wipe()
        if not loc.exists(HEADER_FILE):
            loc.fs.makedirs(loc.root, exist_ok=True)
            loc.write_json_atomic(
                {"format": FORMAT_NAME, "schema_version": self.schema_version, "header": self.header.to_dict()},
                HEADER_FILE,
            )

    def _wipe(self) -> None:
        for name in self.loc.listdir():
            self.loc.rm(name)

    def _clean_temporaries(self) -> None:
        """Remove leftovers of killed writers; only safe once every shard is complete (see ``storage.shards``)."""
        clean_incomplete(self.loc.child(SHARDS_DIR))
        for name in self.loc.listdir():
            if name.startswith(".tmp-"):
                self.loc.rm(name)
        if self.loc.exists(TOKENIZER_DIR) and not self.has_tokenizer():
            self.loc.rm(TOKENIZER_DIR)

    # -- shards --------------------------------------------------------------------------------------------
    def complete_shards(self) -> list[int]:
        """Indices of the shards already written completely (a rerun skips them)."""
        return complete_shards(self.loc.child(SHARDS_DIR))

    def is_complete(self, index: int) -> bool:
        return self.loc.exists(SHARDS_DIR, shard_name(index), SHARD_MARKER)

    def write_shard(
        self, index: int, records: list[SequenceRecord], counters: dict[str, int] | None = None,
        skipped: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """Write shard ``index`` from ``records`` atomically; returns its marker (sizes, checksum, stats).

        ``counters`` (e.g. ``{"skipped_overlong": 2}``) are kept in the marker and summed into the manifest;
        ``skipped`` (``{"sample_id", "reason"}`` of samples left out) is kept there and listed in the manifest.
        """
        if index < 0 or (self.header.num_shards is not None and index >= self.header.num_shards):
            raise ValueError(f"shard index {index} outside [0, {self.header.num_shards})")
        k = self.header.top_k
        for r in records:
            if r.rows.k != k and r.rows.n:
                raise ValueError(f"sample {r.sample_id}: rows have K={r.rows.k}, the cache has top_k={k}")
            if set(r.rows.extra_lse) != set(self.header.extra_temperatures):
                raise ValueError(
                    f"sample {r.sample_id}: extra temperatures {sorted(r.rows.extra_lse)} != the cache's "
                    f"{self.header.extra_temperatures}"
                )
            if r.rows.has_moments != self.header.logit_moments:
                have = "carry" if r.rows.has_moments else "lack"
                raise ValueError(
                    f"sample {r.sample_id}: rows {have} logit moments, the cache's logit_moments is "
                    f"{self.header.logit_moments}"
                )
            if r.rows.tail_samples != self.header.tail_samples:
                raise ValueError(
                    f"sample {r.sample_id}: rows carry {r.rows.tail_samples} tail draws per position, the cache's "
                    f"tail_samples is {self.header.tail_samples}"
                )
            if r.rows.n and (int(r.rows.topk_ids.max()) >= self.header.vocab_size or int(r.rows.topk_ids.min()) < 0):
                raise ValueError(f"sample {r.sample_id}: a top-k id is outside [0, {self.header.vocab_size})")
        rows = (
            PositionRows.concat([r.rows for r in records], k)
            if records
            else PositionRows.empty(
                k, tuple(self.header.extra_temperatures), self.header.logit_moments, self.header.tail_samples
            )
        )
        h = self.header
        parts, tables = split_shard_parts(
            encode_rows(rows, self.id_codec, self.lp_codec, h.extra_temperatures, h.logit_moments, h.tail_samples),
            self.id_codec,
            self.lp_codec,
        )
        v2 = self.schema_version >= 2

        def fill(scratch: str) -> dict[str, Any]:
            self.backend.write(parts, scratch, tables=tables, checksums=v2)
            pq.write_table(sequence_table(records), os.path.join(scratch, SEQUENCES_FILE), compression="zstd")
            return {
                "sequences": len(records),
                "positions": rows.n,
                "parts": part_specs(parts),
                **({"tables": table_specs(tables), "chunk_checksums": "crc32c"} if v2 else {}),
                "stats": _shard_stats(records, rows),
                "counters": {k: int(v) for k, v in sorted((counters or {}).items())},
                **({"skipped": list(skipped)} if skipped else {}),
            }

        marker = commit_shard(self.loc.child(SHARDS_DIR), index, fill, self.schema_version)
        return marker

    # -- extras --------------------------------------------------------------------------------------------
    def save_tokenizer(self, tokenizer: Any) -> None:
        """Keep a copy of the teacher tokenizer's files (``save_pretrained``) inside the cache, atomically."""
        save_tokenizer_copy(self.loc, tokenizer)

    def has_tokenizer(self) -> bool:
        return self.loc.exists(TOKENIZER_DIR, TOKENIZER_MARKER)

    def finalize(self) -> dict[str, Any]:
        """Merge every shard marker into ``manifest.json`` (written last). Idempotent."""
        done = self.complete_shards()
        expected = self.header.num_shards
        if expected is not None:
            missing = sorted(set(range(expected)) - set(done))
            if not missing:
                self._clean_temporaries()
            if missing:
                shown = ", ".join(str(i) for i in missing[:10]) + (" ..." if len(missing) > 10 else "")
                raise CacheError(
                    f"{self.loc.url}: cannot finalize, {len(missing)} of {expected} shards are not written yet "
                    f"(missing: {shown}); run the remaining shards first"
                )
        markers = [self.loc.read_json(SHARDS_DIR, shard_name(i), SHARD_MARKER) for i in done]
        stats = empty_stats()
        counters: dict[str, int] = {}
        for m in markers:
            stats = merge_stats(stats, m["stats"])
            for key, value in m.get("counters", {}).items():
                counters[key] = counters.get(key, 0) + int(value)
        header = self.header.to_dict()
        header["metadata"].setdefault("runtime", {})
        header["metadata"]["runtime"].setdefault("versions", _versions())
        manifest = {
            "format": FORMAT_NAME,
            "schema_version": self.schema_version,
            "header": header,
            "num_shards": len(done),
            "shards": [
                {k: m[k] for k in ("name", "index", "sequences", "positions", "bytes", "checksum")} for m in markers
            ],
            "stats": stats,
            "counters": dict(sorted(counters.items())),
            "skipped_samples": [s for m in markers for s in m.get("skipped", [])],
            "summary": summarize(stats),
            "has_tokenizer": self.has_tokenizer(),
            "checksums": {
                "header": json_checksum(header),
                HEADER_FILE: bytes_checksum(self.loc.read_bytes(HEADER_FILE)),
                TOKENIZER_DIR: file_checksums(self.loc.child(TOKENIZER_DIR)) if self.has_tokenizer() else None,
            },
            "finalized_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        self.loc.write_json_atomic(manifest, MANIFEST_FILE)
        return manifest


def _manifest_version(loc: Location) -> int:
    """The schema version the manifest records (what a restored ``cache.json`` gets); the newest if unreadable."""
    try:
        version = loc.read_json(MANIFEST_FILE)["schema_version"]
        return version if isinstance(version, int) and 1 <= version <= SCHEMA_VERSION else SCHEMA_VERSION
    except Exception:
        return SCHEMA_VERSION


def intact_manifest_header(loc: Location) -> dict[str, Any] | None:
    """The header copy in ``loc``'s manifest.json if it is readable and passes its recorded checksum, else None.

    A manifest from before header checksums (none recorded) counts as intact: there is nothing to check it by.
    """
    try:
        manifest = loc.read_json(MANIFEST_FILE)
        header = manifest["header"]
        CacheHeader.from_dict(header)
    except Exception:
        return None
    recorded = (manifest.get("checksums") or {}).get("header")
    if recorded is not None and recorded != json_checksum(header):
        return None
    return header


def header_file_damaged(loc: Location) -> bool:
    """Whether ``cache.json``'s bytes disagree with the checksum the manifest recorded (False if none recorded)."""
    try:
        recorded = (loc.read_json(MANIFEST_FILE).get("checksums") or {}).get(HEADER_FILE)
    except Exception:
        return False
    return recorded is not None and bytes_checksum(loc.read_bytes(HEADER_FILE)) != recorded


def header_file_advice(loc: Location, error: Exception | None = None) -> str:
    """What is wrong with a damaged ``cache.json`` and how to restore it (never 'pass --overwrite' if avoidable)."""
    what = f"corrupt ({type(error).__name__}: {error})" if error is not None else "corrupt (content changed)"
    if intact_manifest_header(loc) is not None:
        return (
            f"{what}; the shards have their own checksums and manifest.json holds an intact copy of the header: "
            f"run `logitcache finalize {loc.url}` to restore cache.json from it, then rerun"
        )
    return (
        f"{what}, and no intact copy of the header exists (the cache has no finalized manifest.json); its shards "
        "cannot be trusted to match a rebuilt header: pass --overwrite to start the cache again (deletes them)"
    )


def _shard_stats(records: list[SequenceRecord], rows: PositionRows) -> dict[str, Any]:
    stats = empty_stats()
    stats["sequences"] = len(records)
    stats["positions"] = rows.n
    stats["prompt_tokens"] = int(sum(r.prompt_len for r in records))
    stats["completion_tokens"] = int(sum(len(r.token_ids) - r.prompt_len for r in records))
    reasons: dict[str, int] = {}
    for r in records:
        reasons[r.finish_reason] = reasons.get(r.finish_reason, 0) + 1
    stats["finish_reasons"] = dict(sorted(reasons.items()))
    if rows.n:
        stats["target_in_topk"] = int((rows.topk_ids == rows.target_ids[:, None]).any(axis=1).sum())
        finite = rows.target_logprobs[np.isfinite(rows.target_logprobs)]
        stats["target_logprob_sum"] = float(finite.astype(np.float64).sum())
        hist, _ = np.histogram(rows.tail_mass(), bins=TAIL_BINS)
        stats["tail_hist"] = [int(x) for x in hist]
    return stats


def save_tokenizer_copy(loc: Location, tokenizer: Any) -> None:
    """``tokenizer.save_pretrained`` into ``loc/tokenizer/`` atomically (rename locally; marker last remotely)."""
    with tempfile.TemporaryDirectory(prefix="logitcache-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        if loc.is_local:
            with open(os.path.join(tmp, TOKENIZER_MARKER), "w") as f:
                f.write("complete\n")
            staged = loc.path(f".tmp-{TOKENIZER_DIR}-{uuid.uuid4().hex[:8]}")
            shutil.copytree(tmp, staged)
            if os.path.isdir(loc.path(TOKENIZER_DIR)) and not os.path.exists(loc.path(TOKENIZER_DIR, TOKENIZER_MARKER)):
                loc.rm(TOKENIZER_DIR)  # an unfinished copy (cannot happen with rename, but be safe)
            try:
                os.rename(staged, loc.path(TOKENIZER_DIR))
            except OSError:  # another writer (a job-array task) put its identical copy first: keep it
                shutil.rmtree(staged, ignore_errors=True)
        else:
            dest = loc.child(TOKENIZER_DIR)
            dest.rm()
            upload_dir(tmp, dest)
            dest.fs.pipe_file(dest.path(TOKENIZER_MARKER), b"complete\n")  # last: the copy is whole
