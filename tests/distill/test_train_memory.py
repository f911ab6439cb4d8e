"""Training at real sizes (issue 15) on tiny models: ``--fused-head`` and ``--gradient-checkpointing`` train the
same losses as the plain path, ``--attn-implementation`` reaches the model, the memory estimate is printed before
the first step and the measured peak after the first steps, and an out-of-memory error ends in one line naming
the knobs. ``eval --threads`` sets torch's threads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_helpers import one_line_error
from click.testing import CliRunner

from logitcache.cli import main
from logitcache.distill import train as train_mod
from logitcache.distill.train import TrainConfig, run_train


@pytest.fixture(scope="module")
def setup(train_setup):
    return train_setup


def cfg(setup, out, **kw):
    base = dict(
        cache=str(setup["cache"]),
        student=str(setup["student"]),
        out=str(out),
        batch_size=4,
        lr=3e-3,
        warmup_steps=0,
        max_steps=4,
        eval_fraction=0.2,
        eval_every=4,
        save_every=1000,
        loss="ce:1,mlot:0.15",
    )
    return TrainConfig(**{**base, **kw})


def metrics(out):
    return [json.loads(ln) for ln in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_fused_head_and_checkpointing_train_the_same_losses(setup, tmp_path):
    runs = {}
    for name, kw in {
        "plain": {},
        "fused": {"fused_head": True, "head_chunk": 5},
        "fused+ckpt": {"fused_head": True, "gradient_checkpointing": True},
    }.items():
        run_train(cfg(setup, tmp_path / name, **kw))
        runs[name] = metrics(tmp_path / name)
    ref = runs["plain"]
    assert len(ref) == 4 and ref[0]["loss"] > 0
    for name in ("fused", "fused+ckpt"):
        for a, b in zip(runs[name], ref):  # 4 optimizer steps: the updates follow the same gradients
            for key in ("loss", "loss/ce", "loss/mlot", "grad_norm"):
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (name, key)
        assert runs[name][-1]["eval/ce"] == pytest.approx(ref[-1]["eval/ce"], rel=1e-4)


def test_estimate_before_the_first_step_and_measured_peak_after(setup, tmp_path, capsys):
    summary = run_train(cfg(setup, tmp_path / "run", max_steps=3, fused_head=True))
    err = capsys.readouterr().err
    assert "estimated peak CPU memory per rank" in err and "parameters" in err and "logits" in err
    assert "measured peak memory after 2 steps" in err and "peak RSS" in err
    assert err.index("estimated peak") < err.index("measured peak")
    mem = summary["memory"]
    assert mem["estimated_peak_gib"] > 0 and mem["measured_peak_gib"] > 0
    assert "peak_memory_gib" in metrics(tmp_path / "run")[1]


def test_estimate_shrinks_with_the_fused_head_and_checkpointing():
    from logitcache.distill.memory import estimate_memory
    from logitcache.testing.tiny_models import tiny_llama, unigram_tokenizer

    model = tiny_llama(unigram_tokenizer(), seed=0)
    kw = dict(batch_size=4, max_length=1024, bf16=False, head_chunk=64, attn="sdpa")
    plain = estimate_memory(model, checkpointing=False, fused=False, **kw)
    fused = estimate_memory(model, checkpointing=False, fused=True, **kw)
    both = estimate_memory(model, checkpointing=True, fused=True, **kw)
    assert fused.logits < plain.logits and both.activations < fused.activations
    assert plain.total > fused.total > both.total > both.parameters + both.gradients + both.optimizer


CPU_OOM = "[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried to allocate 8"


@pytest.mark.parametrize(
    "error", [torch.OutOfMemoryError("simulated"), MemoryError("simulated"), RuntimeError(CPU_OOM)]
)
def test_out_of_memory_ends_with_one_line_naming_the_knobs(setup, tmp_path, monkeypatch, error):
    def step(self, loader):
        raise error

    monkeypatch.setattr(train_mod._Trainer, "step", step)
    args = ["train", "--cache", str(setup["cache"]), "--student", str(setup["student"]), "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(main, [*args, "--max-steps", "2", "--eval-fraction", "0"])
    one_line_error(
        result, "out of memory", "--batch-size", "--max-length", "--gradient-checkpointing", "--fused-head",
        "--parallel fsdp",
    )


def test_attn_implementation_and_checkpointing_reach_the_model(setup, tmp_path, monkeypatch):
    seen = []
    original = train_mod._Trainer.__init__

    def init(self, cfg_, ctx, data, model, *a, **k):
        name = "is_activation_checkpointing"
        name = name if hasattr(model, name) else "is_gradient_checkpointing"
        seen.append((model.config._attn_implementation, getattr(model, name)))
        original(self, cfg_, ctx, data, model, *a, **k)

    monkeypatch.setattr(train_mod._Trainer, "__init__", init)
    run_train(
        cfg(setup, tmp_path / "eager", max_steps=1, eval_fraction=0.0, attn_implementation="eager",
            gradient_checkpointing=True)
    )
    run_train(cfg(setup, tmp_path / "auto", max_steps=1, eval_fraction=0.0))
    assert seen == [("eager", True), ("sdpa", False)]


def test_other_runtime_errors_are_not_reported_as_out_of_memory(setup, tmp_path, monkeypatch):
    def step(self, loader):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(train_mod._Trainer, "step", step)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_train(cfg(setup, tmp_path / "o", max_steps=1, eval_fraction=0.0))


def test_unknown_attn_implementation_is_one_line(setup, tmp_path):
    args = ["train", "--cache", str(setup["cache"]), "--student", str(setup["student"]), "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(main, [*args, "--max-steps", "1", "--attn-implementation", "no-such-attention"])
    one_line_error(result, "--attn-implementation no-such-attention", "sdpa or eager")


def test_eval_threads(setup, tmp_path, monkeypatch):
    from logitcache.distill.evaluate import EvalConfig, run_eval

    data = Path(setup["data"])
    before = torch.get_num_threads()
    try:
        run_eval(EvalConfig(model=str(setup["student"]), data=str(data), limit=2, max_new_tokens=2, threads=1))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(Exception, match="threads"):
        EvalConfig(model="m", data=str(data), threads=0)


def test_auto_attention_falls_back_to_eager_with_a_note(setup, monkeypatch, capsys):
    """A model without sdpa support: ``auto`` loads it with eager attention and says so on stderr."""
    from transformers import AutoModelForCausalLM

    from logitcache.models import load_model

    original = AutoModelForCausalLM.from_pretrained
    asked = []

    def from_pretrained(folder, **kw):
        asked.append(kw.get("attn_implementation"))
        if kw.get("attn_implementation") == "sdpa":
            raise ValueError("TinyForCausalLM does not support an attention implementation through sdpa yet")
        return original(folder, **kw)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_pretrained)
    model = load_model(setup["student"], device="cpu", attn_implementation="auto")
    assert asked == ["sdpa", "eager"] and model.config._attn_implementation == "eager"
    assert "no sdpa attention" in capsys.readouterr().err
    with pytest.raises(Exception, match="--attn-implementation sdpa"):
        load_model(setup["student"], device="cpu", attn_implementation="sdpa")


def test_fused_head_under_two_process_ddp_trains_the_same_losses(setup, tmp_path):
    """Through the DDP wrapper (gloo, 2 ranks): the decoder hook still sees the forward, the head's gradient is
    all-reduced like every other, and the per-step losses match the unfused run's."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {}
    for name, extra in {"plain": [], "fused": ["--fused-head", "--head-chunk", "3"]}.items():
        out = tmp_path / name
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
               "logitcache.cli", "train", "--cache", str(setup["cache"]), "--student", str(setup["student"]),
               "--out", str(out), "--batch-size", "2", "--max-steps", "3", "--eval-fraction", "0", "--lr", "3e-3",
               "--warmup-steps", "0", "--loss", "ce:1,mlot:0.15", *extra]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = metrics(out)
    assert len(runs["plain"]) == 3
    for a, b in zip(runs["fused"], runs["plain"]):
        for key in ("loss", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
