"""Checkpoints and resume of ``logitcache train``: what a run writes so that ``--resume`` continues it exactly.

Layout of ``--out``::

    config.json                 the run's TrainConfig (flags)
    inputs.json                 the identity of the data it trains on (cache + alignment store), see below
    metrics.jsonl               one line per logged step (a resumed run rewrites the lines past its checkpoint)
    checkpoints/step-NNNNNNN/   student/ (save_pretrained + tokenizer), trainer.pt (step, optimizer, scheduler,
                                every rank's stream position, the run's token and second totals so far),
                                rng-rank{R}.pt (each rank's RNG states); under --parallel fsdp, sharded/
                                (model and optimizer, one shard per rank, torch.distributed.checkpoint) and
                                no optimizer in trainer.pt; student/ is the whole model either way
    summary.json                the finished run's summary (whole-run steps, tokens, seconds)

A checkpoint is written into ``.tmp-step-N`` and renamed when complete, so ``latest_checkpoint`` never sees a
half-written one. ``--resume`` refuses a config that changes the run (``RESUME_FIELDS``) and data that differs
from the run's: the data is identified by content (the cache header's fingerprint and every shard's checksum,
the alignment store's key, header and shard checksums), not by path, so a moved or copied cache resumes and a
regenerated one at the same path does not.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from logitcache.config import ConfigError, flag, to_dict
from logitcache.storage import LogitCache
from logitcache.storage.alignment_store import AlignmentStore, cache_identity

from . import parallel as fsdp
from .context import RunContext

#: config fields a resumed run must share with the run it resumes (the data itself is checked by identity)
RESUME_FIELDS = (
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
CONFIG_FILE = "config.json"
INPUTS_FILE = "inputs.json"


# -- RNG ---------------------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


# -- data identity -----------------------------------------------------------------------------------------------
def data_identity(cache: LogitCache, store: AlignmentStore) -> dict[str, Any]:
    """What the run trains on, by content: a moved cache has the same identity, a regenerated one does not."""
    header = json.dumps(store.header, sort_keys=True).encode()
    return {
        "cache": cache_identity(cache),
        "alignment_store": {
            "key": store.key,
            "header_sha256": hashlib.sha256(header).hexdigest(),
            "shards": {s["name"]: s["checksum"] for s in store.manifest["shards"]},
        },
    }


def _identity_diffs(then: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between two data identities, each as a phrase for a one-line error."""
    diffs = []
    c0, c1 = then.get("cache", {}), now["cache"]
    if c0.get("header_fingerprint") != c1["header_fingerprint"]:
        diffs.append("its header differs (teacher, data, top-k or codec settings)")
    shards0, shards1 = c0.get("shards", {}), c1["shards"]
    changed = sorted(n for n in set(shards0) | set(shards1) if shards0.get(n) != shards1.get(n))
    if changed:
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        diffs.append(f"shards {', '.join(changed[:3])}{more} differ")
    a0, a1 = then.get("alignment_store", {}), now["alignment_store"]
    if a0 != a1:
        key = a1["key"] if a0.get("key") == a1["key"] else f"{a0.get('key')} then, {a1['key']} now"
        diffs.append(f"the alignment store differs (alignments/{key})")
    return diffs


# -- resume ------------------------------------------------------------------------------------------------------
def check_resume(cfg: Any, out: Path, identity: dict[str, Any]) -> None:
    """Refuse (``ConfigError``, one line) a ``--resume`` whose config or data differ from the run in ``out``."""
    saved = json.loads((out / CONFIG_FILE).read_text())
    now = to_dict(cfg)
    diffs = [
        f"{flag(k)} ({saved.get(k)!r} then, {now.get(k)!r} now)" for k in RESUME_FIELDS if saved.get(k) != now.get(k)
    ]
    if diffs:
        raise ConfigError(f"--resume: {out} was trained with a different config: {'; '.join(diffs)}")
    inputs = out / INPUTS_FILE
    if not inputs.exists():  # a run from before data identities: compare the path, as it did then
        if saved.get("cache") != now.get("cache"):
            raise ConfigError(
                f"--resume: {out} was trained on --cache {saved.get('cache')!r}, not {now.get('cache')!r}"
            )
        return
    changed = _identity_diffs(json.loads(inputs.read_text()), identity)
    if changed:
        raise ConfigError(
            f"--resume: --cache {now.get('cache')} holds other data than the run in {out} was trained on: "
            f"{'; '.join(changed)}; resume with that run's cache or start over with --overwrite"
        )


def write_run_files(cfg: Any, out: Path, identity: dict[str, Any]) -> None:
    """Rank 0: the run's config and data identity (rewritten on resume: the cache may have moved)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
    (out / INPUTS_FILE).write_text(json.dumps(identity, indent=2, sort_keys=True) + "\n")


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past ``step`` (a resumed run rewrites them), atomically."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(ln + "\n" for ln in keep))
    os.replace(tmp, path)


# -- checkpoints -------------------------------------------------------------------------------------------------
def prepare_out(out: Path, ctx: RunContext, *, resume: bool, overwrite: bool, check: Callable[[], None]) -> Path | None:
    """Check ``--out`` against ``--resume``/``--overwrite`` (``check`` validates a resume against the run's
    identity and raises a one-line error); the checkpoint to resume from, if any. Every rank calls it."""
    resume_from = None
    if (out / "config.json").exists():
        if resume:
            check()
            resume_from = latest_checkpoint(out)
        elif not overwrite:
            raise ConfigError(f"--out {out} holds another run; pass --resume to continue it or --overwrite")
        elif ctx.is_main:
            shutil.rmtree(out)
    ctx.barrier()
    return resume_from


def latest_checkpoint(out: Path) -> Path | None:
    ckpts = sorted((out / "checkpoints").glob("step-*"), key=checkpoint_step)
    complete = [p for p in ckpts if (p / "trainer.pt").exists()]
    return complete[-1] if complete else None


def save_checkpoint(
    ctx: RunContext,
    out: Path,
    step: int,
    model: Any,
    tokenizer: Any,
    optimizer: Any,
    scheduler: Any,
    stream_state: dict[str, int],
    keep: int,
    totals: dict[str, float] | None = None,
) -> Path:
    """Rank 0 writes the checkpoint into a temporary folder and renames it; every rank adds its RNG state and
    stream position first (a collective: every rank calls it at the same step). ``totals``: the whole run's
    ``tokens`` (all ranks) and ``seconds`` up to this step, so a resumed run's summary covers the whole run.
    Under FSDP every rank also writes its shard of the model and optimizer, and rank 0 the gathered model."""
    states = ctx.all_gather(stream_state)
    final = out / "checkpoints" / f"step-{step:07d}"
    staging = out / "checkpoints" / f".tmp-step-{step:07d}"
    if ctx.is_main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    ctx.barrier()
    torch.save(rng_state(), staging / f"rng-rank{ctx.rank}.pt")
    sharded = ctx.parallel == "fsdp"
    full: dict[str, torch.Tensor] | None = None
    if sharded:
        fsdp.save_sharded(staging / fsdp.SHARDED_DIR, model, optimizer)
        full = fsdp.full_state_dict(model)
    ctx.barrier()
    if ctx.is_main:
        (model.module if hasattr(model, "module") else model).save_pretrained(staging / "student", state_dict=full)
        tokenizer.save_pretrained(staging / "student")
        torch.save(
            {
                "step": step,
                "optimizer": None if sharded else optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "streams": states,
                "totals": totals or {},
            },
            staging / "trainer.pt",
        )
        shutil.rmtree(final, ignore_errors=True)
        os.rename(staging, final)
        for old in sorted((out / "checkpoints").glob("step-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    ctx.barrier()
    return final


@dataclass
class Resumed:
    """A checkpoint's trainer state, as this rank continues from it."""

    step: int
    optimizer: dict[str, Any] | None
    scheduler: dict[str, Any]
    stream: dict[str, int]
    #: the run's ``tokens``/``seconds`` up to the checkpoint; empty for checkpoints written before they were kept
    totals: dict[str, float] = field(default_factory=dict)
    #: the checkpoint's sharded model and optimizer (``--parallel fsdp``; ``optimizer`` is then None)
    sharded: Path | None = None


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint folder (``step-NNNNNNN``) was saved after."""
    return int(path.name.removeprefix("step-"))


def load_checkpoint(ctx: RunContext, path: Path) -> Resumed:
    """This rank's state in the checkpoint at ``path``; restores its RNG states too."""
    state = torch.load(path / "trainer.pt", weights_only=False)
    if len(state["streams"]) != ctx.world:
        raise ConfigError(f"--resume: the checkpoint has {len(state['streams'])} ranks, this run has {ctx.world}")
    sharded = path / fsdp.SHARDED_DIR
    if sharded.exists() != (ctx.parallel == "fsdp"):
        then = "fsdp" if sharded.exists() else "ddp"
        raise ConfigError(
            f"--resume: {path} was written with --parallel {then} (its optimizer state is "
            f"{'sharded' if then == 'fsdp' else 'whole'}); resume it with --parallel {then}"
        )
    set_rng_state(torch.load(path / f"rng-rank{ctx.rank}.pt", weights_only=False))
    return Resumed(
        state["step"],
        state["optimizer"],
        state["scheduler"],
        state["streams"][ctx.rank],
        state.get("totals", {}),
        sharded if sharded.exists() else None,
    )


def restore_training_state(state: Resumed, model: Any, optimizer: Any) -> None:
    """Load the checkpoint's optimizer state (and, sharded, the model's exact fp32 shards too) into this run's."""
    if state.sharded is not None:
        fsdp.load_sharded(state.sharded, model, optimizer)
    else:
        optimizer.load_state_dict(state.optimizer)
