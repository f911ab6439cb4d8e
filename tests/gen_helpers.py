"""Fixtures for stage-one tests: a tiny random teacher whose every token is valid UTF-8, and prompt files.

A byte-level BPE with the full 256-byte alphabet lets a random model sample half characters, which stage one
(correctly) cuts from completions; generate-mode tests want whole completions, so this teacher's tokenizer is
trained on ASCII text only and its vocabulary holds no partial characters.
"""

from __future__ import annotations

import json
from pathlib import Path

from logitcache.testing.tiny_models import CHAT_TEMPLATE, bpe_tokenizer, save_tiny_model

ASCII_CORPUS = [
    "The quick brown fox jumps over the lazy dog. Question: what is two plus two? Answer: four.",
    "A teacher writes its top-k log probabilities once; students learn from the cache many times.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 and punctuation , . ; : ! ? ( ) [ ] { } - + = / * % & # @ ' \" \n",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ",
] * 5


def ascii_teacher(folder: str | Path, seed: int = 0, chat_template: str | None = CHAT_TEMPLATE) -> Path:
    """A tiny random teacher saved in ``folder`` whose byte-level BPE (200 tokens) was trained on ASCII only."""
    tok = bpe_tokenizer(200, ASCII_CORPUS, chat_template or None, full_alphabet=False)
    return save_tiny_model(folder, seed=seed, tokenizer=tok)


def generate_args(teacher: str | Path, data: str | Path, *extra: object) -> list[str]:
    """``logitcache generate`` arguments for ``teacher`` on ``data``, then ``extra`` (each turned into a string)."""
    return ["generate", "--model", str(teacher), "--data", str(data), *map(str, extra)]


def write_prompts(path: str | Path, n: int, with_response: bool = True) -> Path:
    path = Path(path)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            row = {"prompt": f"Question {i}: what is {i} plus {i}?", "id": f"q{i}"}
            if with_response:
                row["response"] = f"It is {2 * i}. The answer is {2 * i}!"
            f.write(json.dumps(row) + "\n")
    return path
