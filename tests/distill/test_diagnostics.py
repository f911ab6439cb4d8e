"""``train --grad-norm-every``: each term's gradient norm w.r.t. the student logits, and its ratio to ce's."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from loss_helpers import make_batch, random_seqs

from logitcache.distill import train as train_mod
from logitcache.distill.batch import student_forward
from logitcache.distill.context import RunContext
from logitcache.distill.data import Prefetcher
from logitcache.distill.diagnostics import term_grad_norms
from logitcache.distill.losses import LOSSES, CombinedLoss
from logitcache.distill.train import TrainConfig, open_inputs, run_train
from logitcache.models import load_model, load_tokenizer


def _direct(batch, name, weight, config, part=None):
    """The norm the slow way: the term alone on a fresh leaf copy of the logits, one full backward."""
    z = batch.student_logits.detach().clone().requires_grad_(True)
    b = dataclasses.replace(batch, student_logits=z)
    out = LOSSES[name](b, config)
    value = out.value if part is None else (out.parts[part] * out.count).sum() / out.count.sum().clamp_min(1)
    (value * weight).backward()
    return float(z.grad.norm())


def test_norms_and_ratios_equal_a_direct_computation():
    seqs = random_seqs(3, 30, 20, torch.Generator().manual_seed(0), lengths=[(5, 4), (3, 6), (6, 6)])
    batch = make_batch(seqs, 8)
    loss = CombinedLoss("ce:1,uld:0.5,mlot:0.15")
    result = loss(batch)
    logs = term_grad_norms(batch, result, loss.configs)
    for name, w in [("ce", 1.0), ("uld", 0.5), ("mlot", 0.15)]:
        assert logs[f"gradnorm/{name}"] == pytest.approx(_direct(batch, name, w, loss.configs[name]), rel=1e-6)
    for part in ("had", "sl", "sd"):
        direct = _direct(batch, "mlot", 0.15, loss.configs["mlot"], part)
        assert logs[f"gradnorm/mlot/{part}"] == pytest.approx(direct, rel=1e-6)
    assert logs["gradnorm_ratio/ce"] == 1.0
    assert logs["gradnorm_ratio/uld"] == pytest.approx(logs["gradnorm/uld"] / logs["gradnorm/ce"])
    assert logs["gradnorm/mlot"] > 0 and logs["gradnorm/uld"] != logs["gradnorm/mlot"]
    # the step's own backward still runs on the retained graph, and gets the combined gradient
    result.total.backward()
    assert batch.student_logits.grad is not None and float(batch.student_logits.grad.norm()) > 0


def test_no_graph_no_norms():
    batch = make_batch(random_seqs(2, 30, 20, torch.Generator().manual_seed(1)), 8, grad=False)
    assert term_grad_norms(batch, CombinedLoss("ce:1,uld:1")(batch)) == {}


def _metrics(out):
    return [json.loads(ln) for ln in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _cfg(setup, out, **kw):
    base = dict(cache=str(setup["cache"]), student=str(setup["student"]), out=str(out), batch_size=4, lr=3e-3,
                warmup_steps=1, max_steps=4, eval_fraction=0.0, save_every=1000, loss="ce:1,uld:0.5", threads=1)
    return TrainConfig(**{**base, **kw})


def test_train_logs_the_ratio_of_its_first_batch_as_computed_directly(train_setup, tmp_path):
    cfg = _cfg(train_setup, tmp_path / "run", grad_norm_every=2)
    run_train(cfg)
    m = _metrics(tmp_path / "run")
    assert [("gradnorm/uld" in x) for x in m] == [False, True, False, True]
    assert {"gradnorm/ce", "gradnorm_ratio/uld", "gradnorm_ratio/ce"} <= set(m[1])
    # step 1 with --grad-norm-every 1: the untrained student on the stream's first batch, computed here directly
    run_train(_cfg(train_setup, tmp_path / "one", max_steps=1, grad_norm_every=1))
    logged = _metrics(tmp_path / "one")[0]
    ctx = RunContext.setup("cpu", "float32", 1)
    data = open_inputs(cfg, load_tokenizer(cfg.student))
    model = load_model(cfg.student)
    data.student_vocab = int(model.get_input_embeddings().weight.shape[0])
    loader = Prefetcher(data.stream(cfg, ctx, "train"), cfg.batch_size, data.pad_id, 1)
    try:
        batch, _, _ = next(loader)
    finally:
        loader.close()
    db = student_forward(model, batch, same_vocab=data.same_vocab)
    ce = _direct(db, "ce", 1.0, LOSSES["ce"].make_config())
    uld = _direct(db, "uld", 0.5, CombinedLoss("ce:1,uld:0.5", cfg.loss_configs()).configs["uld"])
    assert logged["gradnorm/ce"] == pytest.approx(ce, rel=1e-4)
    assert logged["gradnorm_ratio/uld"] == pytest.approx(uld / ce, rel=1e-4)


def test_off_by_default_never_calls_it(train_setup, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("term_grad_norms ran with --grad-norm-every 0")

    monkeypatch.setattr(train_mod, "term_grad_norms", boom)
    assert TrainConfig.__dataclass_fields__["grad_norm_every"].default == 0
    run_train(_cfg(train_setup, tmp_path / "run", max_steps=2))
    assert not any(k.startswith("gradnorm") for x in _metrics(tmp_path / "run") for k in x)


def test_grad_norms_refused_with_the_fused_head(tmp_path) -> None:
    """The fused head has no logits to differentiate: the combination is refused up front, not logged as nothing."""
    import pytest

    from logitcache.config import ConfigError
    from logitcache.distill.train_config import TrainConfig

    with pytest.raises(ConfigError, match="--grad-norm-every.*--fused-head"):
        TrainConfig(cache="c", student="s", out=str(tmp_path), grad_norm_every=2, fused_head=True)
    assert TrainConfig(cache="c", student="s", out=str(tmp_path), fused_head=True).grad_norm_every == 0
