"""CLI start-up stays cheap: ``--help``, ``--version`` and argument errors never import torch, numpy or transformers.

Timing is not asserted (a busy CI machine makes wall-clock thresholds flaky); what makes start-up slow is importing
the heavy libraries, so the tests assert that directly: each command runs in a fresh interpreter in which those
libraries cannot be imported at all (``sys.modules[name] = None`` makes ``import name`` raise), and must still do
its job. ``bench/cli_startup.py`` measures the times.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "numpy", "transformers", "pyarrow", "tokenizers")


def run_without_heavy(*args: str) -> subprocess.CompletedProcess[str]:
    """``logitcache ARGS`` in a fresh interpreter where importing any of ``HEAVY`` raises ImportError."""
    code = (
        "import sys\n"
        f"for name in {HEAVY!r}:\n"
        "    sys.modules[name] = None\n"
        "from logitcache.cli import main\n"
        f"main({list(args)!r}, prog_name='logitcache')\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_import_cli_loads_no_heavy_library():
    code = f"import sys, logitcache.cli; print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--version"], "logitcache, version"),
        (["--help"], "Stages:"),
        (["generate", "--help"], "--top-k"),
        (["align", "--help"], "--student-tokenizer"),
        (["train", "--help"], "--loss"),
        (["eval", "--help"], "--max-new-tokens"),
    ],
)
def test_help_and_version_without_heavy_libraries(args, needle):
    r = run_without_heavy(*args)
    assert r.returncode == 0, r.stderr
    assert needle in r.stdout


@pytest.mark.parametrize(
    "args, needle",
    [
        (["train", "--max-steps", "abc"], "'abc' is not a valid integer"),
        (["train", "--no-such-flag"], "No such option"),
        (["generate", "--mode", "bogus"], "'bogus' is not one of"),
        (["train", "--cache", "c", "--out", "o"], "missing required option(s): --student"),
        (["generate", "--model", "m", "--data", "d", "--out", "o", "--top-k", "0"], "--top-k: must be >= 1"),
        (["align", "--student-tokenizer", "s"], "missing required option(s): CACHE"),
    ],
)
def test_argument_errors_without_heavy_libraries(args, needle):
    """Usage errors (click) and config errors (the dataclass checks) both answer before anything heavy loads."""
    r = run_without_heavy(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert needle in r.stderr, r.stderr
    assert "Traceback" not in r.stderr, r.stderr


def test_user_error_classes_named_by_the_cli_exist():
    """The CLI names its user-facing exception classes by module and class (so that it need not import them at
    start-up); a typo there would only show when a user error turned into a traceback."""
    import importlib

    from logitcache.cli import _USER_ERRORS

    for module, name in _USER_ERRORS:
        cls = getattr(importlib.import_module(module), name)
        assert issubclass(cls, Exception), (module, name)


def test_a_library_user_error_is_one_line(tmp_path):
    """An error class the CLI did not import itself (storage's CacheError) still prints as one line, exit 2."""
    r = subprocess.run(
        [sys.executable, "-m", "logitcache.cli", "inspect", str(tmp_path / "nope")],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: ") and "no such cache folder" in r.stderr and "Traceback" not in r.stderr
