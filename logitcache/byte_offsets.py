"""Token ids *and* exact UTF-8 byte offsets from a Hugging Face tokenizer, verified against the text.

Why not ``return_offsets_mapping``: character offsets cannot place the three ``<0xE2><0x82><0xAC>`` tokens of a
byte-fallback ``€`` (nor the byte-level halves of an emoji) and they overlap or skip whitespace for some
pre-tokenizers. Instead each token's bytes come from the tokenizer's byte table (`logitcache.token_bytes`); at
encode time a special token that the post-processor inserted (BOS, a template's SEP) covers zero bytes, and one
that the tokenizer matched in the text covers its text span.

An encoding is then *verified*: the tokens' bytes, concatenated, must reproduce the input bytes, and the byte
offsets are their running sum. Known deviations are resolved, not guessed: a dummy-prefix space that a
SentencePiece normalizer/pre-tokenizer prepends (``add_dummy_prefix``, ``prepend_scheme``) belongs to no text, so
the token carrying it starts where the text starts; a literal ``▁`` in the text is matched as such. Anything else
(a normalizer that rewrites the text, such as Qwen's NFC, or ``<unk>`` without byte fallback) raises
`TokenizationMismatchError`, naming the sample, the tokenizer, the first differing byte offset and a snippet;
``on_mismatch="char_offsets"`` opts into a fallback that derives byte starts from the tokenizer's character
offsets instead (monotone, exact at character boundaries, approximate inside a rewritten character).

The fast path is vectorized (one table lookup, one ``bytes.join`` and one comparison per text); only mismatching
texts take the per-token Python walk. `byte_offsets_for_ids` does the same for ids that did not come from encoding
a text (a model's samples), checked against their decoding.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from logitcache.token_bytes import TokenBytes, cached_token_bytes, fast_backend

__all__ = [
    "OnMismatch",
    "TokenizationMismatchError",
    "byte_offsets_for_ids",
    "encode_batch_with_byte_offsets",
    "encode_with_byte_offsets",
    "encoded_with_offsets",
]

OnMismatch = Literal["raise", "char_offsets"]


class TokenizationMismatchError(ValueError):
    """The tokens' bytes do not reproduce the text; the message says where and what differed."""



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


def encoded_with_offsets(tokenizer: Any, enc: Any, text: str, specials: bool, on_mismatch: OnMismatch,
                         sample: object) -> tuple[list[int], np.ndarray, np.ndarray]:
    """``(ids list, ids int32, byte starts int64)`` of an ``Encoding`` of ``text`` made by ``tokenizer``'s backend.

    ``specials``: the encoding was made with ``add_special_tokens`` (its special-token mask marks inserted tokens).
    """
    ids: list[int] = enc.ids  # each access copies the list out of Rust: read it once
    arr = np.asarray(ids, dtype=np.int32)
    info = cached_token_bytes(tokenizer, ids)
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
    enc = fast_backend(tokenizer).encode(text, add_special_tokens=add_special_tokens)
    _, arr, offs = encoded_with_offsets(tokenizer, enc, text, add_special_tokens, on_mismatch, sample)
    return arr, offs


def encode_batch_with_byte_offsets(
    tokenizer: Any, texts: list[str], add_special_tokens: bool = True, *, on_mismatch: OnMismatch = "raise",
    samples: list[object] | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """`encode_with_byte_offsets` for many texts; the tokenizer's Rust side encodes them in parallel."""
    encs = fast_backend(tokenizer).encode_batch(texts, add_special_tokens=add_special_tokens)
    out = []
    for k, (text, enc) in enumerate(zip(texts, encs)):
        _, arr, offs = encoded_with_offsets(tokenizer, enc, text, add_special_tokens, on_mismatch,
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
    info = cached_token_bytes(tokenizer, ids_l)
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
