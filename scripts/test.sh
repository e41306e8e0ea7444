#!/usr/bin/env bash
# Install what the tests need (idempotent), then run the whole suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec "${API_ADAPTER_VENV:-.venv}/bin/python" -m pytest -q "$@"
