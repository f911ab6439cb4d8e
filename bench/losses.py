"""Forward+backward time of each distillation loss next to a student cross-entropy step, in one run.

    python bench/losses.py                      # [8, 512] x 49,152 student vocab, K = 64, CPU
    python bench/losses.py --batch 2 --seq 128  # quick look
    python bench/losses.py --no-model-step      # skip the (slow on CPU) SmolLM2-135M training step

Rows (all on the same batch; median of ``--reps`` interleaved runs after one warm-up; the dense baselines
and the model step: one run each). Times are process CPU time with one torch thread unless ``--wall``:
on a shared machine that measures our work, not the neighbours'.
- ``ce (torch)``: ``F.cross_entropy`` over the logits, forward + backward (the loss-only CE step);
- each registered loss alone (our implementation), forward + backward w.r.t. the logits;
- ``ce+X``: the CombinedLoss ``ce:1,X:w`` (shares the student statistics), and its marginal cost over ``ce``;
- ``dense uld`` / ``dense mlot``: straightforward implementations that softmax and **sort the full vocabulary
  per token** (as the released ULD / MultiLevelOT code does), on the same data;
- ``model step``: SmolLM2-135M's architecture (random weights, no download) forward + backward with CE on the
  same [B, T] tokens: the student training step that a distillation loss is added to.
Then the autograd memory (bytes of tensors saved for backward) of ``mlot``'s Sinkhorn term vs N, with and
without ``detach_plan``.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from logitcache.distill.batch import Example, collate, distill_batch
from logitcache.distill.losses import LOSSES, CombinedLoss, DistillBatch, MLOTConfig, sinkhorn_plan
from logitcache.storage import PositionRows


def make_batch(b: int, t: int, v: int, vt: int, k: int, seed: int = 0) -> DistillBatch:
    """Random but LM-shaped data: peaked student logits, teacher top-K rows from a peaked distribution; built as
    training builds it (``Example``s with the cache's ``PositionRows``, ``collate``, ``distill_batch``)."""
    g = torch.Generator().manual_seed(seed)
    tl = torch.randn(b, t, k + 1, generator=g) * 3.0
    lp = torch.log_softmax(tl, -1)[..., :k].sort(-1, descending=True).values  # leaves some tail mass
    ids = torch.stack([torch.randperm(vt, generator=g)[:k] for _ in range(b * t)]).view(b, t, k)
    tgt = torch.randint(0, v, (b, t), generator=g)
    # index pairs are the default; also give "aligned" pairs (every row) and one chunk per row
    ar = np.arange(t)
    pairs, chunks = np.stack([ar, ar], -1), np.stack([ar, ar + 1, ar, ar + 1], -1)
    examples = []
    for i in range(b):
        # the row statistics a default capture records (mlot's tau_SD = 2 needs them): lse of the K + 1 logits
        lse = {tau: torch.logsumexp(tl[i] / tau, -1).numpy() for tau in (1.0, 2.0)}
        rows = PositionRows(ids[i].numpy(), lp[i].numpy(), ids[i, :, 0].numpy(), lp[i, :, 0].numpy(), lse)
        targets = tgt[i].numpy()
        examples.append(
            Example(i, np.concatenate([[0], targets]), 1, targets, rows, pairs, chunks, np.zeros(0, np.int64), 0)
        )
    batch = collate(examples, pad_id=0, k=k, temperatures=[1.0, 2.0])
    logits = torch.randn(b, batch.logits_to_keep, v, generator=g) * 3.0  # the student forward's, position 0 on
    return distill_batch(batch, logits, same_vocab=vt <= v)


# CPU time of this process: with --threads 1 it measures our work and not the other tenants of the machine
CLOCK = time.process_time


def timeit(fn: Callable[[], None], reps: int, warmup: bool = True) -> float:
    if warmup:
        fn()
    times = []
    for _ in range(reps):
        gc.collect()
        t0 = CLOCK()
        fn()
        times.append(CLOCK() - t0)
    return statistics.median(times)


def timeit_interleaved(cases: dict[str, Callable[[], None]], reps: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in cases}
    for fn in cases.values():
        fn()  # warm-up
    for _ in range(reps):
        for k, fn in cases.items():
            gc.collect()
            t0 = CLOCK()
            fn()
            times[k].append(CLOCK() - t0)
            print(f"  {k:<22s} {times[k][-1] * 1e3:9.1f} ms", file=sys.stderr)
    return {k: statistics.median(v) for k, v in times.items()}


def fwd_bwd(batch: DistillBatch, loss_fn: Callable[[DistillBatch], torch.Tensor]) -> Callable[[], None]:
    base = batch.student_logits

    def run() -> None:
        z = base.detach().requires_grad_(True)
        b = DistillBatch(**{**batch.__dict__, "student_logits": z})
        loss_fn(b).backward()
        del z

    return run


# ---- dense baselines (full softmax + full per-token sort, as the released code) ---------------------------


def dense_teacher(batch: DistillBatch, v: int) -> torch.Tensor:
    """The cached rows scattered into a dense [B, T, V] probability tensor (built once, outside the timing).
    Teacher ids are folded into the student's V columns (id mod V): the baselines only need the right shape
    and sparsity for timing."""
    b, t, _ = batch.teacher_topk_ids.shape
    dense = torch.zeros(b, t, v)
    return dense.scatter_(2, batch.teacher_topk_ids % v, batch.teacher_topk_logprobs.exp())


def dense_uld(batch: DistillBatch, teacher: torch.Tensor) -> torch.Tensor:
    s = torch.softmax(batch.student_logits.float(), -1).sort(-1, descending=True).values
    t = teacher.sort(-1, descending=True).values
    return (s - t).abs().sum(-1).mean()


def dense_mlot(batch: DistillBatch, teacher: torch.Tensor, cfg: MLOTConfig) -> torch.Tensor:
    z = batch.student_logits.float()
    k = cfg.k

    def ranked(p: torch.Tensor) -> torch.Tensor:  # per-token full sort, then the sequence-level order
        p = p.sort(-1, descending=True).values
        order = torch.argsort(p.sum(1), dim=-1, descending=True)[:, :k]
        return p.gather(2, order[:, None, :].expand(-1, p.shape[1], -1))

    s1, t1 = ranked(torch.softmax(z, -1)), ranked(teacher)
    had = (t1 - s1).abs().sum(-1).mean()
    sl = -(t1 * torch.log(s1.clamp_min(1e-30))).sum(-1).mean()
    t2 = ranked(torch.softmax(torch.log(teacher.clamp_min(1e-30)) / cfg.tau_sd, -1))
    s2 = ranked(torch.softmax(z / cfg.tau_sd, -1))
    cost = torch.cdist(t2, s2, p=1)
    m = torch.ones(cost.shape[:2], dtype=torch.bool)
    plan = sinkhorn_plan(cost, m, m, cfg.sinkhorn_lambda, cfg.sinkhorn_iters)
    return had + cfg.beta * sl + cfg.gamma * (plan * cost).sum((1, 2)).mean()


def model_step(b: int, t: int, v: int, reps: int) -> float | None:
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:  # pragma: no cover
        return None
    cfg = LlamaConfig(  # SmolLM2-135M's shape
        vocab_size=v,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=max(2048, t),
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    ids = torch.randint(0, v, (b, t))

    def run() -> None:
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids)
        F.cross_entropy(out.logits.float().reshape(-1, v), ids.reshape(-1)).backward()

    return timeit(run, reps, warmup=False)


def sinkhorn_memory(batch: DistillBatch, iters: list[int]) -> list[tuple[int, float, float]]:
    """MiB of the distinct storages autograd keeps for backward of ``mlot`` (the logits themselves included)."""
    rows = []
    for n in iters:
        mb = []
        for detach in (False, True):
            seen: dict[int, int] = {}

            def pack(x: torch.Tensor, seen=seen) -> torch.Tensor:
                st = x.untyped_storage()
                seen[st.data_ptr()] = st.nbytes()
                return x

            z = batch.student_logits.detach().requires_grad_(True)
            b = DistillBatch(**{**batch.__dict__, "student_logits": z})
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
                out = LOSSES["mlot"](b, MLOTConfig(sinkhorn_iters=n, detach_plan=detach))
            del out
            mb.append(sum(seen.values()) / 2**20)
        rows.append((n, mb[0], mb[1]))
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--teacher-vocab", type=int, default=262144, help="range of the cached teacher ids")
    ap.add_argument("--k", type=int, default=64, help="cached top-K")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--model-step", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--dense", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: leave as is)")
    ap.add_argument("--wall", action="store_true", help="time wall-clock instead of process CPU time")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.wall:
        global CLOCK
        CLOCK = time.perf_counter
    b, t, v = args.batch, args.seq, args.vocab
    clock = "wall-clock" if args.wall else "process CPU time"
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {clock}; [{b}, {t}], V {v}, K {args.k}")
    cross = make_batch(b, t, v, args.teacher_vocab, args.k)
    cross.same_vocab = False

    def ce_torch(bb: DistillBatch) -> torch.Tensor:
        return F.cross_entropy(bb.student_logits.reshape(-1, v), bb.student_targets.reshape(-1))

    same = make_batch(b, t, v, v, args.k)  # kl needs ids in the student vocabulary
    same.same_vocab = True
    cases: dict[str, Callable[[], None]] = {"ce (torch)": fwd_bwd(cross, ce_torch)}
    for name in LOSSES:
        data = same if name in ("kl", "rkl") else cross
        cases[name] = fwd_bwd(data, lambda bb, n=name: LOSSES[n](bb).value)
    cases["mlot (detach_plan)"] = fwd_bwd(cross, lambda bb: LOSSES["mlot"](bb, MLOTConfig(detach_plan=True)).value)
    for name, w in (("uld", 1.0), ("mlot", 0.15), ("alm", 1.0)):
        comb = CombinedLoss(f"ce:1,{name}:{w}")
        cases[f"ce+{name}"] = fwd_bwd(cross, lambda bb, c=comb: c(bb).total)
    dense_cases: dict[str, Callable[[], None]] = {}
    if args.dense:
        teacher = dense_teacher(cross, v)
        dense_cases["uld"] = fwd_bwd(cross, lambda bb: dense_uld(bb, teacher))
        dense_cases["mlot"] = fwd_bwd(cross, lambda bb: dense_mlot(bb, teacher, MLOTConfig()))
    # interleaved repetitions: background load hits every case alike
    results = timeit_interleaved(cases, args.reps)
    # the slow references: one run each (they take seconds to minutes; a warm-up changes nothing visible)
    dense = {k: timeit(f, 1, warmup=False) for k, f in dense_cases.items()}
    dense_cases.clear()
    gc.collect()
    step = model_step(b, t, v, 1) if args.model_step else None

    ce_step = results["ce (torch)"]
    print()
    hdr = "| loss | fwd+bwd (ms) | / CE loss step | / model CE step | dense sort / ours |"
    print(hdr)
    print("|---|---:|---:|---:|---:|")
    if step is not None:
        print(f"| model step (SmolLM2-135M arch, CE) | {step * 1e3:.0f} | {step / ce_step:.2f} | 1.00 | |")
    for name, sec in results.items():
        row = f"| {name} | {sec * 1e3:.1f} | {sec / ce_step:.3f} | "
        row += f"{sec / step:.3f} | " if step else "- | "
        row += f"{dense[name] / sec:.1f}x |" if name in dense else " |"
        print(row)
    for name in ("uld", "mlot", "alm"):
        marginal = results[f"ce+{name}"] - results["ce"]
        extra = f"{marginal / step:.3f}" if step else "-"
        print(f"| ce+{name} minus ce (marginal) | {marginal * 1e3:.1f} | {marginal / ce_step:.3f} | {extra} | |")
    for name, sec in dense.items():
        extra = f"{sec / step:.3f}" if step else "-"
        print(f"| dense {name} (full sort per token) | {sec * 1e3:.1f} | {sec / ce_step:.3f} | {extra} | |")

    print("\nmlot autograd memory (MiB of distinct storages saved for backward, logits included) vs Sinkhorn N:")
    print("| N | backprop through iterations | detach_plan=True |")
    print("|---:|---:|---:|")
    for n, full, det in sinkhorn_memory(cross, [5, 20, 50]):
        print(f"| {n} | {full:.0f} | {det:.0f} |")


if __name__ == "__main__":
    main()
