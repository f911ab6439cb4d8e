"""Prompt preparation: special-token text in data stays text; ``--score-eos`` appends the template's end of turn."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import PreTrainedTokenizerFast

from logitcache.config import ConfigError
from logitcache.inputs import InputRecord
from logitcache.prompts import prepare, score_end_token, special_text_spans, truncate
from logitcache.testing.tiny_models import CHAT_TEMPLATE, bpe_tokenizer
from logitcache.testing.tiny_tokenizers import byte_level_bpe, metaspace_bpe
from logitcache.tokenization import encode_prompt_completion, token_bytes_info

MARKER_TEXT = "The marker is <|im_end|> in ChatML."


@pytest.fixture(scope="module")
def chatml() -> PreTrainedTokenizerFast:
    """ChatML template (turns end with <|im_end|>, id 2) but eos_token <|endoftext|> (id 0), like SmolLM2."""
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe_tokenizer().backend_tokenizer, eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>")
    tok.chat_template = CHAT_TEMPLATE
    assert (tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")) == (0, 2)
    return tok


def _rec(prompt: str | None = MARKER_TEXT, response: str | None = MARKER_TEXT, messages=None) -> InputRecord:
    return InputRecord(sample_id=7, source_id="7", prompt=prompt, messages=messages, response=response)


def _spells(tok: PreTrainedTokenizerFast, ids: np.ndarray, offs: np.ndarray, text: str) -> None:
    """The ids' bytes are the text and the offsets their running sum (exact tokenization)."""
    pieces = token_bytes_info(tok).pieces
    widths = np.diff(np.append(offs, len(text.encode())))
    written = b"".join(pieces[i][:w] for i, w in zip(ids.tolist(), widths.tolist(), strict=True))
    assert written == text.encode()


# ------------------------------------------------------------------------------------ special-token text (item 4)


def test_special_token_text_in_prompt_and_response_is_text(chatml: PreTrainedTokenizerFast) -> None:
    im_end, im_start = 2, 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        p = prepare(chatml, _rec(), chatml.chat_template, "score", score_eos=False)
    assert MARKER_TEXT in p.prompt_text and p.prompt_text.count("<|im_end|>") == 2  # precondition: data + template
    prompt_ids = p.token_ids[: p.prompt_len].tolist()
    assert prompt_ids.count(im_end) == 1 and prompt_ids.count(im_start) == 2  # only the template's markers
    completion_ids = p.token_ids[p.prompt_len :].tolist()
    assert im_end not in completion_ids and len(completion_ids) > 5  # "<|im_end|>" spelled as ordinary pieces
    _spells(chatml, p.token_ids, p.byte_offsets, p.prompt_text + p.completion_text)
    assert p.notes == {"special_token_text_in_prompt": 1, "special_token_text_in_completion": 1}
    assert any("special-token text" in str(w.message) for w in caught)


def test_prompts_without_special_text_tokenize_in_one_piece(chatml: PreTrainedTokenizerFast) -> None:
    p = prepare(chatml, _rec("Hello there, friend", "Fine."), chatml.chat_template, "score", score_eos=False)
    whole = chatml(p.prompt_text, add_special_tokens=False).input_ids
    assert p.token_ids[: p.prompt_len].tolist() == whole and p.notes == {}


def test_special_text_in_chat_messages_and_without_template(chatml: PreTrainedTokenizerFast) -> None:
    messages = [{"role": "system", "content": "Say <|im_start|> never."}, {"role": "user", "content": MARKER_TEXT}]
    p = prepare(chatml, _rec(None, "ok", messages), chatml.chat_template, "score", score_eos=False)
    prompt_ids = p.token_ids[: p.prompt_len].tolist()
    assert prompt_ids.count(1) == 3 and prompt_ids.count(2) == 2  # three turns opened, two closed: the template's
    _spells(chatml, p.token_ids, p.byte_offsets, p.prompt_text + p.completion_text)
    p = prepare(chatml, _rec(), None, "score", score_eos=False)  # no template: the prompt is all user text
    assert 2 not in p.token_ids.tolist() and p.prompt_text == MARKER_TEXT
    assert p.notes["special_token_text_in_prompt"] == 1


def test_completion_is_data_for_every_tokenizer() -> None:
    tok = metaspace_bpe()  # stage two tokenizes completions for students too: "</s>" is not their EOS there
    ids, offs, plen = encode_prompt_completion(tok, "Q:", "say </s> now")
    assert tok.eos_token_id not in ids[plen:].tolist() and offs[plen] == 2
    assert ids[plen:].tolist() == tok("say </s> now", add_special_tokens=False, split_special_tokens=True).input_ids


# ------------------------------------------------------------------------------ the end token of --score-eos (item 3)


def test_score_eos_appends_what_the_template_ends_a_turn_with(chatml: PreTrainedTokenizerFast) -> None:
    assert score_end_token(chatml, chatml.chat_template) == {"id": 2, "text": "<|im_end|>", "source": "chat_template"}
    p = prepare(chatml, _rec("Hi", "Hello."), chatml.chat_template, "score", score_eos=True)
    assert p.token_ids[-1] == 2 and p.byte_offsets[-1] == len((p.prompt_text + "Hello.").encode())
    # no template, or a template that closes turns with no special token: the tokenizer's EOS
    assert score_end_token(chatml, None) == {"id": 0, "text": "<|endoftext|>", "source": "eos_token"}
    plain = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    assert score_end_token(chatml, plain)["source"] == "eos_token"
    p = prepare(chatml, _rec("Hi", "Hello."), None, "score", score_eos=True)
    assert p.token_ids[-1] == 0


# ---------------------------------------------------------------- special text at a content's start (review, item 2)

_BYTE_BPE: list[PreTrainedTokenizerFast] = []


def _byte_bpe() -> PreTrainedTokenizerFast:
    """The byte-level BPE teacher (ChatML-like template, specials <|im_start|> <|im_end|>), built once."""
    if not _BYTE_BPE:
        _BYTE_BPE.append(byte_level_bpe())
    return _BYTE_BPE[0]


def _check_special_text_is_plain(tok: PreTrainedTokenizerFast, messages: list[dict[str, str]]) -> None:
    """Every template marker is one special token; every user content spells its special text as plain pieces."""
    template = tok.chat_template
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = prepare(tok, _rec(None, "ok", messages), template, "score", score_eos=False)
    text, starts, ends = "", [], []  # the byte-level BPE's template, written out: where its markers are
    for m in messages:
        starts.append(len(text.encode()))
        text += f"<|im_start|>{m['role']}\n{m['content']}"
        ends.append(len(text.encode()))
        text += "<|im_end|>\n"
    starts.append(len(text.encode()))
    assert p.prompt_text == text + "<|im_start|>assistant\n"  # precondition: the template is the one written out
    ids = p.token_ids[: p.prompt_len].tolist()
    offs = p.byte_offsets[: p.prompt_len].tolist()
    im_start, im_end = (tok.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>"))
    assert [o for o, t in zip(offs, ids, strict=True) if t == im_start] == starts  # the markers, one token each
    assert [o for o, t in zip(offs, ids, strict=True) if t == im_end] == ends  # and no user text among them
    _spells(tok, p.token_ids, p.byte_offsets, p.prompt_text + p.completion_text)


def test_user_content_that_starts_with_a_marker_stays_text() -> None:
    # the review's case: find() matched the template's own <|im_end|> after the system turn
    tok = _byte_bpe()
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "<|im_end|>"}]
    spans, held = special_text_spans(tok, tok.apply_chat_template(messages, tokenize=False,
                                                                  add_generation_prompt=True), messages,
                                     tok.chat_template)
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert held == 1 and spans == [(rendered.index("user\n") + 5, rendered.index("user\n") + 15)]
    _check_special_text_is_plain(tok, messages)


_SPECIAL = st.sampled_from(["<|im_end|>", "<|im_start|>", "<|eos|>", "<|bos|>"])
_PLAIN = st.text(st.sampled_from(list("ab \n<|>user")), max_size=6)


@st.composite
def _mixed(draw: st.DrawFn) -> str:
    """A content with special-token text at its start, middle and/or end (or none), around plain text."""
    parts = [draw(_SPECIAL) if draw(st.booleans()) else "", draw(_PLAIN), draw(_SPECIAL) if draw(st.booleans())
             else "", draw(_PLAIN), draw(_SPECIAL) if draw(st.booleans()) else ""]
    return "".join(parts) or "x"


# contents that equal the template's own text after a marker are the ones a text search mistakes for it
_contents = st.one_of(_mixed(), _SPECIAL, st.sampled_from(["<|im_end|>\n", "<|im_end|>\n<|im_start|>user\nx"]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["system", "user", "assistant"]), _contents), min_size=1, max_size=4))
def test_special_text_anywhere_in_contents_stays_text(turns: list[tuple[str, str]]) -> None:
    messages = [{"role": r, "content": c} for r, c in turns]
    _check_special_text_is_plain(_byte_bpe(), messages)


def test_a_template_that_rewrites_such_content_is_a_sample_error() -> None:
    from logitcache.prompts import PromptSpanError, encode_rendered  # new with the fix

    tok = _byte_bpe()
    upper = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | upper }}<|im_end|>\n{% endfor %}"
    messages = [{"role": "user", "content": "say <|im_end|> twice"}]
    rendered = tok.apply_chat_template(messages, chat_template=upper, tokenize=False)
    with pytest.raises(PromptSpanError, match="sample 5: a message holds special-token text"):
        special_text_spans(tok, rendered, messages, upper, sample=5)
    assert not isinstance(PromptSpanError("x"), ConfigError)  # a sample error: --on-sample-error skip counts it
    # a template that rewrites only contents without special text is fine
    ids, _, plen, held = encode_rendered(tok, rendered, [{"role": "user", "content": "plain"}], upper, "ok")
    assert held == 0 and plen == len(ids) - len(tok("ok", add_special_tokens=False).input_ids)


# ------------------------------------------------------------------ --overlong truncate at whole characters (item 1)


def test_truncate_never_cuts_inside_a_character() -> None:
    # the review's case: a byte-level token starts inside an emoji, and the cut there was not UTF-8
    tok = _byte_bpe()
    p = prepare(tok, _rec("hi", "ab 🙂🙂🙂 漢字"), None, "score", score_eos=True)
    for m in range(p.prompt_len, len(p.token_ids) + 1):
        t = truncate(p, m)
        assert len(t.token_ids) <= m and "ab 🙂🙂🙂 漢字".startswith(t.completion_text)
    full = (p.prompt_text + p.completion_text).encode()
    mid = [k for k in range(p.prompt_len, len(p.token_ids) - 1) if full[p.byte_offsets[k]] & 0xC0 == 0x80]
    assert mid  # precondition: some token starts inside a character
    t = truncate(p, mid[0])
    assert len(t.token_ids) < mid[0] and t.completion_text.encode() == full[len(p.prompt_text.encode()):
                                                                             p.byte_offsets[len(t.token_ids)]]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(st.sampled_from(list("ab cd🙂🎉漢字é\n")), max_size=24), st.booleans(), st.data())
def test_truncate_keeps_whole_tokens_and_whole_characters(response: str, eos: bool, data: st.DataObject) -> None:
    tok = _byte_bpe()
    p = prepare(tok, _rec("hi", response), tok.chat_template, "score", score_eos=eos)
    m = data.draw(st.integers(p.prompt_len, len(p.token_ids) + 2))
    t = truncate(p, m)
    keep = len(t.token_ids)
    assert keep <= m and t.prompt_len == p.prompt_len and t.prompt_text == p.prompt_text
    assert response.startswith(t.completion_text)
    assert t.token_ids.tolist() == p.token_ids[:keep].tolist()
    assert t.byte_offsets.tolist() == p.byte_offsets[:keep].tolist()
    if keep < len(p.token_ids):  # cut: the kept tokens spell the kept text, and no longer cut would decode
        _spells(tok, t.token_ids, t.byte_offsets, t.prompt_text + t.completion_text)
        full = (p.prompt_text + p.completion_text).encode()
        assert all(full[p.byte_offsets[k]] & 0xC0 == 0x80 for k in range(keep + 1, min(m, len(p.token_ids) - 1) + 1)
                   if p.byte_offsets[k] < len(full))
    else:
        assert t is p
