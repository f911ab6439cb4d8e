"""Position-array backends: where a shard's ``[positions, K]`` arrays live on disk.

A codec (``storage.codecs``) turns the row fields into named *parts* (plain numpy arrays with a leading
``positions`` dimension); a backend persists those parts and reads row ranges of them back. Two backends sit
behind the same small interface:

- ``zarr`` (default): one Zarr v3 group per shard, one array per part, chunks of ``chunk_rows`` (4096) rows
  inside Zarr shards of ``shard_rows`` (65536) rows, so a shard file is tens of MB while a random read touches
  one ~4k-row chunk. Tiny chunks read several times slower; huge ones make random access read too much.
- ``arrow``: one Parquet file per shard, one column per part; 2-D parts are ``FixedSizeBinary`` columns (the
  default ``FixedSizeList`` encoding reads ~4x slower), zstd level 1 with byte-stream-split where it helps
  (``codecs.parquet_write_kwargs``), row groups of ``shard_rows`` rows.

Format v2 (``checksums=True`` at write time) adds a checksum to every coded chunk: a ``crc32c`` codec after
Blosc in each Zarr array (zarr checks it on every read), page CRCs in Parquet (checked on read), so a damaged chunk
fails to decode instead of decoding into garbage; ``verify`` then names the shard, part and chunk. Shard-level
parts (``tables``: a v2 codec's dictionary) are 1-D arrays of their own length: ``positions.zarr/<name>`` (one
chunk) or ``positions.<name>.parquet`` (one column ``values``).

Both are written into a *local* folder (the shard's temporary folder; for object-store caches a local scratch
folder that is uploaded afterwards), and read from a local path or through fsspec. Which one is the default is
decided by ``bench/storage.py``; see ``docs/benchmarks.md``.
"""

from __future__ import annotations

import os
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .codecs import parquet_write_kwargs, zarr_compressor_for
from .errors import CorruptCacheError
from .fs import Location

ZARR_DIR = "positions.zarr"
PARQUET_FILE = "positions.parquet"


class PositionReader(Protocol):
    n: int
    chunk_rows: int

    def read(self, names: list[str], start: int, stop: int) -> dict[str, np.ndarray]: ...

    def read_tables(self, names: list[str]) -> dict[str, np.ndarray]: ...


class PositionBackend(Protocol):
    name: str

    def write(
        self,
        parts: dict[str, np.ndarray],
        local_dir: str,
        tables: dict[str, np.ndarray] | None = None,
        checksums: bool = False,
    ) -> None: ...

    def open(
        self, shard: Location, parts: dict[str, dict[str, Any]], tables: dict[str, dict[str, Any]] | None = None
    ) -> PositionReader: ...


def _check_lengths(parts: dict[str, np.ndarray]) -> int:
    lengths = {name: a.shape[0] for name, a in parts.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"position parts have different lengths: {lengths}")
    return next(iter(lengths.values()), 0)


class ZarrBackend:
    name = "zarr"

    def __init__(self, chunk_rows: int = 4096, shard_rows: int = 65536) -> None:
        if chunk_rows <= 0 or shard_rows % chunk_rows:
            raise ValueError(f"zarr backend: shard_rows ({shard_rows}) must be a multiple of chunk_rows ({chunk_rows})")
        self.chunk_rows = chunk_rows
        self.shard_rows = shard_rows

    def write(
        self,
        parts: dict[str, np.ndarray],
        local_dir: str,
        tables: dict[str, np.ndarray] | None = None,
        checksums: bool = False,
    ) -> None:
        import zarr
        from zarr.codecs import Crc32cCodec
        from zarr.storage import LocalStore

        n = _check_lengths(parts)
        root = zarr.open_group(LocalStore(os.path.join(local_dir, ZARR_DIR)), mode="w", zarr_format=3)
        chunk = max(1, min(self.chunk_rows, n))
        shard = max(chunk, min(self.shard_rows, -(-n // chunk) * chunk))

        def compressors(dtype: np.dtype) -> list[Any]:
            return [zarr_compressor_for(dtype), *([Crc32cCodec()] if checksums else [])]

        for name, arr in parts.items():
            tail = tuple(arr.shape[1:])
            a = root.create_array(
                name,
                shape=arr.shape,
                dtype=arr.dtype,
                chunks=(chunk, *tail),
                shards=(shard, *tail),
                compressors=compressors(arr.dtype),
                fill_value=0,
            )
            if n:
                a[...] = arr
        for name, arr in (tables or {}).items():
            a = root.create_array(
                name, shape=arr.shape, dtype=arr.dtype, chunks=(max(1, arr.shape[0]),),
                compressors=compressors(arr.dtype), fill_value=0,
            )
            if arr.shape[0]:
                a[...] = arr

    def open(
        self, shard: Location, parts: dict[str, dict[str, Any]], tables: dict[str, dict[str, Any]] | None = None
    ) -> ZarrReader:
        return ZarrReader(shard.child(ZARR_DIR), parts, tables or {})


class ZarrReader:
    def __init__(
        self, loc: Location, parts: dict[str, dict[str, Any]], tables: dict[str, dict[str, Any]] | None = None
    ) -> None:
        import zarr
        from zarr.storage import FsspecStore, LocalStore

        store = (
            LocalStore(loc.root, read_only=True)
            if loc.is_local
            else FsspecStore.from_url(loc.url, storage_options=loc.options or None, read_only=True)
        )
        try:
            group = zarr.open_group(store, mode="r", zarr_format=3)
            self._arrays = {name: group[name] for name in parts}
            self._tables = {name: group[name] for name in tables or {}}
        except Exception as e:  # zarr raises several types for missing/garbled metadata
            raise CorruptCacheError(f"{loc.url}: cannot open position arrays ({type(e).__name__}: {e})") from e
        lengths = {a.shape[0] for a in self._arrays.values()}
        if len(lengths) > 1:
            raise CorruptCacheError(f"{loc.url}: position arrays have different lengths {sorted(lengths)}")
        self.n = lengths.pop() if lengths else 0
        self.chunk_rows = max([a.chunks[0] for a in self._arrays.values()] or [1])
        self._url = loc.url

    def read(self, names: list[str], start: int, stop: int) -> dict[str, np.ndarray]:
        try:
            return {name: self._arrays[name][start:stop] for name in names}
        except Exception as e:
            raise CorruptCacheError(f"{self._url}: cannot read rows {start}:{stop} ({type(e).__name__}: {e})") from e

    def read_tables(self, names: list[str]) -> dict[str, np.ndarray]:
        try:
            return {name: self._tables[name][...] for name in names}
        except Exception as e:
            raise CorruptCacheError(f"{self._url}: cannot read {names} ({type(e).__name__}: {e})") from e


class ArrowBackend:
    name = "arrow"

    def __init__(self, shard_rows: int = 65536) -> None:
        self.shard_rows = shard_rows

    def write(
        self,
        parts: dict[str, np.ndarray],
        local_dir: str,
        tables: dict[str, np.ndarray] | None = None,
        checksums: bool = False,
    ) -> None:
        _check_lengths(parts)
        for name, arr in (tables or {}).items():
            pq.write_table(
                pa.table({"values": pa.array(arr)}), os.path.join(local_dir, f"positions.{name}.parquet"),
                write_page_checksum=checksums, **parquet_write_kwargs({"values": arr}),
            )
        columns = {}
        for name, arr in parts.items():
            arr = np.ascontiguousarray(arr)
            if arr.ndim == 1:
                columns[name] = pa.array(arr)
            else:
                width = int(np.prod(arr.shape[1:])) * arr.dtype.itemsize
                buf = pa.py_buffer(arr.tobytes())
                columns[name] = pa.Array.from_buffers(pa.binary(width), arr.shape[0], [None, buf])
        table = pa.table(columns)
        pq.write_table(
            table, os.path.join(local_dir, PARQUET_FILE), row_group_size=self.shard_rows,
            write_page_checksum=checksums, **parquet_write_kwargs(parts),
        )

    def open(
        self, shard: Location, parts: dict[str, dict[str, Any]], tables: dict[str, dict[str, Any]] | None = None
    ) -> ArrowReader:
        return ArrowReader(shard, parts)


class ArrowReader:
    def __init__(self, shard: Location, parts: dict[str, dict[str, Any]]) -> None:
        self._url = shard.url_of(PARQUET_FILE)
        self._shard = shard
        try:  # reads on this thread only (see storage.fs); page CRCs (format v2) are checked where present
            self._file = shard.open_parquet(PARQUET_FILE, page_checksum_verification=True)
        except Exception as e:
            raise CorruptCacheError(f"{self._url}: cannot open position table ({type(e).__name__}: {e})") from e
        self._parts = parts
        meta = self._file.metadata
        self.n = meta.num_rows
        self.chunk_rows = max([meta.row_group(i).num_rows for i in range(meta.num_row_groups)] or [1])
        self._group_starts = np.cumsum([0] + [meta.row_group(i).num_rows for i in range(meta.num_row_groups)])

    def read(self, names: list[str], start: int, stop: int) -> dict[str, np.ndarray]:
        stop = min(stop, self.n)
        if stop <= start:
            return {name: np.zeros((0, *self._parts[name]["shape"]), self._parts[name]["dtype"]) for name in names}
        first = int(np.searchsorted(self._group_starts, start, side="right") - 1)
        last = int(np.searchsorted(self._group_starts, stop, side="left"))
        try:
            table = self._file.read_row_groups(list(range(first, last)), columns=names, use_threads=False)
        except Exception as e:
            raise CorruptCacheError(f"{self._url}: cannot read rows {start}:{stop} ({type(e).__name__}: {e})") from e
        offset = start - int(self._group_starts[first])
        table = table.slice(offset, stop - start)
        out = {}
        for name in names:
            spec = self._parts[name]
            dtype = np.dtype(spec["dtype"])
            col = table.column(name).combine_chunks()
            if pa.types.is_fixed_size_binary(col.type):
                raw = np.frombuffer(col.buffers()[1], dtype=np.uint8)
                width = col.type.byte_width
                raw = raw[col.offset * width : (col.offset + len(col)) * width]
                out[name] = raw.view(dtype).reshape(len(col), *spec["shape"])
            else:
                out[name] = col.to_numpy(zero_copy_only=False).astype(dtype, copy=False)
        return out


    def read_tables(self, names: list[str]) -> dict[str, np.ndarray]:
        out = {}
        for name in names:
            try:
                pf = self._shard.open_parquet(f"positions.{name}.parquet", page_checksum_verification=True)
                col = pf.read(use_threads=False).column("values")
            except Exception as e:
                raise CorruptCacheError(
                    f"{self._shard.url_of(f'positions.{name}.parquet')}: unreadable ({type(e).__name__}: {e})"
                ) from e
            out[name] = col.to_numpy(zero_copy_only=False)
        return out


BACKENDS: dict[str, type] = {"zarr": ZarrBackend, "arrow": ArrowBackend}


def make_backend(name: str, **options: Any) -> PositionBackend:
    if name not in BACKENDS:
        raise ValueError(f"unknown position backend {name!r}; choose one of {sorted(BACKENDS)}")
    return BACKENDS[name](**options)
