"""The shard runner shared by stages one and two: in-process, on a local dask cluster, failures, shutdown."""

from __future__ import annotations

import io
import logging
import os
import time

import psutil
import pytest
from distributed import WorkerPlugin, get_worker

from logitcache.pipeline.shard_runner import ClusterOptions, progress_bar, run_shards

SIZES = {0: 3, 1: 1, 2: 4, 3: 2, 4: 5}


def square_task(offset: int, shard: int, progress) -> dict:
    """Reports its shard's units one at a time (in-process only), the last one left for the runner to count."""
    if progress is not None:
        for _ in range(SIZES[shard] - 1):
            progress(1, 10)
    return {"value": offset + shard * shard, "pid": os.getpid(), "tokens": 10 * SIZES[shard]}


def failing_task(bad: int, shard: int, progress) -> dict:
    if shard == bad:
        raise ValueError(f"cannot do shard {shard}")
    return {"value": shard}


class SlowTeardown(WorkerPlugin):
    """Makes its worker take ``seconds`` to close, like a worker that imported torch on a busy machine."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def teardown(self, worker) -> None:
        time.sleep(self.seconds)


def slow_exit_task(seconds: float, shard: int, progress) -> int:
    get_worker().plugins["slow-exit"] = SlowTeardown(seconds)
    return shard


class Recorder:
    def __init__(self) -> None:
        self.units = 0
        self.tokens = 0

    def __call__(self, units: int, tokens: int) -> None:
        self.units += units
        self.tokens += tokens


@pytest.fixture
def nanny_warnings():
    """Warnings logged by dask's nannies (``Worker process still alive after 4.0 seconds, killing``)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("distributed.nanny")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def children() -> set[int]:
    """Our child processes, less multiprocessing's resource tracker (started by the first spawn, kept for good)."""
    out = set()
    for p in psutil.Process().children(recursive=True):
        try:
            if not any("resource_tracker" in part for part in p.cmdline()):
                out.add(p.pid)
        except psutil.NoSuchProcess:
            pass
    return out


def test_local_runs_every_shard_here_and_counts_progress() -> None:
    todo = [4, 0, 2]
    bar = Recorder()
    out = run_shards(todo, square_task, (100,), sizes=SIZES, progress=bar)
    assert out == {s: {"value": 100 + s * s, "pid": os.getpid(), "tokens": 10 * SIZES[s]} for s in todo}
    # the task reported all but one unit per shard; the runner counts the rest so the bar ends full
    assert bar.units == sum(SIZES[s] for s in todo)
    assert bar.tokens == sum(10 * (SIZES[s] - 1) for s in todo)


def test_nothing_to_do_starts_nothing() -> None:
    before = children()
    assert run_shards([], square_task, (0,), workers=4) == {}
    assert children() == before


def test_two_local_workers_equal_in_process_and_leave_nothing_behind(nanny_warnings) -> None:
    todo = list(SIZES)
    local = run_shards(todo, square_task, (7,), sizes=SIZES)
    before = children()
    bar = Recorder()
    remote = run_shards(
        todo, square_task, (7,), workers=2, sizes=SIZES, progress=bar, tokens_of=lambda r: r["tokens"]
    )
    assert set(remote) == set(todo)
    assert {s: r["value"] for s, r in remote.items()} == {s: r["value"] for s, r in local.items()}
    assert all(r["pid"] != os.getpid() for r in remote.values())  # ran in worker processes
    assert bar.units == sum(SIZES.values()) and bar.tokens == sum(10 * n for n in SIZES.values())
    assert children() == before  # the cluster's processes are gone
    assert not [r for r in nanny_warnings if "still alive" in r.getMessage()]


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failing_shard_raises_its_own_error_naming_the_shard(workers: int) -> None:
    before = children()
    with pytest.raises(ValueError, match="cannot do shard 3") as err:
        run_shards([0, 1, 2, 3, 4], failing_task, (3,), workers=workers)
    assert "(while running shard 3)" in getattr(err.value, "__notes__", [])
    assert children() == before


def test_workers_get_time_to_close_instead_of_being_killed(nanny_warnings) -> None:
    # each worker needs 4.5 s to close: dask's own nanny kills it after 4 s, ours waits (close_timeout)
    before = children()
    out = run_shards([0, 1], slow_exit_task, (4.5,), workers=2, options=ClusterOptions(close_timeout=30))
    assert out == {0: 0, 1: 1}
    assert children() == before
    assert not [r for r in nanny_warnings if "still alive" in r.getMessage()]


def test_the_bar_counts_one_named_unit() -> None:
    out = io.StringIO()
    with progress_bar(10, "align", file=out) as update:
        update(3, 120)
        update(7, 0)
    text = out.getvalue()
    assert "align" in text and "10/10" in text and "tok/s" in text
    assert "seq/s" in text and "s/seq" not in text


def test_dask_spawns_get_the_parent_watch_only_while_a_cluster_runs() -> None:
    import subprocess
    import sys
    import threading
    from multiprocessing import spawn

    from logitcache.pipeline.shard_runner import _DIE_WITH_PARENT, workers_die_with_parent

    plain = spawn.get_command_line
    seen: dict[str, list[str]] = {}

    def spawn_from(name: str) -> None:
        t = threading.Thread(target=lambda: seen.__setitem__(name, spawn.get_command_line(pipe_handle=7)), name=name)
        t.start()
        t.join()

    with workers_die_with_parent(), workers_die_with_parent():  # nested: one wrapper
        spawn_from("AsyncProcess Dask Worker process (from Nanny) watch message queue")
        spawn_from("someone else's thread")
    assert spawn.get_command_line is plain  # restored
    prog = seen["AsyncProcess Dask Worker process (from Nanny) watch message queue"]
    other = seen["someone else's thread"]
    assert prog[-3] == "-c" and prog[-2].startswith("def _die_with_parent(")
    assert prog[-2].endswith(other[-2]) and other[-2].startswith("from multiprocessing.spawn import spawn_main")
    assert f"_die_with_parent({os.getpid()})" in prog[-2]
    # the lines run in a child: it goes on when its parent is the one named, exits at once otherwise
    ok = subprocess.run([sys.executable, "-c", _DIE_WITH_PARENT % os.getpid() + "print('ran')"],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and ok.stdout.strip() == "ran", ok.stderr
    orphan = subprocess.run([sys.executable, "-c", _DIE_WITH_PARENT % 1 + "print('ran')"],
                            capture_output=True, text=True, timeout=60)
    assert orphan.returncode == 1 and orphan.stdout == ""
