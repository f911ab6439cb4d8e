"""The one typed seam from the loader to the losses: ``Example`` -> ``collate`` -> ``CollatedBatch`` ->
``distill_batch`` (with the student's logits) -> ``DistillBatch``.

- ``Example``: one training sequence on the host (numpy): the student's input ids and loss-span targets, the
  teacher's cached rows (``PositionRows``), stage two's pairs and chunks.
- ``collate``: right-pads examples into a ``CollatedBatch`` (numpy fills, one zero-copy wrap per field). Teacher
  top-k ids stay int32 on the host (the largest field); ``distill_batch`` widens them on the device.
- ``distill_batch``: gathers the student's loss-span rows out of a forward's logits and assembles the
  ``DistillBatch`` the losses consume. Training, held-out evaluation, the loss tests and the loss benches all
  build their batches this way, so there is one padding path.

``distill_batch_fused`` / ``student_forward(fused=True)`` (``--fused-head``): the same batch from the student's final
hidden states and its LM head; the losses never see [B, Ts, V] logits (``distill.fused_head``).

Trade-off: the student logits of padded rows are the logits of some real position (row positions pad with the
first one), finite and masked out, instead of zeros: a gather is cheaper than a gather plus a masked fill.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import Tensor

from logitcache.storage import PositionRows

from .losses_core import DistillBatch


@dataclass
class Example:
    """One training sequence. Student row ``j`` sits at input position ``prompt_len - 1 + j`` and predicts
    ``targets[j]``; teacher row ``i`` is cached loss-span row ``i``."""

    sample_id: int
    input_ids: np.ndarray  # int64 [L]: student prompt + completion (+ EOS)
    prompt_len: int  # P_s
    targets: np.ndarray  # int64 [Ts]
    teacher: PositionRows  # [Tt] rows
    pairs: np.ndarray  # int64 [P, 2]
    chunks: np.ndarray  # int64 [C, 4]
    teacher_token_ids: np.ndarray  # the teacher's full sequence (for --teacher online scoring)
    teacher_prompt_len: int


@dataclass
class CollatedBatch:
    """A padded batch of examples, before the student forward (shapes as ``DistillBatch``'s, see there).

    ``input_ids``/``attention_mask`` long [B, L] are the student forward's input; ``row_positions`` long [B, Ts]
    the input position of each student loss-span row (0 on padding); ``first_position`` the smallest position a
    valid row reads, so the forward keeps only the logits from there on. ``teacher_topk_ids`` is int32.
    ``teacher_lse`` maps each recorded temperature to [B, Tt] (empty when the cache recorded none).
    ``teacher_tail_ids`` int32 / ``teacher_tail_logprobs`` float32 [B, Tt, N]: the sampled tail (None when the
    cache has none; pads: id 0, logprob 0, masked by ``teacher_mask``).
    """

    input_ids: Tensor
    attention_mask: Tensor
    row_positions: Tensor
    student_targets: Tensor
    student_mask: Tensor
    teacher_topk_ids: Tensor
    teacher_topk_logprobs: Tensor
    teacher_target_ids: Tensor
    teacher_target_logprobs: Tensor
    teacher_mask: Tensor
    teacher_lse: dict[float, Tensor]
    pairs: Tensor
    pair_mask: Tensor
    chunks: Tensor
    chunk_mask: Tensor
    sample_ids: Tensor
    first_position: int = 0
    teacher_tail_ids: Tensor | None = None
    teacher_tail_logprobs: Tensor | None = None

    @property
    def batch_size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def logits_to_keep(self) -> int:
        """How many trailing input positions the student forward must return logits for."""
        return int(self.input_ids.shape[1]) - self.first_position

    def to(self, device: torch.device | str, non_blocking: bool = True) -> CollatedBatch:
        """A copy with every tensor on ``device``."""
        kw = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                v = v.to(device, non_blocking=non_blocking)
            elif isinstance(v, dict):
                v = {k: t.to(device, non_blocking=non_blocking) for k, t in v.items()}
            kw[f.name] = v
        return CollatedBatch(**kw)

    def set_teacher_rows(self, b: int, rows: PositionRows) -> None:
        """Overwrite sequence ``b``'s first ``rows.n`` teacher rows (online mode: freshly computed rows)."""
        n = rows.n
        self.teacher_topk_ids[b, :n] = torch.as_tensor(rows.topk_ids)
        self.teacher_topk_logprobs[b, :n] = torch.as_tensor(rows.topk_logprobs)
        self.teacher_target_ids[b, :n] = torch.as_tensor(rows.target_ids, dtype=torch.long)
        self.teacher_target_logprobs[b, :n] = torch.as_tensor(rows.target_logprobs)
        for tau, lse in self.teacher_lse.items():
            lse[b, :n] = torch.as_tensor(rows.extra_lse[tau])
        if self.teacher_tail_ids is not None and self.teacher_tail_logprobs is not None:
            if rows.tail_ids is None or rows.tail_logprobs is None:  # stale draws would bias the estimate
                raise ValueError("the batch carries tail draws but the fresh teacher rows have none")
            self.teacher_tail_ids[b, :n] = torch.as_tensor(rows.tail_ids)
            self.teacher_tail_logprobs[b, :n] = torch.as_tensor(rows.tail_logprobs)


def _pad(arrays: list[np.ndarray], length: int, value: float, dtype: type) -> Tensor:
    """Right-pad ``[n_i, ...]`` arrays into one ``[B, length, ...]`` tensor (numpy fill, one zero-copy wrap)."""
    tail = arrays[0].shape[1:] if arrays else ()
    out = np.empty((len(arrays), length, *tail), dtype=dtype)
    for b, a in enumerate(arrays):
        n = len(a)
        out[b, :n] = a
        if n < length:  # write the padding only (the largest fields are mostly data)
            out[b, n:] = value
    return torch.from_numpy(out)


def _mask_np(lengths: list[int], length: int) -> np.ndarray:
    return np.arange(length)[None, :] < np.asarray(lengths)[:, None]


def _mask(lengths: list[int], length: int) -> Tensor:
    return torch.from_numpy(_mask_np(lengths, length))


def collate(examples: list[Example], pad_id: int, k: int, temperatures: list[float]) -> CollatedBatch:
    """Right-pad ``examples`` (at least one) into a ``CollatedBatch``; ``temperatures``: the cache's recorded
    lse temperatures (every example's ``teacher.extra_lse`` holds them). Pads: input ``pad_id``, targets -100,
    teacher ids 0, teacher logprobs -inf, target logprobs / lse 0, pairs / chunks 0."""
    if not examples:
        raise ValueError("collate needs at least one example")
    lens = [len(e.input_ids) for e in examples]
    n_s = [len(e.targets) for e in examples]
    teachers = [e.teacher for e in examples]
    n_t = [t.n for t in teachers]
    n_p = [len(e.pairs) for e in examples]
    n_c = [len(e.chunks) for e in examples]
    ts, tt, tp, tc = max(n_s), max(max(n_t), 1), max(max(n_p), 1), max(max(n_c), 1)
    s_mask = _mask_np(n_s, ts)
    draws = [(t.tail_ids, t.tail_logprobs) for t in teachers if t.tail_ids is not None and t.tail_logprobs is not None]
    n_tail = teachers[0].tail_samples if len(draws) == len(teachers) else 0
    plens = np.asarray([e.prompt_len for e in examples], np.int64)
    positions = np.where(s_mask, plens[:, None] - 1 + np.arange(ts), 0)
    return CollatedBatch(
        input_ids=_pad([e.input_ids for e in examples], max(lens), pad_id, np.int64),
        attention_mask=torch.from_numpy(_mask_np(lens, max(lens)).astype(np.int64)),
        row_positions=torch.from_numpy(positions),
        student_targets=_pad([e.targets for e in examples], ts, -100, np.int64),
        student_mask=torch.from_numpy(s_mask),
        teacher_topk_ids=_pad([t.topk_ids.reshape(-1, k) for t in teachers], tt, 0, np.int32),
        teacher_topk_logprobs=_pad([t.topk_logprobs.reshape(-1, k) for t in teachers], tt, -np.inf, np.float32),
        teacher_target_ids=_pad([t.target_ids for t in teachers], tt, 0, np.int64),
        teacher_target_logprobs=_pad([t.target_logprobs for t in teachers], tt, 0.0, np.float32),
        teacher_mask=_mask(n_t, tt),
        teacher_lse={float(u): _pad([t.extra_lse[u] for t in teachers], tt, 0.0, np.float32) for u in temperatures},
        pairs=_pad([e.pairs.reshape(-1, 2) for e in examples], tp, 0, np.int64),
        pair_mask=_mask(n_p, tp),
        chunks=_pad([e.chunks.reshape(-1, 4) for e in examples], tc, 0, np.int64),
        chunk_mask=_mask(n_c, tc),
        sample_ids=torch.as_tensor([e.sample_id for e in examples], dtype=torch.long),
        first_position=int(positions[s_mask].min()) if s_mask.any() else 0,
        teacher_tail_ids=_pad([i.reshape(-1, n_tail) for i, _ in draws], tt, 0, np.int32) if n_tail else None,
        teacher_tail_logprobs=_pad([p.reshape(-1, n_tail) for _, p in draws], tt, 0.0, np.float32) if n_tail else None,
    )


def distill_batch(batch: CollatedBatch, logits: Tensor, *, same_vocab: bool) -> DistillBatch:
    """The ``DistillBatch`` of ``batch`` (on ``logits``' device) given the student forward's ``logits``
    [B, batch.logits_to_keep, V] (the input positions from ``batch.first_position`` on).

    Teacher ids are widened to long; teacher float fields stay float32 unless the logits are wider (float64
    logits, as the loss tests use, get float64 teacher fields: the same values, computed on in float64).
    """
    if logits.dim() != 3 or logits.shape[1] != batch.logits_to_keep:
        raise ValueError(
            f"logits must be [B, {batch.logits_to_keep}, V] (positions {batch.first_position}.. of the input), "
            f"got {tuple(logits.shape)}"
        )
    b = batch.to(logits.device)
    rows = (b.row_positions - batch.first_position).clamp(min=0)
    student = torch.gather(logits, 1, rows[..., None].expand(-1, -1, logits.shape[-1]))
    return _assemble(b, student, same_vocab, torch.promote_types(logits.dtype, torch.float32))


def distill_batch_fused(
    batch: CollatedBatch,
    hidden: Tensor,
    head: torch.nn.Module,
    *,
    same_vocab: bool,
    softcap: float | None = None,
    chunk_rows: int | None = None,
) -> DistillBatch:
    """As :func:`distill_batch` from the student's final hidden states ``hidden`` [B, batch.logits_to_keep, D]
    and its LM head module (``--fused-head``): the batch carries a ``FusedHead`` over the loss-span rows and a
    zero-stride placeholder for ``student_logits`` (shape [B, Ts, V], no memory)."""
    from .fused_head import fused_head

    if hidden.dim() != 3 or hidden.shape[1] != batch.logits_to_keep:
        raise ValueError(
            f"hidden states must be [B, {batch.logits_to_keep}, D] (positions {batch.first_position}.. of the "
            f"input), got {tuple(hidden.shape)}"
        )
    b = batch.to(hidden.device)
    rows = (b.row_positions - batch.first_position).clamp(min=0)
    h = torch.gather(hidden, 1, rows[..., None].expand(-1, -1, hidden.shape[-1]))  # [B, Ts, D]
    fh = fused_head(h, head, softcap, chunk_rows)
    placeholder = torch.zeros((), dtype=fh.cdt, device=hidden.device).expand(h.shape[0], h.shape[1], fh.v)
    return _assemble(b, placeholder, same_vocab, fh.cdt, fh)


def _assemble(
    b: CollatedBatch, student: Tensor, same_vocab: bool, fdt: torch.dtype, head: object = None
) -> DistillBatch:
    return DistillBatch(
        student_logits=student,
        student_mask=b.student_mask,
        student_targets=b.student_targets,
        teacher_topk_ids=b.teacher_topk_ids.long(),
        teacher_topk_logprobs=b.teacher_topk_logprobs.to(fdt),
        teacher_target_ids=b.teacher_target_ids,
        teacher_target_logprobs=b.teacher_target_logprobs.to(fdt),
        teacher_mask=b.teacher_mask,
        teacher_lse={tau: v.to(fdt) for tau, v in b.teacher_lse.items()} or None,
        pairs=b.pairs,
        pair_mask=b.pair_mask,
        chunks=b.chunks,
        chunk_mask=b.chunk_mask,
        same_vocab=same_vocab,
        student_head=head,
        teacher_tail_ids=None if b.teacher_tail_ids is None else b.teacher_tail_ids.long(),
        teacher_tail_logprobs=None if b.teacher_tail_logprobs is None else b.teacher_tail_logprobs.to(fdt),
    )


def student_forward(
    model: torch.nn.Module,
    batch: CollatedBatch,
    *,
    same_vocab: bool,
    fused: bool = False,
    head_chunk: int | None = None,
) -> DistillBatch:
    """Run the student on ``batch`` (moved to the model's device) and build its ``DistillBatch`` (no KV cache: a
    training forward does not need one, and gradient checkpointing refuses it).

    ``fused`` (``--fused-head``): the model (possibly DDP-wrapped: it is still called through the wrapper) returns
    the logits of its last position only; a forward hook on its decoder keeps the final hidden states, and the
    losses run through the fused, chunked head (``distill.fused_head``) with ``head_chunk`` rows per chunk."""
    device = next(model.parameters()).device
    b = batch.to(device)
    if not fused:
        out = model(
            input_ids=b.input_ids, attention_mask=b.attention_mask, logits_to_keep=b.logits_to_keep, use_cache=False
        )
        return distill_batch(b, out.logits, same_vocab=same_vocab)
    from .fused_head import head_parts

    decoder, head, softcap = head_parts(model)
    kept: list[Tensor] = []
    keep = b.logits_to_keep

    def hook(_module: torch.nn.Module, _args: object, output: object) -> None:
        hs = output[0] if isinstance(output, tuple) else output.last_hidden_state  # type: ignore[attr-defined]
        kept.append(hs[:, -keep:] if keep else hs)

    handle = decoder.register_forward_hook(hook)
    try:
        model(input_ids=b.input_ids, attention_mask=b.attention_mask, logits_to_keep=1, use_cache=False)
    finally:
        handle.remove()
    if len(kept) != 1:
        raise RuntimeError(f"--fused-head: the decoder ran {len(kept)} times in one forward; expected once")
    return distill_batch_fused(
        b, kept[0], head, same_vocab=same_vocab, softcap=softcap, chunk_rows=head_chunk
    )


__all__ = ["CollatedBatch", "Example", "collate", "distill_batch", "distill_batch_fused", "student_forward"]
