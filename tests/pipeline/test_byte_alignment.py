"""logitcache.pipeline.byte_alignment: boundaries, pairs, chunks, invariants and the vocabulary map."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from logitcache.pipeline.byte_alignment import (
    Alignment,
    AlignmentError,
    align,
    boundaries,
    check_alignment,
    completion_offsets,
    vocab_map,
)
from logitcache.testing.tiny_tokenizers import ALL_TINY, byte_level_bpe, legacy_unigram, metaspace_bpe
from logitcache.tokenization import encode_prompt_completion, token_bytes_info

HYPO = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def reference(t: list[int], s: list[int], nb: int, student_end_row: bool) -> tuple[list, list, int, int]:
    """Straight-from-the-definition alignment, one Python loop per boundary."""
    s = [*s, nb] if student_end_row else list(s)
    t_end = next((i for i, x in enumerate(t) if x == nb), len(t))
    s_end = next((j for j, x in enumerate(s) if x == nb), len(s))
    shared = sorted((set(t) & set(s)) - {nb})
    pairs = [(max(i for i, x in enumerate(t) if x == b), max(j for j, x in enumerate(s) if x == b)) for b in shared]
    if t_end < len(t) and s_end < len(s):
        pairs.append((t_end, s_end))

    def first(xs: list[int], b: int, end: int) -> int:
        return end if b == nb else xs.index(b)

    bounds = [*shared, nb]
    chunks = [(first(t, bounds[k], t_end), first(t, bounds[k + 1], t_end),
               first(s, bounds[k], s_end), first(s, bounds[k + 1], s_end)) for k in range(len(shared))]
    return pairs, chunks, (t_end if t_end < len(t) else -1), (s_end if s_end < len(s) else -1)


@st.composite
def side(draw: st.DrawFn, nb: int) -> list[int]:
    """Sorted token starts for an nb-byte completion: 0 first, repeats = zero-width tokens, maybe end rows."""
    starts = [0] if nb > 0 else []
    starts += draw(st.lists(st.integers(1, max(1, nb - 1)), max_size=nb, unique=True)) if nb > 1 else []
    starts += draw(st.lists(st.sampled_from(starts), max_size=3)) if starts else []
    starts += [nb] * draw(st.integers(0, 2))
    return sorted(starts)


@st.composite
def offsets_case(draw: st.DrawFn) -> tuple[list[int], list[int], int, bool]:
    nb = draw(st.integers(0, 40))
    return draw(side(nb)), draw(side(nb)), nb, draw(st.booleans())


# ---------------------------------------------------------------------------------------------- exact examples


def test_worked_example() -> None:
    # completion "Hello world" (11 bytes); teacher: "Hello" " world" + EOS row; student: "Hel" "lo" " wor" "ld"
    t, s, nb = [0, 5, 11], [0, 3, 5, 9], 11
    a = align(t, s, nb, student_end_row=True)
    assert a.pairs.tolist() == [[0, 0], [1, 2], [2, 4]]  # last pair: teacher EOS row 2, student row 4 = n_s
    assert a.chunks.tolist() == [[0, 1, 0, 2], [1, 2, 2, 4]]
    assert (a.teacher_end, a.student_end, a.has_end_pair) == (2, 4, True)
    assert a.pairs.dtype == np.int32 and a.chunks.dtype == np.int32
    b = align(t[:2], s, nb, student_end_row=True)  # teacher hit max tokens: no EOS row, no end pair
    assert b.pairs.tolist() == [[0, 0], [1, 2]] and b.chunks.tolist() == a.chunks.tolist()
    assert (b.teacher_end, b.has_end_pair) == (-1, False)
    check_alignment(a, t, s, "Hello world", student_end_row=True)
    check_alignment(b, t[:2], s, "Hello world", student_end_row=True)


def test_zero_width_tokens_pair_their_last_row() -> None:
    # teacher emitted a special token (zero bytes) at byte 5 before " world"; student has a lone dummy "▁" at 0
    t, s, nb = [0, 5, 5], [0, 0, 5], 11
    a = align(t, s, nb)
    assert a.pairs.tolist() == [[0, 1], [2, 2]]  # rows that predict the byte-carrying tokens
    assert a.chunks.tolist() == [[0, 1, 0, 2], [1, 3, 2, 3]]  # chunks keep the zero-width rows
    assert a.teacher_end == -1 and a.student_end == -1 and not a.has_end_pair
    check_alignment(a, t, s, b"x" * nb)
    b = align([*t, nb, nb], s, nb, student_end_row=True)  # two zero-width rows after the text: the first is the end
    assert b.pairs.tolist() == [[0, 1], [2, 2], [3, 3]] and b.chunks.tolist() == a.chunks.tolist()
    check_alignment(b, [*t, nb, nb], s, b"x" * nb, student_end_row=True)


def test_empty_completion() -> None:
    a = align([], [], 0)
    assert a.pairs.shape == (0, 2) and a.chunks.shape == (0, 4)
    b = align([0], [], 0, student_end_row=True)  # the teacher predicted EOS right away
    assert b.pairs.tolist() == [[0, 0]] and b.chunks.shape == (0, 4)
    check_alignment(a, [], [], b"")
    check_alignment(b, [0], [], b"", student_end_row=True)


def test_boundaries_and_completion_offsets() -> None:
    assert boundaries([0, 2, 2], 5).tolist() == [0, 2, 2, 5]
    assert completion_offsets([0, 0, 3, 7, 9], 2, 3).tolist() == [0, 4, 6]


@pytest.mark.parametrize(
    ("t", "s", "nb", "match"),
    [
        ([1, 2], [0], 3, "teacher first token starts at byte 1"),
        ([0, 2, 1], [0], 3, "teacher offsets decrease at token 2"),
        ([0], [0, 9], 3, "student offsets run outside"),
        ([], [0], 3, "teacher has no token for a 3-byte completion"),
        ([[0]], [0], 3, "must be 1-D"),
    ],
)
def test_bad_offsets_are_named(t: list, s: list, nb: int, match: str) -> None:
    with pytest.raises(AlignmentError, match=match) as err:
        align(t, s, nb, sample="q7")
    assert str(err.value).startswith("sample q7: ")


# ---------------------------------------------------------------------------------------------- properties


@HYPO
@given(case=offsets_case())
def test_matches_reference_and_invariants(case: tuple[list[int], list[int], int, bool]) -> None:
    t, s, nb, end = case
    a = align(np.asarray(t, np.int64), np.asarray(s, np.int32), nb, student_end_row=end)
    pairs, chunks, t_end, s_end = reference(t, s, nb, end)
    assert a.pairs.tolist() == [list(p) for p in pairs]
    assert a.chunks.tolist() == [list(c) for c in chunks]
    assert (a.teacher_end, a.student_end) == (t_end, s_end)
    check_alignment(a, t, s, bytes(nb), student_end_row=end)


@HYPO
@given(case=offsets_case(), data=st.data())
def test_check_catches_corruption(case: tuple[list[int], list[int], int, bool], data: st.DataObject) -> None:
    t, s, nb, end = case
    a = align(t, s, nb, student_end_row=end)
    fields = [f for f in ("pairs", "chunks") if getattr(a, f).size]
    if not fields:
        return
    name = data.draw(st.sampled_from(fields))
    arr = getattr(a, name).copy()
    k = data.draw(st.integers(0, arr.size - 1))
    arr.reshape(-1)[k] += data.draw(st.sampled_from([-1, 1]))
    with pytest.raises(AlignmentError, match="invariant violated"):
        check_alignment(dataclasses.replace(a, **{name: arr}), t, s, bytes(nb), student_end_row=end)
    with pytest.raises(AlignmentError):
        check_alignment(dataclasses.replace(a, **{name: getattr(a, name)[:-1]}), t, s, bytes(nb),
                        student_end_row=end)


TEXT = st.lists(
    st.one_of(
        st.characters(codec="utf-8"),
        st.sampled_from(["▁", " ", "   ", "\n\n", "\t", "\u200d", "👍🏽", "👩‍👩‍👧‍👦", "e\u0301", "中文", "<|im_end|>",
                         "<s>", "Hello", " world", "Ġ"]),
    ),
    max_size=25,
).map("".join)
PAIRS = [(a, b) for a in sorted(ALL_TINY) for b in sorted(ALL_TINY) if a != b]


@pytest.mark.parametrize(("teacher", "student"), PAIRS)
@HYPO
@given(prompt=TEXT, completion=TEXT, eos=st.booleans(), end=st.booleans())
def test_real_tokenizations_align(teacher: str, student: str, prompt: str, completion: str, eos: bool,
                                  end: bool) -> None:
    if "<0x" in prompt + completion:
        return  # legacy Unigram's literal "<0xNN>" quirk: tests/test_tokenization.py
    T, S = ALL_TINY[teacher](), ALL_TINY[student]()
    nb = len(completion.encode())
    t_ids, t_offs, tp = encode_prompt_completion(T, prompt, completion)
    s_ids, s_offs, sp = encode_prompt_completion(S, prompt, completion)
    pn = len(prompt.encode())
    tc, sc = completion_offsets(t_offs, tp, pn), completion_offsets(s_offs, sp, pn)
    tc_ids = t_ids[tp:]
    if eos:  # the cache holds the row predicting the teacher's EOS
        tc, tc_ids = np.append(tc, nb), np.append(tc_ids, np.int32(T.eos_token_id))
    a = align(tc, sc, nb, student_end_row=end)
    check_alignment(a, tc, sc, completion, student_end_row=end, student_ids=s_ids[sp:], student_tokenizer=S,
                    teacher_ids=tc_ids, teacher_tokenizer=T, sample="h")
    assert a.has_end_pair == (eos and end)
    if nb:
        assert a.pairs[0].tolist() == [int(np.searchsorted(tc, 0, "right") - 1),
                                       int(np.searchsorted(sc, 0, "right") - 1)]


def test_check_alignment_reports_token_bytes() -> None:
    S = metaspace_bpe()
    _, s_offs, sp = encode_prompt_completion(S, "Q:", "Hello world")
    sc = completion_offsets(s_offs, sp, 2)
    a = align(sc, sc, 11)
    wrong = np.full(sc.size, S.convert_tokens_to_ids("<0x41>"), np.int32)
    with pytest.raises(AlignmentError, match=r"sample 3: student token 0 .* do not concatenate"):
        check_alignment(a, sc, sc, "Hello world", student_ids=wrong, student_tokenizer=S, sample=3)
    with pytest.raises(AlignmentError, match="2 ids but"):
        check_alignment(a, sc, sc, "Hello world", teacher_ids=[1, 2], teacher_tokenizer=token_bytes_info(S))


def test_alignment_is_frozen_with_int32_arrays() -> None:
    a = align([0, 3], [0, 1, 3], 5)
    assert isinstance(a, Alignment)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.pairs = a.pairs  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------- vocabulary map


def test_vocab_map_exact_bytes_and_preferences() -> None:
    T, S = byte_level_bpe(), metaspace_bpe()
    vm = vocab_map(T, S)
    ti, si = token_bytes_info(T), token_bytes_info(S)
    assert vm.teacher_to_student.shape == (ti.size,) and vm.teacher_to_student.dtype == np.int32
    mapped = np.flatnonzero(vm.teacher_to_student >= 0)
    assert mapped.size == vm.n_mapped + vm.n_special_mapped and 0 < vm.coverage < 1
    for i in mapped.tolist():
        assert ti.pieces[i] == si.pieces[vm.teacher_to_student[i]]
    # a plain piece beats the byte-fallback piece with the same single byte
    assert "e" in S.get_vocab() and "Q" not in S.get_vocab()  # "Q" is not in the training corpus
    assert S.convert_ids_to_tokens(int(vm.teacher_to_student[T.convert_tokens_to_ids("e")])) == "e"
    assert S.convert_ids_to_tokens(int(vm.teacher_to_student[T.convert_tokens_to_ids("Q")])) == "<0x51>"
    assert vm.teacher_to_student[T.convert_tokens_to_ids("Ġ")] == S.convert_tokens_to_ids("▁")
    # every single byte maps (byte fallback covers all 256), special tokens only to special tokens
    singles = [i for i in range(ti.size) if len(ti.pieces[i]) == 1 and not ti.special[i]]
    assert all(vm.teacher_to_student[i] >= 0 for i in singles)
    assert vm.teacher_to_student[T.bos_token_id] == -1
    back = vocab_map(S, T)
    assert back.n_special_mapped == 0 and back.teacher_to_student[S.convert_tokens_to_ids("<0xE2>")] >= 0
    self_map = vocab_map(legacy_unigram(), legacy_unigram())
    assert self_map.coverage == 1.0
