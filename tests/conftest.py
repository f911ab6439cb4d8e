"""Fixtures shared across the test tree (which mirrors the package: ``tests/storage``, ``tests/pipeline``,
``tests/distill``, ``tests/core`` for the shared core in ``logitcache/``).

- Every test run converts models into a project-local cache (``.cache/models`` under the repository, or
  ``$LOGITCACHE_MODEL_CACHE`` when set), never into the user's ``~/.cache``.
- ``ascii_teacher_folder``: a tiny random teacher whose every token is valid UTF-8 (``gen_helpers``), built once.
- ``prompts_file``: ten score-mode prompts with responses.
- ``train_setup``: that teacher's cache aligned to a tiny student with another tokenizer (``train_helpers``),
  built once per session and only copied, never changed, by the tests that use it.

This directory is on ``sys.path`` (pytest's prepend import mode), so tests import the helper modules beside it
(``cache_helpers``, ``cli_helpers``, ``gen_helpers``, ``train_helpers``, ``loss_helpers``, ``ci_helpers``) by name.

Optional test dependencies (real-model PyPI packages, s3fs, gguf) are asked for with ``ci_helpers.need`` /
``need_module``: a skip on a partial environment, a failure when ``CI`` is set (CI installs everything, so a
missing package there is a broken install). Only ``vllm`` stays a plain ``importorskip``: the main environment
never has it; its tests run in ``.venv-vllm``, whose setup script refuses to finish without it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("LOGITCACHE_MODEL_CACHE", str(REPO / ".cache" / "models"))


@pytest.fixture(scope="session")
def ascii_teacher_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gen_helpers import ascii_teacher

    return ascii_teacher(tmp_path_factory.mktemp("teacher") / "model")


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gen_helpers import write_prompts

    return write_prompts(tmp_path_factory.mktemp("data") / "prompts.jsonl", 10)


@pytest.fixture(scope="session")
def train_setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from train_helpers import build_setup

    return build_setup(tmp_path_factory.mktemp("train"))


def pytest_report_header(config: pytest.Config) -> str:
    from ci_helpers import in_ci

    mode = "CI (missing optional test dependencies fail)" if in_ci() else "local (missing ones skip)"
    return f"logitcache: model cache {os.environ['LOGITCACHE_MODEL_CACHE']}; {mode}"
