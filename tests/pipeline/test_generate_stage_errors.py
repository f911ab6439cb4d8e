"""Stage one's bad input: each case is one line naming the file, record, field or flag, and exit status 2."""

from __future__ import annotations

import json

import pytest
from cli_helpers import one_line_error
from click.testing import CliRunner
from gen_helpers import write_prompts

from logitcache.cli import main
from logitcache.storage import LogitCache


@pytest.fixture(scope="module")
def teacher(ascii_teacher_folder):
    return ascii_teacher_folder


def gen(teacher, data, out, *extra):
    args = [
        "generate",
        "--model",
        str(teacher),
        "--data",
        str(data),
        "--out",
        str(out),
        "--top-k",
        "4",
        "--max-new-tokens",
        "4",
        *map(str, extra),
    ]
    return CliRunner().invoke(main, args)


def test_missing_prompt_field(teacher, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"text": "no prompt"}) + "\n")
    one_line_error(gen(teacher, data, tmp_path / "c"), "d.jsonl:2", "missing field 'prompt'", "--prompt-field")


def test_missing_response_in_score_mode(teacher, tmp_path):
    data = write_prompts(tmp_path / "d.jsonl", 2, with_response=False)
    one_line_error(gen(teacher, data, tmp_path / "c", "--mode", "score"), "d.jsonl:1", "'response'", "--mode score")


def test_empty_prompt(teacher, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "fine"}) + "\n" + json.dumps({"prompt": "   "}) + "\n")
    one_line_error(gen(teacher, data, tmp_path / "c"), "d.jsonl:2", "empty prompt")


def test_non_utf8_line(teacher, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_bytes(b'{"prompt": "fine"}\n{"prompt": "caf\xe9"}\n')
    one_line_error(gen(teacher, data, tmp_path / "c"), "d.jsonl:2", "not valid UTF-8")


def test_unknown_model_path(tmp_path):
    data = write_prompts(tmp_path / "d.jsonl", 2)
    one_line_error(gen(tmp_path / "no-such-model", data, tmp_path / "c"), "no-such-model")


def test_top_k_larger_than_vocab(teacher, tmp_path):
    data = write_prompts(tmp_path / "d.jsonl", 2)
    r = CliRunner().invoke(
        main,
        ["generate", "--model", str(teacher), "--data", str(data), "--out", str(tmp_path / "c"), "--top-k", "100000"],
    )
    one_line_error(r, "--top-k", "larger than the teacher vocabulary")


def test_vllm_backend_without_vllm_names_the_extra(teacher, tmp_path):
    try:
        import vllm  # noqa: F401

        pytest.skip("vllm is installed here")
    except ImportError:
        pass
    data = write_prompts(tmp_path / "d.jsonl", 2)
    one_line_error(gen(teacher, data, tmp_path / "c", "--backend", "vllm"), "--backend", "logitcache[vllm]")


def test_different_config_is_refused_unless_overwrite(teacher, tmp_path):
    data = write_prompts(tmp_path / "d.jsonl", 2)
    assert gen(teacher, data, tmp_path / "c").exit_code == 0
    one_line_error(gen(teacher, data, tmp_path / "c", "--seed", "5"), "different config", "--overwrite")
    r = gen(teacher, data, tmp_path / "c", "--seed", "5", "--overwrite")
    assert r.exit_code == 0, r.output
    assert LogitCache.open(tmp_path / "c").header.metadata["capture"]["seed"] == 5


def test_overlong_skip_and_truncate_are_counted(teacher, tmp_path):
    data = tmp_path / "d.jsonl"
    rows = [
        {"prompt": "short", "response": "ok"},
        {"prompt": "short", "response": "a much longer answer " * 20},
        {"prompt": "word " * 200, "response": "x"},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = gen(teacher, data, tmp_path / "skip", "--mode", "score", "--max-length", "40")
    assert r.exit_code == 0, r.output
    m = LogitCache.open(tmp_path / "skip").manifest
    assert m["counters"] == {"skipped_overlong": 2} and m["stats"]["sequences"] == 1
    r = gen(teacher, data, tmp_path / "trunc", "--mode", "score", "--max-length", "40", "--overlong", "truncate")
    assert r.exit_code == 0, r.output
    cache = LogitCache.open(tmp_path / "trunc")
    assert cache.manifest["counters"] == {"skipped_overlong": 1, "truncated_overlong": 1}
    rec = cache.get(1)
    assert len(rec.token_ids) == 40 and rec.completion_text.startswith("a much longer")


def test_bad_flag_values_name_the_flag(teacher, tmp_path):
    data = write_prompts(tmp_path / "d.jsonl", 2)
    one_line_error(gen(teacher, data, tmp_path / "c", "--top-p", "0"), "--top-p")
    one_line_error(gen(teacher, data, tmp_path / "c", "--num-shards", "2", "--shard-index", "2"), "--shard-index")


def test_config_file_equivalent_to_flags(teacher, tmp_path):
    data = write_prompts(tmp_path / "d.jsonl", 3)
    cfgfile = tmp_path / "gen.json"
    cfgfile.write_text(
        json.dumps(
            {
                "model": str(teacher),
                "data": str(data),
                "out": str(tmp_path / "c"),
                "top-k": 4,
                "max_new_tokens": 4,
                "seed": 9,
            }
        )
    )
    r = CliRunner().invoke(main, ["generate", "--config", str(cfgfile), "--seed", "11"])
    assert r.exit_code == 0, r.output
    cache = LogitCache.open(tmp_path / "c")
    assert cache.top_k == 4 and cache.header.metadata["capture"]["seed"] == 11
    cfgfile.write_text(json.dumps({"modle": "x"}))
    one_line_error(CliRunner().invoke(main, ["generate", "--config", str(cfgfile)]), "unknown option", "--modle")
