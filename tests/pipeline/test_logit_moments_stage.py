"""``--logit-moments`` in stage one: config, cache identity, the header flag and a real hf capture."""

from __future__ import annotations

import numpy as np
import pytest
from cli_helpers import one_line_error
from click.testing import CliRunner
from gen_helpers import write_prompts

from logitcache.cli import main
from logitcache.config import ConfigError
from logitcache.pipeline.generate_config import GenerateConfig
from logitcache.storage import LogitCache
from logitcache.storage.verify import describe_cache


def cfg(**kw):
    return GenerateConfig(model="m", data="d.jsonl", out="o", dtype="float32", **kw)


def test_flag_is_off_by_default_and_identity_only_when_on():
    assert cfg().logit_moments is False
    assert "logit_moments" not in cfg().identity()  # caches made before the flag keep their identity
    assert cfg(logit_moments=True).identity()["logit_moments"] is True
    assert cfg(logit_moments=True, extra_temperatures=[]).logit_moments  # moments without any lse is allowed
    with pytest.raises(ConfigError, match="--logit-moments"):
        cfg(logit_moments=True, row_stats=False)


@pytest.mark.parametrize("mode", ["score", "generate"])
def test_cli_records_moments(ascii_teacher_folder, tmp_path, mode):
    data = write_prompts(tmp_path / "d.jsonl", 3)
    base = ["generate", "--model", str(ascii_teacher_folder), "--data", str(data), "--mode", mode, "--top-k", "4",
            "--max-new-tokens", "6"]
    r = CliRunner().invoke(main, [*base, "--out", str(tmp_path / "on"), "--logit-moments"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, [*base, "--out", str(tmp_path / "off")])
    assert r.exit_code == 0, r.output
    on, off = LogitCache.open(str(tmp_path / "on")), LogitCache.open(str(tmp_path / "off"))
    assert on.header.logit_moments and not off.header.logit_moments
    assert on.header.metadata["capture"]["logit_moments"] is True
    assert "logit_moments" not in off.header.metadata["capture"]
    a, b = on.read_rows(0, 0, on.num_positions), off.read_rows(0, 0, off.num_positions)
    assert a.n == b.n > 0 and b.logit_mean is None
    np.testing.assert_array_equal(a.topk_ids, b.topk_ids)  # the flag adds columns, it changes none
    np.testing.assert_array_equal(a.extra_lse[2.0], b.extra_lse[2.0])
    assert a.logit_std is not None and np.all(a.logit_std > 0) and np.all(np.isfinite(a.logit_mean))
    # the largest logit lies within [mean, mean + std * sqrt(V - 1)] (population std over V entries)
    top = a.topk_logprobs[:, 0].astype(np.float64) + a.extra_lse[1.0]
    assert np.all(top >= a.logit_mean - 1e-4)
    assert np.all(top <= a.logit_mean + a.logit_std * np.sqrt(on.vocab_size - 1) + 1e-3)
    assert describe_cache(on)["row_statistics"][-2:] == ["logit_mean", "logit_std"]
    extra = (on.shards[0].bytes - off.shards[0].bytes) / on.num_positions
    assert extra > 0


def test_resume_with_another_moments_setting_is_refused(ascii_teacher_folder, tmp_path):
    data = write_prompts(tmp_path / "d.jsonl", 2)
    base = ["generate", "--model", str(ascii_teacher_folder), "--data", str(data), "--mode", "score", "--top-k", "4",
            "--out", str(tmp_path / "c")]
    assert CliRunner().invoke(main, base).exit_code == 0
    r = CliRunner().invoke(main, [*base, "--logit-moments"])
    assert r.exit_code != 0 and "logit_moments" in r.output


def test_no_row_stats_with_moments_is_one_line(ascii_teacher_folder, tmp_path):
    data = write_prompts(tmp_path / "d.jsonl", 2)
    args = ["generate", "--model", str(ascii_teacher_folder), "--data", str(data), "--out", str(tmp_path / "c")]
    r = CliRunner().invoke(main, [*args, "--no-row-stats", "--logit-moments"])
    one_line_error(r, "--logit-moments", "--no-row-stats")
    assert not (tmp_path / "c").exists()
