"""``logitcache export CACHE --format F --out DIR``: a cache as the files other trainers read.

One output file per cache shard (``data_<shard>.parquet`` / ``part-<shard>.jsonl``), written to a temporary name
and renamed, so a killed export resumes by skipping the files already there; ``export_config.json`` records the
config, the cache's fingerprint and the consumer each format is for. A shard is converted in one vectorized pass
(its sequence table and all its rows at once); only ``openai-logprobs`` builds JSON per token.

Row layouts (the cache stores rows only for the completion; ``P`` = prompt length, ``n`` = tokens):

- ``topk-parquet``: per sequence ``input_ids`` (n), ``labels`` (-100 over the prompt, else the token),
  ``messages`` (the input conversation), ``text``, and ``target_token_ids`` / ``logprobs``: ``n - 1`` entries,
  entry ``p`` being the distribution of token ``p + 1``; prompt entries (``p < P - 1``) are padding
  (ids ``0..K-1``, logprobs ``-inf``), as axolotl pads (``integrations/kd/chat_template.py``).
- ``distillkit``: DistillKit's schema (``input_ids`` list<uint64>, ``compressed_logprobs`` and
  ``bytepacked_indices`` list<list<uint8>>) with ``n - 1`` rows per sequence, and ``compression_config.yaml``.
  DistillKit trains every row, so prompt rows are one-hot on the realized token (logprob 0, the rest ``-inf``):
  they teach the data, not the teacher. Default compression: K exact float32 values (lossless);
  ``--distillkit-config`` compresses with any DistillKit config (values then clamped to >= -1e4, since its delta
  encoding cannot difference infinities). ``--distillkit-labels`` adds a ``labels`` column so that an import
  restores the prompt/completion split.
- ``openai-logprobs``: one chat completion per line, ``choices[0].logprobs.content[j]`` for completion token ``j``
  (``token``, ``bytes``, ``logprob`` of the realized token, ``top_logprobs``), ``-inf`` written as ``-9999.0``
  (OpenAI's floor), and the request ``messages`` beside it.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from logitcache.config import ConfigError, to_dict
from logitcache.storage import LogitCache

from .distillkit_codec import DistillKitConfig, compress_logprobs, exact_config, pack_bits, vocab_size_for
from .interop_config import ExportConfig

CONSUMERS = {
    "topk-parquet": "axolotl KD (integrations/kd, chat_template.load / KDStrategyLoaderV2: logprobs + "
    "target_token_ids + messages); any reader of per-position top-k lists",
    "distillkit": "arcee-ai/DistillKit offline distillation (teacher dataset + logprob_compressor config; "
    "LogprobCompressor.decompress_to_sparse)",
    "openai-logprobs": "readers of OpenAI / vLLM chat completions with logprobs (axolotl's legacy KD loader reads "
    "the token_id:N form)",
}


def _list(offsets: np.ndarray, values: pa.Array) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), values)


def _nested(outer: np.ndarray, rows: np.ndarray, typ: pa.DataType) -> pa.Array:
    """``[E, W]`` rows grouped by ``outer`` offsets: list<list<typ>>."""
    e, w = rows.shape
    inner = _list(np.arange(e + 1, dtype=np.int64) * w, pa.array(rows.reshape(-1), type=typ))
    return _list(outer, inner)


class ShardView:
    """One cache shard as flat numpy arrays: tokens, prompt lengths, rows, and where each sequence's rows go."""

    def __init__(self, cache: LogitCache, index: int) -> None:
        self.table = cache.sequence_table(index)
        tok = self.table.column("token_ids").combine_chunks()
        offs = tok.offsets.to_numpy().astype(np.int64)
        self.tok_offsets = offs - offs[0]
        self.tokens = tok.flatten().to_numpy().astype(np.int64)
        self.n = np.diff(self.tok_offsets)
        self.p = self.table.column("prompt_len").to_numpy().astype(np.int64)
        self.row_start = self.table.column("row_start").to_numpy().astype(np.int64)
        self.row_count = self.table.column("row_count").to_numpy().astype(np.int64)
        total = int(self.row_count.sum())
        self.rows = cache.read_rows(index, 0, total) if total else None
        self.k = cache.top_k

    def entries(self, fill_ids: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(outer offsets, ids ``[E, K]``, logprobs ``[E, K]``): ``n - 1`` entries per sequence, entry ``p``
        predicting token ``p + 1``; prompt entries padded (``fill_ids``: ``range`` or ``onehot``)."""
        m = np.maximum(self.n - 1, 0)
        outer = np.concatenate(([0], np.cumsum(m)))
        e = int(outer[-1])
        ids = np.tile(np.arange(self.k, dtype=np.int64), (e, 1)) if fill_ids == "range" else np.zeros((e, self.k),
                                                                                                    np.int64)
        lps = np.full((e, self.k), -np.inf, np.float32)
        if fill_ids == "onehot" and e:  # prompt entries: the realized next token with probability 1
            seq = np.repeat(np.arange(len(m)), m)
            pos = np.arange(e) - outer[:-1][seq]
            ids[:, 0] = self.tokens[self.tok_offsets[seq] + pos + 1]
            lps[:, 0] = 0.0
        if self.rows is not None:
            dest = np.repeat(outer[:-1] + self.p - 1 - self.row_start, self.row_count) + np.arange(self.rows.n)
            ids[dest] = self.rows.topk_ids
            lps[dest] = self.rows.topk_logprobs
        return outer, ids, lps

    def labels(self) -> np.ndarray:
        seq = np.repeat(np.arange(len(self.n)), self.n)
        pos = np.arange(len(self.tokens)) - self.tok_offsets[:-1][seq]
        return np.where(pos < self.p[seq], -100, self.tokens)


def _messages(table: pa.Table) -> list[list[dict[str, str]] | None]:
    return [json.loads(m) if m else None for m in table.column("messages").to_pylist()]


def _write_parquet(table: pa.Table, path: str) -> None:
    tmp = path + ".tmp"
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


def export_topk(cfg: ExportConfig, cache: LogitCache, index: int, path: str) -> int:
    v = ShardView(cache, index)
    outer, ids, lps = v.entries("range")
    t = v.table
    empty = pa.scalar("", pa.large_string())
    texts = pc.binary_join_element_wise(t.column("prompt_text"), t.column("completion_text"), empty)
    msg_type = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    table = pa.table({
        "sample_id": t.column("sample_id"),
        "source_id": t.column("source_id"),
        "messages": pa.array(_messages(t), type=msg_type),
        "text": texts,
        cfg.ids_field: _list(v.tok_offsets, pa.array(v.tokens.astype(np.int32))),
        "labels": _list(v.tok_offsets, pa.array(v.labels().astype(np.int32))),
        cfg.topk_ids_field: _nested(outer, ids.astype(np.int32), pa.int32()),
        cfg.topk_logprobs_field: _nested(outer, lps, pa.float32()),
    })
    _write_parquet(table, path)
    return int(v.row_count.sum())


def export_distillkit(cfg: ExportConfig, cache: LogitCache, index: int, path: str, dk: DistillKitConfig) -> int:
    v = ShardView(cache, index)
    outer, ids, lps = v.entries("onehot")
    if dk.delta_encoding:
        lps = np.maximum(lps, np.float32(-1e4))
    if dk.k < v.k:
        ids, lps = ids[:, : dk.k], lps[:, : dk.k]
    elif dk.k > v.k:
        raise ConfigError(f"--distillkit-config: k = {dk.k} exceeds the cache's top_k {v.k}")
    if dk.lossless and dk.exact_dtype == "float32":
        comp = np.ascontiguousarray(lps, dtype="<f4").view(np.uint8).reshape(len(lps), -1)
    else:
        comp = compress_logprobs(lps, dk)
    cols = {
        "input_ids": _list(v.tok_offsets, pa.array(v.tokens.astype(np.uint64))),
        "compressed_logprobs": _nested(outer, comp, pa.uint8()),
        "bytepacked_indices": _nested(outer, pack_bits(ids, dk.index_bits), pa.uint8()),
    }
    if cfg.distillkit_labels:
        cols["labels"] = _list(v.tok_offsets, pa.array(v.labels()))
    _write_parquet(pa.table(cols), path)
    return int(v.row_count.sum())


def _fmt(x: float) -> str:
    return "-9999.0" if not np.isfinite(x) else repr(float(x))


def export_openai(cfg: ExportConfig, cache: LogitCache, index: int, path: str, tokenizer: Any) -> int:
    from logitcache.tokenization import token_bytes_info

    info = token_bytes_info(tokenizer)
    strings = [p.decode("utf-8", "replace") for p in info.pieces]
    if cfg.token_format == "token_id":
        strings = [f"token_id:{i}" for i in range(info.size)]
    entry = [f'"token": {json.dumps(s)}, "bytes": {json.dumps(list(p))}' for s, p in zip(strings, info.pieces)]
    model = cache.header.metadata.get("teacher", {}).get("model")
    v = ShardView(cache, index)
    t = v.table
    prompts, completions = t.column("prompt_text").to_pylist(), t.column("completion_text").to_pylist()
    reasons, sids = t.column("finish_reason").to_pylist(), t.column("sample_id").to_pylist()
    msgs = _messages(t)
    tmp = path + ".tmp"
    rows = v.rows
    with open(tmp, "w", encoding="utf-8") as f:
        for i in range(len(v.n)):
            a, c = int(v.row_start[i]), int(v.row_count[i])
            targets = v.tokens[v.tok_offsets[i] + v.p[i] : v.tok_offsets[i + 1]]
            content = []
            if c:
                assert rows is not None
                tid, tlp = rows.topk_ids[a : a + c].tolist(), rows.topk_logprobs[a : a + c].tolist()
                glp = rows.target_logprobs[a : a + c].tolist()
                for j in range(c):
                    tops = ", ".join(f'{{{entry[x]}, "logprob": {_fmt(y)}}}' for x, y in zip(tid[j], tlp[j]))
                    content.append(f'{{{entry[int(targets[j])]}, "logprob": {_fmt(glp[j])}, "top_logprobs": [{tops}]}}')
            messages = msgs[i] if msgs[i] is not None else [{"role": "user", "content": prompts[i]}]
            reason = "stop" if reasons[i] in ("stop", "score") else "length"
            head = json.dumps({
                "id": f"logitcache-{sids[i]}", "object": "chat.completion", "model": model, "messages": messages,
                "prompt_text": prompts[i],
            })[:-1]
            choice = json.dumps({"index": 0, "message": {"role": "assistant", "content": completions[i]},
                                 "finish_reason": reason})[:-1]
            f.write(f'{head}, "choices": [{choice}, "logprobs": {{"content": [{", ".join(content)}]}}}}]}}\n')
    os.replace(tmp, path)
    return int(v.row_count.sum())


def run_export(cfg: ExportConfig) -> dict[str, Any]:
    """Export ``cfg.cache`` to ``cfg.out`` (one file per shard; resumes); returns a summary."""
    cache = LogitCache.open(cfg.cache)
    os.makedirs(cfg.out, exist_ok=True)
    dk = None
    tokenizer = None
    if cfg.format == "distillkit":
        d = cache.vocab_size  # DistillKit's d for the tokenizer (sample_logits_vllm.py), at least the cache's ids
        if cache.has_tokenizer():
            d = max(d, vocab_size_for(cache.load_tokenizer()))
        dk = exact_config(cache.top_k, d)
        if cfg.distillkit_config:
            import yaml

            try:
                with open(cfg.distillkit_config, encoding="utf-8") as f:
                    dk = DistillKitConfig.from_dict(yaml.safe_load(f) or {}, cfg.distillkit_config)
            except OSError as e:
                raise ConfigError(f"--distillkit-config {cfg.distillkit_config}: cannot read ({e.strerror})") from e
        if dk.d < cache.vocab_size:
            raise ConfigError(f"--distillkit-config: d = {dk.d} is smaller than the cache's vocabulary "
                              f"({cache.vocab_size})")
        import yaml

        with open(os.path.join(cfg.out, "compression_config.yaml"), "w", encoding="utf-8") as f:
            yaml.safe_dump(dk.to_dict(), f)
    if cfg.format == "openai-logprobs":
        if not cache.has_tokenizer():
            raise ConfigError(f"{cfg.cache}: has no tokenizer copy; openai-logprobs needs token strings")
        tokenizer = cache.load_tokenizer()
    with open(os.path.join(cfg.out, "export_config.json"), "w", encoding="utf-8") as f:
        json.dump({"config": to_dict(cfg), "cache_fingerprint": cache.header.fingerprint(),
                   "consumer": CONSUMERS[cfg.format], "top_k": cache.top_k,
                   "lossless": dk.lossless if dk is not None else True}, f, indent=2)
    t0 = time.perf_counter()
    written, skipped, positions = 0, 0, 0
    for s in cache.shards:
        name = f"part-{s.index:06d}.jsonl" if cfg.format == "openai-logprobs" else f"data_{s.index}.parquet"
        path = os.path.join(cfg.out, name)
        if os.path.exists(path) and not cfg.overwrite:
            skipped += 1
            continue
        if cfg.format == "topk-parquet":
            positions += export_topk(cfg, cache, s.index, path)
        elif cfg.format == "distillkit":
            assert dk is not None
            positions += export_distillkit(cfg, cache, s.index, path, dk)
        else:
            positions += export_openai(cfg, cache, s.index, path, tokenizer)
        written += 1
    return {"files_written": written, "files_skipped": skipped, "positions": positions,
            "seconds": time.perf_counter() - t0}
