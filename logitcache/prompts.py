"""Render inputs into prompt text and token ids: the shared core of stage one, stage two and eval.

Prompt rendering: with a chat template (the model's, or ``--chat-template FILE``), a ``prompt`` string becomes
one user message and the template is applied with ``add_generation_prompt=True``; the rendered text is what the
cache stores, and it is tokenized without adding special tokens again (the template writes BOS itself when the
model wants one). Without a template (``--chat-template none``, or a model without one) the prompt text is used
as is and the tokenizer adds its BOS; ``messages`` then need a template and are refused.

Score mode tokenizes the response separately from the prompt (so the completion starts at a token boundary) and
appends the teacher's EOS (``--score-eos``) so the cache also teaches when to stop. Generate (``pipeline``), align
(``pipeline``) and eval (``distill``) all render through here, so a prompt means the same text everywhere.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from logitcache.inputs import InputError, InputRecord
from logitcache.tokenization import encode_prompt_completion


@dataclass
class Prepared:
    """One input ready for the engine: rendered prompt, its ids and byte offsets, and (score) the response."""

    record: InputRecord
    prompt_text: str
    completion_text: str
    token_ids: np.ndarray
    byte_offsets: np.ndarray
    prompt_len: int
    messages: list[dict[str, str]]


def resolve_chat_template(tokenizer: Any, setting: str) -> str | None:
    """``auto``: the tokenizer's template if it has one; ``none``: no template; otherwise a file path."""
    if setting == "none":
        return None
    if setting == "auto":
        return getattr(tokenizer, "chat_template", None) or None
    try:
        with open(setting, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise InputError(f"--chat-template {setting}: cannot read ({e.strerror})") from e


def input_messages(rec: InputRecord, system_prompt: str | None = None) -> list[dict[str, str]]:
    """The conversation before any template: the input's messages, or its prompt as one user message."""
    messages = rec.messages if rec.messages is not None else [{"role": "user", "content": rec.prompt or ""}]
    if system_prompt and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return messages


def render_messages(tokenizer: Any, messages: list[dict[str, str]], template: str | None, sample: object) -> str:
    """Prompt text for ``messages``: the chat template applied, or (no template) a lone user message as is."""
    if template is None:
        if len(messages) != 1 or messages[0]["role"] != "user":
            raise InputError(
                f"sample {sample}: chat messages need a chat template, but the tokenizer has none and "
                "--chat-template is none; pass --chat-template FILE or give a 'prompt' string"
            )
        return messages[0]["content"]
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)


def prepare(
    tokenizer: Any, rec: InputRecord, template: str | None, mode: str, score_eos: bool, system_prompt: str | None = None
) -> Prepared:
    messages = input_messages(rec, system_prompt if template is not None else None)
    if template is None and rec.messages is not None:
        raise InputError(
            f"sample {rec.sample_id}: chat messages need a chat template, but the model has none "
            "and --chat-template is none; pass --chat-template FILE or give a 'prompt' string"
        )
    prompt_text = render_messages(tokenizer, messages, template, rec.sample_id)
    completion = rec.response if mode == "score" else ""
    ids, offs, plen = encode_prompt_completion(
        tokenizer,
        prompt_text,
        completion or "",
        prompt_special_tokens=False if template else None,
        sample=rec.sample_id,
    )
    if mode == "score" and score_eos and tokenizer.eos_token_id is not None:
        ids = np.append(ids, np.int32(tokenizer.eos_token_id))
        offs = np.append(offs, np.int64(len((prompt_text + (completion or "")).encode("utf-8"))))
    return Prepared(rec, prompt_text, completion or "", ids, offs, plen, messages)


def truncate(p: Prepared, max_tokens: int) -> Prepared:
    """Keep the first ``max_tokens`` tokens (prompt intact; the completion is cut at a token boundary)."""
    if len(p.token_ids) <= max_tokens:
        return p
    full = (p.prompt_text + p.completion_text).encode("utf-8")
    cut = int(p.byte_offsets[max_tokens])
    completion_b = full[len(p.prompt_text.encode("utf-8")) : cut]
    return dataclasses.replace(
        p,
        completion_text=completion_b.decode("utf-8"),
        token_ids=p.token_ids[:max_tokens],
        byte_offsets=p.byte_offsets[:max_tokens],
    )
