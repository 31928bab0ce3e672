#!/usr/bin/env bash
# Installs the project and runs the test suite. Slow end-to-end tests run on a
# small configuration (KSTORE_SMALL=1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export KSTORE_SMALL=1
python -m pytest -q -x --timeout=900 tests "$@"
