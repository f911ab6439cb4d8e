"""``storage.verify_alignment.check_record`` restates the pipeline's alignment invariants on byte offsets alone
(storage may not import the pipeline): it must accept everything ``byte_alignment.align`` produces and, on records
with one index changed, flag exactly those ``byte_alignment.check_alignment`` rejects."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from logitcache.pipeline.byte_alignment import AlignmentError, align, check_alignment
from logitcache.storage.verify_alignment import check_record


@st.composite
def sides(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, int]:
    nbytes = draw(st.integers(0, 24))
    def starts(eos: bool) -> np.ndarray:
        if nbytes == 0:
            inner: list[int] = []
        else:
            inner = sorted([0, *draw(st.lists(st.integers(0, nbytes - 1), max_size=nbytes + 3))])
        return np.asarray(inner + ([nbytes] if eos else []), np.int64)

    return starts(draw(st.booleans())), starts(False), nbytes


def _check(t: np.ndarray, s: np.ndarray, nbytes: int, pairs: np.ndarray, chunks: np.ndarray, te: int, se: int):
    return check_record(t, nbytes, True, s.size + 2, 2, s, pairs.reshape(-1), chunks.reshape(-1), te, se)


@settings(max_examples=300, deadline=None)
@given(sides(), st.integers(0, 3), st.integers(-2, 2))
def test_check_record_agrees_with_the_pipeline(case, which, delta):
    t, s, nbytes = case
    a = align(t, s, nbytes, student_end_row=True)
    assert _check(t, s, nbytes, a.pairs, a.chunks, a.teacher_end, a.student_end) is None
    pairs, chunks = a.pairs.copy(), a.chunks.copy()
    target = pairs if which < 2 or not chunks.size else chunks
    if target.size and delta:
        target.reshape(-1)[(which * 7) % target.size] += delta
    found = _check(t, s, nbytes, pairs, chunks, a.teacher_end, a.student_end)
    try:
        check_alignment(type(a)(pairs, chunks, a.teacher_end, a.student_end), t, s, b"x" * nbytes,
                        student_end_row=True)
        pipeline_ok = True
    except AlignmentError:
        pipeline_ok = False
    assert (found is None) == pipeline_ok, found  # no false alarm, no missed break
