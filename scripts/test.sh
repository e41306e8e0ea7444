#!/usr/bin/env bash
# Install what the tests need (idempotent), then run the whole suite. Extra args go to pytest.
# --fast (first argument): only the tests not marked slow (pure unit tests, no Ray cluster, no
# model training), a couple of minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
if [[ "${1:-}" == "--fast" ]]; then
    shift
    set -- -m "not slow" "$@"
fi
exec "${API_ADAPTER_VENV:-.venv}/bin/python" -m pytest -q "$@"
