#!/usr/bin/env bash
# Installs the project and runs the test suite (tests/store, tests/model, tests/cluster,
# tests/benchmarks). Slow end-to-end tests run on small configurations of their own.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m pytest -q -x --timeout=900 tests "$@"
