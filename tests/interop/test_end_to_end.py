"""A DistillKit-format dataset -> ``import`` -> ``align`` to a student with another tokenizer -> ``train``.

The source is the fixture cache exported by ``export --format distillkit`` (DistillKit's published schema,
arcee-ai/DistillKit ``distillkit/sample_common.py: compressed_logit_schema``): the path docs/interop.md walks.
"""

from __future__ import annotations

import math

import pytest

from logitcache.config import ConfigError
from logitcache.distill.train import run_train
from logitcache.distill.train_config import TrainConfig
from logitcache.interop.export_stage import run_export
from logitcache.interop.import_stage import run_import
from logitcache.interop.interop_config import ExportConfig, ImportConfig
from logitcache.pipeline.align_stage import AlignConfig, run_align


def test_distillkit_dataset_to_a_student_with_another_tokenizer(train_setup, tmp_path):
    setup = train_setup
    run_export(ExportConfig(cache=str(setup["cache"]), format="distillkit", out=str(tmp_path / "dk")))
    run_import(ImportConfig(src=str(tmp_path / "dk"), format="distillkit", teacher_tokenizer=str(setup["teacher"]),
                            out=str(tmp_path / "c"), completion_start=r"text:<|im_start|>assistant\n", shard_size=8))
    m = run_align(AlignConfig(cache=str(tmp_path / "c"), student_tokenizer=str(setup["student"]), workers=1))
    assert m["stats"]["sequences"] == 24
    base = dict(cache=str(tmp_path / "c"), student=str(setup["student"]), batch_size=4, lr=3e-3, warmup_steps=1,
                max_steps=3, eval_fraction=0.0, save_every=1000)
    with pytest.raises(ConfigError, match="--loss mlot"):  # no lse@2 in an imported cache: refused, one line
        run_train(TrainConfig(out=str(tmp_path / "t0"), loss="ce:1,mlot:0.15", **base))
    s = run_train(TrainConfig(out=str(tmp_path / "t"), loss="ce:1,uld:0.5,alm:0.1", **base))
    assert s["steps"] == 3
    assert math.isfinite(s["last"]["loss"]) and s["last"]["loss"] > 0
