"""Property tests of the training sample order: permutation, disjoint ranks, stable across resumes and epochs."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from logitcache.distill.sampling import assign_shards, is_heldout, rank_order, shard_permutation, skip

sizes_st = st.lists(st.integers(0, 30), min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(sizes=sizes_st, world=st.integers(1, 5), seed=st.integers(0, 2**31), epoch=st.integers(0, 5))
def test_ranks_are_disjoint_and_cover_the_epoch(sizes, world, seed, epoch):
    parts = assign_shards(sizes, world, seed, epoch)
    flat = [s for p in parts for s in p]
    assert sorted(flat) == list(range(len(sizes)))
    loads = [sum(sizes[s] for s in p) for p in parts]
    assert max(loads) - min(loads) <= max(sizes)  # balanced to within one shard
    seen = [(sh, i) for r in range(world) for sh, i in rank_order(sizes, r, world, seed, epoch)]
    assert sorted(seen) == [(sh, i) for sh in range(len(sizes)) for i in range(sizes[sh])]


@settings(max_examples=100, deadline=None)
@given(size=st.integers(0, 200), seed=st.integers(0, 2**31), epoch=st.integers(0, 9), shard=st.integers(0, 99))
def test_shard_permutation_is_a_permutation(size, seed, epoch, shard):
    p = shard_permutation(size, seed, epoch, shard)
    assert sorted(p.tolist()) == list(range(size))
    assert (p == shard_permutation(size, seed, epoch, shard)).all()  # pure


@settings(max_examples=150, deadline=None)
@given(sizes=sizes_st, world=st.integers(1, 4), seed=st.integers(0, 1000), data=st.data())
def test_skip_resumes_the_same_stream(sizes, world, seed, data):
    if sum(1 for n in sizes if n) < world:
        with pytest.raises(ValueError, match="cannot feed"):
            skip(sizes, 0, world, seed, 0, 0)
        return
    rank = data.draw(st.integers(0, world - 1))
    stream, epoch = [], 0  # the rank's endless stream, materialized over a few epochs
    while len(stream) < 3 * sum(sizes) + 5:
        stream += [(epoch, sh, i) for sh, i in rank_order(sizes, rank, world, seed, epoch)]
        epoch += 1
    offset = data.draw(st.integers(0, len(stream) - 1))
    e, k, j = skip(sizes, rank, world, seed, 0, offset)
    shard = assign_shards(sizes, world, seed, e)[rank][k]
    assert stream[offset] == (e, shard, int(shard_permutation(sizes[shard], seed, e, shard)[j]))


def test_epochs_reshuffle():
    sizes = [10] * 8
    a = list(rank_order(sizes, 0, 1, 0, 0))
    b = list(rank_order(sizes, 0, 1, 0, 1))
    assert sorted(a) == sorted(b) and a != b


def test_heldout_is_stable_and_about_the_fraction():
    chosen = [i for i in range(10000) if is_heldout(i, 0.1)]
    assert 900 < len(chosen) < 1100
    assert chosen == [i for i in range(10000) if is_heldout(i, 0.1)]
    assert not any(is_heldout(i, 0.0) for i in range(100))
