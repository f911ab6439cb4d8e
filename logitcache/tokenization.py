"""Token ids *and* exact UTF-8 byte offsets from a Hugging Face tokenizer, plus stable tokenizer fingerprints.

Why not ``return_offsets_mapping``: character offsets cannot place the three ``<0xE2><0x82><0xAC>`` tokens of a
byte-fallback ``€`` (nor the byte-level halves of an emoji) and they overlap or skip whitespace for some
pre-tokenizers. Instead every token's bytes are computed directly, once per tokenizer (`token_bytes_table`):

- byte-level BPE (``Ġ``; GPT-2, Llama-3, Qwen, SmolLM2): invert the GPT-2 byte-to-unicode table;
- SentencePiece style (``▁`` metaspace, Llama-2, Gemma, Unigram): ``▁`` -> space, ``<0xNN>`` -> one byte;
- added/special tokens: their literal content. At encode time a special token that the post-processor inserted
  (BOS, a template's SEP) covers zero bytes; one that the tokenizer matched in the text covers its text span.

An encoding is then *verified*: the tokens' bytes, concatenated, must reproduce the input bytes, and the byte
offsets are their running sum. Known deviations are resolved, not guessed: a dummy-prefix space that a
SentencePiece normalizer/pre-tokenizer prepends (``add_dummy_prefix``, ``prepend_scheme``) belongs to no text, so
the token carrying it starts where the text starts; a literal ``▁`` in the text is matched as such. Anything else
(a normalizer that rewrites the text, such as Qwen's NFC, or ``<unk>`` without byte fallback) raises
`TokenizationMismatchError`, naming the sample, the tokenizer, the first differing byte offset and a snippet;
``on_mismatch="char_offsets"`` opts into a fallback that derives byte starts from the tokenizer's character
offsets instead (monotone, exact at character boundaries, approximate inside a rewritten character).

The fast path is vectorized (one table lookup, one ``bytes.join`` and one comparison per text); only mismatching
texts take the per-token Python walk.

Prompt + completion (`encode_prompt_completion`): the two parts are tokenized *separately* and concatenated,
because the completion must start at a token boundary: a token merging the prompt's last bytes with the
completion's first bytes would belong to neither side and break the loss span. This is also what generation
produces (the sampled ids follow the prompt ids). The prompt gets the special tokens the tokenizer's
post-processor puts *before* the text (BOS), never the ones after it (EOS/SEP); by default they are not added
again when the rendered prompt already starts with them (chat templates often write ``<bos>`` themselves). The
completion gets none, and is tokenized with special-token parsing off (`plain_text`): it is data, so
``<|im_end|>`` inside it is text, never a control token; prompt spans that are user data can be marked the same
way (``plain_spans``, see `logitcache.prompts`). Trade-off: with a dummy-prefix tokenizer the completion's first
token carries the prefix (``▁Hello`` for ``Hello``), which is how such tokenizers see any text start.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

import numpy as np

__all__ = [
    "TokenBytes",
    "TokenizationMismatchError",
    "byte_offsets_for_ids",
    "chat_template_hash",
    "encode_batch_with_byte_offsets",
    "encode_prompt_completion",
    "encode_prompt_completion_batch",
    "encode_with_byte_offsets",
    "plain_text",
    "special_parsing",
    "token_bytes_info",
    "token_bytes_table",
    "tokenizer_fingerprint",
    "tokenizer_name",
]

OnMismatch = Literal["raise", "char_offsets"]
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenizationMismatchError(ValueError):
    """The tokens' bytes do not reproduce the text; the message says where and what differed."""


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


def _backend(tokenizer: Any) -> Any:
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


def _info(tokenizer: Any, ids: list[int] | None = None) -> TokenBytes:
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
    backend = _backend(tokenizer)
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
    backend = _backend(tokenizer)
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


# --------------------------------------------------------------------------------------------------- encoding


def _char_to_byte(text: str, text_b: bytes) -> np.ndarray:
    """``out[c]`` = byte offset of character ``c`` (and ``out[len(text)] = len(text_b)``)."""
    if len(text) == len(text_b):
        return np.arange(len(text) + 1, dtype=np.int64)
    arr = np.frombuffer(text_b, np.uint8)
    starts = np.flatnonzero((arr & 0xC0) != 0x80)
    return np.append(starts, len(text_b)).astype(np.int64)


def _mismatch(info: TokenBytes, sample: object, text_b: bytes, got: bytes, hint: str = "") -> str:
    pos = next((k for k, (a, b) in enumerate(zip(text_b, got)) if a != b), min(len(text_b), len(got)))
    lo = max(0, pos - 12)
    where = f"sample {sample}: " if sample is not None else ""
    return (
        f"{where}tokenizer {info.name!r} ({info.kind}) does not reproduce the text: first difference at byte {pos} "
        f"(text {text_b[lo:pos + 12]!r} vs tokens {got[lo:pos + 12]!r}; {len(text_b)} vs {len(got)} bytes){hint}; "
        "fix: use a tokenizer that round-trips the text, or pass on_mismatch='char_offsets'"
    )


def _walk(
    info: TokenBytes, ids: list[int], text_b: bytes, zero: list[bool], spans: list[tuple[int, int] | None],
    dummy_after_added: bool = True,
) -> tuple[np.ndarray, int, bytes]:
    """Per-token match of ``ids`` against ``text_b``; returns (offsets, bytes matched, bytes the tokens wrote).

    ``zero[k]``: token k covers no bytes (inserted by the post-processor). ``spans[k]``: a known byte span
    (added token matched in the text, ``<unk>``). Special tokens without a span match their content when the text
    has it at the cursor, else cover zero bytes. Metaspace pieces match ``▁`` as a space or a literal ``▁``, and
    their first ``▁`` may be a dummy prefix (zero bytes) at the text start or after an added token: tried first
    when a normalizer prepends unconditionally, else only when the literal match fails (a Metaspace
    pre-tokenizer does not prepend to text that already starts with a space). ``dummy_after_added=False`` allows
    no dummy after an added token: a special token's text encoded as plain text (special parsing off) can be a
    vocabulary piece, after which no dummy is prepended; callers retry with it when the first walk fails.
    """
    offs = np.zeros(len(ids), np.int64)
    cur = 0
    dummy_ok = True
    repl_b = info.replacement.encode("utf-8")
    for k, tid in enumerate(ids):
        offs[k] = cur
        if zero[k]:
            continue
        span = spans[k]
        if span is not None:
            if span[0] != cur:
                return offs, cur, text_b[:cur] + info.pieces[tid]
            cur, dummy_ok = span[1], dummy_after_added
            continue
        piece = info.pieces[tid]
        raw = info.raw[tid]
        if dummy_ok and info.dummy_first and raw.startswith(info.replacement):
            end = _match_metaspace(raw, info.replacement, repl_b, text_b, cur, skip_first=True)
            if end >= 0:
                cur, dummy_ok = end, False
                continue
        if info.special[tid] or info.added[tid]:
            if text_b.startswith(piece, cur):
                cur += len(piece)
            elif not info.special[tid]:
                return offs, cur, text_b[:cur] + piece
            dummy_ok = dummy_after_added
            continue
        if text_b.startswith(piece, cur):
            cur += len(piece)
            dummy_ok = False
            continue
        end = -1
        if info.kind == "metaspace" and not info.byte_fallback[tid]:
            end = _match_metaspace(raw, info.replacement, repl_b, text_b, cur, skip_first=False)
            if end < 0 and dummy_ok and not info.dummy_first and raw.startswith(info.replacement):
                end = _match_metaspace(raw, info.replacement, repl_b, text_b, cur, skip_first=True)
        if end < 0:
            return offs, cur, text_b[:cur] + piece
        cur, dummy_ok = end, False
    return offs, cur, text_b[:cur]


def _match_metaspace(raw: str, repl: str, repl_b: bytes, text_b: bytes, cur: int, skip_first: bool) -> int:
    j = cur
    for n, ch in enumerate(raw):
        if ch == repl:
            if skip_first and n == 0:
                continue
            if text_b.startswith(b" ", j):
                j += 1
            elif text_b.startswith(repl_b, j):
                j += len(repl_b)
            else:
                return -1
        else:
            cb = ch.encode("utf-8")
            if not text_b.startswith(cb, j):
                return -1
            j += len(cb)
    return j


def _from_char_offsets(enc_offsets: list[tuple[int, int]], zero: list[bool], widths: np.ndarray,
                       c2b: np.ndarray) -> np.ndarray:
    """Fallback: byte starts from character offsets, split inside a character by token widths, kept monotone.

    Tokens sharing one character span (a character split over byte-level or byte-fallback tokens) are placed at
    the span start plus the widths of the earlier ones, clamped inside the span; zero-width tokens start where
    the previous token ended. Bytes no token covers (characters the tokenizer dropped) go to the token before
    them, or to the first token.
    """
    n = len(enc_offsets)
    offs = np.zeros(n, np.int64)
    pos = 0  # where the previous token ended
    last = 0  # the previous token's start (offsets stay monotone)
    prev: tuple[int, int] | None = None
    for k in range(n):
        if zero[k]:
            offs[k] = last = max(pos, last)
            continue
        span = enc_offsets[k]
        bs, be = int(c2b[span[0]]), int(c2b[span[1]])
        start = min(pos, max(be - 1, bs)) if span == prev else (bs if prev is not None else 0)
        offs[k] = last = max(start, last)
        pos = min(last + int(widths[k]), be) if be > bs else last
        prev = span
    return offs


def _offsets_from_encoding(
    info: TokenBytes, enc: Any, ids: list[int], arr: np.ndarray, text: str, text_b: bytes, specials: bool,
    on_mismatch: OnMismatch, sample: object,
) -> np.ndarray:
    """Byte starts for one encoding (``ids``/``arr``: its ids as list and array; ``specials``: add_special_tokens)."""
    n = len(ids)
    if n == 0:
        if text_b:
            raise TokenizationMismatchError(_mismatch(info, sample, text_b, b"", " (no token at all)"))
        return np.zeros(0, np.int64)
    if int(arr.max()) >= info.size:
        raise TokenizationMismatchError(f"sample {sample}: tokenizer {info.name!r} produced id {arr.max()} outside "
                                        f"its vocabulary of {info.size}; reload the tokenizer")
    post = np.asarray(enc.special_tokens_mask, dtype=bool) if specials else np.zeros(n, bool)
    widths = info.lengths[arr]
    parts = [info.pieces[i] for i in ids]
    spans: list[tuple[int, int] | None] = [None] * n
    fixed = info.needs_span[arr]
    c2b: np.ndarray | None = None
    if specials or fixed.any():
        for k in np.flatnonzero(post).tolist():
            parts[k] = b""
        widths[post] = 0
        fixed &= ~post
        if fixed.any():
            c2b = _char_to_byte(text, text_b)
            char_offs = enc.offsets
            for k in np.flatnonzero(fixed).tolist():
                bs, be = int(c2b[char_offs[k][0]]), int(c2b[char_offs[k][1]])
                spans[k], parts[k], widths[k] = (bs, be), text_b[bs:be], be - bs
    joined = b"".join(parts)
    if joined == text_b:
        return np.concatenate(([0], np.cumsum(widths[:-1])))
    if joined[:1] == b" " and joined[1:] == text_b:  # a dummy-prefix space that is not text
        first = int(np.flatnonzero(widths > 0)[0])
        if parts[first][:1] == b" " and spans[first] is None:
            widths[first] -= 1
            return np.concatenate(([0], np.cumsum(widths[:-1])))
    tries = []
    for dummy_after_added in (True, False):
        offs, cur, got = _walk(info, ids, text_b, post.tolist(), spans, dummy_after_added)
        if cur == len(text_b) and got == text_b:
            return offs
        tries.append((cur, got))
    cur, got = tries[0]  # the usual reading explains a mismatch best
    if on_mismatch == "char_offsets":
        return _from_char_offsets(enc.offsets, post.tolist(), widths, c2b if c2b is not None else
                                  _char_to_byte(text, text_b))
    hint = "" if info.exact[arr].all() else " (some tokens have no exact byte form)"
    raise TokenizationMismatchError(_mismatch(info, sample, text_b, got if cur < len(text_b) else joined, hint))


def _encoded(tokenizer: Any, enc: Any, text: str, specials: bool, on_mismatch: OnMismatch,
             sample: object) -> tuple[list[int], np.ndarray, np.ndarray]:
    ids: list[int] = enc.ids  # each access copies the list out of Rust: read it once
    arr = np.asarray(ids, dtype=np.int32)
    info = _info(tokenizer, ids)
    offs = _offsets_from_encoding(info, enc, ids, arr, text, text.encode("utf-8"), specials, on_mismatch, sample)
    return ids, arr, offs


def encode_with_byte_offsets(
    tokenizer: Any, text: str, add_special_tokens: bool = True, *, on_mismatch: OnMismatch = "raise",
    sample: object = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize ``text``; return ``(ids int32 [n], byte_offsets int64 [n])``, the UTF-8 byte start of each token.

    Tokens that cover no bytes (a BOS the post-processor added, a lone dummy-prefix ``▁``) start where the next
    text begins. Raises `TokenizationMismatchError` (naming ``sample``) if the tokens do not reproduce the text.
    """
    enc = _backend(tokenizer).encode(text, add_special_tokens=add_special_tokens)
    _, arr, offs = _encoded(tokenizer, enc, text, add_special_tokens, on_mismatch, sample)
    return arr, offs


def encode_batch_with_byte_offsets(
    tokenizer: Any, texts: list[str], add_special_tokens: bool = True, *, on_mismatch: OnMismatch = "raise",
    samples: list[object] | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """`encode_with_byte_offsets` for many texts; the tokenizer's Rust side encodes them in parallel."""
    encs = _backend(tokenizer).encode_batch(texts, add_special_tokens=add_special_tokens)
    out = []
    for k, (text, enc) in enumerate(zip(texts, encs)):
        _, arr, offs = _encoded(tokenizer, enc, text, add_special_tokens, on_mismatch,
                                samples[k] if samples is not None else k)
        out.append((arr, offs))
    return out


def byte_offsets_for_ids(tokenizer: Any, ids: Any, text: str, *, sample: object = None) -> np.ndarray:
    """Byte starts of given ``ids`` (e.g. sampled by a model) whose decoding is ``text``.

    Special tokens cover their literal text when ``text`` has it at that point, else zero bytes (a generated EOS,
    a BOS). A dummy-prefix ``▁`` that a decoder stripped is tolerated. Raises `TokenizationMismatchError` when the
    ids do not spell ``text``.
    """
    ids_l = [int(i) for i in np.asarray(ids).reshape(-1)]
    info = _info(tokenizer, ids_l)
    text_b = text.encode("utf-8")
    if any(i < 0 or i >= info.size for i in ids_l):
        raise TokenizationMismatchError(f"sample {sample}: ids outside the vocabulary of tokenizer {info.name!r} "
                                        f"(size {info.size})")
    arr = np.asarray(ids_l, dtype=np.int64)
    for zero in (np.zeros(arr.size, bool), info.special[arr]):  # fast paths: specials literal / zero-width
        if b"".join(info.pieces[i] for i, z in zip(ids_l, zero) if not z) == text_b:
            widths = np.where(zero, 0, info.lengths[arr])
            return np.concatenate(([0], np.cumsum(widths[:-1]))).astype(np.int64) if arr.size else widths
    n = len(ids_l)
    for dummy_after_added in (True, False):
        offs, cur, got = _walk(info, ids_l, text_b, [False] * n, [None] * n, dummy_after_added)
        if cur == len(text_b) and got == text_b:
            return offs
    offs, cur, got = _walk(info, ids_l, text_b, [False] * n, [None] * n)
    raise TokenizationMismatchError(_mismatch(info, sample, text_b, got))


@contextmanager
def special_parsing(tokenizer: Any, on: bool) -> Iterator[Any]:
    """The tokenizer's backend with special-token parsing ``on`` (``<|im_end|>`` in text -> its control token) or off
    (split as ordinary text: ``split_special_tokens=True`` of HF fast tokenizers).

    The switch (``tokenizers.Tokenizer.encode_special_tokens``) is the backend's own state, which a
    ``tokenizer(..., split_special_tokens=True)`` call elsewhere leaves set; so it is set for the block, whatever
    it was, and restored after it.
    """
    backend = _backend(tokenizer)
    before = getattr(backend, "encode_special_tokens", None)
    if before is None or before == (not on):
        yield backend
        return
    backend.encode_special_tokens = not on
    try:
        yield backend
    finally:
        backend.encode_special_tokens = before


def plain_text(tokenizer: Any) -> Any:
    """`special_parsing` off: the way every input text that is data (not template markup) is tokenized."""
    return special_parsing(tokenizer, on=False)


def _encode_prompt(
    tokenizer: Any, p_enc: Any, prompt_text: str, plain_spans: Sequence[tuple[int, int]], on_mismatch: OnMismatch,
    sample: object,
) -> tuple[list[int], np.ndarray, np.ndarray]:
    """The prompt's ids and byte offsets; the characters in ``plain_spans`` are encoded with specials off.

    Without spans this is ``p_enc`` (one encoding of the whole prompt). With spans the prompt is cut at them and
    each piece encoded on its own (template text with its markers special, the spans as plain text), so tokens
    cannot merge across a cut: the price of keeping a user's ``<|im_end|>`` text out of the control tokens.
    """
    if not plain_spans:
        return _encoded(tokenizer, p_enc, prompt_text, False, on_mismatch, sample)
    cuts: list[tuple[int, int, bool]] = []
    cur = 0
    for lo, hi in sorted(plain_spans):
        if lo < cur or hi > len(prompt_text) or lo > hi:
            raise ValueError(f"sample {sample}: plain-text spans {sorted(plain_spans)} overlap or leave the prompt")
        cuts += [(cur, lo, False), (lo, hi, True)]
        cur = hi
    cuts.append((cur, len(prompt_text), False))
    ids: list[int] = []
    offs: list[np.ndarray] = []
    base = 0
    for lo, hi, plain in cuts:
        text = prompt_text[lo:hi]
        if not text:
            continue
        with special_parsing(tokenizer, on=not plain) as backend:
            enc = backend.encode(text, add_special_tokens=False)
        part_ids, _, part_offs = _encoded(tokenizer, enc, text, False, on_mismatch, sample)
        ids += part_ids
        offs.append(part_offs + base)
        base += len(text.encode("utf-8"))
    arr = np.asarray(ids, dtype=np.int32)
    return ids, arr, np.concatenate(offs) if offs else np.zeros(0, np.int64)


def _join_prompt_completion(
    tokenizer: Any, prompt: tuple[list[int], np.ndarray, np.ndarray], c_enc: Any, prompt_text: str,
    completion_text: str, prompt_special_tokens: bool | None, on_mismatch: OnMismatch, sample: object,
) -> tuple[np.ndarray, np.ndarray, int]:
    p_ids, p_arr, p_offs = prompt
    c_ids, c_arr, c_offs = _encoded(tokenizer, c_enc, completion_text, False, on_mismatch, sample)
    info = _info(tokenizer)
    prefix = info.prefix_ids
    if prompt_special_tokens is False or (prompt_special_tokens is None and tuple(p_ids[: len(prefix)]) == prefix):
        prefix = ()
    prompt_len = len(prefix) + len(p_ids)
    if prompt_len == 0 and c_ids:
        raise TokenizationMismatchError(
            f"sample {sample}: the prompt encodes to no token with tokenizer {info.name!r} (empty prompt and no "
            "BOS), so the first completion token has no predicting position; fix: give a non-empty prompt"
        )
    ids = np.concatenate([np.asarray(prefix, np.int32), p_arr, c_arr])
    offs = np.concatenate([np.zeros(len(prefix), np.int64), p_offs, c_offs + len(prompt_text.encode("utf-8"))])
    return ids, offs, prompt_len


def encode_prompt_completion(
    tokenizer: Any, prompt_text: str, completion_text: str, *, prompt_special_tokens: bool | None = None,
    on_mismatch: OnMismatch = "raise", sample: object = None, plain_spans: Sequence[tuple[int, int]] = (),
) -> tuple[np.ndarray, np.ndarray, int]:
    """Tokenize prompt and completion separately and concatenate: ``(ids int32, byte_offsets int64, prompt_len)``.

    Offsets are into ``(prompt_text + completion_text).encode()``. The prompt gets the special tokens the
    post-processor puts before the text (BOS) when ``prompt_special_tokens`` is True; None (default) adds them
    unless the prompt already starts with them; False never. The completion gets none, so it starts at a token
    boundary at byte ``len(prompt_text.encode())``. Raises when the prompt encodes to no token but the completion
    is not empty (the first completion token would have no predicting position).

    The completion is data, never markup: it is tokenized with special-token parsing off (``<|im_end|>`` in it is
    text, not a control token). The prompt is tokenized with it on (a chat template's own markers), except the
    character spans ``plain_spans`` (user content that holds special-token text; see `_encode_prompt`).
    """
    with special_parsing(tokenizer, on=True) as backend:
        p_enc = None if plain_spans else backend.encode(prompt_text, add_special_tokens=False)
    with plain_text(tokenizer) as plain:
        c_enc = plain.encode(completion_text, add_special_tokens=False)
    prompt = _encode_prompt(tokenizer, p_enc, prompt_text, plain_spans, on_mismatch, sample)
    return _join_prompt_completion(tokenizer, prompt, c_enc, prompt_text, completion_text, prompt_special_tokens,
                                   on_mismatch, sample)


def encode_prompt_completion_batch(
    tokenizer: Any, prompts: list[str], completions: list[str], *, prompt_special_tokens: bool | None = None,
    on_mismatch: OnMismatch = "raise", samples: list[object] | None = None,
) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """`encode_prompt_completion` over many pairs; the Rust side encodes all texts in parallel (its own threads).

    A text that does not round-trip raises for the whole batch (naming its sample); call the single-pair function
    per sample to skip bad ones.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    with special_parsing(tokenizer, on=True) as backend:
        p_encs = backend.encode_batch(list(prompts), add_special_tokens=False)
    with plain_text(tokenizer) as plain:
        c_encs = plain.encode_batch(list(completions), add_special_tokens=False)
    out = []
    for k in range(len(prompts)):
        sample = samples[k] if samples is not None else k
        prompt = _encoded(tokenizer, p_encs[k], prompts[k], False, on_mismatch, sample)
        out.append(_join_prompt_completion(tokenizer, prompt, c_encs[k], prompts[k], completions[k],
                                           prompt_special_tokens, on_mismatch, sample))
    return out
