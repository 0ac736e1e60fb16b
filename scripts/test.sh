#!/usr/bin/env bash
# The test command from the README: installs what the tests need, then runs them (CPU only, no network).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
exec python -m pytest tests -q "$@"
