"""Row statistics in stage one's config: recorded by default (tau = 1, 2), other sets, none, and bad input."""

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


def cfg(**kw):
    return GenerateConfig(model="m", data="d.jsonl", out="o", dtype="float32", **kw)


def test_defaults_other_sets_and_none():
    assert cfg().extra_temperatures == [1.0, 2.0] and cfg().row_stats  # what ce:1,mlot:0.15 needs
    assert cfg(extra_temperatures=[4.0]).extra_temperatures == [1.0, 4.0]  # tau = 1 is always added
    assert cfg(extra_temperatures=[4.0, 0.5, 4.0]).extra_temperatures == [0.5, 1.0, 4.0]
    assert cfg(row_stats=False).extra_temperatures == []
    assert cfg(row_stats=False, extra_temperatures=[3.0]).extra_temperatures == []  # the switch wins
    none = cfg(extra_temperatures=[])  # a config file's `extra_temperatures = []`
    assert none.extra_temperatures == [] and not none.row_stats
    # the switch is implied by the list: it is not part of the cache identity (caches made before it resume)
    assert "row_stats" not in cfg().identity()
    assert cfg().identity()["extra_temperatures"] == [1.0, 2.0]
    assert cfg(row_stats=False).identity() == none.identity()


@pytest.mark.parametrize("bad", ["0", "-1", "inf", "nan"])
def test_bad_temperature_is_one_line_naming_the_flag(ascii_teacher_folder, tmp_path, bad):
    data = write_prompts(tmp_path / "d.jsonl", 2)
    args = ["generate", "--model", str(ascii_teacher_folder), "--data", str(data), "--out", str(tmp_path / "c")]
    r = CliRunner().invoke(main, [*args, "--extra-temperatures", "2", "--extra-temperatures", bad])
    one_line_error(r, "--extra-temperatures", "finite and > 0")
    assert not (tmp_path / "c").exists()
    with pytest.raises(ConfigError, match="--extra-temperatures"):
        cfg(extra_temperatures=[float(bad)])


def test_cli_records_defaults_other_sets_and_none(ascii_teacher_folder, tmp_path):
    data = write_prompts(tmp_path / "d.jsonl", 2)
    base = ["generate", "--model", str(ascii_teacher_folder), "--data", str(data), "--mode", "score", "--top-k", "4"]
    for name, extra, want in (
        ("default", [], [1.0, 2.0]),
        ("four", ["--extra-temperatures", "4", "--extra-temperatures", "0.5"], [0.5, 1.0, 4.0]),
        ("none", ["--no-row-stats"], []),
    ):
        r = CliRunner().invoke(main, [*base, "--out", str(tmp_path / name), *extra])
        assert r.exit_code == 0, r.output
        cache = LogitCache.open(str(tmp_path / name))
        assert cache.header.extra_temperatures == want
        rows = cache.read_rows(0, 0, cache.num_positions)
        assert sorted(rows.extra_lse) == want and rows.n > 0
        for tau in want:  # max logit = top-1 logprob + lse_1, and max / tau <= lse_tau <= max / tau + log V
            top = (rows.topk_logprobs[:, 0].astype(np.float64) + rows.extra_lse[1.0]) / tau
            assert (rows.extra_lse[tau] >= top - 1e-3).all()
            assert (rows.extra_lse[tau] <= top + np.log(cache.vocab_size) + 1e-3).all()
