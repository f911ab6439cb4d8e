"""``logitcache import SRC --format F --teacher-tokenizer T --out CACHE``: a foreign logit dataset into a cache.

The source is read as a stream of blocks (`interop.sources`); sequences are numbered in source order and cut into
shards of ``--shard-size`` sequences, so shard ``s`` always holds sequences ``[s * S, (s + 1) * S)``. Each shard is
written through the public `CacheWriter` (atomic, whole shards): a killed import resumes by skipping the blocks of
complete shards without decoding them (Parquet: without reading them), and redoing the rest. Memory holds one block
and one shard's records, whatever the source's size.

Provenance lands in the manifest's header, ``metadata.import``: the source path and format, ``lossy`` (DistillKit's
quantized logprobs) or exact, ``missing_statistics`` (no source carries the full-vocabulary logsumexp, so the
cache records no ``lse@tau``: ``train`` then refuses the losses that need it, such as ``mlot``, unless told to
approximate; and outside the top-k the realized token's logprob is unknown for teacher-forced sources, stored as
``-inf``, which ALM skips), and the counters of what was repaired. ``metadata.config`` holds the resolved config.
"""

from __future__ import annotations

import time
from typing import Any

from logitcache.config import ConfigError, to_dict
from logitcache.storage import CacheHeader, CacheWriter, SequenceRecord

from .interop_config import ImportConfig
from .rebuild import Counters, Rebuilder
from .sources import open_source

_RUNTIME_FIELDS = ("threads", "overwrite")  # how the import runs, not what it writes: not part of the identity


def _version() -> str:
    from logitcache import __version__

    return __version__


def load_teacher_tokenizer(spec: str) -> Any:
    from pathlib import Path

    from transformers import AutoTokenizer

    from logitcache.models import ModelSpecError, load_tokenizer

    path = Path(spec).expanduser()
    try:
        if path.is_dir() and any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
            return AutoTokenizer.from_pretrained(path)
        return load_tokenizer(spec)
    except (ModelSpecError, OSError, ValueError) as e:
        raise ConfigError(f"--teacher-tokenizer {spec}: cannot load a tokenizer ({e})") from e


def build_header(cfg: ImportConfig, tokenizer: Any, info: Any) -> CacheHeader:
    from logitcache.tokenization import chat_template_hash, token_bytes_info, tokenizer_fingerprint

    vocab = max(token_bytes_info(tokenizer).size, len(tokenizer), info.min_vocab)
    missing = ["lse@1", "lse@2", "logit_mean", "logit_std"]
    if cfg.format != "openai-logprobs":
        missing.append("target_logprob outside the top-k (stored as -inf)")
    provenance = {
        "source": cfg.src,
        "format": cfg.format,
        "lossy": bool(info.lossy),
        "exactness": "lossy (quantized logprobs decoded as the source's code does)" if info.lossy else "exact",
        "missing_statistics": missing,
        "completion_start": cfg.completion_start,
        **info.provenance,
    }
    return CacheHeader(
        top_k=info.top_k,
        vocab_size=vocab,
        logprob_codec={"name": cfg.logprob_codec},
        positions={"name": cfg.positions_backend},
        extra_temperatures=[],
        num_shards=None,
        metadata={
            "teacher": {
                "model": cfg.teacher_tokenizer,
                "vocab_size": vocab,
                "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
                "chat_template_hash": chat_template_hash(tokenizer),
            },
            "capture": {"mode": "import", "top_k": info.top_k, "source_format": cfg.format},
            "input": {"path": cfg.src},
            "import": provenance,
            # the identity: a rerun with other content settings is refused (--overwrite replaces)
            "config": {k: v for k, v in to_dict(cfg).items() if k not in _RUNTIME_FIELDS},
            "runtime": {"logitcache": _version(), **{k: getattr(cfg, k) for k in _RUNTIME_FIELDS}},
        },
    )


def run_import(cfg: ImportConfig, progress: Any = None) -> dict[str, Any]:
    """Import ``cfg.src`` into ``cfg.out`` (resumes); returns a summary with the manifest's numbers."""
    if cfg.format == "distillkit" and cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)  # DistillKit's float decoding runs in torch (see docs/benchmarks.md)
    tokenizer = load_teacher_tokenizer(cfg.teacher_tokenizer)
    source = open_source(cfg, tokenizer)
    info = source.info()
    header = build_header(cfg, tokenizer, info)
    writer = CacheWriter(cfg.out, header, overwrite=cfg.overwrite)
    if not writer.has_tokenizer():
        writer.save_tokenizer(tokenizer)
    rebuild = Rebuilder(tokenizer, cfg.completion_start, header.vocab_size)
    done = set(writer.complete_shards())
    size = cfg.shard_size
    limit = cfg.limit if cfg.limit is not None else float("inf")
    pending: list[SequenceRecord] = []
    counters = Counters()
    shard, written, positions = 0, 0, 0
    t0 = time.perf_counter()

    def flush() -> None:
        nonlocal written, positions, pending
        if pending and shard not in done:
            marker = writer.write_shard(shard, pending, counters.values)
            written += 1
            positions += int(marker["positions"])
            if progress is not None:
                progress(len(pending), int(marker["positions"]))
        pending = []
        counters.values = {}

    for first, count, decode in source.blocks():
        if first >= limit:
            break
        shards = set(range(first // size, (min(first + count, limit) - 1) // size + 1))
        if shards <= done:  # a resumed import skips these sequences undecoded
            shard = max(shards)
            continue
        seqs, block_counts = decode()
        for key, v in block_counts.items():
            counters.add(key, v)
        for raw in seqs:
            if raw.index >= limit:
                break
            s = raw.index // size
            if s != shard:
                flush()
                shard = s
            if s in done:
                continue
            pending.append(rebuild.record(raw, counters))
    flush()
    manifest = writer.finalize()
    return {
        "shards_written": written,
        "shards_done_before": len(done),
        "positions_written": positions,
        "seconds": time.perf_counter() - t0,
        "sequences": manifest["stats"]["sequences"],
        "positions": manifest["stats"]["positions"],
        "counters": manifest.get("counters", {}),
        "import": manifest["header"]["metadata"]["import"],
    }
