#!/usr/bin/env bash
# Installs the project, then runs the main job on an embedded local Ray cluster:
# 2 store shards + 1 worker, train, recall, answer, explain, edit, hot-swap, stop.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec kstore demo "$@"
