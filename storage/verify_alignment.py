"""Verify alignment stores (``CACHE/alignments/<key>/``): every file against its checksum, every record against the
cache it aligns.

``verify_store(cache, key, level)`` returns one line per problem (empty: sound); ``verify_cache`` runs it for
every store, and ``train`` can run it on the one store it reads. Level ``checksums``: ``store.json`` and
``manifest.json`` readable and of a known schema, the manifest's header checksum, ``store.json`` against the
manifest, the store built from this cache's content, one complete shard per cache shard with its files' checksum
(telling a damaged manifest entry or marker from a corrupt shard), ``vocab_map.parquet`` and the tokenizer copy
against their recorded checksums. Level ``full`` also decodes every record: sample ids in the cache's order; the
student offsets start at 0, never decrease and stay inside the completion; pairs inside both sides' rows, strictly
increasing, each pair's two rows predicting tokens that start at the same byte; chunks tiling both sides' rows up
to the end rows, each chunk's two sides covering the same bytes; end rows where the offsets put them; and the
vocabulary map as long as the teacher's vocabulary with ids in ``[-1, student vocab)``.

The record check restates ``logitcache.pipeline.byte_alignment.check_alignment`` on byte offsets alone (storage
imports nothing of the pipeline), without the token-bytes check that needs the tokenizers: the two must agree on
the row conventions documented there. Stores written before the store manifest recorded ``checksums`` stay
readable: what has no recorded checksum is reported as a note, not a problem.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .alignment_store import ALIGNMENT_FILE, ALIGNMENTS_DIR, SCHEMA, STORE_FILE, VOCAB_MAP_FILE, cache_identity
from .errors import CacheError
from .fs import Location
from .manifest import MANIFEST_FILE, SHARD_MARKER, SHARDS_DIR, TOKENIZER_DIR, TOKENIZER_MARKER, check_schema
from .reader import LogitCache
from .shards import bytes_checksum, check_file_checksums, json_checksum, verify_shard_files


def verify_store(cache: LogitCache, key: str, level: str = "full", notes: list[str] | None = None) -> list[str]:
    """Problems of the alignment store ``key`` of ``cache`` (empty: sound); notes (unchecked parts) go to ``notes``."""
    notes = notes if notes is not None else []
    loc = cache.loc.child(ALIGNMENTS_DIR, key)
    name = f"{ALIGNMENTS_DIR}/{key}"
    problems: list[str] = []
    docs = {}
    for file in (STORE_FILE, MANIFEST_FILE):
        if not loc.exists(file):
            fix = "rerun `logitcache align` to finish it" if file == MANIFEST_FILE else "delete the folder"
            return [f"{name}/{file}: missing (the store is not finalized); {fix}"]
        try:
            docs[file] = loc.read_json(file)
            check_schema(docs[file], f"{name}/{file}")
            if not isinstance(docs[file].get("header"), dict):
                raise CacheError(f"{name}/{file}: missing field 'header'")
        except (ValueError, UnicodeDecodeError) as e:
            return [f"{name}/{file}: not valid JSON ({e}); the file is corrupt: rerun `logitcache align` to rewrite it"]
        except CacheError as e:
            return [str(e)]
    manifest = docs[MANIFEST_FILE]
    for field in ("shards", "stats"):
        if field not in manifest:
            return [f"{name}/{MANIFEST_FILE}: missing field {field!r}; rerun `logitcache align` to rewrite it"]
    header = manifest["header"]
    student = header.get("student", {}).get("spec", "STUDENT")
    fix = f"rerun `logitcache align {cache.loc.url} --student-tokenizer {student}` to rewrite it"
    recorded = manifest.get("checksums") or {}
    if "header" not in recorded:
        notes.append(f"{name}/{MANIFEST_FILE}: no checksums recorded (written by an older logitcache); header, "
                     "store.json, vocab_map.parquet and tokenizer copy checked against nothing")
    elif recorded["header"] != json_checksum(header):
        problems.append(f"{name}/{MANIFEST_FILE}: the header does not match its recorded checksum (edited or "
                        f"damaged); {fix}")
    if docs[STORE_FILE]["header"] != header:
        problems.append(f"{name}/{STORE_FILE}: its header differs from the manifest's (one was edited); {fix}")
    elif recorded.get(STORE_FILE) and recorded[STORE_FILE] != bytes_checksum(loc.read_bytes(STORE_FILE)):
        problems.append(f"{name}/{STORE_FILE}: content does not match its recorded checksum; {fix}")
    if header.get("cache") != cache_identity(cache):
        problems.append(f"{name}: built from different cache content (the cache was rewritten since, or the store's "
                        "record of it was edited); rerun `logitcache align` with --overwrite")
    shards = _check_shards(cache, loc, name, manifest, problems, fix)
    _check_vocab_map(cache, loc, name, manifest, recorded, level, problems, notes, fix)
    _check_tokenizer(loc, name, recorded, problems, notes, fix)
    if level == "full" and shards:
        end_row = bool(header.get("student_end_row", True))
        for index, entry_ok in shards:
            if entry_ok:
                before = len(problems)
                _check_records(cache, loc, name, index, end_row, problems)
                if len(problems) - before > 10:
                    problems[before + 10 :] = [f"{name}: shard {index}: ... {len(problems) - before - 10} more"]
    return problems


def _check_shards(
    cache: LogitCache, loc: Location, name: str, manifest: dict[str, Any], problems: list[str], fix: str
) -> list[tuple[int, bool]]:
    """Checksums of every shard the manifest lists; returns ``(index, files sound)`` per cache shard."""
    try:
        entries = {int(e["index"]): e for e in manifest["shards"]}
    except (KeyError, TypeError, ValueError) as e:
        problems.append(f"{name}/{MANIFEST_FILE}: bad shard entry ({e}); {fix}")
        return []
    expected = [s.index for s in cache.shards]
    missing = sorted(set(expected) - set(entries))
    if missing:
        problems.append(f"{name}/{MANIFEST_FILE}: no entry for cache shards {missing[:10]}; {fix}")
    extra = sorted(set(entries) - set(expected))
    if extra:
        problems.append(f"{name}/{MANIFEST_FILE}: entries for shards {extra[:10]} the cache does not have; {fix}")
    out = []
    for index in expected:
        if index not in entries:
            continue
        entry = entries[index]
        where = f"{name}/{SHARDS_DIR}/{entry.get('name')}"
        shard = loc.child(SHARDS_DIR, str(entry.get("name")))
        try:
            marker = shard.read_json(SHARD_MARKER)
        except FileNotFoundError:
            problems.append(f"{where}: completion marker {SHARD_MARKER} is missing (shard incomplete); {fix}")
            continue
        except (ValueError, UnicodeDecodeError) as e:
            problems.append(f"{where}: completion marker unreadable ({e}); delete the shard, then {fix}")
            continue
        found = verify_shard_files(shard, marker, str(entry.get("checksum")), where, manifest_fix=fix)
        problems += found
        out.append((index, not found))
    return out


def _check_vocab_map(
    cache: LogitCache,
    loc: Location,
    name: str,
    manifest: dict[str, Any],
    recorded: dict[str, Any],
    level: str,
    problems: list[str],
    notes: list[str],
    fix: str,
) -> None:
    where = f"{name}/{VOCAB_MAP_FILE}"
    if not loc.exists(VOCAB_MAP_FILE):
        if manifest.get("vocab_map") or recorded.get(VOCAB_MAP_FILE):
            problems.append(f"{where}: missing, but the manifest records one; {fix}")
        return
    if recorded.get(VOCAB_MAP_FILE):
        if recorded[VOCAB_MAP_FILE] != bytes_checksum(loc.read_bytes(VOCAB_MAP_FILE)):
            problems.append(f"{where}: content does not match its recorded checksum (corrupt); {fix}")
            return
    elif "header" in recorded:
        problems.append(f"{where}: present, but the manifest recorded none; {fix}")
    else:
        notes.append(f"{where}: no checksum recorded (older store); its content is checked only at level full")
    if level != "full":
        return
    try:
        vm = loc.read_parquet(VOCAB_MAP_FILE).column("student_id").to_numpy()
    except Exception as e:
        problems.append(f"{where}: unreadable ({type(e).__name__}: {e}); {fix}")
        return
    vocab = int(manifest["header"].get("student", {}).get("vocab_size") or np.iinfo(np.int32).max)
    if vm.shape[0] != cache.vocab_size:
        problems.append(f"{where}: {vm.shape[0]} rows for a teacher vocabulary of {cache.vocab_size}; {fix}")
    if vm.size and (vm.min() < -1 or vm.max() >= vocab):
        problems.append(f"{where}: student ids outside [-1, {vocab}) (min {vm.min()}, max {vm.max()}); {fix}")


def _check_tokenizer(
    loc: Location, name: str, recorded: dict[str, Any], problems: list[str], notes: list[str], fix: str
) -> None:
    where = f"{name}/{TOKENIZER_DIR}"
    has = loc.exists(TOKENIZER_DIR, TOKENIZER_MARKER)
    expected = recorded.get(TOKENIZER_DIR)
    if expected:
        problems += [f"{p}; {fix}" for p in check_file_checksums(loc.child(TOKENIZER_DIR), expected, where)]
    elif has and "header" in recorded:
        problems.append(f"{where}: present, but the manifest recorded no checksums for it; {fix}")
    elif has:
        notes.append(f"{where}: no checksums recorded (older store)")
    elif loc.exists(TOKENIZER_DIR):
        problems.append(f"{where}: incomplete copy (no {TOKENIZER_MARKER} marker); {fix}")


def _check_records(cache: LogitCache, loc: Location, name: str, index: int, end_row: bool, problems: list[str]) -> None:
    """Decode shard ``index`` of the store and check every record against the cache's sequence of it."""
    shard = loc.child(SHARDS_DIR, cache._info(index).name)
    where = f"{name}/{SHARDS_DIR}/{cache._info(index).name}"
    try:
        table = shard.read_parquet(ALIGNMENT_FILE)
        seqs = cache.sequence_table(index)
    except Exception as e:
        problems.append(f"{where}/{ALIGNMENT_FILE}: unreadable ({type(e).__name__}: {e})")
        return
    if not table.schema.equals(SCHEMA, check_metadata=False):
        problems.append(f"{where}/{ALIGNMENT_FILE}: schema {table.schema} != expected {SCHEMA}")
        return
    sids = seqs.column("sample_id").to_numpy()
    if table.num_rows != seqs.num_rows or not np.array_equal(table.column("sample_id").to_numpy(), sids):
        problems.append(f"{where}: its {table.num_rows} records are not the cache shard's {seqs.num_rows} sequences "
                        "in order")
        return
    rec = {c: table.column(c).to_pylist() for c in table.column_names if c != "student_prompt_text"}
    plens = seqs.column("prompt_len").to_pylist()
    offsets = seqs.column("token_byte_offsets")
    prompts, completions = seqs.column("prompt_text").to_pylist(), seqs.column("completion_text").to_pylist()
    for i, sid in enumerate(sids.tolist()):
        pbytes = len(prompts[i].encode("utf-8"))
        t = np.asarray(offsets[i].values.to_numpy(zero_copy_only=False), np.int64)[plens[i] :] - pbytes
        msg = check_record(
            t, len(completions[i].encode("utf-8")), end_row, len(rec["student_token_ids"][i]),
            rec["student_prompt_len"][i], np.asarray(rec["student_offsets"][i], np.int64),
            np.asarray(rec["pairs"][i], np.int64), np.asarray(rec["chunks"][i], np.int64),
            rec["teacher_end"][i], rec["student_end"][i],
        )  # fmt: skip
        if msg:
            problems.append(f"{where}: sample {sid}: {msg}")


def check_record(
    t: np.ndarray,
    nbytes: int,
    end_row: bool,
    n_student_ids: int,
    student_prompt_len: int,
    s: np.ndarray,
    pairs: np.ndarray,
    chunks: np.ndarray,
    teacher_end: int,
    student_end: int,
) -> str | None:
    """The first broken invariant of one alignment record, or None (conventions: ``pipeline.byte_alignment``).

    ``t``: the teacher completion tokens' byte starts relative to the completion (one per teacher row);
    ``nbytes``: the completion's UTF-8 length; ``s``: the stored student offsets.
    """
    n_s = n_student_ids - student_prompt_len
    if student_prompt_len < 0 or n_s < 0:
        return f"student_prompt_len {student_prompt_len} outside [0, {n_student_ids}]"
    if s.size != n_s:
        return f"{s.size} student offsets for {n_s} student completion tokens"
    for side, offs in (("teacher", t), ("student", s)):
        if offs.size and ((nbytes > 0 and offs[0] != 0) or offs.min() < 0 or offs.max() > nbytes):
            return f"{side} token byte offsets outside [0, {nbytes}] or not starting at 0"
        if offs.size > 1 and (np.diff(offs) < 0).any():
            return f"{side} token byte offsets decrease"
    if end_row:
        s = np.append(s, np.int64(nbytes))
    nt, ns = t.size, s.size
    t_end, s_end = int(np.searchsorted(t, nbytes, "left")), int(np.searchsorted(s, nbytes, "left"))
    want = (t_end if t_end < nt else -1, s_end if s_end < ns else -1)
    if (teacher_end, student_end) != want:
        return f"end rows ({teacher_end}, {student_end}) != ({want[0]}, {want[1]}) implied by the offsets"
    tb, sb = np.append(t, nbytes), np.append(s, nbytes)
    if pairs.size % 2 or chunks.size % 4:
        return f"pairs ({pairs.size} values) or chunks ({chunks.size} values) are not whole [P, 2] / [C, 4] rows"
    p, c = pairs.reshape(-1, 2), chunks.reshape(-1, 4)
    if p.size:
        i, j = p[:, 0], p[:, 1]
        if i.min() < 0 or i.max() >= nt or j.min() < 0 or j.max() >= ns:
            return f"pair index outside teacher rows [0, {nt}) x student rows [0, {ns}) (max {i.max()}, {j.max()})"
        if (np.diff(i) <= 0).any() or (np.diff(j) <= 0).any():
            return "pairs are not strictly increasing on both sides"
        bad = np.flatnonzero(tb[i] != sb[j])
        if bad.size:
            k = int(bad[0])
            return f"pair {k} ({i[k]}, {j[k]}) joins tokens starting at bytes {tb[i[k]]} and {sb[j[k]]}"
        inner = tb[i] < nbytes
        if (tb[i[inner] + 1] == tb[i[inner]]).any() or (sb[j[inner] + 1] == sb[j[inner]]).any():
            return "a pair does not use the last row whose token starts at its byte"
    both_end = teacher_end >= 0 and student_end >= 0
    has_end_pair = bool(p.size) and (int(p[-1, 0]), int(p[-1, 1])) == (teacher_end, student_end) and both_end
    if has_end_pair != both_end:
        return "the end pair (both end rows) is not the last pair exactly when both sides have an end row"
    if p.shape[0] - int(both_end) != c.shape[0]:
        return f"{p.shape[0] - int(both_end)} non-end pairs but {c.shape[0]} chunks (one per shared boundary)"
    if not c.size:
        if nbytes > 0 or t_end or s_end:
            return f"no chunk for a {nbytes}-byte completion with {t_end} teacher and {s_end} student rows"
        return None
    ts, te, ss, se = c[:, 0], c[:, 1], c[:, 2], c[:, 3]
    if min(ts.min(), ss.min()) < 0 or max(ts.max(), te.max()) > nt or max(ss.max(), se.max()) > ns:
        return f"chunk rows outside teacher [0, {nt}] x student [0, {ns}]"
    if ts[0] != 0 or ss[0] != 0 or te[-1] != t_end or se[-1] != s_end:
        return f"chunks do not cover rows [0, {t_end}) x [0, {s_end}) (first {c[0].tolist()}, last {c[-1].tolist()})"
    if (te <= ts).any() or (se <= ss).any() or (ts[1:] != te[:-1]).any() or (ss[1:] != se[:-1]).any():
        return "chunks are not contiguous, non-empty, increasing row ranges"
    bad = np.flatnonzero((tb[ts] != sb[ss]) | (tb[te] != sb[se]))
    if bad.size:
        k = int(bad[0])
        return (f"chunk {k} {c[k].tolist()} covers teacher bytes [{tb[ts[k]]}, {tb[te[k]]}) but student bytes "
                f"[{sb[ss[k]]}, {sb[se[k]]})")
    if tb[te[-1]] != nbytes or (tb[ts[1:] - 1] >= tb[ts[1:]]).any() or (sb[ss[1:] - 1] >= sb[ss[1:]]).any():
        return "a chunk does not start at the first row of its boundary byte, or the chunks stop before the end"
    return None
