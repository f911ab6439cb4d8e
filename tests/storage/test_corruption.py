"""The corruption suite: every way a finished, aligned cache can be damaged, and ``verify`` naming each one.

Each mutation works on a copy of the session's ``train_setup`` cache (a tiny teacher's score cache with one
alignment store). Raw faults flip a byte or edit a file; *resealed* faults are what a buggy writer would leave:
doctored records written through the writer API, so every checksum is fresh and only the content checks can
catch them. ``test_every_mutation_is_named`` asserts on the problem text; ``test_figure`` prints the count.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from logitcache.storage import CacheWriter, CorruptCacheError, LogitCache, verify_cache, verify_store
from logitcache.storage.alignment_store import AlignmentStore, AlignmentWriter

Mutation = Callable[[Path], None]


def _key(cache: Path) -> str:
    (key,) = [p.name for p in (cache / "alignments").iterdir()]
    return key


def _flip(path: Path, where: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0x5A
    path.write_bytes(bytes(data))


def _edit_json(path: Path, edit: Callable[[dict], None]) -> None:
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc, indent=2, sort_keys=True))


def _reseal_cache_shard(cache: Path, index: int, doctor: Callable[[list], None]) -> None:
    """Rewrite cache shard ``index`` through the writer with doctored records: fresh marker, fresh manifest."""
    records = list(LogitCache.open(cache).iter_shard(index))
    for r in records:  # writable copies (arrays read from Arrow are read-only views)
        r.token_ids, r.token_byte_offsets = np.array(r.token_ids), np.array(r.token_byte_offsets)
        for f in ("topk_ids", "topk_logprobs", "target_ids", "target_logprobs"):
            setattr(r.rows, f, np.array(getattr(r.rows, f)))
    doctor(records)
    writer = CacheWriter.resume(cache)
    writer.header.vocab_size = 1 << 30  # let an out-of-vocabulary id through, as a buggy writer would
    writer.write_shard(index, records)
    CacheWriter.resume(cache).finalize()


def _reseal_store_shard(cache: Path, index: int, doctor: Callable[[list], None]) -> None:
    """Rewrite store shard ``index`` through ``AlignmentWriter`` with doctored records; refinalize the store."""
    c = LogitCache.open(cache)
    store = AlignmentStore.open(c, _key(cache))
    records = store.iter_shard(index)
    for r in records:
        r.pairs, r.chunks, r.student_offsets = np.array(r.pairs), np.array(r.chunks), np.array(r.student_offsets)
    doctor(records)
    header = {k: v for k, v in store.header.items() if k != "cache"}
    writer = AlignmentWriter(c, store.key, header)
    marker = json.loads((_store(cache) / "shards" / f"shard-{index:06d}" / "_COMPLETE.json").read_text())
    writer.write_shard(index, records, marker["stats"])
    writer.finalize({"vocab_map": store.manifest.get("vocab_map")})


def _rows(doctor: Callable[[object], None]) -> Callable[[list], None]:
    def apply(records: list) -> None:
        rec = next(r for r in records if r.rows.n >= 2)
        doctor(rec.rows)

    return apply


def _swap_first_two(rows: object) -> None:
    lps = rows.topk_logprobs
    r = int(np.argmax(lps[:, 0] > lps[:, 1]))
    lps[r, [0, 1]] = lps[r, [1, 0]]


def _move_chunk_boundary(records: list) -> None:
    for rec in records:
        c = rec.chunks
        for k in range(len(c) - 1):
            if c[k, 1] - c[k, 0] >= 2:
                c[k, 1] -= 1
                c[k + 1, 0] -= 1
                return
    raise AssertionError("no chunk with two teacher rows to move a boundary in")


def _pair_out_of_range(records: list) -> None:
    rec = next(r for r in records if len(r.pairs))
    rec.pairs[-1, 0] += 1000


def _reseal_vocab_map(cache: Path) -> None:
    c = LogitCache.open(cache)
    store = AlignmentStore.open(c, _key(cache))
    vm = np.array(store.vocab_map())
    vm[5] = 1 << 20
    writer = AlignmentWriter(c, store.key, {k: v for k, v in store.header.items() if k != "cache"})
    writer.save_vocab_map(vm)
    writer.finalize({"vocab_map": store.manifest.get("vocab_map")})


def _student_offsets_decrease(records: list) -> None:
    rec = next(r for r in records if len(r.student_offsets) >= 3)
    rec.student_offsets[-1] = rec.student_offsets[-2] - 1


def _typo(entry: dict) -> None:
    """One wrong hex digit in a recorded checksum."""
    last = entry["checksum"][-1]
    entry["checksum"] = entry["checksum"][:-1] + ("0" if last != "0" else "1")


def _store(cache: Path) -> Path:
    return cache / "alignments" / _key(cache)


MUTATIONS: dict[str, tuple[Mutation, str]] = {
    "cache shard byte": (
        lambda c: _flip(c / "shards/shard-000001/sequences.parquet"),
        "shard-000001: checksum mismatch",
    ),
    "cache position byte": (
        lambda c: _flip(c / "shards/shard-000002/positions.zarr/topk_ids.ids/c/0/0"),
        "shard-000002: checksum mismatch",
    ),
    "store shard byte": (
        lambda c: _flip(_store(c) / "shards/shard-000003/alignment.parquet"),
        "shards/shard-000003: checksum mismatch",
    ),
    "vocab_map byte": (lambda c: _flip(_store(c) / "vocab_map.parquet"), "vocab_map.parquet: content does not match"),
    "manifest vocab_size": (
        lambda c: _edit_json(c / "manifest.json", lambda m: m["header"].update(vocab_size=201)),
        "manifest.json: the header (top_k, vocab_size",
    ),
    "manifest checksum typo": (
        lambda c: _edit_json(c / "manifest.json", lambda m: _typo(m["shards"][2])),
        "shard-000002: the manifest records checksum",
    ),
    "store manifest checksum typo": (
        lambda c: _edit_json(_store(c) / "manifest.json", lambda m: _typo(m["shards"][1])),
        "the manifest entry is damaged, not the shard",
    ),
    "store manifest header": (
        lambda c: _edit_json(_store(c) / "manifest.json", lambda m: m["header"].update(student_end_row=False)),
        "manifest.json: the header does not match its recorded checksum",
    ),
    "store.json edited": (
        lambda c: _edit_json(_store(c) / "store.json", lambda m: m["header"]["student"].update(vocab_size=1)),
        "store.json: its header differs from the manifest's",
    ),
    "corrupt cache.json": (lambda c: (c / "cache.json").write_text('{"format": "logitc'), "cache.json: corrupt"),
    "cache.json edited": (
        lambda c: _edit_json(c / "cache.json", lambda d: d["header"].update(top_k=4)),
        "cache.json: its header differs from manifest.json's",
    ),
    "tokenizer file changed": (
        lambda c: (c / "tokenizer/tokenizer_config.json").write_text("{}"),
        "tokenizer/tokenizer_config.json: content changed",
    ),
    "store tokenizer file changed": (
        lambda c: (_store(c) / "tokenizer/tokenizer.json").write_bytes(b"{}"),
        "tokenizer/tokenizer.json: content changed",
    ),
    "pair index out of range (resealed)": (
        lambda c: _reseal_store_shard(c, 0, _pair_out_of_range),
        "pair index outside teacher rows",
    ),
    "chunk boundary moved (resealed)": (
        lambda c: _reseal_store_shard(c, 4, _move_chunk_boundary),
        "covers teacher bytes",
    ),
    "positive logprob (resealed)": (
        lambda c: _reseal_cache_shard(c, 1, _rows(lambda r: r.topk_logprobs.__setitem__((0, 0), 0.5))),
        "positive logprobs",
    ),
    "NaN logprob (resealed)": (
        lambda c: _reseal_cache_shard(c, 1, _rows(lambda r: r.topk_logprobs.__setitem__((1, 2), np.nan))),
        "NaN logprobs",
    ),
    "NaN target logprob (resealed)": (
        lambda c: _reseal_cache_shard(c, 3, _rows(lambda r: r.target_logprobs.__setitem__(0, np.nan))),
        "NaN logprobs",
    ),
    "unsorted row (resealed)": (
        lambda c: _reseal_cache_shard(c, 2, _rows(_swap_first_two)),
        "not sorted by descending",
    ),
    "top-k id >= vocab (resealed)": (
        lambda c: _reseal_cache_shard(c, 0, _rows(lambda r: r.topk_ids.__setitem__((0, 1), 200 + 7))),
        "top-k id outside [0, 200)",
    ),
    "target id >= vocab (resealed)": (
        lambda c: _reseal_cache_shard(c, 0, _rows(lambda r: r.target_ids.__setitem__(1, 999))),
        "target id outside [0, 200)",
    ),
    "token id >= vocab (resealed)": (
        lambda c: _reseal_cache_shard(c, 5, lambda recs: recs[0].token_ids.__setitem__(0, 4000)),
        "token_ids outside [0, 200)",
    ),
    "prompt_len off by one (resealed)": (
        lambda c: _reseal_cache_shard(c, 3, lambda recs: setattr(recs[2], "prompt_len", recs[2].prompt_len - 1)),
        "!= len(token_ids) - prompt_len",
    ),
    "vocab_map id out of range (resealed)": (_reseal_vocab_map, "vocab_map.parquet: student ids outside [-1,"),
    "student offsets decrease (resealed)": (
        lambda c: _reseal_store_shard(c, 2, _student_offsets_decrease),
        "student token byte offsets decrease",
    ),
    "byte offsets decrease (resealed)": (
        lambda c: _reseal_cache_shard(c, 4, lambda recs: recs[1].token_byte_offsets.__setitem__(-1, 0)),
        "token byte offsets not non-decreasing",
    ),
}


@pytest.fixture()
def fresh(train_setup: dict[str, Path], tmp_path: Path) -> Path:
    dest = tmp_path / "cache"
    shutil.copytree(train_setup["cache"], dest)
    notes: list[str] = []
    assert verify_cache(dest, notes=notes) == [] and notes == []  # precondition: sound, every checksum recorded
    return dest


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_every_mutation_is_named(fresh: Path, name: str) -> None:
    mutate, expected = MUTATIONS[name]
    mutate(fresh)
    problems = verify_cache(fresh)
    assert any(expected in p for p in problems), (name, problems)


def test_figure(fresh: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The figure for the notes: mutations verify names / total (every one must be named)."""
    named = []
    for name, (mutate, expected) in sorted(MUTATIONS.items()):
        copy = tmp_path / name.replace(" ", "_")
        shutil.copytree(fresh, copy)
        mutate(copy)
        if any(expected in p for p in verify_cache(copy)):
            named.append(name)
    with capsys.disabled():
        print(f"\ncorruption suite: verify named {len(named)}/{len(MUTATIONS)} mutations")
    assert len(named) == len(MUTATIONS), sorted(set(MUTATIONS) - set(named))


def test_checksum_level_catches_raw_faults_in_stores(fresh: Path) -> None:
    """``verify_store`` at level checksums (train's pre-check) catches store byte faults without decoding."""
    key = _key(fresh)
    _flip(_store(fresh) / "shards/shard-000000/alignment.parquet")
    problems = verify_store(LogitCache.open(fresh), key, level="checksums")
    assert any("checksum mismatch" in p for p in problems), problems
    assert verify_cache(fresh, level="checksums", stores=False) == []  # the cache itself is sound


def test_old_cache_without_checksums_is_readable_with_notes(fresh: Path) -> None:
    for manifest in (fresh / "manifest.json", _store(fresh) / "manifest.json"):
        _edit_json(manifest, lambda m: m.pop("checksums"))
    notes: list[str] = []
    assert verify_cache(fresh, notes=notes) == []
    assert any("no header checksum recorded" in n for n in notes), notes
    assert any("vocab_map.parquet: no checksum recorded" in n for n in notes), notes


def test_corrupt_header_file_is_restored_by_finalize_not_overwritten(fresh: Path) -> None:
    header = LogitCache.open(fresh).header
    (fresh / "cache.json").write_text("{not json")
    with pytest.raises(CorruptCacheError) as err:
        CacheWriter(fresh, header)  # what a `generate` rerun does
    assert "corrupt" in str(err.value) and "logitcache finalize" in str(err.value)
    assert "--overwrite" not in str(err.value)
    CacheWriter.resume(fresh).finalize()  # what `logitcache finalize` does
    assert verify_cache(fresh) == []
    CacheWriter(fresh, header)  # a rerun now resumes


def test_header_file_without_intact_copy_says_so(tmp_path: Path) -> None:
    from logitcache.storage import CacheHeader

    header = CacheHeader(top_k=4, vocab_size=50, num_shards=2)
    CacheWriter(tmp_path / "c", header)
    (tmp_path / "c" / "cache.json").write_text("garbage")
    with pytest.raises(CorruptCacheError, match="no intact copy of the header"):
        CacheWriter(tmp_path / "c", header)


def test_edited_manifest_header_is_repaired_by_finalize(fresh: Path) -> None:
    _edit_json(fresh / "manifest.json", lambda m: m["header"].update(vocab_size=7))
    CacheWriter.resume(fresh).finalize()
    assert LogitCache.open(fresh).vocab_size == 200 and verify_cache(fresh) == []


def test_align_rerun_rewrites_a_damaged_store_shard(fresh: Path) -> None:
    """A store shard that fails its marker's checksum is not 'complete', so the next align rewrites it."""
    c = LogitCache.open(fresh)
    store = AlignmentStore.open(c, _key(fresh))
    writer = AlignmentWriter(c, store.key, {k: v for k, v in store.header.items() if k != "cache"})
    assert writer.complete_shards() == [0, 1, 2, 3, 4, 5]
    _flip(_store(fresh) / "shards/shard-000003/alignment.parquet")
    assert writer.complete_shards() == [0, 1, 2, 4, 5]
    assert writer.complete_shards(check=False) == [0, 1, 2, 3, 4, 5]


# ---- the train column: `logitcache train` refuses, with one line, every mutation that could hurt it -------------

#: mutations training cannot be hurt by, with the reason; `train` may still refuse them (verify's pre-check does)
HARMLESS_TO_TRAINING = {
    "byte offsets decrease (resealed)": "teacher byte offsets feed only `align`; training reads the store built before",
    "student offsets decrease (resealed)": "student byte offsets feed only verify; no loss or loader reads them",
    "vocab_map id out of range (resealed)": "no loss reads the vocabulary map",
    "tokenizer file changed": "train never loads the teacher's tokenizer copy",
    "store tokenizer file changed": "train loads --student's tokenizer, not the store's copy",
}
#: raw byte and metadata faults: the checksums pre-check is their guard; at --verify none the user opted out
RAW = {
    "cache shard byte",
    "cache position byte",
    "store shard byte",
    "vocab_map byte",
    "manifest vocab_size",
    "manifest checksum typo",
    "store manifest checksum typo",
    "store manifest header",
    "store.json edited",
    "corrupt cache.json",
    "cache.json edited",
    "tokenizer file changed",
    "store tokenizer file changed",
}


#: resealed cache shards: `train` sees them with their alignment store rebound to the new content (`_rebind_store`)
RESEALED_CACHE = {
    "positive logprob (resealed)",
    "NaN logprob (resealed)",
    "NaN target logprob (resealed)",
    "unsorted row (resealed)",
    "top-k id >= vocab (resealed)",
    "target id >= vocab (resealed)",
    "token id >= vocab (resealed)",
    "prompt_len off by one (resealed)",
    "byte offsets decrease (resealed)",
}


def _rebind_store(cache: Path) -> None:
    """What `align` run after the buggy writer leaves: the store's records, bound (and sealed) to the cache's new
    content, so neither its identity check nor any checksum stands between the doctored rows and `train`."""
    store = _store(cache)
    header = {k: v for k, v in json.loads((store / "store.json").read_text())["header"].items() if k != "cache"}
    vocab_map = json.loads((store / "manifest.json").read_text()).get("vocab_map")
    (store / "store.json").unlink()
    AlignmentWriter(LogitCache.open(cache), _key(cache), header).finalize({"vocab_map": vocab_map})
    assert verify_cache(cache, level="checksums") == []  # precondition: every checksum and identity is sound


def _train(cache: Path, out: Path, verify: str, *extra: str) -> object:
    from click.testing import CliRunner

    from logitcache.cli import main

    args = ["train", "--cache", str(cache), "--student", str(_STUDENT[0]), "--out", str(out), "--verify", verify]
    # batch 8 x 3 steps reads the whole epoch (24 sequences, 6 shards); aligned pairing and alm use pairs and chunks
    args += ["--max-steps", "3", "--batch-size", "8", "--eval-fraction", "0", "--save-every", "1000"]
    args += ["--loss", "ce:1,mlot:0.15,alm:0.1", "--pairing", "aligned", *extra]
    return CliRunner().invoke(main, args)


_STUDENT: list[Path] = []


def _outcome(result: object) -> str:
    """``refused`` (exit 2, one ``error:`` line, no traceback), ``trained`` (exit 0) or ``crashed``."""
    lines = [ln for ln in result.output.splitlines() if ln.startswith("error:")]  # type: ignore[attr-defined]
    if result.exit_code == 2 and len(lines) == 1 and "Traceback" not in result.output:  # type: ignore[attr-defined]
        return "refused"
    return "trained" if result.exit_code == 0 else "crashed"  # type: ignore[attr-defined]


def test_train_refuses_every_mutation_it_could_be_hurt_by(
    train_setup: dict[str, Path], fresh: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every mutation through `logitcache train` at --verify checksums (the default) and, for resealed ones (fresh
    checksums: only the loader's content checks stand between them and the run), at --verify none."""
    _STUDENT[:] = [train_setup["student"]]
    assert _outcome(_train(fresh, tmp_path / "sound", "checksums")) == "trained"  # precondition: the sound copy trains
    outcomes: dict[str, dict[str, str]] = {}
    for name, (mutate, _) in sorted(MUTATIONS.items()):
        copy = tmp_path / name.replace(" ", "_")
        shutil.copytree(fresh, copy)
        mutate(copy)
        if name in RESEALED_CACHE:
            _rebind_store(copy)
        levels = ["checksums"] if name in RAW else ["checksums", "none"]
        outcomes[name] = {}
        for level in levels:
            r = _train(copy, tmp_path / f"run-{len(outcomes)}-{level}", level)
            outcomes[name][level] = _outcome(r)
            assert outcomes[name][level] != "crashed", (name, level, r.output, r.exception)  # type: ignore[attr-defined]
            if name not in RAW and outcomes[name][level] == "refused":  # the loader's line: shard, sample, fix
                line = next(ln for ln in r.output.splitlines() if ln.startswith("error:"))  # type: ignore[attr-defined]
                assert "shard-00000" in line and "sample " in line, line
                assert f"logitcache verify {copy} --level full" in line, line
    hurtful = [n for n in MUTATIONS if n not in HARMLESS_TO_TRAINING]
    refused = [n for n in hurtful if all(o == "refused" for o in outcomes[n].values())]
    trained_on = {n: o for n, o in outcomes.items() if "trained" in o.values()}
    with capsys.disabled():
        print(f"\ncorruption suite: train refused {len(refused)}/{len(hurtful)} mutations it could be hurt by "
              f"({len(MUTATIONS)} in all); trained on: {trained_on}")
    assert refused == hurtful, outcomes
    assert set(trained_on) <= set(HARMLESS_TO_TRAINING), trained_on
