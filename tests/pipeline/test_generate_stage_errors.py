"""Stage one's bad input: each case is one line naming the file, record, field or flag, and exit status 2."""

from __future__ import annotations

import json

import pytest
from cli_helpers import one_line_error
from click.testing import CliRunner
from gen_helpers import generate_args, write_prompts

from logitcache.cli import main
from logitcache.storage import LogitCache


@pytest.fixture(scope="module")
def teacher(ascii_teacher_folder):
    return ascii_teacher_folder


def gen(teacher, data, out, *extra):
    args = generate_args(teacher, data, "--out", out, "--top-k", 4, "--max-new-tokens", 4, *extra)
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


def test_completion_cut_by_the_context_is_counted(teacher, tmp_path):
    """max_new_tokens runs past --max-length: the completion is cut there (finish ``length``) and counted."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": "word " * n}) + "\n" for n in (1, 2, 3)))
    r = gen(teacher, data, tmp_path / "c", "--max-new-tokens", "40", "--max-length", "30", "--temperature", "0")
    assert r.exit_code == 0, r.output
    cache = LogitCache.open(tmp_path / "c")
    cut = [rec for rec in cache.iter_sequences() if len(rec.token_ids) == 30]
    assert cut and all(rec.finish_reason == "length" for rec in cut)  # precondition: some ran into the context
    assert cache.manifest["counters"].get("truncated_context") == len(cut)
    shown = CliRunner().invoke(main, ["inspect", str(tmp_path / "c")])
    assert f"truncated_context {len(cut)}" in shown.output, shown.output


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


def test_max_length_beyond_the_model_context(teacher, tmp_path):
    data = write_prompts(tmp_path / "d.jsonl", 2)
    r = gen(teacher, data, tmp_path / "c", "--max-length", 10**7)
    one_line_error(r, "--max-length", "exceeds the model context")


def test_a_user_error_inside_a_dask_worker_is_still_one_line(teacher, tmp_path):
    # the chat template is first read inside process_shard, i.e. on a worker; its InputError comes back as itself
    data = write_prompts(tmp_path / "d.jsonl", 4)
    r = gen(teacher, data, tmp_path / "c", "--shard-size", 2, "--workers", 2, "--chat-template", tmp_path / "no.jinja")
    one_line_error(r, "--chat-template", "cannot read")


def test_a_key_error_is_a_bug_with_its_traceback(teacher, tmp_path, monkeypatch):
    import logitcache.pipeline.generate_stage as stage

    def broken(cfg):
        raise KeyError("some_internal_key")

    monkeypatch.setattr(stage, "run_generate", broken)
    r = gen(teacher, write_prompts(tmp_path / "d.jsonl", 2), tmp_path / "c")
    assert r.exit_code == 1 and isinstance(r.exception, KeyError)
    assert not [ln for ln in r.output.splitlines() if ln.startswith("error:")]


def test_flag_checks_of_the_backends_are_config_errors(teacher, tmp_path):
    from logitcache.config import ConfigError
    from logitcache.pipeline.backend_hf import check_sampling, check_top_k
    from logitcache.pipeline.generate_stage import GenerateConfig

    for call, flag in [
        (lambda: check_sampling(-1, 1.0, 1.0), "--max-new-tokens"),
        (lambda: check_sampling(4, -0.5, 1.0), "--temperature"),
        (lambda: check_sampling(4, 1.0, 0.0), "--top-p"),
        (lambda: check_top_k(0, 100), "--top-k"),
        (lambda: check_top_k(101, 100), "--top-k"),
    ]:
        with pytest.raises(ConfigError, match=flag):
            call()
    # both backends record row statistics (issue 13); a bad temperature is refused by the config and by each backend
    from types import SimpleNamespace

    from logitcache.pipeline.backend_hf import _temps
    from logitcache.pipeline.backend_vllm import VllmBackend

    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ConfigError, match="--extra-temperatures"):
            GenerateConfig(model=str(teacher), data="d.jsonl", out=str(tmp_path / "c"), extra_temperatures=[2.0, bad])
        with pytest.raises(ConfigError, match="--extra-temperatures"):
            _temps([bad])
        with pytest.raises(ConfigError, match="--extra-temperatures"):  # checked before the engine is touched
            VllmBackend._temperatures(SimpleNamespace(row_stats=True, _temps=()), [bad])


def test_header_resolves_auto_without_rebuilding_the_config(teacher, tmp_path):
    """build_header records what auto stands for; with --scheduler (where auto is refused) that must not re-validate."""
    from transformers import AutoTokenizer

    from logitcache.pipeline.generate_stage import GenerateConfig, build_header

    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "hi", "response": "yo"}\n')
    cfg = GenerateConfig(
        model=str(teacher), data=str(data), out=str(tmp_path / "c"), mode="score", dtype="float32",
        scheduler="tcp://127.0.0.1:1",
    )
    header = build_header(cfg, AutoTokenizer.from_pretrained(str(teacher)), 200)
    assert header.metadata["runtime"]["dtype_auto"] == "float32"  # no GPU here
    assert header.metadata["config"]["dtype"] == "float32"
