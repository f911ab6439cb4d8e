"""Fixtures for stage-one tests: a tiny random teacher whose every token is valid UTF-8, and prompt files.

A byte-level BPE with the full 256-byte alphabet lets a random model sample half characters, which stage one
(correctly) cuts from completions; generate-mode tests want whole completions, so this teacher's tokenizer is
trained on ASCII text only and its vocabulary holds no partial characters.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from logitcache.testing.tiny_models import CHAT_TEMPLATE, tiny_llama

ASCII_CORPUS = [
    "The quick brown fox jumps over the lazy dog. Question: what is two plus two? Answer: four.",
    "A teacher writes its top-k log probabilities once; students learn from the cache many times.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 and punctuation , . ; : ! ? ( ) [ ] { } - + = / * % & # @ ' \" \n",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ",
] * 5


def ascii_teacher(folder: str | Path, seed: int = 0, chat_template: str | None = CHAT_TEMPLATE) -> Path:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False
    )
    tok.train_from_iterator(ASCII_CORPUS, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    if chat_template:
        wrapped.chat_template = chat_template
    model = tiny_llama(wrapped, seed=seed)
    folder = Path(folder)
    model.save_pretrained(folder)
    wrapped.save_pretrained(folder)
    return folder


def write_prompts(path: str | Path, n: int, with_response: bool = True) -> Path:
    path = Path(path)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            row = {"prompt": f"Question {i}: what is {i} plus {i}?", "id": f"q{i}"}
            if with_response:
                row["response"] = f"It is {2 * i}. The answer is {2 * i}!"
            f.write(json.dumps(row) + "\n")
    return path
