"""Stage two's pure core: byte boundaries, aligned position pairs and ALM chunks between two tokenizations.

Everything here is plain numpy on byte offsets *relative to the completion start* (DESIGN.md section 5); the
tokenizers only enter through `logitcache.tokenization` (for the vocabulary map and the byte checks).

Row convention (both sides alike). A side with ``n`` completion tokens whose starts are ``offsets[0..n-1]``
(non-decreasing; ``offsets[0] == 0`` when the completion is not empty) has rows ``0..n-1``; row ``r`` predicts
completion token ``r``, i.e. the token starting at byte ``offsets[r]``. For the teacher these are exactly the
cache's loss-span rows (row ``r`` = position ``P - 1 + r``). Tokens covering no bytes (a special token the teacher
emitted, a lone dummy-prefix ``▁``) share their start with the next token.

- End of text. A row whose token starts at ``completion_nbytes`` predicts end-of-text (the teacher's cached EOS
  row when the completion ended with EOS). The first such row is that side's *end row*. A side has one only if
  such a row exists: the teacher when its cache holds the EOS row (finish reason ``stop``), not after ``length``.
  For the student, whose completion tokens never include EOS, ``student_end_row=True`` adds the virtual row
  ``n_s`` (the student's position after its last completion token, which predicts the student's own EOS).
  The end of the completion is always a chunk boundary for both sides; the end *pair* exists only when both
  sides have an end row, and is then the last pair.
- Pairs ``(i, j)``: for every byte ``b < completion_nbytes`` where a teacher token and a student token both
  start, the *last* teacher row and the *last* student row whose token starts at ``b`` (so zero-width tokens at
  ``b`` are already in both contexts and both rows predict the first token that carries the byte at ``b``); plus
  the end pair (first end rows) as above. Both columns strictly increase.
- Chunks ``(t_start, t_end, s_start, s_end)``: half-open row ranges between consecutive shared boundaries
  ``B_k < B_{k+1}`` (the last one is ``completion_nbytes``): rows ``[t_start, t_end)`` are exactly the teacher
  tokens covering bytes ``[B_k, B_{k+1})`` (plus zero-width tokens at ``B_k``), same for the student, so both sides
  of a chunk spell identical bytes (ALM's chunk alignment). ``t_start`` = first row starting at ``B_k``; the last
  chunk ends at the end row (or ``n`` without one). Chunks tile the rows before the end rows.

Cost: a handful of ``searchsorted`` calls per sequence (tens of microseconds), so tokenization dominates stage
two; no Python loop touches a token except in `check_alignment`'s slow path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from logitcache.tokenization import TokenBytes, token_bytes_info

__all__ = [
    "Alignment",
    "AlignmentError",
    "VocabMap",
    "align",
    "boundaries",
    "check_alignment",
    "completion_offsets",
    "vocab_map",
]


class AlignmentError(ValueError):
    """An alignment input or invariant is violated; the message names the sample and what failed."""


@dataclass(frozen=True)
class Alignment:
    """Aligned rows of one sequence; see the module docstring for the exact row convention.

    ``pairs`` int32 ``[P, 2]`` (teacher row, student row); ``chunks`` int32 ``[C, 4]``
    (t_start, t_end, s_start, s_end); ``teacher_end``/``student_end``: the end row of each side, or -1 if none.
    """

    pairs: np.ndarray
    chunks: np.ndarray
    teacher_end: int
    student_end: int

    @property
    def has_end_pair(self) -> bool:
        return self.teacher_end >= 0 and self.student_end >= 0


def _where(sample: object) -> str:
    return f"sample {sample}: " if sample is not None else ""


def completion_offsets(token_byte_offsets: Any, prompt_len: int, prompt_nbytes: int) -> np.ndarray:
    """Completion-relative starts of the completion tokens of a whole-sequence offset array (int64)."""
    offs = np.asarray(token_byte_offsets, dtype=np.int64)[prompt_len:]
    return offs - prompt_nbytes


def boundaries(byte_offsets_in_completion: Any, completion_nbytes: int) -> np.ndarray:
    """Token starts relative to the completion start, then ``completion_nbytes`` (int64 ``[n + 1]``).

    Entry ``r`` is where the token predicted by row ``r`` starts; entry ``n`` is the end of the completion.
    Zero-width tokens repeat their neighbour's value, so the array is non-decreasing, not strictly increasing.
    """
    offs = np.asarray(byte_offsets_in_completion, dtype=np.int64).reshape(-1)
    return np.append(offs, np.int64(completion_nbytes))


def _validate(offs: np.ndarray, nbytes: int, side: str, sample: object) -> None:
    if offs.ndim != 1:
        raise AlignmentError(f"{_where(sample)}{side} offsets must be 1-D, got shape {offs.shape}")
    if offs.size == 0:
        if nbytes > 0:
            raise AlignmentError(f"{_where(sample)}{side} has no token for a {nbytes}-byte completion")
        return
    if offs[0] != 0 and nbytes > 0:
        raise AlignmentError(f"{_where(sample)}{side} first token starts at byte {offs[0]}, not 0: bytes before it "
                             "are covered by no token (were the offsets made completion-relative?)")
    if offs[-1] > nbytes or offs[0] < 0:
        raise AlignmentError(f"{_where(sample)}{side} offsets run outside [0, {nbytes}] (last {offs[-1]})")
    if offs.size > 1 and bool(np.any(offs[1:] < offs[:-1])):
        k = int(np.flatnonzero(offs[1:] < offs[:-1])[0])
        raise AlignmentError(f"{_where(sample)}{side} offsets decrease at token {k + 1} "
                             f"({offs[k]} -> {offs[k + 1]})")


def align(
    teacher_offsets: Any, student_offsets: Any, completion_nbytes: int, *, student_end_row: bool = False,
    sample: object = None,
) -> Alignment:
    """Aligned pairs and chunks between teacher and student completion tokens (module docstring: conventions).

    ``teacher_offsets``/``student_offsets``: completion-relative byte starts of each side's completion tokens
    (one per row). ``student_end_row``: give the student the virtual end row ``n_s`` predicting its EOS.
    """
    nbytes = int(completion_nbytes)
    t = np.asarray(teacher_offsets, dtype=np.int64)
    s = np.asarray(student_offsets, dtype=np.int64)
    _validate(t, nbytes, "teacher", sample)
    _validate(s, nbytes, "student", sample)
    if student_end_row:
        s = np.append(s, np.int64(nbytes))
    # byte starts present on both sides, below the end (both arrays sorted)
    t_inner = t[: np.searchsorted(t, nbytes, "left")]
    if t_inner.size and s.size:
        uniq = t_inner[np.r_[True, t_inner[1:] != t_inner[:-1]]]
        pos = np.minimum(np.searchsorted(s, uniq, "left"), s.size - 1)
        shared = uniq[s[pos] == uniq]
    else:
        shared = t_inner[:0]
    t_end = int(np.searchsorted(t, nbytes, "left"))
    s_end = int(np.searchsorted(s, nbytes, "left"))
    t_first = np.searchsorted(t, shared, "left")
    s_first = np.searchsorted(s, shared, "left")
    t_last = np.searchsorted(t, shared, "right") - 1
    s_last = np.searchsorted(s, shared, "right") - 1
    has_t, has_s = t_end < t.size, s_end < s.size
    if has_t and has_s:
        t_last = np.append(t_last, t_end)
        s_last = np.append(s_last, s_end)
    pairs = np.stack([t_last, s_last], axis=1).astype(np.int32, copy=False)
    if shared.size:
        chunks = np.stack([t_first, np.append(t_first[1:], t_end), s_first, np.append(s_first[1:], s_end)], 1)
    else:
        chunks = np.zeros((0, 4), np.int64)
    return Alignment(
        pairs=pairs.reshape(-1, 2), chunks=chunks.astype(np.int32, copy=False).reshape(-1, 4),
        teacher_end=t_end if has_t else -1, student_end=s_end if has_s else -1,
    )


# -------------------------------------------------------------------------------------------- invariants


def _ends(offs: np.ndarray, nbytes: int) -> np.ndarray:
    return np.append(offs[1:], np.int64(nbytes)) if offs.size else offs


def _check_token_bytes(info: TokenBytes, ids: Any, offs: np.ndarray, comp: bytes, side: str,
                       sample: object) -> None:
    """Each token's bytes equal the completion slice its offsets give it (dummy prefix, zero-width specials ok)."""
    ids_a = np.asarray(ids, dtype=np.int64).reshape(-1)
    if ids_a.size != offs.size:
        raise AlignmentError(f"{_where(sample)}{side}: {ids_a.size} ids but {offs.size} offsets")
    if ids_a.size and (ids_a.min() < 0 or ids_a.max() >= info.size):
        raise AlignmentError(f"{_where(sample)}{side}: ids outside tokenizer {info.name!r} (size {info.size})")
    ends = _ends(offs, len(comp))
    lengths = info.lengths[ids_a]
    ids_l = ids_a.tolist()
    if bool(np.all(lengths == ends - offs)) and b"".join(info.pieces[i] for i in ids_l) == comp:
        return
    repl = info.replacement.encode("utf-8") if info.replacement else b""
    for r, tid in enumerate(ids_l):
        piece, got = info.pieces[tid], comp[offs[r]:ends[r]]
        if got == piece or (not got and info.special[tid]):
            continue
        alt = got.replace(repl, b" ") if repl else got
        if alt == piece or (piece[:1] == b" " and piece[1:] in (got, alt)):  # literal ▁, dummy prefix
            continue
        raise AlignmentError(
            f"{_where(sample)}{side} token {r} (id {tid}, {info.raw[tid]!r}) covers bytes {got!r} at "
            f"[{offs[r]}, {ends[r]}) but spells {piece!r}: token bytes do not concatenate to the completion "
            f"(tokenizer {info.name!r})"
        )


def check_alignment(
    alignment: Alignment, teacher_offsets: Any, student_offsets: Any, completion: bytes | str, *,
    student_end_row: bool = False, student_ids: Any = None, student_tokenizer: Any = None,
    teacher_ids: Any = None, teacher_tokenizer: Any = None, sample: object = None,
) -> None:
    """Raise `AlignmentError` unless every stage-two invariant holds (used by tests and ``verify``).

    Checks: offsets start at 0, stay in range and never decrease; with ids and a tokenizer (or `TokenBytes`)
    for a side, its token bytes concatenate to the completion bytes; chunks tile both sides' rows and the
    completion bytes, each chunk's two sides cover the same bytes; pairs and chunks strictly increase, each pair's
    two rows predict tokens starting at the same byte; the end of the completion is a shared boundary, and the
    end pair is present exactly when both sides have an end row.
    """
    comp = completion.encode("utf-8") if isinstance(completion, str) else bytes(completion)
    nbytes = len(comp)
    t = np.asarray(teacher_offsets, dtype=np.int64)
    s = np.asarray(student_offsets, dtype=np.int64)
    _validate(t, nbytes, "teacher", sample)
    _validate(s, nbytes, "student", sample)
    for ids, tok, offs, side in ((teacher_ids, teacher_tokenizer, t, "teacher"),
                                 (student_ids, student_tokenizer, s, "student")):
        if ids is not None and tok is not None:
            info = tok if isinstance(tok, TokenBytes) else token_bytes_info(tok)
            _check_token_bytes(info, ids, offs, comp, side, sample)
    if student_end_row:
        s = np.append(s, np.int64(nbytes))
    tb, sb = boundaries(t, nbytes), boundaries(s, nbytes)
    t_end, s_end = int(np.searchsorted(t, nbytes, "left")), int(np.searchsorted(s, nbytes, "left"))
    pairs, chunks = np.asarray(alignment.pairs), np.asarray(alignment.chunks)

    def fail(msg: str) -> None:
        raise AlignmentError(f"{_where(sample)}alignment invariant violated: {msg}")

    if pairs.ndim != 2 or pairs.shape[1] != 2 or chunks.ndim != 2 or chunks.shape[1] != 4:
        fail(f"pairs {pairs.shape} must be [P, 2] and chunks {chunks.shape} [C, 4]")
    if (alignment.teacher_end, alignment.student_end) != (t_end if t_end < t.size else -1,
                                                         s_end if s_end < s.size else -1):
        fail(f"end rows ({alignment.teacher_end}, {alignment.student_end}) != ({t_end}, {s_end})")
    if chunks.size:
        ts, te, ss, se = (chunks[:, k].astype(np.int64) for k in range(4))
        if min(ts.min(), ss.min()) < 0 or max(ts.max(), te.max()) > t.size or max(ss.max(), se.max()) > s.size:
            fail(f"chunk rows outside [0, {t.size}] x [0, {s.size}]")
        if ts[0] != 0 or ss[0] != 0 or te[-1] != t_end or se[-1] != s_end:
            fail(f"chunks do not tile rows [0, {t_end}) x [0, {s_end}): first {chunks[0]}, last {chunks[-1]}")
        if np.any(te <= ts) or np.any(se <= ss) or np.any(ts[1:] != te[:-1]) or np.any(ss[1:] != se[:-1]):
            fail("chunks are not strictly increasing, contiguous, non-empty row ranges")
        if np.any(tb[ts] != sb[ss]) or np.any(tb[te] != sb[se]):
            k = int(np.flatnonzero((tb[ts] != sb[ss]) | (tb[te] != sb[se]))[0])
            fail(f"chunk {k} {chunks[k]} covers teacher bytes [{tb[ts[k]]}, {tb[te[k]]}) but student bytes "
                 f"[{sb[ss[k]]}, {sb[se[k]]})")
        if tb[ts[0]] != 0 or tb[te[-1]] != nbytes:
            fail(f"chunks cover bytes [{tb[ts[0]]}, {tb[te[-1]]}), not the whole completion [0, {nbytes})")
        if np.any(tb[ts[1:] - 1] >= tb[ts[1:]]) or np.any(sb[ss[1:] - 1] >= sb[ss[1:]]):
            fail("a chunk does not start at the first row of its boundary byte")
        shared = np.intersect1d(t[t < nbytes], s[s < nbytes])
        if not np.array_equal(tb[ts], shared):
            fail(f"chunk starts {tb[ts].tolist()[:8]} are not the shared boundaries {shared.tolist()[:8]}")
    elif nbytes > 0 or t_end != 0 or s_end != 0:
        fail(f"no chunk for a {nbytes}-byte completion with {t_end} teacher and {s_end} student rows")
    if pairs.size:
        pi, pj = pairs[:, 0].astype(np.int64), pairs[:, 1].astype(np.int64)
        if np.any(np.diff(pi) <= 0) or np.any(np.diff(pj) <= 0):
            fail("pairs are not strictly increasing in both columns")
        if pi.min() < 0 or pj.min() < 0 or pi.max() >= t.size or pj.max() >= s.size:
            fail(f"pair rows outside [0, {t.size}) x [0, {s.size})")
        if np.any(tb[pi] != sb[pj]):
            k = int(np.flatnonzero(tb[pi] != sb[pj])[0])
            fail(f"pair {k} {pairs[k]} predicts teacher byte {tb[pi[k]]} but student byte {sb[pj[k]]}")
        inner = tb[pi] < nbytes
        if np.any(tb[pi[inner] + 1] == tb[pi[inner]]) or np.any(sb[pj[inner] + 1] == sb[pj[inner]]):
            fail("a pair does not use the last row whose token starts at its byte")
    want_end = alignment.has_end_pair
    got_end = bool(pairs.size) and int(pairs[-1, 0]) == t_end and int(pairs[-1, 1]) == s_end and want_end
    if want_end != got_end:
        fail("the end pair (both end rows) must be the last pair exactly when both sides have an end row")
    n_inner = pairs.shape[0] - int(want_end)
    if n_inner != chunks.shape[0]:
        fail(f"{n_inner} non-end pairs but {chunks.shape[0]} chunks: every chunk starts at one shared boundary")


# ------------------------------------------------------------------------------------------ vocabulary map


@dataclass(frozen=True)
class VocabMap:
    """Exact-string map teacher id -> student id (-1 where the student has no token with the same bytes).

    ``coverage`` = ``n_mapped / n_teacher`` over the teacher's regular tokens (not special, non-empty bytes);
    special tokens map only to student special tokens with the same content (``n_special_mapped``).
    """

    teacher_to_student: np.ndarray
    coverage: float
    n_mapped: int
    n_teacher: int
    n_special_mapped: int


def vocab_map(teacher: Any, student: Any) -> VocabMap:
    """Build the exact-bytes vocabulary map between two tokenizers (or their `TokenBytes`).

    Among student tokens with identical bytes, a regular piece wins over an added one and over a ``<0xNN>``
    byte-fallback piece, then the lowest id (what the student's own tokenizer would normally produce).
    """
    ti = teacher if isinstance(teacher, TokenBytes) else token_bytes_info(teacher)
    si = student if isinstance(student, TokenBytes) else token_bytes_info(student)
    regular: dict[bytes, int] = {}
    special: dict[bytes, int] = {}
    rank = si.added.astype(np.int8) + si.byte_fallback.astype(np.int8) * 2 - si.exact.astype(np.int8) * 4
    order = np.lexsort((-np.arange(si.size), -rank))  # worst first, so the best candidate is written last
    for j in order.tolist():
        piece = si.pieces[j]
        if not piece or not si.exact[j]:
            continue
        (special if si.special[j] else regular)[piece] = j
    out = np.full(ti.size, -1, np.int32)
    n_teacher = n_mapped = n_special = 0
    for i, piece in enumerate(ti.pieces):
        if not piece or not ti.exact[i]:
            continue
        if ti.special[i]:
            j = special.get(piece, -1)
            n_special += j >= 0
        else:
            n_teacher += 1
            j = regular.get(piece, -1)
            n_mapped += j >= 0
        out[i] = j
    return VocabMap(out, n_mapped / n_teacher if n_teacher else 0.0, n_mapped, n_teacher, n_special)
