"""How records map onto stored columns: position parts (via codecs) and the per-shard sequence table.

Position fields and their stored array names (one array per codec part, ``<field>.<part>``):

====================  =========================  ==========================================
field                 stored as                  decoded
====================  =========================  ==========================================
``topk_ids``          id codec parts             int32 ``[n, K]``
``topk_logprobs``     logprob codec parts        float32 ``[n, K]``, rows sorted descending
``target_ids``        ``target_ids`` int32       int32 ``[n]``
``target_logprobs``   ``target_logprobs`` f32    float32 ``[n]`` (exact, never quantized)
``lse@<tau>``         ``lse@<tau>`` float32      float32 ``[n]`` per extra temperature
``logit_mean``        ``logit_mean`` float32     float32 ``[n]`` (only with ``logit_moments``)
``logit_std``         ``logit_std`` float32      float32 ``[n]`` (only with ``logit_moments``)
``tail_ids``          ``tail_ids`` int32         int32 ``[n, N]`` (only with ``tail_samples`` N > 0)
``tail_logprobs``     ``tail_logprobs`` float32  float32 ``[n, N]`` (only with ``tail_samples`` N > 0)
====================  =========================  ==========================================

Format v2 codecs may also have *shard-level* parts (the ``rank`` id codec's ``dict``): 1-D arrays stored once per
shard, listed in the marker's ``tables`` (``split_shard_parts``), and handed to the codec with the row parts.

The sequence table is one Parquet file per shard, one row per sequence, in the order the sequences were
written; ``row_start``/``row_count`` index the shard's position arrays.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa

from .codecs import IdCodec, LogprobCodec, shard_parts
from .records import PositionRows, SequenceRecord

SEQUENCE_SCHEMA = pa.schema(
    [
        ("sample_id", pa.int64()),
        ("source_id", pa.string()),
        ("prompt_text", pa.large_string()),
        ("completion_text", pa.large_string()),
        ("token_ids", pa.list_(pa.int32())),
        ("token_byte_offsets", pa.list_(pa.int64())),
        ("prompt_len", pa.int32()),
        ("finish_reason", pa.string()),
        ("row_start", pa.int64()),
        ("row_count", pa.int64()),
        ("messages", pa.large_string()),
    ]
)


def lse_name(tau: float) -> str:
    return f"lse@{float(tau):g}"


def encode_rows(
    rows: PositionRows,
    id_codec: IdCodec,
    lp_codec: LogprobCodec,
    temperatures: list[float],
    moments: bool = False,
    tail: int = 0,
) -> dict[str, np.ndarray]:
    parts: dict[str, np.ndarray] = {}
    for name, arr in id_codec.encode(rows.topk_ids).items():
        parts[f"topk_ids.{name}"] = arr
    for name, arr in lp_codec.encode(rows.topk_logprobs).items():
        parts[f"topk_logprobs.{name}"] = arr
    parts["target_ids"] = rows.target_ids
    parts["target_logprobs"] = rows.target_logprobs
    for tau in temperatures:
        parts[lse_name(tau)] = rows.extra_lse[float(tau)]
    if moments:
        if rows.logit_mean is None or rows.logit_std is None:
            raise ValueError("the cache records logit moments but these rows carry none")
        parts["logit_mean"], parts["logit_std"] = rows.logit_mean, rows.logit_std
    if tail:
        if rows.tail_ids is None or rows.tail_logprobs is None or rows.tail_samples != tail:
            raise ValueError(f"the cache records {tail} tail draws per position, these rows {rows.tail_samples}")
        parts["tail_ids"], parts["tail_logprobs"] = rows.tail_ids, rows.tail_logprobs
    return parts


def split_shard_parts(
    parts: dict[str, np.ndarray], id_codec: IdCodec, lp_codec: LogprobCodec
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(row parts, shard-level parts)`` of ``encode_rows``' output: format v2 codecs (``rank``) have parts with
    one entry per dictionary item rather than per row; they are stored once per shard (the marker's ``tables``)."""
    tables = {f"topk_ids.{p}" for p in shard_parts(id_codec)} | {f"topk_logprobs.{p}" for p in shard_parts(lp_codec)}
    return (
        {name: a for name, a in parts.items() if name not in tables},
        {name: a for name, a in parts.items() if name in tables},
    )


def decode_rows(
    parts: dict[str, np.ndarray],
    id_codec: IdCodec,
    lp_codec: LogprobCodec,
    temperatures: list[float],
    k: int,
    moments: bool = False,
    tail: int = 0,
) -> PositionRows:
    def sub(prefix: str) -> dict[str, np.ndarray]:
        return {name[len(prefix) + 1 :]: a for name, a in parts.items() if name.startswith(prefix + ".")}

    return PositionRows(
        topk_ids=id_codec.decode(sub("topk_ids"), k),
        topk_logprobs=lp_codec.decode(sub("topk_logprobs"), k),
        target_ids=parts["target_ids"],
        target_logprobs=parts["target_logprobs"],
        extra_lse={float(t): parts[lse_name(t)] for t in temperatures},
        logit_mean=parts["logit_mean"] if moments else None,
        logit_std=parts["logit_std"] if moments else None,
        tail_ids=parts["tail_ids"] if tail else None,
        tail_logprobs=parts["tail_logprobs"] if tail else None,
    )


def part_specs(parts: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """``{name: {"dtype", "shape"}}`` of encoded parts (shape without the leading row dimension)."""
    return {name: {"dtype": a.dtype.str, "shape": list(a.shape[1:])} for name, a in parts.items()}


def table_specs(tables: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """``{name: {"dtype", "length"}}`` of shard-level parts (1-D arrays)."""
    return {name: {"dtype": a.dtype.str, "length": int(a.shape[0])} for name, a in tables.items()}


def sequence_table(records: list[SequenceRecord]) -> pa.Table:
    starts = np.cumsum([0] + [r.rows.n for r in records])[:-1]
    return pa.table(
        {
            "sample_id": pa.array([r.sample_id for r in records], pa.int64()),
            "source_id": pa.array([r.source_id for r in records], pa.string()),
            "prompt_text": pa.array([r.prompt_text for r in records], pa.large_string()),
            "completion_text": pa.array([r.completion_text for r in records], pa.large_string()),
            "token_ids": pa.array([r.token_ids for r in records], pa.list_(pa.int32())),
            "token_byte_offsets": pa.array([r.token_byte_offsets for r in records], pa.list_(pa.int64())),
            "prompt_len": pa.array([r.prompt_len for r in records], pa.int32()),
            "finish_reason": pa.array([r.finish_reason for r in records], pa.string()),
            "row_start": pa.array(starts, pa.int64()),
            "row_count": pa.array([r.rows.n for r in records], pa.int64()),
            "messages": pa.array(
                [None if r.messages is None else json.dumps(r.messages, ensure_ascii=False) for r in records],
                pa.large_string(),
            ),
        },
        schema=SEQUENCE_SCHEMA,
    )


def list_column(table: pa.Table, name: str, i: int, dtype: type) -> np.ndarray:
    col = table.column(name)
    return np.asarray(col[i].values.to_numpy(zero_copy_only=False), dtype=dtype)


def record_from_table(table: pa.Table, i: int, rows: PositionRows) -> SequenceRecord:
    """Rebuild sequence ``i`` of a shard's sequence table, attaching its already-read rows."""
    return SequenceRecord(
        sample_id=int(table.column("sample_id")[i].as_py()),
        source_id=table.column("source_id")[i].as_py(),
        prompt_text=table.column("prompt_text")[i].as_py(),
        completion_text=table.column("completion_text")[i].as_py(),
        token_ids=list_column(table, "token_ids", i, np.int32),
        token_byte_offsets=list_column(table, "token_byte_offsets", i, np.int64),
        prompt_len=int(table.column("prompt_len")[i].as_py()),
        finish_reason=table.column("finish_reason")[i].as_py(),
        rows=rows,
        messages=json.loads(m) if (m := table.column("messages")[i].as_py()) is not None else None,
    )
