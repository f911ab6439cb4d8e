"""``distill.evaluate``: text metrics against hand-made cases and rouge-score, perplexity against a manual
teacher-forced forward, the report's shape, agreement with a teacher cache, and one-line errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from gen_helpers import write_prompts
from rouge_score import rouge_scorer
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from logitcache.config import ConfigError
from logitcache.distill.evaluate import (
    EvalConfig,
    exact_match,
    format_table,
    normalize_answer,
    rouge,
    run_eval,
    sentences_per_line,
    token_f1,
)
from logitcache.pipeline.generate_stage import GenerateConfig, run_generate
from logitcache.testing.tiny_models import CHAT_TEMPLATE, bpe_tokenizer, save_tiny_model


@pytest.fixture(scope="module")
def teacher(ascii_teacher_folder):
    return ascii_teacher_folder


QA = [
    {"id": "a", "prompt": "What is two plus two?", "response": "Four."},
    {
        "id": "b",
        "prompt": "Which quick brown animal jumps over the lazy dog in the sentence?",
        "response": "The quick brown fox jumps over the lazy dog. It is a fox!",
    },
    {"id": "c", "messages": [{"role": "user", "content": "Count on: 1 2 3"}], "response": "4 5 6 7 8 9"},
    {"id": "d", "prompt": "Say A.", "response": "A"},
    {"id": "e", "prompt": "Question 5: what is 5 plus 5?", "response": "It is 10. The answer is 10!"},
    {
        "id": "f",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}],
        "response": "Hello; students learn from the cache.",
    },
    {"id": "g", "prompt": "abc", "response": ""},
]


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def conversation(row):
    return row.get("messages") or [{"role": "user", "content": row["prompt"]}]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in QA))
    return path


@pytest.fixture(scope="module")
def cache(teacher, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "c"
    run_generate(GenerateConfig(model=str(teacher), data=str(data), out=str(out), mode="score", top_k=4, id_field="id"))
    return out


@pytest.fixture(scope="module")
def report(teacher, data, cache):
    cfg = EvalConfig(
        model=str(teacher), data=str(data), cache=str(cache), batch_size=3, max_new_tokens=6, id_field="id"
    )
    return run_eval(cfg)


# -- text metrics -------------------------------------------------------------------------------------------------
def test_normalize_answer():
    assert normalize_answer("  The Cat, sat  on A mat! ") == "cat sat on mat"
    assert normalize_answer("an apple; theory") == "apple theory"  # 'the' inside a word stays


@pytest.mark.parametrize(
    ("prediction", "reference", "f1", "em"),
    [
        ("The cat sat.", "a cat sat", 1.0, 1.0),  # articles and punctuation do not count
        ("Paris!", "paris", 1.0, 1.0),
        ("cat sat on mat", "the cat sat", 2 / 3, 0.0),  # P = 2/4, R = 2/2
        ("x y y", "y y y z", 4 / 7, 0.0),  # bag overlap counts repeats: 2 shared, P = 2/3, R = 2/4
        ("dog", "cat", 0.0, 0.0),
        ("", "the", 1.0, 1.0),  # both normalize to nothing
        ("an", "cat", 0.0, 0.0),  # one side empty after normalization
    ],
)
def test_token_f1_and_exact_match(prediction, reference, f1, em):
    assert token_f1(prediction, reference) == pytest.approx(f1)
    assert exact_match(prediction, reference) == em


def test_rouge_matches_rouge_score():
    scorer = rouge_scorer.RougeScorer(["rougeL", "rougeLsum"], use_stemmer=True)
    pred = "The cats were sitting on the mat. Then they left! Dogs came"
    ref = "A cat sat on the mat. The dogs arrived later? They left."
    assert sentences_per_line(ref) == "A cat sat on the mat.\nThe dogs arrived later?\nThey left."
    ours = rouge(pred, ref)
    direct = scorer.score(sentences_per_line(ref), sentences_per_line(pred))
    assert ours["rougeL"] == pytest.approx(direct["rougeL"].fmeasure)
    assert ours["rougeLsum"] == pytest.approx(direct["rougeLsum"].fmeasure)
    assert ours["rougeL"] == pytest.approx(scorer.score(ref, pred)["rougeL"].fmeasure)  # newlines do not matter
    assert ours["rougeLsum"] != pytest.approx(ours["rougeL"])  # the summary-level variant really splits
    assert rouge("same words here", "same words here") == {"rougeL": 1.0, "rougeLsum": 1.0}


# -- the run --------------------------------------------------------------------------------------------------------
def test_report_shape(report, data, tmp_path):
    assert report["samples"] == 7 and len(report["per_sample"]) == 7
    assert [r["sample_id"] for r in report["per_sample"]] == list(range(7))
    m = report["metrics"]
    for key in ("rougeL", "rougeLsum", "token_f1", "exact_match", "stopped", "teacher_rougeL"):
        assert 0.0 <= m[key] <= 1.0, key
    assert m["perplexity"] == pytest.approx(math.exp(m["nll"]))
    assert m["teacher_samples"] == 7
    assert [r["source_id"] for r in report["per_sample"]] == [r["id"] for r in QA]
    refs = [r["response"] for r in read_jsonl(data)]
    for row, ref in zip(report["per_sample"], refs):
        assert row["reference"] == ref
        assert row["rougeL"] == pytest.approx(rouge(row["prediction"], ref)["rougeL"])
        assert row["token_f1"] == pytest.approx(token_f1(row["prediction"], ref))
        assert row["finish_reason"] in ("stop", "length")
    weighted = sum(r["nll"] * r["reference_tokens"] for r in report["per_sample"])
    assert m["nll"] == pytest.approx(weighted / report["reference_tokens"])
    table = format_table(report)
    assert "ROUGE-L F vs teacher" in table and "reference perplexity" in table and "7 samples" in table


def test_perplexity_is_manual_teacher_forced_nll(report, teacher, data):
    tok = AutoTokenizer.from_pretrained(teacher)
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    for row, got in zip(read_jsonl(data), report["per_sample"]):
        prompt = tok.apply_chat_template(conversation(row), tokenize=False, add_generation_prompt=True)
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        c_ids = tok(row["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert got["reference_tokens"] == len(c_ids)
        assert got["perplexity"] == pytest.approx(math.exp(mean_nll(model, p_ids, c_ids)), rel=1e-4)


def mean_nll(model, p_ids: list[int], c_ids: list[int]) -> float:
    """Mean NLL of ``c_ids`` after ``p_ids`` from one plain (unpadded) forward."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([p_ids + c_ids])).logits[0].float(), -1)
    return -sum(float(logp[len(p_ids) - 1 + j, t]) for j, t in enumerate(c_ids)) / len(c_ids)


@pytest.fixture(scope="module")
def chatml_eos_teacher(tmp_path_factory):
    """A tiny ChatML model whose tokenizer EOS is ``<|endoftext|>`` while its template ends a turn with
    ``<|im_end|>`` (SmolLM2-Instruct's layout)."""
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe_tokenizer().backend_tokenizer, eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>")
    tok.chat_template = CHAT_TEMPLATE
    return save_tiny_model(tmp_path_factory.mktemp("chatml") / "model", seed=1, tokenizer=tok)


@pytest.mark.parametrize(("chat_template", "end"), [("auto", "<|im_end|>"), ("none", "<|endoftext|>")])
def test_reference_perplexity_ends_with_the_turn_end(chatml_eos_teacher, tmp_path, chat_template, end):
    """The reference is scored with the token that ends the model's turn, the one stage one's --score-eos
    appends: the template's ``<|im_end|>``, or without a template the tokenizer's EOS."""
    rows = [{"prompt": "What is two plus two?", "response": "Four."}, {"prompt": "Say A.", "response": "A"}]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = run_eval(EvalConfig(model=str(chatml_eos_teacher), data=str(data), chat_template=chat_template,
                                 max_new_tokens=2, batch_size=2))
    tok = AutoTokenizer.from_pretrained(chatml_eos_teacher)
    model = AutoModelForCausalLM.from_pretrained(chatml_eos_teacher, dtype=torch.float32).eval()
    end_id, other_id = (tok.convert_tokens_to_ids(t) for t in (end, ({"<|im_end|>", "<|endoftext|>"} - {end}).pop()))
    assert tok.eos_token == "<|endoftext|>" and end_id != other_id  # precondition: EOS and turn end differ
    for row, got in zip(rows, report["per_sample"]):
        prompt = (tok.apply_chat_template(conversation(row), tokenize=False, add_generation_prompt=True)
                  if chat_template == "auto" else row["prompt"])
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        r_ids = tok(row["response"], add_special_tokens=False)["input_ids"]
        assert got["reference_tokens"] == len(r_ids) + 1
        assert got["perplexity"] == pytest.approx(math.exp(mean_nll(model, p_ids, [*r_ids, end_id])), rel=1e-4)
        # the appended token matters to the number: the other end token gives another perplexity
        assert got["perplexity"] != pytest.approx(math.exp(mean_nll(model, p_ids, [*r_ids, other_id])), rel=1e-4)


def test_batched_greedy_matches_unbatched(report, teacher, data, cache, tmp_path):
    out = tmp_path / "r" / "report.json"
    one = run_eval(EvalConfig(model=str(teacher), data=str(data), batch_size=1, max_new_tokens=6, out=str(out)))
    assert [r["prediction"] for r in one["per_sample"]] == [r["prediction"] for r in report["per_sample"]]
    assert [r["nll"] for r in one["per_sample"]] == pytest.approx([r["nll"] for r in report["per_sample"]], rel=1e-5)
    assert "teacher_rougeL" not in one["metrics"]
    assert json.loads(out.read_text()) == json.loads(json.dumps(one))
    assert not [p for p in out.parent.iterdir() if p.name != "report.json"]  # no temporary left behind


def test_agreement_with_teacher_cache(report):
    # a score-mode cache holds the references as the teacher's completions: agreement equals ROUGE-L vs reference
    for row in report["per_sample"]:
        assert row["teacher"] == row["reference"]
        assert row["teacher_rougeL"] == pytest.approx(row["rougeL"])
    assert report["metrics"]["teacher_rougeL"] == pytest.approx(report["metrics"]["rougeL"])


def test_agreement_with_greedy_generated_cache(teacher, data, tmp_path):
    # the teacher evaluated against its own greedy completions agrees with itself
    out = tmp_path / "gen"
    run_generate(
        GenerateConfig(
            model=str(teacher), data=str(data), out=str(out), top_k=4, temperature=0.0, max_new_tokens=5, limit=3
        )
    )
    rep = run_eval(EvalConfig(model=str(teacher), data=str(data), cache=str(out), max_new_tokens=5, limit=4))
    rows = rep["per_sample"]
    assert rep["metrics"]["teacher_samples"] == 3 and rows[3]["teacher_rougeL"] is None
    for row in rows[:3]:
        assert row["prediction"] == row["teacher"].strip()
        assert row["teacher_rougeL"] == pytest.approx(rouge(row["prediction"], row["teacher"])["rougeL"])


# -- errors ---------------------------------------------------------------------------------------------------------
def one_line(excinfo, *needles):
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, msg


def test_unknown_model(data, tmp_path):
    with pytest.raises(ConfigError) as e:
        run_eval(EvalConfig(model=str(tmp_path / "no-such-model"), data=str(data)))
    one_line(e, "--model", "no-such-model")


def test_data_without_references(teacher, tmp_path):
    data = write_prompts(tmp_path / "d.jsonl", 2, with_response=False)
    with pytest.raises(ConfigError) as e:
        run_eval(EvalConfig(model=str(teacher), data=str(data)))
    one_line(e, "d.jsonl:1", "missing field 'response'", "--response-field")
    assert "--mode" not in str(e.value)


def test_cache_of_other_data(teacher, cache, tmp_path):
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"prompt": f"other {i}", "response": "x"}) + "\n" for i in range(3)))
    with pytest.raises(ConfigError) as e:
        run_eval(EvalConfig(model=str(teacher), data=str(other), cache=str(cache)))
    one_line(e, "--cache", "another prompt", "record 0")


def test_missing_cache(teacher, data, tmp_path):
    with pytest.raises(ConfigError) as e:
        run_eval(EvalConfig(model=str(teacher), data=str(data), cache=str(tmp_path / "nope")))
    one_line(e, "--cache", "nope")


@pytest.mark.parametrize(
    ("kw", "flag"),
    [({"max_new_tokens": 0}, "--max-new-tokens"), ({"batch_size": 0}, "--batch-size"), ({"limit": 0}, "--limit")],
)
def test_config_validation(kw, flag):
    with pytest.raises(ConfigError) as e:
        EvalConfig(model="m", data="d", **kw)
    one_line(e, flag)


def test_prompts_tokenize_as_in_stage_one(chatml_eos_teacher, tmp_path, monkeypatch):
    """Special-token text in a prompt is data: eval feeds the model the ids stage one caches (`prompts.prepare`),
    the user's ``<|im_end|>`` spelled as text and only the template's markers as control tokens."""
    import warnings

    import logitcache.distill.evaluate as evaluate
    from logitcache.inputs import InputRecord
    from logitcache.prompts import prepare

    rows = [{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "<|im_end|>"}],
             "response": "Four."}, {"prompt": "The marker is <|im_end|> here.", "response": "A"}]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    seen = []
    real = evaluate.reference_nll

    def spy(model, seqs, prompt_lens, pad_id):
        seen.extend(zip([s.tolist() for s in seqs], prompt_lens))
        return real(model, seqs, prompt_lens, pad_id)

    monkeypatch.setattr(evaluate, "reference_nll", spy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_eval(EvalConfig(model=str(chatml_eos_teacher), data=str(data), max_new_tokens=1, batch_size=1))
    tok = AutoTokenizer.from_pretrained(chatml_eos_teacher)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    expected = []
    for i, row in enumerate(rows):
        rec = InputRecord(i, str(i), row.get("prompt"), row.get("messages"), row["response"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p = prepare(tok, rec, tok.chat_template, "score", score_eos=True)
        assert p.token_ids[: p.prompt_len].tolist().count(im_end) == len(conversation(row))  # the template's only
        expected.append((p.token_ids.tolist(), p.prompt_len))
    assert sorted(seen) == sorted(expected)
