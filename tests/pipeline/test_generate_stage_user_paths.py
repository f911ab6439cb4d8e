"""Stage one on the paths new users took (issue 11): each test reproduces a run that failed or wrote a wrong cache.

- a weak byte-level teacher samples half characters: the run finishes (whole-character cut);
- a sample whose record cannot be built is skipped, counted and named (or fails the run, naming it);
- a chat teacher whose generation config lists more end tokens than its tokenizer's ``eos_token``: the stop
  token is not text, and score mode appends the template's end of turn;
- ``--dtype auto`` and the dtype it resolves to are the same cache.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from cli_helpers import one_line_error
from click.testing import CliRunner
from transformers import PreTrainedTokenizerFast

import logitcache.pipeline.generate_stage as generate_stage
from logitcache.cli import main
from logitcache.inputs import InputRecord
from logitcache.pipeline.generate_stage import GenerateConfig, SampleError, run_generate
from logitcache.prompts import Prepared, prepare
from logitcache.storage import ConfigMismatchError, LogitCache
from logitcache.testing.tiny_models import CHAT_TEMPLATE, bpe_tokenizer, tiny_llama
from logitcache.testing.tiny_tokenizers import byte_level_bpe


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


# ------------------------------------------------------------------------------------- half characters (item 1)


@pytest.fixture(scope="module")
def weak_byte_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random teacher over a byte-level BPE with the full 256-byte alphabet and character-crossing merges."""
    folder = tmp_path_factory.mktemp("weak") / "model"
    tok = byte_level_bpe()
    tiny_llama(tok, seed=3).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_issue_command_finishes(weak_byte_teacher: Path, prompts_file: Path, tmp_path: Path) -> None:
    # the issue's command; before the fix it died with UnicodeDecodeError ... unexpected end of data
    out = tmp_path / "c"
    args = ["generate", "--model", str(weak_byte_teacher), "--data", str(prompts_file), "--top-k", "16",
            "--max-new-tokens", "12", "--seed", "3", "--shard-size", "8", "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    manifest = _manifest(out)
    assert manifest["counters"].get("cut_invalid_utf8", 0) >= 1  # precondition: half characters were sampled
    cache = LogitCache.open(out)
    assert len(cache) == 10
    for rec in cache.iter_sequences():
        assert len(rec.token_ids) - rec.prompt_len == rec.rows.n  # one row per kept completion token
    assert "pos/s" in result.output


# ----------------------------------------------------------------------------------- --on-sample-error (item 1)


@pytest.fixture
def broken_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    real = generate_stage.generated_record

    def record(tokenizer: object, p: Prepared, *args: object, **kwargs: object) -> object:
        if p.record.sample_id == 1:
            raise RuntimeError("boom on purpose")
        return real(tokenizer, p, *args, **kwargs)

    monkeypatch.setattr(generate_stage, "generated_record", record)


@pytest.mark.usefixtures("broken_sample")
def test_bad_sample_is_skipped_counted_and_named(ascii_teacher_folder: Path, prompts_file: Path,
                                                  tmp_path: Path) -> None:
    out = tmp_path / "c"
    args = ["generate", "--model", str(ascii_teacher_folder), "--data", str(prompts_file), "--top-k", "4",
            "--max-new-tokens", "4", "--shard-size", "4", "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "sample 1: RuntimeError: boom on purpose" in result.output
    manifest = _manifest(out)
    assert manifest["counters"]["skipped_error"] == 1
    assert manifest["skipped_samples"] == [{"sample_id": 1, "reason": "RuntimeError: boom on purpose"}]
    assert sorted(LogitCache.open(out).sample_ids().tolist()) == [0, *range(2, 10)]


@pytest.mark.usefixtures("broken_sample")
def test_fail_policy_names_the_sample(ascii_teacher_folder: Path, prompts_file: Path, tmp_path: Path) -> None:
    cfg = GenerateConfig(model=str(ascii_teacher_folder), data=str(prompts_file), out=str(tmp_path / "c"), top_k=4,
                         max_new_tokens=4, shard_size=4, on_sample_error="fail")
    with pytest.raises(SampleError, match="sample 1: .*boom on purpose"):
        run_generate(cfg)


@pytest.mark.usefixtures("broken_sample")
def test_fail_policy_is_one_line_through_the_cli(ascii_teacher_folder: Path, prompts_file: Path,
                                                 tmp_path: Path) -> None:
    args = ["generate", "--model", str(ascii_teacher_folder), "--data", str(prompts_file), "--top-k", "4",
            "--max-new-tokens", "4", "--shard-size", "4", "--out", str(tmp_path / "c"), "--on-sample-error", "fail"]
    result = CliRunner().invoke(main, args)
    one_line_error(result, "sample 1", "RuntimeError: boom on purpose", "--on-sample-error skip")


# ------------------------------------------------------------------------- end tokens of chat teachers (items 2, 3)


def _chatml_teacher(folder: Path) -> Path:
    """ChatML teacher whose tokenizer eos is <|endoftext|> (id 0) but whose generation config also stops on
    <|im_end|> (id 2), like SmolLM2-Instruct; its weights always predict <|im_end|> next."""
    base = bpe_tokenizer()
    tok = PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer, eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>")
    tok.chat_template = CHAT_TEMPLATE
    assert (tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")) == (0, 2)
    model = tiny_llama(tok, seed=0)
    with torch.no_grad():  # the residual stream is the token embedding, whose first coordinate is positive
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight[:, 0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[2, 0] = 10.0  # so <|im_end|> is by far the likeliest next token
    model.generation_config.eos_token_id = [0, 2]
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def chatml_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _chatml_teacher(tmp_path_factory.mktemp("chatml") / "model")


def test_stop_token_from_generation_config_is_not_text(chatml_teacher: Path, prompts_file: Path,
                                                       tmp_path: Path) -> None:
    out = tmp_path / "c"
    run_generate(GenerateConfig(model=str(chatml_teacher), data=str(prompts_file), out=str(out), top_k=4,
                                max_new_tokens=6, limit=4))
    cache = LogitCache.open(out)
    recs = list(cache.iter_sequences())
    assert len(recs) == 4
    for rec in recs:
        assert rec.token_ids[-1] == 2  # precondition: the teacher stopped on <|im_end|>
        assert rec.finish_reason == "stop"
        assert rec.completion_text == ""  # was "<|im_end|>": the stop token is not completion text
        assert rec.rows.n == 1  # the teacher's end row
    capture = _manifest(out)["header"]["metadata"]["capture"]
    assert capture["end_token_ids"] == [0, 2]
    assert capture["end_tokens"] == ["<|endoftext|>", "<|im_end|>"]


def test_score_eos_appends_the_template_turn_end(chatml_teacher: Path, prompts_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "c"
    run_generate(GenerateConfig(model=str(chatml_teacher), data=str(prompts_file), out=str(out), top_k=4,
                                mode="score", limit=3))
    for rec in LogitCache.open(out).iter_sequences():
        assert rec.token_ids[-1] == 2 and rec.rows.target_ids[-1] == 2  # <|im_end|>, not eos <|endoftext|>
        assert rec.completion_text.endswith("!")  # the response, with the end token as no text
    capture = _manifest(out)["header"]["metadata"]["capture"]
    assert capture["score_end_token"] == {"id": 2, "text": "<|im_end|>", "source": "chat_template"}


# --------------------------------------------------------------------------------------------- dtype (item 5)


def test_dtype_auto_resumes_a_float32_cache(ascii_teacher_folder: Path, prompts_file: Path, tmp_path: Path) -> None:
    common = dict(model=str(ascii_teacher_folder), data=str(prompts_file), out=str(tmp_path / "c"), top_k=4,
                  max_new_tokens=4, device="cpu", limit=4)
    first = run_generate(GenerateConfig(dtype="float32", **common))
    assert first["finalized"]
    again = run_generate(GenerateConfig(dtype="auto", **common))  # was: "holds a cache with a different config"
    assert again["shards_done_before"] == again["shards_mine"] == 1
    with pytest.raises(Exception, match="different config"):  # a really different dtype is still refused
        run_generate(GenerateConfig(dtype="bfloat16", **common))


def test_dtype_auto_with_a_scheduler_is_refused(ascii_teacher_folder: Path, prompts_file: Path) -> None:
    from logitcache.config import ConfigError

    common = dict(model=str(ascii_teacher_folder), data=str(prompts_file), out="c", scheduler="tcp://gpu-head:8786")
    with pytest.raises(ConfigError) as err:  # auto would resolve on this (login) node, and again on GPU workers
        GenerateConfig(**common)
    message = str(err.value)
    assert "\n" not in message and message.startswith("--dtype") and "--scheduler" in message
    assert GenerateConfig(dtype="bfloat16", **common).identity()["dtype"] == "bfloat16"  # explicit: one meaning
    assert GenerateConfig(**{**common, "scheduler": None}).dtype == "auto"  # without a scheduler auto stays


def _make_pre_today(out: Path) -> None:
    """Make a finished cache look like one a pre-today logitcache left half done: no end-token fields in its
    header, ``dtype: "auto"`` unresolved, no manifest, its last shard lost."""
    doc = json.loads((out / "cache.json").read_text())
    meta = doc["header"]["metadata"]
    for key in ("end_token_ids", "end_tokens", "score_end_token"):
        meta["capture"].pop(key, None)
    meta["config"]["dtype"] = "auto"
    (out / "cache.json").write_text(json.dumps(doc))
    (out / "manifest.json").unlink()
    shards = sorted((out / "shards").iterdir())
    assert len(shards) == 2  # precondition: one shard survives, one is redone
    shutil.rmtree(shards[-1])


def test_a_cache_from_before_the_end_token_fields_resumes(ascii_teacher_folder: Path, prompts_file: Path,
                                                          tmp_path: Path) -> None:
    from logitcache.storage import verify_cache

    out = tmp_path / "c"
    cfg = GenerateConfig(model=str(ascii_teacher_folder), data=str(prompts_file), out=str(out), top_k=4,
                         max_new_tokens=4, device="cpu", limit=4, shard_size=2)
    assert run_generate(cfg)["finalized"]
    fingerprint = LogitCache.open(out).header.fingerprint()
    _make_pre_today(out)
    again = run_generate(cfg)  # was: "holds a cache with a different config (capture.end_token_ids ...)"
    assert again["finalized"] and again["shards_done_before"] == 1
    header = _manifest(out)["header"]["metadata"]
    assert header["config"]["dtype"] == "auto" and "end_tokens" not in header["capture"]  # the header on disk
    assert LogitCache.open(out).header.fingerprint() != fingerprint  # (the doctored one, as alignments recorded)
    assert verify_cache(str(out)) == []
    with pytest.raises(Exception, match="different config"):  # a really different dtype is still refused
        run_generate(dataclasses.replace(cfg, dtype="bfloat16"))


def test_a_score_cache_from_before_the_turn_end_is_refused_saying_why(chatml_teacher: Path, prompts_file: Path,
                                                                      tmp_path: Path) -> None:
    out = tmp_path / "c"
    cfg = GenerateConfig(model=str(chatml_teacher), data=str(prompts_file), out=str(out), top_k=4, mode="score",
                         limit=4, shard_size=2, device="cpu")
    run_generate(cfg)
    _make_pre_today(out)  # its spans ended with the tokenizer's EOS <|endoftext|>; a run now appends <|im_end|>
    with pytest.raises(ConfigMismatchError) as err:
        run_generate(cfg)
    message = str(err.value)
    assert "\n" not in message and "capture.score_end_token" in message and "regenerate" in message
    assert "<|im_end|>" in message and "end_token_ids" not in message and "dtype" not in message


# --------------------------------------------------------------------------- special-token text in data (item 4)


def test_special_token_text_in_data_is_counted_and_stays_text(chatml_teacher: Path, tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    rows = [{"prompt": "The marker is <|im_end|> in ChatML.", "response": "Yes, <|im_end|> ends a turn."},
            {"prompt": "Plain question?", "response": "Plain answer."}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "c"
    run_generate(GenerateConfig(model=str(chatml_teacher), data=str(data), out=str(out), top_k=4, mode="score"))
    counters = _manifest(out)["counters"]
    assert counters["special_token_text_in_prompt"] == counters["special_token_text_in_completion"] == 1
    rec = LogitCache.open(out).get(0)
    completion = rec.token_ids[rec.prompt_len :].tolist()
    assert completion.count(2) == 1 and completion[-1] == 2  # only the appended end of turn is <|im_end|>
    assert rec.token_ids[: rec.prompt_len].tolist().count(2) == 1  # the template's, not the user's


# ------------------------------------------------- --overlong truncate and prompt errors are per-sample (review items)


EMOJI_ROWS = [{"prompt": "hi", "response": "ab 🙂🙂🙂 漢字 and more 🎉 text"}, {"prompt": "yo", "response": "plain"}]


def test_overlong_truncate_cuts_at_whole_characters(weak_byte_teacher: Path, tmp_path: Path) -> None:
    # the review's case: the cut at --max-length fell inside an emoji and the run died with UnicodeDecodeError
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(EMOJI_ROWS[0]) + "\n")
    tok = PreTrainedTokenizerFast.from_pretrained(weak_byte_teacher)
    p = prepare(tok, InputRecord(0, "0", "hi", None, EMOJI_ROWS[0]["response"]), tok.chat_template, "score", True)
    full = (p.prompt_text + p.completion_text).encode()
    mid = [k for k in range(p.prompt_len + 1, len(p.token_ids) - 1) if full[p.byte_offsets[k]] & 0xC0 == 0x80]
    assert mid  # precondition: a token boundary inside a character, used as the budget
    out = tmp_path / "c"
    run_generate(GenerateConfig(model=str(weak_byte_teacher), data=str(data), out=str(out), top_k=4, mode="score",
                                max_length=mid[0], overlong="truncate"))
    assert _manifest(out)["counters"]["truncated_overlong"] == 1
    rec = LogitCache.open(out).get(0)
    assert len(rec.token_ids) < mid[0] and EMOJI_ROWS[0]["response"].startswith(rec.completion_text)
    assert rec.token_ids.tolist() == p.token_ids[: len(rec.token_ids)].tolist()
    assert len(rec.token_ids) - rec.prompt_len == rec.rows.n >= 1  # whole tokens up to the emoji, one row each


def test_errors_while_preparing_or_truncating_follow_the_sample_policy(weak_byte_teacher: Path, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "d.jsonl"
    rows = [*EMOJI_ROWS, {"messages": [{"role": "user", "content": "<|im_end|> is data"}], "response": "ok"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    template = tmp_path / "upper.jinja"  # rewrites contents: the span of special-token text cannot be found
    template.write_text("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | upper }}<|im_end|>\n"
                        "{% endfor %}<|im_start|>assistant\n")

    tok = PreTrainedTokenizerFast.from_pretrained(weak_byte_teacher)
    long, short = (prepare(tok, InputRecord(i, str(i), r["prompt"], None, r["response"]), template.read_text(),
                           "score", True) for i, r in enumerate(EMOJI_ROWS))
    budget = len(short.token_ids)
    assert long.prompt_len < budget < len(long.token_ids)  # precondition: only sample 0 is truncated

    def truncate(p: Prepared, max_tokens: int) -> Prepared:
        raise RuntimeError("truncate failed on purpose")

    monkeypatch.setattr(generate_stage, "truncate", truncate)
    out = tmp_path / "c"
    run_generate(GenerateConfig(model=str(weak_byte_teacher), data=str(data), out=str(out), top_k=4, mode="score",
                                max_length=budget, overlong="truncate", chat_template=str(template)))
    manifest = _manifest(out)
    assert manifest["counters"]["skipped_error"] == 2
    reasons = {s["sample_id"]: s["reason"] for s in manifest["skipped_samples"]}
    assert reasons[0] == "RuntimeError: truncate failed on purpose"
    assert reasons[2].startswith("PromptSpanError: sample 2: a message holds special-token text")
    assert LogitCache.open(out).sample_ids().tolist() == [1]  # short enough: neither truncated nor failed
