"""``verify`` (is every byte of the cache sound?) and ``describe`` (what is in it?), as library functions.

``verify_cache`` returns a list of problems, one line each, naming the shard/file/field; an empty list means
sound. It never stops at the first problem of a shard kind it can still check past, and it streams position
arrays in blocks, so it runs in bounded memory on any cache size. Checks: manifest schema and version; each
shard's marker, file sizes and sha256 checksum; sequence-table schema; row ranges contiguous and consistent with
token counts (``row_count == len(token_ids) - prompt_len``); byte offsets non-decreasing and inside the text;
position array lengths and dtypes; ids in ``[0, vocab)``; logprobs ``<= 0``, not NaN, sorted descending per row;
tail draws (``tail_samples``) in range, outside their row's top-K, logprobs ``<= 0``; sample ids unique across shards.

Beyond the shards: the manifest header against its recorded checksum (an edited ``vocab_size`` would otherwise
go unnoticed), ``cache.json`` readable, identical in identity to the manifest's header and matching its recorded
checksum, the ``tokenizer/`` copy's files against theirs; at level ``full``, the teacher token ids of every
sequence in ``[0, vocab)`` and its prompt tokens starting inside the prompt's bytes, completion tokens inside the
completion's. Every alignment store is verified too (``storage.verify_alignment``). A checksum that an older
writer did not record is a *note* (appended to ``notes`` when given), never a problem.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .alignment_store import ALIGNMENTS_DIR, describe_stores
from .errors import CacheError
from .layout import SEQUENCE_SCHEMA
from .manifest import (
    HEADER_FILE,
    MANIFEST_FILE,
    SHARD_MARKER,
    TOKENIZER_DIR,
    TOKENIZER_MARKER,
    CacheHeader,
    check_schema,
    summarize,
)
from .reader import LogitCache
from .shards import bytes_checksum, check_file_checksums, json_checksum, verify_shard_files
from .verify_alignment import verify_store


def verify_cache(
    url: str | os.PathLike[str],
    storage_options: dict[str, Any] | None = None,
    block_rows: int = 65536,
    level: str = "full",
    notes: list[str] | None = None,
    stores: bool = True,
) -> list[str]:
    """Problems found in the cache at ``url`` (empty: sound).

    ``level``: ``checksums`` checks manifest, markers, file sizes and checksums only (reads every byte once,
    decodes nothing: what ``train`` runs before a long job); ``full`` also checks tables and row contents.
    ``notes`` collects what could not be checked (checksums an older writer did not record); ``stores=False``
    skips the alignment stores (``verify_store`` checks one).
    """
    notes = notes if notes is not None else []
    try:
        cache = LogitCache.open(url, storage_options)
    except CacheError as e:
        return [str(e)]
    problems: list[str] = []
    _verify_metadata(cache, problems, notes)
    seen: dict[int, str] = {}
    for info in cache.shards:
        before = len(problems)
        _verify_shard(cache, info.index, problems, seen, block_rows, level)
        if len(problems) - before > 20:
            problems[before + 20 :] = [f"{info.name}: ... {len(problems) - before - 20} more problems"]
    total = sum(s.positions for s in cache.shards)
    if cache.manifest["stats"].get("positions") != total:
        problems.append(
            f"manifest.json: stats.positions {cache.manifest['stats'].get('positions')} != "
            f"sum of shard positions {total}"
        )
    if stores:
        for key in cache.loc.listdir(ALIGNMENTS_DIR):
            if not key.startswith(".tmp-"):
                problems += verify_store(cache, key, level, notes)
    return problems


def _verify_metadata(cache: LogitCache, problems: list[str], notes: list[str]) -> None:
    """The manifest header, ``cache.json`` and the tokenizer copy against the checksums recorded at finalize."""
    from .writer import header_file_advice

    m, loc = cache.manifest, cache.loc
    recorded = m.get("checksums") or {}
    fix = f"run `logitcache finalize {loc.url}` to rewrite the manifest from cache.json and the shard markers"
    if "header" not in recorded:
        notes.append(f"{MANIFEST_FILE}: no header checksum recorded (finalized by an older logitcache); "
                     f"{fix} to add one")
    elif recorded["header"] != json_checksum(m["header"]):
        problems.append(f"{MANIFEST_FILE}: the header (top_k, vocab_size, codecs, ...) does not match its recorded "
                        f"checksum: it was edited or damaged; {fix}")
    try:
        doc = loc.read_json(HEADER_FILE)
        check_schema(doc, HEADER_FILE)
        header = CacheHeader.from_dict(doc["header"], HEADER_FILE)
    except FileNotFoundError as e:
        problems.append(f"{HEADER_FILE}: {header_file_advice(loc, e)}")
        header = None
    except (ValueError, UnicodeDecodeError, KeyError, TypeError, CacheError) as e:
        problems.append(f"{HEADER_FILE}: {header_file_advice(loc, e)}")
        header = None
    if header is not None:
        if header.identity() != cache.header.identity():
            diffs = "; ".join(header.differences(cache.header)[:3])
            problems.append(f"{HEADER_FILE}: its header differs from manifest.json's ({diffs}): one was edited")
        elif recorded.get(HEADER_FILE) and recorded[HEADER_FILE] != bytes_checksum(loc.read_bytes(HEADER_FILE)):
            problems.append(f"{HEADER_FILE}: {header_file_advice(loc)}")
    if not recorded.get(HEADER_FILE):
        notes.append(f"{HEADER_FILE}: no checksum recorded; compared with the manifest's header only")
    has = cache.has_tokenizer()
    expected = recorded.get(TOKENIZER_DIR)
    if m.get("has_tokenizer") and not has:
        problems.append(f"{TOKENIZER_DIR}/: the manifest says the cache holds a tokenizer copy, but it has no "
                        f"{TOKENIZER_MARKER} marker (deleted or incomplete)")
    if expected:
        tok_fix = "copy the teacher's tokenizer files back (save_pretrained) or rerun `logitcache generate`"
        problems += [f"{p}; {tok_fix}" for p in check_file_checksums(loc.child(TOKENIZER_DIR), expected, TOKENIZER_DIR)]
    elif has and "header" in recorded:
        problems.append(f"{TOKENIZER_DIR}/: present, but the manifest recorded no checksums for it; {fix}")
    elif has:
        notes.append(f"{TOKENIZER_DIR}/: no checksums recorded (finalized by an older logitcache)")


def _verify_shard(
    cache: LogitCache, index: int, problems: list[str], seen: dict[int, str], block_rows: int, level: str = "full"
) -> None:
    info = cache._info(index)
    loc = cache.shard_location(index)
    where = info.name
    try:
        marker = loc.read_json(SHARD_MARKER)
    except FileNotFoundError:
        problems.append(f"{where}: completion marker {SHARD_MARKER} is missing (shard incomplete)")
        return
    except ValueError as e:
        problems.append(f"{where}: completion marker unreadable ({e})")
        return
    fix = f"run `logitcache finalize {cache.loc.url}` to rewrite it from the shard markers"
    file_problems = verify_shard_files(loc, marker, info.checksum, where, manifest_fix=fix)
    if file_problems and marker.get("chunk_checksums"):  # format v2: say which coded chunks the damage hit
        file_problems += locate_damaged_chunks(cache, index)
    if file_problems or level == "checksums":
        problems += file_problems
        return
    try:
        table = cache.sequence_table(index)
    except CacheError as e:
        problems.append(str(e))
        return
    if not table.schema.equals(SEQUENCE_SCHEMA, check_metadata=False):
        problems.append(f"{where}/sequences.parquet: schema {table.schema} != expected {SEQUENCE_SCHEMA}")
        return
    if table.num_rows != info.sequences:
        problems.append(f"{where}: {table.num_rows} sequences in the table, manifest says {info.sequences}")
    starts = table.column("row_start").to_numpy()
    counts = table.column("row_count").to_numpy()
    plens = table.column("prompt_len").to_numpy()
    ntok = _list_lengths(table, "token_ids")
    noff = _list_lengths(table, "token_byte_offsets")
    sids = table.column("sample_id").to_numpy()
    expected_starts = np.concatenate([[0], np.cumsum(counts)[:-1]]) if len(counts) else counts
    if not np.array_equal(starts, expected_starts):
        i = int(np.argmax(starts != expected_starts))
        problems.append(
            f"{where}: sample {sids[i]}: row_start {starts[i]} != {expected_starts[i]} (row ranges not contiguous)"
        )
    bad = np.nonzero(counts != ntok - plens)[0]
    for i in bad[:5]:
        problems.append(
            f"{where}: sample {sids[i]}: row_count {counts[i]} != len(token_ids) - prompt_len = {ntok[i] - plens[i]}"
        )
    bad = np.nonzero(noff != ntok)[0]
    for i in bad[:5]:
        problems.append(f"{where}: sample {sids[i]}: {noff[i]} byte offsets for {ntok[i]} tokens")
    for i in range(table.num_rows):
        sid = int(sids[i])
        if sid in seen:
            problems.append(f"{where}: sample id {sid} also appears in {seen[sid]}")
        seen[sid] = where
    _check_offsets(table, where, problems)
    _check_token_ids(table, cache.vocab_size, where, problems)
    if int(counts.sum()) != info.positions:
        problems.append(f"{where}: sequence table covers {int(counts.sum())} positions, manifest says {info.positions}")
    try:
        reader = cache.position_reader(index)
    except CacheError as e:
        problems.append(str(e))
        return
    if reader.n != info.positions:
        problems.append(f"{where}: position arrays have {reader.n} rows, manifest says {info.positions}")
        return
    vocab = cache.vocab_size
    for start in range(0, info.positions, block_rows):
        stop = min(info.positions, start + block_rows)
        try:
            rows = cache.read_rows(index, start, stop)
        except (CacheError, ValueError) as e:
            problems.append(f"{where}: rows {start}:{stop}: {e}")
            problems += locate_damaged_chunks(cache, index)
            return
        _check_rows(rows, vocab, f"{where} rows {start}:{stop}", problems)


def locate_damaged_chunks(cache: LogitCache, index: int, limit: int = 10) -> list[str]:
    """One line per coded chunk of shard ``index`` that fails to decode, naming its part (the stored field) and
    chunk: ``shard-000003: part topk_ids.ranks, chunk 5 (rows 20480:24576): ...``. Format v2 chunks carry a
    checksum (crc32c in Zarr, page CRCs in Parquet), so a damaged one fails here instead of decoding into
    garbage; v1 chunks are found only when the damage breaks their compression."""
    where = cache._info(index).name
    try:
        reader = cache.position_reader(index)
    except CacheError as e:
        return [f"{where}: position arrays cannot be opened ({e})"]
    out: list[str] = []
    for name in cache.table_specs(index):
        try:
            reader.read_tables([name])
        except (CacheError, ValueError) as e:
            out.append(f"{where}: shard-level part {name} cannot be decoded ({_short(e)})")
    step = max(1, reader.chunk_rows)
    for name in cache.part_specs(index):
        for c, start in enumerate(range(0, reader.n, step)):
            stop = min(reader.n, start + step)
            try:
                reader.read([name], start, stop)
            except (CacheError, ValueError) as e:
                out.append(f"{where}: part {name}, chunk {c} (rows {start}:{stop}) cannot be decoded ({_short(e)})")
                if len(out) >= limit:
                    return [*out, f"{where}: ... (stopped after {limit} damaged chunks)"]
    return out


def _short(e: Exception) -> str:
    text = str(e)
    return text if len(text) < 160 else text[:157] + "..."


def _list_lengths(table: Any, name: str) -> np.ndarray:
    import pyarrow.compute as pc

    return np.asarray(pc.list_value_length(table.column(name)).to_numpy(zero_copy_only=False), dtype=np.int64)


def _check_offsets(table: Any, where: str, problems: list[str]) -> None:
    """Byte offsets non-decreasing inside the text; prompt tokens start in the prompt, completion tokens after it."""
    offsets = table.column("token_byte_offsets")
    prompts, completions = table.column("prompt_text").to_pylist(), table.column("completion_text").to_pylist()
    plens, sids = table.column("prompt_len").to_pylist(), table.column("sample_id").to_pylist()
    for i in range(table.num_rows):
        off = np.asarray(offsets[i].values.to_numpy(zero_copy_only=False))
        if off.size == 0:
            continue
        prompt_len = len(prompts[i].encode())
        text_len = prompt_len + len(completions[i].encode())
        if (np.diff(off) < 0).any() or off[0] < 0 or off[-1] > text_len:
            problems.append(f"{where}: sample {sids[i]}: token byte offsets not non-decreasing within [0, {text_len}]")
        elif (off[: plens[i]] > prompt_len).any() or (off[plens[i] :] < prompt_len).any():
            problems.append(
                f"{where}: sample {sids[i]}: token byte offsets do not split at the prompt's end (byte {prompt_len}, "
                f"token {plens[i]})"
            )


def _check_token_ids(table: Any, vocab: int, where: str, problems: list[str]) -> None:
    ids = np.asarray(table.column("token_ids").combine_chunks().values.to_numpy(zero_copy_only=False))
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        problems.append(f"{where}: token_ids outside [0, {vocab}) (min {ids.min()}, max {ids.max()})")


def _check_rows(rows: Any, vocab: int, where: str, problems: list[str]) -> None:
    ids, lps = rows.topk_ids, rows.topk_logprobs
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        problems.append(f"{where}: top-k id outside [0, {vocab}) (min {ids.min()}, max {ids.max()})")
    if rows.n and (rows.target_ids.min() < 0 or rows.target_ids.max() >= vocab):
        problems.append(f"{where}: target id outside [0, {vocab})")
    if np.isnan(lps).any() or np.isnan(rows.target_logprobs).any():
        problems.append(f"{where}: NaN logprobs")
    if (lps > 0).any() or (rows.target_logprobs > 0).any():
        problems.append(
            f"{where}: positive logprobs (max {max(lps.max(initial=0), rows.target_logprobs.max(initial=0))})"
        )
    if lps.shape[1] > 1:
        unsorted = (np.diff(lps, axis=1) > 0).any(axis=1)
        if unsorted.any():
            problems.append(
                f"{where}: {int(unsorted.sum())} rows not sorted by descending logprob (first: row "
                f"{int(np.argmax(unsorted))})"
            )
    tail = rows.tail_problem(vocab)
    if tail is not None:
        problems.append(f"{where}: row {tail[0]}: {tail[1]}")


def describe_cache(cache: LogitCache) -> dict[str, Any]:
    """Everything ``logitcache inspect`` shows, as a JSON-serializable dict."""
    m = cache.manifest
    meta = cache.header.metadata
    total_bytes = sum(s.bytes for s in cache.shards)
    positions = cache.num_positions
    return {
        "path": cache.loc.url,
        "schema_version": m["schema_version"],
        "teacher": meta.get("teacher", {}),
        "capture": meta.get("capture", {}),
        "top_k": cache.top_k,
        "vocab_size": cache.vocab_size,
        "extra_temperatures": cache.header.extra_temperatures,
        # row statistics recorded per position, exact over the full vocabulary (docs/format.md); none in v1 caches
        "row_statistics": [f"lse@{t:g}" for t in cache.header.extra_temperatures]
        + (["logit_mean", "logit_std"] if cache.header.logit_moments else []),
        "tail_samples": cache.header.tail_samples,  # tail draws per position (0: none; docs/format.md)
        "codecs": {"ids": cache.header.id_codec, "logprobs": cache.header.logprob_codec},
        "positions_backend": cache.header.positions,
        "shards": len(cache.shards),
        "sequences": cache.num_sequences,
        "positions": positions,
        "bytes": total_bytes,
        "bytes_per_position": total_bytes / positions if positions else None,
        "summary": summarize(m["stats"]),
        "per_shard": [
            {
                "name": s.name,
                "sequences": s.sequences,
                "positions": s.positions,
                "bytes": s.bytes,
                "bytes_per_position": s.bytes / s.positions if s.positions else None,
            }
            for s in cache.shards
        ],
        "finalized_at": m.get("finalized_at"),
        "has_tokenizer": cache.has_tokenizer(),
        "counters": m.get("counters", {}),
        "alignments": describe_stores(cache),
    }
