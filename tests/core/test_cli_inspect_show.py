"""``show`` and ``inspect`` details: partial-UTF-8 tokens as bytes, exact probabilities of targets outside the
top-K, a default sample, score caches without sampling settings, truncation visible next to the finish counts,
and tail-mass quantiles labelled as the histogram bounds they are."""

from __future__ import annotations

import numpy as np
from cache_helpers import random_record
from click.testing import CliRunner

from logitcache.cli import main
from logitcache.storage import CacheHeader, CacheWriter


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_show_prints_partial_utf8_bytes_and_exact_target_probability(tmp_path):
    from logitcache.testing.tiny_tokenizers import byte_level_bpe
    from logitcache.tokenization import token_bytes_info

    tok = byte_level_bpe()
    pieces = token_bytes_info(tok).pieces
    byte_id = pieces.index(b"\xc8")  # half of a two-byte character: decode() alone gives U+FFFD
    assert "\ufffd" in tok.decode([byte_id])
    rec = random_record(np.random.default_rng(0), 0, vocab=len(tok), n_completion=3)
    ids = rec.rows.topk_ids
    ids[0] = [byte_id, *[i for i in range(1, 1 + ids.shape[1]) if i != byte_id][: ids.shape[1] - 1]]
    outside = next(i for i in range(100, len(tok)) if i not in ids[0] and pieces[i] and b"\xc8" not in pieces[i])
    rec.rows.target_ids[0], rec.rows.target_logprobs[0] = outside, -12.0
    writer = CacheWriter(tmp_path / "c", CacheHeader(top_k=ids.shape[1], vocab_size=len(tok), num_shards=1))
    writer.write_shard(0, [rec])
    writer.save_tokenizer(tok)
    writer.finalize()
    r = run("show", tmp_path / "c", "--positions", 1)  # no --sample: the first sample
    assert r.exit_code == 0, r.output
    line = r.output.splitlines()[-1]
    assert "'<0xC8>'" in line and "?" not in line.split("|")[1], line
    assert "p=6.1e-06 logp=-12.000 (outside top-" in line, line


def test_inspect_score_cache_truncation_and_quantile_bounds(tmp_path):
    rng = np.random.default_rng(1)
    capture = {"mode": "score", "top_k": 8, "temperature": 0.7, "seed": 3, "max_new_tokens": 9, "overlong": "truncate"}
    meta = {"capture": capture}
    writer = CacheWriter(tmp_path / "c", CacheHeader(top_k=8, vocab_size=1000, num_shards=1, metadata=meta))
    writer.write_shard(0, [random_record(rng, i, n_completion=4) for i in range(3)], {"truncated_overlong": 2})
    writer.finalize()
    r = run("inspect", tmp_path / "c")
    assert r.exit_code == 0, r.output
    capture = next(ln for ln in r.output.splitlines() if ln.startswith("capture"))
    assert "overlong truncate" in capture
    assert "temperature" not in capture and "seed" not in capture and "max_new_tokens" not in capture
    finish = next(ln for ln in r.output.splitlines() if ln.startswith("finish"))
    assert "(truncated: truncated_overlong 2)" in finish, finish
    tail = next(ln for ln in r.output.splitlines() if ln.startswith("tail mass"))
    assert "p50 <= " in tail and "bin upper bounds" in tail
