"""Render inputs into prompt text and token ids: the shared core of stage one, stage two and eval.

Prompt rendering: with a chat template (the model's, or ``--chat-template FILE``), a ``prompt`` string becomes
one user message and the template is applied with ``add_generation_prompt=True``; the rendered text is what the
cache stores, and it is tokenized without adding special tokens again (the template writes BOS itself when the
model wants one). Without a template (``--chat-template none``, or a model without one) the prompt text is used
as is and the tokenizer adds its BOS; ``messages`` then need a template and are refused.

Score mode tokenizes the response separately from the prompt (so the completion starts at a token boundary) and
appends the token that ends an assistant turn (``--score-eos``; `score_end_token`: what the chat template closes
an assistant turn with, such as ``<|im_end|>``, else the tokenizer's EOS) so the cache also teaches when to stop.

Input text is data, never markup: special-token text inside a prompt or response (``"the marker is <|im_end|>"``)
is tokenized as plain text. The completion always is (`encode_prompt_completion`); in the rendered prompt only the
contents that hold such text are cut out and tokenized with special-token parsing off, so the template's own
markers stay control tokens and every other prompt tokenizes exactly as the model's chat server would (one
piece). Such samples are counted (``special_token_text_in_prompt`` / ``_in_completion``) and warned about once.
Their spans come from a second render with placeholders in their place (`special_text_spans`), not a text search
(which mistakes a content starting with ``<|im_end|>`` for the template's marker); a template that rewrites such
content is a sample error (`PromptSpanError`, ``--on-sample-error``), never a guessed span.

``--overlong truncate`` (`truncate`) cuts the completion at the last token boundary that starts a character: a
byte-level BPE token may start inside an emoji, and the cached completion must stay text.

Generate (``pipeline``), align (``pipeline``) and eval (``distill``) all render and tokenize through here
(`encode_rendered`), so a prompt means the same text and the same ids everywhere.
"""

from __future__ import annotations

import dataclasses
import re
import secrets
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from logitcache.inputs import InputError, InputRecord
from logitcache.tokenization import encode_prompt_completion, fast_backend, special_parsing


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
    notes: dict[str, int] = dataclasses.field(default_factory=dict)  # counters for the shard (special-token text)


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


_MARK = "LOGITCACHE0TURN0END0MARK"


def score_end_token(tokenizer: Any, template: str | None) -> dict[str, Any] | None:
    """The token ``--score-eos`` appends: what the chat template closes an assistant turn with, else the EOS.

    Chat teachers end a turn with their own marker (``<|im_end|>``, ``<end_of_turn>``, ``<|eot_id|>``), which is
    often not ``tokenizer.eos_token``: the template is rendered with an assistant message holding a marker and
    the first special token after the marker is taken. Without a template, or when that finds nothing, the
    tokenizer's EOS. Returns ``{"id", "text", "source": "chat_template" | "eos_token"}`` or None (no EOS at all).
    Remembered per tokenizer and template.
    """
    memo = tokenizer.__dict__.setdefault("_logitcache_turn_end", {}) if hasattr(tokenizer, "__dict__") else {}
    if template in memo:
        return memo[template]
    found: dict[str, Any] | None = None
    if template is not None:
        try:
            rendered = tokenizer.apply_chat_template(
                [{"role": "user", "content": "x"}, {"role": "assistant", "content": _MARK}],
                chat_template=template, tokenize=False, add_generation_prompt=False,
            )
        except Exception:  # a template that refuses this conversation: fall back to the EOS
            rendered = ""
        at = rendered.find(_MARK)
        if at >= 0:
            from logitcache.tokenization import token_bytes_info

            info = token_bytes_info(tokenizer)
            with special_parsing(tokenizer, on=True) as backend:
                enc = backend.encode(rendered[at + len(_MARK) :], add_special_tokens=False)
            for tid in enc.ids:
                if info.special[tid] or info.added[tid]:
                    found = {"id": int(tid), "text": info.pieces[tid].decode("utf-8", "replace"),
                             "source": "chat_template"}
                    break
    if found is None and getattr(tokenizer, "eos_token_id", None) is not None:
        found = {"id": int(tokenizer.eos_token_id), "text": str(tokenizer.eos_token), "source": "eos_token"}
    memo[template] = found
    return found


def _special_pattern(tokenizer: Any) -> re.Pattern[str] | None:
    """A regex matching any special token's text (remembered per tokenizer object); None when there is none."""
    memo = tokenizer.__dict__ if hasattr(tokenizer, "__dict__") else {}
    if "_logitcache_special_re" not in memo:
        decoder = fast_backend(tokenizer).get_added_tokens_decoder()
        texts = sorted({t.content for t in decoder.values() if t.special and t.content}, key=len, reverse=True)
        memo["_logitcache_special_re"] = re.compile("|".join(map(re.escape, texts))) if texts else None
    return memo["_logitcache_special_re"]


class PromptSpanError(ValueError):
    """The user content holding special-token text cannot be located in the rendered prompt (a sample error).

    Not a `ConfigError`: it is one sample's data (a template that rewrites such content), so stage one's
    ``--on-sample-error skip`` counts and names it instead of tokenizing the wrong characters as plain text.
    """


def _placeholder_token(prompt_text: str, messages: list[dict[str, str]]) -> str:
    """A random upper-case word found in neither the prompt nor any content (so a placeholder cannot collide)."""
    while True:
        token = "LOGITCACHE" + secrets.token_hex(8).upper()
        if token not in prompt_text and not any(token in str(m.get("content")) for m in messages):
            return token


def special_text_spans(
    tokenizer: Any, prompt_text: str, messages: list[dict[str, str]], template: str | None, sample: object = None
) -> tuple[list[tuple[int, int]], int]:
    """(character spans of ``prompt_text`` to tokenize as plain text, messages holding special-token text).

    A message whose content holds a special token's text (``"The marker is <|im_end|>"``) is data, not markup:
    its span in the rendered prompt is tokenized with special-token parsing off. Only such messages get a span,
    so every other prompt is tokenized exactly as before, in one piece.

    The spans are located by rendering once more with each such content replaced by a unique placeholder (a
    random word): the text around the placeholders is the template's own, and the real render must be exactly
    that text with each content (as is, or stripped: how templates insert content) in its placeholder's place.
    Searching the content in the render instead would match the template's own marker first when a content
    starts with it. When the renders do not line up (a template that rewrites such content), raises
    `PromptSpanError` (a sample error) rather than guess a span.
    """
    pattern = _special_pattern(tokenizer)
    if pattern is None:
        return [], 0
    if template is None:  # the prompt is the user's text itself
        return ([(0, len(prompt_text))], 1) if pattern.search(prompt_text) else ([], 0)
    held = [i for i, m in enumerate(messages) if isinstance(m.get("content"), str) and pattern.search(m["content"])]
    if not held:
        return [], 0
    token = _placeholder_token(prompt_text, messages)
    swapped = [{**m, "content": f"{token}M{i}E"} if i in held else m for i, m in enumerate(messages)]
    problem = "the chat template renders it differently from a placeholder"
    skeleton: str | None = None
    try:
        skeleton = render_messages(tokenizer, swapped, template, sample)
    except Exception as e:  # a template that refuses the placeholder
        problem = f"the chat template refuses a placeholder for it ({type(e).__name__}: {e})"
    parts: list[str] = []
    pos = groups = 0
    text = skeleton or ""
    for found in re.finditer(f"{token}M(\\d+)E", text):
        content = messages[int(found.group(1))]["content"]
        forms = dict.fromkeys([content, content.strip(), content.lstrip(), content.rstrip()])  # as is first
        parts += [re.escape(text[pos : found.start()]), "(" + "|".join(map(re.escape, forms)) + ")"]
        pos, groups = found.end(), groups + 1
    match = re.fullmatch("".join([*parts, re.escape(text[pos:])]), prompt_text) if skeleton is not None else None
    if match is None:
        raise PromptSpanError(
            f"sample {sample}: a message holds special-token text (such as <|im_end|>) but {problem}, so its place "
            "in the prompt is unknown and it cannot be kept as plain text; fix the template or the message"
        )
    return [match.span(g) for g in range(1, groups + 1) if match.end(g) > match.start(g)], len(held)


def encode_rendered(
    tokenizer: Any, prompt_text: str, messages: list[dict[str, str]] | None, template: str | None,
    completion: str, sample: object = None,
) -> tuple[np.ndarray, np.ndarray, int, int]:
    """``(ids, byte_offsets, prompt_len, messages holding special-token text)`` of a rendered prompt + completion.

    The one way stage one (`prepare`), stage two and eval tokenize a prompt: the contents holding special-token
    text (`special_text_spans`; none when ``messages`` is None, a prompt that is not re-rendered) as plain text,
    the rest with the template's markers special, BOS added only without a template.
    """
    spans, held = special_text_spans(tokenizer, prompt_text, messages, template, sample) if messages is not None \
        else ([], 0)
    ids, offs, plen = encode_prompt_completion(
        tokenizer, prompt_text, completion, prompt_special_tokens=False if template else None, sample=sample,
        plain_spans=spans,
    )
    return ids, offs, plen, held


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
    ids, offs, plen, in_prompt = encode_rendered(tokenizer, prompt_text, messages, template, completion or "",
                                                 rec.sample_id)
    notes: dict[str, int] = {}
    if in_prompt:
        notes["special_token_text_in_prompt"] = 1
    pattern = _special_pattern(tokenizer)
    if completion and pattern is not None and pattern.search(completion):
        notes["special_token_text_in_completion"] = 1
    if notes:
        warnings.warn(
            "some input text holds special-token text (such as <|im_end|>): it is tokenized as plain text, not as "
            "control tokens; counted as special_token_text_in_prompt / _in_completion in the manifest",
            stacklevel=2,
        )
    end = score_end_token(tokenizer, template) if mode == "score" and score_eos else None
    if end is not None:
        ids = np.append(ids, np.int32(end["id"]))
        offs = np.append(offs, np.int64(len((prompt_text + (completion or "")).encode("utf-8"))))
    return Prepared(rec, prompt_text, completion or "", ids, offs, plen, messages, notes)


def truncate(p: Prepared, max_tokens: int) -> Prepared:
    """Keep at most ``max_tokens`` tokens: the prompt intact, the completion cut at a token boundary.

    The cut is the last token boundary at or before ``max_tokens`` that also starts a character: a byte-level
    BPE token can start inside a multi-byte character (an emoji's last bytes), and a cut there would leave a
    completion that is not text. So the kept tokens are the longest run of whole tokens that spell whole
    characters (possibly none of the completion's, when its first character alone does not fit).
    """
    if len(p.token_ids) <= max_tokens:
        return p
    if max_tokens < p.prompt_len:
        raise ValueError(f"sample {p.record.sample_id}: {max_tokens} tokens cannot hold a {p.prompt_len}-token prompt")
    full = (p.prompt_text + p.completion_text).encode("utf-8")
    keep = max_tokens
    while keep > p.prompt_len:
        at = int(p.byte_offsets[keep])
        if at >= len(full) or (full[at] & 0xC0) != 0x80:  # not a UTF-8 continuation byte: a character starts here
            break
        keep -= 1
    start = len(p.prompt_text.encode("utf-8"))
    completion_b = full[start : max(int(p.byte_offsets[keep]), start)]
    return dataclasses.replace(
        p,
        completion_text=completion_b.decode("utf-8"),
        token_ids=p.token_ids[:keep],
        byte_offsets=p.byte_offsets[:keep],
    )
