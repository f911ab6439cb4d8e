"""``--config FILE`` that does not parse: one line naming the file, the line and column, and the problem."""

from __future__ import annotations

import pytest
from cli_helpers import one_line_error
from click.testing import CliRunner

from logitcache.cli import main


@pytest.mark.parametrize("command", ["generate", "train"])
def test_invalid_yaml_config_is_one_line(tmp_path, command):
    bad = tmp_path / "run.yaml"
    bad.write_text('max_steps: 3\nloss: "ce:1\nlr: [1, 2\n')  # an unterminated quote from line 2
    r = CliRunner().invoke(main, [command, "--config", str(bad)])
    one_line_error(r, f"--config {bad}", "line 4, column 1", "unexpected end of stream", "line 2, column 7")
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1, r.output


@pytest.mark.parametrize(
    ("name", "text", "where"),
    [
        ("run.yml", "a: 1\n b: 2\n", "line 2, column 3: mapping values are not allowed here"),
        ("run.json", '{"a": 1,\n "b" 2}', "line 2, column 6: Expecting ':' delimiter"),
        ("run.toml", "max_steps = \n", "line 1, column 13"),
    ],
)
def test_invalid_config_files_name_line_and_column(tmp_path, name, text, where):
    bad = tmp_path / name
    bad.write_text(text)
    r = CliRunner().invoke(main, ["generate", "--config", str(bad)])
    one_line_error(r, f"--config {bad}: cannot parse", where)
