"""``--parallel ddp|fsdp`` under torchrun (2 CPU processes, gloo): the same losses as one process over the same
batches, and an FSDP run resumed from its sharded checkpoint that matches an uninterrupted one bit for bit.

The reference for a 2-rank run is one process that reads both ranks' streams: with ``--grad-accum 2`` each rank
averages the gradients of its 2 micro-batches and DDP/FSDP average over the ranks, so one process stepping on the
mean gradient of rank 0's 2 micro-batches then rank 1's 2 (``--grad-accum 4``) takes the same optimizer steps.
A 2-rank run logs rank 0's loss: the mean of the reference's first 2 micro-batches of each step.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from logitcache.config import ConfigError
from logitcache.distill.train import TrainConfig

#: flags shared by every run here: clipping is active (the tiny student's gradient norm is ~100 at the start),
#: evaluation runs mid-run (FSDP's ranks must forward in lockstep), and accumulation skips the gradient sync
FLAGS = dict(
    batch_size=2,
    grad_accum=2,
    lr=3e-3,
    warmup_steps=1,
    max_steps=4,
    eval_fraction=0.2,
    eval_every=2,
    save_every=2,
    max_grad_norm=1.0,
    loss="ce:1,mlot:0.15",
)


@pytest.fixture(scope="module")
def setup(train_setup):
    return train_setup


def torchrun(setup: dict[str, Path], out: Path, **kw: Any) -> list[dict[str, Any]]:
    """``logitcache train`` in 2 processes; its metrics lines."""
    flags = {**FLAGS, **kw}
    args = ["--cache", str(setup["cache"]), "--student", str(setup["student"]), "--out", str(out)]
    for key, value in flags.items():
        name = "--" + key.replace("_", "-")
        args += [name] if value is True else [] if value is False else [name, str(value)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "logitcache.cli", "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def single_process_reference(setup: dict[str, Path], out: Path) -> list[float]:
    """One process, both ranks' batches per step (rank 0's two, then rank 1's): rank 0's loss at each step."""
    import torch

    from logitcache.distill import train as T
    from logitcache.distill.checkpoint import seed_all
    from logitcache.distill.context import RunContext
    from logitcache.distill.data import Prefetcher
    from logitcache.distill.losses import CombinedLoss
    from logitcache.models import load_model, load_tokenizer

    cfg = TrainConfig(cache=str(setup["cache"]), student=str(setup["student"]), out=str(out), **FLAGS)
    one = RunContext(rank=0, world=1, local_rank=0, device=torch.device("cpu"), bf16=False)
    tokenizer = load_tokenizer(cfg.student)
    data = T.open_inputs(cfg, tokenizer)
    seed_all(cfg.seed)
    model = load_model(cfg.student, dtype="float32", device="cpu")
    model.train()
    data.student_vocab = T._vocab_rows(model)
    loaders = [
        Prefetcher(data.stream(cfg, RunContext(r, 2, r, torch.device("cpu"), False), "train"), 2, data.pad_id)
        for r in range(2)
    ]

    class Interleaved:
        """Rank 0's ``grad_accum`` micro-batches, then rank 1's, per step."""

        def __init__(self) -> None:
            self.n = 0

        def __next__(self) -> Any:
            rank = (self.n // cfg.grad_accum) % 2
            self.n += 1
            return next(loaders[rank])

    totals: list[float] = []
    loss = CombinedLoss(cfg.loss, cfg.loss_configs())

    def recorded(db: Any) -> Any:
        result = loss(db)
        totals.append(float(result.total.detach()))
        return result

    trainer = T._Trainer(dataclasses.replace(cfg, grad_accum=2 * cfg.grad_accum), one, data, model, loss)
    trainer.loss = recorded  # type: ignore[assignment]
    interleaved = Interleaved()
    try:
        for _ in range(cfg.max_steps):
            trainer.step(interleaved)  # type: ignore[arg-type]
    finally:
        for loader in loaders:
            loader.close()
    per_step = 2 * cfg.grad_accum
    return [sum(totals[i : i + cfg.grad_accum]) / cfg.grad_accum for i in range(0, len(totals), per_step)]


def eval_batches_per_rank(setup: dict[str, Path], out: Path) -> list[int]:
    """How many held-out batches each of 2 ranks evaluates with ``FLAGS``."""
    import torch

    from logitcache.distill import train as T
    from logitcache.distill.context import RunContext
    from logitcache.models import load_tokenizer

    cfg = TrainConfig(cache=str(setup["cache"]), student=str(setup["student"]), out=str(out), **FLAGS)
    data = T.open_inputs(cfg, load_tokenizer(cfg.student))
    counts = []
    for r in range(2):
        n = sum(1 for _ in data.stream(cfg, RunContext(r, 2, r, torch.device("cpu"), False), "eval"))
        counts.append(-(-n // cfg.batch_size))
    return counts


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    return single_process_reference(setup, tmp_path_factory.mktemp("reference") / "run")


@pytest.fixture(scope="module")
def ddp_run(setup, tmp_path_factory):
    return torchrun(setup, tmp_path_factory.mktemp("ddp") / "run", parallel="ddp")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_match_one_process_over_the_same_batches(setup, tmp_path, reference, ddp_run, parallel):
    m = ddp_run if parallel == "ddp" else torchrun(setup, tmp_path / "run", parallel=parallel)
    assert [x["step"] for x in m] == [1, 2, 3, 4]
    # precondition: the steps move the model (losses change) and clipping is active (the norm is above 1)
    assert abs(m[-1]["loss"] - m[0]["loss"]) > 0.1 and m[0]["grad_norm"] > 10 * FLAGS["max_grad_norm"]
    # step 1 runs the same weights on the same batches: only the float reduction order can differ
    assert m[0]["loss"] == pytest.approx(reference[0], rel=1e-6)
    # later steps: the gradients are summed in another order (gloo's all-reduce or reduce-scatter vs one
    # process's accumulation), a float32 rounding difference (~1e-7 relative) that AdamW carries into the next
    # losses: measured 4e-8 relative at steps 2 and 4 for both ddp and fsdp; 1e-5 leaves 250x for other BLAS
    # builds and thread counts, and is far below what a wrong reduction (a sum instead of a mean, a skipped
    # sync, clipping per shard) moves the loss (> 1e-2 here)
    for step, (x, ref) in enumerate(zip(m, reference, strict=True), start=1):
        assert x["loss"] == pytest.approx(ref, rel=1e-5), (step, x["loss"], ref)
    # evaluation (every rank its share, summed; FSDP's ranks forward in lockstep) agrees with DDP's; precondition:
    # the ranks hold different numbers of held-out batches, so one of them waits in lockstep with a dummy forward
    counts = eval_batches_per_rank(setup, tmp_path / "counts")
    assert counts[0] != counts[1] and min(counts) > 0, counts
    for x, y in zip(m, ddp_run, strict=True):
        assert ("eval/loss" in x) == ("eval/loss" in y) == (x["step"] % 2 == 0)
        if "eval/loss" in x:
            assert x["eval/loss"] == pytest.approx(y["eval/loss"], rel=1e-6)
            assert x["eval/tokens"] == y["eval/tokens"] > 0


@pytest.mark.timeout(300)
def test_fsdp_resumed_from_its_sharded_checkpoint_matches_an_uninterrupted_run(setup, tmp_path):
    """A run resumed from its step-2 checkpoint logs the same losses at steps 3-4 and exports the same student as
    the run that went on: the sharded checkpoint holds the exact fp32 parameters and AdamW moments of every rank
    (and each rank's stream position and RNG state, as under DDP)."""
    import torch
    from safetensors.torch import load_file

    from logitcache.distill.checkpoint import latest_checkpoint, load_checkpoint
    from logitcache.distill.context import RunContext

    kw = dict(parallel="fsdp", eval_fraction=0.0)
    a = torchrun(setup, tmp_path / "a", **kw)
    # the run stopped after step 2: a's folder as it was then (its step-2 checkpoint, no later one, no summary)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-0000004")
    (tmp_path / "b" / "summary.json").unlink()
    ckpt = latest_checkpoint(tmp_path / "b")
    # precondition: the checkpoint resumed from is step 2's, sharded (one file per rank), without a whole optimizer
    assert ckpt is not None and ckpt.name == "step-0000002"
    assert sorted(p.name for p in (ckpt / "sharded").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert torch.load(ckpt / "trainer.pt", weights_only=False)["optimizer"] is None
    b = torchrun(setup, tmp_path / "b", **kw, resume=True)
    assert [x["step"] for x in b] == [1, 2, 3, 4]
    for x, y in zip(a[2:], b[2:], strict=True):  # steps 3 and 4: computed again from the checkpoint
        assert x["loss"] == y["loss"] and x["grad_norm"] == y["grad_norm"], (x, y)
    # the exported student is a whole save_pretrained folder, and the resumed run's equals the uninterrupted one's
    final_a = load_file(tmp_path / "a" / "checkpoints" / "step-0000004" / "student" / "model.safetensors")
    final_b = load_file(tmp_path / "b" / "checkpoints" / "step-0000004" / "student" / "model.safetensors")
    start = load_file(setup["student"] / "model.safetensors")
    assert final_a.keys() == start.keys() and all(final_a[k].shape == start[k].shape for k in start)
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)
    assert not all(torch.equal(final_a[k], start[k]) for k in start)  # it trained
    # the sharded checkpoint resumes only as fsdp (its optimizer state is not whole)
    ddp = RunContext(rank=0, world=2, local_rank=0, device=torch.device("cpu"), bf16=False, parallel="ddp")
    with pytest.raises(ConfigError, match="--parallel fsdp"):
        load_checkpoint(ddp, ckpt)


#: 2 ranks: the sharded student's LM head weight, read after the root forward (as the fused head does), is the
#: whole weight, and the gradients through it equal one process's over both ranks' halves of the batch
HEAD_SCRIPT = """
import copy, json, sys, torch, torch.distributed as dist
import torch.nn.functional as F
from logitcache.testing.tiny_models import tiny_llama, unigram_tokenizer
from logitcache.distill.parallel import shard
dist.init_process_group("gloo")
rank = dist.get_rank()
ref = tiny_llama(unigram_tokenizer(), seed=1).train()
model = copy.deepcopy(ref)
torch.manual_seed(0)
x = torch.randint(0, 150, (4, 12))

def loss_via_hidden(m, ids):
    kept = []
    hook = m.get_decoder().register_forward_hook(lambda _m, _a, out: kept.append(out.last_hidden_state))
    m(input_ids=ids, logits_to_keep=1)
    hook.remove()
    w = m.get_output_embeddings().weight
    shapes.append([type(w).__name__, list(w.shape)])
    return F.cross_entropy((kept[0] @ w.T)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

shapes = []
shard(model, torch.device("cpu"), 2, bf16=False)
loss_via_hidden(model, x.chunk(2)[rank]).backward()
grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
((loss_via_hidden(ref, x.chunk(2)[0]) + loss_via_hidden(ref, x.chunk(2)[1])) / 2).backward()
diff = max(float((grads[n] - p.grad).abs().max() / p.grad.abs().max()) for n, p in ref.named_parameters())
if rank == 0:
    print(json.dumps({"head": shapes[0], "diff": diff, "sharded_rows": model.lm_head.weight.to_local().shape[0]}))
dist.destroy_process_group()
"""


@pytest.mark.timeout(120)
def test_fsdp_lm_head_weight_is_whole_after_the_forward_and_its_gradient_is_reduced(tmp_path):
    script = tmp_path / "head.py"
    script.write_text(HEAD_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=100)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    vocab = out["head"][1][0]
    assert out["sharded_rows"] == -(-vocab // 2)  # precondition: outside the forward, rank 0 holds half the rows
    assert out["head"][0] == "Parameter" and out["head"][1] == [vocab, 32]  # after the forward: the whole weight
    assert out["diff"] < 1e-5  # float32, 2 ranks: only the reduction order differs
