"""Every loss gets the row statistics it needs, or refuses: the loss -> temperatures rule, `train`'s check before
the first step, the losses' own refusal, and `inspect`'s list of statistics and exactly supported losses."""

from __future__ import annotations

import json

import pytest
import torch
from cli_helpers import one_line_error
from click.testing import CliRunner
from gen_helpers import ascii_teacher, write_prompts
from loss_helpers import make_batch, random_seqs
from train_helpers import STUDENT_TEMPLATE

from logitcache.cli import main
from logitcache.config import ConfigError
from logitcache.distill.losses import (
    LOSSES,
    CombinedLoss,
    MissingStatistic,
    check_statistics,
    exact_losses,
    loss_temperatures,
    required_temperatures,
)
from logitcache.pipeline.align_stage import AlignConfig, run_align
from logitcache.pipeline.generate_stage import GenerateConfig, run_generate
from logitcache.testing.tiny_models import tiny_llama, unigram_tokenizer


def test_required_temperatures_per_loss():
    assert required_temperatures("ce:1,mlot:0.15") == {1.0, 2.0}  # the default recipe needs lse@1 and lse@2
    assert loss_temperatures("mlot") == {"tau_sd": 2.0}
    assert required_temperatures("ce,kl,rkl,uld,alm") == set()  # tau = 1 / realized tokens only: exact anywhere
    assert required_temperatures("uld", {"uld": {"tau": 3.0}}) == {1.0, 3.0}
    assert required_temperatures("kl", {"kl": {"tau": 0.5}}) == {0.5, 1.0}
    assert required_temperatures("mlot", {"mlot": {"rank_tau": 4.0, "tau_sd": 1.0}}) == {1.0, 4.0}
    assert required_temperatures("mlot", {"mlot": {"gamma": 0.0}}) == set()  # no Sinkhorn term, no tau_SD
    assert required_temperatures("mlot", {"mlot": {"tempered": "renormalize"}}) == set()  # the explicit choice
    assert required_temperatures("alm", {"alm": {"tau": 100.0}}) == set()


def test_check_statistics_names_loss_statistic_and_fix():
    check_statistics("ce:1,mlot:0.15", {}, [1.0, 2.0])  # a default capture: fine
    check_statistics("ce:1,mlot:0.15", {"mlot": {"tempered": "renormalize"}}, [])  # explicit approximation
    for available in ([], [2.0], [1.0]):  # lse@2 alone is not enough: the cached logprobs need lse@1 too
        with pytest.raises(ConfigError) as e:
            check_statistics("ce:1,mlot:0.15", {}, available)
        msg = str(e.value)
        assert "\n" not in msg
        for needle in ("--loss mlot (tau_sd=2)", "logsumexp(logits/2)", "--extra-temperatures 2", "renormalize"):
            assert needle in msg, msg
    with pytest.raises(ConfigError, match=r"--loss uld \(tau=3\).*--extra-temperatures 3"):
        check_statistics("uld", {"uld": {"tau": 3.0}}, [1.0, 2.0])
    with pytest.raises(ConfigError, match="--loss-config: mlot"):
        check_statistics("mlot", {"mlot": {"no_such_field": 1}}, [1.0, 2.0])


def test_exact_losses():
    assert exact_losses([]) == ["ce", "kl", "rkl", "uld", "alm"]
    assert exact_losses([1.0, 2.0]) == list(LOSSES)
    assert exact_losses([2.0]) == ["ce", "kl", "rkl", "uld", "alm"]


def test_losses_refuse_without_lse_and_renormalize_only_when_told():
    g = torch.Generator().manual_seed(3)
    seqs = random_seqs(2, 14, 12, g, lengths=[(4, 5), (3, 3)])
    bare, recorded = make_batch(seqs, 5, taus=()), make_batch(seqs, 5, taus=(2.0,))
    for name, cfg in (("mlot", {}), ("uld", {"tau": 2.0})):
        with pytest.raises(MissingStatistic, match=f"{name} at tau=2 needs"):
            LOSSES[name](bare, LOSSES[name].make_config(**cfg))
        with pytest.raises(MissingStatistic):
            CombinedLoss(f"ce:1,{name}:0.5", {name: cfg})(bare)
        exact = LOSSES[name](recorded, LOSSES[name].make_config(**cfg)).value.detach()
        approx = LOSSES[name](bare, LOSSES[name].make_config(**cfg, tempered="renormalize")).value.detach()
        # "renormalize" is literal: with the lse recorded it still renormalizes (the same number as without)
        same = LOSSES[name](recorded, LOSSES[name].make_config(**cfg, tempered="renormalize")).value.detach()
        assert torch.isfinite(exact) and torch.isfinite(approx)
        assert float(same) == pytest.approx(float(approx), abs=1e-12)
        assert abs(float(exact) - float(approx)) > 1e-4  # K < V: the approximation is a different number
    with pytest.raises(ValueError, match="tempered must be 'exact' or 'renormalize'"):
        LOSSES["mlot"](recorded, LOSSES["mlot"].make_config(tempered="nope"))
    # tau = 1 losses and gamma = 0 need nothing
    assert torch.isfinite(LOSSES["uld"](bare).value)
    assert torch.isfinite(LOSSES["mlot"](bare, LOSSES["mlot"].make_config(gamma=0.0)).value)


# ---- train and inspect on real (tiny) caches ----------------------------------------------------------------


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """Two score-mode caches of one tiny teacher, aligned to one student: a default capture (lse@1, lse@2) and a
    `--no-row-stats` one (what every cache made before row statistics looks like)."""
    root = tmp_path_factory.mktemp("loss-stats")
    teacher = ascii_teacher(root / "teacher")
    data = write_prompts(root / "p.jsonl", 8)
    tok = unigram_tokenizer()
    tok.chat_template = STUDENT_TEMPLATE
    student = root / "student"
    tiny_llama(tok, seed=1).save_pretrained(student)
    tok.save_pretrained(student)
    out = {"student": student}
    for name, stats in (("with", True), ("without", False)):
        cfg = GenerateConfig(
            model=str(teacher), data=str(data), out=str(root / name), mode="score", top_k=8, row_stats=stats
        )
        assert cfg.extra_temperatures == ([1.0, 2.0] if stats else [])
        run_generate(cfg)
        run_align(AlignConfig(cache=str(root / name), student_tokenizer=str(student), workers=1))
        out[name] = root / name
    return out


def _train(caches, cache, out, *extra):
    args = ["train", "--cache", str(cache), "--student", str(caches["student"]), "--out", str(out)]
    args += ["--max-steps", "1", "--batch-size", "2", "--eval-fraction", "0", *extra]
    return CliRunner().invoke(main, args)


def test_train_refuses_a_cache_without_the_statistic_before_the_first_step(caches, tmp_path):
    r = _train(caches, caches["without"], tmp_path / "run")  # default loss ce:1,mlot:0.15
    one_line_error(r, "--loss mlot (tau_sd=2)", "logsumexp(logits/2)", "--extra-temperatures 2", "renormalize")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    r = _train(caches, caches["without"], tmp_path / "run2", "--loss", "ce:1,uld:1", "--loss-config",
               '{"uld": {"tau": 2}}')
    one_line_error(r, "--loss uld (tau=2)", "--extra-temperatures 2")


def test_train_with_the_explicit_approximation_records_it(caches, tmp_path):
    choice = '{"mlot": {"tempered": "renormalize"}}'
    r = _train(caches, caches["without"], tmp_path / "run", "--loss-config", choice)
    assert r.exit_code == 0, r.output
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert json.dumps(saved).count("renormalize") >= 1, saved  # the choice is part of the run's record
    r = _train(caches, caches["with"], tmp_path / "run-exact")  # the default capture: exact, no option needed
    assert r.exit_code == 0, r.output


def test_inspect_lists_statistics_and_exact_losses(caches):
    for name, stats, exact in (
        ("with", ["lse@1", "lse@2"], list(LOSSES)),
        ("without", [], ["ce", "kl", "rkl", "uld", "alm"]),
    ):
        r = CliRunner().invoke(main, ["inspect", str(caches[name]), "--json"])
        assert r.exit_code == 0, r.output
        info = json.loads(r.output)
        assert info["row_statistics"] == stats
        # the CLI's torch-free table agrees with distill.losses' rule
        assert info["exact_losses"] == exact == exact_losses(info["extra_temperatures"])
        text = CliRunner().invoke(main, ["inspect", str(caches[name])]).output
        line = next(ln for ln in text.splitlines() if ln.startswith("statistics"))
        assert line.startswith("statistics   lse@1 lse@2  " if stats else "statistics   none  "), line
        assert ("mlot needs lse@1 lse@2: re-capture with --extra-temperatures 2" in line) != bool(stats), line
