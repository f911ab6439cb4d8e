"""What each token of a Hugging Face tokenizer writes into the text, and stable tokenizer fingerprints.

The per-tokenizer, text-independent half of `logitcache.tokenization` (the encoding half, which verifies an
encoding against these bytes, is `logitcache.byte_offsets`). Every token's bytes are computed once per tokenizer
(`token_bytes_info`, cached on the tokenizer object) from its serialized vocabulary and components:

- byte-level BPE (``Ġ``; GPT-2, Llama-3, Qwen, SmolLM2): invert the GPT-2 byte-to-unicode table;
- SentencePiece style (``▁`` metaspace, Llama-2, Gemma, Unigram): ``▁`` -> space, ``<0xNN>`` -> one byte;
- added/special tokens: their literal content (whether one covers its text or zero bytes is decided at encode
  time, from the encoding).

Pieces that cannot be decoded exactly (a character outside the byte-level alphabet, a hole in the id range) are
kept and marked inexact, so the encoder takes their bytes from the text instead of guessing. The cache is keyed by
the vocabulary size: adding tokens to a tokenizer rebuilds its table; the hot path (`cached_token_bytes`) skips
even that check unless an id reaches past the table (the size query costs ~0.3 ms on Gemma's 6k added tokens).

`tokenizer_fingerprint` hashes the serialized tokenizer plus its special-token settings (what decides ids and
offsets) and `chat_template_hash` the chat template: the cache manifest records both so that a later stage can
tell whether it runs with the tokenizer the cache was written with.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np

__all__ = [
    "TokenBytes",
    "cached_token_bytes",
    "chat_template_hash",
    "fast_backend",
    "token_bytes_info",
    "token_bytes_table",
    "tokenizer_fingerprint",
    "tokenizer_name",
]

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@cache
def _byte_level_translation() -> dict[int, int]:
    """``str.translate`` table inverting GPT-2's ``bytes_to_unicode``: stand-in character -> ``chr(byte)``.

    Characters below 256 that are not stand-ins map to U+FFFF, so an undecodable piece fails ``encode("latin-1")``.
    """
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    stand_in = {b: b for b in bs} | {b: 256 + n for n, b in enumerate(b for b in range(256) if b not in bs)}
    return {c: 0xFFFF for c in range(256)} | {c: b for b, c in stand_in.items()}


@dataclass(frozen=True)
class TokenBytes:
    """Per-id byte content of a tokenizer's vocabulary (`token_bytes_info`).

    ``pieces[i]`` is what token ``i`` writes into the text (special tokens: their literal content);
    ``lengths`` their lengths; ``added``/``special`` mark added-vocabulary and special tokens; ``exact`` is False
    where a piece could not be decoded (unknown character in a byte-level piece, a hole in the id range);
    ``byte_fallback`` marks ``<0xNN>`` pieces;
    ``kind`` is ``byte_level``, ``metaspace`` or ``plain``; ``raw`` the vocabulary strings (for the tolerant walk).
    """

    name: str
    kind: str
    replacement: str
    pieces: list[bytes]
    raw: list[str]
    lengths: np.ndarray
    added: np.ndarray
    special: np.ndarray
    exact: np.ndarray
    byte_fallback: np.ndarray  # ``<0xNN>`` pieces of a byte-fallback model
    needs_span: np.ndarray  # added, inexact or <unk>: their bytes come from the encoding's character span
    unk_id: int | None
    dummy_first: bool  # a normalizer prepends the dummy ``▁`` unconditionally (legacy SentencePiece)
    prefix_ids: tuple[int, ...]  # ids the post-processor puts before the text (BOS)
    size: int


def fast_backend(tokenizer: Any) -> Any:
    """The `tokenizers.Tokenizer` behind ``tokenizer`` (a HF fast tokenizer or a raw one); TypeError otherwise."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend
    if hasattr(tokenizer, "encode_batch") and hasattr(tokenizer, "to_str"):
        return tokenizer  # a raw `tokenizers.Tokenizer`
    raise TypeError(
        f"{type(tokenizer).__name__} has no fast backend: load it with AutoTokenizer.from_pretrained(..., "
        "use_fast=True) or pass a tokenizers.Tokenizer"
    )


def tokenizer_name(tokenizer: Any) -> str:
    """A short human-readable name for messages: ``name_or_path`` or the class name."""
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def _components(node: Any) -> list[dict[str, Any]]:
    """Flatten a serialized normalizer/pre-tokenizer/decoder tree into its leaf components."""
    if not isinstance(node, dict):
        return []
    out = [node]
    for key in ("normalizers", "pretokenizers", "decoders", "processors"):
        for child in node.get(key) or []:
            out.extend(_components(child))
    return out


def _kind(spec: dict[str, Any]) -> tuple[str, str]:
    parts = _components(spec.get("decoder")) + _components(spec.get("pre_tokenizer"))
    parts += _components(spec.get("normalizer"))
    if any(p.get("type") == "ByteLevel" for p in parts):
        return "byte_level", ""
    for p in parts:
        if p.get("type") == "Metaspace":
            return "metaspace", str(p.get("replacement", "▁"))
        if p.get("type") == "Replace" and "▁" in (str(p.get("content")), str(p.get("pattern", {}).get("String"))):
            return "metaspace", "▁"
    return "plain", ""


_RAW_CACHE: dict[int, tuple[Any, dict[str, Any]]] = {}


def _slots(tokenizer: Any) -> dict[str, Any]:
    """Per-tokenizer cache: in the wrapper's ``__dict__``, or (raw `tokenizers.Tokenizer`) a small module LRU."""
    d = getattr(tokenizer, "__dict__", None)
    if d is not None:
        return d.setdefault("_logitcache_cache", {})
    hit = _RAW_CACHE.get(id(tokenizer))
    if hit is None or hit[0] is not tokenizer:
        if len(_RAW_CACHE) >= 8:
            _RAW_CACHE.pop(next(iter(_RAW_CACHE)))
        hit = _RAW_CACHE[id(tokenizer)] = (tokenizer, {})
    return hit[1]


def _cached(tokenizer: Any, key: str, size: int) -> Any:
    hit = _slots(tokenizer).get(key)
    return hit[1] if hit is not None and hit[0] == size else None


def cached_token_bytes(tokenizer: Any, ids: list[int] | None = None) -> TokenBytes:
    """Hot-path `token_bytes_info`: trusts the cached table unless ``ids`` reach past it (tokens were added).

    (``get_vocab_size(with_added_tokens=True)`` costs ~0.3 ms on Gemma's 6k added tokens: too slow per text.)
    """
    hit = _slots(tokenizer).get("bytes")
    if hit is None or (ids and max(ids) >= hit[1].size):
        return token_bytes_info(tokenizer)
    return hit[1]


def _state(component: Any) -> dict[str, Any] | None:
    """The serialized (JSON) form of one backend component: normalizer, pre-tokenizer, decoder, ..."""
    return None if component is None else json.loads(component.__getstate__())


def token_bytes_info(tokenizer: Any) -> TokenBytes:
    """The per-id bytes of ``tokenizer``'s vocabulary and what kind of tokenizer it is (cached per object)."""
    backend = fast_backend(tokenizer)
    key = backend.get_vocab_size(with_added_tokens=True)
    cached = _cached(tokenizer, "bytes", key)
    if cached is not None:
        return cached
    spec = {k: _state(getattr(backend, k)) for k in ("normalizer", "pre_tokenizer", "decoder")}
    kind, repl = _kind(spec)
    vocab: dict[str, int] = backend.get_vocab(with_added_tokens=True)
    size = max(key, max(vocab.values(), default=-1) + 1)
    added_decoder = backend.get_added_tokens_decoder()
    model = backend.model
    model_spec: dict[str, Any] = {}
    if not hasattr(model, "byte_fallback"):  # Unigram exposes neither byte_fallback nor unk_id: read its state
        model_spec = json.loads(model.__getstate__())
    byte_fallback = bool(getattr(model, "byte_fallback", model_spec.get("byte_fallback", False)))
    translation = _byte_level_translation()
    raw = [""] * size
    pieces: list[bytes] = [b""] * size
    exact = np.zeros(size, bool)
    byte_piece: list[int] = []
    for piece, i in vocab.items():
        raw[i] = piece
        if i in added_decoder:
            continue
        if kind == "byte_level":
            try:
                pieces[i] = piece.translate(translation).encode("latin-1")
            except UnicodeEncodeError:  # a character outside the byte-level alphabet: keep it, mark inexact
                pieces[i] = piece.encode("utf-8")
                continue
        elif byte_fallback and len(piece) == 6 and _BYTE_PIECE.fullmatch(piece):
            pieces[i] = bytes([int(piece[3:5], 16)])
            byte_piece.append(i)
        elif kind == "metaspace":
            pieces[i] = piece.replace(repl, " ").encode("utf-8")
        else:
            pieces[i] = piece.encode("utf-8")
        exact[i] = True
    added = np.zeros(size, bool)
    special = np.zeros(size, bool)
    for i, tok in added_decoder.items():
        content = tok.content.replace(repl, " ") if kind == "metaspace" and tok.normalized else tok.content
        pieces[i], added[i], special[i], exact[i] = content.encode("utf-8"), True, bool(tok.special), True
    byte_fallback_mask = np.zeros(size, bool)
    byte_fallback_mask[byte_piece] = True
    unk = getattr(model, "unk_token", None)
    unk_id = vocab.get(unk) if isinstance(unk, str) else None
    if unk_id is None and isinstance(model_spec.get("unk_id"), int):
        unk_id = int(model_spec["unk_id"])
    probe = backend.encode("a", add_special_tokens=True)
    lead = 0
    while lead < len(probe.ids) and probe.special_tokens_mask[lead]:
        lead += 1
    needs_span = added | ~exact
    if unk_id is not None:
        needs_span[unk_id] = True
    info = TokenBytes(
        name=tokenizer_name(tokenizer), kind=kind, replacement=repl, pieces=pieces, raw=raw,
        lengths=np.fromiter(map(len, pieces), np.int64, size), added=added, special=special,
        exact=exact, byte_fallback=byte_fallback_mask, needs_span=needs_span, unk_id=unk_id,
        dummy_first=any(p.get("type") == "Prepend" for p in _components(spec.get("normalizer"))),
        prefix_ids=tuple(probe.ids[:lead]), size=size,
    )
    _slots(tokenizer)["bytes"] = (key, info)
    return info


def token_bytes_table(tokenizer: Any) -> list[bytes]:
    """``table[i]`` = the UTF-8 bytes token ``i`` writes into the text (special tokens: literal content)."""
    return token_bytes_info(tokenizer).pieces


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 hex of the tokenizer's serialized form plus its special-token settings.

    Hashed: the model's serialized state (vocabulary and merges, in id order), the normalizer, pre-tokenizer,
    post-processor and decoder (canonical JSON), the added tokens with their flags, and the wrapper's special
    tokens map and ``add_bos_token``/``add_eos_token``. Runtime truncation/padding are not part of it. Stable across
    processes and across a save/load round trip.
    """
    backend = fast_backend(tokenizer)
    size = backend.get_vocab_size(with_added_tokens=True)
    cached = _cached(tokenizer, "fingerprint", size)
    if cached is not None:
        return cached
    h = hashlib.sha256(b"logitcache-tokenizer-v1\0")
    h.update(backend.model.__getstate__())
    added = sorted(
        (i, t.content, t.special, t.normalized, t.lstrip, t.rstrip, t.single_word)
        for i, t in backend.get_added_tokens_decoder().items()
    )
    small = {
        "components": {k: _state(getattr(backend, k))
                       for k in ("normalizer", "pre_tokenizer", "post_processor", "decoder")},
        "added_tokens": added,
        "special_tokens_map": getattr(tokenizer, "special_tokens_map", None),
        "add_bos_token": getattr(tokenizer, "add_bos_token", None),
        "add_eos_token": getattr(tokenizer, "add_eos_token", None),
    }
    h.update(json.dumps(small, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str).encode())
    digest = h.hexdigest()
    _slots(tokenizer)["fingerprint"] = (size, digest)
    return digest


def chat_template_hash(tokenizer: Any) -> str | None:
    """sha256 hex of the tokenizer's chat template (str, or dict of named templates), or None without one."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return None
    text = template if isinstance(template, str) else json.dumps(template, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
