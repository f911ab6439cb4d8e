"""Exact row statistics from inside a vLLM engine: the worker-side half of the ``vllm`` backend's row stats.

vLLM never hands the full logits to its caller, so ``logsumexp(logits / tau)`` over the full vocabulary (what the
cache's ``extra_lse`` holds, see :class:`~logitcache.storage.records.PositionRows`) has to be reduced **inside** the
engine, where the logits exist, and travel back **in band** with the logprobs vLLM already returns. This module is
loaded into vLLM's worker process as a *worker extension* (``LLM(worker_extension_cls=...)``: vLLM mixes the class
into its worker and lets the caller invoke its methods by name through ``LLM.collective_rpc``; msgpack-safe, no
pickled callables). Its one method swaps vLLM's top-K gather for a wrapper that, per position:

1. takes the **raw logits** (the engine runs with ``logprobs_mode="raw_logits"``, so vLLM passes float32 logits,
   unprocessed, where it would pass log-softmax),
2. computes the logprobs with ``log_softmax`` in float32 (vLLM's own ``raw_logprobs`` op, so rows are bit for bit
   what ``raw_logprobs`` mode returns) and one statistic per requested spec (``logsumexp(logits / tau)``; also the
   logits' ``mean`` / ``std``; see :func:`stat_columns` for how, cheaply),
3. calls vLLM's own gather on the logprobs for ``K = requested - T`` entries and inserts the ``T`` statistics as
   columns ``1 .. T`` (token id :data:`SENTINEL`) between the realized token (column 0) and the top-K.

The caller therefore asks for ``K + T`` logprobs and gets back ``1 + T + K`` entries per position; vLLM's output
path is width-agnostic (it zips ids/logprobs/ranks per position), per-request truncation to ``requested + 1``
columns only drops top-K tail entries, never statistics, and the sentinel id lets the caller prove the hook ran.

Hook points, read from vLLM 0.32's source (``docs/vllm_row_stats.md`` has line numbers):

- V1 model runner (``vllm/v1/worker/gpu_model_runner.py``, also the CPU runner): both the prompt-logprob path and
  the sampler call the sampler instance's ``gather_logprobs(scores, num_logprobs, token_ids)``; we set an instance
  attribute on ``worker.model_runner.sampler`` (the class keeps its staticmethod).
- V2 model runner (``vllm/v1/worker/gpu/``; the default on CUDA in 0.32): the sampler and the chunked prompt-logprob
  path call ``compute_topk_scores`` imported by name into ``vllm.v1.worker.gpu.sample.sampler`` and
  ``...prompt_logprob``; we rebind both module globals (one engine per worker process).

Trade-offs: it relies on vLLM internals (a function's name and signature), so a vLLM upgrade can break it; it fails
loudly rather than silently (the RPC raises when neither hook point exists, and the caller checks the sentinel ids
of every position). Speculative decoding is refused (its rejection sampler calls the same gather with other
inputs). Cost: per temperature other than 1, one scale + exp + sum pass over the ``[tokens, vocab]`` logits (tau = 1
is read off the top-1 entry for free), and ``T`` extra numbers per position on the wire.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["MAX_STATS", "SENTINEL", "RowStatsWorkerExtension", "parse_spec", "stat_columns"]

#: token id of a statistics column (no real token has a negative id)
SENTINEL = -1
#: most statistics one engine can carry (the engine reserves this many extra logprob slots)
MAX_STATS = 8

_STATE: dict[str, Any] = {"specs": (), "hooks": set()}


def parse_spec(spec: str) -> tuple[str, float]:
    """``"lse:2.0"`` -> ``("lse", 2.0)``; ``"mean"`` / ``"std"`` -> ``(kind, 0.0)``."""
    kind, _, arg = str(spec).partition(":")
    if kind == "lse":
        tau = float(arg)
        if not tau > 0:
            raise ValueError(f"row statistic {spec!r}: temperature must be > 0")
        return kind, tau
    if kind in ("mean", "std") and not arg:
        return kind, 0.0
    raise ValueError(f"unknown row statistic {spec!r} (expected 'lse:<tau>', 'mean' or 'std')")


def stat_columns(
    logits: torch.Tensor,
    logprobs: torch.Tensor,
    lse1: torch.Tensor,
    specs: Sequence[tuple[str, float]],
    scratch: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[n, T]`` float32 statistics of ``[n, V]`` float32 ``logits``, given their ``log_softmax`` and ``lse1``.

    ``logsumexp(x / tau) = lse1 / tau + log(sum(exp(logprobs / tau)))``: the terms are <= 1 with the largest near
    ``exp(-log(sum) / tau)``, so no max-shift is needed and no term overflows. One ``[n, V]`` buffer serves every
    temperature (``scratch``, which may be ``logits`` itself when the caller gives it away: its values are read
    first for ``mean`` / ``std``); ``torch.logsumexp`` would be several times slower on CPU.
    """
    cols: dict[int, torch.Tensor] = {}
    for i, (kind, _) in enumerate(specs):  # these read the logits, before the scratch buffer may overwrite them
        if kind == "mean":
            cols[i] = logits.mean(dim=-1)
        elif kind == "std":  # population standard deviation, as numpy's default
            cols[i] = logits.std(dim=-1, correction=0)
    for i, (kind, tau) in enumerate(specs):
        if kind != "lse":
            continue
        if tau == 1.0:
            cols[i] = lse1
            continue
        if scratch is None:
            scratch = torch.empty_like(logprobs)
        torch.mul(logprobs, 1.0 / tau, out=scratch)
        cols[i] = lse1 / tau + scratch.exp_().sum(dim=-1).log_()
    return torch.stack([cols[i] for i in range(len(specs))], dim=1).to(torch.float32)


def _with_stats(
    gather: Callable[[torch.Tensor, int], Any], logits: torch.Tensor, num_logprobs: int, reuse_logits: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[Any, ...]]:
    """Run vLLM's gather (``gather(logprobs, k)``) and splice the statistics in after the realized token.

    ``reuse_logits``: vLLM hands us a tensor nobody reads afterwards, so it may serve as scratch space.
    """
    owned = logits.dtype != torch.float32
    logits = logits.to(torch.float32)
    logprobs = logits.log_softmax(dim=-1)  # vLLM's own raw_logprobs op (Sampler.compute_logprobs), bit for bit
    specs = _STATE["specs"]
    t = len(specs)
    if t == 0 or num_logprobs <= t:  # no statistics asked for (or a request too narrow to carry them)
        ids, vals, ranks, *rest = gather(logprobs, num_logprobs)
        return ids, vals, ranks, tuple(rest)
    ids, vals, ranks, *rest = gather(logprobs, num_logprobs - t)
    # lse at tau = 1 from the top-1 entry: log_softmax writes exactly -log(sum exp(x - max)) at the max
    top1 = ids[:, 1:2].long()
    lse1 = (logits.gather(1, top1) - logprobs.gather(1, top1))[:, 0]
    stats = stat_columns(logits, logprobs, lse1, specs, logits if (reuse_logits or owned) else None).to(vals.dtype)
    stat_ids = torch.full((ids.shape[0], t), SENTINEL, dtype=ids.dtype, device=ids.device)
    ids = torch.cat((ids[:, :1], stat_ids, ids[:, 1:]), dim=1)
    vals = torch.cat((vals[:, :1], stats, vals[:, 1:]), dim=1)
    return ids, vals, ranks, tuple(rest)


def _hook_v1(runner: Any) -> None:
    from vllm.v1.outputs import LogprobsTensors

    sampler = runner.sampler
    original = type(sampler).gather_logprobs  # the staticmethod, as a plain function

    def gather_logprobs(logprobs: torch.Tensor, num_logprobs: int, token_ids: torch.Tensor) -> Any:
        # logprobs_mode="raw_logits": ``logprobs`` holds the raw float32 logits here
        # the tensor is a throwaway: a clone in Sampler.forward (v1/sample/sampler.py:90-94), fresh logits on the
        # prompt path (v1/worker/gpu_model_runner.py:5375-5391); neither is read after the gather
        gather = lambda lp, k: original(lp, k, token_ids)  # noqa: E731
        ids, vals, ranks, _ = _with_stats(gather, logprobs, num_logprobs, reuse_logits=True)
        return LogprobsTensors(ids, vals, ranks)

    sampler.gather_logprobs = gather_logprobs


def _hook_v2() -> None:
    from vllm.v1.outputs import LogprobsTensors
    from vllm.v1.worker.gpu.sample import logprob, prompt_logprob
    from vllm.v1.worker.gpu.sample import sampler as sampler_mod

    original = logprob.compute_topk_scores

    names = ("cu_num_logits", "logprob_token_ids_state", "expanded_idx_mapping", "max_per_req_token_ids",
             "logits_mode")

    def compute_topk_scores(logits: torch.Tensor, num_logprobs: int, sampled_token_ids: torch.Tensor,
                            *args: Any, **kwargs: Any) -> Any:
        kwargs.update(zip(names, args))
        if kwargs.get("max_per_req_token_ids", 0) or num_logprobs == -1:
            return original(logits, num_logprobs, sampled_token_ids, **kwargs)  # logprob_token_ids / full vocab
        kwargs["logits_mode"] = True  # we pass logprobs and want them gathered as they are

        def gather(lp: torch.Tensor, k: int) -> Any:
            return original(lp, k, sampled_token_ids, **kwargs)

        ids, vals, ranks, rest = _with_stats(gather, logits, num_logprobs, reuse_logits=False)
        return LogprobsTensors(ids, vals, ranks, *rest)

    sampler_mod.compute_topk_scores = compute_topk_scores
    prompt_logprob.compute_topk_scores = compute_topk_scores


class RowStatsWorkerExtension:
    """Mixed into vLLM's worker class (``worker_extension_cls``); call through ``LLM.collective_rpc``."""

    def logitcache_row_stats(self, specs: list[str]) -> str:
        """Install the hook (once) and set the statistics every position carries from now on; returns the runner."""
        parsed = tuple(parse_spec(s) for s in specs)
        if len(parsed) > MAX_STATS:
            raise ValueError(f"at most {MAX_STATS} row statistics, got {len(parsed)}")
        runner = self.model_runner  # type: ignore[attr-defined]
        from vllm.v1.sample.sampler import Sampler

        if isinstance(getattr(runner, "sampler", None), Sampler):
            kind = "v1"
            if id(runner) not in _STATE["hooks"]:
                _hook_v1(runner)
                _STATE["hooks"].add(id(runner))
        else:
            from vllm.v1.worker.gpu.model_runner import GPUModelRunner as V2Runner

            if not isinstance(runner, V2Runner):
                raise RuntimeError(f"logitcache row statistics: unknown vLLM model runner {type(runner).__name__}")
            kind = "v2"
            if "v2" not in _STATE["hooks"]:
                _hook_v2()
                _STATE["hooks"].add("v2")
        if getattr(runner, "speculative_config", None) is not None:
            raise RuntimeError("logitcache row statistics do not support speculative decoding")
        if runner.model_config.logprobs_mode != "raw_logits":
            raise RuntimeError("logitcache row statistics need the engine built with logprobs_mode='raw_logits'")
        _STATE["specs"] = parsed
        return kind
