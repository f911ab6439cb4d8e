"""``logitcache convert``: rewrite a finalized cache with other codecs, another position backend, or a smaller K.

The output is an ordinary cache written by ``CacheWriter``: shard by shard, each shard atomic (temporary folder
renamed into place, or marker last on object stores), ``manifest.json`` last. A rerun with the same arguments
resumes: complete output shards are skipped, the rest rewritten; a rerun with other arguments into the same folder
is refused unless ``overwrite``. New output is format v2 (``schema_version`` 2).

What changes: ``top_k`` (cut to the first K of each row: rows are sorted by descending logprob, so that is the
top-K; the tail mass grows accordingly, ``target_logprob`` stays exact), the id and logprob codecs, the position
backend. Tail draws (``tail_samples``) are kept, unless ``drop_tail`` or a cut K drops them: they were drawn
from outside the source's top-K, so they say nothing of the ranks a cut K moves into the tail (an estimator
over them would be biased). What does not: the sequences, targets, row statistics, the tokenizer copy and every
capture field. The resolved conversion is recorded in the output header (``metadata.convert``: the source's
URL, header checksum, and the settings), so ``cache.json`` says where the cache came from; the capture config stays in
``metadata.config``. Re-coding is only as exact as the source: an fp16 source converted to fp32 holds fp16
values. Alignment stores are not carried over: they are tied to the source's shard checksums; run ``align``
on the output.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

from .codecs import id_codec_from_config, logprob_codec_from_config
from .errors import CacheError
from .fs import Location
from .manifest import SHARD_MARKER, SHARDS_DIR, TOKENIZER_DIR, TOKENIZER_MARKER, shard_name
from .reader import LogitCache
from .records import SequenceRecord
from .writer import CacheWriter, save_tokenizer_copy


class _TokenizerFiles:
    """Adapter so ``save_tokenizer_copy`` copies another cache's tokenizer folder (it calls ``save_pretrained``)."""

    def __init__(self, folder: Location) -> None:
        self.folder = folder

    def save_pretrained(self, target: str) -> None:
        for rel in self.folder.files():
            if rel == TOKENIZER_MARKER:
                continue
            os.makedirs(os.path.dirname(os.path.join(target, rel)) or target, exist_ok=True)
            self.folder.fs.get_file(self.folder.path(rel), os.path.join(target, rel))


def cut_record(record: SequenceRecord, k: int, drop_tail: bool = False) -> SequenceRecord:
    """``record`` with its rows cut to the first ``k`` (the top-k: rows are sorted by descending logprob), without
    tail draws when ``drop_tail``."""
    rows = record.rows
    if rows.k == k and not (drop_tail and rows.tail_ids is not None):
        return record
    cut = dataclasses.replace(rows, topk_ids=rows.topk_ids[:, :k], topk_logprobs=rows.topk_logprobs[:, :k])
    if drop_tail:
        cut = dataclasses.replace(cut, tail_ids=None, tail_logprobs=None)
    return dataclasses.replace(record, rows=cut)


def convert_cache(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    id_codec: dict[str, Any] | None = None,
    logprob_codec: dict[str, Any] | None = None,
    top_k: int | None = None,
    positions: dict[str, Any] | None = None,
    overwrite: bool = False,
    drop_tail: bool = False,
    storage_options: dict[str, Any] | None = None,
    on_shard: Callable[[int, str], None] | None = None,
) -> dict[str, Any]:
    """Write ``source`` re-coded into ``out`` (see the module docstring); returns the output manifest.

    ``None`` keeps the source's setting; ``drop_tail`` leaves the tail draws out (a cut K always does).
    ``on_shard(index, "written" | "skipped")`` reports progress.
    Raises ``ValueError`` for settings that cannot apply (a larger K, an unknown codec, the same folder).
    """
    src = LogitCache.open(source, storage_options)
    dst = Location.parse(out, storage_options)
    if dst.url.rstrip("/") == src.loc.url.rstrip("/"):
        raise ValueError(f"convert: OUT is the source cache ({src.loc.url}); choose another folder")
    h = src.header
    k = h.top_k if top_k is None else int(top_k)
    if not 1 <= k <= h.top_k:
        raise ValueError(f"--top-k {k}: must be in [1, {h.top_k}] (the source cache stores the top {h.top_k})")
    ids = dict(id_codec) if id_codec is not None else dict(h.id_codec)
    lps = dict(logprob_codec) if logprob_codec is not None else dict(h.logprob_codec)
    id_codec_from_config(ids)  # unknown names fail here, before anything is written
    logprob_codec_from_config(lps)
    tail = 0 if drop_tail or k < h.top_k else h.tail_samples
    settings = {"top_k": k, "id_codec": ids, "logprob_codec": lps, "positions": dict(positions or h.positions)}
    if h.tail_samples:
        settings["tail_samples"] = tail
    metadata = {key: v for key, v in h.metadata.items() if key != "runtime"}
    metadata["convert"] = {
        "source": src.loc.url,
        "source_header_checksum": (src.manifest.get("checksums") or {}).get("header"),
        "source_schema_version": src.schema_version,
        **settings,
    }
    header = dataclasses.replace(
        h, top_k=k, id_codec=ids, logprob_codec=lps, positions=settings["positions"], tail_samples=tail,
        metadata=metadata,
    )
    writer = CacheWriter(dst.url, header, overwrite=overwrite, storage_options=storage_options)
    done = set(writer.complete_shards())
    for info in src.shards:
        if info.index in done:
            if on_shard:
                on_shard(info.index, "skipped")
            continue
        marker = src.shard_location(info.index).read_json(SHARD_MARKER)
        records = [cut_record(r, k, drop_tail=tail != h.tail_samples) for r in src.iter_shard(info.index)]
        writer.write_shard(info.index, records, counters=marker.get("counters"), skipped=marker.get("skipped"))
        if on_shard:
            on_shard(info.index, "written")
    if src.has_tokenizer() and not writer.has_tokenizer():
        save_tokenizer_copy(writer.loc, _TokenizerFiles(src.loc.child(TOKENIZER_DIR)))
    if h.num_shards is None:  # open-ended source: shards the output has but the source does not are stale
        keep = {info.index for info in src.shards}
        for index in set(writer.complete_shards()) - keep:
            writer.loc.rm(SHARDS_DIR, shard_name(index))
    try:
        return writer.finalize()
    except CacheError as e:  # pragma: no cover - every source shard was written above
        raise CacheError(f"convert: {e}") from e

