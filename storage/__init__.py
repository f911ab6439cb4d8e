"""The logit cache: formats v1 and v2, writer, reader, verify, inspect and convert (depends on nothing else of ours).

Public API::

    from logitcache.storage import CacheHeader, CacheWriter, LogitCache, PositionRows, SequenceRecord
    writer = CacheWriter("cache/", CacheHeader(top_k=64, vocab_size=262144, num_shards=2))
    writer.write_shard(0, records); writer.write_shard(1, more); writer.finalize()
    cache = LogitCache.open("cache/"); cache.get(sample_id); cache.iter_sequences()

``storage.convert.convert_cache(src, out, ...)`` rewrites a cache with other codecs or a smaller K.
``verify_cache(url)`` lists every problem of a cache and its alignment stores (``verify_store(cache, key)`` checks
one store). See ``docs/format.md`` for the on-disk layout and what verify checks.
"""

from .errors import (
    CacheError,
    CacheIncompleteError,
    CacheNotFoundError,
    ConfigMismatchError,
    CorruptCacheError,
    SchemaVersionError,
)
from .manifest import SCHEMA_VERSION, CacheHeader
from .reader import LogitCache, ShardInfo
from .records import PositionRows, SequenceRecord
from .verify import describe_cache, verify_cache
from .verify_alignment import verify_store
from .writer import CacheWriter

__all__ = [
    "SCHEMA_VERSION",
    "CacheError",
    "CacheHeader",
    "CacheIncompleteError",
    "CacheNotFoundError",
    "CacheWriter",
    "ConfigMismatchError",
    "CorruptCacheError",
    "LogitCache",
    "PositionRows",
    "SchemaVersionError",
    "SequenceRecord",
    "ShardInfo",
    "describe_cache",
    "verify_cache",
    "verify_store",
]
