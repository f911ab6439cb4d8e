"""Evaluate a (student) model on labelled data (``logitcache eval``): generation quality, perplexity, agreement.

For every input record (a ``prompt`` or chat ``messages`` plus a reference ``response``) the model answers
greedily (temperature 0, at most ``--max-new-tokens``, stopping at EOS) from the prompt rendered exactly as stage
one renders it (``logitcache.prompts``: the model's chat template with a generation prompt, or the raw prompt when
there is none). The answer is scored against the reference with:

- ``rougeL`` / ``rougeLsum``: F-measure from the ``rouge-score`` package (stemmed). ``rougeLsum`` wants one
  sentence per line; sentences are split with a small regex (``. ! ?`` then whitespace) instead of nltk's punkt,
  whose data would need a download. rouge-score's tokenizer keeps only ``[a-z0-9]``, so non-Latin text scores 0:
  use token F1 (which keeps every character) for such data.
- ``token_f1`` / ``exact_match``: SQuAD-style (lowercase, drop punctuation and the articles a/an/the, split on
  whitespace; F1 of the bag-of-tokens overlap), the usual extractive-QA metrics.
- ``perplexity``: of the reference (plus the token that ends the model's turn) under the model, teacher-forced
  after the rendered prompt, tokenized as stage one does (``prompts.encode_rendered``: the reference starts at a
  token boundary). The end token is the one stage one's ``--score-eos`` appends (`prompts.score_end_token`): what
  the chat template closes an assistant turn with (``<|im_end|>``), else the tokenizer's EOS.
  Per sample ``exp(mean NLL)``; the aggregate is corpus-level, ``exp`` of the token-weighted mean NLL (``nll``),
  so long references weigh more, which is the usual convention and is not the mean of per-sample perplexities.
- with ``--cache``: ``teacher_rougeL``, ROUGE-L F of the answer against the teacher's cached completion. Cache
  records are matched by source id (the ``--id-field`` value, else the record index), falling back to the
  sample id (record index) when no source id matches; a matched pair must hold the same conversation, else the
  cache belongs to other data and evaluation stops. Cached samples stage one skipped (overlong) are simply not
  scored; ``teacher_samples`` counts the matched ones.

Trade-offs: ``model.generate`` on left-padded batches sorted by prompt length is simple and fast enough for
evaluation sets (vLLM would be faster but is a second code path to keep identical). Perplexity batches are
left-padded too, with explicit position ids, and ask the model only for the logits of the last positions
(``logits_to_keep``) so a 262k vocabulary never materializes ``[batch, length, vocab]`` for the prompt part.
"""

from __future__ import annotations

import json
import math
import os
import re
import string
import time
from collections import Counter
from typing import Any

import numpy as np
from tqdm import tqdm

from logitcache.config import ConfigError
from logitcache.inputs import InputError, InputRecord, read_inputs
from logitcache.prompts import encode_rendered, input_messages, render_messages, resolve_chat_template, score_end_token

from .eval_config import EvalConfig

# -- text metrics ------------------------------------------------------------------------------------------------
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_SCORER: Any = None


def normalize_answer(text: str) -> str:
    """SQuAD normalization: lowercase, drop punctuation, drop articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1: harmonic mean of precision and recall of the normalized bag of tokens."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def sentences_per_line(text: str) -> str:
    """One sentence per line (what ``rougeLsum`` expects): split after ``. ! ?`` followed by whitespace."""
    return "\n".join(s for s in _SENTENCE_END.split(text.strip()) if s)


def rouge(prediction: str, reference: str) -> dict[str, float]:
    """``{"rougeL", "rougeLsum"}`` F-measures of ``prediction`` against ``reference`` (stemmed)."""
    global _SCORER
    if _SCORER is None:
        try:
            from rouge_score import rouge_scorer
        except ImportError as e:
            raise ConfigError("eval needs the rouge-score package: pip install rouge-score") from e
        _SCORER = rouge_scorer.RougeScorer(["rougeL", "rougeLsum"], use_stemmer=True)
    s = _SCORER.score(sentences_per_line(reference), sentences_per_line(prediction))
    return {"rougeL": s["rougeL"].fmeasure, "rougeLsum": s["rougeLsum"].fmeasure}


# -- model side --------------------------------------------------------------------------------------------------
def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    from logitcache.models import end_token_ids

    return end_token_ids(tokenizer, model)


def _left_pad(seqs: list[np.ndarray], pad: int, device: Any) -> tuple[Any, Any]:
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, width - len(s) :] = torch.from_numpy(np.asarray(s, dtype=np.int64))
        mask[row, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


def greedy_answers(
    model: Any, tokenizer: Any, prompts: list[np.ndarray], max_new_tokens: int, pad_id: int, eos: list[int]
) -> list[tuple[str, str]]:
    """``(answer text, finish reason "stop"|"length")`` per prompt: greedy, left-padded, cut at the first EOS."""
    import torch
    from transformers import GenerationConfig

    ids, mask = _left_pad(prompts, pad_id, model.device)
    gen_cfg = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id, eos_token_id=eos or None
    )
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg)
    answers = []
    for row in out[:, ids.shape[1] :].tolist():
        stop = next((k for k, t in enumerate(row) if t in eos), None)
        new = row if stop is None else row[:stop]
        answers.append((tokenizer.decode(new, skip_special_tokens=True).strip(), "length" if stop is None else "stop"))
    return answers


def reference_nll(model: Any, seqs: list[np.ndarray], prompt_lens: list[int], pad_id: int) -> list[tuple[float, int]]:
    """``(summed NLL, tokens)`` of each sequence's completion ``seq[P:]`` given ``seq[:P]`` (teacher-forced)."""
    import torch

    ids, mask = _left_pad(seqs, pad_id, model.device)
    counts = [len(s) - p for s, p in zip(seqs, prompt_lens)]
    keep = max(counts) + 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep).logits
    out = []
    for row, c in enumerate(counts):
        if c == 0:
            out.append((0.0, 0))
            continue
        # the last `keep` positions; those predicting the c completion tokens are the c before the final one
        lp = torch.log_softmax(logits[row, keep - 1 - c : keep - 1].float(), dim=-1)
        target = ids[row, ids.shape[1] - c :]
        out.append((float(-lp.gather(-1, target[:, None]).sum()), c))
    return out


# -- teacher cache -----------------------------------------------------------------------------------------------
def _dialogue(messages: list[dict[str, str]] | None) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in messages or [] if m["role"] != "system"]


def teacher_completions(cache_url: str, records: list[InputRecord]) -> dict[int, str]:
    """``sample_id -> cached completion_text`` for the records the cache holds; ConfigError on mismatched data."""
    from logitcache.storage import LogitCache
    from logitcache.storage.errors import CacheError

    try:
        cache = LogitCache.open(cache_url)
        rows: list[dict[str, Any]] = []
        for s in cache.shards:
            rows += (
                cache.sequence_table(s.index)
                .select(["sample_id", "source_id", "completion_text", "messages"])
                .to_pylist()
            )
    except CacheError as e:
        raise ConfigError(f"--cache {cache_url}: {e}") from e
    by_source = {str(r["source_id"]): r for r in rows}
    if len(by_source) == len(rows) and any(rec.source_id in by_source for rec in records):
        key, table = "source id", {rec.sample_id: by_source.get(rec.source_id) for rec in records}
    else:
        by_sample = {int(r["sample_id"]): r for r in rows}
        key, table = "sample id", {rec.sample_id: by_sample.get(rec.sample_id) for rec in records}
    found = {sid: r for sid, r in table.items() if r is not None}
    if not found:
        raise ConfigError(
            f"--cache {cache_url}: none of its {len(rows)} samples matches a --data record by source id or sample "
            "id; was it made from this data (same --id-field)?"
        )
    for rec in records:
        r = found.get(rec.sample_id)
        same = (
            r is None or r["messages"] is None or _dialogue(json.loads(r["messages"])) == _dialogue(input_messages(rec))
        )
        if not same:
            raise ConfigError(
                f"--cache {cache_url}: {key} {rec.source_id if key == 'source id' else rec.sample_id} holds "
                f"another prompt than --data record {rec.sample_id}; the cache was made from other data"
            )
    return {sid: r["completion_text"] for sid, r in found.items()}


# -- the run -----------------------------------------------------------------------------------------------------
def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _write_json(path: str, report: dict[str, Any]) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate ``cfg.model`` on ``cfg.data``; returns (and with ``--out`` writes) the report dict."""
    import torch

    from logitcache.models import (
        ModelSpecError,
        default_device,
        load_model,
        load_tokenizer,
        model_context,
        pad_token_id,
    )

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    try:
        records = read_inputs(cfg.data, cfg.fields(), "score", cfg.limit)
    except InputError as e:
        raise InputError(str(e).replace(", required in --mode score", " (the reference answer)")) from e
    teacher = teacher_completions(cfg.cache, records) if cfg.cache else None
    device = cfg.device or default_device()
    try:
        tokenizer = load_tokenizer(cfg.model)
        # dtype auto: models.resolve_dtype; attention auto: sdpa, else eager
        model = load_model(cfg.model, dtype=cfg.dtype, device=device, attn_implementation=cfg.attn_implementation)
    except ModelSpecError as e:
        raise ConfigError(f"--model {cfg.model}: {e}") from e
    torch.manual_seed(cfg.seed)
    template = resolve_chat_template(tokenizer, cfg.chat_template)
    eos = _eos_ids(model, tokenizer)
    pad_id = pad_token_id(tokenizer, eos)
    context = model_context(model.config)
    end = score_end_token(tokenizer, template)  # what ends the model's turn, as stage one's --score-eos appends

    prepared = []
    for rec in records:
        messages = input_messages(rec, cfg.system_prompt if template is not None else None)
        prompt = render_messages(tokenizer, messages, template, rec.sample_id)
        ids, _, plen, _ = encode_rendered(tokenizer, prompt, messages, template, rec.response or "", rec.sample_id)
        if end is not None:
            ids = np.append(ids, np.int32(end["id"]))
        if plen + 1 >= context:
            raise ConfigError(
                f"--data {cfg.data}: record {rec.sample_id}'s prompt ({plen} tokens) fills the "
                f"model's context ({context}); shorten it or drop it (--limit)"
            )
        prepared.append((rec, ids[:context], plen))

    order = sorted(range(len(prepared)), key=lambda i: (prepared[i][2], i))
    per_sample: list[dict[str, Any] | None] = [None] * len(prepared)
    bar = tqdm(total=len(prepared), desc="eval", unit="sample", dynamic_ncols=True)
    try:
        for lo in range(0, len(order), cfg.batch_size):
            idx = order[lo : lo + cfg.batch_size]
            batch = [prepared[i] for i in idx]
            new = min(cfg.max_new_tokens, context - max(p for _, _, p in batch))
            answers = greedy_answers(model, tokenizer, [ids[:p] for _, ids, p in batch], new, pad_id, eos)
            nlls = reference_nll(model, [ids for _, ids, _ in batch], [p for _, _, p in batch], pad_id)
            for i, (rec, _, _), (answer, finish), (nll, n) in zip(idx, batch, answers, nlls):
                ref = rec.response or ""
                row: dict[str, Any] = {
                    "sample_id": rec.sample_id,
                    "source_id": rec.source_id,
                    "prediction": answer,
                    "reference": ref,
                    "finish_reason": finish,
                    **rouge(answer, ref),
                    "token_f1": token_f1(answer, ref),
                    "exact_match": exact_match(answer, ref),
                    "reference_tokens": n,
                    "nll": nll / n if n else None,
                    "perplexity": math.exp(nll / n) if n else None,
                }
                if teacher is not None:
                    cached = teacher.get(rec.sample_id)
                    row["teacher"] = cached
                    row["teacher_rougeL"] = rouge(answer, cached)["rougeL"] if cached is not None else None
                per_sample[i] = row
            bar.update(len(batch))
    finally:
        bar.close()

    rows = [r for r in per_sample if r is not None]
    tokens = sum(r["reference_tokens"] for r in rows)
    nll_mean = sum(r["nll"] * r["reference_tokens"] for r in rows if r["nll"] is not None) / tokens if tokens else None
    metrics: dict[str, Any] = {k: _mean([r[k] for r in rows]) for k in ("rougeL", "rougeLsum", "token_f1")}
    metrics["exact_match"] = _mean([r["exact_match"] for r in rows])
    metrics["nll"] = nll_mean
    metrics["perplexity"] = math.exp(nll_mean) if nll_mean is not None else None
    metrics["stopped"] = _mean([float(r["finish_reason"] == "stop") for r in rows])
    if teacher is not None:
        metrics["teacher_rougeL"] = _mean([r["teacher_rougeL"] for r in rows if r["teacher_rougeL"] is not None])
        metrics["teacher_samples"] = len(teacher)
    report = {
        "model": cfg.model,
        "data": cfg.data,
        "cache": cfg.cache,
        "samples": len(rows),
        "reference_tokens": tokens,
        "seconds": round(time.perf_counter() - t0, 3),
        "metrics": metrics,
        "per_sample": rows,
    }
    if cfg.out:
        _write_json(cfg.out, report)
    return report


def format_table(report: dict[str, Any]) -> str:
    """The human summary ``logitcache eval`` prints: one line per aggregate metric."""
    m = report["metrics"]
    labels = [
        ("rougeL", "ROUGE-L F (vs reference)"),
        ("rougeLsum", "ROUGE-Lsum F (vs reference)"),
        ("token_f1", "token F1 (SQuAD)"),
        ("exact_match", "exact match"),
        ("perplexity", "reference perplexity"),
        ("nll", "reference NLL / token"),
        ("stopped", "answers ending in EOS"),
        ("teacher_rougeL", "ROUGE-L F vs teacher"),
    ]
    lines = [
        f"model    {report['model']}",
        f"data     {report['data']}  ({report['samples']} samples, {report['reference_tokens']} reference tokens)",
    ]
    if report.get("cache"):
        lines.append(f"cache    {report['cache']}  ({m.get('teacher_samples', 0)} samples matched)")
    lines += ["", f"{'metric':<30}{'value':>12}"]
    for key, label in labels:
        if key in m:
            v = m[key]
            text = "-" if v is None else f"{v:.4f}" if abs(v) < 1e4 else f"{v:.4g}"
            lines.append(f"{label:<30}{text:>12}")
    return "\n".join(lines)
