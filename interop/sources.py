"""Streaming readers of foreign logit datasets: blocks of `RawSequence` s, never the whole source in memory.

Every reader yields *blocks* ``(first_index, count, decode)``: ``count`` sequences numbered from ``first_index`` in
source order, and a ``decode()`` that returns them. The import loop skips whole blocks that belong to shards already
written (a resumed import reads no data of them: for Parquet not even the bytes, the row counts come from the file
footers), and decodes the rest one block at a time.

- ``distillkit``: a folder of ``data_*.parquet`` with ``compression_config.yaml`` (arcee-ai/DistillKit
  ``distillkit/sample_logits_vllm.py``); columns ``input_ids``, ``compressed_logprobs``, ``bytepacked_indices``
  (one row per position 1..n-1, decoded with `distillkit_codec`), or the older raw form ``token_ids`` /
  ``top_values`` (``LogprobCompressor.decompress_to_sparse`` returns those as they are). The legacy polynomial form
  (``packed_indices``, ``exact_values``, ``coeffs``) is refused: it stores mean-centred logits of the top-k, not
  logprobs, so no normalized distribution can be rebuilt from it.
- ``topk-parquet``: per sequence a token id list and per-position top-k id/logprob lists (entry ``p`` predicts
  token ``p+1``; rows may be shorter than K, padded with ``-inf``), field names configurable. K is the longest
  row of the first 64 sequences (a longer row later is refused, naming its row group).
- ``openai-logprobs``: JSONL of chat completions (``choices[].logprobs.content[].top_logprobs``, as OpenAI's and
  vLLM's servers return them), each with its request ``messages``; token strings are mapped to teacher ids
  through their ``bytes`` (or ``token_id:N`` strings, vLLM's ``--return-tokens-as-token-ids``).

A whole Parquet block is decoded at once (one numpy pass over all its rows), which is what the throughput rests on.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from logitcache.config import ConfigError

from .distillkit_codec import DistillKitConfig, decompress_logprobs, unpack_bits, vocab_size_for
from .interop_config import ImportConfig
from .rebuild import Counters, ImportMismatchError, RawSequence, fix_rows

Decoded = tuple[list[RawSequence], dict[str, int]]
Block = tuple[int, int, Callable[[], Decoded]]
BLOCK_ROWS = 512  # sequences decoded together (bounded memory: one block of rows at a time)
NEG_FLOOR = -9999.0  # OpenAI's stand-in for -inf in JSON
K_SEQUENCES = 64  # topk-parquet / raw DistillKit: K is the longest row of the first 64 sequences


class SourceError(ConfigError):
    """The source cannot be read as the given --format (missing file, column or key; truncated file)."""


@dataclass
class SourceInfo:
    """What the header needs before the first row: K, a vocabulary bound, and provenance."""

    top_k: int
    min_vocab: int
    lossy: bool
    provenance: dict[str, Any]


def parquet_files(src: str) -> list[str]:
    if os.path.isfile(src):
        return [src]
    if not os.path.isdir(src):
        raise SourceError(f"SRC {src}: no such file or folder")
    files = [os.path.join(d, f) for d, _, names in os.walk(src) for f in names if f.endswith(".parquet")]
    if not files:
        raise SourceError(f"SRC {src}: no .parquet files in this folder or below it")
    key = lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", os.path.relpath(p, src))]  # noqa: E731
    return sorted(files, key=key)


def _open(path: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise SourceError(f"{path}: cannot read as Parquet ({e}); is the file truncated?") from e


def _lists(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, pa.Array]:
    """(offsets from 0, flattened child) of a list column."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if arr.null_count:
        raise SourceError("a list column holds nulls")
    offs = arr.offsets.to_numpy().astype(np.int64)
    return offs - offs[0], arr.flatten()


def _fixed_rows(child: pa.Array, what: str) -> np.ndarray:
    """A list<uint8> array whose rows all have one length, as uint8 ``[rows, width]``."""
    offs, flat = _lists(child)
    widths = np.diff(offs)
    if widths.size and (widths != widths[0]).any():
        raise SourceError(f"{what}: rows of different byte lengths ({widths.min()}..{widths.max()})")
    width = int(widths[0]) if widths.size else 0
    return flat.to_numpy(zero_copy_only=False).astype(np.uint8, copy=False).reshape(len(widths), width)


def _padded(child_ids: pa.Array, child_lps: pa.Array, k: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Two list<number> arrays of per-position rows into ``[rows, k]`` (short rows padded with -inf)."""
    o1, ids = _lists(child_ids)
    o2, lps = _lists(child_lps)
    if not np.array_equal(o1, o2):
        raise SourceError(f"{what}: top-k ids and logprobs rows differ in length")
    lens = np.diff(o1)
    if lens.size and lens.max() > k:
        raise SourceError(f"{what}: a row holds {lens.max()} entries, more than K = {k} of the first rows")
    ids_np = ids.to_numpy(zero_copy_only=False)
    lps_np = np.asarray(lps.to_numpy(zero_copy_only=False), dtype=np.float32)
    if lens.size and (lens == k).all():
        return ids_np.reshape(-1, k), lps_np.reshape(-1, k)
    col = np.arange(k)
    valid = col[None, :] < lens[:, None]
    at = np.minimum(o1[:-1, None] + col[None, :], max(len(ids_np) - 1, 0))
    out_ids = np.where(valid, ids_np[at] if len(ids_np) else 0, 0)
    out_lps = np.where(valid, lps_np[at] if len(lps_np) else 0, np.float32(-np.inf)).astype(np.float32)
    return out_ids, out_lps


def _prompt_lens(table: pa.Table, field: str, offs: np.ndarray) -> list[int | None]:
    """Per sequence, the first trained position of the mask column: labels (``-100`` = not trained), or a 0/1
    attention-style mask when a sequence's values are all 0 or 1 (0 = not trained); its length when none is.
    One numpy pass over the block."""
    if field not in table.column_names:
        return [None] * (len(offs) - 1)
    m_offs, flat = _lists(table.column(field))
    vals = np.asarray(flat.to_numpy(zero_copy_only=False))
    lens = np.diff(m_offs)
    n = len(lens)
    seq = np.repeat(np.arange(n), lens)
    binary = np.bincount(seq, weights=(vals != 0) & (vals != 1), minlength=n) == 0  # every value 0 or 1
    trained = (vals != -100) & ~(binary[seq] & (vals == 0))
    hit = np.flatnonzero(trained)
    out = lens.copy()
    first = np.unique(seq[hit], return_index=True)  # hits are in order: the first per sequence
    out[first[0]] = hit[first[1]] - m_offs[:-1][first[0]]
    return [int(v) for v in out]


def _messages(table: pa.Table, field: str, i: int) -> list[dict[str, str]] | None:
    if field not in table.column_names:
        return None
    v = table.column(field)[i].as_py()
    if isinstance(v, str):
        v = json.loads(v)
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in v] if v else None


class ParquetSource:
    """``distillkit`` and ``topk-parquet``: row groups of every file, in file order."""

    def __init__(self, cfg: ImportConfig, tokenizer: Any) -> None:
        self.cfg = cfg
        self.files = parquet_files(cfg.src)
        self.handles = [_open(f) for f in self.files]
        names = set(self.handles[0].schema_arrow.names)
        self.dk: DistillKitConfig | None = None
        if cfg.format == "distillkit":
            if {"packed_indices", "exact_values", "coeffs"} <= names:
                raise SourceError(
                    f"{self.files[0]}: the legacy DistillKit polynomial form (packed_indices, exact_values, coeffs) "
                    "stores mean-centred top-k logits, not logprobs: no normalized distribution can be rebuilt; "
                    "re-capture with DistillKit's current sampler"
                )
            if {"compressed_logprobs", "bytepacked_indices"} <= names:
                self.kind = "compressed"
                self.dk = self._dk_config()
                vocab_d = vocab_size_for(tokenizer)
                if self.dk.d < vocab_d or (cfg.vocab_check and self.dk.d - vocab_d > 32):
                    raise ImportMismatchError(
                        f"{self.config_path}: d = {self.dk.d}, but DistillKit's vocabulary size of --teacher-tokenizer "
                        f"is {vocab_d} (max(len(vocab) + 1, max id)); is it the tokenizer the capture was made with? "
                        "(--no-vocab-check accepts a larger, padded d)"
                    )
                self.cols = ["input_ids", "bytepacked_indices", "compressed_logprobs"]  # ids, then values
            elif {"token_ids", "top_values"} <= names:
                self.kind = "raw"
                self.cols = ["input_ids", "token_ids", "top_values"]
            else:
                raise SourceError(
                    f"{self.files[0]}: not a DistillKit capture (columns {sorted(names)}; expected input_ids with "
                    "compressed_logprobs + bytepacked_indices, or token_ids + top_values)"
                )
        else:
            self.kind = "topk"
            self.cols = [cfg.ids_field, cfg.topk_ids_field, cfg.topk_logprobs_field]
        missing = [c for c in self.cols if c not in names]
        if missing:
            flag = {cfg.ids_field: "--ids-field", cfg.topk_ids_field: "--topk-ids-field",
                    cfg.topk_logprobs_field: "--topk-logprobs-field"}
            raise SourceError(
                f"{self.files[0]}: no column {missing[0]!r}"
                + (f" (set {flag[missing[0]]})" if missing[0] in flag and self.kind == "topk" else "")
                + f"; it has {sorted(names)}"
            )
        self.extra = [c for c in (cfg.mask_field, cfg.text_field, cfg.messages_field) if c in names]
        self._file_first: dict[str, int] = {}
        self._iter: list[Any] | None = None  # (file, row group), batch iterator, next row, leftover batch
        self.k = self._top_k()

    def _dk_config(self) -> DistillKitConfig:
        import yaml

        folder = self.cfg.src if os.path.isdir(self.cfg.src) else os.path.dirname(self.cfg.src)
        self.config_path = os.path.join(folder, "compression_config.yaml")
        if not os.path.exists(self.config_path):
            raise SourceError(f"{self.config_path}: missing; a DistillKit capture keeps its compression config there")
        with open(self.config_path, encoding="utf-8") as f:
            return DistillKitConfig.from_dict(yaml.safe_load(f) or {}, self.config_path)

    def _top_k(self) -> int:
        if self.dk is not None:
            return self.dk.k
        name = "top_values" if self.kind == "raw" else self.cfg.topk_logprobs_field
        k, seen = 0, 0
        for h in self.handles:  # the first K_SEQUENCES sequences decide (not a whole row group: it would be decoded)
            for batch in h.iter_batches(batch_size=16, columns=[name], use_threads=False):
                _, rows = _lists(batch.column(0))
                lens = np.diff(_lists(rows)[0])
                k, seen = max(k, int(lens.max()) if lens.size else 0), seen + batch.num_rows
                if k and seen >= K_SEQUENCES:
                    return k
        if k:
            return k
        raise SourceError(f"SRC {self.cfg.src}: no row holds any top-k entry")

    def info(self) -> SourceInfo:
        prov: dict[str, Any] = {"files": len(self.files), "columns": self.cols + self.extra}
        if self.dk is not None:
            prov["compression_config"] = self.dk.to_dict()
        lossy = self.dk is not None and not self.dk.lossless
        return SourceInfo(self.k, self.dk.d if self.dk else 1, lossy, prov)

    def blocks(self) -> Iterator[Block]:
        first = 0
        for path, h in zip(self.files, self.handles):
            self._file_first[path] = first
            for rg in range(h.num_row_groups):
                n = h.metadata.row_group(rg).num_rows
                for lo in range(0, n, BLOCK_ROWS):
                    cnt = min(BLOCK_ROWS, n - lo)
                    yield first + lo, cnt, self._decoder(path, h, rg, lo, cnt, first + lo)
                first += n

    def _decoder(self, path: str, h: pq.ParquetFile, rg: int, lo: int, cnt: int, start: int
                 ) -> Callable[[], Decoded]:
        return lambda: self._decode(path, h, rg, lo, cnt, start)

    def _rows(self, path: str, h: pq.ParquetFile, rg: int, lo: int, cnt: int) -> pa.Table:
        """Rows ``[lo, lo + cnt)`` of a row group, read batch by batch: a large row group is read once, in order,
        not once per block (blocks of a row group are decoded in increasing order)."""
        it = self._iter
        if it is None or it[0] != (path, rg) or it[2] > lo:
            batches = h.iter_batches(batch_size=BLOCK_ROWS, row_groups=[rg], columns=self.cols + self.extra)
            it = self._iter = [(path, rg), batches, 0, None]
        parts, at = [], it[2]
        pending = it[3]
        while at < lo + cnt:
            batch = pending if pending is not None else next(it[1])
            pending = None
            end = at + batch.num_rows
            if end > lo:
                parts.append(batch.slice(max(0, lo - at), min(end, lo + cnt) - max(at, lo)))
            if end > lo + cnt:  # the rest belongs to the next block
                pending = batch.slice(lo + cnt - at)
                at = lo + cnt
                break
            at = end
        it[2], it[3] = at, pending
        return pa.Table.from_batches(parts) if parts else h.schema_arrow.empty_table().select(self.cols + self.extra)

    def _decode(self, path: str, h: pq.ParquetFile, rg: int, lo: int, cnt: int, start: int) -> Decoded:
        try:
            table = self._rows(path, h, rg, lo, cnt)
        except (pa.ArrowInvalid, OSError) as e:
            raise SourceError(f"{path}: row group {rg} cannot be read ({e}); is the file truncated?") from e
        where = f"{path} row group {rg}"
        id_offs, id_flat = _lists(table.column(self.cols[0]))
        all_ids = id_flat.to_numpy(zero_copy_only=False).astype(np.int64)
        row_offs, a = _lists(table.column(self.cols[1]))
        _, b = _lists(table.column(self.cols[2]))
        counters = Counters()
        if self.kind == "compressed":
            assert self.dk is not None
            lps = decompress_logprobs(_fixed_rows(b, f"{where} compressed_logprobs")[:, : self.dk.logprob_bytes()],
                                      self.dk)
            ids = unpack_bits(_fixed_rows(a, f"{where} bytepacked_indices"), self.dk.index_bits, self.dk.k)
        else:
            ids, lps = _padded(a, b, self.k, where)
        ids, lps = fix_rows(ids, lps, counters)
        plens = _prompt_lens(table, self.cfg.mask_field, id_offs)
        texts = table.column(self.cfg.text_field).to_pylist() if self.cfg.text_field in self.extra else None
        out = []
        for i in range(cnt):
            r0, r1 = row_offs[i], row_offs[i + 1]
            out.append(RawSequence(
                index=start + i,
                source_id=f"{os.path.basename(path)}:{start + i - self._file_first.get(path, 0)}",
                token_ids=all_ids[id_offs[i] : id_offs[i + 1]],
                row_offset=1,
                topk_ids=ids[r0:r1],
                topk_logprobs=lps[r0:r1],
                prompt_len=plens[i],
                messages=_messages(table, self.cfg.messages_field, i) if self.cfg.messages_field in self.extra
                else None,
                check_text=texts[i] if texts is not None else None,
            ))
        return out, counters.values


class TokenMap:
    """Teacher ids of OpenAI-style token entries (``token`` string plus ``bytes``)."""

    def __init__(self, tokenizer: Any) -> None:
        from logitcache.tokenization import token_bytes_info

        info = token_bytes_info(tokenizer)
        self.by_bytes: dict[bytes, int] = {}
        order = np.lexsort((np.arange(info.size), info.byte_fallback, info.added))  # regular tokens win
        for i in order.tolist():
            if info.added[i] or info.lengths[i] == 0:
                continue
            self.by_bytes.setdefault(info.pieces[i], i)
        self.added = {info.pieces[i].decode("utf-8", "replace"): i for i in np.flatnonzero(info.added).tolist()}
        self.size = info.size
        self.seen: dict[str, int] = {}

    def id_of(self, entry: dict[str, Any]) -> int | None:
        tok = entry.get("token")
        hit = self.seen.get(tok)  # type: ignore[arg-type]
        if hit is not None:
            return hit
        if isinstance(tok, str) and tok.startswith("token_id:"):
            return int(tok[9:])
        if isinstance(tok, str) and tok in self.added:
            return self.added[tok]
        raw = entry.get("bytes")
        data = bytes(raw) if raw is not None else (tok.encode("utf-8") if isinstance(tok, str) else b"")
        found = self.by_bytes.get(data)
        if found is not None and isinstance(tok, str) and "\ufffd" not in tok and tok.encode("utf-8") == data:
            self.seen[tok] = found  # a string that spells its bytes names one token: skip the bytes next time
        return found


class JsonlSource:
    """``openai-logprobs``: one chat completion (with its request messages) per line, one sequence per choice."""

    def __init__(self, cfg: ImportConfig, tokenizer: Any) -> None:
        from logitcache.prompts import resolve_chat_template

        if not os.path.isfile(cfg.src):
            raise SourceError(f"SRC {cfg.src}: no such file (openai-logprobs reads one .jsonl file)")
        self.cfg, self.tok = cfg, tokenizer
        self.template = resolve_chat_template(tokenizer, cfg.chat_template)
        self.map = TokenMap(tokenizer)
        self.k = self._top_k()

    def _lines(self) -> Iterator[tuple[int, bytes]]:
        with open(self.cfg.src, "rb") as f:
            for no, line in enumerate(f, 1):
                if line.strip():
                    yield no, line

    def _parse(self, no: int, line: bytes) -> dict[str, Any]:
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as e:
            raise SourceError(f"{self.cfg.src} line {no}: not JSON ({e.msg} at column {e.colno}); is the file "
                              "truncated?") from None
        if not isinstance(doc, dict):
            raise SourceError(f"{self.cfg.src} line {no}: expected a JSON object")
        return doc

    def _unwrap(self, no: int, doc: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, str]] | None]:
        msgs = doc.get(self.cfg.messages_field)
        resp = doc
        if "choices" not in doc and isinstance(doc.get("response"), dict):
            resp = doc["response"].get("body", doc["response"])  # {"response": ...} or a batch-API output line
            req = doc.get("request") or doc.get("body") or {}
            msgs = msgs or (req.get("messages") if isinstance(req, dict) else None)
        if msgs is None and isinstance(doc.get("prompt"), str):
            msgs = [{"role": "user", "content": doc["prompt"]}]
        if not isinstance(resp.get("choices"), list):
            raise SourceError(f"{self.cfg.src} line {no}: no 'choices' list (not a chat completion)")
        return resp, msgs

    def _top_k(self) -> int:
        """K: the most alternatives any token of the first 100 lines has (later longer rows are cut and counted)."""
        k = 0
        for no, line in self._lines():
            resp, _ = self._unwrap(no, self._parse(no, line))
            for ch in resp["choices"]:
                for e in ((ch.get("logprobs") or {}).get("content") or []):
                    k = max(k, len(e.get("top_logprobs") or []))
            if no >= 100:
                break
        if k:
            return k
        raise SourceError(
            f"{self.cfg.src}: no token has top_logprobs (request them with logprobs=true, top_logprobs=K)"
        )

    def info(self) -> SourceInfo:
        return SourceInfo(self.k, self.map.size, False, {"chat_template": self.cfg.chat_template})

    def blocks(self) -> Iterator[Block]:
        batch: list[tuple[int, bytes]] = []
        first = 0
        for no, line in self._lines():
            batch.append((no, line))
            if len(batch) == BLOCK_ROWS:
                n = self._count(batch)
                yield first, n, self._decoder(batch, first)
                first, batch = first + n, []
        if batch:
            yield first, self._count(batch), self._decoder(batch, first)

    @staticmethod
    def _count(batch: list[tuple[int, bytes]]) -> int:
        # one sequence per choice: counted from the raw text without decoding (a block skipped on resume is not parsed)
        return sum(max(1, line.count(b'"finish_reason"')) for _, line in batch)

    def _decoder(self, batch: list[tuple[int, bytes]], first: int) -> Callable[[], Decoded]:
        def decode() -> Decoded:
            seqs, counters = self._decode(batch, first)
            if len(seqs) != self._count(batch):  # the raw count decides resume positions: it must be right
                raise SourceError(f"{self.cfg.src} lines {batch[0][0]}..{batch[-1][0]}: choices could not be counted "
                                  "from the raw text (a 'finish_reason' key per choice is expected)")
            return seqs, counters

        return decode

    def _decode(self, batch: list[tuple[int, bytes]], first: int) -> Decoded:
        from logitcache.prompts import encode_rendered, render_messages

        out: list[RawSequence] = []
        counters = Counters()
        for no, line in batch:
            doc = self._parse(no, line)
            resp, msgs = self._unwrap(no, doc)
            if not msgs:
                raise SourceError(
                    f"{self.cfg.src} line {no}: no request messages (key {self.cfg.messages_field!r}, or 'prompt'); "
                    "the prompt cannot be rebuilt without them"
                )
            msgs = [{"role": str(m["role"]), "content": str(m.get("content") or "")} for m in msgs]
            idx = first + len(out)
            # logitcache's own export keeps the exact rendered prompt; anything else is rendered with the template
            rendered = doc.get("prompt_text")
            prompt = rendered if isinstance(rendered, str) else render_messages(self.tok, msgs, self.template, idx)
            p_ids, p_offs, plen, _ = encode_rendered(self.tok, prompt, msgs, self.template, "", idx)
            for ch in resp["choices"]:
                idx = first + len(out)
                sid = f"line {no}" + (f" choice {ch.get('index', 0)}" if len(resp["choices"]) > 1 else "")
                content = (ch.get("logprobs") or {}).get("content") or []
                m = len(content)
                ids = np.zeros(m, np.int64)
                tlp = np.zeros(m, np.float32)
                top_ids = np.zeros((m, self.k), np.int64)
                top_lps = np.full((m, self.k), -np.inf, np.float32)
                for j, e in enumerate(content):
                    t = self.map.id_of(e)
                    if t is None:
                        raise ImportMismatchError(
                            f"sequence {idx} ({sid}): token {e.get('token')!r} (bytes {e.get('bytes')}) is no single "
                            "token of --teacher-tokenizer; is it the tokenizer the completions were made with?"
                        )
                    ids[j], tlp[j] = t, float(e.get("logprob", NEG_FLOOR))
                    tops = e.get("top_logprobs") or []
                    if len(tops) > self.k:
                        counters.add("top_logprobs_truncated")
                    for r, te in enumerate(tops[: self.k]):
                        ti = self.map.id_of(te)
                        if ti is None:
                            raise ImportMismatchError(
                                f"sequence {idx} ({sid}): top_logprobs token {te.get('token')!r} is no single token "
                                "of --teacher-tokenizer; is it the tokenizer the completions were made with?"
                            )
                        top_ids[j, r], top_lps[j, r] = ti, float(te["logprob"])
                tlp[tlp <= NEG_FLOOR] = -np.inf
                top_lps[top_lps <= NEG_FLOOR] = -np.inf
                top_ids, top_lps = fix_rows(top_ids, top_lps, counters)
                text = (ch.get("message") or {}).get("content")
                reason = ch.get("finish_reason")
                out.append(RawSequence(
                    index=idx, source_id=sid, token_ids=np.concatenate([np.asarray(p_ids, np.int64), ids]),
                    row_offset=plen, topk_ids=top_ids, topk_logprobs=top_lps, target_logprobs=tlp, prompt_len=plen,
                    prompt_text=prompt, prompt_offsets=np.asarray(p_offs, np.int64), messages=msgs,
                    check_completion=text if isinstance(text, str) else None,
                    finish_reason="stop" if reason == "stop" else "length",
                ))
        return out, counters.values


def open_source(cfg: ImportConfig, tokenizer: Any) -> ParquetSource | JsonlSource:
    return JsonlSource(cfg, tokenizer) if cfg.format == "openai-logprobs" else ParquetSource(cfg, tokenizer)
