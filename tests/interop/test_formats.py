"""Sources built by hand in each format's published shape (not by our exporter), decoded as their readers do.

- DistillKit: ``decompress_monotonic_logprobs`` and ``unpack_from_bytes`` transcribed below in plain torch, bit
  per bit as published (arcee-ai/DistillKit ``distillkit/compression/monotonic_logprobs.py``, ``bitpack.py``);
  our vectorized decoder must give the identical floats and ids.
- OpenAI / vLLM: a chat completion with ``logprobs.content[]`` entries ``{"token", "logprob", "bytes",
  "top_logprobs"}`` (the OpenAI API reference's ``ChatCompletionTokenLogprob``; vLLM's OpenAI server returns the
  same), wrapped with its request as ``{"request": {"messages"}, "response": {...}}``; a character split over two
  byte tokens has ``\\ufffd`` token strings and its true bytes.
- top-k Parquet in axolotl's KD shape (``integrations/kd/chat_template.py``): ``logprobs`` rows of varying length.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from logitcache.config import ConfigError
from logitcache.interop.distillkit_codec import DistillKitConfig, compress_logprobs, decompress_logprobs, pack_bits
from logitcache.interop.import_stage import run_import
from logitcache.interop.interop_config import ImportConfig
from logitcache.storage import LogitCache, verify_cache
from logitcache.testing.tiny_tokenizers import byte_level_bpe
from logitcache.tokenization import token_bytes_info


def _unpack_from_bytes(b: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    pos = torch.arange(7, -1, -1)
    flat = ((b.unsqueeze(-1) >> pos) & 1).to(torch.uint8).view(*b.shape[:-1], -1)[..., : n * bits]
    flat = flat.contiguous().view(*b.shape[:-1], n, bits)
    return (flat * 2 ** torch.arange(bits - 1, -1, -1)).sum(-1).long()


def _reference_decompress(buf: np.ndarray, cfg: DistillKitConfig) -> np.ndarray:
    """DistillKit's decompress_monotonic_logprobs (out_dtype None), transcribed without shortcuts."""
    dt = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
    b = torch.from_numpy(buf.copy())
    out_dtype = dt[cfg.exact_dtype]
    nb = cfg.exact_k * torch.finfo(out_dtype).bits // 8
    exact = b[..., :nb].contiguous().view(out_dtype).reshape(b.shape[0], cfg.exact_k)
    rest = b[..., nb:]
    terms = len(cfg.polynomial_terms or [])
    tdt = dt[cfg.term_dtype]
    cb = terms * torch.finfo(tdt).bits // 8
    coeffs = rest[..., :cb].contiguous().view(tdt).reshape(b.shape[0], terms)
    rest = rest[..., cb:]
    res = []
    for q in cfg.residual_bins:
        sdt = dt[q.scale_dtype]
        sb = torch.finfo(sdt).bits // 8
        scale = rest[..., :sb].contiguous().view(sdt).reshape(b.shape[0], 1)
        rest = rest[..., sb:]
        pb = (q.num_elements * q.element_bits + 7) // 8
        el = _unpack_from_bytes(rest[..., :pb].contiguous(), q.element_bits, q.num_elements)
        rest = rest[..., pb:]
        res.append((el + -(2 ** (q.element_bits - 1))).to(torch.float32) * scale)
    approx = cfg.k - cfg.exact_k
    residual = torch.nn.functional.pad(torch.cat(res, -1), (0, approx - sum(q.num_elements for q in cfg.residual_bins)))
    pts = torch.arange(approx, dtype=tdt)
    x = torch.stack([pts**i if isinstance(i, int) else getattr(torch, i)(pts) for i in cfg.polynomial_terms], -1)
    fit = torch.sum(x.to(coeffs.dtype) * coeffs.unsqueeze(-2), dim=-1)
    values = torch.cat([exact.to(out_dtype), fit + residual.to(out_dtype)], dim=-1)
    return torch.cumsum(values.float(), dim=-1).to(out_dtype).float().numpy()


@pytest.mark.parametrize("exact_dtype,bits", [("float32", 4), ("float16", 5), ("bfloat16", 3)])
def test_our_distillkit_decoder_equals_the_published_one_bit_for_bit(exact_dtype, bits):
    cfg = DistillKitConfig.from_dict({
        "d": 151936, "k": 32, "exact_k": 3, "exact_dtype": exact_dtype, "polynomial_terms": [0, 1, 2, "sqrt"],
        "term_dtype": "float32", "delta_encoding": True,
        "residual_bins": [{"scale_dtype": "float16", "element_bits": bits, "num_elements": 20},
                          {"scale_dtype": "float32", "element_bits": 2, "num_elements": 8}],
    })
    rng = np.random.default_rng(1)
    lps = -np.sort(rng.exponential(2.0, (300, 32)).cumsum(axis=1), axis=1).astype(np.float32)
    buf = compress_logprobs(lps, cfg)
    np.testing.assert_array_equal(decompress_logprobs(buf, cfg), _reference_decompress(buf, cfg))
    ids = rng.integers(0, cfg.d, (300, 32))
    packed = pack_bits(ids, cfg.index_bits)
    np.testing.assert_array_equal(_unpack_from_bytes(torch.from_numpy(packed), cfg.index_bits, 32).numpy(), ids)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bl") / "tok"
    byte_level_bpe().save_pretrained(folder)
    return folder


def _entry(info, i: int, lp: float) -> dict:
    return {"token": info.pieces[i].decode("utf-8", "replace"), "logprob": lp, "bytes": list(info.pieces[i])}


def _completion_line(tok, text: str, k: int, short: bool = False) -> tuple[dict, list[int]]:
    info = token_bytes_info(tok)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    rng = np.random.default_rng(len(text))
    content = []
    for j, t in enumerate(ids):
        alts = [t, *rng.choice([i for i in range(10, 300) if i != t], k - 1, replace=False).tolist()]
        lps = np.sort(np.log(rng.dirichlet(np.ones(k))))[::-1]
        kk = k - 2 if short and j == 0 else k  # a row with fewer alternatives than K
        content.append({**_entry(info, t, float(lps[0])),
                        "top_logprobs": [_entry(info, a, float(v)) for a, v in zip(alts[:kk], lps[:kk])]})
    response = {"id": "chatcmpl-1", "object": "chat.completion", "model": "teacher", "choices": [{
        "index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop",
        "logprobs": {"content": content}}]}
    return {"request": {"messages": [{"role": "user", "content": "Say something."}]}, "response": response}, ids


def test_openai_completions_with_split_characters_map_through_their_bytes(teacher, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(teacher)
    texts = ["Café ☕ ok.", "naïve façade — 猫"]
    lines, all_ids = [], []
    for i, t in enumerate(texts):
        line, ids = _completion_line(tok, t, 5, short=i == 0)
        lines.append(json.dumps(line))
        all_ids.append(ids)
    info = token_bytes_info(tok)
    assert any(b"\xe2" in info.pieces[i] and len(info.pieces[i]) < 3 for i in all_ids[0] + all_ids[1]) or any(
        "\ufffd" in info.pieces[i].decode("utf-8", "replace") for i in all_ids[0] + all_ids[1]
    )  # precondition: some token holds part of a character
    src = tmp_path / "c.jsonl"
    src.write_text("\n".join(lines) + "\n")
    run_import(ImportConfig(src=str(src), format="openai-logprobs", teacher_tokenizer=str(teacher),
                            out=str(tmp_path / "c"), logprob_codec="fp32"))
    assert verify_cache(str(tmp_path / "c")) == []
    recs = list(LogitCache.open(tmp_path / "c").iter_sequences())
    assert [r.completion_text for r in recs] == texts
    for r, ids in zip(recs, all_ids):
        np.testing.assert_array_equal(r.rows.target_ids, ids)
        assert r.prompt_text.endswith("<|im_start|>assistant\n") and r.messages[0]["content"] == "Say something."
    assert np.isneginf(recs[0].rows.topk_logprobs[0, -2:]).all()  # the short row, padded


def test_openai_token_unknown_to_the_tokenizer_names_the_sequence(teacher, tmp_path):
    from transformers import AutoTokenizer

    line, _ = _completion_line(AutoTokenizer.from_pretrained(teacher), "Hello there.", 3)
    line["response"]["choices"][0]["logprobs"]["content"][1]["top_logprobs"][2] = {
        "token": "\u2603\u2603", "logprob": -9.0, "bytes": list("\u2603\u2603".encode())}
    (tmp_path / "c.jsonl").write_text(json.dumps(line) + "\n")
    with pytest.raises(ConfigError, match=r"^sequence 0 \(line 1\): top_logprobs token '☃☃' is no single token"):
        run_import(ImportConfig(src=str(tmp_path / "c.jsonl"), format="openai-logprobs",
                                teacher_tokenizer=str(teacher), out=str(tmp_path / "c")))


def test_topk_parquet_rows_of_varying_length_and_custom_field_names(teacher, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(teacher)
    text = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello world."
    ids = tok(text)["input_ids"]  # with the BOS the post-processor adds
    n = len(ids)
    rows_ids = [[ids[p + 1], 5, 6][: 3 - (p % 2)] for p in range(n - 1)]
    rows_lps = [[-0.1, -3.0, -4.0][: 3 - (p % 2)] for p in range(n - 1)]
    pq.write_table(pa.table({"toks": [ids], "ids_k": [rows_ids], "lp_k": [rows_lps], "text": [text]}),
                   tmp_path / "part.parquet")
    run_import(ImportConfig(src=str(tmp_path / "part.parquet"), format="topk-parquet", teacher_tokenizer=str(teacher),
                            out=str(tmp_path / "c"), ids_field="toks", topk_ids_field="ids_k",
                            topk_logprobs_field="lp_k",
                            completion_start=r"text:<|im_start|>assistant\n", logprob_codec="fp32"))
    (r,) = list(LogitCache.open(tmp_path / "c").iter_sequences())
    assert r.prompt_text + r.completion_text == text and r.completion_text == "Hello world."
    assert r.token_byte_offsets[0] == 0 and r.token_byte_offsets[1] == 0  # the BOS writes no text
    np.testing.assert_array_equal(r.rows.target_ids, ids[r.prompt_len:])
    np.testing.assert_array_equal(r.rows.target_logprobs, np.float32(-0.1))  # the target is each row's first
    assert np.isneginf(r.rows.topk_logprobs[:, 2][(np.arange(r.rows.n) + r.prompt_len - 1) % 2 == 1]).all()


def test_a_capture_cut_inside_a_character_drops_the_partial_character(teacher, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(teacher)
    ids = tok("<|im_start|>assistant\nTea \u2615")["input_ids"]
    info = token_bytes_info(tok)
    assert len(info.pieces[ids[-1]]) < 3  # precondition: the cup is split over several byte tokens
    ids = ids[:-1]  # a max-length cut inside the character
    n = len(ids)
    rows_ids = [[ids[p + 1], 7] for p in range(n - 1)]
    rows_lps = [[-0.5, -1.5]] * (n - 1)
    pq.write_table(pa.table({"input_ids": [ids], "target_token_ids": [rows_ids], "logprobs": [rows_lps]}),
                   tmp_path / "p.parquet")
    run_import(ImportConfig(src=str(tmp_path / "p.parquet"), format="topk-parquet", teacher_tokenizer=str(teacher),
                            out=str(tmp_path / "c"), completion_start=r"text:assistant\n"))
    (r,) = list(LogitCache.open(tmp_path / "c").iter_sequences())
    assert r.completion_text in ("Tea", "Tea ") and r.rows.n == len(r.token_ids) - r.prompt_len
    assert LogitCache.open(tmp_path / "c").manifest["counters"]["cut_incomplete_utf8"] == 1
    assert verify_cache(str(tmp_path / "c")) == []


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 2**31 - 1), st.booleans(), st.booleans(), st.booleans(), st.booleans())
def test_offsets_fast_path_equals_byte_offsets_for_ids(teacher, seed, bos, eos, bos_in_text, eos_in_text):
    """`Rebuilder.offsets_for_text` (the ids' bytes spell the text: offsets are a running sum) gives what the per-token
    `byte_offsets_for_ids` gives, on random sequences with a BOS, chat specials, an EOS, each in the text or not."""
    from transformers import AutoTokenizer

    from logitcache.interop.rebuild import ImportMismatchError, RawSequence, Rebuilder
    from logitcache.tokenization import TokenizationMismatchError, byte_offsets_for_ids

    tok = AutoTokenizer.from_pretrained(teacher)
    rb = Rebuilder(tok, "token:1", len(tok))
    info = rb.info
    rng = np.random.default_rng(seed)
    regular = [i for i in range(info.size) if not info.special[i] and info.lengths[i] and info.pieces[i].isascii()]
    body = [int(rng.choice([2, 3])) if rng.random() < 0.1 else int(rng.choice(regular))
            for _ in range(rng.integers(0, 40))]
    ids = ([0] if bos else []) + body + ([1] if eos else [])
    parts = [info.pieces[i] for i in body]
    text = ((b"<|bos|>" if bos and bos_in_text else b"") + b"".join(parts)
            + (b"<|eos|>" if eos and eos_in_text else b"")).decode()
    arr = np.asarray(ids, np.int64)
    raw = RawSequence(index=0, source_id="s", token_ids=arr, row_offset=1, topk_ids=np.zeros((0, 1)),
                      topk_logprobs=np.zeros((0, 1)))
    try:
        want = byte_offsets_for_ids(tok, arr, text, sample=0)
    except TokenizationMismatchError:
        with pytest.raises(ImportMismatchError):
            rb.offsets_for_text(raw, arr, rb.widths(raw, arr, 0), text)
        return
    got = rb.offsets_for_text(raw, arr, rb.widths(raw, arr, 0), text)
    np.testing.assert_array_equal(got, want)
    assert got.dtype == want.dtype or not len(ids)
