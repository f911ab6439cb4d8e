"""Turn the teacher's outputs back into cache records (stage one).

Score mode: the prepared prompt + response with the engine's rows, unchanged. Generate mode: the completion text
is the concatenated bytes of the sampled tokens (special tokens by their literal text, the final EOS by none).
Sampled bytes that are not valid UTF-8 (a character cut by the token limit, or garbage from a weak model) cannot
be stored as text: the completion is cut to its longest prefix of whole tokens that decodes (a token boundary at or
before the first invalid byte that splits no character), and the cut is counted (``cut_invalid_utf8``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from logitcache.prompts import Prepared
from logitcache.storage.records import PositionRows, SequenceRecord
from logitcache.tokenization import byte_offsets_for_ids, token_bytes_info


def valid_utf8_prefix(tokenizer: Any, ids: np.ndarray, eos_ids: set[int]) -> tuple[int, bytes]:
    """(number of leading ids to keep, their bytes): the longest prefix of whole tokens whose bytes decode.

    A final end token (one of ``eos_ids``) writes no bytes and is kept when everything before it decodes. Otherwise
    the cut is the last token boundary that is at or before the first invalid byte *and* not inside a character:
    a token may end with the first byte of a character that the next token completes (``b'\\xc8'`` +
    ``b'\\x8d\\xf0\\x9f'``), so the boundary just before the error can still split a character. No longer prefix
    decodes (Python reports the start of the first undecodable sequence; every longer prefix contains it).
    """
    info = token_bytes_info(tokenizer)
    ids_l = [int(i) for i in ids]
    body = ids_l[:-1] if ids_l and ids_l[-1] in eos_ids else ids_l
    pieces = [info.pieces[i] if 0 <= i < info.size else b"" for i in body]
    data = b"".join(pieces)
    try:
        data.decode("utf-8")
        return len(ids_l), data
    except UnicodeDecodeError as e:
        bad = e.start
    ends = [0]  # ends[k]: bytes of the first k tokens
    for piece in pieces:
        if ends[-1] + len(piece) > bad:
            break
        ends.append(ends[-1] + len(piece))
    for keep in range(len(ends) - 1, -1, -1):
        # data[:bad] decodes, so a boundary inside it decodes iff it does not split a character
        if ends[keep] == bad or ends[keep] == 0 or (data[ends[keep]] & 0xC0) != 0x80:
            return keep, data[: ends[keep]]
    return 0, b""


def generated_record(
    tokenizer: Any,
    p: Prepared,
    completion_ids: np.ndarray,
    finish_reason: str,
    rows: PositionRows,
    eos_ids: set[int],
    counters: dict[str, int],
) -> SequenceRecord:
    keep, data = valid_utf8_prefix(tokenizer, completion_ids, eos_ids)
    if keep < len(completion_ids):
        counters["cut_invalid_utf8"] = counters.get("cut_invalid_utf8", 0) + 1
        completion_ids, rows, finish_reason = completion_ids[:keep], rows.slice(0, keep), "length"
    text = data.decode("utf-8")
    offs = byte_offsets_for_ids(tokenizer, completion_ids, text, sample=p.record.sample_id)
    base = len(p.prompt_text.encode("utf-8"))
    return SequenceRecord(
        sample_id=p.record.sample_id,
        source_id=p.record.source_id,
        prompt_text=p.prompt_text,
        completion_text=text,
        token_ids=np.concatenate([p.token_ids, completion_ids]).astype(np.int32),
        token_byte_offsets=np.concatenate([p.byte_offsets, offs + base]),
        prompt_len=p.prompt_len,
        finish_reason=finish_reason,
        rows=rows,
        messages=p.messages,
    )


def scored_record(p: Prepared, rows: PositionRows) -> SequenceRecord:
    return SequenceRecord(
        sample_id=p.record.sample_id,
        source_id=p.record.source_id,
        prompt_text=p.prompt_text,
        completion_text=p.completion_text,
        token_ids=p.token_ids,
        token_byte_offsets=p.byte_offsets,
        prompt_len=p.prompt_len,
        finish_reason="score",
        rows=rows,
        messages=p.messages,
    )
