"""``logitcache verify`` as a command: it exits cleanly every time, leaves no thread behind, and prints its notes.

The abort it once had (``terminate called without an active exception`` after printing OK, about one run in 60
on a busy machine) came from parquet reads through Arrow's I/O thread pool on Python file objects: an Arrow
thread could drop the last reference to a buffer of Python bytes while the interpreter finalized, and CPython
ends a thread that asks for the GIL then with ``pthread_exit``, whose unwind aborts in a ``noexcept`` C++
frame (see ``storage.fs``, "Parquet and threads"). The deterministic check is that verify starts no native
thread at all (Linux: ``/proc/self/task``); the repeated runs are the end-to-end symptom.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from cache_helpers import random_record, write_cache
from click.testing import CliRunner

from logitcache.cli import main


@pytest.fixture(scope="module")
def arrow_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small cache whose positions are parquet (the arrow backend), beside ``train_setup``'s zarr one."""
    path = tmp_path_factory.mktemp("verify-exit") / "arrow"
    rng = np.random.default_rng(0)
    write_cache(str(path), [[random_record(rng, i + 4 * s) for i in range(4)] for s in range(3)], backend="arrow")
    return path


_THREADS = textwrap.dedent(
    """
    import json, os, sys, threading
    from logitcache.storage import verify_cache

    def native():  # OS threads of this process that Python does not know about (Arrow's pools, ...)
        return {int(t) for t in os.listdir("/proc/self/task")} - {t.native_id for t in threading.enumerate()}

    before_native, before = native(), set(threading.enumerate())
    problems = [p for url in sys.argv[1:] for p in verify_cache(url)]
    started = [t for t in threading.enumerate() if t not in before]
    print(json.dumps({
        "problems": problems,
        "new_native": sorted(native() - before_native),
        "new_non_daemon": [t.name for t in started if not t.daemon and t.is_alive()],
        "new_python": [t.name for t in started],
    }))
    """
)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts OS threads through /proc (Linux)")
def test_verify_leaves_no_thread_behind(train_setup, arrow_cache) -> None:
    """A fresh interpreter (Arrow's pools not yet started by other tests) verifies a zarr cache with an alignment
    store and an arrow-backend cache: every parquet file kind is read, and no native thread is started."""
    caches = [str(train_setup["cache"]), str(arrow_cache)]
    assert (train_setup["cache"] / "alignments").is_dir()  # precondition: the store's parquet files are read too
    out = subprocess.run(
        [sys.executable, "-c", _THREADS, *caches], capture_output=True, text=True, timeout=120, check=True
    )
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["problems"] == []
    assert report["new_non_daemon"] == []
    # zarr's event loop and its executor are daemon Python threads that zarr stops at exit; nothing else
    assert all(n == "zarr_io" or n.startswith(("asyncio_", "zarr_pool")) for n in report["new_python"]), report
    assert report["new_native"] == [], report  # no Arrow pool thread that could hold Python objects at exit


def test_verify_exits_cleanly_every_time(train_setup, arrow_cache) -> None:
    """The symptom end to end: repeated ``logitcache verify`` runs exit 0, print OK and nothing on stderr."""
    cli = [sys.executable, "-c", "from logitcache.cli import main; main()", "verify"]
    runs = 0
    while runs < 8:  # a fixed count, not a time budget: a loaded machine must not turn this into a failure
        cache = [train_setup["cache"], arrow_cache][runs % 2]
        r = subprocess.run([*cli, str(cache)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "terminate called" not in r.stderr, (runs, r.returncode, r.stderr)
        assert r.stdout.strip().endswith(": OK") and r.stderr == "", (r.stdout, r.stderr)
        runs += 1


def test_notes_are_printed_and_do_not_change_the_exit_status(tmp_path: Path) -> None:
    """An older cache (no checksums recorded) verifies OK with a `note:` line per thing it could not check."""
    rng = np.random.default_rng(1)
    write_cache(str(tmp_path / "c"), [[random_record(rng, i)] for i in range(2)])
    manifest = tmp_path / "c" / "manifest.json"
    doc = json.loads(manifest.read_text())
    assert doc.pop("checksums")  # precondition: this writer records them; an older one did not
    manifest.write_text(json.dumps(doc))
    r = CliRunner().invoke(main, ["verify", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    notes = [ln for ln in r.stdout.splitlines() if ln.startswith("note: ")]
    assert any("manifest.json: no header checksum recorded" in n for n in notes), r.stdout
    assert r.stdout.splitlines()[-1].endswith(": OK")
    # with a problem as well: the notes still print, the problem decides the exit status
    (tmp_path / "c" / "cache.json").write_text("{not json")
    r = CliRunner().invoke(main, ["verify", str(tmp_path / "c")])
    assert r.exit_code == 1
    assert any(ln.startswith("note: ") for ln in r.stdout.splitlines()), r.stdout
    assert "problem: cache.json" in r.stderr, r.stderr
