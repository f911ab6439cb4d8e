"""Prompt + completion encoding with exact byte offsets, special-token parsing, and the tokenization entry point.

This module is the public face of the three tokenization modules: it re-exports the vocabulary byte tables and
fingerprints (`logitcache.token_bytes`) and the verified single-text encoders (`logitcache.byte_offsets`), so
callers import everything from ``logitcache.tokenization``.

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

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from logitcache.byte_offsets import (
    OnMismatch,
    TokenizationMismatchError,
    byte_offsets_for_ids,
    encode_batch_with_byte_offsets,
    encode_with_byte_offsets,
    encoded_with_offsets,
)
from logitcache.token_bytes import (
    TokenBytes,
    cached_token_bytes,
    chat_template_hash,
    fast_backend,
    token_bytes_info,
    token_bytes_table,
    tokenizer_fingerprint,
    tokenizer_name,
)

__all__ = [
    "OnMismatch",
    "TokenBytes",
    "TokenizationMismatchError",
    "byte_offsets_for_ids",
    "chat_template_hash",
    "encode_batch_with_byte_offsets",
    "encode_prompt_completion",
    "encode_prompt_completion_batch",
    "encode_with_byte_offsets",
    "fast_backend",
    "plain_text",
    "special_parsing",
    "token_bytes_info",
    "token_bytes_table",
    "tokenizer_fingerprint",
    "tokenizer_name",
]


@contextmanager
def special_parsing(tokenizer: Any, on: bool) -> Iterator[Any]:
    """The tokenizer's backend with special-token parsing ``on`` (``<|im_end|>`` in text -> its control token) or off
    (split as ordinary text: ``split_special_tokens=True`` of HF fast tokenizers).

    The switch (``tokenizers.Tokenizer.encode_special_tokens``) is the backend's own state, which a
    ``tokenizer(..., split_special_tokens=True)`` call elsewhere leaves set; so it is set for the block, whatever
    it was, and restored after it.
    """
    backend = fast_backend(tokenizer)
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
        return encoded_with_offsets(tokenizer, p_enc, prompt_text, False, on_mismatch, sample)
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
        part_ids, _, part_offs = encoded_with_offsets(tokenizer, enc, text, False, on_mismatch, sample)
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
    c_ids, c_arr, c_offs = encoded_with_offsets(tokenizer, c_enc, completion_text, False, on_mismatch, sample)
    info = cached_token_bytes(tokenizer)
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
        prompt = encoded_with_offsets(tokenizer, p_encs[k], prompts[k], False, on_mismatch, sample)
        out.append(_join_prompt_completion(tokenizer, prompt, c_encs[k], prompts[k], completions[k],
                                           prompt_special_tokens, on_mismatch, sample))
    return out
