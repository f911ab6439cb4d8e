"""FSDP on GPUs (issue 15): the checks the CPU tests cannot make, in one script that runs as is on a GPU machine.

    python bench/fsdp_gpu.py --gpus 2                 # ~1.0B-parameter random student, 2 GPUs, a few minutes
    python bench/fsdp_gpu.py --gpus 8 --hidden 4096 --layers 32   # ~6.7B: DDP runs out of memory, FSDP does not
    python bench/fsdp_gpu.py --gpus 2 --hidden 64 --layers 2 --extra-vocab 0   # smoke test (runs on CPU too)

What the CPU tests (``tests/distill/test_train_parallel.py``, gloo) cannot check: NCCL, the bf16 mixed-precision
policy on GPU (bf16 all-gathers, fp32 reduce-scatter), the loading path (the student loaded on the CPU and each
block moved to its GPU as it is sharded), and the memory per rank that is FSDP's reason to exist. Offline, no
download: a tiny random teacher scores hand-made prompts into a cache (top-8), a random Llama student of
``--hidden``/``--layers`` with ``--extra-vocab`` more output rows than its tokenizer (a large vocabulary) is saved
with it, and the cache is aligned to it. Then, each its own process(es) so each has its own peak memory:

- ``reference``: one process on one GPU over the same batches as an N-rank run (rank 0's micro-batches, then rank
  1's, ..., one optimizer step over all of them), fp32: the single-GPU losses an N-rank run must reproduce;
- ``ddp`` and ``fsdp`` at ``--gpus`` ranks (``torchrun``), fp32 and bf16 (``--dtype bfloat16``);
- ``fsdp resume``: the fsdp fp32 run's folder as it was after step ``--steps // 2`` (later checkpoint removed),
  resumed with ``--resume``: its steps after the checkpoint must equal the uninterrupted run's.

The table: per run, the loss difference to the reference (fp32: <= 1e-4 relative, reduction order only; bf16 is
compared with fp32 DDP for information), the peak GPU memory of each rank (``torch.cuda.max_memory_allocated``;
``ru_maxrss`` on CPU) and the median step time after the first step. A run that runs out of memory says so in
its row (DDP at sizes that do not fit one GPU: that is the point). Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

STEP_LOG = "bench-rank{rank}.json"
HANG_ENV = "LC_BENCH_HANG_S"


# -- child processes ---------------------------------------------------------------------------------------------
def _patch_step_timing() -> list[float]:
    """Time every ``_Trainer.step`` (synchronizing CUDA so the time is the step's); returns the list it fills."""
    import torch

    from logitcache.distill import train as T

    times: list[float] = []
    original = T._Trainer.step

    def step(self: Any, loader: Any) -> dict[str, float]:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        logs = original(self, loader)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        return logs

    T._Trainer.step = step  # type: ignore[method-assign]
    return times


def _write_rank_log(out: Path, times: list[float], error: str | None = None) -> None:
    import torch

    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    out.mkdir(parents=True, exist_ok=True)
    (out / STEP_LOG.format(rank=rank)).write_text(json.dumps({"peak_gib": peak, "times": times, "error": error}))


def child_train(argv: list[str]) -> None:
    """One rank of ``logitcache train ARGV`` with its step times and peak memory written into ``--out``."""
    import torch

    from logitcache.cli import main

    out = Path(argv[argv.index("--out") + 1])
    times = _patch_step_timing()
    try:
        main(["train", *argv], standalone_mode=False)
    except torch.OutOfMemoryError as e:
        _write_rank_log(out, times, f"out of memory ({str(e).splitlines()[0][:80]})")
        raise
    _write_rank_log(out, times)


def child_reference(cfg_json: str, ranks: int) -> None:
    """One process over an N-rank run's batches (see the module docstring); writes rank 0's loss per step."""
    from logitcache.distill import train as T
    from logitcache.distill.checkpoint import seed_all
    from logitcache.distill.context import RunContext
    from logitcache.distill.data import Prefetcher
    from logitcache.distill.losses import CombinedLoss
    from logitcache.models import load_model, load_tokenizer

    cfg = T.TrainConfig(**json.loads(cfg_json))
    ctx = RunContext.setup(cfg.device, cfg.dtype, cfg.threads)
    tokenizer = load_tokenizer(cfg.student)
    data = T.open_inputs(cfg, tokenizer)
    seed_all(cfg.seed)
    model = load_model(cfg.student, dtype="float32", device=ctx.device)
    model.train()
    data.student_vocab = T._vocab_rows(model)
    pad = data.pad_id
    loaders = [
        Prefetcher(data.stream(cfg, RunContext(r, ranks, r, ctx.device, ctx.bf16), "train"), cfg.batch_size, pad)
        for r in range(ranks)
    ]
    state = {"n": 0}

    class Interleaved:
        def __next__(self) -> Any:
            rank = (state["n"] // cfg.grad_accum) % ranks
            state["n"] += 1
            return next(loaders[rank])

    totals: list[float] = []
    loss = CombinedLoss(cfg.loss, cfg.loss_configs())

    def recorded(db: Any) -> Any:
        result = loss(db)
        totals.append(float(result.total.detach()))
        return result

    trainer = T._Trainer(dataclasses.replace(cfg, grad_accum=ranks * cfg.grad_accum), ctx, data, model, loss)
    trainer.loss = recorded  # type: ignore[assignment]
    times = _patch_step_timing()
    it = Interleaved()
    try:
        for _ in range(cfg.max_steps):
            trainer.step(it)  # type: ignore[arg-type]
    finally:
        for loader in loaders:
            loader.close()
    per_step = ranks * cfg.grad_accum
    losses = [sum(totals[i : i + cfg.grad_accum]) / cfg.grad_accum for i in range(0, len(totals), per_step)]
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"step": i + 1, "loss": v}) + "\n" for i, v in enumerate(losses)]
    (out / "metrics.jsonl").write_text("".join(lines))
    _write_rank_log(out, times)


# -- setup -------------------------------------------------------------------------------------------------------
def build_inputs(root: Path, args: argparse.Namespace) -> dict[str, Path]:
    """Teacher, prompts, cache (score mode, top-8), student, alignment: all local, nothing downloaded."""
    from logitcache.pipeline.align_stage import AlignConfig, run_align
    from logitcache.pipeline.generate_stage import GenerateConfig, run_generate
    from logitcache.testing.tiny_models import save_tiny_model, tiny_llama, unigram_tokenizer

    teacher = save_tiny_model(root / "teacher", seed=0)
    prompts = root / "prompts.jsonl"
    # ~380 student tokens per sequence
    filler = " ".join(f"step {j} adds {j} to the total, which is now {j * (j + 1) // 2}." for j in range(1, 12))
    with open(prompts, "w") as f:
        for i in range(args.prompts):
            f.write(json.dumps({"id": f"q{i}", "prompt": f"Question {i}: sum 1..{i}?", "response": filler}) + "\n")
    cache = root / "cache"
    shard_size = max(1, args.prompts // (4 * args.gpus))  # 4 shards per rank
    gen = GenerateConfig(model=str(teacher), data=str(prompts), out=str(cache), mode="score", top_k=8,
                         shard_size=shard_size, overwrite=True)
    run_generate(gen)
    tok = unigram_tokenizer()
    tok.chat_template = "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}### assistant:"
    student = root / "student"
    model = tiny_llama(tok, extra_vocab=args.extra_vocab, seed=1, hidden_size=args.hidden, num_layers=args.layers)
    model.save_pretrained(student)
    tok.save_pretrained(student)
    run_align(AlignConfig(cache=str(cache), student_tokenizer=str(student), workers=1, overwrite=True))
    params = sum(p.numel() for p in model.parameters())
    return {"cache": cache, "student": student, "params": params}  # type: ignore[dict-item]


def train_flags(inputs: dict[str, Any], out: Path, args: argparse.Namespace, **kw: Any) -> dict[str, Any]:
    flags = dict(cache=str(inputs["cache"]), student=str(inputs["student"]), out=str(out), batch_size=args.batch_size,
                 grad_accum=args.grad_accum, max_length=args.max_length, lr=1e-4, warmup_steps=1,
                 max_steps=args.steps, save_every=args.steps // 2, eval_fraction=0.0, loss=args.loss,
                 verify="none", schedule="constant")
    return {**flags, **kw}


def as_argv(flags: dict[str, Any]) -> list[str]:
    argv: list[str] = []
    for key, value in flags.items():
        name = "--" + key.replace("_", "-")
        argv += [name] if value is True else [] if value is False or value is None else [name, str(value)]
    return argv


def run(cmd: list[str], log: Path, timeout: float) -> int:
    """``cmd`` with its output in ``log``; a child still running ``timeout - 15`` s in dumps its threads' stacks
    into the log and exits (a hang is diagnosed, not just killed)."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), HANG_ENV: str(timeout - 15)}
    with open(log, "w") as f:
        try:
            return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            return 124


def results(out: Path, ranks: int) -> dict[str, Any]:
    metrics = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()] if (
        out / "metrics.jsonl").exists() else []
    logs = [json.loads(p.read_text()) for p in sorted(out.glob("bench-rank*.json"))]
    times = [t for log in logs[:1] for t in log["times"][1:]]
    return {
        "losses": [m["loss"] for m in metrics],
        "peaks": [log["peak_gib"] for log in logs],
        "step_s": statistics.median(times) if times else float("nan"),
        "error": next((log["error"] for log in logs if log.get("error")), None),
        "ranks": ranks,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", type=int, default=2, help="ranks of the ddp/fsdp runs (torchrun --nproc-per-node)")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--extra-vocab", type=int, default=32000, help="output rows beyond the 200-token tokenizer")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--loss", default="ce:1,mlot:0.15")
    p.add_argument("--dir", help="work folder (default: a temporary one, removed at the end)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per run")
    p.add_argument("--child", choices=["train", "reference"], help=argparse.SUPPRESS)
    p.add_argument("--ranks", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--cfg", help=argparse.SUPPRESS)
    args, rest = p.parse_known_args()
    if args.child and os.environ.get(HANG_ENV):
        faulthandler.dump_traceback_later(float(os.environ[HANG_ENV]), exit=True)
    if args.child == "train":
        child_train(rest)
        return 0
    if args.child == "reference":
        child_reference(args.cfg, args.ranks)
        return 0

    import torch

    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="lc-fsdp-"))
    root.mkdir(parents=True, exist_ok=True)
    device = f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"
    if torch.cuda.is_available() and torch.cuda.device_count() < args.gpus:
        print(f"--gpus {args.gpus}: only {torch.cuda.device_count()} GPUs here", file=sys.stderr)
        return 2
    inputs = build_inputs(root, args)
    print(f"student: {inputs['params'] / 1e6:.0f}M parameters (hidden {args.hidden}, {args.layers} layers, "
          f"vocab {200 + args.extra_vocab}); {device}; {args.gpus} ranks; batch {args.batch_size} x accum "
          f"{args.grad_accum} x {args.max_length} tokens max", flush=True)
    me = [sys.executable, str(Path(__file__).resolve())]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.gpus)]
    torchrun_me = [*torchrun, str(Path(__file__).resolve())]
    rows: dict[str, dict[str, Any]] = {}

    ref_out = root / "reference"
    cfg = train_flags(inputs, ref_out, args, dtype="float32")
    code = run([*me, "--child", "reference", "--ranks", str(args.gpus), "--cfg", json.dumps(cfg)],
               root / "reference.log", args.timeout)
    rows["reference (1 process)"] = results(ref_out, 1) | ({"error": f"exit {code}"} if code else {})
    for parallel in ("ddp", "fsdp"):
        for dtype in ("float32", "bfloat16"):
            out = root / f"{parallel}-{dtype}"
            argv = as_argv(train_flags(inputs, out, args, parallel=parallel, dtype=dtype, overwrite=True))
            code = run([*torchrun_me, "--child", "train", *argv], root / f"{parallel}-{dtype}.log", args.timeout)
            row = results(out, args.gpus)
            if code and not row["error"]:
                row["error"] = f"exit {code} (see {root / f'{parallel}-{dtype}.log'})"
            rows[f"{parallel} {dtype}"] = row
    # resume: the fsdp fp32 run's folder as it was after its mid-run checkpoint
    src, dst = root / "fsdp-float32", root / "fsdp-resume"
    resume_ok = None
    if not rows["fsdp float32"]["error"]:
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst)
        for ck in sorted((dst / "checkpoints").glob("step-*"))[1:]:
            shutil.rmtree(ck)
        (dst / "summary.json").unlink(missing_ok=True)
        for f in dst.glob("bench-rank*.json"):
            f.unlink()
        argv = as_argv(train_flags(inputs, dst, args, parallel="fsdp", dtype="float32", resume=True))
        code = run([*torchrun_me, "--child", "train", *argv], root / "fsdp-resume.log", args.timeout)
        row = results(dst, args.gpus)
        half = args.steps // 2
        a, b = rows["fsdp float32"]["losses"][half:], row["losses"][half:]
        resume_ok = code == 0 and len(a) == len(b) > 0 and max(abs(x - y) / abs(x) for x, y in zip(a, b)) <= 1e-5
        rows["fsdp resume (fp32)"] = row | ({"error": f"exit {code}"} if code else {})

    ref = rows["reference (1 process)"]["losses"]
    ddp32 = rows["ddp float32"]["losses"]
    failed = []
    print("\n| run | ranks | max rel. loss diff | vs | peak memory per rank (GiB) | step time (s) | note |")
    print("|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        base, label = (ref, "reference") if "float32" in name or "fp32" in name else (ddp32, "ddp fp32")
        if name.startswith("reference"):
            base, label = [], ""
        diffs = [abs(x - y) / abs(y) for x, y in zip(row["losses"], base)]
        diff = f"{max(diffs):.1e}" if diffs else "-"
        peaks = ", ".join(f"{v:.2f}" for v in row["peaks"]) or "-"
        note = row["error"] or ""
        if diffs and ("float32" in name or "fp32" in name) and max(diffs) > 1e-4:
            note, _ = (note + " LOSSES DIFFER").strip(), failed.append(name)
        if row["error"] and not (name.startswith("ddp") and "out of memory" in row["error"]):
            failed.append(name)
        print(f"| {name} | {row['ranks']} | {diff} | {label} | {peaks} | {row['step_s']:.3f} | {note} |")
    if resume_ok is False:
        failed.append("fsdp resume")
    print(f"\nfsdp resume reproduces the uninterrupted run after step {args.steps // 2}: {resume_ok}")
    print(f"work folder: {root}" if args.dir else "")
    if not args.dir:
        shutil.rmtree(root, ignore_errors=True)
    if failed:
        print(f"FAILED: {', '.join(dict.fromkeys(failed))}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
