"""The cache's self-description: the header fixed at creation, per-shard markers, and the final manifest.

Layout of a cache folder (``docs/format.md`` is the normative description)::

    CACHE/cache.json                   header, written when the writer starts (identity of the capture config)
    CACHE/tokenizer/...                a copy of the teacher's tokenizer files
    CACHE/shards/shard-000000/         one folder per shard: sequences.parquet, positions.zarr/ | positions.parquet
    CACHE/shards/shard-000000/_COMPLETE.json   written last inside the shard: sizes, checksum, stats
    CACHE/manifest.json                written last of all: its presence means "complete"

The header's *identity* (everything except ``metadata.runtime``, which holds versions and timings) decides
whether a rerun may resume into an existing folder. Shard stats are mergeable (counts and fixed-bin
histograms), so ``finalize`` never rereads position arrays.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .errors import CorruptCacheError, SchemaVersionError

#: the newest cache schema this code reads and the one new caches get (docs/format.md); a v1 cache being resumed
#: keeps writing v1 shards. Alignment stores did not change and stay at ``ALIGNMENT_SCHEMA_VERSION``.
SCHEMA_VERSION = 2
ALIGNMENT_SCHEMA_VERSION = 1
FORMAT_NAME = "logitcache"
HEADER_FILE = "cache.json"
MANIFEST_FILE = "manifest.json"
SHARDS_DIR = "shards"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_MARKER = "_COMPLETE"
SHARD_MARKER = "_COMPLETE.json"
SEQUENCES_FILE = "sequences.parquet"

#: Tail-mass histogram bin edges: 0, then log-spaced 1e-8 .. 1 (quantiles read from it are bin upper edges).
TAIL_BINS = np.concatenate([[0.0], np.logspace(-8, 0, 65)])


def shard_name(index: int) -> str:
    return f"shard-{index:06d}"


@dataclass
class CacheHeader:
    """What a cache is: fixed when the writer starts, copied into the manifest.

    ``top_k``/``vocab_size`` describe the rows; ``id_codec``/``logprob_codec`` are codec configs
    (``storage.codecs``); ``positions`` names the position backend and its options; ``extra_temperatures``
    lists the taus whose ``logsumexp(logits / tau)`` is stored; ``logit_moments`` says whether every position also
    stores its logits' mean and std (``logit_mean``/``logit_std``; the key is written only when true, so caches
    without them keep the header, and the fingerprint, they always had); ``tail_samples`` is the number of tail
    draws per position (``tail_ids``/``tail_logprobs``; 0 = none, then absent from the header, likewise).
    ``metadata`` is free-form and filled by stage one: ``teacher`` (model id, weight hash, vocab size, tokenizer
    fingerprint, chat-template hash), ``capture`` (mode, K, sampling parameters, seed, max tokens), ``input``
    (dataset fingerprint), ``config`` (the resolved stage config) and ``runtime`` (backend and library versions;
    not part of the identity).
    """

    top_k: int
    vocab_size: int
    id_codec: dict[str, Any] = field(default_factory=lambda: {"name": "int32"})
    logprob_codec: dict[str, Any] = field(default_factory=lambda: {"name": "fp16"})
    positions: dict[str, Any] = field(default_factory=lambda: {"name": "zarr"})
    extra_temperatures: list[float] = field(default_factory=list)
    logit_moments: bool = False
    tail_samples: int = 0
    num_shards: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {self.vocab_size}")
        if self.top_k > self.vocab_size:
            raise ValueError(f"top_k ({self.top_k}) is larger than the vocabulary ({self.vocab_size})")
        self.extra_temperatures = sorted(float(t) for t in self.extra_temperatures)
        if any(t <= 0 for t in self.extra_temperatures):
            raise ValueError(f"extra temperatures must be > 0, got {self.extra_temperatures}")
        if isinstance(self.tail_samples, bool) or not isinstance(self.tail_samples, int) or self.tail_samples < 0:
            raise ValueError(f"tail_samples must be an integer >= 0, got {self.tail_samples!r}")
        if self.tail_samples and self.top_k >= self.vocab_size:
            raise ValueError(f"tail_samples needs a tail: top_k ({self.top_k}) covers the vocabulary")

    def to_dict(self) -> dict[str, Any]:
        d = json.loads(json.dumps(asdict(self)))
        if not self.logit_moments:
            del d["logit_moments"]  # absent = none: headers (and fingerprints) of caches without them are unchanged
        if not self.tail_samples:
            del d["tail_samples"]  # likewise
        return d

    @staticmethod
    def from_dict(d: dict[str, Any], source: str = "cache.json") -> CacheHeader:
        try:
            return CacheHeader(
                top_k=int(d["top_k"]),
                vocab_size=int(d["vocab_size"]),
                id_codec=dict(d["id_codec"]),
                logprob_codec=dict(d["logprob_codec"]),
                positions=dict(d["positions"]),
                extra_temperatures=list(d.get("extra_temperatures", [])),
                logit_moments=_flag(d.get("logit_moments", False), "logit_moments"),
                tail_samples=d.get("tail_samples", 0),
                num_shards=d.get("num_shards"),
                metadata=dict(d.get("metadata", {})),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptCacheError(f"{source}: invalid header field ({type(e).__name__}: {e})") from e

    def identity(self) -> dict[str, Any]:
        d = self.to_dict()
        d["metadata"] = {k: v for k, v in d["metadata"].items() if k != "runtime"}
        return d

    def fingerprint(self) -> str:
        blob = json.dumps(self.identity(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def differences(self, other: CacheHeader) -> list[str]:
        """Dotted paths of identity fields that differ (for 'refuse unless --overwrite' messages).

        ``self`` is the header on disk, ``other`` the one a new run would write. Fields whose meaning did not
        change are compared leniently, so caches made before them resume (`_comparable`); the fingerprint is not
        affected (it hashes the stored header as it is).
        """
        old, new, reasons = _comparable(self.identity(), other.identity(), other.metadata.get("runtime") or {})
        return reasons + _diff(old, new, "")


def _comparable(old: dict[str, Any], new: dict[str, Any], runtime: dict[str, Any]) -> tuple[dict, dict, list[str]]:
    """Copies of two identities with the fields an older logitcache did not write made comparable.

    - ``capture.end_tokens``: derived (the text of ``end_token_ids``), never compared;
    - ``capture.end_token_ids``: compared only when both headers have it;
    - ``capture.score_end_token``: a cache without it ended score-mode spans with the tokenizer's EOS, so it
      matches a new one whose end token is that EOS (``source: eos_token``) and is refused otherwise, with why;
    - ``config.dtype``: an old ``"auto"`` equals what auto resolves to for the new run (``runtime.dtype_auto``);
    - ``config.id_codec``: a config without it (before format v2) wrote int32 ids, so it matches ``int32``.
    """
    old, new = json.loads(json.dumps(old)), json.loads(json.dumps(new))
    reasons: list[str] = []
    oc, nc = old.get("metadata", {}).get("capture"), new.get("metadata", {}).get("capture")
    if isinstance(oc, dict) and isinstance(nc, dict):
        for c in (oc, nc):
            c.pop("end_tokens", None)
        if "end_token_ids" not in oc or "end_token_ids" not in nc:
            oc.pop("end_token_ids", None)
            nc.pop("end_token_ids", None)
        if "score_end_token" not in oc and "score_end_token" in nc:
            end = nc.pop("score_end_token")
            if oc.get("mode") == "score" and oc.get("score_eos") and end and end.get("source") != "eos_token":
                reasons.append(
                    "metadata.capture.score_end_token (this cache predates it: its score spans end with the "
                    f"tokenizer's EOS, a run now appends the chat template's turn end {end.get('text')!r}; "
                    "regenerate it)"
                )
    oconf, nconf = old.get("metadata", {}).get("config"), new.get("metadata", {}).get("config")
    dtype = nconf.get("dtype") if isinstance(nconf, dict) else None
    if isinstance(oconf, dict) and oconf.get("dtype") == "auto" and dtype == runtime.get("dtype_auto"):
        oconf["dtype"] = dtype
    new_ids = nconf.get("id_codec") if isinstance(nconf, dict) else None
    if isinstance(oconf, dict) and isinstance(nconf, dict) and "id_codec" not in oconf and new_ids == "int32":
        nconf.pop("id_codec")
    return old, new, reasons


def _flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


def _diff(a: Any, b: Any, prefix: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _diff(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else str(key))
        return out
    return [] if a == b else [f"{prefix or '<root>'} ({a!r} != {b!r})"]


def check_schema(d: dict[str, Any], source: str) -> None:
    """Raise a clear error unless ``d`` is a logitcache document of a schema version this code reads."""
    if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
        raise CorruptCacheError(f'{source}: not a logitcache file (missing "format": "{FORMAT_NAME}")')
    version = d.get("schema_version")
    if not isinstance(version, int):
        raise CorruptCacheError(f"{source}: schema_version is missing or not an integer")
    if version > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"{source}: schema_version {version} is newer than this logitcache reads ({SCHEMA_VERSION}); "
            f"upgrade logitcache to a release that reads schema version {version}"
        )
    if version < 1:
        raise CorruptCacheError(f"{source}: schema_version {version} is invalid")


def empty_stats() -> dict[str, Any]:
    return {
        "sequences": 0,
        "positions": 0,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "target_in_topk": 0,
        "finish_reasons": {},
        "tail_hist": [0] * (len(TAIL_BINS) - 1),
        "target_logprob_sum": 0.0,
    }


def merge_stats(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for key in ("sequences", "positions", "prompt_tokens", "completion_tokens", "target_in_topk"):
        out[key] = a[key] + b[key]
    out["target_logprob_sum"] = a["target_logprob_sum"] + b["target_logprob_sum"]
    out["finish_reasons"] = {
        k: a["finish_reasons"].get(k, 0) + b["finish_reasons"].get(k, 0)
        for k in sorted(set(a["finish_reasons"]) | set(b["finish_reasons"]))
    }
    out["tail_hist"] = [x + y for x, y in zip(a["tail_hist"], b["tail_hist"])]
    return out


def tail_quantiles(hist: list[int], qs: tuple[float, ...] = (0.5, 0.9, 0.99)) -> dict[str, float]:
    """Approximate tail-mass quantiles (bin upper edges) from a ``TAIL_BINS`` histogram."""
    counts = np.asarray(hist, dtype=np.float64)
    total = counts.sum()
    if total == 0:
        return {f"p{int(q * 100)}": float("nan") for q in qs}
    cdf = np.cumsum(counts) / total
    return {f"p{int(q * 100)}": float(TAIL_BINS[1:][np.searchsorted(cdf, q)]) for q in qs}


def summarize(stats: dict[str, Any]) -> dict[str, Any]:
    """Human-facing summary numbers derived from merged shard stats."""
    positions = max(stats["positions"], 1)
    return {
        "sequences": stats["sequences"],
        "positions": stats["positions"],
        "prompt_tokens": stats["prompt_tokens"],
        "completion_tokens": stats["completion_tokens"],
        "finish_reasons": stats["finish_reasons"],
        "target_in_topk_rate": stats["target_in_topk"] / positions,
        "mean_target_logprob": stats["target_logprob_sum"] / positions,
        "tail_mass_quantiles": tail_quantiles(stats["tail_hist"]),
    }
