"""Rebuild what a cache record needs from a foreign source: texts, byte offsets, the prompt/completion split.

Foreign logit datasets carry teacher token ids and per-position top-k rows, rarely text. Each token's bytes come
from the teacher tokenizer's byte table (`logitcache.token_bytes`): the sequence text is the concatenation, the
byte offsets its running sum. Two kinds of token write no text: the ids the tokenizer's post-processor puts before
a text (BOS) at the very start, and a final special end token (EOS, the pad DistillKit appends); every other
special token (``<|im_start|>`` of a chat template) writes its literal content, as it did in the rendered text the
source was tokenized from.

A wrong ``--teacher-tokenizer`` shows up here: ids outside its vocabulary, bytes that are not UTF-8, a text that
differs from the source's own text, or token strings it has no token for. Each raises `ImportMismatchError`
(a `ConfigError`: one line, no traceback) naming the first such sequence.

``fix_rows`` makes decoded rows valid cache rows, vectorized over a block: DistillKit's lossy decoding can leave
a row slightly unsorted or a value above 0; rows are re-sorted (keeping each (id, value) pair) and clamped, and
both are counted for the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from logitcache.config import ConfigError
from logitcache.storage import PositionRows, SequenceRecord
from logitcache.tokenization import TokenizationMismatchError, byte_offsets_for_ids, token_bytes_info


class ImportMismatchError(ConfigError):
    """The source does not match the teacher tokenizer (or is malformed); names the sequence."""


@dataclass
class RawSequence:
    """One source sequence before rebuilding: ids, rows, and what the source says about text and split.

    ``rows`` ``[R, K]``: row ``i`` predicts token ``row_offset + i``. ``target_logprobs`` (``[R]``, optional) are
    exact logprobs of the realized tokens when the source has them. ``prompt_len`` comes from a mask (None: use
    the ``--completion-start`` rule); ``prompt_text`` when the source renders the prompt itself (then the first
    ``prompt_len`` ids are that prompt's tokens, with ``prompt_offsets``). ``check_text`` is the source's own
    text of the whole sequence (``check_completion``: of the completion only), compared with the rebuilt one.
    """

    index: int
    source_id: str
    token_ids: np.ndarray
    row_offset: int
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    target_logprobs: np.ndarray | None = None
    prompt_len: int | None = None
    prompt_text: str | None = None
    prompt_offsets: np.ndarray | None = None
    messages: list[dict[str, str]] | None = None
    check_text: str | None = None
    check_completion: str | None = None
    finish_reason: str = "score"


@dataclass
class Counters:
    values: dict[str, int] = field(default_factory=dict)

    def add(self, key: str, n: int = 1) -> None:
        if n:
            self.values[key] = self.values.get(key, 0) + int(n)


def fix_rows(ids: np.ndarray, lps: np.ndarray, counters: Counters) -> tuple[np.ndarray, np.ndarray]:
    """Rows as the cache requires them: int32 ids, no NaN, values <= 0, sorted descending (each (id, logprob)
    pair kept). Vectorized over the block; arrays are copied only when something changes."""
    lps = np.asarray(lps, dtype=np.float32)
    ids = np.asarray(ids)
    if ids.dtype != np.int32:
        if ids.size and (int(ids.max()) > np.iinfo(np.int32).max or int(ids.min()) < 0):
            raise ConfigError("a top-k id is outside [0, 2**31): not a token id")
        ids = ids.astype(np.int32)
    if lps.size == 0:
        return ids, lps
    nan = np.isnan(lps)
    if nan.any():
        counters.add("nan_logprobs_dropped", int(nan.sum()))
        lps = np.where(nan, np.float32(-np.inf), lps)
    pos = lps > 0
    if pos.any():
        counters.add("positive_logprobs_clamped", int(pos.sum()))
        lps = np.minimum(lps, np.float32(0))
    if lps.shape[1] > 1:
        bad = np.flatnonzero((lps[:, 1:] > lps[:, :-1]).any(axis=1))
        if bad.size:
            counters.add("rows_resorted", int(bad.size))
            whole = bad.size > lps.shape[0] // 2  # lossy sources: sort every row rather than gather most
            sub_l = lps if whole else lps[bad]
            sub_i = ids if whole else ids[bad]
            order = np.argsort(-sub_l, axis=1, kind="stable")
            sub_l, sub_i = np.take_along_axis(sub_l, order, axis=1), np.take_along_axis(sub_i, order, axis=1)
            if whole:
                lps, ids = sub_l, sub_i
            else:
                lps, ids = np.array(lps), np.array(ids)  # may be read-only views of Arrow buffers
                lps[bad], ids[bad] = sub_l, sub_i
    return ids, lps


class Rebuilder:
    """Turns `RawSequence` s into `SequenceRecord` s for one teacher tokenizer and one completion-start rule."""

    def __init__(self, tokenizer: Any, completion_start: str, vocab_size: int) -> None:
        self.tok = tokenizer
        self.info = token_bytes_info(tokenizer)
        self.vocab_size = vocab_size
        self.rule = completion_start
        self.prefix = tuple(self.info.prefix_ids)
        ends = {tokenizer.eos_token_id, tokenizer.pad_token_id}
        self.end_ids = {int(i) for i in ends if i is not None}

    def _fail(self, raw: RawSequence, what: str) -> ImportMismatchError:
        return ImportMismatchError(
            f"sequence {raw.index} ({raw.source_id}): {what}; is --teacher-tokenizer the tokenizer the source was "
            f"made with ({self.info.name})?"
        )

    def widths(self, raw: RawSequence, ids: np.ndarray, first: int) -> np.ndarray:
        """Bytes each id writes (``first``: index of ``ids[0]`` in the sequence)."""
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= self.info.size):
            bad = int(ids[(ids < 0) | (ids >= self.info.size)][0])
            raise self._fail(raw, f"token id {bad} is outside the tokenizer's vocabulary (size {self.info.size})")
        w = self.info.lengths[ids].copy()
        if first == 0:
            j = 0
            while j < len(ids) and j < len(self.prefix) and int(ids[j]) == self.prefix[j]:
                w[j] = 0
                j += 1
        if ids.size and int(ids[-1]) in self.end_ids and self.info.special[int(ids[-1])]:
            w[-1] = 0
        return w

    def offsets_for_text(self, raw: RawSequence, ids: np.ndarray, widths: np.ndarray, text: str) -> np.ndarray:
        """Byte offsets of ``ids`` in the source's ``text``. Fast path: the ids' bytes (``widths``: BOS and a final
        EOS zero-width, other specials literal) spell ``text`` exactly, so the offsets are their running sum; else
        `byte_offsets_for_ids` decides (specials absent from the text, a stripped dummy prefix) or names the
        first difference."""
        pieces = self.info.pieces
        if b"".join([pieces[i] for i, x in zip(ids.tolist(), widths.tolist()) if x]) == text.encode("utf-8"):
            return np.concatenate(([0], np.cumsum(widths[:-1]))).astype(np.int64) if ids.size else np.zeros(0, np.int64)
        try:
            return byte_offsets_for_ids(self.tok, ids, text, sample=raw.index)
        except TokenizationMismatchError:
            got = self._text(raw, ids, widths, "sequence")
            raise self._fail(raw, _first_diff(got, text, "text")) from None

    def _text(self, raw: RawSequence, ids: np.ndarray, widths: np.ndarray, what: str) -> str:
        pieces = self.info.pieces
        data = b"".join([pieces[i] for i, w in zip(ids.tolist(), widths.tolist()) if w])
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self._fail(raw, f"its ids do not decode to UTF-8 text ({what}, byte {e.start})") from None

    def _text_prefix(self, raw: RawSequence, ids: np.ndarray, widths: np.ndarray) -> tuple[str, int]:
        """(text, tokens kept): the sequence's text, without the tokens of an incomplete character at its very end
        (a source truncated at a token limit); bytes that are invalid anywhere else mean a wrong tokenizer."""
        pieces = self.info.pieces
        data = b"".join([pieces[i] for i, w in zip(ids.tolist(), widths.tolist()) if w])
        try:
            return data.decode("utf-8"), len(ids)
        except UnicodeDecodeError as e:
            if e.reason != "unexpected end of data":
                raise self._fail(raw, f"its ids do not decode to UTF-8 text (byte {e.start})") from None
            ends = np.cumsum(widths)
            keep = int(np.searchsorted(ends, e.start, side="right"))
            return data[: int(ends[keep - 1]) if keep else 0].decode("utf-8"), keep

    def _decode(self, raw: RawSequence, data: bytes, what: str) -> str:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise ImportMismatchError(
                f"sequence {raw.index} ({raw.source_id}): the {what} falls inside a character; choose another "
                "--completion-start"
            ) from None

    def _split(self, raw: RawSequence, offsets: np.ndarray, text_b: bytes) -> int:
        n = len(offsets)
        if self.rule.startswith("token:"):
            p = int(self.rule[6:])
        else:
            marker = self.rule[5:].replace("\\n", "\n").replace("\\t", "\t").encode("utf-8")
            at = text_b.rfind(marker)
            if at < 0:
                raise ImportMismatchError(
                    f"--completion-start: sequence {raw.index} ({raw.source_id}) does not contain {self.rule[5:]!r}; "
                    "choose a marker every sequence has, or token:N"
                )
            p = int(np.searchsorted(offsets, at + len(marker), side="left"))
        return max(1, min(p, n))

    def record(self, raw: RawSequence, counters: Counters) -> SequenceRecord:
        ids = np.asarray(raw.token_ids, dtype=np.int64)
        if raw.prompt_text is not None:  # the prompt was rendered and tokenized here: offsets known
            plen = int(raw.prompt_len or 0)
            base = len(raw.prompt_text.encode("utf-8"))
            comp = ids[plen:]
            w = self.widths(raw, comp, plen)
            completion = self._text(raw, comp, w, "completion")
            if raw.check_completion is not None and completion != raw.check_completion:
                raise self._fail(raw, _first_diff(completion, raw.check_completion, "completion"))
            offsets = np.concatenate([np.asarray(raw.prompt_offsets, np.int64)[:plen],
                                      base + np.concatenate(([0], np.cumsum(w)[:-1])) if w.size else []])
            prompt_text = raw.prompt_text
        else:
            w = self.widths(raw, ids, 0)
            if raw.check_text is not None:  # the source's text decides (zero-width BOS/EOS, a dummy prefix)
                text = raw.check_text
                offsets = self.offsets_for_text(raw, ids, w, text)
            else:
                text, keep = self._text_prefix(raw, ids, w)
                if keep < len(ids):  # a capture cut at max length inside a character: drop the partial character
                    counters.add("cut_incomplete_utf8")
                    ids, w = ids[:keep], w[:keep]
                offsets = np.concatenate(([0], np.cumsum(w)[:-1])).astype(np.int64) if w.size else np.zeros(0, np.int64)
            text_b = text.encode("utf-8")
            plen = raw.prompt_len if raw.prompt_len is not None else self._split(raw, offsets, text_b)
            plen = max(1, min(int(plen), len(ids)))
            cut = int(offsets[plen]) if plen < len(ids) else len(text_b)
            prompt_text = self._decode(raw, text_b[:cut], "prompt/completion split")
            completion = self._decode(raw, text_b[cut:], "prompt/completion split")
        n = len(ids)
        # rows covering the loss span: row i of the source predicts token row_offset + i
        first = plen - raw.row_offset
        have = raw.topk_ids.shape[0]
        last = min(n, raw.row_offset + have)  # tokens predicted by the source's rows: [row_offset, last)
        if first < 0:
            raise self._fail(raw, f"the completion starts at token {plen} but the source's rows start at token "
                                  f"{raw.row_offset}; the prompt must be at least {raw.row_offset} tokens")
        if last < n:  # the source has no row for the last tokens: cut the sequence there
            counters.add("truncated_missing_rows")
            full = (prompt_text + completion).encode("utf-8")
            completion = self._decode(raw, full[len(prompt_text.encode("utf-8")) : int(offsets[last])], "cut")
            ids, offsets, n = ids[:last], offsets[:last], last
        sl = slice(first, first + (n - plen))
        tids = ids[plen:n].astype(np.int32)
        t_ids, t_lps = raw.topk_ids[sl], raw.topk_logprobs[sl]
        if raw.target_logprobs is not None:
            tlp = np.asarray(raw.target_logprobs[sl], np.float32)
        else:  # the realized token's logprob: from the top-k when it is there, else unknown (-inf; ALM skips it)
            hit = t_ids == tids[:, None]
            found = hit.any(axis=1)
            tlp = np.where(found, t_lps[np.arange(len(tids)), hit.argmax(axis=1)], np.float32(-np.inf))
            counters.add("target_logprob_unknown", int((~found).sum()))
        rows = PositionRows(topk_ids=t_ids, topk_logprobs=t_lps, target_ids=tids, target_logprobs=tlp)
        return SequenceRecord(
            sample_id=raw.index,
            source_id=raw.source_id,
            prompt_text=prompt_text,
            completion_text=completion,
            token_ids=ids[:n].astype(np.int32),
            token_byte_offsets=offsets[:n],
            prompt_len=plen,
            finish_reason=raw.finish_reason if n == len(raw.token_ids) else "length",
            rows=rows,
            messages=raw.messages,
        )


def _first_diff(got: str, want: str, what: str) -> str:
    a, b = got.encode("utf-8"), want.encode("utf-8")
    k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return (f"its ids do not decode to the source {what} (first difference at byte {k}: decoded "
            f"{a[max(0, k - 10):k + 10]!r}, source {b[max(0, k - 10):k + 10]!r})")
