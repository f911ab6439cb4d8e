"""Stream a cache and its alignment store into padded training batches (no teacher anywhere).

``make_example`` joins one cached sequence with its alignment record:

- student input: the student's own rendering of the prompt + its tokenization of the completion, plus the
  student's end token when the teacher's completion ended (the teacher's cache then holds an end row, and stage
  two pairs it with the student's end row). The end token is the student's turn end that stage two records in
  the store header (``student_end_token``: ``<|im_end|>`` for a ChatML student, as eval scores it), not
  necessarily its EOS; stores made before that field fall back to the EOS (`student_end_id`);
  student row ``j`` sits at input position ``P_s - 1 + j`` and predicts
  ``targets[j]``;
- teacher rows: the cached loss-span rows, unchanged;
- ``--max-length``: a sequence whose student side is too long is cut at the last *shared* boundary (a chunk end)
  that fits, on both sides at the same byte, so pairs and chunks stay exact; a prompt that alone does not fit
  skips the example (counted).

``ExampleStream`` yields a rank's examples in the order of ``distill.sampling`` and remembers its position as
``(epoch, offset)``. A training stream reads the rank's next shard on a background thread while it yields the
current one (at most two shards in memory; ``read_ahead=False``: one), so a shard boundary does not stall the
loader; the order, the errors (raised when their shard is reached) and ``state()`` are those of a plain sequential
read. Every shard is checked as it is read (``distill.integrity``: ids in range, logprobs not NaN, <= 0 and
sorted, row counts and alignment indices consistent), so a damaged cache stops the run with one line instead of
training on bad rows. ``Prefetcher`` collates batches (``distill.batch.collate``) on a background thread (the
readers decompress with the GIL released), so a step finds its next batch ready.
"""

from __future__ import annotations

import itertools
import queue
import threading
import weakref
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from logitcache.storage import LogitCache, SequenceRecord
from logitcache.storage.alignment_store import AlignmentRecord, AlignmentStore

from .batch import CollatedBatch, Example, collate
from .integrity import StudentLimits, read_checked_shard
from .sampling import assign_shards, check_world, is_heldout, shard_permutation, skip

__all__ = ["CollatedBatch", "Example", "ExampleStream", "Prefetcher", "collate", "make_example", "student_end_id"]


def student_end_id(store_header: dict, tokenizer: object) -> tuple[int | None, str]:
    """The id the student's end row trains, and where it came from ("store" or "eos fallback").

    Stage two records the student's turn end (``student_end_token``, None when the tokenizer has no end at all);
    a store made before that field falls back to the tokenizer's EOS, which is wrong for a chat student whose
    EOS is not its turn end (rerun ``align --overwrite`` to record it).
    """
    if "student_end_token" in store_header:
        end = store_header["student_end_token"]
        return (None if end is None else int(end["id"])), "store"
    eos = getattr(tokenizer, "eos_token_id", None)
    return (None if eos is None else int(eos)), "eos fallback"


def make_example(
    rec: SequenceRecord, al: AlignmentRecord, eos_id: int | None, max_length: int | None
) -> Example | None:
    """One training example, or None if its prompt alone exceeds ``max_length``."""
    ids = np.asarray(al.student_token_ids, np.int64)
    plen = al.student_prompt_len
    ended = al.teacher_end >= 0 and eos_id is not None
    n_targets = len(ids) - plen + ended
    teacher, pairs, chunks = rec.rows, np.asarray(al.pairs, np.int64), np.asarray(al.chunks, np.int64)
    t_rows = teacher.n
    if max_length is not None and plen + n_targets > max_length:
        budget = max_length - plen
        fits = chunks[chunks[:, 3] <= budget] if len(chunks) else chunks
        if budget < 1 or len(fits) == 0:
            return None
        s_cut, t_cut = int(fits[-1, 3]), int(fits[-1, 1])
        input_ids = ids[: plen + s_cut].copy()
        teacher = teacher.slice(0, t_cut)
        t_rows = t_cut
        pairs = pairs[(pairs[:, 0] < t_cut) & (pairs[:, 1] < s_cut)]
        chunks = fits
    else:
        # nothing to cut: the input is the student's ids (+ EOS); a pair can only fall out (a row without a
        # target) when the store pairs an end row but there is no EOS id, so filter only then
        input_ids = np.append(ids, eos_id) if ended else ids.copy() if ids is al.student_token_ids else ids
        if len(pairs) and pairs[:, 1].max() >= n_targets:
            pairs = pairs[pairs[:, 1] < n_targets]
    return Example(
        sample_id=rec.sample_id,
        input_ids=input_ids,
        prompt_len=plen,
        targets=input_ids[plen:],
        teacher=teacher if teacher.n == t_rows else teacher.slice(0, t_rows),
        pairs=pairs,
        chunks=chunks,
        teacher_token_ids=np.asarray(rec.token_ids[: rec.prompt_len + t_rows], np.int64),
        teacher_prompt_len=rec.prompt_len,
    )


_Shard = tuple[list[SequenceRecord], dict[int, AlignmentRecord]]
_READ_LOCKS: weakref.WeakKeyDictionary[LogitCache, threading.Lock] = weakref.WeakKeyDictionary()
_READ_LOCKS_GUARD = threading.Lock()


def _read_lock(cache: LogitCache) -> threading.Lock:
    """One lock per cache object: its shard LRUs are not thread-safe, and streams (train read-ahead, eval) share it."""
    with _READ_LOCKS_GUARD:
        lock = _READ_LOCKS.get(cache)
        if lock is None:
            lock = _READ_LOCKS[cache] = threading.Lock()
        return lock


class ExampleStream:
    """A rank's endless example stream (``split="train"``), or one pass over its held-out samples ("eval").

    A training stream reads the next shard on a background thread while it yields the current one
    (``read_ahead``); that changes neither the order, nor ``state()``, nor when a read error is raised.
    """

    def __init__(
        self,
        cache: LogitCache,
        store: AlignmentStore,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        split: str = "train",
        heldout_fraction: float = 0.0,
        max_length: int | None = None,
        eos_id: int | None = None,
        epoch: int = 0,
        offset: int = 0,
        read_ahead: bool = True,
        limits: StudentLimits | None = None,
    ) -> None:
        self.cache, self.store = cache, store
        self.rank, self.world, self.seed = rank, world_size, seed
        self.split, self.heldout, self.max_length, self.eos_id = split, heldout_fraction, max_length, eos_id
        self.epoch, self.offset = epoch, offset  # the position of the next example
        self.read_ahead = read_ahead
        self.limits = limits or StudentLimits()
        self.sizes = [s.sequences for s in cache.shards]
        self.indices = [s.index for s in cache.shards]
        self.skipped_overlong = 0
        check_world(self.sizes, world_size)

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset, "rank": self.rank, "world_size": self.world}

    def _shard(self, k: int) -> _Shard:
        with _read_lock(self.cache):
            return read_checked_shard(self.cache, self.store, self.indices[k], self.limits)

    def _keep(self, sample_id: int) -> bool:
        return is_heldout(sample_id, self.heldout, self.seed) == (self.split == "eval")

    def _following(self, epoch: int, shard_list: list[int], pos: int) -> int:
        """The shard the stream reads after ``shard_list[pos]`` (what ``skip`` gives once that shard is done)."""
        end = sum(self.sizes[s] for s in shard_list[: pos + 1])
        epoch, pos, _ = skip(self.sizes, self.rank, self.world, self.seed, epoch, end)
        return assign_shards(self.sizes, self.world, self.seed, epoch)[self.rank][pos]

    def __iter__(self) -> Iterator[Example]:
        if self.split == "eval":
            for k in assign_shards(self.sizes, self.world, self.seed, 0)[self.rank]:
                records, aligned = self._shard(k)
                for rec in records:
                    if self._keep(rec.sample_id):
                        ex = make_example(rec, aligned[rec.sample_id], self.eos_id, self.max_length)
                        if ex is not None:
                            yield ex
            return
        pool = ThreadPoolExecutor(1, thread_name_prefix="logitcache-read-ahead") if self.read_ahead else None
        held_out, eos_id, max_length = self.heldout > 0, self.eos_id, self.max_length  # (no held-out: keep all)
        current: tuple[int, _Shard] | None = None  # the shard being yielded
        ahead: tuple[int, Future[_Shard]] | None = None  # the next one, being read
        try:
            while True:
                epoch, pos, start = skip(self.sizes, self.rank, self.world, self.seed, self.epoch, self.offset)
                shard_list = assign_shards(self.sizes, self.world, self.seed, epoch)[self.rank]
                self.epoch, self.offset = epoch, sum(self.sizes[s] for s in shard_list[:pos]) + start
                k = shard_list[pos]
                if current is not None and current[0] == k:  # the rank's only shard again: already in memory
                    shard = current[1]
                elif ahead is not None and ahead[0] == k:
                    shard = ahead[1].result()  # a read error surfaces here, where the plain read would raise it
                else:
                    shard = self._shard(k)
                current, ahead = (k, shard), None
                if pool is not None:
                    k_next = self._following(epoch, shard_list, pos)
                    if k_next != k:
                        try:
                            ahead = (k_next, pool.submit(self._shard, k_next))
                        except RuntimeError:  # interpreter shutting down: read it when it comes
                            pass
                records, aligned = shard
                order = shard_permutation(self.sizes[k], self.seed, epoch, k)
                for i in order[start:].tolist():
                    self.offset += 1
                    rec = records[i]
                    if held_out and not self._keep(rec.sample_id):
                        continue
                    ex = make_example(rec, aligned[rec.sample_id], eos_id, max_length)
                    if ex is None:
                        self.skipped_overlong += 1
                        continue
                    yield ex
        finally:  # closed (or collected): let a read in flight finish, so none outlives the stream
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)


class Prefetcher:
    """Collate batches of ``batch_size`` examples on a background thread, ``depth`` batches ahead.

    Each item is ``(batch, stream_state_after_it, examples)``, so a checkpoint saved after a step resumes exactly
    at the next batch.
    """

    def __init__(
        self, stream: ExampleStream, batch_size: int, pad_id: int, depth: int = 4, keep_examples: bool = False
    ) -> None:
        self.stream = stream
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.keep_examples = keep_examples
        self.k = stream.cache.top_k
        self.temps = list(stream.cache.header.extra_temperatures)
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="logitcache-prefetch")
        self._thread.start()

    def _run(self) -> None:
        it = iter(self.stream)
        try:
            put = self._queue.put_nowait
            while not self._stop.is_set():
                examples = list(itertools.islice(it, self.batch_size))
                if not examples:
                    self._queue.put(None)
                    return
                item = (
                    collate(examples, self.pad_id, self.k, self.temps),
                    self.stream.state(),
                    examples if self.keep_examples else None,
                )
                try:
                    put(item)  # the common case: a free slot, no wait
                except queue.Full:
                    while not self._stop.is_set():  # the consumer is behind: wait, but notice close()
                        try:
                            self._queue.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                if len(examples) < self.batch_size:
                    self._queue.put(None)
                    return
        except BaseException as e:  # surface reader errors in the training thread
            self._queue.put(e)
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()  # the stream's read-ahead thread ends with it

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> tuple[CollatedBatch, dict[str, int], list[Example] | None]:
        item = self._queue.get()
        if item is None:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        """Stop the thread and join it (and with it the stream's read-ahead), so no batch is in flight after."""
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get_nowait()
            except queue.Empty:
                self._thread.join(timeout=0.1)
