"""Interoperability: import the teacher-logit datasets other tools publish into a cache, export caches to them.

``logitcache import SRC --format F`` (``import_stage.run_import``) reads DistillKit captures, plain top-k Parquet
and OpenAI-style ``logprobs`` JSONL; ``logitcache export`` (``export_stage.run_export``) writes them. This package
depends only on ``logitcache.storage`` and the shared core, and writes caches through the public ``CacheWriter``
(so an import writes whatever cache format version is current). See ``docs/interop.md``.
"""
