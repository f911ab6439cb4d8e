"""Stage three on tiny models: the loss falls, resume is exact, DDP ranks are disjoint, no teacher is loaded."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from proc_helpers import killed_when_parked

from logitcache.distill.sampling import rank_epoch_size
from logitcache.distill.train import TrainConfig, run_train


@pytest.fixture(scope="module")
def setup(train_setup):
    return train_setup


def cfg(setup, out, **kw):
    base = dict(
        cache=str(setup["cache"]),
        student=str(setup["student"]),
        out=str(out),
        batch_size=4,
        lr=3e-3,
        warmup_steps=2,
        max_steps=30,
        eval_fraction=0.0,
        save_every=1000,
        loss="ce:1,mlot:0.15",
    )
    return TrainConfig(**{**base, **kw})


def metrics(out):
    return [json.loads(ln) for ln in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_over_30_steps(setup, tmp_path):
    summary = run_train(cfg(setup, tmp_path / "run", eval_fraction=0.2, eval_every=30))
    m = metrics(tmp_path / "run")
    first = sum(x["loss"] for x in m[:5]) / 5
    final = sum(x["loss"] for x in m[-5:]) / 5
    assert len(m) == 30 and final < 0.7 * first, (first, final)
    assert "eval/ppl" in m[-1] and summary["eval"]["eval/ce"] > 0
    assert {"loss/ce", "loss/mlot", "loss/mlot/had", "loss/mlot/sl", "loss/mlot/sd"} <= set(m[0])
    assert (tmp_path / "run" / "checkpoints" / "step-0000030" / "student" / "config.json").exists()


#: the CLI's `train` in a child that, once the step-4 checkpoint is complete, says so and waits to be killed
KILL_SCRIPT = """
import sys
from logitcache.distill import train as train_mod
original = train_mod.save_checkpoint
def save_checkpoint(ctx, out, step, *a, **k):
    path = original(ctx, out, step, *a, **k)
    if step == 4:
        print("parked", path, flush=True)  # the checkpoint is renamed into place: wait for the SIGKILL
        sys.stdin.readline()
    return path
train_mod.save_checkpoint = save_checkpoint
from logitcache.cli import main
main(sys.argv[1:])
"""


def test_killed_then_resumed_run_matches_an_uninterrupted_one(setup, tmp_path):
    run_train(cfg(setup, tmp_path / "a", max_steps=8, save_every=4, schedule="cosine", loss="ce:1,uld:0.5"))
    args = ["train", "--cache", str(setup["cache"]), "--student", str(setup["student"]), "--out", str(tmp_path / "b")]
    args += ["--batch-size", "4", "--lr", "0.003", "--warmup-steps", "2", "--max-steps", "8", "--eval-fraction", "0"]
    args += ["--save-every", "4", "--loss", "ce:1,uld:0.5"]
    cmd = [sys.executable, "-c", KILL_SCRIPT, *args]
    with killed_when_parked(cmd, "its step-4 checkpoint", stderr=subprocess.DEVNULL) as lines:
        # precondition: the kill lands mid-run, after a complete step-4 checkpoint and before any later one
        parked = Path(lines[-1].split(maxsplit=1)[1])
        assert parked.name == "step-0000004" and (parked / "trainer.pt").exists()
        assert sorted(p.name for p in parked.parent.iterdir()) == ["step-0000004"]
    assert not (tmp_path / "b" / "summary.json").exists()
    run_train(cfg(setup, tmp_path / "b", max_steps=8, save_every=4, loss="ce:1,uld:0.5", resume=True))
    a, b = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    assert [x["step"] for x in b] == list(range(1, 9))
    for x, y in zip(a[4:], b[4:], strict=True):
        assert x["loss"] == y["loss"] and x["lr"] == y["lr"], (x, y)


def test_two_process_torchrun_ranks_are_disjoint_and_cover_the_epoch(setup, tmp_path):
    from logitcache.storage import LogitCache

    cache = LogitCache.open(setup["cache"])
    sizes = [s.sequences for s in cache.shards]
    epoch = [rank_epoch_size(sizes, rank, 2, 0, 0) for rank in range(2)]
    steps = -(-max(epoch) // 2)  # batches of 2: enough steps for each rank to read its whole first epoch
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a free rendezvous port on localhost: no clash with another run on this machine
        "--nproc-per-node",
        "2",
        "-m",
        "logitcache.cli",
        "train",
        "--cache",
        str(setup["cache"]),
        "--student",
        str(setup["student"]),
        "--out",
        str(out),
        "--batch-size",
        "2",
        "--max-steps",
        str(steps),
        "--eval-fraction",
        "0",
        "--loss",
        "ce:1,uld:0.1",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    seen = []
    for rank in range(2):
        ids = [int(x) for x in (out / f"samples-rank{rank}.txt").read_text().split()]
        assert len(ids) == 2 * steps
        first_epoch = ids[: epoch[rank]]
        assert len(set(first_epoch)) == len(first_epoch) == epoch[rank]  # no sample twice within an epoch
        seen.append(set(first_epoch))
    assert not seen[0] & seen[1]  # disjoint ...
    assert seen[0] | seen[1] == {int(s) for s in cache.sample_ids()}  # ... and together the whole epoch
    assert len(metrics(out)) == steps


def test_train_never_loads_the_teacher(setup, tmp_path):
    """In a fresh interpreter with the teacher's folder gone, only the student is ever loaded."""
    moved = tmp_path / "teacher-elsewhere"
    shutil.copytree(setup["teacher"], moved)
    code = f"""
import sys, transformers
loaded = []
orig = transformers.AutoModelForCausalLM.from_pretrained.__func__
def spy(cls, path, *a, **k):
    loaded.append(str(path)); return orig(cls, path, *a, **k)
transformers.AutoModelForCausalLM.from_pretrained = classmethod(spy)
from logitcache.distill.train import TrainConfig, run_train
run_train(TrainConfig(cache={str(setup["cache"])!r}, student={str(setup["student"])!r}, out={str(tmp_path / "t")!r},
                      max_steps=2, batch_size=2, eval_fraction=0.0))
assert loaded == [{str(setup["student"])!r}], loaded
assert "logitcache.pipeline.backend_hf" not in sys.modules
print("ok")
"""
    teacher = setup["teacher"]
    hidden = teacher.with_name("teacher-hidden")
    os.rename(teacher, hidden)
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    finally:
        os.rename(hidden, teacher)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_online_teacher_gives_the_same_losses(setup, tmp_path):
    """--teacher recomputes the cached rows: same losses as offline, up to the cache's fp16 rounding."""
    from logitcache.pipeline.backend_hf import score_rows

    offline = run_train(cfg(setup, tmp_path / "off", max_steps=3))
    online = run_train(
        cfg(setup, tmp_path / "on", max_steps=3, teacher=str(setup["teacher"])), teacher_scorer=score_rows
    )
    assert online["teacher_loaded"] and not offline["teacher_loaded"]
    for x, y in zip(metrics(tmp_path / "off"), metrics(tmp_path / "on"), strict=True):
        assert abs(x["loss"] - y["loss"]) < 1e-2 * max(1.0, abs(x["loss"])), (x["loss"], y["loss"])
    # ... but not bit-identical: the online rows were really recomputed (fp32, not the cache's fp16)
    assert [x["loss"] for x in metrics(tmp_path / "off")] != [y["loss"] for y in metrics(tmp_path / "on")]


def test_online_teacher_needs_an_injected_scorer(setup, tmp_path):
    from logitcache.config import ConfigError

    with pytest.raises(ConfigError, match="--teacher: online mode needs a teacher scorer"):
        run_train(cfg(setup, tmp_path / "on", max_steps=1, teacher=str(setup["teacher"])))
    assert not (tmp_path / "on").exists()


def test_cli_train_with_teacher_injects_the_hf_scorer(setup, tmp_path):
    from click.testing import CliRunner

    from logitcache.cli import main

    out = tmp_path / "cli-online"
    args = ["train", "--cache", str(setup["cache"]), "--student", str(setup["student"]), "--out", str(out)]
    args += ["--teacher", str(setup["teacher"]), "--max-steps", "1", "--batch-size", "2", "--eval-fraction", "0"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert json.loads((out / "summary.json").read_text())["teacher_loaded"]


def test_distill_imports_no_pipeline_module():
    """The import rule, lazy imports included: ``distill`` reaches a teacher only through the scorer it is handed."""
    import ast

    import logitcache.distill as distill

    files = sorted(Path(distill.__path__[0]).glob("*.py"))
    assert any(f.name == "train.py" for f in files)
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            else:
                continue
            assert not [n for n in names if "pipeline" in n.split(".")], (f.name, names)


def _cli_train(setup, out, *extra):
    from click.testing import CliRunner

    from logitcache.cli import main

    args = ["train", "--cache", str(setup["cache"]), "--student", str(setup["student"]), "--out", str(out)]
    args += ["--batch-size", "4", "--eval-fraction", "0", "--loss", "ce:1,uld:0.5", *map(str, extra)]
    return CliRunner().invoke(main, args)


def test_resume_of_a_finished_run_says_so_and_leaves_its_summary(setup, tmp_path):
    out = tmp_path / "run"
    r = _cli_train(setup, out, "--max-steps", "2")
    assert r.exit_code == 0, r.output
    summary = (out / "summary.json").read_bytes()
    assert json.loads(summary)["tokens"] > 0 and "student completion tokens" in r.output
    metrics_before = (out / "metrics.jsonl").read_bytes()
    r = _cli_train(setup, out, "--max-steps", "2", "--resume")
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith("train:")]
    assert len(lines) == 1 and "already finished (2 steps, --max-steps 2)" in lines[0], r.output
    assert "nan" not in r.output
    assert (out / "summary.json").read_bytes() == summary  # left alone
    assert (out / "metrics.jsonl").read_bytes() == metrics_before
    # killed between the final checkpoint and the summary: the resume writes it from the checkpoint's totals
    (out / "summary.json").unlink()
    assert _cli_train(setup, out, "--max-steps", "2", "--resume").exit_code == 0
    rebuilt = json.loads((out / "summary.json").read_text())
    assert rebuilt["tokens"] == json.loads(summary)["tokens"] and rebuilt["steps"] == 2


def test_a_resumed_run_summary_covers_the_whole_run(setup, tmp_path):
    whole = run_train(cfg(setup, tmp_path / "whole", max_steps=4, loss="ce:1,uld:0.5"))
    first = run_train(cfg(setup, tmp_path / "split", max_steps=2, loss="ce:1,uld:0.5"))
    resumed = run_train(cfg(setup, tmp_path / "split", max_steps=4, loss="ce:1,uld:0.5", resume=True))
    assert 0 < first["tokens"] < resumed["tokens"] == whole["tokens"]  # the same stream, counted over both segments
    assert resumed["steps"] == 4 and resumed["seconds"] > first["seconds"]
    assert resumed["totals_complete"]
    assert json.loads((tmp_path / "split" / "summary.json").read_text())["tokens"] == whole["tokens"]


def test_a_checkpoint_without_totals_still_resumes(setup, tmp_path):
    """Checkpoints written before totals were kept load; the summary then counts the resumed segment, and says so."""
    import torch

    first = run_train(cfg(setup, tmp_path / "old", max_steps=2, loss="ce:1,uld:0.5"))
    trainer_pt = tmp_path / "old" / "checkpoints" / "step-0000002" / "trainer.pt"
    state = torch.load(trainer_pt, weights_only=False)
    assert state.pop("totals")["tokens"] == first["tokens"]  # precondition: a new checkpoint records them
    torch.save(state, trainer_pt)
    resumed = run_train(cfg(setup, tmp_path / "old", max_steps=3, loss="ce:1,uld:0.5", resume=True))
    assert resumed["steps"] == 3 and not resumed["totals_complete"]
    assert 0 < resumed["tokens"] < first["tokens"]  # one step's tokens, not the run's


def test_progress_bar_names_student_tokens():
    from logitcache.distill.train import _postfix

    post = _postfix({"loss": 1.0, "loss/ce": 1.0, "tokens_per_s": 12.0})
    assert post["student tok/s"] == "12" and "tok/s" not in post
