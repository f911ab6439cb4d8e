"""Stream a cache and its alignment store into padded training batches (no teacher anywhere).

``make_example`` joins one cached sequence with its alignment record:

- student input: the student's own rendering of the prompt + its tokenization of the completion, plus the
  student's EOS when the teacher's completion ended (the teacher's cache then holds an EOS row, and stage two
  pairs it with the student's end row); student row ``j`` sits at input position ``P_s - 1 + j`` and predicts
  ``targets[j]``;
- teacher rows: the cached loss-span rows, unchanged;
- ``--max-length``: a sequence whose student side is too long is cut at the last *shared* boundary (a chunk end)
  that fits, on both sides at the same byte, so pairs and chunks stay exact; a prompt that alone does not fit
  skips the example (counted).

``ExampleStream`` yields a rank's examples in the order of ``distill.sampling`` and remembers its position as
``(epoch, offset)``. A training stream reads the rank's next shard on a background thread while it yields the
current one (at most two shards in memory; ``read_ahead=False``: one), so a shard boundary does not stall the
loader; the order, the errors (raised when their shard is reached) and ``state()`` are those of a plain sequential
read. ``Prefetcher`` collates batches on a background thread (the readers decompress with the GIL released), so a
step finds its next batch ready.
"""

from __future__ import annotations

import itertools
import queue
import threading
import weakref
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from logitcache.storage import LogitCache, PositionRows, SequenceRecord
from logitcache.storage.alignment_store import AlignmentRecord, AlignmentStore

from .sampling import assign_shards, check_world, is_heldout, shard_permutation, skip


@dataclass
class Example:
    sample_id: int
    input_ids: np.ndarray  # int64 [L]: student prompt + completion (+ EOS)
    prompt_len: int  # P_s
    targets: np.ndarray  # int64 [Ts]
    teacher: PositionRows  # [Tt] rows
    pairs: np.ndarray  # int64 [P, 2]
    chunks: np.ndarray  # int64 [C, 4]
    teacher_token_ids: np.ndarray  # the teacher's full sequence (for --teacher online scoring)
    teacher_prompt_len: int


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
    ) -> None:
        self.cache, self.store = cache, store
        self.rank, self.world, self.seed = rank, world_size, seed
        self.split, self.heldout, self.max_length, self.eos_id = split, heldout_fraction, max_length, eos_id
        self.epoch, self.offset = epoch, offset  # the position of the next example
        self.read_ahead = read_ahead
        self.sizes = [s.sequences for s in cache.shards]
        self.indices = [s.index for s in cache.shards]
        self.skipped_overlong = 0
        check_world(self.sizes, world_size)

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset, "rank": self.rank, "world_size": self.world}

    def _shard(self, k: int) -> _Shard:
        index = self.indices[k]
        with _read_lock(self.cache):
            records = list(self.cache.iter_shard(index))
            aligned = {a.sample_id: a for a in self.store.iter_shard(index)}
        return records, aligned

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


def _pad(arrays: list[np.ndarray], length: int, value: float, dtype: type) -> torch.Tensor:
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


def _mask(lengths: list[int], length: int) -> torch.Tensor:
    return torch.from_numpy(_mask_np(lengths, length))


def collate(examples: list[Example], pad_id: int, k: int, temperatures: list[float]) -> dict[str, torch.Tensor]:
    """Padded tensors for ``DistillBatch`` (minus the student logits) and for the student forward.

    Teacher top-k ids stay int32 on the host (the largest field); ``train.student_batch`` widens them on the device.
    """
    lens = [len(e.input_ids) for e in examples]
    n_s = [len(e.targets) for e in examples]
    teachers = [e.teacher for e in examples]
    n_t = [t.n for t in teachers]
    n_p = [len(e.pairs) for e in examples]
    n_c = [len(e.chunks) for e in examples]
    ts, tt, tp, tc = max(n_s), max(max(n_t), 1), max(max(n_p), 1), max(max(n_c), 1)
    s_mask = _mask_np(n_s, ts)
    plens = np.asarray([e.prompt_len for e in examples], np.int64)
    batch = {
        "input_ids": _pad([e.input_ids for e in examples], max(lens), pad_id, np.int64),
        "attention_mask": torch.from_numpy(_mask_np(lens, max(lens)).astype(np.int64)),
        "row_positions": torch.from_numpy(np.where(s_mask, plens[:, None] - 1 + np.arange(ts), 0)),
        "student_targets": _pad([e.targets for e in examples], ts, -100, np.int64),
        "student_mask": torch.from_numpy(s_mask),
        "teacher_topk_ids": _pad([t.topk_ids.reshape(-1, k) for t in teachers], tt, 0, np.int32),
        "teacher_topk_logprobs": _pad([t.topk_logprobs.reshape(-1, k) for t in teachers], tt, -np.inf, np.float32),
        "teacher_target_ids": _pad([t.target_ids for t in teachers], tt, 0, np.int64),
        "teacher_target_logprobs": _pad([t.target_logprobs for t in teachers], tt, 0.0, np.float32),
        "teacher_mask": _mask(n_t, tt),
        "pairs": _pad([e.pairs.reshape(-1, 2) for e in examples], tp, 0, np.int64),
        "pair_mask": _mask(n_p, tp),
        "chunks": _pad([e.chunks.reshape(-1, 4) for e in examples], tc, 0, np.int64),
        "chunk_mask": _mask(n_c, tc),
        "sample_ids": torch.as_tensor([e.sample_id for e in examples], dtype=torch.long),
    }
    for tau in temperatures:
        batch[f"lse@{tau:g}"] = _pad([t.extra_lse[tau] for t in teachers], tt, 0.0, np.float32)
    return batch


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

    def __next__(self) -> tuple[dict[str, torch.Tensor], dict[str, int], list[Example] | None]:
        item = self._queue.get()
        if item is None:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        """Stop the thread and wait for it, so no batch is in flight when the process exits."""
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get_nowait()
            except queue.Empty:
                self._thread.join(timeout=0.1)
