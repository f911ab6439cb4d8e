"""Stage three: train a student from the cache (``logitcache train``), with no teacher in memory.

One process per rank (plain ``python`` or ``torchrun``; ``distill.context``). Each rank streams its own cache
shards (``distill.data``) joined with the alignment store of the student's tokenizer, runs the student forward
and turns the logits of its loss-span rows into a ``DistillBatch`` (``distill.batch``), and applies the weighted
losses (``distill.losses``). AdamW with warmup and cosine/linear decay, gradient accumulation, clipping, bf16
autocast on GPU. Every ``--eval-every`` steps the held-out split gives loss and perplexity
(``heldout_metrics``); every ``--save-every`` steps a checkpoint (``distill.checkpoint``) holds what
``--resume`` needs to continue the same stream and reproduce an uninterrupted run's losses on CPU.

``--teacher M`` recomputes the teacher rows online (same K, same sequences) instead of reading them, for honest
offline-vs-online comparisons. The scorer is injected (``run_train(cfg, teacher_scorer=...)``; the CLI passes
``pipeline.backend_hf.score_rows``), so ``distill`` never imports ``pipeline``.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from logitcache.config import ConfigError
from logitcache.storage import LogitCache, PositionRows
from logitcache.storage.alignment_store import AlignmentStore, list_stores, store_key

from .batch import CollatedBatch, Example, student_forward
from .checkpoint import (
    Resumed,
    check_resume,
    checkpoint_step,
    data_identity,
    latest_checkpoint,
    load_checkpoint,
    prepare_out,
    restore_training_state,
    save_checkpoint,
    seed_all,
    truncate_metrics,
    write_run_files,
)
from .context import RunContext
from .data import ExampleStream, Prefetcher, student_end_id
from .diagnostics import term_grad_norms
from .integrity import StudentLimits
from .losses import LOSSES, CombinedLoss, check_statistics, parse_loss_spec
from .memory import MemoryEstimate, estimate_memory, is_oom, measured_peak, oom_message
from .train_config import TrainConfig

__all__ = ["TeacherScorer", "TrainConfig", "heldout_metrics", "latest_checkpoint", "lr_factor", "run_train"]

#: online mode's teacher: ``(model, token_ids, prompt_lens, k, extra_temperatures=...) -> rows per sequence``
#: (``logitcache.pipeline.backend_hf.score_rows``)
TeacherScorer = Callable[..., Sequence[PositionRows]]




@dataclass
class TrainData:
    """What a run reads: the cache, the student's alignment store, and the student tokenizer's special ids."""

    cache: LogitCache
    store: AlignmentStore
    same_vocab: bool  # teacher and student share one vocabulary
    pad_id: int
    eos_id: int | None
    student_vocab: int | None = None  # the student model's vocabulary (set once it is loaded)

    @property
    def temperatures(self) -> list[float]:
        return list(self.cache.header.extra_temperatures)

    def stream(
        self, cfg: TrainConfig, ctx: RunContext, split: str, state: dict[str, int] | None = None
    ) -> ExampleStream:
        """The rank's example stream of ``split`` ("train" from a resume position, or "eval")."""
        state = state or {}
        return ExampleStream(
            self.cache,
            self.store,
            rank=ctx.rank,
            world_size=ctx.world,
            seed=cfg.seed,
            split=split,
            heldout_fraction=cfg.eval_fraction,
            max_length=cfg.max_length,
            eos_id=self.eos_id,
            epoch=state.get("epoch", 0),
            offset=state.get("offset", 0),
            limits=StudentLimits(self.student_vocab, self.same_vocab and _indexes_by_teacher_ids(cfg.loss)),
        )


def _indexes_by_teacher_ids(loss: str) -> bool:
    """Whether a loss of ``--loss`` reads the student's logits at the teacher's ids (kl, rkl)."""
    return any(name in ("kl", "rkl") for name, _ in parse_loss_spec(loss))


def open_inputs(cfg: TrainConfig, tokenizer: Any) -> TrainData:
    """The cache (verified), the student's alignment store, and whether teacher and student share a vocabulary."""
    from logitcache.models import pad_token_id
    from logitcache.storage import verify_cache, verify_store
    from logitcache.tokenization import tokenizer_fingerprint

    cache = LogitCache.open(cfg.cache)
    fingerprint = tokenizer_fingerprint(tokenizer)
    key = store_key(fingerprint)
    if key not in list_stores(cache):
        others = ", ".join(list_stores(cache)) or "none"
        raise ConfigError(
            f"--cache {cfg.cache} has no alignment store for the student's tokenizer ({key}; stores: "
            f"{others}); run `logitcache align {cfg.cache} --student-tokenizer {cfg.student}` first"
        )
    if cfg.verify != "none":  # the cache and the student's own store: another student's unfinished store is no fault
        problems = verify_cache(cfg.cache, level=cfg.verify, stores=False)
        problems += verify_store(cache, key, cfg.verify)
        if problems:
            raise ConfigError(
                f"--cache {cfg.cache} fails verify ({len(problems)} problems; first: {problems[0]}); "
                f"run `logitcache verify {cfg.cache} --level {cfg.verify}` for all of them"
            )
    store = AlignmentStore.open(cache, key)
    if store.header["student"]["tokenizer_fingerprint"] != fingerprint:
        raise ConfigError(
            f"alignments/{key} was made for another tokenizer than the student's; rerun "
            f"`logitcache align {cfg.cache} --student-tokenizer {cfg.student} --overwrite`"
        )
    teacher_fp = cache.header.metadata.get("teacher", {}).get("tokenizer_fingerprint")
    same_vocab = teacher_fp == fingerprint
    for name, _ in parse_loss_spec(cfg.loss):
        if name in ("kl", "rkl") and not same_vocab:
            raise ConfigError(
                f"--loss {name}: KL needs the teacher's vocabulary, but the student's tokenizer differs "
                "from the teacher's; use uld, mlot or alm for cross-tokenizer distillation"
            )
    check_statistics(
        cfg.loss, cfg.loss_configs(), cache.header.extra_temperatures, cache.header.tail_samples, cfg.fused_head
    )
    eos_id, source = student_end_id(store.header, tokenizer)
    if source != "store":
        print(
            f"note: alignments/{key} predates student_end_token; the end row trains the tokenizer's EOS "
            f"({eos_id}); rerun `logitcache align {cfg.cache} --student-tokenizer {cfg.student} --overwrite` "
            "to train the student's turn end",
            file=sys.stderr,
        )
    pad_id = pad_token_id(tokenizer)
    return TrainData(cache, store, same_vocab, pad_id, eos_id)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay


def refresh_teacher_rows(
    scorer: TeacherScorer, teacher: Any, examples: list[Example], batch: CollatedBatch, k: int, temps: list[float]
) -> None:
    """Online mode: overwrite the batch's cached teacher rows (and lse, and tail draws when the cache has them:
    fresh ones, seeded by the batch's first sample id) with freshly computed ones."""
    n_tail = 0 if batch.teacher_tail_ids is None else int(batch.teacher_tail_ids.shape[-1])
    draws = {"tail_samples": n_tail, "seed": int(examples[0].sample_id)} if n_tail else {}
    with torch.inference_mode():
        rows = scorer(
            teacher,
            [e.teacher_token_ids for e in examples],
            [e.teacher_prompt_len for e in examples],
            k,
            extra_temperatures=temps,
            **draws,
        )
    for b, r in enumerate(rows):
        batch.set_teacher_rows(b, r)


def heldout_metrics(
    ctx: RunContext, cfg: TrainConfig, model: Any, data: TrainData, loss: CombinedLoss
) -> dict[str, float]:
    """Loss, CE and perplexity of the student on the held-out split (every rank its share, summed over ranks)."""
    sums = [0.0, 0.0, 0.0, 0.0]  # ce * tokens, tokens, total * sequences, sequences
    model.eval()
    loader = Prefetcher(data.stream(cfg, ctx, "eval"), cfg.batch_size, data.pad_id, cfg.prefetch)
    try:
        with torch.no_grad():
            for n, (item, real) in enumerate(ctx.lockstep(loader)):
                if cfg.eval_batches is not None and n >= cfg.eval_batches:
                    break
                if item is None or not real:  # this rank is done, the others' forwards still need it
                    ctx.idle_forward(model)
                    continue
                batch = item[0]
                with ctx.autocast():
                    db = student_forward(
                        model, batch, same_vocab=data.same_vocab, fused=cfg.fused_head, head_chunk=cfg.head_chunk
                    )
                out = loss(db)
                ce = LOSSES["ce"](db)  # the token-mean CE: value x count = the sum (fused head or not)
                sums[0] += float(ce.value) * float(ce.count.sum())
                sums[1] += float(db.student_mask.sum())
                sums[2] += float(out.total) * batch.batch_size
                sums[3] += batch.batch_size
    finally:
        loader.close()
    model.train()
    s = ctx.all_sum(sums)
    if s[1] == 0:
        return {}
    return {
        "eval/ce": s[0] / s[1],
        "eval/ppl": math.exp(min(s[0] / s[1], 50)),
        "eval/loss": s[2] / max(s[3], 1),
        "eval/tokens": s[1],
    }


def _prepare_out(cfg: TrainConfig, ctx: RunContext, identity: dict[str, Any]) -> Path | None:
    """Check ``--out`` against ``--resume``/``--overwrite``; the checkpoint to resume from, if any."""
    out = Path(cfg.out)
    return prepare_out(
        out, ctx, resume=cfg.resume, overwrite=cfg.overwrite, check=lambda: check_resume(cfg, out, identity)
    )


class _Trainer:
    """One run's moving parts; ``step()`` is one optimizer step over ``grad_accum`` micro-batches."""

    def __init__(
        self,
        cfg: TrainConfig,
        ctx: RunContext,
        data: TrainData,
        model: Any,
        loss: CombinedLoss,
        teacher: tuple[Any, TeacherScorer] | None = None,
    ) -> None:
        self.cfg, self.ctx, self.data, self.model, self.loss = cfg, ctx, data, model, loss
        self.teacher, self.scorer = teacher or (None, None)
        self.ddp = ctx.wrap(model)
        # fused: one kernel over all parameters (CPU and GPU); the per-tensor loop costs ~1 s/step for 135M on CPU
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg))
        self.step_no, self.stream_state = 0, {"epoch": 0, "offset": 0}
        self.samples: list[int] = []
        self.tokens_seen = 0  # this rank's student completion tokens in this segment (since start or resume)
        self.t0 = time.perf_counter()  # the segment's start
        self.before: dict[str, float] = {}  # the run's totals up to the checkpoint resumed from
        self.estimate: MemoryEstimate | None = None  # the memory estimate printed before the first step
        self.peak: float | None = None  # the measured peak (bytes), after the first steps

    def resume(self, state: Resumed) -> None:
        restore_training_state(state, self.ddp, self.optimizer)
        self.scheduler.load_state_dict(state.scheduler)
        self.step_no, self.stream_state = state.step, state.stream
        self.before = dict(state.totals)

    def totals(self) -> dict[str, float]:
        """The whole run's student completion tokens (all ranks) and seconds so far (a collective)."""
        tokens = self.ctx.all_sum([float(self.tokens_seen)])[0]
        return {
            "tokens": self.before.get("tokens", 0.0) + tokens,
            "seconds": self.before.get("seconds", 0.0) + time.perf_counter() - self.t0,
        }

    def step(self, loader: Prefetcher) -> dict[str, float]:
        cfg, logs, step_tokens = self.cfg, {}, 0
        for micro in range(cfg.grad_accum):
            batch, self.stream_state, examples = next(loader)
            if self.teacher is not None:
                assert self.scorer is not None and examples is not None
                temps = self.data.temperatures
                refresh_teacher_rows(self.scorer, self.teacher, examples, batch, self.data.cache.top_k, temps)
            self.samples += batch.sample_ids.tolist()
            with self.ctx.accumulating(self.ddp, sync=micro == cfg.grad_accum - 1), self.ctx.autocast():
                db = student_forward(
                    self.ddp, batch, same_vocab=self.data.same_vocab, fused=cfg.fused_head, head_chunk=cfg.head_chunk
                )
                result = self.loss(db)
            if micro == 0 and cfg.grad_norm_every and (self.step_no + 1) % cfg.grad_norm_every == 0:
                logs.update(term_grad_norms(db, result, self.loss.configs))  # issue 14: each term's pull
            (result.total / cfg.grad_accum).backward()
            step_tokens += int(db.student_mask.sum())
            for key, v in result.log().items():
                logs[key] = logs.get(key, 0.0) + v / cfg.grad_accum
        grad_norm = (
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
            if cfg.max_grad_norm > 0
            else torch.tensor(0.0)
        )
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_no += 1
        self.tokens_seen += step_tokens
        lr = self.scheduler.get_last_lr()[0]
        logs.update({"step": self.step_no, "lr": lr, "grad_norm": float(grad_norm), "tokens": step_tokens})
        return logs

    def report_peak(self, step: int) -> float:
        """Print the measured peak memory so far (main rank, stderr); returns it in bytes."""
        peak, what = measured_peak(self.ctx.device)
        if self.ctx.is_main:
            est = f" (estimated ~{self.estimate.total / 2**30:.2f} GiB)" if self.estimate is not None else ""
            tqdm.write(f"measured peak memory after {step} steps: {peak / 2**30:.2f} GiB ({what}){est}", sys.stderr)
        return peak

    def save(self, out: Path, tokenizer: Any) -> Path:
        """A checkpoint after this step (every rank calls it)."""
        return save_checkpoint(
            self.ctx,
            out,
            self.step_no,
            self.ddp,
            tokenizer,
            self.optimizer,
            self.scheduler,
            self.stream_state,
            self.cfg.keep_checkpoints,
            self.totals(),
        )

    def run(self, loader: Prefetcher, out: Path, tokenizer: Any) -> dict[str, float]:
        """Step until ``--max-steps``: log, evaluate and checkpoint on schedule; returns the last step's logs."""
        cfg, ctx = self.cfg, self.ctx
        metrics_file = open(out / "metrics.jsonl", "a") if ctx.is_main else None  # noqa: SIM115
        bar = tqdm(
            total=cfg.max_steps,
            initial=self.step_no,
            desc="train",
            unit="step",
            disable=not ctx.is_main,
            dynamic_ncols=True,
        )
        last: dict[str, float] = {}
        report_at = min(self.step_no + 2, cfg.max_steps)  # the measured peak, after the first steps of this segment
        try:
            while self.step_no < cfg.max_steps:
                try:
                    logs = self.step(loader)
                except Exception as e:
                    if not is_oom(e):
                        raise
                    msg = oom_message(self.step_no, cfg.batch_size, cfg.max_length, self.estimate, e)
                    raise ConfigError(msg) from None
                step = self.step_no
                if step == report_at:
                    self.peak = self.report_peak(step)
                    logs["peak_memory_gib"] = self.peak / 2**30
                # student completion tokens (the loss-span targets) per second, this segment, all ranks
                logs["tokens_per_s"] = self.tokens_seen * ctx.world / max(time.perf_counter() - self.t0, 1e-9)
                if cfg.eval_every and step % cfg.eval_every == 0 and cfg.eval_fraction > 0:
                    logs.update(heldout_metrics(ctx, cfg, self.ddp, self.data, self.loss))
                if metrics_file is not None and (step % cfg.log_every == 0 or step == cfg.max_steps):
                    metrics_file.write(json.dumps(logs) + "\n")
                    metrics_file.flush()
                bar.update(1)
                bar.set_postfix(_postfix(logs))
                last = logs
                if step % cfg.save_every == 0 or step == cfg.max_steps:
                    self.save(out, tokenizer)
        finally:
            bar.close()
            if metrics_file is not None:
                metrics_file.close()
        return last


def _postfix(logs: dict[str, float]) -> dict[str, str]:
    losses = {
        k.removeprefix("loss/"): f"{v:.3g}"
        for k, v in logs.items()
        if k == "loss" or (k.count("/") == 1 and k.startswith("loss/"))
    }
    return losses | {"student tok/s": f"{logs['tokens_per_s']:.0f}"}


def _vocab_rows(model: Any) -> int:
    """How many ids the student can take as input and score (its embedding and output rows)."""
    rows = [int(model.get_input_embeddings().weight.shape[0])]
    head = model.get_output_embeddings()
    if head is not None:
        rows.append(int(head.weight.shape[0]))
    return min(rows)


def _finished_summary(ctx: RunContext, out: Path, checkpoint: Path, cfg: TrainConfig) -> dict[str, Any]:
    """``--resume`` of a run that already reached ``--max-steps``: its summary, untouched (rebuilt from the final
    checkpoint's totals if a kill came between that checkpoint and the summary)."""
    path = out / "summary.json"
    if path.exists():
        summary = json.loads(path.read_text())
    else:
        totals = torch.load(checkpoint / "trainer.pt", weights_only=False).get("totals", {})
        summary = {
            "steps": checkpoint_step(checkpoint),
            "seconds": totals.get("seconds", 0.0),
            "tokens": int(totals.get("tokens", 0)),
            "last": {},
            "eval": {},
            "checkpoint": str(checkpoint),
            "totals_complete": bool(totals),
        }
        if ctx.is_main:
            path.write_text(json.dumps(summary, indent=2) + "\n")
    return {**summary, "already_finished": True, "max_steps": cfg.max_steps}


def _print_estimate(cfg: TrainConfig, ctx: RunContext, model: Any) -> MemoryEstimate:
    """The memory estimate (``distill.memory``), printed on the main rank before the first step."""
    if cfg.fused_head:
        from .fused_head import head_parts

        try:
            head_parts(model)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    est = estimate_memory(
        model,
        batch_size=cfg.batch_size,
        max_length=cfg.max_length,
        bf16=ctx.bf16,
        checkpointing=cfg.gradient_checkpointing,
        fused=cfg.fused_head,
        head_chunk=cfg.head_chunk,
        attn=getattr(model.config, "_attn_implementation", None),
        shards=ctx.world if getattr(cfg, "parallel", "ddp") == "fsdp" else 1,
        device_type=ctx.device.type,
    )
    if ctx.is_main:
        print(est.line(cfg.batch_size, cfg.max_length, cfg.gradient_checkpointing), file=sys.stderr)
    return est


def run_train(cfg: TrainConfig, teacher_scorer: TeacherScorer | None = None) -> dict[str, Any]:
    """Train; returns the final summary (rank 0's view). ``teacher_scorer``: online mode's scorer (``--teacher``)."""
    from logitcache.models import load_model, load_tokenizer

    if cfg.teacher and teacher_scorer is None:
        raise ConfigError(
            "--teacher: online mode needs a teacher scorer; run `logitcache train --teacher ...` or pass "
            "run_train(cfg, teacher_scorer=logitcache.pipeline.backend_hf.score_rows)"
        )
    ctx = RunContext.setup(cfg.device, cfg.dtype, cfg.threads, cfg.parallel)
    out = Path(cfg.out)
    tokenizer = load_tokenizer(cfg.student)
    data = open_inputs(cfg, tokenizer)
    identity = data_identity(data.cache, data.store)
    resume_from = _prepare_out(cfg, ctx, identity)
    if resume_from is not None and checkpoint_step(resume_from) >= cfg.max_steps:
        return _finished_summary(ctx, out, resume_from, cfg)
    seed_all(cfg.seed + ctx.rank)
    student = str(resume_from / "student") if resume_from else cfg.student
    # FSDP: loaded on the CPU, each block moved to the device as it is sharded (one block at a time there)
    device = "cpu" if ctx.parallel == "fsdp" else ctx.device
    model = load_model(student, dtype="float32", device=device, attn_implementation=cfg.attn_implementation)
    if cfg.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ConfigError(f"--gradient-checkpointing: {cfg.student} does not support it; train without it")
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    data.student_vocab = _vocab_rows(model)
    teacher = None
    if cfg.teacher and teacher_scorer is not None:
        # the teacher runs in the student's compute dtype (bf16 on GPU), as an online setup would
        dtype = "bfloat16" if ctx.device.type == "cuda" else "float32"
        teacher = (load_model(cfg.teacher, dtype=dtype, device=ctx.device), teacher_scorer)
    trainer = _Trainer(cfg, ctx, data, model, CombinedLoss(cfg.loss, cfg.loss_configs()), teacher)
    trainer.estimate = _print_estimate(cfg, ctx, model)
    if resume_from is not None:
        trainer.resume(load_checkpoint(ctx, resume_from))
    if ctx.is_main:
        write_run_files(cfg, out, identity)
        truncate_metrics(out / "metrics.jsonl", trainer.step_no)
    stream = data.stream(cfg, ctx, "train", trainer.stream_state)
    loader = Prefetcher(stream, cfg.batch_size, data.pad_id, cfg.prefetch, keep_examples=trainer.teacher is not None)
    trainer.t0 = time.perf_counter()
    try:
        last = trainer.run(loader, out, tokenizer)
    finally:
        loader.close()
    step = trainer.step_no
    final_eval = {}
    if cfg.eval_fraction > 0 and not (cfg.eval_every and step % cfg.eval_every == 0):
        final_eval = heldout_metrics(ctx, cfg, trainer.ddp, data, trainer.loss)
    with open(out / f"samples-rank{ctx.rank}.txt", "a") as f:
        f.write("".join(f"{s}\n" for s in trainer.samples))
    totals = trainer.totals()  # the whole run's, resumed segments included
    summary = {
        "steps": step,
        "seconds": totals["seconds"],
        "tokens": int(totals["tokens"]),
        "last": last,
        "eval": final_eval or {k: v for k, v in last.items() if k.startswith("eval/")},
        "checkpoint": str(latest_checkpoint(out)),
        "skipped_overlong": stream.skipped_overlong,
        "teacher_loaded": trainer.teacher is not None,
        "memory": {
            "estimated_peak_gib": trainer.estimate.total / 2**30 if trainer.estimate is not None else None,
            "measured_peak_gib": trainer.peak / 2**30 if trainer.peak is not None else None,
        },
        # a run resumed from a checkpoint written before totals were kept counts only what came after it
        "totals_complete": resume_from is None or bool(trainer.before),
    }
    if ctx.is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
