"""FSDP for ``logitcache train --parallel fsdp``: shard the student over the ranks, and save and load it sharded.

DDP keeps the whole student, its gradients and both AdamW moments on every rank (16 bytes per parameter in fp32);
FSDP (PyTorch's own ``fully_shard``, "FSDP2") keeps 1/world of each and all-gathers one transformer block's
parameters at a time for its forward and backward, then frees them. The price is communication: every step
all-gathers the parameters twice (forward, backward) and reduce-scatters the gradients, about 1.5x DDP's
all-reduce volume, which on NVLink is mostly hidden behind compute and across slow links is not.

- ``shard``: ``fully_shard`` on each transformer block (the model's ``_no_split_modules`` classes, e.g.
  ``LlamaDecoderLayer``), then on the root, which holds the embeddings, the final norm and the LM head (tied or
  not) and keeps them unsharded from its forward until its backward (``reshard_after_forward=False``), so code
  that uses the head's weight after the forward (the fused head) sees the whole weight and its gradient is
  reduce-scattered with the root's. The module stays the same object (FSDP2 swaps its class in place); its
  parameters become ``DTensor`` shards. Under bf16 the parameters are all-gathered and computed in bf16 and the
  gradients reduced in fp32 (``MixedPrecisionPolicy``); the sharded master copy and AdamW stay fp32, as they do
  under DDP + autocast.
- Checkpoints: ``save_sharded``/``load_sharded`` write and read model + optimizer with
  ``torch.distributed.checkpoint`` (DCP), every rank its own shard in parallel, no rank ever holding the whole
  optimizer. ``full_state_dict`` gathers the parameters to rank 0 (on the CPU) for a normal ``save_pretrained``
  folder that ``eval`` and users load like any other: every checkpoint has one, at the cost of rank 0 holding one
  fp32 copy of the student in host memory while it writes.
- Collectives: an FSDP forward is itself a collective (the all-gather; a DDP forward broadcasts the buffers), so
  every rank must run the same number of forwards. Training does (``--grad-accum`` micro-batches per step on
  every rank); evaluation, whose ranks hold different numbers of batches, runs ``lockstep`` and lets a rank that
  ran out join with ``idle_forward`` (under DDP too: ``RunContext.lockstep``).

Everything here runs on CPU with gloo (the tests do) as well as on GPUs with NCCL.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch

from logitcache.config import ConfigError

T = TypeVar("T")

#: the folder of a checkpoint that holds the sharded model and optimizer (DCP)
SHARDED_DIR = "sharded"


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks, by the class names transformers lists in ``_no_split_modules``."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names and m is not model]
    if not blocks:
        raise ConfigError(
            f"--parallel fsdp: cannot find the transformer blocks of {type(model).__name__} (it lists no "
            "_no_split_modules); train it with --parallel ddp"
        )
    return blocks


def shard(model: torch.nn.Module, device: torch.device, world: int, bf16: bool) -> torch.nn.Module:
    """``fully_shard`` each transformer block, then the root; returns the (same) model, now sharded."""
    from torch.distributed.device_mesh import init_device_mesh

    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:  # public from torch 2.6 on
        raise ConfigError(
            f"--parallel fsdp needs torch >= 2.6 (fully_shard), this is {torch.__version__}; upgrade torch or "
            "use --parallel ddp"
        ) from None

    mesh = init_device_mesh(device.type, (world,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    kwargs: dict[str, Any] = {"mesh": mesh} | ({"mp_policy": mp} if mp is not None else {})
    for block in transformer_blocks(model):
        fully_shard(block, **kwargs)
    # the root keeps its parameters unsharded from its forward to its backward: the backward needs them at once,
    # and a loss that reads the LM head's weight after the forward (the fused head) gets the whole weight
    fully_shard(model, reshard_after_forward=False, **kwargs)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def set_gradient_sync(model: torch.nn.Module, sync: bool) -> None:
    """Reduce-scatter the gradients after this backward (``sync``) or keep accumulating them unsharded."""
    model.set_requires_gradient_sync(sync)  # type: ignore[operator]


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's parameters on rank 0's CPU (empty elsewhere); a collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_sharded(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank writes its shard of the model and the optimizer into ``path`` (a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(path))


def load_sharded(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load ``save_sharded``'s model and optimizer into the sharded ``model`` and its ``optimizer``, in place."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def lockstep(items: Iterable[T], any_left: Any) -> Iterator[tuple[T | None, bool]]:
    """``(item, True)`` for each of this rank's items, then ``(None, False)`` while another rank still has some.
    ``any_left(flag) -> bool``: whether any rank's flag is set (an all-reduce)."""
    it: Iterator[T] | None = iter(items)
    while True:
        item = next(it, None) if it is not None else None
        if item is None:
            it = None  # exhausted: never ask again (a finished Prefetcher would block)
        if not any_left(item is not None):
            return
        yield item, item is not None


def idle_forward(model: torch.nn.Module, device: torch.device) -> None:
    """A one-token forward whose result is dropped: this rank's part in the others' all-gathers."""
    with torch.no_grad():
        model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device))
