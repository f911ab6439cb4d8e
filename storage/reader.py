"""Read a finalized cache: random access by sample id, sequential iteration, local paths and fsspec URLs.

``LogitCache.open`` reads only ``manifest.json``; sequence tables and position arrays are opened lazily per
shard and kept in a small LRU, so random access costs one chunk read and sequential iteration streams each
shard in large row blocks (the fast path: ``iter_rows``). The sample-id index is built on first use from the
``sample_id`` column of every sequence table (a projection read, a few bytes per sequence).
"""

from __future__ import annotations

import os
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from .backends import PositionReader, make_backend
from .codecs import id_codec_from_config, logprob_codec_from_config
from .errors import CacheIncompleteError, CacheNotFoundError, CorruptCacheError
from .fs import Location
from .layout import decode_rows, record_from_table
from .manifest import (
    HEADER_FILE,
    MANIFEST_FILE,
    SEQUENCES_FILE,
    SHARD_MARKER,
    SHARDS_DIR,
    TOKENIZER_DIR,
    TOKENIZER_MARKER,
    CacheHeader,
    check_schema,
)
from .records import PositionRows, SequenceRecord


@dataclass(frozen=True)
class ShardInfo:
    name: str
    index: int
    sequences: int
    positions: int
    bytes: int
    checksum: str


def read_manifest(loc: Location) -> dict[str, Any]:
    """Load and validate ``manifest.json`` with a clear error for every way it can be missing or wrong."""
    if not loc.exists():
        bucket = loc.root.split("/", 1)[0]
        if not loc.is_local and bucket != loc.root and not loc.fs.exists(bucket):
            raise CacheNotFoundError(
                f"{loc.url}: bucket {bucket!r} does not exist (or these credentials cannot see it); check the URL"
            )
        raise CacheNotFoundError(f"{loc.url}: no such cache folder")
    if not loc.exists(MANIFEST_FILE):
        if loc.exists(HEADER_FILE):
            raise CacheIncompleteError(
                f"{loc.url}: cache is not finalized (no manifest.json); a writer is running or was interrupted: "
                "rerun the same command to resume, then `logitcache finalize`"
            )
        raise CacheNotFoundError(f"{loc.url}: not a logitcache cache (no manifest.json)")
    source = loc.url_of(MANIFEST_FILE)
    try:
        doc = loc.read_json(MANIFEST_FILE)
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptCacheError(f"{source}: not valid JSON ({e}); the manifest is corrupt") from e
    check_schema(doc, source)
    for key in ("header", "shards", "stats"):
        if key not in doc:
            raise CorruptCacheError(f"{source}: missing field {key!r}")
    return doc


class LogitCache:
    """A finalized cache. Use ``LogitCache.open(url)``."""

    def __init__(self, loc: Location, manifest: dict[str, Any], max_open_shards: int = 8) -> None:
        self.loc = loc
        self.manifest = manifest
        self.header = CacheHeader.from_dict(manifest["header"], loc.url_of(MANIFEST_FILE))
        self.id_codec = id_codec_from_config(self.header.id_codec)
        self.lp_codec = logprob_codec_from_config(self.header.logprob_codec)
        opts = {k: v for k, v in self.header.positions.items() if k != "name"}
        self.backend = make_backend(self.header.positions.get("name", "zarr"), **opts)
        try:
            self.shards = [ShardInfo(**{f: s[f] for f in ShardInfo.__dataclass_fields__}) for s in manifest["shards"]]
        except (KeyError, TypeError) as e:
            raise CorruptCacheError(f"{loc.url_of(MANIFEST_FILE)}: bad shard entry ({e})") from e
        self._by_index = {s.index: s for s in self.shards}
        self._tables: OrderedDict[int, pa.Table] = OrderedDict()
        self._readers: OrderedDict[int, PositionReader] = OrderedDict()
        self._parts: dict[int, dict[str, dict[str, Any]]] = {}
        self._table_specs: dict[int, dict[str, dict[str, Any]]] = {}
        self._tables_data: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self._max_open = max_open_shards
        self._index: dict[int, tuple[int, int]] | None = None

    @staticmethod
    def open(url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> LogitCache:
        loc = Location.parse(url, storage_options)
        return LogitCache(loc, read_manifest(loc))

    # -- facts -----------------------------------------------------------------------------------------------
    @property
    def top_k(self) -> int:
        return self.header.top_k

    @property
    def vocab_size(self) -> int:
        return self.header.vocab_size

    @property
    def num_sequences(self) -> int:
        return sum(s.sequences for s in self.shards)

    @property
    def num_positions(self) -> int:
        return sum(s.positions for s in self.shards)

    def __len__(self) -> int:
        return self.num_sequences

    # -- shard access ----------------------------------------------------------------------------------------
    def shard_location(self, index: int) -> Location:
        return self.loc.child(SHARDS_DIR, self._info(index).name)

    def _info(self, index: int) -> ShardInfo:
        try:
            return self._by_index[index]
        except KeyError:
            raise IndexError(f"{self.loc.url}: no shard {index}") from None

    def sequence_table(self, index: int) -> pa.Table:
        if index in self._tables:
            self._tables.move_to_end(index)
            return self._tables[index]
        loc = self.shard_location(index)
        try:
            table = loc.read_parquet(SEQUENCES_FILE)
        except FileNotFoundError as e:
            raise CorruptCacheError(f"{loc.url_of(SEQUENCES_FILE)}: missing") from e
        except Exception as e:
            raise CorruptCacheError(f"{loc.url_of(SEQUENCES_FILE)}: unreadable ({type(e).__name__}: {e})") from e
        self._tables[index] = table
        if len(self._tables) > self._max_open:
            self._tables.popitem(last=False)
        return table

    @property
    def schema_version(self) -> int:
        return int(self.manifest["schema_version"])

    def table_specs(self, index: int) -> dict[str, dict[str, Any]]:
        """Shard-level parts of shard ``index`` (format v2 codecs' dictionaries; empty for v1 shards)."""
        self.part_specs(index)
        return self._table_specs[index]

    def shard_tables(self, index: int) -> dict[str, np.ndarray]:
        """The shard-level parts of shard ``index``, read once and kept with the open shard."""
        if index in self._tables_data:
            self._tables_data.move_to_end(index)
            return self._tables_data[index]
        specs = self.table_specs(index)
        data = self.position_reader(index).read_tables(list(specs)) if specs else {}
        for name, a in data.items():
            if a.shape != (specs[name]["length"],):
                raise CorruptCacheError(
                    f"{self.shard_location(index).url}: shard-level part {name!r} has shape {a.shape}, the marker "
                    f"says ({specs[name]['length']},)"
                )
        self._tables_data[index] = data
        if len(self._tables_data) > self._max_open:
            self._tables_data.popitem(last=False)
        return data

    def part_specs(self, index: int) -> dict[str, dict[str, Any]]:
        if index not in self._parts:
            loc = self.shard_location(index)
            try:
                marker = loc.read_json(SHARD_MARKER)
                self._parts[index] = marker["parts"]
                self._table_specs[index] = marker.get("tables", {})
            except FileNotFoundError as e:
                raise CorruptCacheError(f"{loc.url_of(SHARD_MARKER)}: missing (shard incomplete)") from e
            except (ValueError, KeyError) as e:
                raise CorruptCacheError(f"{loc.url_of(SHARD_MARKER)}: unreadable ({e})") from e
        return self._parts[index]

    def position_reader(self, index: int) -> PositionReader:
        if index in self._readers:
            self._readers.move_to_end(index)
            return self._readers[index]
        reader = self.backend.open(self.shard_location(index), self.part_specs(index), self.table_specs(index))
        self._readers[index] = reader
        if len(self._readers) > self._max_open:
            self._readers.popitem(last=False)
        return reader

    def read_rows(self, index: int, start: int, stop: int) -> PositionRows:
        """Decoded rows ``[start, stop)`` of shard ``index``'s position arrays."""
        reader = self.position_reader(index)
        parts = reader.read(list(self.part_specs(index)), start, stop)
        tables = self.shard_tables(index)
        if tables:
            parts = {**parts, **tables}
        h = self.header
        return decode_rows(
            parts, self.id_codec, self.lp_codec, h.extra_temperatures, self.top_k, h.logit_moments, h.tail_samples
        )

    def iter_rows(self, index: int, block_rows: int = 65536) -> Iterator[PositionRows]:
        """Stream shard ``index``'s rows in blocks (the sequential fast path)."""
        n = self._info(index).positions
        for start in range(0, n, block_rows):
            yield self.read_rows(index, start, min(n, start + block_rows))

    # -- sequences -------------------------------------------------------------------------------------------
    def _build_index(self) -> dict[int, tuple[int, int]]:
        index: dict[int, tuple[int, int]] = {}
        for s in self.shards:
            loc = self.shard_location(s.index)
            ids = loc.read_parquet(SEQUENCES_FILE, columns=["sample_id"]).column("sample_id").to_numpy()
            for i, sid in enumerate(ids.tolist()):
                if sid in index:
                    raise CorruptCacheError(f"{self.loc.url}: sample id {sid} appears in two shards")
                index[sid] = (s.index, i)
        return index

    def sample_ids(self) -> np.ndarray:
        if self._index is None:
            self._index = self._build_index()
        return np.fromiter(self._index.keys(), dtype=np.int64, count=len(self._index))

    def locate(self, sample_id: int) -> tuple[int, int]:
        """``(shard index, row in its sequence table)`` of a sample id."""
        if self._index is None:
            self._index = self._build_index()
        try:
            return self._index[int(sample_id)]
        except KeyError:
            raise KeyError(f"{self.loc.url}: no sample with id {sample_id}") from None

    def get(self, sample_id: int) -> SequenceRecord:
        """The full record of one sample (random access: reads one sequence-table row and its rows)."""
        shard, i = self.locate(sample_id)
        table = self.sequence_table(shard)
        start = int(table.column("row_start")[i].as_py())
        count = int(table.column("row_count")[i].as_py())
        return record_from_table(table, i, self.read_rows(shard, start, start + count))

    def iter_shard(
        self,
        index: int,
        block_rows: int = 65536,
        on_block: Callable[[PositionRows, int], None] | None = None,
    ) -> Iterator[SequenceRecord]:
        """Every sequence of one shard in stored order, reading position arrays in large blocks.

        ``on_block(block, first_row)`` sees each block as it is read, before any of its records is yielded (the
        training loader checks rows there, once per block instead of once per sequence).
        """
        table = self.sequence_table(index)
        starts = table.column("row_start").to_numpy()
        counts = table.column("row_count").to_numpy()
        block: PositionRows | None = None
        block_start = 0
        for i in range(table.num_rows):
            s, c = int(starts[i]), int(counts[i])
            if block is None or s + c > block_start + block.n:
                block_start = s
                block = self.read_rows(index, s, max(s + c, min(s + block_rows, self._info(index).positions)))
                if on_block is not None:
                    on_block(block, s)
            yield record_from_table(table, i, block.slice(s - block_start, s - block_start + c))

    def iter_sequences(self, shards: list[int] | None = None) -> Iterator[SequenceRecord]:
        for index in shards if shards is not None else [s.index for s in self.shards]:
            yield from self.iter_shard(index)

    # -- extras ----------------------------------------------------------------------------------------------
    def has_tokenizer(self) -> bool:
        return self.loc.exists(TOKENIZER_DIR, TOKENIZER_MARKER)

    def tokenizer_path(self) -> str:
        """A local folder holding the cache's copy of the teacher tokenizer (downloaded once if remote)."""
        if not self.has_tokenizer():
            raise CacheNotFoundError(f"{self.loc.url}: the cache holds no tokenizer copy")
        if self.loc.is_local:
            return self.loc.path(TOKENIZER_DIR)
        tmp = tempfile.mkdtemp(prefix="logitcache-tok-")
        src = self.loc.child(TOKENIZER_DIR)
        for rel in src.files():
            os.makedirs(os.path.dirname(os.path.join(tmp, rel)), exist_ok=True)
            src.fs.get_file(src.path(rel), os.path.join(tmp, rel))
        return tmp

    def load_tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.tokenizer_path())
