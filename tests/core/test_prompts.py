"""Prompt preparation: special-token text in data stays text; ``--score-eos`` appends the template's end of turn."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from transformers import PreTrainedTokenizerFast

from logitcache.inputs import InputRecord
from logitcache.prompts import prepare, score_end_token
from logitcache.testing.tiny_models import CHAT_TEMPLATE, bpe_tokenizer
from logitcache.testing.tiny_tokenizers import metaspace_bpe
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
