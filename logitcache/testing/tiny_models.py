"""Tiny random models and tokenizers trained on the fly, for tests that must not download anything.

- :func:`bpe_tokenizer`: a byte-level BPE (GPT-2/SmolLM style, ``Ġ`` for spaces; every byte is in the base
  alphabet so any text round-trips) with ChatML special tokens and a simple chat template. The teacher's.
- :func:`unigram_tokenizer`: a SentencePiece-style Unigram (``▁`` for spaces, byte fallback ``<0xNN>`` pieces,
  no chat template by default), so a student tokenizes the same text differently from the teacher.
- :func:`tiny_llama`: a 2-layer ``LlamaForCausalLM`` with random weights sized to a tokenizer, optionally with
  an output vocabulary padded beyond ``len(tokenizer)`` (as real models often are).
- :func:`save_tiny_model`: both saved into a folder that ``from_pretrained`` (and ``logitcache.models``) load.

Everything is deterministic for a given seed and takes milliseconds.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from logitcache.testing.tiny_tokenizers import train_byte_level_bpe

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A teacher model writes its top-k log probabilities once; students learn from the cache many times.",
    "Distillation transfers knowledge from a large model into a small one.",
    "The cat sat on the mat, and the dog sat on the log.",
    "Numbers like 12345 and 3.14159 appear in text, as do dates such as 2024-06-01.",
    "Café, naïve, résumé: accented words are common in English text too.",
    "日本語のテキストも少し含めます。中文也可以。",
    "Emoji 🙂🚀 and symbols → ∑ √ π make byte-level tokenizers split characters.",
    "def add(a, b):\n    return a + b\n",
    "Question: what is two plus two? Answer: four.",
    "user: hello there! assistant: hi, how can I help you today?",
    "In the beginning the universe was created. This has made a lot of people very angry.",
] * 4


def _wrap(tok: Tokenizer, chat_template: str | None, **special: str) -> PreTrainedTokenizerFast:
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, **special)
    if chat_template is not None:
        wrapped.chat_template = chat_template
    return wrapped


def bpe_tokenizer(vocab_size: int = 320, corpus: list[str] | None = None,
                  chat_template: str | None = CHAT_TEMPLATE, full_alphabet: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on ``corpus``; eos ``<|im_end|>``, pad ``<|endoftext|>``, no BOS.

    ``full_alphabet=False``: only the corpus's bytes are tokens (see `train_byte_level_bpe`).
    """
    tok = train_byte_level_bpe(corpus or CORPUS, vocab_size, SPECIAL_TOKENS, full_alphabet)
    return _wrap(tok, chat_template, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def unigram_tokenizer(vocab_size: int = 200, corpus: list[str] | None = None,
                      chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """A SentencePiece-style Unigram with ``▁`` spaces and ``<0xNN>`` byte fallback; bos ``<s>``, eos ``</s>``."""
    specials = ["<unk>", "<s>", "</s>"]
    base = Tokenizer(models.Unigram())
    base.normalizer = normalizers.Replace(" ", "▁")
    base.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>", show_progress=False
    )
    base.train_from_iterator(corpus or CORPUS, trainer=trainer)
    vocab: list[tuple[str, float]] = [(p, s) for p, s in _unigram_pieces(base)]
    seen = {p for p, _ in vocab}
    floor = min(s for _, s in vocab) - 10.0
    vocab += [(f"<0x{b:02X}>", floor) for b in range(256) if f"<0x{b:02X}>" not in seen]
    tok = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return _wrap(tok, chat_template, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>")


def _unigram_pieces(tok: Tokenizer) -> list[tuple[str, float]]:
    import json

    return [(p, float(s)) for p, s in json.loads(tok.to_str())["model"]["vocab"]]


def tiny_llama(tokenizer: PreTrainedTokenizerFast | None = None, vocab_size: int | None = None,
               extra_vocab: int = 0, seed: int = 0, hidden_size: int = 32, num_layers: int = 2,
               dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """A random 2-layer Llama whose logits have ``len(tokenizer) + extra_vocab`` (or ``vocab_size``) entries."""
    if vocab_size is None:
        if tokenizer is None:
            raise ValueError("tiny_llama needs a tokenizer or a vocab_size")
        vocab_size = len(tokenizer) + extra_vocab
    eos = tokenizer.eos_token_id if tokenizer is not None else None
    pad = tokenizer.pad_token_id if tokenizer is not None else None
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        eos_token_id=eos,
        pad_token_id=pad,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # sharper than the default init, so distributions are not near-uniform
        model.lm_head.weight.mul_(40.0)
    if tokenizer is not None:
        model.generation_config.eos_token_id = eos
        model.generation_config.pad_token_id = pad
    return model.to(dtype).eval()


def save_tiny_model(folder: str | Path, seed: int = 0, extra_vocab: int = 0, hidden_size: int = 32,
                    tokenizer: PreTrainedTokenizerFast | None = None) -> Path:
    """Save a tiny Llama and its tokenizer (default: `bpe_tokenizer`) into ``folder`` (a Hugging Face model folder)."""
    folder = Path(folder)
    tok = tokenizer if tokenizer is not None else bpe_tokenizer()
    model = tiny_llama(tok, extra_vocab=extra_vocab, seed=seed, hidden_size=hidden_size)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row permutation (``convert_hf_to_gguf.LlamaModel.permute``); transformers undoes it."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: str | Path, model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast) -> Path:
    """Write ``model`` (a Llama) and its byte-level BPE ``tokenizer`` as an F32 llama.cpp GGUF file.

    Loading it back with ``from_pretrained(folder, gguf_file=...)`` gives the same logits and tokens, so the
    GGUF conversion path can be tested in milliseconds instead of on a 100 MB packaged model.
    """
    import json

    import gguf

    path = Path(path)
    cfg = model.config
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    tokens = [""] * len(tokenizer)
    for piece, idx in vocab.items():
        tokens[idx] = piece
    types = [gguf.TokenType.NORMAL] * len(tokens)
    for added in spec["added_tokens"]:
        tokens[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]

    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)

    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
                 "post_attention_layernorm": "ffn_norm"}
    for i in range(cfg.num_hidden_layers):
        for hf, gg in per_layer.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
    for hf_name, tensor in sd.items():
        if hf_name.endswith(".q_proj.weight"):
            tensor = _llama_cpp_permute(tensor, cfg.num_attention_heads)
        elif hf_name.endswith(".k_proj.weight"):
            tensor = _llama_cpp_permute(tensor, cfg.num_key_value_heads)
        writer.add_tensor(names[hf_name], tensor.numpy().astype("float32"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
