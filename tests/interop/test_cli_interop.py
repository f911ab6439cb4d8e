"""``logitcache import`` / ``export`` on the command line: summaries, one-line errors, and help without torch."""

from __future__ import annotations

import subprocess
import sys

from cli_helpers import one_line_error
from click.testing import CliRunner

from logitcache.cli import main


def test_cli_export_then_import_prints_summaries_and_provenance(train_setup, tmp_path):
    r = CliRunner().invoke(main, ["export", str(train_setup["cache"]), "--format", "distillkit", "--out",
                                  str(tmp_path / "dk")])
    assert r.exit_code == 0, r.output
    assert "export: 6 files written" in r.output
    r = CliRunner().invoke(main, ["import", str(tmp_path / "dk"), "--format", "distillkit", "--teacher-tokenizer",
                                  str(train_setup["teacher"]), "--out", str(tmp_path / "c"),
                                  "--completion-start", "text:<|im_start|>assistant\n"])
    assert r.exit_code == 0, r.output
    assert "24 sequences" in r.output and "exact" in r.output and "missing statistics: lse@1" in r.output
    again = CliRunner().invoke(main, ["import", str(tmp_path / "dk"), "--format", "distillkit",
                                      "--teacher-tokenizer", str(train_setup["teacher"]), "--out", str(tmp_path / "c"),
                                      "--completion-start", "text:<|im_start|>assistant\n"])
    assert again.exit_code == 0 and "0 shards written (1 already done)" in again.output  # resumed: nothing to do


def test_cli_import_errors_are_one_line(train_setup, tmp_path):
    r = CliRunner().invoke(main, ["import", str(tmp_path / "nothing"), "--format", "topk-parquet",
                                  "--teacher-tokenizer", str(train_setup["teacher"]), "--out", str(tmp_path / "c")])
    one_line_error(r, "SRC", "no such file or folder")
    r = CliRunner().invoke(main, ["import", str(tmp_path), "--format", "topk-parquet", "--teacher-tokenizer",
                                  str(train_setup["teacher"]), "--out", str(tmp_path / "c"),
                                  "--completion-start", "middle"])
    one_line_error(r, "--completion-start", "token:N or text:MARKER")


def test_import_and_export_help_load_no_torch():
    code = ("import sys; from click.testing import CliRunner; from logitcache.cli import main; "
            "[CliRunner().invoke(main, [c, '--help']) for c in ('import', 'export')]; "
            "print('torch' in sys.modules, 'numpy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
