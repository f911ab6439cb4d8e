"""Where a training process runs: its rank, the world size, its device, autocast and DDP or FSDP (``RunContext``).

One process per rank (plain ``python``: rank 0 of 1; ``torchrun``: ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` from the
environment, the process group initialized here with nccl on GPU, gloo on CPU). Collectives are no-ops in a
single process, so the training loop calls them unconditionally.

``parallel`` is how the student is spread over the ranks: "none" (one process: ``--parallel`` has nothing to do,
whatever it says), "ddp" (a whole replica per rank, gradients all-reduced) or "fsdp" (``distill.parallel``:
parameters, gradients and optimizer state sharded). ``wrap``, ``accumulating`` and ``lockstep`` hide the
difference from the training loop.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from . import parallel as fsdp

T = TypeVar("T")


@dataclass
class RunContext:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    #: bf16 autocast around the student forward and the losses
    bf16: bool
    #: "none" (one process), "ddp" or "fsdp"; default: "ddp" when there is more than one rank
    parallel: str = ""

    def __post_init__(self) -> None:
        if not self.parallel or self.world == 1:
            self.parallel = "ddp" if self.world > 1 else "none"

    @staticmethod
    def setup(
        device: str | None = None, dtype: str = "auto", threads: int | None = None, parallel: str = "ddp"
    ) -> RunContext:
        """Join the process group (under torchrun) and pick the device: ``device``, else ``cuda:LOCAL_RANK``
        when CUDA is available, else the CPU. ``dtype`` "auto": bf16 autocast on GPU, float32 on CPU.
        ``parallel`` ("ddp" or "fsdp") applies when there is more than one rank."""
        if threads:
            torch.set_num_threads(threads)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        dev = torch.device(device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"))
        if dev.type == "cuda":
            torch.cuda.set_device(dev)  # FSDP's device mesh and NCCL's object collectives use the current device
        bf16 = dtype == "bfloat16" or (dtype == "auto" and dev.type == "cuda")
        mode = parallel if world > 1 else "none"
        return RunContext(rank=rank, world=world, local_rank=local_rank, device=dev, bf16=bf16, parallel=mode)

    @property
    def distributed(self) -> bool:
        return torch.distributed.is_available() and torch.distributed.is_initialized()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self) -> AbstractContextManager[Any]:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model the loop runs: DDP-wrapped, or sharded in place (FSDP: the same object), when there is more
        than one rank. Build the optimizer after this: FSDP replaces the parameters."""
        if self.parallel == "fsdp":
            return fsdp.shard(model, self.device, self.world, self.bf16)
        return torch.nn.parallel.DistributedDataParallel(model) if self.parallel == "ddp" else model

    @contextlib.contextmanager
    def accumulating(self, model: torch.nn.Module, sync: bool) -> Iterator[None]:
        """Skip the gradient all-reduce (DDP) or reduce-scatter (FSDP) on a micro-batch that is not the last of
        its step (``sync`` False)."""
        if self.parallel == "fsdp":
            fsdp.set_gradient_sync(model, sync)
            yield
        elif sync or self.parallel == "none":
            yield
        else:
            with model.no_sync():  # type: ignore[operator]
                yield

    def lockstep(self, items: Iterable[T]) -> Iterator[tuple[T | None, bool]]:
        """``(item, True)`` per item, then ``(None, False)`` while another rank still has items: the rank must run
        ``idle_forward`` then, since a forward is a collective (FSDP all-gathers the parameters; DDP broadcasts
        the buffers, and a rank that stopped early left the others hanging in it)."""
        if self.parallel == "none":
            yield from ((item, True) for item in items)
            return
        yield from fsdp.lockstep(items, lambda flag: self.all_sum([float(flag)])[0] > 0)

    def idle_forward(self, model: torch.nn.Module) -> None:
        fsdp.idle_forward(model, self.device)

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def all_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.distributed:
            torch.distributed.all_reduce(t)
        return t.tolist()

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (``[obj]`` in a single process)."""
        if not self.distributed:
            return [obj]
        objs: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(objs, obj)
        return objs
