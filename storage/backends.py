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

    def read(self, names: list[str], start: int, stop: int) -> dict[str, np.ndarray]: ...


class PositionBackend(Protocol):
    name: str

    def write(self, parts: dict[str, np.ndarray], local_dir: str) -> None: ...

    def open(self, shard: Location, parts: dict[str, dict[str, Any]]) -> PositionReader: ...


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

    def write(self, parts: dict[str, np.ndarray], local_dir: str) -> None:
        import zarr
        from zarr.storage import LocalStore

        n = _check_lengths(parts)
        root = zarr.open_group(LocalStore(os.path.join(local_dir, ZARR_DIR)), mode="w", zarr_format=3)
        chunk = max(1, min(self.chunk_rows, n))
        shard = max(chunk, min(self.shard_rows, -(-n // chunk) * chunk))
        for name, arr in parts.items():
            tail = tuple(arr.shape[1:])
            a = root.create_array(
                name,
                shape=arr.shape,
                dtype=arr.dtype,
                chunks=(chunk, *tail),
                shards=(shard, *tail),
                compressors=zarr_compressor_for(arr.dtype),
                fill_value=0,
            )
            if n:
                a[...] = arr

    def open(self, shard: Location, parts: dict[str, dict[str, Any]]) -> ZarrReader:
        return ZarrReader(shard.child(ZARR_DIR), parts)


class ZarrReader:
    def __init__(self, loc: Location, parts: dict[str, dict[str, Any]]) -> None:
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
        except Exception as e:  # zarr raises several types for missing/garbled metadata
            raise CorruptCacheError(f"{loc.url}: cannot open position arrays ({type(e).__name__}: {e})") from e
        lengths = {a.shape[0] for a in self._arrays.values()}
        if len(lengths) > 1:
            raise CorruptCacheError(f"{loc.url}: position arrays have different lengths {sorted(lengths)}")
        self.n = lengths.pop() if lengths else 0
        self._url = loc.url

    def read(self, names: list[str], start: int, stop: int) -> dict[str, np.ndarray]:
        try:
            return {name: self._arrays[name][start:stop] for name in names}
        except Exception as e:
            raise CorruptCacheError(f"{self._url}: cannot read rows {start}:{stop} ({type(e).__name__}: {e})") from e


class ArrowBackend:
    name = "arrow"

    def __init__(self, shard_rows: int = 65536) -> None:
        self.shard_rows = shard_rows

    def write(self, parts: dict[str, np.ndarray], local_dir: str) -> None:
        _check_lengths(parts)
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
            table, os.path.join(local_dir, PARQUET_FILE), row_group_size=self.shard_rows, **parquet_write_kwargs(parts)
        )

    def open(self, shard: Location, parts: dict[str, dict[str, Any]]) -> ArrowReader:
        return ArrowReader(shard, parts)


class ArrowReader:
    def __init__(self, shard: Location, parts: dict[str, dict[str, Any]]) -> None:
        self._url = shard.url_of(PARQUET_FILE)
        try:
            self._file = shard.open_parquet(PARQUET_FILE)  # reads on this thread only (see storage.fs)
        except Exception as e:
            raise CorruptCacheError(f"{self._url}: cannot open position table ({type(e).__name__}: {e})") from e
        self._parts = parts
        meta = self._file.metadata
        self.n = meta.num_rows
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


BACKENDS: dict[str, type] = {"zarr": ZarrBackend, "arrow": ArrowBackend}


def make_backend(name: str, **options: Any) -> PositionBackend:
    if name not in BACKENDS:
        raise ValueError(f"unknown position backend {name!r}; choose one of {sorted(BACKENDS)}")
    return BACKENDS[name](**options)
