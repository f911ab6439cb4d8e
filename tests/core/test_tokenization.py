"""logitcache.tokenization: exact byte offsets, prompt+completion encoding, fingerprints (tiny tokenizers only)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from logitcache.pipeline.byte_alignment import AlignmentError, _check_token_bytes
from logitcache.testing.tiny_tokenizers import ALL_TINY, byte_level_bpe, legacy_unigram, metaspace_bpe
from logitcache.tokenization import (
    TokenizationMismatchError,
    byte_offsets_for_ids,
    chat_template_hash,
    encode_batch_with_byte_offsets,
    encode_prompt_completion,
    encode_with_byte_offsets,
    token_bytes_info,
    token_bytes_table,
    tokenizer_fingerprint,
)

TINY = sorted(ALL_TINY)
HYPO = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# text biased towards the hard cases: metaspace characters, special-token literals, emoji sequences, whitespace
TRICKY = st.lists(
    st.one_of(
        st.characters(codec="utf-8"),
        st.sampled_from(["▁", " ", "  ", "\n", "\t", "\r\n", "\u200d", "\U0001f3fd", "e\u0301", "😀", "中", "<s>",
                         "</s>", "<|bos|>", "<|im_end|>", "<0x41>", "Ġ", "Hello", " world"]),
    ),
    max_size=25,
).map("".join)


def tok_of(name: str) -> PreTrainedTokenizerFast:
    return ALL_TINY[name]()


def assert_exact(tok: object, text: str, ids: np.ndarray, offs: np.ndarray) -> None:
    """Offsets are monotone from 0 and every token spells exactly its byte slice of the text."""
    text_b = text.encode()
    assert ids.dtype == np.int32 and offs.dtype == np.int64 and ids.shape == offs.shape
    if offs.size:
        assert offs[0] == 0 and np.all(np.diff(offs) >= 0) and offs[-1] <= len(text_b)
    _check_token_bytes(token_bytes_info(tok), ids, offs, text_b, "tokens", None)


# ---------------------------------------------------------------------------------------------- the table


def test_table_decodes_each_family() -> None:
    t = byte_level_bpe()
    table = token_bytes_table(t)
    assert table[t.convert_tokens_to_ids("Ġ")] == b" "
    assert table[t.convert_tokens_to_ids("Ċ")] == b"\n"
    assert table[t.convert_tokens_to_ids("â")] == b"\xe2"
    assert table[t.convert_tokens_to_ids("<|im_end|>")] == b"<|im_end|>"
    s = metaspace_bpe()
    info = token_bytes_info(s)
    assert info.pieces[s.convert_tokens_to_ids("<0xE2>")] == b"\xe2" and info.byte_fallback.sum() == 256
    assert info.pieces[s.convert_tokens_to_ids("▁")] == b" "
    assert info.kind == "metaspace" and not info.dummy_first and info.prefix_ids == (s.bos_token_id,)
    u = token_bytes_info(legacy_unigram())
    assert u.dummy_first and u.unk_id == 0 and u.byte_fallback.sum() == 256
    assert token_bytes_info(s) is info  # cached per tokenizer object
    assert all(info.exact) and info.special[s.bos_token_id] and not info.special[s.convert_tokens_to_ids("▁")]


def test_raw_tokenizers_tokenizer_is_accepted() -> None:
    raw = Tokenizer.from_str(byte_level_bpe().backend_tokenizer.to_str())
    ids, offs = encode_with_byte_offsets(raw, "Hello, world")
    assert_exact(raw, "Hello, world", ids, offs)
    with pytest.raises(TypeError, match="no fast backend"):
        encode_with_byte_offsets(object(), "x")


# ---------------------------------------------------------------------------------------------- encoding


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("special", [True, False])
@HYPO
@given(text=TRICKY)
def test_any_text_gets_exact_offsets(name: str, special: bool, text: str) -> None:
    tok = tok_of(name)
    if name == "legacy_unigram" and "<0x" in text:
        # HF's Unigram matches a literal "<0x41>" in the text as the byte piece <0x41> (= "A"): no round trip
        try:
            encode_with_byte_offsets(tok, text, add_special_tokens=special)
        except TokenizationMismatchError as err:
            assert "does not reproduce the text" in str(err)
        return
    ids, offs = encode_with_byte_offsets(tok, text, add_special_tokens=special)
    assert ids.tolist() == tok(text, add_special_tokens=special).input_ids
    assert_exact(tok, text, ids, offs)


@pytest.mark.parametrize("name", TINY)
@settings(max_examples=60, deadline=None)
@given(text=st.text())
def test_arbitrary_unicode(name: str, text: str) -> None:
    tok = tok_of(name)
    ids, offs = encode_with_byte_offsets(tok, text)
    assert_exact(tok, text, ids, offs)


def test_byte_fallback_splits_one_character_over_tokens() -> None:
    s = metaspace_bpe()
    ids, offs = encode_with_byte_offsets(s, "a🧪b", add_special_tokens=False)  # 🧪 is not in the corpus
    toks = s.convert_ids_to_tokens(ids.tolist())
    k = toks.index("<0xF0>")
    assert toks[k:k + 4] == ["<0xF0>", "<0x9F>", "<0xA7>", "<0xAA>"]
    assert offs[k:k + 5].tolist() == [1, 2, 3, 4, 5]


def test_byte_level_splits_emoji_over_tokens() -> None:
    t = byte_level_bpe()
    text = "x🏳️‍🌈y"
    ids, offs = encode_with_byte_offsets(t, text, add_special_tokens=False)
    assert_exact(t, text, ids, offs)
    assert len(ids) > 3 and offs[-1] == len(text.encode()) - 1


def test_bos_and_dummy_prefix_cover_no_text() -> None:
    s = metaspace_bpe()
    ids, offs = encode_with_byte_offsets(s, "Hello world")
    toks = s.convert_ids_to_tokens(ids.tolist())
    assert toks[0] == "<s>" and toks[1].startswith("▁")  # the dummy prefix sits in the first word
    assert offs[0] == 0 and offs[1] == 0
    assert offs[2] == len(toks[1]) - 1  # the dummy space is not a text byte
    ids2, offs2 = encode_with_byte_offsets(s, " Hello")  # Metaspace does not prepend before a space
    assert offs2.tolist()[:2] == [0, 0] and s.convert_ids_to_tokens(ids2.tolist())[1].startswith("▁")


@pytest.mark.parametrize("text", ["▁hello ▁ ▁▁x", " z", "<s>y<s> z</s>", "▁", "  ", "<s>"])
def test_legacy_prepend_normalizer_and_literal_metaspace(text: str) -> None:
    """The legacy normalizer prepends after every special token too, and ``▁`` may be literal text."""
    for tok in (legacy_unigram(), metaspace_bpe()):
        for special in (True, False):
            ids, offs = encode_with_byte_offsets(tok, text, add_special_tokens=special)
            assert_exact(tok, text, ids, offs)


def test_special_tokens_inside_text_cover_their_literal() -> None:
    t = byte_level_bpe()
    text = "a<|im_end|>b<|bos|>"
    ids, offs = encode_with_byte_offsets(t, text)
    toks = t.convert_ids_to_tokens(ids.tolist())
    assert toks == ["<|bos|>", "a", "<|im_end|>", "b", "<|bos|>"]
    assert offs.tolist() == [0, 0, 1, 11, 12]


def test_stripping_added_tokens_and_unknown_tokens() -> None:
    raw = Tokenizer.from_str(byte_level_bpe().backend_tokenizer.to_str())
    raw.add_special_tokens([AddedToken("<mask>", lstrip=True, rstrip=True)])
    ids, offs = encode_with_byte_offsets(raw, "a  <mask>  b")
    assert offs.tolist() == [0, 0, 1, 11]  # the mask token absorbs the spaces around it
    bpe = Tokenizer(models.BPE({"<unk>": 0, "a": 1, "b": 2}, [], unk_token="<unk>", fuse_unk=True))
    ids, offs = encode_with_byte_offsets(bpe, "aé€b")
    assert ids.tolist() == [1, 0, 2] and offs.tolist() == [0, 1, 6]  # <unk> covers what it replaced


def test_empty_text() -> None:
    for name in TINY:
        tok = tok_of(name)
        ids, offs = encode_with_byte_offsets(tok, "")
        assert ids.tolist() == tok("").input_ids and offs.tolist() == [0] * len(ids)
        ids, offs = encode_with_byte_offsets(tok, "", add_special_tokens=False)
        assert ids.size == 0 and offs.size == 0


def test_batch_matches_single() -> None:
    texts = ["Hello world", "", "中文 😀", "  \n\n x"]
    for name in TINY:
        tok = tok_of(name)
        batch = encode_batch_with_byte_offsets(tok, texts)
        for text, (ids, offs) in zip(texts, batch):
            ids1, offs1 = encode_with_byte_offsets(tok, text)
            assert ids.tolist() == ids1.tolist() and offs.tolist() == offs1.tolist()


# ---------------------------------------------------------------------------------------------- mismatches


def _normalizing(norm: normalizers.Normalizer) -> PreTrainedTokenizerFast:
    raw = Tokenizer.from_str(byte_level_bpe().backend_tokenizer.to_str())
    raw.normalizer = norm
    return PreTrainedTokenizerFast(tokenizer_object=raw, name_or_path="nfc-teacher")


def test_mismatch_is_reported_with_sample_offset_and_fix() -> None:
    tok = _normalizing(normalizers.NFC())
    text = "Caf" + "e\u0301" + " ok"
    with pytest.raises(TokenizationMismatchError) as err:
        encode_with_byte_offsets(tok, text, sample="s-17")
    msg = str(err.value)
    assert "sample s-17" in msg and "nfc-teacher" in msg and "first difference at byte 3" in msg
    assert "on_mismatch='char_offsets'" in msg and "\n" not in msg
    _, offs = encode_with_byte_offsets(tok, text, on_mismatch="char_offsets")
    assert offs[0] == 0 and np.all(np.diff(offs) >= 0) and offs[-1] < len(text.encode())
    assert 6 in offs.tolist()  # exact again at the character boundary after the rewritten "e\u0301"


@settings(max_examples=60, deadline=None)
@given(text=st.text())
def test_char_offsets_fallback_is_monotone(text: str) -> None:
    tok = _normalizing(normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()]))
    ids, offs = encode_with_byte_offsets(tok, text, add_special_tokens=False, on_mismatch="char_offsets")
    assert ids.tolist() == tok(text, add_special_tokens=False).input_ids
    if offs.size:
        assert offs[0] == 0 and np.all(np.diff(offs) >= 0) and offs[-1] < max(1, len(text.encode()))


def test_dropping_tokenizer_is_reported() -> None:
    wl = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1, "b": 2}, unk_token="<unk>"))
    wl.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    with pytest.raises(TokenizationMismatchError, match="first difference at byte 1"):
        encode_with_byte_offsets(wl, "a b", sample=3)
    _, offs = encode_with_byte_offsets(wl, "a b", on_mismatch="char_offsets")
    assert offs.tolist() == [0, 2]


# ---------------------------------------------------------------------------------------------- ids -> offsets


@pytest.mark.parametrize("name", TINY)
@settings(max_examples=60, deadline=None)
@given(text=TRICKY)
def test_offsets_for_given_ids(name: str, text: str) -> None:
    tok = tok_of(name)
    if name == "legacy_unigram" and "<0x" in text:
        return  # see test_any_text_gets_exact_offsets
    ids, offs = encode_with_byte_offsets(tok, text, add_special_tokens=False)
    eos = np.int32(tok.eos_token_id)
    got = byte_offsets_for_ids(tok, np.append(ids, eos), text)
    assert got[:-1].tolist() == offs.tolist() and got[-1] == len(text.encode())  # generated EOS: zero bytes


def test_offsets_for_ids_of_decoded_text() -> None:
    u = legacy_unigram()
    ids = u("Hello world", add_special_tokens=False).input_ids
    text = u.decode(ids)  # the decoder strips the dummy prefix
    assert text == "Hello world"
    offs = byte_offsets_for_ids(u, ids, text)
    assert offs[0] == 0 and offs[-1] == len(text) - 1
    with pytest.raises(TokenizationMismatchError, match="sample 9"):
        byte_offsets_for_ids(u, ids, "Hello there", sample=9)
    with pytest.raises(TokenizationMismatchError, match="outside the vocabulary"):
        byte_offsets_for_ids(u, [10**6], "x", sample=9)


# ---------------------------------------------------------------------------------------------- prompt + completion


@pytest.mark.parametrize("name", TINY)
@HYPO
@given(prompt=TRICKY, completion=TRICKY)
def test_prompt_completion(name: str, prompt: str, completion: str) -> None:
    tok = tok_of(name)
    if name == "legacy_unigram" and "<0x" in prompt + completion:
        return  # see test_any_text_gets_exact_offsets
    ids, offs, p = encode_prompt_completion(tok, prompt, completion)
    pn = len(prompt.encode())
    info = token_bytes_info(tok)
    prompt_ids = tok(prompt, add_special_tokens=False).input_ids
    starts_with_bos = prompt_ids[: len(info.prefix_ids)] == list(info.prefix_ids)
    expect = ([] if starts_with_bos else list(info.prefix_ids)) + prompt_ids
    assert ids[:p].tolist() == expect
    plain = tok(completion, add_special_tokens=False, split_special_tokens=True).input_ids  # completion: data
    assert ids[p:].tolist() == plain
    assert_exact(tok, prompt + completion, ids, offs)
    if completion:
        assert offs[p] == pn  # the completion starts at a token boundary
    assert np.all(offs[p:] >= pn)


def test_prompt_special_tokens_modes() -> None:
    t = byte_level_bpe()
    bos = t.bos_token_id
    ids, _, p = encode_prompt_completion(t, "<|bos|>Hi", "there")
    assert ids.tolist().count(bos) == 1 and ids[0] == bos  # auto: not doubled
    ids, _, _ = encode_prompt_completion(t, "<|bos|>Hi", "there", prompt_special_tokens=True)
    assert ids[:2].tolist() == [bos, bos]
    ids, offs, p = encode_prompt_completion(t, "Hi", "", prompt_special_tokens=False)
    assert bos not in ids.tolist() and p == len(ids)
    ids, offs, p = encode_prompt_completion(t, "", "x")
    assert ids[0] == bos and p == 1 and offs.tolist() == [0, 0]
    raw = Tokenizer.from_str(t.backend_tokenizer.to_str())
    raw.post_processor = None
    with pytest.raises(TokenizationMismatchError, match="no predicting position"):
        encode_prompt_completion(raw, "", "x", sample=4)
    ids, offs, p = encode_prompt_completion(raw, "", "")
    assert ids.size == 0 and p == 0


# ---------------------------------------------------------------------------------------------- fingerprints


def test_fingerprint_is_stable_and_discriminating(tmp_path: Path) -> None:
    t, s = byte_level_bpe(), metaspace_bpe()
    fp = tokenizer_fingerprint(t)
    assert len(fp) == 64 and fp != tokenizer_fingerprint(s)
    t.save_pretrained(str(tmp_path / "t"))
    again = PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "t"))
    assert tokenizer_fingerprint(again) == fp
    code = (
        "import sys; from transformers import PreTrainedTokenizerFast as P; "
        "from logitcache.tokenization import tokenizer_fingerprint as f; "
        f"print(f(P.from_pretrained({str(tmp_path / 't')!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == fp
    again.add_tokens(["zzz-new"])
    assert tokenizer_fingerprint(again) != fp
    assert len(token_bytes_table(again)) == len(token_bytes_table(t)) + 1  # the cache follows the vocabulary


def test_chat_template_hash() -> None:
    t = byte_level_bpe()
    h = chat_template_hash(t)
    assert h is not None and len(h) == 64
    assert chat_template_hash(metaspace_bpe()) is None
    s = metaspace_bpe()
    s2 = PreTrainedTokenizerFast(tokenizer_object=s.backend_tokenizer)
    s2.chat_template = {"default": t.chat_template}
    assert chat_template_hash(s2) == chat_template_hash(s2) and chat_template_hash(s2) != h
    assert json.loads(json.dumps({"h": h}))["h"] == h


def test_alignment_error_is_one_line() -> None:
    s = metaspace_bpe()
    ids, offs = encode_with_byte_offsets(s, "ab", add_special_tokens=False)
    with pytest.raises(AlignmentError) as err:
        _check_token_bytes(token_bytes_info(s), ids, offs, b"ax", "student", 5)
    assert "sample 5" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("completion", ["The marker is <|im_end|> here.", "<s>▁", "a</s>", "<|bos|> x <|eos|>"])
def test_special_token_text_in_completion_is_plain_text(name: str, completion: str) -> None:
    tok = tok_of(name)
    ids, offs, p = encode_prompt_completion(tok, "Q: ", completion)
    special = token_bytes_info(tok).special
    if not (name == "legacy_unigram" and "s>" in completion):  # its Unigram model itself has "<s>" as a piece
        assert not special[ids[p:]].any()  # special parsing is off in the completion, so no control token
    assert_exact(tok, "Q: " + completion, ids, offs)
    tok(completion, split_special_tokens=True)  # leaves the backend's switch on: the prompt must still parse
    ids, _, p = encode_prompt_completion(tok, "<s><|bos|>", "")
    assert special[ids[:p]].any()
