#!/usr/bin/env bash
# Install what the main job needs (idempotent), then run it. Extra args go to `api-adapter main`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec "${API_ADAPTER_VENV:-.venv}/bin/api-adapter" main "$@"
