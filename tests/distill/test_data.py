"""The loader (``distill.data``): the ``--max-length`` cut, read-ahead, and the prefetch thread's life and errors."""

from __future__ import annotations

import itertools
import threading

import numpy as np
import pytest

from logitcache.distill.batch import collate
from logitcache.distill.data import ExampleStream, Prefetcher, make_example, student_end_id
from logitcache.distill.sampling import assign_shards
from logitcache.storage import LogitCache, PositionRows, SequenceRecord
from logitcache.storage.alignment_store import AlignmentRecord, AlignmentStore, list_stores


def open_data(setup) -> tuple[LogitCache, AlignmentStore]:
    cache = LogitCache.open(setup["cache"])
    (key,) = list_stores(cache)
    return cache, AlignmentStore.open(cache, key)


def all_pairs(cache: LogitCache, store: AlignmentStore) -> list[tuple[SequenceRecord, AlignmentRecord]]:
    out = []
    for s in cache.shards:
        aligned = {a.sample_id: a for a in store.iter_shard(s.index)}
        out += [(r, aligned[r.sample_id]) for r in cache.iter_shard(s.index)]
    return out


# ---- --max-length ------------------------------------------------------------------------------------------


def hand_made(eos: bool) -> tuple[SequenceRecord, AlignmentRecord]:
    """Teacher: 2 prompt tokens + 6 completion rows; student: 3 prompt tokens + 4 completion tokens; chunks of
    2:1, 1:2 and 3:1 rows (teacher:student); with ``eos`` both sides end with an end-of-text row."""
    k = 3
    n = 6 + eos
    rows = PositionRows(
        topk_ids=np.arange(n * k).reshape(n, k),
        topk_logprobs=np.full((n, k), -2.0),
        target_ids=np.arange(n),
        target_logprobs=np.full(n, -1.0),
    )
    rec = SequenceRecord(
        sample_id=7,
        source_id="7",
        prompt_text="pp",
        completion_text="abcdef",
        token_ids=np.arange(2 + n),
        token_byte_offsets=np.arange(2 + n),
        prompt_len=2,
        finish_reason="stop" if eos else "length",
        rows=rows,
    )
    al = AlignmentRecord(
        sample_id=7,
        student_prompt_text="ppp",
        student_token_ids=np.asarray([100, 101, 102, 10, 11, 12, 13]),
        student_prompt_len=3,
        student_offsets=np.asarray([0, 2, 3, 5]),
        pairs=np.asarray([[0, 0], [2, 1], [3, 3]] + ([[6, 4]] if eos else [])),
        chunks=np.asarray([[0, 2, 0, 1], [2, 3, 1, 3], [3, 6, 3, 4]]),
        teacher_end=6 if eos else -1,
        student_end=4 if eos else -1,
    )
    return rec, al


@pytest.mark.parametrize("eos", [False, True])
@pytest.mark.parametrize(
    ("max_length", "t_cut", "s_cut"),
    [(4, 2, 1), (5, 2, 1), (6, 3, 3), (7, 6, 4)],  # 7: everything but the end row fits
)
def test_max_length_cuts_both_sides_at_the_last_chunk_end_that_fits(eos, max_length, t_cut, s_cut):
    rec, al = hand_made(eos)
    ex = make_example(rec, al, eos_id=99, max_length=max_length)
    assert ex is not None
    assert len(ex.targets) == s_cut and ex.teacher.n == t_cut
    assert ex.input_ids.tolist() == al.student_token_ids[: 3 + s_cut].tolist()  # no EOS after a cut
    assert len(ex.input_ids) <= max_length
    assert (ex.chunks[-1, 1], ex.chunks[-1, 3]) == (t_cut, s_cut)
    assert ((ex.pairs[:, 0] < t_cut) & (ex.pairs[:, 1] < s_cut)).all()
    assert ex.pairs.tolist() == [p for p in al.pairs.tolist() if p[0] < t_cut and p[1] < s_cut]
    assert ex.teacher.topk_ids.tolist() == rec.rows.topk_ids[:t_cut].tolist()
    assert ex.teacher_token_ids.tolist() == rec.token_ids[: 2 + t_cut].tolist()


@pytest.mark.parametrize("eos", [False, True])
def test_max_length_keeps_a_sequence_that_fits_whole(eos):
    rec, al = hand_made(eos)
    ex = make_example(rec, al, eos_id=99, max_length=7 + eos)
    assert ex is not None and ex.teacher.n == 6 + eos and len(ex.pairs) == len(al.pairs)
    assert ex.input_ids.tolist() == [100, 101, 102, 10, 11, 12, 13] + ([99] if eos else [])


@pytest.fixture(scope="module")
def chat_student():
    """A ChatML student whose EOS (``<|eos|>``) is not its turn end (``<|im_end|>``)."""
    from logitcache.prompts import score_end_token
    from logitcache.testing.tiny_tokenizers import byte_level_bpe

    tok = byte_level_bpe()
    end = score_end_token(tok, tok.chat_template)
    assert end is not None and end["text"] == "<|im_end|>" and end["id"] != tok.eos_token_id  # the precondition
    return tok, end


def test_the_end_row_trains_the_turn_end_the_store_records(chat_student):
    tok, end = chat_student
    header = {"student_end_row": True, "student_end_token": end}  # as stage two writes it
    end_id, source = student_end_id(header, tok)
    assert (end_id, source) == (end["id"], "store")
    rec, al = hand_made(True)
    ex = make_example(rec, al, eos_id=end_id, max_length=None)
    assert ex is not None and ex.targets[-1] == end["id"] != tok.eos_token_id
    batch = collate([ex], pad_id=0, k=3, temperatures=[])
    row = int(al.pairs[-1][1])  # the student's end row, paired with the teacher's end row
    assert int(batch.student_targets[0, row]) == end["id"]


def test_a_store_from_before_the_end_token_field_falls_back_to_eos(chat_student):
    tok, _ = chat_student
    assert student_end_id({"student_end_row": True}, tok) == (tok.eos_token_id, "eos fallback")
    assert student_end_id({"student_end_token": None}, tok) == (None, "store")  # a student without any end


@pytest.mark.parametrize("max_length", [1, 3])  # the prompt alone does not fit (3 tokens + >= 1 target)
def test_a_prompt_that_alone_does_not_fit_is_skipped(max_length):
    rec, al = hand_made(False)
    assert make_example(rec, al, eos_id=None, max_length=max_length) is None


def test_stream_cuts_and_counts_skipped_prompts(train_setup):
    cache, store = open_data(train_setup)
    records = all_pairs(cache, store)
    plens = sorted({a.student_prompt_len for _, a in records})
    assert len(plens) >= 2, plens  # precondition: prompts of different lengths
    max_length = plens[1] - 1  # the longer prompts do not fit at all; the shorter ones are cut
    full = {r.sample_id: make_example(r, a, None, None) for r, a in records}
    too_long = {r.sample_id for r, a in records if a.student_prompt_len + int(a.chunks[0, 3]) > max_length}
    cut = {s for s, ex in full.items() if len(ex.input_ids) > max_length} - too_long
    assert too_long and cut  # precondition: both cases occur
    stream = ExampleStream(cache, store, max_length=max_length, seed=1)
    it = iter(stream)
    yielded = []
    for ex in it:
        if stream.epoch > 0:
            it.close()
            break
        yielded.append(ex)
        assert stream.skipped_overlong == stream.offset - len(yielded)  # every record read is yielded or counted
        fx = full[ex.sample_id]
        plen, n_s, n_t = ex.prompt_len, len(ex.targets), ex.teacher.n
        assert plen + n_s <= max_length
        assert ex.input_ids.tolist() == fx.input_ids[: plen + n_s].tolist()
        assert ex.chunks.tolist() == fx.chunks[: len(ex.chunks)].tolist()
        assert (ex.chunks[-1, 1], ex.chunks[-1, 3]) == (n_t, n_s)  # cut at a chunk end, on both sides
        if len(ex.chunks) < len(fx.chunks):  # ... and at the last one that fits
            assert plen + fx.chunks[len(ex.chunks), 3] > max_length
        assert ((ex.pairs[:, 0] < n_t) & (ex.pairs[:, 1] < n_s)).all()
        assert ex.pairs.tolist() == [p for p in fx.pairs.tolist() if p[0] < n_t and p[1] < n_s]
        assert ex.teacher.target_ids.tolist() == fx.teacher.target_ids[:n_t].tolist()
    assert {ex.sample_id for ex in yielded} == set(full) - too_long
    assert {ex.sample_id for ex in yielded if len(ex.targets) < len(full[ex.sample_id].targets)} == cut


# ---- read-ahead ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rank", "world", "heldout", "epoch", "offset"), [(0, 1, 0.0, 0, 0), (1, 2, 0.25, 0, 5), (0, 3, 0.0, 2, 3)]
)
def test_read_ahead_gives_the_plain_order_and_state(train_setup, rank, world, heldout, epoch, offset):
    def run(read_ahead: bool) -> list[tuple[int, dict[str, int]]]:
        cache, store = open_data(train_setup)  # one cache object each: no shared reader state
        stream = ExampleStream(
            cache,
            store,
            rank=rank,
            world_size=world,
            seed=5,
            heldout_fraction=heldout,
            max_length=50,
            epoch=epoch,
            offset=offset,
            read_ahead=read_ahead,
        )
        it = iter(stream)
        try:
            return [(ex.sample_id, stream.state()) for ex in itertools.islice(it, 60)]
        finally:
            it.close()

    plain, ahead = run(False), run(True)
    assert len(plain) == 60 and len({s["epoch"] for _, s in plain}) >= 2  # precondition: crosses epochs
    assert ahead == plain


# ---- Prefetcher ----------------------------------------------------------------------------------------------


def loader_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith(("logitcache-prefetch", "logitcache-read-ahead"))}


def test_prefetcher_close_joins_its_thread_and_the_read_ahead(train_setup):
    cache, store = open_data(train_setup)
    before = loader_threads()
    loader = Prefetcher(ExampleStream(cache, store), batch_size=3, pad_id=0, depth=1)
    batch, state, examples = next(loader)
    assert batch.batch_size == 3 and state["offset"] == 3 and examples is None
    assert loader._thread.is_alive()  # endless stream: the thread is still producing (or blocked on the queue)
    loader.close()
    assert not loader._thread.is_alive()
    assert loader_threads() <= before  # the stream's read-ahead thread ended too


def test_prefetcher_batches_are_the_collated_stream(train_setup):
    cache, store = open_data(train_setup)
    examples = list(itertools.islice(iter(ExampleStream(cache, store, seed=2)), 8))
    loader = Prefetcher(ExampleStream(cache, store, seed=2), batch_size=4, pad_id=0, keep_examples=True)
    try:
        for i in range(2):
            batch, state, kept = next(loader)
            want = collate(examples[4 * i : 4 * i + 4], 0, cache.top_k, list(cache.header.extra_temperatures))
            assert [e.sample_id for e in kept] == batch.sample_ids.tolist() == want.sample_ids.tolist()
            assert (batch.input_ids == want.input_ids).all() and state["offset"] == 4 * (i + 1)
    finally:
        loader.close()


class ShardReadError(OSError):
    pass


def test_a_reader_error_on_the_background_thread_surfaces_in_the_consumer(train_setup):
    cache, store = open_data(train_setup)
    order = assign_shards([s.sequences for s in cache.shards], 1, 0, 0)[0]
    bad = order[1]  # the second shard the stream reads (by read-ahead, while the first is yielded)
    read = cache.sequence_table  # the loader's first read of a shard

    def failing(index: int, *a, **kw):
        if index == bad:
            raise ShardReadError(f"boom in shard {index}")
        return read(index, *a, **kw)

    cache.sequence_table = failing  # type: ignore[method-assign]
    first = cache.shards[[s.index for s in cache.shards].index(order[0])].sequences
    loader = Prefetcher(ExampleStream(cache, store), batch_size=first, pad_id=0, depth=4)
    try:
        batch, state, _ = next(loader)  # the first shard, whole: its read had no error
        assert batch.batch_size == first and state["offset"] == first
        with pytest.raises(ShardReadError, match=f"boom in shard {bad}"):
            next(loader)
    finally:
        loader.close()
    assert not loader._thread.is_alive()


# ---- the seam to the losses ------------------------------------------------------------------------------------


def test_student_forward_gathers_each_row_at_its_input_position(train_setup):
    import torch

    from logitcache.distill.batch import distill_batch, student_forward
    from logitcache.models import load_model

    cache, store = open_data(train_setup)
    by_length = {len(e.input_ids): e for e in itertools.islice(iter(ExampleStream(cache, store, seed=4)), 24)}
    examples = list(by_length.values())[:3]
    assert len(examples) > 1  # precondition: sequences of different lengths, so padding is in play
    batch = collate(examples, 0, cache.top_k, list(cache.header.extra_temperatures))
    assert batch.first_position == min(e.prompt_len for e in examples) - 1
    model = load_model(str(train_setup["student"]), dtype="float32", device="cpu")
    with torch.no_grad():
        db = student_forward(model, batch, same_vocab=False)
        full = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    for b, e in enumerate(examples):
        n = len(e.targets)
        assert torch.allclose(db.student_logits[b, :n], full[b, e.prompt_len - 1 : e.prompt_len - 1 + n], atol=1e-5)
        assert db.student_targets[b, :n].tolist() == e.targets.tolist() and not db.student_mask[b, n:].any()
        assert db.teacher_topk_ids[b, : e.teacher.n].tolist() == e.teacher.topk_ids.tolist()
    assert db.teacher_topk_ids.dtype == torch.long and batch.teacher_topk_ids.dtype == torch.int32
    with pytest.raises(ValueError, match="logits must be"):
        distill_batch(batch, full, same_vocab=False)  # every position: not what logits_to_keep asked for


# ---- the loader's content checks (distill.integrity) --------------------------------------------------------


def test_row_checks_accept_minus_inf_and_refuse_nan_lse(train_setup):
    """-inf is a valid logprob (an absent entry, a masked token); NaN anywhere, including a recorded lse, is not."""
    from logitcache.distill.integrity import StudentLimits, _check_rows
    from logitcache.storage import CorruptCacheError

    cache, _ = open_data(train_setup)
    k = cache.top_k
    lps = np.tile(np.linspace(-1.0, -5.0, k, dtype=np.float32), (3, 1))
    lps[1, k // 2 :] = -np.inf  # a row whose tail is absent
    rows = PositionRows(
        topk_ids=np.tile(np.arange(k, dtype=np.int32), (3, 1)),
        topk_logprobs=lps,
        target_ids=np.array([1, 2, 3], np.int32),
        target_logprobs=np.array([-0.5, -np.inf, 0.0], np.float32),
        extra_lse={2.0: np.array([1.0, 2.0, 3.0], np.float32)},
    )
    starts, sids = np.array([0, 2]), np.array([70, 71])
    _check_rows(cache, rows, 0, starts, sids, "shard-000009", StudentLimits())  # sound: no error
    rows.extra_lse[2.0][2] = np.nan
    with pytest.raises(CorruptCacheError, match=r"shard-000009: sample 71: lse@2 NaN \(row 0 of the sequence\)"):
        _check_rows(cache, rows, 0, starts, sids, "shard-000009", StudentLimits())
    rows.extra_lse[2.0][2] = 3.0
    with pytest.raises(CorruptCacheError, match=r"sample 70: topk_ids value 7 outside the student's vocabulary"):
        _check_rows(cache, rows, 0, starts, sids, "shard-000009", StudentLimits(vocab=7, same_vocab=True))
    _check_rows(cache, rows, 0, starts, sids, "shard-000009", StudentLimits(vocab=7))  # other vocabularies: no bound
