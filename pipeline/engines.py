"""Stage-one engines behind one interface: ``hf`` (transformers; the reference) and ``vllm``.

An engine is created once per worker process (loading a model is the expensive part) and then scores or
samples batches of token ids. Both produce ``PositionRows`` with the same meaning (DESIGN.md section 2), so the
rest of stage one never knows which one ran. The registry is a plain dict; ``vllm`` is imported only when used.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from logitcache.storage.records import PositionRows


class Engine(Protocol):
    vocab_size: int
    max_length: int

    def score(self, token_ids: list[np.ndarray], prompt_lens: list[int], seed: int = 0) -> list[PositionRows]: ...

    def generate(self, prompt_ids: list[np.ndarray], seed: int) -> list[tuple[np.ndarray, str, PositionRows]]: ...


class HfEngine:
    """transformers on CPU or GPU: teacher-forced scoring and a KV-cached sampling loop (``pipeline.backend_hf``)."""

    def __init__(self, cfg: Any, tokenizer: Any) -> None:

        from logitcache.models import default_device, load_model, model_context

        from .backend_hf import vocab_width

        device = cfg.device or default_device()
        self.model = load_model(cfg.model, dtype=cfg.resolved_dtype(), device=device)
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.vocab_size = vocab_width(self.model)
        self.max_length = model_context(self.model.config)

    def score(self, token_ids: list[np.ndarray], prompt_lens: list[int], seed: int = 0) -> list[PositionRows]:
        import torch

        from .backend_hf import score_rows

        with torch.inference_mode():
            return score_rows(
                self.model,
                token_ids,
                prompt_lens,
                self.cfg.top_k,
                chunk_positions=self.cfg.chunk_positions,
                extra_temperatures=self.cfg.extra_temperatures,
                logit_moments=self.cfg.logit_moments,
                tail_samples=self.cfg.tail_samples,
                seed=seed,
            )

    def generate(self, prompt_ids: list[np.ndarray], seed: int) -> list[tuple[np.ndarray, str, PositionRows]]:
        import torch

        from .backend_hf import generate_rows

        with torch.inference_mode():
            out = generate_rows(
                self.model,
                self.tokenizer,
                prompt_ids,
                self.cfg.top_k,
                self.cfg.max_new_tokens,
                temperature=self.cfg.temperature,
                top_p=self.cfg.top_p,
                seed=seed,
                extra_temperatures=self.cfg.extra_temperatures,
                logit_moments=self.cfg.logit_moments,
                tail_samples=self.cfg.tail_samples,
            )
        return [(g.completion_ids, g.finish_reason, g.rows) for g in out]


class VllmEngine:
    """vLLM (``pipeline.backend_vllm``): ``prompt_logprobs`` for score mode, ``logprobs`` for generate mode."""

    def __init__(self, cfg: Any, tokenizer: Any) -> None:
        import torch

        from .backend_vllm import VllmBackend

        gpu = torch.cuda.is_available()
        dtype = cfg.resolved_dtype()
        kwargs: dict[str, Any] = {}
        if gpu:
            kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        if cfg.tensor_parallel_size > 1:
            kwargs["tensor_parallel_size"] = cfg.tensor_parallel_size
        if cfg.max_num_batched_tokens:
            kwargs["max_num_batched_tokens"] = cfg.max_num_batched_tokens
        self.backend = VllmBackend(
            cfg.model,
            dtype=dtype,
            max_model_len=cfg.max_length,
            max_logprobs=cfg.max_logprobs or cfg.top_k,
            seed=cfg.seed,
            row_stats=bool(cfg.extra_temperatures) or cfg.logit_moments,  # --no-row-stats: the plain engine, no hook
            **kwargs,
        )
        self.cfg = cfg
        self.vocab_size = self.backend.vocab_size
        self.max_length = self.backend.max_model_len

    def score(self, token_ids: list[np.ndarray], prompt_lens: list[int], seed: int = 0) -> list[PositionRows]:
        temps = self.cfg.extra_temperatures
        return self.backend.score(
            token_ids, prompt_lens, self.cfg.top_k, extra_temperatures=temps, logit_moments=self.cfg.logit_moments
        )

    def generate(self, prompt_ids: list[np.ndarray], seed: int) -> list[tuple[np.ndarray, str, PositionRows]]:
        out = self.backend.generate(
            prompt_ids, self.cfg.top_k, self.cfg.max_new_tokens, self.cfg.temperature, self.cfg.top_p, seed,
            extra_temperatures=self.cfg.extra_temperatures, logit_moments=self.cfg.logit_moments,
        )
        return [(g.completion_ids, g.finish_reason, g.rows) for g in out]


ENGINES: dict[str, type] = {"hf": HfEngine, "vllm": VllmEngine}
