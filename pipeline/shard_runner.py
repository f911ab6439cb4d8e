"""Run a stage's todo shards: in this process, on a local dask cluster of worker processes, or on a scheduler.

Stages one (``generate``) and two (``align``) share this runner. A stage hands it the shard indices still to do
and a per-shard task, a module-level function called as ``task(*args, shard, progress)`` that writes one shard
and returns its marker. Three ways to run them:

- ``workers <= 1`` and no scheduler: in this process, in order. ``progress`` is a callable ``(units, tokens)``
  that the task calls as it goes (increments), so the bar moves within a shard; when the shard ends, the units
  it did not report (samples it skipped) are added, so the bar ends full;
- ``workers > 1``: a ``dask.distributed.LocalCluster`` of ``min(workers, shards)`` single-threaded worker
  processes, each keeping whatever the task caches per process (an engine, a tokenizer) for all the shards it
  is given. ``ClusterOptions`` says whether workers may start processes of their own (vLLM's engine core needs
  non-daemonic workers) and whether each worker is pinned to one GPU (``CUDA_VISIBLE_DEVICES``);
- ``scheduler``: the same on an existing dask scheduler (its workers, its GPUs, nothing pinned).

On workers the task gets ``progress=None``; the bar advances by the shard's size (``sizes``) and the marker's
token count (``tokens_of``) when a shard's result comes back. Results come back in completion order; the
runner returns them keyed by shard, so callers never depend on the order. A failing shard stops the run: its
exception propagates with its own type (the CLI still recognises user errors) and a note naming the shard; the
shards still queued are cancelled.

Shutdown. The client closes before the cluster (context managers, innermost first), and each worker gets
``close_timeout`` seconds to exit before its nanny kills it. dask's nanny allows 5 s (4 s after asking), which
a worker that imported torch and transformers could miss on a busy machine, so normal runs logged "Worker
process still alive after 4.0 seconds, killing"; ``LocalCluster.close(timeout)`` does not reach the nannies, so
the cluster is built with a nanny class whose close waits longer (the kill stays as the last resort). After a
failed shard the workers get dask's 5 s only: one may still be busy with a long shard nobody wants.

Parent death. A local cluster's processes are the client's children: the client process also hosts the
scheduler and the nannies, and each nanny spawns one worker process (plus multiprocessing's resource tracker,
which exits once every holder of its pipe is gone). dask's worker watches a pipe to its nanny and exits when it
closes, but only from its entry point on: a worker still starting up (unpickling its process object imports
dask and distributed, seconds on a busy machine) outlived a SIGKILLed client until it got there. While a local
cluster runs, every worker process is therefore spawned with a few lines run before anything else
(:data:`_DIE_WITH_PARENT`): on Linux ``prctl(PR_SET_PDEATHSIG, SIGKILL)``, so the kernel kills the worker
when the process that spawned it dies, then a check that the parent is still the one that spawned it (it may
have died before the ``prctl``); elsewhere a daemon thread that polls ``os.getppid()``. The kernel sends the
signal when the spawning *thread* exits; dask spawns each worker from a thread that lives until the worker has
exited, so a normal close is not cut short. Only spawns from dask's process threads get these lines.

The bar (:func:`progress_bar`) counts one named unit (sequences: ``seq/s``, never tqdm's inverted ``s/seq``)
and shows the token rate after it.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO, TypeVar

R = TypeVar("R")

#: ``progress(units, tokens)``: increments since the previous call
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class ClusterOptions:
    """How a local cluster is started (ignored with an external scheduler)."""

    #: False lets workers start child processes (vLLM's engine core); daemonic processes may not
    daemon: bool = True
    #: pin each local worker to one GPU when the machine has several (one engine per GPU)
    pin_gpus: bool = False
    #: seconds a closing worker gets to exit before it is killed
    close_timeout: float = 30.0


def _note(exc: BaseException, shard: int) -> None:
    note = f"(while running shard {shard})"
    if note not in getattr(exc, "__notes__", ()):
        exc.add_note(note)


def _pin_gpu(gpus: int) -> None:
    """Give this dask worker process one of ``gpus`` GPUs, by its worker name, before CUDA initializes."""
    if gpus > 1 and "CUDA_VISIBLE_DEVICES" not in os.environ:
        from distributed import get_worker

        name = get_worker().name
        index = name if isinstance(name, int) else int(str(name).rsplit("-", 1)[-1] or 0)
        os.environ["CUDA_VISIBLE_DEVICES"] = str(index % gpus)


def _remote(task: Callable[..., R], args: tuple[Any, ...], shard: int, gpus: int) -> R:
    _pin_gpu(gpus)
    return task(*args, shard, None)


class _Counted:
    """A progress callback that also counts the units it passed on."""

    def __init__(self, progress: Progress | None) -> None:
        self.progress = progress
        self.units = 0

    def __call__(self, units: int, tokens: int) -> None:
        self.units += units
        if self.progress is not None:
            self.progress(units, tokens)


def _run_local(
    todo: Sequence[int],
    task: Callable[..., R],
    args: tuple[Any, ...],
    sizes: Mapping[int, int],
    progress: Progress | None,
) -> dict[int, R]:
    results: dict[int, R] = {}
    for shard in todo:
        report = _Counted(progress)
        try:
            results[shard] = task(*args, shard, report)
        except BaseException as e:
            _note(e, shard)
            raise
        rest = sizes.get(shard, 0) - report.units  # samples the task skipped (overlong, ...) still count as done
        if progress is not None and rest > 0:
            progress(rest, 0)
    return results


def _gpu_count() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return int(torch.cuda.device_count())


def _patient_nanny(patience: list[float]) -> type:
    """dask's ``Nanny`` whose close gives the worker process ``patience[0]`` seconds (at least dask's 5) to exit."""
    from distributed import Nanny

    class PatientNanny(Nanny):
        async def close(self, timeout: float = 5, reason: str = "nanny-close") -> Any:  # type: ignore[override]
            return await super().close(timeout=max(timeout, patience[0]), reason=reason)

    return PatientNanny


#: run by each local worker process before ``spawn_main``: die with the process that spawned it (``%d``: its pid)
_DIE_WITH_PARENT = """\
def _die_with_parent(parent):
    import os
    try:
        import ctypes, signal
        if ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL)) != 0:  # PR_SET_PDEATHSIG
            raise OSError(ctypes.get_errno(), "prctl")
        watch = False
    except Exception:  # not Linux: poll instead
        watch = True
    if os.getppid() != parent:  # the parent died before the prctl
        os._exit(1)
    if watch:
        import threading, time
        def poll():
            while os.getppid() == parent:
                time.sleep(0.25)
            os._exit(1)
        threading.Thread(target=poll, name="logitcache-parent-watch", daemon=True).start()
_die_with_parent(%d)
del _die_with_parent
"""

_spawn_guard = threading.Lock()
_spawn_users = [0]


@contextlib.contextmanager
def workers_die_with_parent() -> Iterator[None]:
    """While active, worker processes that dask spawns in this process die with it (see the module docstring).

    Wraps ``multiprocessing.spawn.get_command_line`` (what every spawn start method calls for the child's
    ``python -c PROG`` command line) for dask's process threads only; nested uses share one wrapper.
    """
    from multiprocessing import spawn

    with _spawn_guard:
        if _spawn_users[0] == 0:
            original = spawn.get_command_line

            def get_command_line(**kwds: Any) -> list[str]:
                cmd = original(**kwds)
                if threading.current_thread().name.startswith("AsyncProcess") and "-c" in cmd[:-1]:
                    at = cmd.index("-c") + 1
                    cmd[at] = _DIE_WITH_PARENT % os.getpid() + cmd[at]
                return cmd

            get_command_line.original = original  # type: ignore[attr-defined]
            spawn.get_command_line = get_command_line
        _spawn_users[0] += 1
    try:
        yield
    finally:
        with _spawn_guard:
            _spawn_users[0] -= 1
            if _spawn_users[0] == 0:
                spawn.get_command_line = spawn.get_command_line.original  # type: ignore[attr-defined]


@contextlib.contextmanager
def _client(workers: int, scheduler: str | None, options: ClusterOptions) -> Iterator[Any]:
    """A dask client on ``scheduler``, or on a local cluster of ``workers`` processes that is gone on exit."""
    import dask
    from dask.distributed import Client, LocalCluster

    if scheduler:
        with Client(scheduler) as client:
            yield client
        return
    patience = [options.close_timeout]
    with workers_die_with_parent():
        with dask.config.set({"distributed.worker.daemon": options.daemon}):
            cluster = LocalCluster(
                n_workers=workers,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,  # no dashboard; its HTTP server (health routes) on a free port, not 8787
                scheduler_kwargs={"dashboard_address": ":0"},
                worker_class=_patient_nanny(patience),
            )
        try:
            with Client(cluster) as client:
                yield client
        except BaseException:
            patience[0] = 0  # a shard failed: workers still busy with others are not waited for
            raise
        finally:
            cluster.close()  # each nanny bounds its own worker's exit


def _run_dask(
    todo: Sequence[int],
    task: Callable[..., R],
    args: tuple[Any, ...],
    workers: int,
    scheduler: str | None,
    sizes: Mapping[int, int],
    progress: Progress | None,
    tokens_of: Callable[[R], int] | None,
    options: ClusterOptions,
) -> dict[int, R]:
    from dask.distributed import as_completed

    gpus = _gpu_count() if options.pin_gpus and not scheduler else 0
    results: dict[int, R] = {}
    with _client(min(workers, len(todo)), scheduler, options) as client:
        futures = {client.submit(_remote, task, args, shard, gpus, pure=False): shard for shard in todo}
        try:
            for fut in as_completed(futures):
                shard = futures[fut]
                try:
                    result = fut.result()
                except BaseException as e:
                    _note(e, shard)
                    raise
                results[shard] = result
                if progress is not None:
                    progress(sizes.get(shard, 0), tokens_of(result) if tokens_of is not None else 0)
        finally:
            pending = [f for f in futures if not f.done()]
            if pending:
                client.cancel(pending)
    return results


def run_shards(
    todo: Sequence[int],
    task: Callable[..., R],
    args: tuple[Any, ...] = (),
    *,
    workers: int = 1,
    scheduler: str | None = None,
    sizes: Mapping[int, int] | None = None,
    progress: Progress | None = None,
    tokens_of: Callable[[R], int] | None = None,
    options: ClusterOptions | None = None,
) -> dict[int, R]:
    """Run ``task(*args, shard, progress)`` for every shard of ``todo``; returns ``{shard: result}``.

    ``task`` and ``args`` must pickle (by reference: a module-level function) when ``workers > 1`` or
    ``scheduler`` is given. ``sizes[shard]`` is the shard's number of progress units (sequences).
    """
    sizes = sizes or {}
    if not todo:
        return {}
    if workers <= 1 and not scheduler:
        return _run_local(todo, task, args, sizes, progress)
    return _run_dask(todo, task, args, workers, scheduler, sizes, progress, tokens_of, options or ClusterOptions())


@contextlib.contextmanager
def progress_bar(
    total: int, desc: str, unit: str = "seq", file: TextIO | None = None, rate_unit: str = "tok"
) -> Iterator[Progress]:
    """A tqdm bar (on stderr by default) counting ``unit`` (always ``unit/s``), then the rate of ``rate_unit``
    (what the task's token counts mean: ``pos`` for cached positions, ``student tok`` for student tokens)."""
    from tqdm import tqdm

    fmt = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]"
    bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, bar_format=fmt, file=file)
    t0, tokens = time.perf_counter(), [0]

    def update(units: int, new_tokens: int) -> None:
        tokens[0] += new_tokens
        bar.set_postfix_str(f"{tokens[0] / max(time.perf_counter() - t0, 1e-9):,.0f} {rate_unit}/s", refresh=False)
        bar.update(units)

    try:
        yield update
    finally:
        bar.close()
