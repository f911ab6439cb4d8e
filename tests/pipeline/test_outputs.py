"""Engine output -> cache records: the UTF-8 cut of sampled completions keeps whole characters, and is maximal."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from logitcache.inputs import InputRecord
from logitcache.pipeline.outputs import generated_record, valid_utf8_prefix
from logitcache.prompts import prepare
from logitcache.storage.records import PositionRows
from logitcache.testing.tiny_tokenizers import byte_level_bpe
from logitcache.tokenization import token_bytes_info

TOK = byte_level_bpe()  # full 256-byte alphabet and merges that cross character boundaries (b'\x8d\xf0\x9f')
INFO = token_bytes_info(TOK)
EOS = TOK.eos_token_id
NON_ASCII = [i for i, p in enumerate(INFO.pieces) if any(b >= 0x80 for b in p)]


def _id_of(piece: bytes) -> int:
    return INFO.pieces.index(piece)


def _decodes(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_issue_example_keeps_no_half_character() -> None:
    # b'\xc8' + b'\x8d\xf0\x9f': the first invalid byte is the cut 'f0 9f', but the boundary before it splits
    # the character c8 8d; the old cut kept b'\xc8' and generated_record died with UnicodeDecodeError
    ids = np.array([_id_of(b"\xc8"), _id_of(b"\x8d\xf0\x9f")])
    assert not _decodes(b"\xc8") and _decodes(b"\xc8\x8d")  # precondition: a real split character
    assert valid_utf8_prefix(TOK, ids, {EOS}) == (0, b"")
    a = _id_of(b"a")
    assert valid_utf8_prefix(TOK, np.array([a, *ids, EOS]), {EOS}) == (1, b"a")


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    # generation stops at the end token, so a completion never holds it before its last position
    ids=st.lists(
        st.one_of(st.sampled_from(NON_ASCII), st.integers(0, len(TOK) - 1).filter(lambda i: i != EOS)), max_size=12
    ),
    end=st.booleans(),
)
def test_kept_prefix_decodes_and_is_maximal(ids: list[int], end: bool) -> None:
    seq = np.array([*ids, EOS] if end else ids, dtype=np.int64)
    keep, data = valid_utf8_prefix(TOK, seq, {EOS})
    pieces = [INFO.pieces[i] for i in ids]
    assert data == b"".join(pieces[:keep])  # whole tokens only
    assert _decodes(data)
    if _decodes(b"".join(pieces)):
        assert keep == len(seq)  # nothing to cut: the end token stays too
    else:
        assert keep < len(ids)
        for more in range(keep + 1, len(ids) + 1):  # maximal: no longer prefix of whole tokens decodes
            assert not _decodes(b"".join(pieces[:more]))


def test_generated_record_cuts_instead_of_failing() -> None:
    rec = InputRecord(sample_id=0, source_id="0", prompt="Hi", messages=None, response=None)
    p = prepare(TOK, rec, None, "generate", False)
    ids = np.array([_id_of(b"a"), _id_of(b"\xc8"), _id_of(b"\x8d\xf0\x9f")], dtype=np.int32)
    rows = PositionRows(np.zeros((3, 2), np.int32), np.full((3, 2), -1.0, np.float32), ids, np.full(3, -1.0))
    counters: dict[str, int] = {}
    out = generated_record(TOK, p, ids, "length", rows, {EOS}, counters)
    assert out.completion_text == "a" and out.rows.n == 1 and counters == {"cut_invalid_utf8": 1}
