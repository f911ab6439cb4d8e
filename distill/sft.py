"""Plain supervised fine-tuning from a JSONL (``logitcache sft``): no cache, no teacher.

What users need for the SFT baseline a distilled student must beat, and to fine-tune a teacher on the task before
capturing it. Everything that gives a record its meaning is shared with the rest of the tool, not restated:

- records are read by ``logitcache.inputs.read_inputs`` (score mode: a response is required; errors name file,
  line and field) and rendered and tokenized by ``logitcache.prompts.prepare`` exactly as ``generate --mode
  score`` and ``eval`` do: the chat template (``--chat-template auto|none|FILE``, ``--system-prompt``), or the
  raw prompt for a model without one (a base GGUF), the response starting at a token boundary, and the token
  that ends the model's turn (``prompts.score_end_token``: the template's turn end such as ``<|im_end|>``, else
  the EOS) appended, so the model learns to stop where ``eval`` decodes to. The loss covers only the response
  tokens and that end token (token-mean cross-entropy), never the prompt.
- records longer than ``--max-length`` are skipped and counted (``skipped_overlong`` in the summary), not cut:
  a cut response would teach the model to stop mid-answer or never.
- held-out records are chosen by ``sampling.is_heldout`` (a hash of the record index and seed); the records
  form pseudo-shards (``record_shards``: one per rank, or ``--shard-size`` contiguous records, as ``generate``
  cuts a cache) and their order is ``sampling.rank_order``, a pure function of (data, seed, epoch, world size,
  shard size): with ``--shard-size`` equal to the cache's, ``train`` on that cache sees the records in the
  same order, for paired SFT-vs-distillation comparisons. Training is step-based (``--max-steps``, or
  ``--epochs`` turned into steps); the resume state is two integers per rank, ``(epoch, offset)``.
- the schedule is ``train.lr_factor`` (warmup, then cosine/linear/constant), AdamW, gradient clipping and
  accumulation, bf16 autocast on GPU (``RunContext``, which also runs DDP under torchrun); checkpoints are
  ``distill.checkpoint``'s layout (``checkpoints/step-N/student`` is a ``save_pretrained`` folder), and
  ``OUT/final`` links to the last one. ``--resume`` refuses changed run-defining flags and a data file whose
  content (``inputs.input_fingerprint``) differs from the run's.

Trade-off: the whole data set is tokenized up front (seconds for tens of thousands of records), which makes the
overlong count, the epoch size and ``--epochs`` exact before the first step; a corpus too large for memory is
what ``generate`` + ``train`` with a cache are for.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from logitcache.config import ConfigError, flag, to_dict
from logitcache.inputs import InputError, input_fingerprint, read_inputs

from .checkpoint import (
    checkpoint_step,
    latest_checkpoint,
    load_checkpoint,
    prepare_out,
    save_checkpoint,
    seed_all,
    truncate_metrics,
    write_run_files,
)
from .context import RunContext
from .sampling import check_world, is_heldout, rank_epoch_size, rank_order
from .sft_config import SFTConfig
from .train import lr_factor

__all__ = ["SFTConfig", "SFTExample", "collate", "encode_records", "record_shards", "response_loss", "run_sft",
           "sample_stream"]

#: flags a resumed run must share with the run it resumes (the data file is checked by content)
RESUME_FIELDS = (
    "model", "chat_template", "system_prompt", "prompt_field", "messages_field", "response_field", "id_field",
    "limit", "batch_size", "grad_accum", "lr", "weight_decay", "warmup_steps", "schedule", "min_lr_ratio",
    "max_grad_norm", "max_length", "seed", "eval_fraction", "shard_size",
)


@dataclass
class SFTExample:
    """One record, tokenized: ``ids`` = prompt + response + end token; the loss covers ``ids[prompt_len:]``."""

    sample_id: int
    ids: np.ndarray
    prompt_len: int


@dataclass
class Encoded:
    train: list[SFTExample]
    heldout: list[SFTExample]
    skipped_overlong: int
    end_token: dict[str, Any] | None
    n_records: int


def encode_records(cfg: SFTConfig, tokenizer: Any) -> Encoded:
    """Every record of ``--data`` rendered and tokenized as ``generate --mode score`` does, split and filtered."""
    from logitcache.prompts import prepare, resolve_chat_template, score_end_token

    try:
        records = read_inputs(cfg.data, cfg.fields(), "score", cfg.limit)
    except InputError as e:
        raise InputError(str(e).replace(", required in --mode score", " (the answer to train on)")) from e
    template = resolve_chat_template(tokenizer, cfg.chat_template)
    train, heldout, overlong = [], [], 0
    for rec in records:
        p = prepare(tokenizer, rec, template, "score", True, cfg.system_prompt)
        if len(p.token_ids) > cfg.max_length:
            overlong += 1
            continue
        ex = SFTExample(rec.sample_id, np.asarray(p.token_ids, np.int64), int(p.prompt_len))
        (heldout if is_heldout(rec.sample_id, cfg.eval_fraction, cfg.seed) else train).append(ex)
    return Encoded(train, heldout, overlong, score_end_token(tokenizer, template), len(records))


def record_shards(n_records: int, world: int, shard_size: int | None = None) -> list[list[int]]:
    """Record indexes (sample ids) by pseudo-shard: ``shard_size`` contiguous records each, as ``generate
    --shard-size`` cuts a cache (so the order is ``train``'s on such a cache), or by default one strided shard
    per rank (one process: a single shard, so every epoch is a permutation of all records)."""
    if shard_size is None:
        return [list(range(s, n_records, world)) for s in range(world)]
    return [list(range(lo, min(n_records, lo + shard_size))) for lo in range(0, n_records, shard_size)]


def sample_stream(
    examples: list[SFTExample], rank: int, world: int, seed: int, epoch: int = 0, offset: int = 0,
    shard_size: int | None = None, n_records: int | None = None,
) -> Iterator[tuple[SFTExample, dict[str, int]]]:
    """This rank's training examples in order from ``(epoch, offset)``, each with the state after it; endless.

    The order runs over all ``n_records`` record indexes (default: one past the largest example's), as
    ``train``'s stream runs over a cache's records: held-out and overlong records take their place in the order
    and are skipped, so ``offset`` counts records, not examples."""
    by_id = {e.sample_id: e for e in examples}
    n = n_records if n_records is not None else max(by_id, default=-1) + 1
    shards = record_shards(n, world, shard_size)
    sizes = [len(s) for s in shards]
    check_world(sizes, world)
    while True:
        size = rank_epoch_size(sizes, rank, world, seed, epoch)
        if offset >= size:
            epoch, offset = epoch + 1, offset - size
            continue
        found = False
        for pos, (shard, i) in enumerate(rank_order(sizes, rank, world, seed, epoch)):
            if pos < offset:
                continue
            ex = by_id.get(shards[shard][i])
            if ex is not None:
                found = True
                yield ex, {"epoch": epoch, "offset": pos + 1}
        if not found and offset == 0:
            raise ConfigError(
                f"rank {rank} holds no training record in epoch {epoch} (all held out or overlong); use fewer "
                "ranks, a larger --shard-size or a lower --eval-fraction"
            )
        epoch, offset = epoch + 1, 0


def collate(examples: list[SFTExample], pad_id: int) -> dict[str, torch.Tensor | int]:
    """Right-padded ``input_ids``/``attention_mask`` and ``labels`` (-100 on the prompt and padding);
    ``keep``: how many trailing positions' logits the loss reads (from the earliest response row on)."""
    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, : len(e.ids)] = torch.from_numpy(e.ids)
        mask[row, : len(e.ids)] = 1
        labels[row, e.prompt_len : len(e.ids)] = torch.from_numpy(e.ids[e.prompt_len :])
    first = min(e.prompt_len for e in examples) - 1  # the first position whose logits predict a response token
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "keep": width - max(first, 0)}


def response_loss(model: Any, batch: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, int]:
    """``(summed CE over response tokens, token count)``: position ``t``'s logits predict ``labels[t + 1]``."""
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    keep = int(batch["keep"])
    logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits  # [B, keep, V]
    targets = batch["labels"][:, ids.shape[1] - keep + 1 :].to(device)  # what each kept position but the last predicts
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum"
    )
    return ce, int((targets != -100).sum())


def heldout_metrics(ctx: RunContext, cfg: SFTConfig, model: Any, examples: list[SFTExample], pad_id: int) -> dict:
    """Token-mean CE and perplexity of the response tokens of this rank's share of the held-out records."""
    mine = examples[ctx.rank :: ctx.world]
    sums = [0.0, 0.0]
    model.eval()
    with torch.no_grad():
        for n, lo in enumerate(range(0, len(mine), cfg.batch_size)):
            if cfg.eval_batches is not None and n >= cfg.eval_batches:
                break
            with ctx.autocast():
                ce, count = response_loss(model, collate(mine[lo : lo + cfg.batch_size], pad_id), ctx.device)
            sums[0] += float(ce)
            sums[1] += count
    model.train()
    s = ctx.all_sum(sums)
    if s[1] == 0:
        return {}
    return {"eval/ce": s[0] / s[1], "eval/ppl": math.exp(min(s[0] / s[1], 50)), "eval/tokens": s[1]}


def _check_resume(cfg: SFTConfig, out: Path, identity: dict[str, Any]) -> None:
    saved = json.loads((out / "config.json").read_text())
    now = to_dict(cfg)
    diffs = [f"{flag(k)} ({saved.get(k)!r} then, {now.get(k)!r} now)" for k in RESUME_FIELDS if saved.get(k) != now[k]]
    if diffs:
        raise ConfigError(f"--resume: {out} was trained with a different config: {'; '.join(diffs)}")
    then = json.loads((out / "inputs.json").read_text()) if (out / "inputs.json").exists() else {}
    if then.get("data") != identity["data"]:
        raise ConfigError(
            f"--resume: --data {cfg.data} holds other records than the run in {out} was trained on (content "
            f"fingerprint {identity['data']}, then {then.get('data')}); resume with that data or pass --overwrite"
        )


def _prepare_out(cfg: SFTConfig, ctx: RunContext, identity: dict[str, Any]) -> Path | None:
    out = Path(cfg.out)
    return prepare_out(
        out, ctx, resume=cfg.resume, overwrite=cfg.overwrite, check=lambda: _check_resume(cfg, out, identity)
    )


def _link_final(out: Path, checkpoint: Path) -> Path:
    """``OUT/final`` -> the checkpoint's ``student`` folder (a relative link, replaced atomically)."""
    final = out / "final"
    tmp = out / ".final.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(os.path.relpath(checkpoint / "student", out), tmp)
    os.replace(tmp, final)
    return final


def run_sft(cfg: SFTConfig) -> dict[str, Any]:
    """Fine-tune ``cfg.model`` on ``cfg.data``; returns the summary (also written to ``OUT/summary.json``)."""
    from logitcache.models import ModelSpecError, end_token_ids, load_model, load_tokenizer, pad_token_id

    ctx = RunContext.setup(cfg.device, cfg.dtype, cfg.threads)
    out = Path(cfg.out)
    try:
        tokenizer = load_tokenizer(cfg.model)
    except ModelSpecError as e:
        raise ConfigError(f"--model {cfg.model}: {e}") from e
    enc = encode_records(cfg, tokenizer)
    if not enc.train:
        raise ConfigError(
            f"--data {cfg.data}: no training records left ({enc.skipped_overlong} longer than --max-length "
            f"{cfg.max_length}, {len(enc.heldout)} held out); raise --max-length or lower --eval-fraction"
        )
    try:
        check_world([len(s) for s in record_shards(enc.n_records, ctx.world, cfg.shard_size)], ctx.world)
    except ValueError as e:
        raise ConfigError(f"--data {cfg.data}: {enc.n_records} records for {ctx.world} ranks: {e}") from e
    if cfg.epochs is not None:
        per_step = cfg.batch_size * cfg.grad_accum * ctx.world
        cfg = dataclasses.replace(cfg, max_steps=max(1, math.ceil(cfg.epochs * len(enc.train) / per_step)))
    identity = {"data": input_fingerprint(cfg.data, cfg.fields(), cfg.limit)}
    resume_from = _prepare_out(cfg, ctx, identity)
    seed_all(cfg.seed + ctx.rank)
    model = load_model(str(resume_from / "student") if resume_from else cfg.model, dtype="float32", device=ctx.device)
    model.train()
    stops = end_token_ids(tokenizer, model)
    if enc.end_token is not None and enc.end_token["id"] not in stops and ctx.is_main:
        print(
            f"note: the trained end token {enc.end_token['text']!r} ({enc.end_token['id']}) is not among the ids "
            f"generation stops on ({stops}); eval and generate will not stop on it",
            file=sys.stderr,
        )
    pad_id = pad_token_id(tokenizer, stops)
    ddp = ctx.wrap(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    step, state, before = 0, {"epoch": 0, "offset": 0}, {}
    if resume_from is not None:
        r = load_checkpoint(ctx, resume_from)
        optimizer.load_state_dict(r.optimizer)
        scheduler.load_state_dict(r.scheduler)
        step, state, before = r.step, r.stream, dict(r.totals)
    if ctx.is_main:
        write_run_files(cfg, out, identity)
        truncate_metrics(out / "metrics.jsonl", step)
    stream = sample_stream(enc.train, ctx.rank, ctx.world, cfg.seed, state["epoch"], state["offset"], cfg.shard_size,
                           enc.n_records)
    metrics_file = open(out / "metrics.jsonl", "a") if ctx.is_main else None  # noqa: SIM115
    bar = tqdm(total=cfg.max_steps, initial=step, desc="sft", unit="step", disable=not ctx.is_main,
               dynamic_ncols=True)
    t0, tokens_seen, last = time.perf_counter(), 0, {}
    checkpoint = resume_from
    try:
        while step < cfg.max_steps:
            micro = []
            for _ in range(cfg.grad_accum):
                pairs = [next(stream) for _ in range(cfg.batch_size)]
                micro.append(collate([e for e, _ in pairs], pad_id))
                state = pairs[-1][1]
            counts = [int((b["labels"] != -100).sum()) for b in micro]
            total = max(sum(counts), 1)
            loss_sum = 0.0
            for k, b in enumerate(micro):  # token-mean over the whole step, however it is split into micro-batches
                with ctx.accumulating(ddp, sync=k == len(micro) - 1), ctx.autocast():
                    ce, _ = response_loss(ddp, b, ctx.device)
                (ce / total).backward()
                loss_sum += float(ce.detach())
            grad_norm = (
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                if cfg.max_grad_norm > 0
                else torch.tensor(0.0)
            )
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += sum(counts)
            logs: dict[str, float] = {
                "step": step, "loss": loss_sum / total, "lr": scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm), "tokens": sum(counts),
                "tokens_per_s": tokens_seen * ctx.world / max(time.perf_counter() - t0, 1e-9),
            }
            if cfg.eval_every and step % cfg.eval_every == 0 and enc.heldout:
                logs.update(heldout_metrics(ctx, cfg, ddp, enc.heldout, pad_id))
            if metrics_file is not None and (step % cfg.log_every == 0 or step == cfg.max_steps):
                metrics_file.write(json.dumps(logs) + "\n")
                metrics_file.flush()
            bar.update(1)
            bar.set_postfix({"loss": f"{logs['loss']:.3g}", "tok/s": f"{logs['tokens_per_s']:.0f}"})
            last = logs
            if step % cfg.save_every == 0 or step == cfg.max_steps:
                totals = {
                    "tokens": before.get("tokens", 0.0) + ctx.all_sum([float(tokens_seen)])[0],
                    "seconds": before.get("seconds", 0.0) + time.perf_counter() - t0,
                }
                checkpoint = save_checkpoint(ctx, out, step, ddp, tokenizer, optimizer, scheduler, state,
                                             cfg.keep_checkpoints, totals)
    finally:
        bar.close()
        if metrics_file is not None:
            metrics_file.close()
    final_eval = {k: v for k, v in last.items() if k.startswith("eval/")}
    if enc.heldout and not final_eval:
        final_eval = heldout_metrics(ctx, cfg, ddp, enc.heldout, pad_id)
    checkpoint = checkpoint or latest_checkpoint(out)
    final = _link_final(out, checkpoint) if ctx.is_main and checkpoint is not None else out / "final"
    summary = {
        "steps": step,
        "seconds": before.get("seconds", 0.0) + time.perf_counter() - t0,
        "tokens": int(before.get("tokens", 0.0) + ctx.all_sum([float(tokens_seen)])[0]),
        "train_records": len(enc.train),
        "heldout_records": len(enc.heldout),
        "skipped_overlong": enc.skipped_overlong,
        "end_token": enc.end_token,
        "last": last,
        "eval": final_eval,
        "checkpoint": str(checkpoint),
        "checkpoint_step": checkpoint_step(checkpoint) if checkpoint is not None else None,
        "model": str(final),
    }
    if ctx.is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
