"""``logitcache sft`` on tiny models: the loss falls, only response tokens (and the turn end) are trained, prompts
are rendered as stage one renders them, bad records are one-line errors, resume is exact, the CLI works."""

from __future__ import annotations

import json
import shutil
from itertools import islice
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from ci_helpers import need_module
from cli_helpers import one_line_error
from click.testing import CliRunner
from gen_helpers import ASCII_CORPUS, ascii_teacher, write_prompts

from logitcache.cli import main
from logitcache.config import ConfigError
from logitcache.distill.sft import SFTConfig, collate, encode_records, response_loss, run_sft, sample_stream
from logitcache.inputs import InputFields, read_inputs
from logitcache.models import load_model, load_tokenizer
from logitcache.prompts import prepare, resolve_chat_template
from logitcache.testing.tiny_models import bpe_tokenizer, tiny_llama, write_tiny_gguf


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return ascii_teacher(tmp_path_factory.mktemp("sft") / "chat")  # ChatML template; turn end <|im_end|>


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    return ascii_teacher(tmp_path_factory.mktemp("sft") / "base", chat_template="")  # no template: raw prompt


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_prompts(tmp_path_factory.mktemp("sft") / "d.jsonl", 16)


def cfg(model, data, out, **kw):
    base = dict(model=str(model), data=str(data), out=str(out), batch_size=4, lr=3e-3, warmup_steps=2, max_steps=20,
                eval_fraction=0.0, save_every=1000, threads=1)
    return SFTConfig(**{**base, **kw})


def metrics(out):
    return [json.loads(ln) for ln in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_and_the_final_model_loads(chat_model, data, tmp_path):
    s = run_sft(cfg(chat_model, data, tmp_path / "run", max_steps=30, eval_fraction=0.25, eval_every=10))
    m = metrics(tmp_path / "run")
    first, final = np.mean([x["loss"] for x in m[:5]]), np.mean([x["loss"] for x in m[-5:]])
    assert len(m) == 30 and final < 0.5 * first, (first, final)
    evals = [x["eval/ce"] for x in m if "eval/ce" in x]
    assert len(evals) == 3 and max(evals) < 0.5 * m[0]["loss"]  # held-out answers learnt too (fresh numbers)
    assert s["heldout_records"] > 0 and s["train_records"] + s["heldout_records"] == 16
    assert s["end_token"]["text"] == "<|im_end|>" and s["end_token"]["source"] == "chat_template"
    final_dir = Path(s["model"])
    assert final_dir == tmp_path / "run" / "final" and (final_dir / "config.json").exists()
    assert load_model(final_dir).config.vocab_size == load_model(chat_model).config.vocab_size
    assert json.loads((tmp_path / "run" / "config.json").read_text())["lr"] == 3e-3


@pytest.mark.parametrize("which", ["chat_model", "base_model"])
def test_only_response_and_end_token_are_trained(which, request, data, tmp_path):
    model_dir = request.getfixturevalue(which)
    c = cfg(model_dir, data, tmp_path / "x")
    tok = load_tokenizer(model_dir)
    enc = encode_records(c, tok)
    rec = read_inputs(str(data), InputFields(), "score")[enc.train[0].sample_id]
    template = resolve_chat_template(tok, "auto")
    assert (template is None) == (which == "base_model")
    # rendered and tokenized exactly as stage one's score mode (prompt + response + the turn's end token)
    ref = prepare(tok, rec, template, "score", True)
    ex = enc.train[0]
    assert ex.ids.tolist() == ref.token_ids.tolist() and ex.prompt_len == ref.prompt_len
    end = "<|im_end|>"  # the template's turn end, or (no template) the EOS, which this tokenizer sets to the same
    assert tok.decode(ex.ids[ex.prompt_len :].tolist()) == rec.response + end
    batch = collate(enc.train[:3], 0)
    labels = batch["labels"]
    for row, e in enumerate(enc.train[:3]):
        trained = labels[row][labels[row] != -100].tolist()
        assert trained == e.ids[e.prompt_len :].tolist()  # the response and the end token; no prompt, no padding
    # the loss equals a direct NLL of those tokens from full logits, and padding/prompt logits do not enter it
    model = load_model(model_dir)
    ce, n = response_loss(model, batch, torch.device("cpu"))
    direct, count = 0.0, 0
    for e in enc.train[:3]:  # one sequence at a time, no padding, every position's logits
        ids = torch.from_numpy(e.ids)[None]
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        for t in range(e.prompt_len, len(e.ids)):
            direct -= float(lp[t - 1, e.ids[t]])
            count += 1
    assert n == count and float(ce.detach()) == pytest.approx(direct, rel=1e-4)


def test_sample_order_is_a_seeded_function_and_an_epoch_covers_every_record():
    exs = [SimpleNamespace(sample_id=i) for i in range(10)]

    def ids(rank=0, world=1, seed=7, n=20, **state):
        return [e.sample_id for e, _ in islice(sample_stream(exs, rank, world, seed, **state), n)]

    order = ids()
    assert order == ids() and order != ids(seed=8)
    assert sorted(order[:10]) == list(range(10)) and sorted(order[10:]) == list(range(10)) and order[:10] != order[10:]
    state = list(islice(sample_stream(exs, 0, 1, 7), 13))[-1][1]  # the position after 13 samples: two integers
    assert state == {"epoch": 1, "offset": 3}
    assert ids(n=7, **state) == order[13:20]
    ranks = [ids(rank=r, world=2, n=5) for r in (0, 1)]
    assert sorted(ranks[0] + ranks[1]) == list(range(10))


def test_overlong_records_are_skipped_and_counted(chat_model, data, tmp_path):
    c = cfg(chat_model, data, tmp_path / "x")
    lengths = sorted(len(e.ids) for e in encode_records(c, load_tokenizer(chat_model)).train)
    cut = lengths[len(lengths) // 2]
    s = run_sft(cfg(chat_model, data, tmp_path / "run", max_steps=2, max_length=cut))
    assert s["skipped_overlong"] == sum(n > cut for n in lengths) > 0
    assert s["train_records"] == sum(n <= cut for n in lengths)


def test_resume_continues_an_interrupted_run_exactly(chat_model, data, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run_sft(cfg(chat_model, data, a, max_steps=6, save_every=3, grad_accum=2, batch_size=3))
    # b: the same run interrupted after its step-3 checkpoint (what a kill there leaves behind)
    shutil.copytree(a, b, symlinks=True)
    shutil.rmtree(b / "checkpoints" / "step-0000006")
    (b / "summary.json").unlink()
    (b / "final").unlink()
    s = run_sft(cfg(chat_model, data, b, max_steps=6, save_every=3, grad_accum=2, batch_size=3, resume=True))
    ma, mb = metrics(a), metrics(b)
    assert [x["step"] for x in mb] == list(range(1, 7))
    for x, y in zip(ma[3:], mb[3:], strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6) and x["lr"] == y["lr"], (x, y)
    assert s["checkpoint_step"] == 6 and (b / "final" / "config.json").exists()
    # a resume against other data, or another learning rate, is refused naming the flag
    changed = tmp_path / "d2.jsonl"
    changed.write_text(Path(data).read_text().replace("plus", "minus"))
    with pytest.raises(ConfigError, match="--data"):
        run_sft(cfg(chat_model, changed, b, max_steps=6, save_every=3, grad_accum=2, batch_size=3, resume=True))
    with pytest.raises(ConfigError, match="--lr"):
        run_sft(cfg(chat_model, data, b, max_steps=6, save_every=3, grad_accum=2, batch_size=3, lr=1e-3, resume=True))
    with pytest.raises(ConfigError, match="--overwrite"):
        run_sft(cfg(chat_model, data, b))


def test_epochs_turn_into_steps(chat_model, data, tmp_path):
    s = run_sft(cfg(chat_model, data, tmp_path / "run", epochs=2, batch_size=4, eval_fraction=0.0))
    assert s["steps"] == 8  # 2 x 16 records / 4 per step


def test_cli_sft_smoke_and_bad_record(chat_model, data, tmp_path):
    out = tmp_path / "run"
    args = ["sft", "--model", str(chat_model), "--data", str(data), "--out", str(out), "--max-steps", "3",
            "--batch-size", "2", "--eval-fraction", "0.2", "--threads", "1"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "sft: 3 steps" in r.output and str(out / "final") in r.output
    assert len(metrics(out)) == 3
    bad = tmp_path / "bad.jsonl"
    rows = Path(data).read_text().splitlines()
    rows[2] = json.dumps({"prompt": "no answer here"})
    bad.write_text("\n".join(rows) + "\n")
    r = CliRunner().invoke(main, [*args[:4], str(bad), "--out", str(tmp_path / "bad")])
    one_line_error(r, f"{bad}:3", "'response'", "--response-field")
    r = CliRunner().invoke(main, [*args, "--max-steps", "0"])
    one_line_error(r, "--max-steps")


def test_a_gguf_base_model_fine_tunes_on_its_raw_prompt(data, tmp_path, monkeypatch):
    need_module("gguf")
    monkeypatch.setenv("LOGITCACHE_MODEL_CACHE", str(tmp_path / "model-cache"))
    tok = bpe_tokenizer(200, ASCII_CORPUS, None, full_alphabet=False)  # no chat template: a base model
    gguf_path = write_tiny_gguf(tmp_path / "base.gguf", tiny_llama(tok, seed=2), tok)
    s = run_sft(cfg(gguf_path, data, tmp_path / "run", max_steps=3))
    assert s["end_token"]["source"] == "eos_token" and s["steps"] == 3
    tuned = load_tokenizer(s["model"])
    ex = encode_records(cfg(gguf_path, data, tmp_path / "x"), load_tokenizer(gguf_path)).train[0]
    rec = read_inputs(str(data), InputFields(), "score")[ex.sample_id]
    assert tuned.decode(ex.ids[: ex.prompt_len].tolist()) == rec.prompt  # the raw prompt, no template
    assert load_model(s["model"]).config.vocab_size == len(tok)


def test_with_the_caches_shard_size_the_order_is_trains(train_setup, tmp_path):
    from logitcache.distill.context import RunContext
    from logitcache.distill.train import TrainConfig, open_inputs

    seed, fraction = 3, 0.2
    tcfg = TrainConfig(cache=str(train_setup["cache"]), student=str(train_setup["student"]), out=str(tmp_path / "t"),
                       seed=seed, eval_fraction=fraction)
    shard_size = 4  # train_helpers.build_setup's generate --shard-size
    data = open_inputs(tcfg, load_tokenizer(tcfg.student))
    assert [s.sequences for s in data.cache.shards] == [shard_size] * 6  # precondition: 24 records, no skips
    stream = iter(data.stream(tcfg, RunContext.setup("cpu"), "train"))
    train_ids = [next(stream).sample_id for _ in range(45)]  # past two epochs
    c = cfg(train_setup["student"], train_setup["data"], tmp_path / "s", seed=seed, eval_fraction=fraction,
            shard_size=shard_size)
    enc = encode_records(c, load_tokenizer(c.model))
    ordered = sample_stream(enc.train, 0, 1, seed, 0, 0, shard_size, enc.n_records)
    sft_ids = [e.sample_id for e, _ in islice(ordered, 45)]
    assert sft_ids == train_ids
    assert [e.sample_id for e, _ in islice(sample_stream(enc.train, 0, 1, seed), 45)] != train_ids  # default differs
