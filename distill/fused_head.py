"""The fused, chunked student head (``--fused-head``): every loss term from the student's final hidden states and
its LM head, chunk by chunk over positions, without ever holding the [B, Ts, V] logits or their gradient.

The losses see the student only through :class:`~.losses_student.StudentStats`: vocabulary-wide no-grad passes
(``logsumexp(z / tau)`` per row, ``mlot``'s rank sums, ``uld``'s top-R ids) and log-softmax values at a few ids per
row, whose gradient is sparse apart from the softmax part. :class:`FusedHead` implements exactly that interface on
``hidden`` [N, D] and the head module (weight [V, D], optional bias, optional final-logit soft-capping):

- vocabulary-wide passes recompute ``z = hidden[rows] @ W.T`` for ``chunk_rows`` rows at a time (no grad);
- sparse values ``z[row, id]`` are dot products ``hidden[row] . W[id]`` (O(M k D), nothing [N, V]);
- backward (:class:`_FusedHub`, run once after every gather's backward, as the unfused hub) recomputes each chunk's
  logits, builds that chunk's dense gradient ``sum_tau (scatter(g_tau) - softmax(z / tau) * gsum_tau) / tau`` and
  turns it into ``grad_hidden[chunk] = G @ W``, ``grad_W += G.T @ hidden[chunk]`` (and the bias) at once.

Sequence-level terms are passes over chunks too: ``mlot``'s ranking needs the sum over a sequence's rows of
``softmax(z / rank_tau)``, accumulated chunk by chunk in the same pass as the lse; its Sinkhorn distance only needs
the student's probabilities at the k ranked ids ([B, Ts, k], a sparse gather). Memory: O(chunk_rows x V) of
temporaries plus the weight gradient, instead of several [B, Ts, V] fp32 tensors. Cost: one more head matmul than
the unfused path (the forward pass over the vocabulary is recomputed in backward).

Precision: softmax and lse in fp32 (fp64 for fp64 inputs) also under autocast; the logits matmuls run under the
autocast state of the forward (bf16 under train's autocast, as the unfused ``lm_head`` call), in backward too.

FSDP: :func:`fused_head` reads ``head.weight`` (and ``bias``) from the module when it is called, and the weight's
gradient flows through autograd to that tensor. Under FSDP2 (``fully_shard``) parameters are sharded DTensors
outside their module's forward: call it while the head's parameters are unsharded (the root module's parameters
stay unsharded after its forward when the head belongs to the root's group, the default when only the decoder
layers are sharded separately; otherwise ``head.unshard()`` before and ``head.reshard()`` after backward), so
that the gradient lands on the unsharded parameter that FSDP reduce-scatters.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .losses_student import GradientPushes

__all__ = ["CHUNK_ELEMS", "FusedHead", "default_chunk_rows", "fused_head", "head_parts"]

#: default elements (rows x V) of one chunk's logits: 16M (64 MiB in fp32; 64 rows at V = 262k, 341 at 49k)
CHUNK_ELEMS = 1 << 24
#: elements (rows x k x D) of one chunk of the sparse dot products
_GATHER_ELEMS = 1 << 22


def default_chunk_rows(vocab: int) -> int:
    """Rows per chunk when ``--head-chunk`` is not given: ``CHUNK_ELEMS // vocab`` (at least 1)."""
    return max(1, CHUNK_ELEMS // max(int(vocab), 1))


def _compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def head_parts(model: Any) -> tuple[torch.nn.Module, torch.nn.Module, float | None]:
    """(decoder, LM head module, final-logit soft-cap) of a Hugging Face causal LM (DDP-wrapped or not).

    Raises ``ValueError`` for architectures whose logits are not ``lm_head(last_hidden_state)`` (optionally
    soft-capped): a logit scale (Cohere, Granite) or a head without a [V, D] weight."""
    inner = getattr(model, "module", model)
    head = inner.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if head is None or not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"--fused-head: {type(inner).__name__} has no linear LM head; train without --fused-head")
    config = getattr(inner, "config", None)
    text = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    for attr in ("logit_scale", "logits_scaling", "output_multiplier_scale"):
        scale = getattr(text, attr, None)
        if scale not in (None, 1, 1.0):
            raise ValueError(f"--fused-head: {type(inner).__name__} scales its logits ({attr}={scale}); unsupported")
    cap = getattr(text, "final_logit_softcapping", None)
    return inner.get_decoder(), head, (float(cap) if cap else None)


class FusedHead:
    """The student's logits ``softcap(hidden @ W.T + b)`` [N, V], never materialized: see the module docstring.

    ``hidden`` [N, D] (the loss-span rows, flattened); ``head`` the LM head module (``weight`` [V, D], optional
    ``bias``); ``softcap``: the model's final-logit soft-capping (``cap * tanh(z / cap)``) or None;
    ``chunk_rows``: rows per chunk of the vocabulary-wide passes (None: :func:`default_chunk_rows`).
    """

    def __init__(
        self, hidden: Tensor, head: torch.nn.Module, softcap: float | None = None, chunk_rows: int | None = None
    ):
        self.hidden = hidden
        self.weight: Tensor = head.weight  # read now: under FSDP2 the unsharded parameter (see the module docstring)
        bias = getattr(head, "bias", None)
        self.bias: Tensor | None = bias if isinstance(bias, Tensor) else None
        self.softcap = softcap
        self.n, self.d = hidden.shape
        self.v = int(self.weight.shape[0])
        self.chunk_rows = int(chunk_rows) if chunk_rows else default_chunk_rows(self.v)
        self.device_type = hidden.device.type
        self.amp = torch.is_autocast_enabled(self.device_type)
        self.amp_dtype = torch.get_autocast_dtype(self.device_type) if self.amp else None
        self.cdt = _compute_dtype(hidden.dtype, self.weight.dtype)
        self.state = GradientPushes(self.n, self.cdt, hidden.device)
        self.anchor: Tensor | None = None
        self._memo: tuple[Tensor, Tensor, Tensor] | None = None

    # ---- logits of a few rows, and sparse values ----------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The forward's autocast state (also in backward, where autograd runs with autocast off)."""
        if not self.amp:
            return torch.autocast(self.device_type, enabled=False)
        return torch.autocast(self.device_type, dtype=self.amp_dtype)

    def _cap(self, z: Tensor) -> Tensor:
        return z if self.softcap is None else torch.tanh(z / self.softcap) * self.softcap

    def chunks(self):
        for s in range(0, self.n, self.chunk_rows):
            yield s, min(self.n, s + self.chunk_rows)

    def _raw(self, h: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        with self._autocast():
            z = torch.nn.functional.linear(h, w, b)
        return z.to(self.cdt)

    @torch.no_grad()
    def logits(self, s: int, e: int) -> Tensor:
        """Rows [s, e) of the logits, in the compute dtype (fp32 / fp64)."""
        return self._cap(self._raw(self.hidden[s:e].detach(), self.weight.detach(), self._bias()))

    def _bias(self) -> Tensor | None:
        return None if self.bias is None else self.bias.detach()

    @torch.no_grad()
    def _sparse_logits(self, rows: Tensor, ids: Tensor) -> Tensor:
        """``z[rows[m], ids[m, i]]`` [M, k] as dot products, in chunks of rows."""
        m, k = ids.shape
        out = torch.empty(m, k, dtype=self.cdt, device=self.hidden.device)
        w, h, b = self.weight.detach(), self.hidden.detach(), self._bias()
        step = max(1, _GATHER_ELEMS // max(k * self.d, 1))
        for s in range(0, m, step):
            r, i = rows[s : s + step], ids[s : s + step]
            with self._autocast():
                z = torch.bmm(w[i], h[r][:, :, None])[..., 0]
            z = z.to(self.cdt)
            if b is not None:
                z = z + b[i].to(self.cdt)
            out[s : s + step] = self._cap(z)
        return out

    # ---- the StudentStats interface --------------------------------------------------------------------
    @torch.no_grad()
    def lse_and_rank_sums(
        self, taus: Sequence[float], rank_tau: float | None, row_weight: Tensor | None
    ) -> tuple[dict[float, Tensor], Tensor | None]:
        """As ``losses_student._lse_and_rank_sums`` on the logits, in one pass over the chunks."""
        taus = [float(t) for t in taus]
        all_taus = sorted(set(taus) | ({float(rank_tau)} if rank_tau is not None else set()))
        lses = {tau: torch.empty(self.n, dtype=self.cdt, device=self.hidden.device) for tau in all_taus}
        sums = None
        if rank_tau is not None:
            assert row_weight is not None
            sums = torch.zeros(row_weight.shape[1], self.v, dtype=self.cdt, device=self.hidden.device)
        for s, e in self.chunks():
            zc = self.logits(s, e)
            m = zc.amax(-1)
            for tau in all_taus:
                p = torch.softmax(zc / tau if tau != 1.0 else zc, dim=-1)
                lses[tau][s:e] = m / tau - torch.log(p.amax(-1))
                if sums is not None and tau == rank_tau:
                    sums.addmm_(row_weight[s:e].to(self.cdt).T, p)
        return {t: lses[t] for t in taus}, sums

    @torch.no_grad()
    def topk(self, r: int) -> Tensor:
        """The ids of each row's ``r`` largest logits, sorted descending: [N, r]."""
        out = torch.empty(self.n, r, dtype=torch.long, device=self.hidden.device)
        for s, e in self.chunks():
            out[s:e] = torch.topk(self.logits(s, e), r, dim=-1, sorted=True).indices
        return out

    def set_lses(self, lses: Mapping[float, Tensor]) -> None:
        for t, val in lses.items():
            self.state.lses.setdefault(float(t), val.reshape(-1).detach().to(self.cdt))

    def gather(self, rows: Tensor, ids: Tensor, tau: float) -> Tensor:
        """``log softmax(z / tau)`` at flat rows [M] and ids [M, k] -> [M, k], differentiable w.r.t. the hidden
        states and the head (through the one fused backward)."""
        tau = float(tau)
        if tau not in self.state.lses:
            self.set_lses(self.lse_and_rank_sums([tau], None, None)[0])
        if self._memo is not None and self._memo[0] is rows and self._memo[1] is ids:
            vals = self._memo[2]  # the same ids at another temperature (mlot, student_logprobs_at)
        else:
            key = (rows, ids)
            rows = rows.reshape(-1).long()
            ids = ids.reshape(rows.numel(), -1).long()
            vals = self._sparse_logits(rows, ids)
            self._memo = (*key, vals)
        rows = rows.reshape(-1).long()
        ids = ids.reshape(rows.numel(), -1).long()
        needs = self.hidden.requires_grad or self.weight.requires_grad
        if not (torch.is_grad_enabled() and needs):
            return (vals / tau if tau != 1.0 else vals) - self.state.lses[tau][rows][:, None]
        if self.anchor is None:
            self.anchor = _FusedHub.apply(self.hidden, self.weight, self.bias, self)
        return _FusedGather.apply(self.anchor, vals, self.state, rows, ids, tau, self.v)

    # ---- backward ----------------------------------------------------------------------------------------
    def backward(self, need_h: bool, need_w: bool, need_b: bool) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """The gradients of everything pushed by the gathers (one chunked pass), then clears the state."""
        st = self.state
        taus = [t for t in st.gsum if bool(st.gsum[t].any())]
        h, w, b = self.hidden.detach(), self.weight.detach(), self._bias()
        if st.sparse:
            flat = torch.cat([f for f, _ in st.sparse])
            gs = torch.cat([g for _, g in st.sparse])
            flat, order = torch.sort(flat)
            gs = gs[order]
        else:
            flat = gs = torch.zeros(0, device=h.device)
        grad_h = torch.zeros_like(h) if need_h else None
        grad_w = torch.zeros(w.shape, dtype=torch.float32 if w.dtype != torch.float64 else w.dtype, device=w.device)
        grad_w = grad_w if need_w else None
        grad_b = torch.zeros(self.v, dtype=self.cdt, device=h.device) if need_b else None
        for s, e in self.chunks():
            raw = self._raw(h[s:e], w, b)
            zc = self._cap(raw)
            grad = torch.zeros_like(zc)
            for tau in taus:
                p = torch.softmax(zc / tau if tau != 1.0 else zc, dim=-1)
                grad.addcmul_(p, st.gsum[tau][s:e, None], value=-1.0)
            if flat.numel():
                lo, hi = torch.searchsorted(flat, torch.tensor([s * self.v, e * self.v], device=flat.device)).tolist()
                if hi > lo:
                    grad.view(-1).index_add_(0, flat[lo:hi] - s * self.v, gs[lo:hi].to(grad.dtype))
            if self.softcap is not None:
                t = zc / self.softcap
                grad.mul_(1.0 - t * t)
            if self.amp:  # the matmuls in the autocast dtype, as the unfused head's backward
                with self._autocast():
                    if grad_h is not None:
                        grad_h[s:e] = torch.mm(grad, w).to(h.dtype)
                    if grad_w is not None:
                        grad_w += torch.mm(grad.T, h[s:e]).to(grad_w.dtype)
            else:
                if grad_h is not None:
                    grad_h[s:e] = torch.mm(grad.to(w.dtype), w).to(h.dtype)
                if grad_w is not None:  # in place: no [V, D] temporary per chunk
                    hc = h[s:e] if h.dtype == grad_w.dtype else h[s:e].to(grad_w.dtype)
                    grad_w.addmm_(grad.T.to(grad_w.dtype), hc)
            if grad_b is not None:
                grad_b += grad.sum(0)
        st.gsum, st.sparse = {}, []
        return (
            grad_h,
            None if grad_w is None else grad_w.to(w.dtype),
            None if grad_b is None or self.bias is None else grad_b.to(self.bias.dtype),
        )


class _FusedHub(torch.autograd.Function):
    """Anchor of the gathers: a scalar 0 that depends on (hidden, weight, bias); its backward runs after all the
    gathers' (autograd's topological order) and returns the fused head's gradients."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, head: FusedHead) -> Tensor:  # type: ignore[override]
        ctx.head = head
        return hidden.new_zeros((), dtype=head.cdt)

    @staticmethod
    def backward(ctx, _g: Tensor):  # type: ignore[override]
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        gh, gw, gb = ctx.head.backward(need_h, need_w, need_b)
        return gh, gw, gb, None


class _FusedGather(torch.autograd.Function):
    """out[m, i] = z[rows[m], ids[m, i]] / tau - lse_tau[rows[m]]; backward pushes into the head's state."""

    @staticmethod
    def forward(ctx, anchor, vals, state, rows, ids, tau, v):  # type: ignore[override]
        ctx.state, ctx.tau = state, tau
        ctx.save_for_backward(rows, rows[:, None] * v + ids)
        return (vals / tau if tau != 1.0 else vals) - state.lses[tau][rows][:, None]

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        rows, flat = ctx.saved_tensors
        ctx.state.push(rows, flat, g, ctx.tau)
        return g.new_zeros(()), None, None, None, None, None, None


def fused_head(
    hidden: Tensor, head: torch.nn.Module, softcap: float | None = None, chunk_rows: int | None = None
) -> FusedHead:
    """A :class:`FusedHead` over ``hidden`` [..., D] (flattened to rows) and the LM head module ``head``."""
    return FusedHead(hidden.reshape(-1, hidden.shape[-1]), head, softcap, chunk_rows)
