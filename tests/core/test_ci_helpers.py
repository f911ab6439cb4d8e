"""``ci_helpers.need``: a missing optional test dependency skips on a developer's machine and fails under CI.

Runs a small test file in a child pytest with and without ``CI`` and reads the outcome from its summary line.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]

PROBE = '''
from ci_helpers import need, need_module


def test_missing_package():
    need(False, "needs: pip install some-model-package")


def test_missing_module():
    need_module("no_such_module_for_ci_helpers")


def test_present():
    need(True, "never shown")
    assert need_module("json").dumps(1) == "1"
'''


def run_probe(tmp_path: Path, ci: str | None) -> str:
    (tmp_path / "test_probe.py").write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
         str(tmp_path / "test_probe.py")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env,
    )
    return r.stdout + r.stderr


@pytest.mark.parametrize("ci", [None, "false"])
def test_skips_outside_ci(tmp_path, ci):
    out = run_probe(tmp_path, ci)
    assert "1 passed, 2 skipped" in out, out
    assert "needs: pip install some-model-package" in out


@pytest.mark.parametrize("ci", ["true", "1"])
def test_fails_under_ci(tmp_path, ci):
    out = run_probe(tmp_path, ci)
    assert "2 failed, 1 passed" in out, out
    assert "a missing test dependency is an install failure, not a skip" in out
