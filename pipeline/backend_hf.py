"""The transformers (``hf``) backend core of stage one: teacher top-K rows by scoring or by sampling.

Two pure functions turn token ids into :class:`~logitcache.storage.records.PositionRows` (DESIGN.md section 2):

- :func:`score_rows` (mode ``score``): one teacher-forced forward over a right-padded batch. The base model
  (``model.base_model``) returns the final hidden states ``[B, T, H]``; only the loss-span positions
  ``P-1 .. n-2`` of each sequence are gathered, and the output head (``model.get_output_embeddings()``, then the
  model's final logit transform: Gemma-2/3 ``final_logit_softcapping``, Cohere ``logit_scale``, Granite
  ``logits_scaling``) runs over them in chunks of ``chunk_positions``. So the ``[tokens, vocab]`` logits never
  exist at once (a 262k vocabulary costs 1 MiB per position in fp32); peak extra memory is
  ``chunk_positions x vocab x 4`` bytes (256 MiB for Gemma-3 at the default 256). Prompt positions never go
  through the head at all. The first call on a model checks, on a short probe, that this head reproduces the
  model's own ``forward`` logits, so an architecture with an unknown logit transform fails loudly instead of
  caching wrong numbers.
- :func:`generate_rows` (mode ``generate``): a sampling loop over a left-padded batch with the KV cache
  (``past_key_values``), calling the model's own ``forward`` with ``logits_to_keep=1`` exactly as
  ``model.generate`` does. Each step's logits serve both the capture and the sampling, so the realized token's
  logprob is the one it was sampled from (no second forward). Per-step work is batched tensor ops written into
  preallocated device buffers; the host sees the results once, at the end (one sync per step remains: the
  "all finished?" check, which ``generate`` has too).

Numerics: logits are computed in the model's dtype (as ``forward`` does) and upcast to float32; every row is a
log-softmax over the **full** vocabulary (the width of the logits, which may exceed ``len(tokenizer)``) at
temperature 1: ``logprob = logit - logsumexp(logits)``. Top-K is ``torch.topk`` (sorted, descending; ties in
index order of the kernel). The realized token's logprob is gathered from the same float32 logits, so it is
exact even outside the top-K. Optional ``extra_temperatures`` record ``logsumexp(logits / tau)`` per row, and
``logit_moments`` the mean and population standard deviation of the row's float32 logits over the same full width
(``torch.std_mean``, one extra read of the chunk, before anything overwrites it).

Sampling (``generate_rows``): temperature 0 is greedy (``argmax``, identical to ``generate(do_sample=False)``);
otherwise logits are divided by the temperature, filtered to the nucleus ``top_p`` (the same rule as
transformers' ``TopPLogitsWarper``) and sampled with a ``torch.Generator`` seeded by ``seed``: the same prompts,
batch composition, seed and device reproduce the same tokens. A sequence stops after emitting one of
``eos_ids``; that token is part of the completion and has its row (finish reason ``stop``); a sequence that hits
``max_new_tokens`` finishes with ``length``. Stop strings are not handled here.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from logitcache.config import ConfigError
from logitcache.models import pad_token_id
from logitcache.storage.records import PositionRows

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["Generated", "check_sampling", "check_top_k", "generate_rows", "logits_head", "score_rows", "vocab_width"]

Head = Callable[[torch.Tensor], torch.Tensor]
_HEAD_CHECKED: weakref.WeakKeyDictionary[torch.nn.Module, bool] = weakref.WeakKeyDictionary()


class Generated(NamedTuple):
    """One sampled completion: its token ids (EOS included when produced), finish reason and rows."""

    completion_ids: np.ndarray
    finish_reason: str
    rows: PositionRows


def check_sampling(max_new_tokens: int, temperature: float, top_p: float) -> None:
    """``ConfigError`` naming the flag for sampling parameters (shared by the hf and vllm backends)."""
    if max_new_tokens < 0:
        raise ConfigError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ConfigError(f"--temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ConfigError(f"--top-p must be in (0, 1], got {top_p}")


def vocab_width(model: PreTrainedModel) -> int:
    """Number of logits the model produces per position (its output-embedding rows; may exceed the tokenizer)."""
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.get_text_config().vocab_size)


def check_top_k(k: int, vocab: int) -> None:
    """Raise a one-line ``ConfigError`` naming ``--top-k`` unless ``1 <= k <= vocab``."""
    if not 1 <= int(k) <= int(vocab):
        raise ConfigError(f"--top-k {k} must be between 1 and the teacher's vocabulary size {vocab}")


# ------------------------------------------------------------------------------------------------------ head


def logits_head(model: PreTrainedModel) -> Head:
    """``hidden [N, H] -> logits float32 [N, V]``: the output embedding and the model's final logit transform."""
    emb = model.get_output_embeddings()
    if emb is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings; it is not a causal language model")
    cfg = model.config.get_text_config()
    softcap = getattr(cfg, "final_logit_softcapping", None)
    scale = getattr(cfg, "logit_scale", None)  # Cohere: logits * logit_scale
    scaling = getattr(cfg, "logits_scaling", None)  # Granite: logits / logits_scaling

    def head(hidden: torch.Tensor) -> torch.Tensor:
        logits = emb(hidden)
        if scale is not None:
            logits = logits * scale
        if scaling is not None:
            logits = logits / scaling
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        return logits.float()

    return head


def _base_forward(model: PreTrainedModel, **inputs: Any) -> torch.Tensor:
    base = model.base_model
    if base is model:
        raise ValueError(f"{type(model).__name__} exposes no base model to compute hidden states with")
    return base(**inputs, use_cache=False).last_hidden_state


def _check_head(model: PreTrainedModel, head: Head) -> None:
    """Once per model: the chunked head must reproduce ``model.forward``'s logits on a short probe."""
    if _HEAD_CHECKED.get(model):
        return
    n = min(6, vocab_width(model))
    ids = torch.arange(n, device=model.device).unsqueeze(0)
    full = model(input_ids=ids, use_cache=False).logits.float()
    ours = head(_base_forward(model, input_ids=ids))
    diff = (full - ours).abs().max().item()
    tol = 1e-4 if full.dtype == torch.float32 and model.dtype == torch.float32 else 2e-2
    if not diff <= tol * (1.0 + full.abs().max().item()):
        raise RuntimeError(
            f"the chunked output head does not reproduce {type(model).__name__}'s logits (max abs diff {diff:.3g}); "
            "this architecture applies a logit transform that pipeline/backend_hf.py does not know"
        )
    _HEAD_CHECKED[model] = True


# ------------------------------------------------------------------------------------------------------ rows


def _rows_from_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    k: int,
    temps: Sequence[float],
    scratch_ok: bool = False,
    moments: bool = False,
    tail: int = 0,
    generator: torch.Generator | None = None,
) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor], tuple[torch.Tensor, torch.Tensor] | None,
    tuple[torch.Tensor, torch.Tensor] | None,
]:  # fmt: skip
    """float32 logits ``[N, V]`` -> (topk ids ``[N, K]``, topk logprobs, target logprobs ``[N]``, extra lse,
    ``(mean, std)`` of the logits ``[N]`` each when ``moments``, else None, ``(ids, logprobs)`` ``[N, tail]`` of
    ``tail`` draws from outside the top-K (``_tail_draws``, with ``generator``) when ``tail``, else None).

    ``logsumexp(z / tau) = lse_1 / tau + log(sum(exp((z - lse_1) / tau)))``: every term is <= 1, so no max pass is
    needed, and the passes run in place in one scratch buffer (``logits`` itself for the last temperature when
    ``scratch_ok``: the caller no longer needs them). tau = 1 is ``lse_1``, computed anyway. Against
    ``torch.logsumexp(z / tau)`` this halves the statistics' cost (bench/row_stats.py) for the same value up to
    float32 rounding (~1e-6 relative). The moments are read first: the last pass may overwrite ``logits``."""
    mom: tuple[torch.Tensor, torch.Tensor] | None = None
    if moments:
        std, mean = torch.std_mean(logits, dim=-1, correction=0)  # population std, as numpy's default
        mom = (mean, std)
    lse = torch.logsumexp(logits, dim=-1)
    top_v, top_i = torch.topk(logits, k, dim=-1, sorted=True)
    target_lp = logits.gather(1, targets.unsqueeze(1)).squeeze(1) - lse
    draws = _tail_draws(logits, top_i, lse, tail, generator) if tail else None  # before any pass overwrites logits
    others = [t for t in temps if t != 1.0]
    extra: list[torch.Tensor] = []
    scratch: torch.Tensor | None = None
    for t in temps:
        if t == 1.0:
            extra.append(lse)
            continue
        if scratch_ok and t == others[-1]:
            buf = logits
        else:
            scratch = torch.empty_like(logits) if scratch is None else scratch
            buf = scratch
        torch.sub(logits, lse.unsqueeze(1), out=buf)
        extra.append(lse / t + buf.mul_(1.0 / t).exp_().sum(dim=-1).log_())
    return top_i, top_v - lse.unsqueeze(1), target_lp, extra, mom, draws


def _tail_draws(
    logits: torch.Tensor, top_i: torch.Tensor, lse: torch.Tensor, n: int, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` ids per row drawn with replacement from ``softmax(logits)`` restricted to outside the row's top-K
    (``top_i``), and their logprobs under the full distribution (``logits - lse``, like the top-K's).

    One scratch ``[N, V]`` buffer: weights ``exp(z - max outside the top-K)`` with the top-K zeroed
    (``torch.multinomial`` takes unnormalized weights). A row whose tail is all ``-inf`` logits (a model that masks
    tokens, K near V) draws uniformly from it and stores logprob ``-inf``: its tail mass is 0, so the estimators
    (``distill/losses_tail.py``) give the draw weight 0."""
    w = logits.scatter(1, top_i, float("-inf"))
    peak = w.amax(dim=-1, keepdim=True)
    dead = ~torch.isfinite(peak)
    w.sub_(torch.where(dead, torch.zeros_like(peak), peak)).exp_()
    if bool(dead.any()):
        w = torch.where(dead, torch.ones_like(w), w)
    w.scatter_(1, top_i, 0.0)
    ids = torch.multinomial(w, n, replacement=True, generator=generator)
    return ids, logits.gather(1, ids) - lse.unsqueeze(1)


#: added to the batch seed for the tail draws' generator, so that generate mode's sampled tokens do not depend on
#: --tail-samples (the draws use a generator of their own)
TAIL_SEED_OFFSET = 0x7A11


def _tail_generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed((int(seed) + TAIL_SEED_OFFSET) % 2**63)


def _temps(extra_temperatures: Iterable[float]) -> list[float]:
    temps = [float(t) for t in extra_temperatures]
    if any(not (math.isfinite(t) and t > 0) for t in temps):
        raise ConfigError(f"--extra-temperatures must be finite and > 0, got {temps}")
    return temps


@torch.inference_mode()
def score_rows(
    model: PreTrainedModel,
    token_ids_batch: Sequence[np.ndarray | Sequence[int]],
    prompt_lens: Sequence[int],
    k: int,
    chunk_positions: int = 256,
    extra_temperatures: Iterable[float] = (),
    logit_moments: bool = False,
    tail_samples: int = 0,
    seed: int = 0,
) -> list[PositionRows]:
    """Teacher-forced rows for each sequence's loss span ``P-1 .. n-2`` (``n - P`` rows; none when ``P == n``).

    ``token_ids_batch[i]`` is the full sequence (prompt + completion) and ``prompt_lens[i]`` its ``P``. The
    sequences run as one right-padded batch: group sequences of similar length for efficiency. ``tail_samples``
    draws per row from outside the top-K (``_tail_draws``), from a generator seeded by ``seed``: the same batch,
    seed, chunking and device reproduce them.
    """
    if len(token_ids_batch) != len(prompt_lens):
        raise ValueError(f"{len(token_ids_batch)} sequences but {len(prompt_lens)} prompt lengths")
    vocab = vocab_width(model)
    check_top_k(k, vocab)
    if chunk_positions < 1:
        raise ValueError(f"chunk_positions must be >= 1, got {chunk_positions}")
    temps = _temps(extra_temperatures)
    seqs = [np.asarray(s, dtype=np.int64).reshape(-1) for s in token_ids_batch]
    for i, (s, p) in enumerate(zip(seqs, prompt_lens)):
        if not (1 <= p <= len(s) or p == len(s) == 0):
            raise ValueError(f"sequence {i}: prompt length {p} outside [1, {len(s)}]")
        if len(s) and (s.min() < 0 or s.max() >= vocab):
            raise ValueError(f"sequence {i}: token ids outside [0, {vocab})")
    counts = [len(s) - int(p) for s, p in zip(seqs, prompt_lens)]
    if sum(counts) == 0:
        return [PositionRows.empty(k, tuple(temps), logit_moments, tail_samples) for _ in seqs]

    device = model.device
    head = logits_head(model)
    _check_head(model, head)
    live = [i for i, c in enumerate(counts) if c > 0]  # sequences with rows; others need no forward
    width = max(len(seqs[i]) for i in live)
    ids = torch.zeros((len(live), width), dtype=torch.long)
    mask = torch.zeros((len(live), width), dtype=torch.long)
    pos_b, pos_t = [], []
    for row, i in enumerate(live):
        ids[row, : len(seqs[i])] = torch.from_numpy(seqs[i])
        mask[row, : len(seqs[i])] = 1
        p = int(prompt_lens[i])
        pos_t.append(torch.arange(p - 1, len(seqs[i]) - 1))
        pos_b.append(torch.full((counts[i],), row))
    ids, mask = ids.to(device), mask.to(device)
    b_idx, t_idx = torch.cat(pos_b).to(device), torch.cat(pos_t).to(device)

    hidden = _base_forward(model, input_ids=ids, attention_mask=mask)
    hidden = hidden[b_idx, t_idx]  # [N, H]: only the loss-span positions
    targets = ids[b_idx, t_idx + 1]
    total = hidden.shape[0]
    top_i = torch.empty((total, k), dtype=torch.int32, device=device)
    top_lp = torch.empty((total, k), dtype=torch.float32, device=device)
    tgt_lp = torch.empty(total, dtype=torch.float32, device=device)
    extra = [torch.empty(total, dtype=torch.float32, device=device) for _ in temps]
    mom = [torch.empty(total, dtype=torch.float32, device=device) for _ in range(2 if logit_moments else 0)]
    tails = [torch.empty((total, tail_samples), dtype=dt, device=device) for dt in (torch.int32, torch.float32)]
    gen = _tail_generator(device, seed) if tail_samples else None
    for start in range(0, total, chunk_positions):
        stop = min(start + chunk_positions, total)
        ti, tl, tg, ex, mo, dr = _rows_from_logits(
            head(hidden[start:stop]), targets[start:stop], k, temps, scratch_ok=True, moments=logit_moments,
            tail=tail_samples, generator=gen,
        )
        top_i[start:stop], top_lp[start:stop], tgt_lp[start:stop] = ti, tl, tg
        for buf, val in zip(extra + mom + (tails if dr else []), ex + list(mo or ()) + list(dr or ())):
            buf[start:stop] = val

    all_rows = PositionRows(
        topk_ids=top_i.cpu().numpy(),
        topk_logprobs=top_lp.cpu().numpy(),
        target_ids=targets.cpu().numpy(),
        target_logprobs=tgt_lp.cpu().numpy(),
        extra_lse={t: v.cpu().numpy() for t, v in zip(temps, extra)},
        logit_mean=mom[0].cpu().numpy() if mom else None,
        logit_std=mom[1].cpu().numpy() if mom else None,
        tail_ids=tails[0].cpu().numpy() if tail_samples else None,
        tail_logprobs=tails[1].cpu().numpy() if tail_samples else None,
    )
    out: list[PositionRows] = []
    offset = 0
    for c in counts:
        empty = PositionRows.empty(k, tuple(temps), logit_moments, tail_samples)
        out.append(all_rows.slice(offset, offset + c) if c else empty)
        offset += c
    return out


# -------------------------------------------------------------------------------------------------- generate


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None) -> list[int]:
    from logitcache.models import end_token_ids

    return end_token_ids(tokenizer, model.generation_config)


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """Next token per row from float32 logits ``[B, V]`` (greedy at temperature 0)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    scores = logits / temperature
    if top_p < 1.0:  # transformers' TopPLogitsWarper: drop the low tail whose mass is <= 1 - top_p, keep >= 1
        sorted_scores, sorted_idx = torch.sort(scores, dim=-1, descending=False)
        cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop = cum <= (1.0 - top_p)
        drop[:, -1] = False
        scores = scores.masked_fill(drop.scatter(1, sorted_idx, drop), float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@torch.inference_mode()
def generate_rows(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    prompt_ids_batch: Sequence[np.ndarray | Sequence[int]],
    k: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_ids: Iterable[int] | None = None,
    extra_temperatures: Iterable[float] = (),
    pad_id: int | None = None,
    logit_moments: bool = False,
    tail_samples: int = 0,
) -> list[Generated]:
    """Sample a completion per prompt and capture each generated position's row (see the module docstring).

    ``eos_ids`` default to the tokenizer's and the generation config's EOS ids; pass ``()`` to never stop
    early. ``pad_id`` (default: the tokenizer's pad, else EOS, else 0) only fills masked slots. ``tail_samples``
    draws per row from outside the top-K (``_tail_draws``) use a generator of their own, seeded from ``seed``: the
    sampled tokens are the same with or without them.
    """
    vocab = vocab_width(model)
    check_top_k(k, vocab)
    check_sampling(max_new_tokens, temperature, top_p)
    temps = _temps(extra_temperatures)
    prompts = [np.asarray(p, dtype=np.int64).reshape(-1) for p in prompt_ids_batch]
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: generation needs at least one prompt token")
        if p.min() < 0 or p.max() >= vocab:
            raise ValueError(f"prompt {i}: token ids outside [0, {vocab})")
    eos = sorted({int(e) for e in eos_ids}) if eos_ids is not None else _eos_ids(model, tokenizer)
    if pad_id is None:
        pad_id = pad_token_id(tokenizer, eos)
    batch = len(prompts)
    if batch == 0:
        return []
    if max_new_tokens == 0:
        empty = np.zeros(0, np.int32)
        rows0 = PositionRows.empty(k, tuple(temps), logit_moments, tail_samples)
        return [Generated(empty, "length", rows0) for _ in prompts]

    device = model.device
    width = max(len(p) for p in prompts)
    ids = torch.full((batch, width), pad_id, dtype=torch.long)
    mask = torch.zeros((batch, width), dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding
        ids[i, width - len(p) :] = torch.from_numpy(p)
        mask[i, width - len(p) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    position_ids = (mask.cumsum(-1) - 1).clamp_(min=0)
    eos_t = torch.tensor(eos, dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(int(seed))

    top_i = torch.zeros((batch, max_new_tokens, k), dtype=torch.int32, device=device)
    top_lp = torch.zeros((batch, max_new_tokens, k), dtype=torch.float32, device=device)
    tokens = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)
    tok_lp = torch.zeros((batch, max_new_tokens), dtype=torch.float32, device=device)
    extra = [torch.zeros((batch, max_new_tokens), dtype=torch.float32, device=device) for _ in temps]
    mom = [torch.zeros((batch, max_new_tokens), dtype=torch.float32, device=device) for _ in range(2 * logit_moments)]
    tails = [
        torch.zeros((batch, max_new_tokens, tail_samples), dtype=dt, device=device)
        for dt in (torch.int32, torch.float32)
    ]
    tail_gen = _tail_generator(device, seed) if tail_samples else None
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    lengths = torch.zeros(batch, dtype=torch.long, device=device)
    ones = torch.ones((batch, 1), dtype=mask.dtype, device=device)

    cache = None
    step_ids, step_pos = ids, position_ids
    for step in range(max_new_tokens):
        out = model(
            input_ids=step_ids,
            attention_mask=mask,
            position_ids=step_pos,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        cache = out.past_key_values
        logits = out.logits[:, -1, :].float()
        nxt = _sample(logits, temperature, top_p, generator)
        nxt = torch.where(finished, pad_id, nxt)
        ti, tl, tg, ex, mo, dr = _rows_from_logits(
            logits, nxt, k, temps, moments=logit_moments, tail=tail_samples, generator=tail_gen
        )
        top_i[:, step], top_lp[:, step], tok_lp[:, step], tokens[:, step] = ti, tl, tg, nxt
        for buf, val in zip(extra + mom + (tails if dr else []), ex + list(mo or ()) + list(dr or ())):
            buf[:, step] = val
        lengths += ~finished
        if eos:
            finished |= torch.isin(nxt, eos_t)
            if bool(finished.all()):
                break
        step_ids = nxt.unsqueeze(1)
        step_pos = step_pos[:, -1:] + 1
        mask = torch.cat([mask, ones], dim=1)

    n_steps = step + 1
    lengths_np = lengths.cpu().numpy()
    tokens_np = tokens[:, :n_steps].cpu().numpy()
    top_i_np, top_lp_np = top_i[:, :n_steps].cpu().numpy(), top_lp[:, :n_steps].cpu().numpy()
    tok_lp_np = tok_lp[:, :n_steps].cpu().numpy()
    extra_np = [e[:, :n_steps].cpu().numpy() for e in extra]
    mom_np = [m[:, :n_steps].cpu().numpy() for m in mom]
    tails_np = [t[:, :n_steps].cpu().numpy() for t in tails] if tail_samples else []
    eos_set = set(eos)
    results: list[Generated] = []
    for b in range(batch):
        n = int(lengths_np[b])
        completion = tokens_np[b, :n].astype(np.int32)
        reason = "stop" if n and int(completion[-1]) in eos_set else "length"
        rows = PositionRows(
            topk_ids=top_i_np[b, :n],
            topk_logprobs=top_lp_np[b, :n],
            target_ids=completion,
            target_logprobs=tok_lp_np[b, :n],
            extra_lse={t: e[b, :n] for t, e in zip(temps, extra_np)},
            logit_mean=mom_np[0][b, :n] if mom_np else None,
            logit_std=mom_np[1][b, :n] if mom_np else None,
            tail_ids=tails_np[0][b, :n] if tails_np else None,
            tail_logprobs=tails_np[1][b, :n] if tails_np else None,
        )
        results.append(Generated(completion, reason, rows))
    return results
