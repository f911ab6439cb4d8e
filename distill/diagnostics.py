"""Training diagnostics: how hard each loss term pulls on the student (``train --grad-norm-every N``).

A term whose weight looks reasonable can still contribute almost nothing to the update (``mlot`` at weight 0.15
barely moved in the first quality runs, issue 14). The question "does this term matter?" has a measurable
answer: the L2 norm of its weighted gradient with respect to the student logits the losses receive
(``DistillBatch.student_logits``), set against that of ``ce``. Every parameter gradient flows back through those
logits, so terms whose logit gradients differ by 100x differ about as much in what they do to the weights,
although the ratio at the logits is not the ratio at the parameters.

Cost: one ``torch.autograd.grad`` per term (and per logged sub-term) on the graph that is already built, with
``retain_graph`` so the step's own backward still runs. It differentiates only from the loss to the logits and
never through the model, so it costs a few loss backward passes on a ``[B, T, V]`` tensor, not a parameter
backward. Train calls it on the first micro-batch of every N-th step, and only when N > 0 (the default is 0:
nothing runs).

Logged keys: ``gradnorm/<term>`` = ``|| d(weight * value) / d logits ||_2``, ``gradnorm_ratio/<term>`` = that
over ``gradnorm/ce`` (only when ``ce`` is a term and its norm is > 0), and, for losses that log sub-terms
(``mlot``: ``had``, ``sl``, ``sd``), ``gradnorm/<term>/<part>``: the gradient of ``weight * part`` reduced as
the loss reduces itself. These parts leave out the loss's own coefficients (``beta``, ``gamma``), the same way
``loss/<term>/<part>`` logs them.
"""

from __future__ import annotations

from typing import Any

import torch

from .losses import CombinedOutput, DistillBatch, reduce_per_sequence

__all__ = ["term_grad_norms"]


def _norm(value: torch.Tensor, logits: torch.Tensor) -> float:
    if not value.requires_grad:  # a term that does not depend on the logits (nothing counted)
        return 0.0
    (grad,) = torch.autograd.grad(value, logits, retain_graph=True, allow_unused=True)
    return 0.0 if grad is None else float(grad.detach().float().norm())


def term_grad_norms(batch: DistillBatch, result: CombinedOutput, configs: dict[str, Any] | None = None) -> dict:
    """``gradnorm/*`` and ``gradnorm_ratio/*`` of ``result``'s terms w.r.t. ``batch.student_logits``.

    ``configs``: the losses' configs (``CombinedLoss.configs``), to reduce sub-terms as each loss reduces
    itself (default ``token``). Returns ``{}`` when the logits carry no graph (evaluation, ``no_grad``).
    """
    logits = batch.student_logits
    if logits is None or not logits.requires_grad:
        return {}
    logs: dict[str, float] = {}
    for name, out in result.components.items():
        w = float(result.weights[name])
        logs[f"gradnorm/{name}"] = _norm(out.value * w, logits)
        reduction = getattr((configs or {}).get(name), "reduction", "token")
        for part, per_seq in out.parts.items():
            per_seq = torch.where(out.count > 0, per_seq, torch.zeros_like(per_seq))
            logs[f"gradnorm/{name}/{part}"] = _norm(reduce_per_sequence(per_seq, out.count, reduction) * w, logits)
    ce = logs.get("gradnorm/ce", 0.0)
    if ce > 0:
        for name in result.components:
            logs[f"gradnorm_ratio/{name}"] = logs[f"gradnorm/{name}"] / ce
    return logs
