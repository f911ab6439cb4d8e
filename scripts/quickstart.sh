#!/usr/bin/env bash
# The main job on the embedded default: Gemma-3-270M teaches SmolLM2-135M-Instruct (different tokenizers) on CPU:
# generate -> align -> eval -> train (ce + mlot) -> eval, with a summary table and a PNG of the training curves.
# A rerun resumes where it stopped. Output folder: $1 (default runs/quickstart).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
exec python recipes/quickstart.py "$@"
