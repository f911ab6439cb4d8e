"""Stage one: run the teacher over the inputs and fill a cache (``logitcache generate``).

The work unit is a cache shard of ``--shard-size`` consecutive samples (a pure function of the input order), so:

- a rerun skips complete shards (the writer's completion markers) and redoes the rest;
- a Slurm/Kubernetes job array splits shards with ``--num-shards N --shard-index i`` (task i writes the shards
  ``s % N == i``); ``logitcache finalize CACHE`` (idempotent) writes the manifest once all exist, and every task
  tries it too;
- ``--workers N`` starts a local ``dask.distributed`` cluster of N processes, ``--scheduler ADDRESS`` uses an
  existing one; each worker process loads one engine and keeps it for all the shards it is given.

A sample whose record cannot be built (its text does not tokenize, its template raises, ...) is skipped, counted
and named in the manifest (``--on-sample-error skip``, the default) or stops the run naming it (``fail``).

Results do not depend on who ran a shard: the sampling seed of a batch is derived from (``--seed``, shard,
batch), and batches are formed the same way everywhere (samples of a shard sorted by length, then cut into
``--batch-size`` groups).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from typing import Any

from logitcache.config import ConfigError, check
from logitcache.inputs import input_fingerprint, read_inputs, shard_ranges, shards_for_task
from logitcache.prompts import Prepared, prepare, resolve_chat_template, score_end_token, truncate
from logitcache.storage import CacheHeader, CacheWriter, SequenceRecord

from .generate_config import GenerateConfig
from .outputs import generated_record, scored_record
from .shard_runner import ClusterOptions, Progress, progress_bar, run_shards

# -- one shard ------------------------------------------------------------------------------------------------
_ENGINE: dict[str, Any] = {}  # per process: the loaded engine (one per worker), keyed by its config
_INPUTS: dict[str, Any] = {}  # per process: the parsed inputs, keyed by (path, fields, mode, limit)


def _inputs(cfg: GenerateConfig) -> list[Any]:
    key = json.dumps([cfg.data, dataclasses.asdict(cfg.fields()), cfg.mode, cfg.limit])
    if key not in _INPUTS:
        _INPUTS.clear()
        _INPUTS[key] = read_inputs(cfg.data, cfg.fields(), cfg.mode, cfg.limit)
    return _INPUTS[key]


def _engine(cfg: GenerateConfig, tokenizer: Any) -> Any:
    from .engines import ENGINES

    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)

    key = json.dumps(cfg.identity(), sort_keys=True) + str(cfg.device)
    if key not in _ENGINE:
        _ENGINE.clear()
        _ENGINE[key] = ENGINES[cfg.backend](cfg, tokenizer)
    return _ENGINE[key]


def _batch_seed(seed: int, shard: int, batch: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{shard}/{batch}".encode()).digest()[:4], "little")


class SampleError(ConfigError):
    """One sample's record could not be built and ``--on-sample-error fail`` was chosen; names the sample.

    Bad input (a text the teacher's tokenizer cannot reproduce, a template that raises on it), so a `ConfigError`:
    the CLI prints its one line (sample, reason, the ``skip`` policy) without a traceback; the cause stays chained.
    """


MAX_NAMED_SKIPS = 20  # per shard: skipped samples named (id and reason) in the shard marker and the manifest


def _skip(cfg: GenerateConfig, sample: object, error: Exception, counters: dict[str, int],
          skipped: list[dict[str, Any]]) -> None:
    """Apply ``--on-sample-error`` to a sample whose record failed: count and name it, or raise naming it."""
    if isinstance(error, ConfigError):  # a user mistake that every sample shares: never skipped
        raise error
    reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    if cfg.on_sample_error == "fail":
        raise SampleError(
            f"sample {sample}: its record cannot be built ({reason}); pass --on-sample-error skip to skip such "
            "samples (counted and named in the manifest)"
        ) from error
    counters["skipped_error"] = counters.get("skipped_error", 0) + 1
    if len(skipped) < MAX_NAMED_SKIPS:
        skipped.append({"sample_id": sample, "reason": reason[:300]})


def process_shard(cfg: GenerateConfig, shard: int, tokenizer: Any, progress: Any = None) -> dict[str, Any]:
    """Run the teacher over one shard's samples and write the shard. Returns its marker plus timing.

    ``tokens`` in the result (and the second argument of ``progress``) counts *cached positions* (rows written):
    completion tokens plus the end row, in both modes, so throughput reads the same in score and generate mode.
    """
    from logitcache.models import end_token_ids, load_tokenizer, resolve_model

    tokenizer = tokenizer or load_tokenizer(cfg.model)
    records = _inputs(cfg)
    start, stop = shard_ranges(len(records), cfg.shard_size)[shard]
    engine = _engine(cfg, tokenizer)
    max_len = min(cfg.max_length or engine.max_length, engine.max_length)
    template = resolve_chat_template(tokenizer, cfg.chat_template)
    counters: dict[str, int] = {}
    skipped: list[dict[str, Any]] = []
    prepared: list[Prepared] = []
    for rec in records[start:stop]:
        try:  # preparing and truncating one sample: one bad sample must not kill the run (--on-sample-error)
            p = prepare(tokenizer, rec, template, cfg.mode, cfg.score_eos, cfg.system_prompt)
            budget = len(p.token_ids) if cfg.mode == "score" else p.prompt_len + 1
            overlong = budget > max_len or p.prompt_len >= max_len
            if overlong and cfg.overlong == "truncate" and p.prompt_len < max_len:
                p = truncate(p, max_len)
        except Exception as e:
            _skip(cfg, rec.sample_id, e, counters, skipped)
            continue
        for key, n in p.notes.items():
            counters[key] = counters.get(key, 0) + n
        if overlong:
            if cfg.overlong == "skip" or p.prompt_len >= max_len:
                counters["skipped_overlong"] = counters.get("skipped_overlong", 0) + 1
                continue
            counters["truncated_overlong"] = counters.get("truncated_overlong", 0) + 1
        prepared.append(p)
    order = sorted(range(len(prepared)), key=lambda i: (len(prepared[i].token_ids), i))
    out: dict[int, SequenceRecord] = {}
    eos_ids = set(end_token_ids(tokenizer, resolve_model(cfg.model)))  # what both engines stop on
    t0, tokens = time.perf_counter(), 0
    for b, lo in enumerate(range(0, len(order), cfg.batch_size)):
        batch = [prepared[i] for i in order[lo : lo + cfg.batch_size]]
        if cfg.mode == "score":
            seed = _batch_seed(cfg.seed, shard, b)  # the tail draws' (--tail-samples)
            results: list[Any] = engine.score([p.token_ids for p in batch], [p.prompt_len for p in batch], seed)
        else:
            prompts = [p.token_ids[: p.prompt_len] for p in batch]
            results = engine.generate(prompts, _batch_seed(cfg.seed, shard, b))
        for p, result in zip(batch, results, strict=True):
            try:
                if cfg.mode == "score":
                    record = scored_record(p, result)
                else:
                    ids, reason, rows = result
                    room = max_len - p.prompt_len
                    if len(ids) > room:  # the context ends before max_new_tokens
                        ids, rows, reason = ids[:room], rows.slice(0, room), "length"
                        counters["truncated_context"] = counters.get("truncated_context", 0) + 1
                    record = generated_record(tokenizer, p, ids, reason, rows, eos_ids, counters)
            except Exception as e:  # see --on-sample-error
                _skip(cfg, p.record.sample_id, e, counters, skipped)
                continue
            out[p.record.sample_id] = record
            tokens += record.rows.n
        if progress is not None:
            progress(len(batch), tokens)
    writer = CacheWriter.resume(cfg.out)
    marker = writer.write_shard(shard, [out[k] for k in sorted(out)], counters, skipped=skipped)
    return {**marker, "seconds": time.perf_counter() - t0, "tokens": tokens}


# -- the whole run ---------------------------------------------------------------------------------------------
def build_header(cfg: GenerateConfig, tokenizer: Any, vocab_size: int) -> CacheHeader:
    from logitcache.models import model_identity

    check(
        not cfg.tail_samples or cfg.top_k < vocab_size,
        "tail_samples",
        f"--top-k {cfg.top_k} covers the teacher's whole vocabulary ({vocab_size}): there is no tail to sample; "
        "drop --tail-samples",
    )
    num_samples = len(_inputs(cfg))
    teacher = model_identity(cfg.model, tokenizer=tokenizer)
    teacher["model"] = cfg.model
    capture = {
        k: getattr(cfg, k)
        for k in (
            "mode",
            "top_k",
            "max_new_tokens",
            "temperature",
            "top_p",
            "seed",
            "max_length",
            "overlong",
            "score_eos",
            "chat_template",
            "system_prompt",
            "extra_temperatures",
        )
    }
    if cfg.logit_moments:  # only when on, so caches made before the flag resume
        capture["logit_moments"] = True
    if cfg.tail_samples:  # likewise
        capture["tail_samples"] = cfg.tail_samples
    from logitcache.models import end_token_ids, resolve_model

    template = resolve_chat_template(tokenizer, cfg.chat_template)
    ends = end_token_ids(tokenizer, resolve_model(cfg.model))
    capture["end_token_ids"] = ends  # generate: both engines stop on these; the last one is not text
    capture["end_tokens"] = [tokenizer.convert_ids_to_tokens(i) for i in ends]
    if cfg.mode == "score" and cfg.score_eos:
        capture["score_end_token"] = score_end_token(tokenizer, template)  # appended after every response
    return CacheHeader(
        top_k=cfg.top_k,
        vocab_size=vocab_size,
        logprob_codec={"name": cfg.logprob_codec},
        id_codec={"name": cfg.id_codec},
        positions={"name": cfg.positions_backend},
        extra_temperatures=list(cfg.extra_temperatures),
        logit_moments=bool(cfg.logit_moments),
        tail_samples=int(cfg.tail_samples),
        num_shards=len(shard_ranges(num_samples, cfg.shard_size)),
        metadata={
            "teacher": teacher,
            "capture": capture,
            "input": {
                "path": cfg.data,
                "fingerprint": input_fingerprint(cfg.data, cfg.fields(), cfg.limit),
                "samples": num_samples,
                "fields": dataclasses.asdict(cfg.fields()),
            },
            "config": cfg.identity(),
            # dtype_auto: what --dtype auto stands for here, so a cache made before auto was resolved resumes
            "runtime": {"backend": cfg.backend, "dtype_auto": cfg.resolved_dtype("auto")},
        },
    )


_TOKENIZER: dict[str, Any] = {}  # per process: the teacher tokenizer, keyed by --model (seeded by run_generate)


def _shard_task(cfg: GenerateConfig, shard: int, progress: Progress | None) -> dict[str, Any]:
    """``process_shard`` as the shard runner calls it, here or on a dask worker (module level: it pickles)."""
    from logitcache.models import load_tokenizer

    if cfg.model not in _TOKENIZER:
        _TOKENIZER.clear()
        _TOKENIZER[cfg.model] = load_tokenizer(cfg.model)
    report = None
    if progress is not None:
        seen = [0]

        def report(n: int, tokens: int) -> None:  # process_shard reports the shard's tokens so far
            progress(n, tokens - seen[0])
            seen[0] = tokens

    return process_shard(cfg, shard, _TOKENIZER[cfg.model], report)


def run_generate(cfg: GenerateConfig) -> dict[str, Any]:
    """Fill ``cfg.out``; returns ``{"finalized": bool, "shards": ..., ...}``. Safe to rerun (resumes)."""
    from transformers import AutoConfig

    from logitcache.models import load_tokenizer, model_context, resolve_model

    if cfg.backend == "vllm":
        import importlib.util

        check(
            importlib.util.find_spec("vllm") is not None,
            "backend",
            "vllm is not installed; install the extra: pip install 'logitcache[vllm]' (GPU nodes), or on CPU run "
            "scripts/setup_vllm_env.sh",
        )
    tokenizer = load_tokenizer(cfg.model)
    records = _inputs(cfg)
    config = AutoConfig.from_pretrained(resolve_model(cfg.model))
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = int(text_config.vocab_size)
    check(cfg.top_k <= vocab, "top_k", f"{cfg.top_k} is larger than the teacher vocabulary ({vocab})")
    if cfg.max_length is not None and cfg.max_length > model_context(config):
        raise ConfigError(
            f"--max-length: {cfg.max_length} exceeds the model context ({model_context(config)} tokens); "
            "lower it or leave it unset"
        )
    header = build_header(cfg, tokenizer, vocab)
    writer = CacheWriter(cfg.out, header, overwrite=cfg.overwrite)
    if not writer.has_tokenizer():
        writer.save_tokenizer(tokenizer)
    ranges = shard_ranges(len(records), cfg.shard_size)
    mine = shards_for_task(len(ranges), cfg.num_shards, cfg.shard_index)
    todo = [s for s in mine if not writer.is_complete(s)]
    n_todo = sum(ranges[s][1] - ranges[s][0] for s in todo)
    summary: dict[str, Any] = {
        "shards_total": len(ranges),
        "shards_mine": len(mine),
        "shards_done_before": len(mine) - len(todo),
        "sequences": 0,
        "tokens": 0,
    }
    t0 = time.perf_counter()
    _TOKENIZER.clear()
    _TOKENIZER[cfg.model] = tokenizer  # local shards reuse it; dask workers load their own once
    with progress_bar(n_todo, f"generate ({cfg.backend}, {cfg.mode})", rate_unit="pos") as bar:
        markers = run_shards(
            todo,
            _shard_task,
            (cfg,),
            workers=cfg.workers,
            scheduler=cfg.scheduler,
            sizes={s: ranges[s][1] - ranges[s][0] for s in todo},
            progress=bar,
            tokens_of=lambda marker: int(marker["tokens"]),
            # vLLM starts engine processes, which daemonic workers may not; one GPU per local worker
            options=ClusterOptions(daemon=False, pin_gpus=True),
        )
    for marker in markers.values():
        summary["tokens"] += marker["tokens"]
        summary["sequences"] += marker["sequences"]
    summary["seconds"] = time.perf_counter() - t0
    done = writer.complete_shards()
    summary["finalized"] = len(done) == len(ranges)
    if summary["finalized"]:
        manifest = writer.finalize()
        summary["positions"] = manifest["stats"]["positions"]
        summary["counters"] = manifest["counters"]
        summary["skipped_samples"] = manifest.get("skipped_samples", [])
    return summary


def finalize_cache(url: str) -> dict[str, Any]:
    """Write the manifest of a cache whose shards are all complete (for job arrays). Idempotent."""
    return CacheWriter.resume(url).finalize()
