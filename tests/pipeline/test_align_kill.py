"""``align`` killed with SIGKILL: no process of its tree outlives it for long, and a rerun completes the same store.

Each run starts in its own session (``start_new_session``), so every process it starts (dask workers,
multiprocessing's resource tracker) shares that session id even once orphaned; only the parent is killed, and
the test polls, with a deadline, until no process of the session is left. Two moments: a worker has written a
shard (dask's own pipe watch could end it), and a worker still starting up (``__mp_main__`` sleeps, as a worker
importing torch on a busy machine does): only ``PR_SET_PDEATHSIG`` set before anything else ends that one.
The S3 test runs the same kill against moto's S3 server on 127.0.0.1, with the default number of workers.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil
import pytest
from gen_helpers import write_prompts

from logitcache.pipeline.align_stage import AlignConfig, load_student_tokenizer, run_align, student_store_key
from logitcache.pipeline.generate_stage import GenerateConfig, run_generate
from logitcache.storage import LogitCache, verify_cache
from logitcache.storage.alignment_store import AlignmentStore
from logitcache.testing.tiny_models import unigram_tokenizer

STUDENT_TEMPLATE = "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}### assistant:"
CLI = [sys.executable, "-c", "from logitcache.cli import main; main()"]
GONE_WITHIN = 5.0  # seconds after the parent's death by which its whole tree must be gone

#: a parent whose spawned workers take a minute to start (``__mp_main__`` is this script, run by each worker)
SLOW_START = """\
import sys, time
if __name__ == "__mp_main__":
    time.sleep(60)
if __name__ == "__main__":
    from logitcache.cli import main
    main()
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory, ascii_teacher_folder):
    """Score caches of 24 shards of 20 sequences (``cache``) and 12 of 10 (``small``, for S3: fewer requests), a
    student tokenizer, and each cache's uninterrupted store (``reference``, ``small-reference``)."""
    root = tmp_path_factory.mktemp("align-kill")
    data = write_prompts(root / "p.jsonl", 480)
    for name, n, size in (("cache", 480, 20), ("small", 120, 10)):
        cfg = GenerateConfig(
            model=str(ascii_teacher_folder), data=str(data), out=str(root / name), mode="score", top_k=4,
            shard_size=size, limit=n,
        )
        run_generate(cfg)
    tok = unigram_tokenizer()
    tok.chat_template = STUDENT_TEMPLATE
    tok.save_pretrained(root / "student")
    for name in ("cache", "small"):
        shutil.copytree(root / name, root / f"{name}-reference")
        ref = AlignConfig(cache=str(root / f"{name}-reference"), student_tokenizer=str(root / "student"), workers=1)
        run_align(ref)
    return root


def session_processes(sid: int) -> list[psutil.Process]:
    """Live (not zombie) processes of session ``sid``."""
    out = []
    for pid in psutil.pids():
        try:
            if os.getsid(pid) == sid:
                p = psutil.Process(pid)
                if p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
        except (ProcessLookupError, PermissionError, psutil.NoSuchProcess):
            pass
    return out


def wait_for(what: str, cond: Callable[[], bool], proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.01)


def kill_parent_and_wait_for_tree(proc: subprocess.Popen) -> float:
    """SIGKILL ``proc`` only; returns the seconds until no process of its session was left (fails past the bound)."""
    assert session_processes(proc.pid), "precondition: the tree is running"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    t0 = time.monotonic()
    while left := session_processes(proc.pid):
        if time.monotonic() - t0 > GONE_WITHIN:
            names = [" ".join(p.cmdline())[:80] for p in left]
            for p in left:  # leave nothing running for the next test
                p.kill()
            pytest.fail(f"{len(left)} processes outlived the killed align by {GONE_WITHIN} s: {names}")
        time.sleep(0.02)
    return time.monotonic() - t0


def workers_of(proc: subprocess.Popen) -> list[psutil.Process]:
    out = []
    for p in session_processes(proc.pid):
        try:
            if any("spawn_main" in part for part in p.cmdline()):
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def store_shards(cache: Path) -> list[Path]:
    return sorted(cache.glob("alignments/*/shards/shard-*/_COMPLETE.json"))


def assert_same_store(cache: LogitCache, reference: LogitCache, student, n: int) -> None:
    key = student_store_key(student)
    a, b = AlignmentStore.open(cache, key), AlignmentStore.open(reference, key)
    ids = [rec.sample_id for rec in reference.iter_sequences()]
    assert len(ids) == n
    for sid in ids:
        x, y = a.get(sid), b.get(sid)
        assert x.student_prompt_text == y.student_prompt_text
        for field in ("student_token_ids", "student_offsets", "pairs", "chunks"):
            np.testing.assert_array_equal(getattr(x, field), getattr(y, field), err_msg=f"sample {sid} {field}")


def test_killed_align_leaves_no_process_and_the_rerun_completes(built, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(built / "cache", cache)
    args = ["align", str(cache), "--student-tokenizer", str(built / "student"), "--workers", "2"]
    log = open(tmp_path / "align.log", "w")  # noqa: SIM115

    # 1. a worker has written a shard; the others are busy
    proc = subprocess.Popen([*CLI, *args], start_new_session=True, stdout=log, stderr=log)
    wait_for("first aligned shard", lambda: bool(store_shards(cache)), proc)
    kill_parent_and_wait_for_tree(proc)
    done = len(store_shards(cache))
    assert 0 < done < 24, done  # precondition: killed mid-run

    # 2. workers still starting up (each sleeps in __mp_main__): before, they outlived the parent by a minute
    (tmp_path / "slow_start.py").write_text(SLOW_START)
    proc = subprocess.Popen(
        [sys.executable, str(tmp_path / "slow_start.py"), *args], start_new_session=True, stdout=log, stderr=log
    )
    wait_for("a worker process", lambda: bool(workers_of(proc)), proc)
    kill_parent_and_wait_for_tree(proc)
    assert len(store_shards(cache)) == done  # nothing was written

    # 3. the rerun finishes the store; it equals the uninterrupted one and verifies
    r = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "still alive" not in r.stderr  # workers closed, not killed
    student = load_student_tokenizer(str(built / "student"))
    assert_same_store(LogitCache.open(cache), LogitCache.open(built / "cache-reference"), student, 480)
    assert verify_cache(cache) == []


# -- the same on an S3-compatible server -----------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on 127.0.0.1: (storage options, environment for a CLI subprocess)."""
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    import boto3

    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test", region_name="us-east-1"
    ).create_bucket(Bucket="kills")
    opts = {"key": "test", "secret": "test", "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
    env = {
        **os.environ,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    yield opts, env
    server.stop()


@pytest.mark.slow  # about a minute: every shard is a dozen requests to the in-process server
def test_killed_align_on_s3_reruns_to_the_local_result(built, s3):
    """The reported fault (`cannot finalize, shards [...] are not aligned yet` on the first rerun after a kill,
    with the default workers): killed after some shards, the rerun completes, verifies, and equals a local run."""
    import s3fs

    opts, env = s3
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **opts)
    fs.put(str(built / "small"), "kills/cache", recursive=True)
    url = "s3://kills/cache"
    assert verify_cache(url, storage_options=opts) == []  # precondition: the upload is a sound cache

    def aligned() -> int:
        fs.invalidate_cache()
        return len(fs.glob("kills/cache/alignments/*/shards/shard-*/_COMPLETE.json"))

    args = ["align", url, "--student-tokenizer", str(built / "student")]  # default workers: one per core
    proc = subprocess.Popen([*CLI, *args], start_new_session=True, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_for("first aligned shard on S3", lambda: aligned() > 0, proc)
    kill_parent_and_wait_for_tree(proc)
    done = aligned()
    assert 0 < done < 12, done  # precondition: killed mid-run
    r = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    v = subprocess.run([*CLI, "verify", url], capture_output=True, text=True, timeout=300, env=env)
    assert v.returncode == 0 and v.stdout.strip().endswith(": OK"), v.stdout + v.stderr
    student = load_student_tokenizer(str(built / "student"))
    reference = LogitCache.open(built / "small-reference")
    assert_same_store(LogitCache.open(url, storage_options=opts), reference, student, 120)
