"""Memory that never surprises: ``train``'s estimate of its peak before the first step, the measured peak after
the first steps, and the one-line message an out-of-memory condition ends with.

The estimate is arithmetic on the model's shapes, per rank, for the configured ``--batch-size`` x
``--max-length`` (a batch of full-length sequences: the worst case the loader can produce):

- parameters, gradients and AdamW's two states: 4 bytes each per trainable parameter (fp32 master weights;
  divided by the world size under ``--parallel fsdp``, which shards all three);
- activations kept for backward: per token and layer ~``10 h + 4 I`` values (norm inputs, q/k/v, attention
  output, residuals; the MLP's gate, up, activation and down input), in the compute dtype (4 bytes on CPU, 2 under
  bf16 autocast), plus ``2 heads T^2`` per sequence and layer with eager attention. With
  ``--gradient-checkpointing`` only each layer's input is kept, plus one layer's activations during its recompute;
- logits: unfused, the [B, T, V] logits and the gathered loss-span copy (compute dtype), and in backward their
  fp32 dense gradient, its cast and the scatter into the full logits' gradient: ~``B T V (3 e + 4)`` bytes;
  fused (``--fused-head``): a few fp32 [chunk, V] temporaries and two fp32 [V, D] weight-gradient buffers.

It is an estimate (allocator slack, the loader's prefetched batches and the framework's own buffers are not in it):
``bench/train.py`` prints it beside the measured peaks. The measured peak is CUDA's ``max_memory_allocated`` on a
GPU, else the process's peak RSS (``ru_maxrss``, model loading included).
"""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["OOM_ERRORS", "MemoryEstimate", "estimate_memory", "is_oom", "measured_peak", "oom_message"]

GIB = float(1 << 30)

#: the out-of-memory conditions train can catch (the kernel's OOM killer sends SIGKILL: nothing to catch)
OOM_ERRORS: tuple[type[BaseException], ...] = (torch.OutOfMemoryError, MemoryError)


def is_oom(error: BaseException) -> bool:
    """An out-of-memory condition: CUDA's ``OutOfMemoryError``, Python's ``MemoryError``, or the CPU allocator's
    ``RuntimeError`` ("DefaultCPUAllocator: can't allocate memory", e.g. under ``ulimit -v``)."""
    if isinstance(error, OOM_ERRORS):
        return True
    return isinstance(error, RuntimeError) and "can't allocate memory" in str(error)


@dataclass
class MemoryEstimate:
    """Bytes per rank."""

    parameters: float
    gradients: float
    optimizer: float
    activations: float
    logits_unfused: float
    logits_fused: float
    fused: bool
    where: str  # "GPU" or "CPU"

    @property
    def logits(self) -> float:
        return self.logits_fused if self.fused else self.logits_unfused

    @property
    def total(self) -> float:
        return self.parameters + self.gradients + self.optimizer + self.activations + self.logits

    def line(self, batch: int, length: int, checkpointing: bool) -> str:
        g = lambda x: f"{x / GIB:.2f}"  # noqa: E731
        other = "unfused" if self.fused else "--fused-head"
        alt = self.logits_unfused if self.fused else self.logits_fused
        return (
            f"estimated peak {self.where} memory per rank: ~{g(self.total)} GiB = parameters {g(self.parameters)} + "
            f"gradients {g(self.gradients)} + AdamW {g(self.optimizer)} + activations {g(self.activations)} (batch "
            f"{batch} x {length} tokens, gradient checkpointing {'on' if checkpointing else 'off'}) + logits "
            f"{g(self.logits)} ({'fused head' if self.fused else 'unfused'}; {other}: {g(alt)})"
        )


def _text_config(model: Any) -> Any:
    config = getattr(model, "config", None)
    return config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config


def estimate_memory(
    model: Any,
    *,
    batch_size: int,
    max_length: int,
    bf16: bool,
    checkpointing: bool,
    fused: bool,
    head_chunk: int | None,
    attn: str | None,
    shards: int = 1,
    device_type: str = "cpu",
) -> MemoryEstimate:
    """The estimate for ``model`` (loaded, fp32) at ``batch_size`` x ``max_length`` (see the module docstring)."""
    from .fused_head import default_chunk_rows

    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    pbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    cfg = _text_config(model)
    h = int(getattr(cfg, "hidden_size", 0) or 0)
    inter = int(getattr(cfg, "intermediate_size", 0) or 4 * h)
    layers = int(getattr(cfg, "num_hidden_layers", 0) or 0)
    heads = int(getattr(cfg, "num_attention_heads", 0) or 0)
    head = model.get_output_embeddings()
    v = int(head.weight.shape[0]) if head is not None else int(getattr(cfg, "vocab_size", 0) or 0)
    e = 2 if bf16 else 4
    tokens = batch_size * max_length
    per_layer = tokens * (10 * h + 4 * inter) * e
    if attn == "eager":
        per_layer += batch_size * 2 * heads * max_length * max_length * e
    activations = layers * tokens * h * e + per_layer if checkpointing else layers * per_layer
    logits_unfused = tokens * v * (3 * e + 4)
    rows = head_chunk or default_chunk_rows(v)
    logits_fused = 4 * min(rows, tokens) * v * 4 + 2 * v * (h or 1) * 4  # temporaries; the [V, D] grad buffers
    shards = max(1, shards)
    del params
    return MemoryEstimate(
        parameters=pbytes / shards,
        gradients=trainable * 4 / shards,
        optimizer=trainable * 8 / shards,
        activations=float(activations),
        logits_unfused=float(logits_unfused),
        logits_fused=float(logits_fused),
        fused=fused,
        where="GPU" if device_type == "cuda" else "CPU",
    )


def measured_peak(device: torch.device) -> tuple[float, str]:
    """(bytes, what was measured): CUDA's max_memory_allocated on a GPU, else the process's peak RSS."""
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device)), "CUDA max_memory_allocated"
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale), "peak RSS of the process"


def oom_message(
    step: int, batch_size: int, max_length: int, estimate: MemoryEstimate | None, error: BaseException
) -> str:
    """One line: where it ran out, and the knobs that lower the peak."""
    est = f", estimated peak ~{estimate.total / GIB:.1f} GiB per rank" if estimate is not None else ""
    kind = type(error).__name__
    return (
        f"out of memory ({kind}) in step {step + 1} at batch {batch_size} x {max_length} tokens{est}: lower "
        "--batch-size (raise --grad-accum to keep the effective batch) or --max-length, add "
        "--gradient-checkpointing and --fused-head, or shard the student over GPUs with --parallel fsdp"
    )
